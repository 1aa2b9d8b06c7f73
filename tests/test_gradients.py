"""The central test: over a real ZeroMQ socket, split gradients equal the unsplit model's."""

import copy

import pytest
import torch

from splitkit import load_model, lora_grads, make_learner
from splitkit.train import forward_backward, train_step, zero_grad

from .conftest import RTOL, random_batch, reference_grads, rel_diff


def split_grads(model, cuts, spec, batch, mode, address):
    learner = make_learner(model, mode, cuts, address, lora=spec)
    zero_grad(learner)
    forward_backward(learner, batch)
    return learner, {**lora_grads(learner.bottom), **lora_grads(learner.top)}


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
    batch = random_batch(2000, B=2, T=16)
    _, got = split_grads(model, cuts, spec, batch, "full", serve(model, cuts))
    assert len(got) == 20 * 2 * 2  # 20 client blocks x (q_proj, v_proj) x (A, B)
    assert_grads_match(got, reference_grads(model, cuts, spec, batch, train_trunk=False))


@pytest.mark.parametrize("model_name, cuts", [("tiny-llama", (2, 4)), ("tiny-gpt2", (0, 5)), ("smollm2", (10, 20))])
def test_full_trunk_mode_matches_unsplit_including_trunk(request, serve, spec, model_name, cuts):
    model, _ = request.getfixturevalue("smollm2") if model_name == "smollm2" else load_model(model_name)
    batch = random_batch(min(model.config.vocab_size, 2000))
    address = serve(model, cuts)
    learner, got = split_grads(model, cuts, spec, batch, "full+trunk", address)
    server = serve.servers[-1]
    trunk = lora_grads(server.peft, f"s{learner.client.session}")
    client_blocks = model.config.num_hidden_layers - (cuts[1] - cuts[0])
    assert len(trunk) == (cuts[1] - cuts[0]) * len(got) // client_blocks  # LoRA on every trunk block
    want = reference_grads(model, cuts, spec, batch, train_trunk=True)
    assert_grads_match({**got, **trunk}, want)


def test_stateless_fallback_gives_the_same_gradients(tiny, serve, spec):
    model, _ = tiny
    cuts = (2, 4)
    batch = random_batch(model.config.vocab_size)
    address = serve(model, cuts, states_per_session=0)  # the server keeps no state: always recompute
    _, got = split_grads(model, cuts, spec, batch, "full", address)
    assert serve.servers[-1].counters["recomputed"] == 1
    assert_grads_match(got, reference_grads(model, cuts, spec, batch, train_trunk=False))


@pytest.mark.parametrize("wire_dtype, tolerance", [("float16", 3e-3), ("bfloat16", 2e-2)])
def test_half_precision_on_the_wire_gives_close_gradients(tiny, serve, spec, wire_dtype, tolerance):
    """h1 and dL/dh2 cross as 16-bit floats (half the bytes); the gradients stay close, not equal."""
    model, _ = tiny
    cuts = (2, 4)
    batch = random_batch(model.config.vocab_size)
    learner = make_learner(model, "full", cuts, serve(model, cuts), lora=spec, wire_dtype=wire_dtype)
    zero_grad(learner)
    forward_backward(learner, batch)
    got = {**lora_grads(learner.bottom), **lora_grads(learner.top)}
    want = reference_grads(model, cuts, spec, batch, train_trunk=False)
    diffs = [rel_diff(g, want[name]) for name, g in got.items()]
    assert 0 < max(diffs) <= tolerance, f"largest relative difference {max(diffs):.1e}"
    assert all(m["dtype"] == wire_dtype for m in learner.client.messages)
    assert learner.client.messages[-1]["sent_bytes"] < 0.6 * 4 * batch["input_ids"].numel() * model.config.hidden_size


def test_detach_mode_leaves_bottom_without_gradient(tiny, serve, spec):
    """The seeds' simplified version: the Bottom gets no gradient and never changes; the Top does."""
    model, _ = tiny
    cuts = (2, 4)
    learner = make_learner(model, "detach", cuts, serve(model, cuts), lora=spec, lr=1e-2)
    bottom_before = {n: p.detach().clone() for n, p in learner.bottom.named_parameters() if p.requires_grad}
    top_before = {n: p.detach().clone() for n, p in learner.top.named_parameters() if p.requires_grad}
    zero_grad(learner)
    forward_backward(learner, random_batch(model.config.vocab_size))
    bottom = lora_grads(learner.bottom)
    assert bottom and all(g is None for g in bottom.values())
    assert all(g is not None and g.abs().sum() > 0 for g in lora_grads(learner.top).values())
    for seed in range(3):
        train_step(learner, random_batch(model.config.vocab_size, seed=seed))
    for n, p in learner.bottom.named_parameters():
        if n in bottom_before:
            assert torch.equal(p, bottom_before[n]), f"{n} changed"
    changed = [n for n, p in learner.top.named_parameters() if n in top_before and not torch.equal(p, top_before[n])]
    assert len(changed) == len(top_before)


def test_local_and_full_trunk_train_alike(tiny, serve, spec):
    """Three optimizer steps: the split run (Trunk LoRA trained on the server) tracks the unsplit run."""
    model, _ = tiny
    cuts = (2, 4)
    split = make_learner(model, "full+trunk", cuts, serve(model, cuts), lora=spec, lr=1e-2)
    local = make_learner(copy.deepcopy(model), "local", cuts, lora=spec, lr=1e-2)
    for seed in range(3):
        batch = random_batch(model.config.vocab_size, seed=seed)
        a, b = train_step(split, batch), train_step(local, batch)
        assert abs(a - b) <= 1e-4 * abs(b)
    norms_split, norms_local = split.delta_norms(), local.delta_norms()
    assert norms_split.keys() == norms_local.keys()
    for k in norms_local:
        assert abs(norms_split[k] - norms_local[k]) <= 1e-3 * norms_local[k] + 1e-7, k
