"""The central test: over a real ZeroMQ socket, split gradients equal the unsplit model's."""

import copy

import pytest
import torch

from splitkit import Learner, load_model
from splitkit.core.lora import lora_grads, unsplit_reference
from splitkit.core.split import left_padding
from splitkit.training.testing import max_rel_diff, random_batch, reference_grads, rel_diff
from splitkit.training.train import criterion
from splitkit.trunk.sessions import Limits

from .conftest import RTOL


def split_grads(model, cuts, spec, batch, mode, address, **options):
    learner = Learner(model, mode=mode, cuts=cuts, address=address, lora=spec, **options)
    learner.forward_backward(batch)
    return learner, learner.lora_grads()


def assert_grads_match(got: dict, want: dict):
    assert got, "no LoRA gradients to compare"
    for name, g in got.items():
        assert g is not None, f"{name} got no gradient"
        assert rel_diff(g, want[name]) <= RTOL, f"{name}: relative difference {rel_diff(g, want[name]):.2e}"


@pytest.mark.parametrize("cuts", [(2, 4), (0, 3), (1, 6)])
def test_full_mode_matches_unsplit(tiny, serve, spec, cuts):
    model, _ = tiny
    batch = random_batch(model.config.vocab_size)
    _, got = split_grads(model, cuts, spec, batch, "full", serve(model, cuts))
    assert_grads_match(got, reference_grads(model, cuts, spec, batch, train_trunk=False))


def test_full_mode_matches_unsplit_on_smollm2(smollm2, serve, spec):
    model, tokenizer = smollm2
    cuts = (10, 20)
    batch = random_batch(2000, batch=2, seq=16)
    _, got = split_grads(model, cuts, spec, batch, "full", serve(model, cuts))
    assert len(got) == 20 * 2 * 2  # 20 client blocks x (q_proj, v_proj) x (A, B)
    assert_grads_match(got, reference_grads(model, cuts, spec, batch, train_trunk=False))


@pytest.mark.parametrize("model_name, cuts", [("tiny-llama", (2, 4)), ("tiny-gpt2", (0, 5)), ("smollm2", (10, 20))])
def test_full_trunk_mode_matches_unsplit_including_trunk(request, serve, spec, model_name, cuts):
    model, _ = request.getfixturevalue("smollm2") if model_name == "smollm2" else load_model(model_name)
    batch = random_batch(min(model.config.vocab_size, 2000))
    address = serve(model, cuts)
    learner, got = split_grads(model, cuts, spec, batch, "full+trunk", address)
    trunk = serve.servers[-1].sessions.lora_grads(learner.client.session)
    client_blocks = model.config.num_hidden_layers - (cuts[1] - cuts[0])
    assert len(trunk) == (cuts[1] - cuts[0]) * len(got) // client_blocks  # LoRA on every trunk block
    assert_grads_match({**got, **trunk}, reference_grads(model, cuts, spec, batch, train_trunk=True,
                                                         start=learner.lora_state()))


def test_stateless_fallback_gives_the_same_gradients(tiny, serve, spec):
    from splitkit.trunk.sessions import Limits

    model, _ = tiny
    cuts = (2, 4)
    batch = random_batch(model.config.vocab_size)
    address = serve(model, cuts, limits=Limits(states_per_session=0))  # the server keeps no state: always recompute
    _, got = split_grads(model, cuts, spec, batch, "full", address)
    assert serve.servers[-1].counters["recomputed"] == 1
    assert_grads_match(got, reference_grads(model, cuts, spec, batch, train_trunk=False))


@pytest.mark.parametrize("wire_dtype, tolerance", [("float16", 3e-3), ("bfloat16", 2e-2), ("blockwise8", 5e-2)])
def test_a_compressed_wire_gives_close_gradients(tiny, serve, spec, wire_dtype, tolerance):
    """h1 and dL/dh2 cross as 16-bit floats (half the bytes) or 8-bit blocks; the gradients stay close, not equal."""
    model, _ = tiny
    cuts = (2, 4)
    batch = random_batch(model.config.vocab_size)
    learner, got = split_grads(model, cuts, spec, batch, "full", serve(model, cuts), wire_dtype=wire_dtype)
    diff = max_rel_diff(got, reference_grads(model, cuts, spec, batch, train_trunk=False))
    assert 0 < diff <= tolerance, f"largest relative difference {diff:.1e}"
    assert all(m["dtype"] == wire_dtype for m in learner.client.messages)
    assert learner.client.messages[-1]["sent_bytes"] < 0.6 * 4 * batch["input_ids"].numel() * model.config.hidden_size


