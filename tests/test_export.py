"""A split run saved as a PEFT adapter gives the unsplit model the split model's logits."""

import copy

import pytest
import torch
from peft import PeftModel

from splitkit import Learner, LoraSpec
from splitkit.training.export import save_adapter
from splitkit.training.testing import random_batch

CUTS = (2, 4)


@pytest.mark.parametrize("mode", ["detach", "full", "full+trunk", "local"])
def test_the_saved_adapter_reproduces_the_split_models_logits(tiny, serve, tmp_path, mode):
    model, _ = tiny
    address = None if mode == "local" else serve(model, CUTS)
    with Learner(model, mode=mode, cuts=CUTS, address=address, lora=LoraSpec(r=4, lora_alpha=8), lr=1e-2) as learner:
        for seed in range(3):
            learner.step(random_batch(model.config.vocab_size, seed=seed))
        ids = random_batch(model.config.vocab_size, seed=9)["input_ids"]
        want = learner.logits(ids)
        save_adapter(learner, model, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    unsplit = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "adapter").eval()
    with torch.no_grad():
        got = unsplit(input_ids=ids).logits
        merged = unsplit.merge_and_unload()(input_ids=ids).logits
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), float((got - want).abs().max())
    assert torch.allclose(merged, want, rtol=1e-4, atol=1e-4), float((merged - want).abs().max())
    with torch.no_grad():
        untrained = model(input_ids=ids).logits
    assert not torch.allclose(untrained, want, atol=1e-4)  # the run changed the model: the check means something
