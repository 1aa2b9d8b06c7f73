"""The split itself: parts compose to the unsplit model; bad cuts are refused clearly."""

import pytest
import torch

from splitkit import count_parameters, split_model
from splitkit.core.split import n_layers
from splitkit.training.testing import random_batch


@pytest.mark.parametrize("cuts", [(0, 3), (2, 4), (1, 6), (0, 6), (5, 6)])
def test_split_logits_equal_unsplit(tiny, cuts):
    model, _ = tiny
    ids = random_batch(model.config.vocab_size, batch=3, seq=17)["input_ids"]
    bottom, trunk, top = split_model(model, cuts)
    with torch.no_grad():
        h1 = bottom(ids)
        h2 = trunk(h1)
        logits = top(h2)
        expected = model(ids).logits
    assert h1.shape == h2.shape == (3, 17, model.config.hidden_size)
    assert torch.allclose(logits, expected, rtol=1e-5, atol=1e-6)


def test_smollm2_split_logits_equal_unsplit(smollm2):
    model, tokenizer = smollm2
    ids = tokenizer(["The capital of France is", "Split learning keeps the labels"], padding=True,
                    return_tensors="pt").input_ids
    bottom, trunk, top = split_model(model, (10, 20))
    with torch.no_grad():
        assert torch.allclose(top(trunk(bottom(ids))), model(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cuts, message", [
    ((3, 3), "the Trunk would be empty"),
    ((4, 2), "0 <= a < b <= n_layers"),
    ((-1, 3), "0 <= a < b <= n_layers"),
    ((0, 7), "do not fit a model of 6 blocks"),
    (("x", 2), "two integers"),
    ((1,), "two integers"),
])
def test_bad_cuts_are_refused(cuts, message):
    from splitkit import load_model
    model, _ = load_model("tiny-llama")
    with pytest.raises(ValueError, match=message):
        split_model(model, cuts)


def test_parameter_counts_add_up(tiny):
    model, _ = tiny
    parts = split_model(model, (2, 4))
    total = sum(count_parameters(p)[0] for p in parts)
    tied = model.lm_head.weight.numel() if model.config.tie_word_embeddings else 0
    assert total == count_parameters(model)[0] + tied  # a tied embedding sits in Bottom and Top
    assert n_layers(model) == 6
