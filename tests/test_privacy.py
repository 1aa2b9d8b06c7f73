"""What the server sees, on the tiny random Llama: the attacks on h1, the reach of dL/dh2, the label probe,
and the servers that look."""

import pytest
import torch

from splitkit import Learner, LoraSpec, TrunkServer, load_model, split_model
from splitkit.core.split import Bottom
from splitkit.privacy.probes import (
    SENTENCES,
    CuriousServer,
    SteeringServer,
    decode,
    encode_sentences,
    fit_inversions,
    gradient_reach,
    hidden_by_cut,
    label_probe,
    recovered_tokens,
    recovery,
)
from splitkit.privacy.replay import trunk_alone
from splitkit.training.testing import max_rel_diff, random_batch
from splitkit.training.train import criterion

CUTS = (2, 4)


@pytest.fixture(scope="module")
def tiny_llama():
    return load_model("tiny-llama")


@pytest.fixture
def start():
    """start(ServerClass, model, cuts, **options) -> (server, address); every server is stopped afterwards."""
    servers = []

    def make(cls, model, cuts, **options):
        servers.append(cls(model, cuts, bind="tcp://127.0.0.1:*", **options))
        return servers[-1], servers[-1].start()

    yield make
    for s in servers:
        s.stop()


def batch_with_two_ends(vocab: int) -> dict:
    """Two rows whose labelled tokens end at different positions."""
    batch = random_batch(vocab, batch=2, seq=12, seed=1)
    batch["labels"][1, -3:] = -100
    return batch


def dL_dh2(model, batch):  # -> h2 (B, T, d), dL/dh2 (B, T, d)
    _, trunk, top = split_model(model, CUTS)
    bottom = Bottom(model, CUTS[0])
    with torch.no_grad():
        h2 = trunk(bottom(batch["input_ids"]))
    h2.requires_grad_(True)
    criterion(top(h2), batch["labels"]).backward()
    return h2.detach(), h2.grad


def test_hidden_by_cut_gives_the_bottom_of_each_cut(tiny_llama):
    model, _ = tiny_llama
    ids = random_batch(model.config.vocab_size)["input_ids"]
    hidden = hidden_by_cut(model, ids, [4, 0, 1])
    assert sorted(hidden) == [0, 1, 4]
    for a, h1 in hidden.items():
        assert torch.allclose(h1, Bottom(model, a)(ids), atol=1e-6)


def test_at_a_0_both_attacks_read_back_every_token(tiny_llama):
    model, tokenizer = tiny_llama
    ids, mask = encode_sentences(tokenizer, SENTENCES[:4])
    inversions = fit_inversions(model, [0], n_tokens=1024, seq_len=32)
    for read in (recovered_tokens(model, ids, [0], mask=mask), recovered_tokens(model, ids, [0], inversions, mask)):
        assert torch.equal(recovery(read, ids, mask)[0], torch.ones(4))
        assert torch.all(read[0][~mask] == -1)  # padding is not read


def test_recovery_counts_only_the_real_tokens_and_decode_gives_the_text_back(tiny_llama):
    _, tokenizer = tiny_llama
    ids, mask = encode_sentences(tokenizer, ["ab", "abcd"])
    guessed = ids.clone()
    guessed[1, 3] = ids[1, 3] + 1  # one wrong token in the second sentence
    guessed[0, 3] = ids[0, 3] + 1  # a padding position: not counted
    assert recovery({0: guessed}, ids, mask)[0].tolist() == [1.0, 0.75]
    assert decode(tokenizer, ids[0], mask[0]) == "ab" and decode(tokenizer, ids[1], mask[1]) == "abcd"


def test_dL_dh2_is_zero_exactly_from_the_last_labelled_position_on(tiny_llama):
    # the logits at t predict the token at t + 1: the last labelled position's own logits predict nothing labelled
    model, _ = tiny_llama
    batch = batch_with_two_ends(model.config.vocab_size)
    reach = gradient_reach(dL_dh2(model, batch)[1])  # (B, T)
    for row, labels in zip(reach, batch["labels"], strict=True):
        last = int((labels != -100).nonzero().max())
        assert torch.all(row[last:] == 0) and torch.all(row[:last] > 0)


def test_the_label_probe_reads_every_label_when_the_top_is_known(tiny_llama):
    model, _ = tiny_llama
    batch = batch_with_two_ends(model.config.vocab_size)
    h2, g2 = dL_dh2(model, batch)
    guess = label_probe(split_model(model, CUTS).top, h2, g2)
    assert torch.equal(guess, batch["labels"])


def test_the_curious_server_keeps_h1_and_dL_dh2_as_the_client_sent_them(tiny_llama, start):
    model, _ = tiny_llama
    server, address = start(CuriousServer, model, CUTS)
    batch = batch_with_two_ends(model.config.vocab_size)
    with Learner(model, mode="full", cuts=CUTS, address=address) as learner:
        learner.forward_backward(batch)
        h1 = learner.bottom(batch["input_ids"])
    assert [op for op, _ in server.seen] == ["forward", "backward"]
    (seen_h1,), (seen_g2,) = (tensors for _, tensors in server.seen)
    assert torch.equal(seen_h1, h1.detach()) and seen_g2.shape == h1.shape == (2, 12, model.config.hidden_size)
    assert torch.allclose(seen_g2, dL_dh2(model, batch)[1], atol=1e-7)  # a fresh LoRA (B = 0) changes nothing


def test_a_steering_server_turns_the_bottoms_gradient_around(tiny_llama, start):
    model, _ = tiny_llama
    server, address = start(SteeringServer, model, CUTS)
    batch = batch_with_two_ends(model.config.vocab_size)
    with Learner(model, mode="full", cuts=CUTS, address=address, lora=LoraSpec(init_b=0.02)) as learner:
        learner.forward_backward(batch)
        honest = {k: -g for k, g in learner.lora_grads().items() if int(k.split(".")[0]) < CUTS[0]}
        learner.zero_grad()
        server.forge = torch.neg
        learner.forward_backward(batch)
        forged = {k: g for k, g in learner.lora_grads().items() if k in honest}
    assert len(honest) > 0 and max_rel_diff(forged, honest) < 1e-6


def test_the_servers_trunk_lora_alone_has_learned_from_the_clients_batch(tiny_llama, start):
    model, _ = tiny_llama
    _, address = start(TrunkServer, model, CUTS)
    batch, spec = random_batch(model.config.vocab_size, seq=12, seed=1), LoraSpec(seed=1)
    with Learner(model, mode="full+trunk", cuts=CUTS, address=address, lr=1e-2, lora=spec) as learner:
        for _ in range(10):
            learner.step(batch)
        trunk = learner.client.trunk_lora()
    alone, public = trunk_alone(model, CUTS, spec, trunk), Learner(model, mode="local", cuts=CUTS, lora=spec)
    with torch.no_grad():
        loss = {name: float(criterion(m.logits(batch["input_ids"]), batch["labels"])) for name, m in
                (("alone", alone), ("public", public))}
    assert loss["alone"] < loss["public"] - 0.1  # the server's own adapter has learned the client's batch
