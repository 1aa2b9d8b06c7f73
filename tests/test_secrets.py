"""The client's randomness is its secret: LoRA starts that no server can recompute unless a seed is given, a hello
that carries no seed, a Trunk LoRA the server draws for itself; and what a server that knows the seed does with it
(the replay reads every step of training exactly, on the tiny Llama over a real socket)."""

import json

import torch

from splitkit import Learner, LoraSpec, TrunkServer
from splitkit.core.lora import init_lora, lora_parameters
from splitkit.privacy.probes import CuriousServer
from splitkit.privacy.replay import replay
from splitkit.training.testing import max_rel_diff, random_batch

CUTS = (2, 4)


def start_of(learner) -> dict:
    return {name: w.detach().clone() for name, w in lora_parameters(learner.model)}


def test_default_lora_starts_differ_between_clients_and_match_no_small_seed(llama):
    one, two = (Learner(llama, mode="local", cuts=CUTS) for _ in range(2))
    a, b = start_of(one), start_of(two)
    assert a.keys() == b.keys() and all(not torch.equal(a[n], b[n]) for n in a if n.endswith("lora_A"))
    assert one.lora.seed != two.lora.seed  # each client holds the seed it drew, to repeat its own run
    probe = one.model  # its LoRA layers re-initialised from each small seed in turn
    for seed in range(1000):
        init_lora(probe, LoraSpec(seed=seed))
        assert not any(torch.equal(a[n], w) for n, w in lora_parameters(probe) if n.endswith("lora_A")), \
            f"the default start is seed {seed}'s"  # (every lora_B starts at 0, whatever the seed)


def test_a_given_seed_reproduces_the_start(llama):
    one, two = (Learner(llama, mode="local", cuts=CUTS, lora=LoraSpec(seed=7, init_b=0.02)) for _ in range(2))
    a, b = start_of(one), start_of(two)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_no_hello_carries_the_clients_seed_and_the_server_draws_the_trunks_own(llama):
    server = TrunkServer(llama, CUTS, bind="tcp://127.0.0.1:*")
    received = []
    handle = server.handle

    def recording(frames):  # the bytes of every request as the server gets them
        received.append(bytes(frames[0]))
        return handle(frames)

    server.handle = recording
    try:
        address = server.start()
        spec = LoraSpec(seed=123456789, init_b=0.02)
        with Learner(llama, mode="full+trunk", cuts=CUTS, address=address, lora=spec) as one, \
                Learner(llama, mode="full+trunk", cuts=CUTS, address=address, lora=spec) as two:
            trunk_one, trunk_two = one.client.trunk_lora(), two.client.trunk_lora()
    finally:
        server.stop()
    hellos = [json.loads(h) for h in received if json.loads(h).get("op") == "hello"]
    assert len(hellos) == 2 and all(h["mode"] == "full+trunk" and "lora" in h for h in hellos)
    assert not any(b"seed" in h or b"123456789" in h for h in received)
    # the same client spec, two sessions: two Trunk starts, neither the client's seed's
    assert all(not torch.equal(trunk_one[n], trunk_two[n]) for n in trunk_one)
    client_start = Learner(llama, mode="local", cuts=CUTS, lora=spec)
    assert not any(torch.equal(w, trunk_one[n]) for n, w in lora_parameters(client_start.model)
                   if n in trunk_one and n.endswith("lora_A"))


def test_a_server_lora_seed_repeats_the_trunks_start(llama, serve):
    address = serve(llama, CUTS, lora_seed=5)
    with Learner(llama, mode="full+trunk", cuts=CUTS, address=address) as one, \
            Learner(llama, mode="full+trunk", cuts=CUTS, address=address) as two:
        a, b = one.client.trunk_lora(), two.client.trunk_lora()
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def train_on_a_curious_server(llama, spec, steps=3, lr=1e-2):
    server = CuriousServer(llama, CUTS, bind="tcp://127.0.0.1:*")
    batches = [random_batch(llama.config.vocab_size, batch=2, seq=8, seed=s) for s in range(steps)]
    try:
        with Learner(llama, mode="full", cuts=CUTS, address=server.start(), lora=spec, lr=lr) as learner:
            for batch in batches:
                learner.step(batch)
            bottom = dict(lora_parameters(learner.bottom))
    finally:
        server.stop()
    h1s = [tensors[0] for op, tensors in server.seen if op == "forward"]
    return batches, bottom, list(zip(h1s, server.sent_back, strict=True))


def test_with_the_clients_seed_the_replay_reads_every_step_and_tracks_the_bottom_exactly(llama):
    spec = LoraSpec(seed=11)  # lora_B = 0: the Bottom is the public one at step 0
    batches, bottom, seen = train_on_a_curious_server(llama, spec)
    got = replay(llama, CUTS, spec, 1e-2, seen)
    assert len(got.ids) == 3
    for step, batch in enumerate(batches):
        assert torch.equal(got.ids[step], batch["input_ids"]), f"step {step} misread"
        assert bool(got.explained[step].all())
    copy = {n: w.detach() for n, w in lora_parameters(got.bottom)}
    assert max_rel_diff(copy, {n: w.detach() for n, w in bottom.items()}) <= 1e-6


def test_with_a_wrong_seed_the_replay_reads_step_0_and_then_loses_the_bottom(llama):
    batches, bottom, seen = train_on_a_curious_server(llama, LoraSpec(seed=11))
    got = replay(llama, CUTS, LoraSpec(seed=12), 1e-2, seen)
    assert torch.equal(got.ids[0], batches[0]["input_ids"]) and bool(got.explained[0].all())  # the public Bottom
    assert not bool(got.explained[1].all()) and not bool(got.explained[2].all())  # a Bottom it does not have
    copy = {n: w.detach() for n, w in lora_parameters(got.bottom)}
    assert max_rel_diff(copy, {n: w.detach() for n, w in bottom.items()}) > 0.1


def test_a_replay_given_the_tokens_read_once_tries_a_seed_without_searching(llama):
    batches, _, seen = train_on_a_curious_server(llama, LoraSpec(seed=11))
    read = replay(llama, CUTS, LoraSpec(seed=11), 1e-2, seen[:1]).ids  # step 0, read once
    right = replay(llama, CUTS, LoraSpec(seed=11), 1e-2, seen[:2], known=[*read, batches[1]["input_ids"]])
    wrong = replay(llama, CUTS, LoraSpec(seed=12), 1e-2, seen[:2], known=[*read, batches[1]["input_ids"]])
    assert bool(right.explained[0].all()) and bool(right.explained[1].all())  # the seed: step 1 as step 0
    assert bool(wrong.explained[0].all())  # lora_B = 0: any seed is the public Bottom at step 0
    assert float(wrong.distance[1].min()) > 1e-3 and not bool(wrong.explained[1].any())  # not even the true tokens