def test_detach_mode_leaves_bottom_without_gradient(tiny, serve, spec):
    """The simplified version: the Bottom gets no gradient and never changes; the Top does."""
    model, _ = tiny
    cuts = (2, 4)
    learner = Learner(model, mode="detach", cuts=cuts, address=serve(model, cuts), lora=spec, lr=1e-2)
    bottom_before = {n: p.detach().clone() for n, p in learner.bottom.named_parameters() if p.requires_grad}
    top_before = {n: p.detach().clone() for n, p in learner.top.named_parameters() if p.requires_grad}
    learner.forward_backward(random_batch(model.config.vocab_size))
    bottom = {k: g for k, g in learner.lora_grads().items() if int(k.split(".")[0]) < cuts[0]}
    top = {k: g for k, g in learner.lora_grads().items() if int(k.split(".")[0]) >= cuts[1]}
    assert bottom and all(g is None for g in bottom.values())
    assert top and all(g is not None and g.abs().sum() > 0 for g in top.values())
    for seed in range(3):
        learner.step(random_batch(model.config.vocab_size, seed=seed))
    for n, p in learner.bottom.named_parameters():
        if n in bottom_before:
            assert torch.equal(p, bottom_before[n]), f"{n} changed"
    changed = [n for n, p in learner.top.named_parameters() if n in top_before and not torch.equal(p, top_before[n])]
    assert len(changed) == len(top_before)


def test_local_and_full_trunk_train_alike(tiny, serve, spec):
    """Three optimizer steps: the split run (Trunk LoRA trained on the server) tracks the unsplit run."""
    model, _ = tiny
    cuts = (2, 4)
    split = Learner(model, mode="full+trunk", cuts=cuts, address=serve(model, cuts), lora=spec, lr=1e-2)
    local = Learner(copy.deepcopy(model), mode="local", cuts=cuts, lora=spec, lr=1e-2)
    local.load_lora(split.lora_state())  # the Trunk's LoRA starts from the server's own seed
    for seed in range(3):
        batch = random_batch(model.config.vocab_size, seed=seed)
        a, b = split.step(batch), local.step(batch)
        assert abs(a - b) <= 1e-4 * abs(b)
    norms_split, norms_local = split.delta_norms(), local.delta_norms()
    assert norms_split.keys() == norms_local.keys()
    for k in norms_local:
        assert abs(norms_split[k] - norms_local[k]) <= 1e-3 * norms_local[k] + 1e-7, k


def left_padded_batch(vocab: int) -> dict:
    """Three rows of 12, 9 and 6 tokens, left-padded to 12, with the mask generation uses; labels on the real tokens."""
    batch = random_batch(vocab, batch=3, seq=12, seed=4, prompt=0)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, :3], mask[2, :6] = 0, 0
    batch["input_ids"][mask == 0] = 0
    batch["labels"][mask == 0] = -100
    return {**batch, "attention_mask": mask}


@pytest.mark.parametrize("mode, keep", [("full", 4), ("full+trunk", 4), ("full", 0)])
def test_a_left_padded_batch_trains_as_the_unsplit_model_masks_it(tiny, serve, spec, mode, keep):
    """The pad crosses the wire with the forward (and the fallback's backward): the split's gradients equal those
    of the unsplit model given the same attention mask and positions."""
    model, _ = tiny
    cuts = (2, 4)
    batch = left_padded_batch(model.config.vocab_size)
    address = serve(model, cuts, limits=Limits(states_per_session=keep))
    learner, got = split_grads(model, cuts, spec, batch, mode, address)
    ref = unsplit_reference(copy.deepcopy(model), cuts, spec, train_trunk=mode == "full+trunk",
                            start=learner.lora_state())
    mask, positions = left_padding([0, 3, 6], 0, 12)
    criterion(ref(input_ids=batch["input_ids"], attention_mask=mask, position_ids=positions).logits,
              batch["labels"]).backward()
    want = lora_grads(ref)
    assert_grads_match(got, want)
    sent = [m for m in learner.client.messages if m["op"] in ("forward", "backward")]
    assert [m["op"] for m in sent][:2] == ["forward", "backward"]
    if mode == "full+trunk":
        assert_grads_match(serve.servers[-1].sessions.lora_grads(learner.client.session), want)
    unmasked = reference_grads(model, cuts, spec, {k: batch[k] for k in ("input_ids", "labels")},
                               train_trunk=mode == "full+trunk", start=learner.lora_state())
    assert max_rel_diff(got, unmasked) > 1e-3  # the mask mattered: without it the gradients differ
    learner.close()


def test_a_batch_whose_mask_is_not_left_padding_is_refused(llama, serve, spec):
    batch = left_padded_batch(llama.config.vocab_size)
    batch["attention_mask"][0, 5] = 0  # a hole in the middle of row 0
    with Learner(llama, mode="full", cuts=(2, 4), address=serve(llama, (2, 4)), lora=spec) as learner, \
            pytest.raises(ValueError, match="left padding"):
        learner.forward_backward(batch)
