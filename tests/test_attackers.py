"""The attackers a server without the client's secrets still has, on the tiny Llama: maximum-likelihood decoding
of noisy h1 (the defence known, the noise not), and tracking a Bottom whose LoRA started from a secret seed."""

import torch

from splitkit import Learner, LoraSpec, load_model
from splitkit.core.split import Bottom
from splitkit.privacy.attacks import whitebox_search
from splitkit.privacy.decoding import ml_decode, ml_sentences
from splitkit.privacy.probes import CuriousServer
from splitkit.privacy.tracking import track
from splitkit.training.defences import Defence, Guard
from splitkit.training.testing import random_batch

CUTS = (2, 4)


def noisy_sends(llama, snr, n, seed=3):
    """A sentence of 16 random tokens, the public Bottom's h1 of it, and n sends through clip and noise at `snr`."""
    bottom = Bottom(llama, CUTS[0])
    ids = torch.randint(3, llama.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        h1 = bottom(ids)
    defence = Defence(h1_clip=float(h1.norm(dim=-1).quantile(0.9)), h1_snr=snr, seed=seed)
    guard = Guard(defence)
    return bottom, ids[0], defence, torch.stack([guard.h1(h1)[0] for _ in range(n)])


def read(got, ids) -> float:
    return float((got == ids).float().mean())


def test_ml_decoding_reads_a_clean_h1_exactly(llama):
    bottom, ids, _, sends = noisy_sends(llama, 1.0, 1)
    with torch.no_grad():
        clean = bottom(ids[None])
    assert torch.equal(ml_decode(llama, bottom, clean, Defence())["ids"], ids)


def test_ml_decoding_combines_repeated_sends_where_one_send_is_too_noisy(llama):
    bottom, ids, defence, sends = noisy_sends(llama, 0.25, 16)
    one = ml_decode(llama, bottom, sends[:1], defence)
    sixteen = ml_decode(llama, bottom, sends, defence)
    nearest = whitebox_search(llama, bottom, sends[0], defence=defence)["ids"]
    assert read(one["ids"], ids) < 0.8 and read(nearest, ids) < 0.8  # one send at SNR 0.25 hides a part (9, 5 of 16)
    assert torch.equal(sixteen["ids"], ids)  # sixteen looks at the same h1: noise std / 4, every token
    assert abs(sixteen["sigma"] - one["sigma"] / 4) <= 1e-6 * one["sigma"]
    assert read(one["ids"], ids) >= read(nearest, ids)  # the likelihood with no early stop reads no less


def test_ml_sentences_decodes_each_row_on_its_real_tokens(llama):
    bottom, ids, defence, sends = noisy_sends(llama, 4.0, 2)
    mask = torch.tensor([[True] * 16, [True] * 10 + [False] * 6])
    got = ml_sentences(llama, bottom, torch.stack([sends, sends], dim=1), mask, defence)
    assert torch.equal(got[0], ids) and torch.equal(got[1, :10], ids[:10]) and bool((got[1, 10:] == -1).all())


def test_tracking_follows_a_bottom_whose_lora_seed_it_does_not_know():
    llama = load_model("tiny-llama")[0]
    server = CuriousServer(llama, CUTS, bind="tcp://127.0.0.1:*")
    batches = [random_batch(llama.config.vocab_size, batch=4, seq=12, seed=s) for s in range(8)]
    probe = random_batch(llama.config.vocab_size, batch=4, seq=12, seed=99)["input_ids"]
    try:
        address = server.start()
        with Learner(llama, mode="full", cuts=CUTS, address=address, lr=1.5e-2, lora=LoraSpec(seed=11)) as client:
            for batch in batches:
                client.step(batch)
            with torch.no_grad():
                private = client.bottom(probe)  # what the trained client sends next
    finally:
        server.stop()
    seen = [tensors[0] for op, tensors in server.seen if op == "forward"]
    got = track(llama, CUTS, seen, lora=LoraSpec(seed=12), fit_steps=100)  # a start of its own, not the client's
    assert torch.equal(got.ids[0], batches[0]["input_ids"])  # step 0: the public Bottom is the client's
    public = Bottom(llama, CUTS[0])
    with torch.no_grad():
        tracked = torch.stack([whitebox_search(llama, got.bottom, row)["ids"] for row in private])
        untracked = torch.stack([whitebox_search(llama, public, row)["ids"] for row in private])
    assert read(untracked, probe) < 0.85  # training moved the client's Bottom away from the public one (0.77)
    assert read(tracked, probe) >= 0.9 and read(tracked, probe) >= read(untracked, probe) + 0.1  # (0.94)
