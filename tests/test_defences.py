"""The client's defences, on the tiny random Llama over a real socket: off is bit-identical, on sends what it
says (measured from the client's own log of what it sent), and gradients stay exact where a defence touches no
tensor on their path; the white-box attack reads a sentence back exactly through a public Bottom."""

import copy

import pytest
import torch

from splitkit import Learner, LoraSpec, load_model
from splitkit.core.data import batches, facts
from splitkit.core.lora import lora_grads, unsplit_reference
from splitkit.core.split import Bottom, split_model
from splitkit.privacy.attacks import answer_match, secret_positions, shadow_bottom, whitebox_search, whitebox_sentences
from splitkit.privacy.probes import SENTENCES, encode_sentences, fit_inversions
from splitkit.training.defences import Defence, clip_rows, distance_correlation
from splitkit.training.testing import max_rel_diff, random_batch
from splitkit.training.train import criterion

CUTS = (2, 4)
SPEC = LoraSpec(r=4, lora_alpha=8, init_b=0.02, seed=3)  # lora_B non-zero, so that every LoRA tensor has a gradient


@pytest.fixture(scope="module")
def tiny_llama():
    return load_model("tiny-llama")


def run(model, address, mode, defence, steps=2, **options):
    """The losses and every LoRA matrix after `steps` steps, and the tensors the client sent."""
    batch = random_batch(model.config.vocab_size, batch=3, seq=12, seed=5)
    with Learner(model, mode=mode, cuts=CUTS, address=address, lora=SPEC, lr=1e-2, defence=defence,
                 log_tensors=True, **options) as learner:
        losses = [learner.step(batch) for _ in range(steps)]
        sent = {op: [m["tensors"] for m in learner.client.messages if m["op"] == op] for op in ("forward", "backward")}
        return losses, learner.lora_state(), sent, learner


@pytest.mark.parametrize("mode", ["detach", "full", "full+trunk"])
def test_a_defence_that_is_off_changes_nothing(tiny_llama, serve, mode):
    model, _ = tiny_llama
    address = serve(model, CUTS, lora_seed=0)  # both runs' Trunk LoRA from the same start
    plain_losses, plain_state, plain_sent, _ = run(model, address, mode, None)
    off_losses, off_state, off_sent, _ = run(model, address, mode, Defence(seed=7))
    assert off_losses == plain_losses
    assert plain_state.keys() == off_state.keys()
    assert all(torch.equal(plain_state[k], off_state[k]) for k in plain_state)
    assert all(torch.equal(a, b) for op in plain_sent for x, y in zip(plain_sent[op], off_sent[op], strict=True)
               for a, b in zip(x, y, strict=True))


def test_h1_is_clipped_and_noised_at_the_stated_snr(tiny_llama, serve):
    model, _ = tiny_llama
    address = serve(model, CUTS)
    batch = random_batch(model.config.vocab_size, batch=8, seq=16, seed=2)
    with Learner(model, mode="full", cuts=CUTS, address=address, lora=SPEC) as clean, torch.no_grad():
        h1 = clean.bottom(batch["input_ids"])  # (B, T, d): what the client computes before the defence
    bound = float(h1.norm(dim=-1).median())  # half the tokens are clipped
    defence = Defence(h1_clip=bound, h1_snr=4.0, seed=1)
    with Learner(model, mode="full", cuts=CUTS, address=address, lora=SPEC, defence=defence, log_tensors=True) as noisy:
        noisy.forward_backward(batch)
        (sent,) = next(m["tensors"] for m in noisy.client.messages if m["op"] == "forward")
    clipped = clip_rows(h1, bound, dims=-1)
    assert float(clipped.norm(dim=-1).max()) <= bound * (1 + 1e-5)
    assert int((h1.norm(dim=-1) > bound).sum()) >= h1.shape[0] * h1.shape[1] // 3  # the bound did clip
    noise = sent - clipped  # (B, T, d): what the defence added
    snr = bound ** 2 / float(noise.pow(2).sum(-1).mean())  # 8 · 16 tokens of 64 coordinates each
    assert snr == pytest.approx(4.0, rel=0.1)
    assert abs(float(noise.mean())) < 3 * defence.h1_sigma(h1.shape[-1]) / noise.numel() ** 0.5 + 1e-6


def test_clipping_alone_bounds_every_token_and_sends_no_noise(tiny_llama, serve):
    model, _ = tiny_llama
    address = serve(model, CUTS)
    _, _, sent, _ = run(model, address, "detach", Defence(h1_clip=0.1), steps=1)
    (h1,) = sent["forward"][0]
    assert float(h1.norm(dim=-1).max()) <= 0.1 * (1 + 1e-5) and float(h1.norm(dim=-1).min()) > 0.0999  # all at 0.1


def test_g2_is_clipped_per_row_and_noised(tiny_llama, serve):
    model, _ = tiny_llama
    address = serve(model, CUTS)
    _, _, clipped, _ = run(model, address, "full", Defence(g2_clip=1e-3), steps=1)
    (g2,) = clipped["backward"][0]
    assert torch.allclose(g2.flatten(1).norm(dim=1), torch.full((3,), 1e-3), rtol=1e-4)  # each row at the bound
    _, _, noised, _ = run(model, address, "full", Defence(g2_clip=1e-3, g2_noise=2.0, seed=4), steps=1)
    (g2n,) = noised["backward"][0]
    noise = g2n - g2  # the same batch and weights: the clipped gradient is the same, the rest is noise
    assert float(noise.std()) == pytest.approx(2.0 * 1e-3, rel=0.05)


def test_max_norm_alignment_lifts_each_row_to_the_largest(tiny_llama, serve):
    model, _ = tiny_llama
    address = serve(model, CUTS)
    batch = random_batch(model.config.vocab_size, batch=4, seq=64, seed=3)
    batch["labels"][1:, 8:] = -100  # rows 1..3 carry far fewer labels: smaller dL/dh2
    out = {}
    for name, defence in {"plain": None, "aligned": Defence(g2_maxnorm=True, seed=2)}.items():
        with Learner(model, mode="full", cuts=CUTS, address=address, lora=SPEC, defence=defence,
                     log_tensors=True) as learner:
            learner.forward_backward(batch)
            out[name] = next(m["tensors"][0] for m in learner.client.messages if m["op"] == "backward")
    plain, aligned = (out[k].flatten(1).norm(dim=1) for k in ("plain", "aligned"))
    assert float(plain.max() / plain.min()) > 3  # the rows differ before
    assert float(aligned.max() / aligned.min()) < 1.2  # and hardly after
    top = int(plain.argmax())
    assert torch.equal(out["aligned"][top], out["plain"][top])  # the largest row gets no noise


def test_with_a_g2_defence_the_top_gradients_stay_exact(tiny_llama, serve):
    """Clipping and noising dL/dh2 touch nothing on the Top's path: its gradients are the unsplit model's."""
    model, _ = tiny_llama
    batch = random_batch(model.config.vocab_size, batch=3, seq=12, seed=5)
    ref = unsplit_reference(copy.deepcopy(model), CUTS, SPEC, train_trunk=False)
    criterion(ref(input_ids=batch["input_ids"]).logits, batch["labels"]).backward()
    want = lora_grads(ref)
    with Learner(model, mode="full", cuts=CUTS, address=serve(model, CUTS), lora=SPEC,
                 defence=Defence(g2_clip=1e-4, g2_noise=1.0)) as learner:
        learner.forward_backward(batch)
        got = learner.lora_grads()
    top = {n: g for n, g in got.items() if int(n.split(".")[0]) >= CUTS[1]}
    bottom = {n: g for n, g in got.items() if int(n.split(".")[0]) < CUTS[0]}
    assert top and max_rel_diff(top, want) < 1e-5
    assert max_rel_diff(bottom, want) > 0.5  # the Bottom's came from the noisy dL/dh2


def test_nopeek_adds_its_penalty_and_the_gradients_equal_the_unsplit_models(tiny_llama, serve):
    """With NoPeek the client's objective is the task loss + λ·dCor(x, h1): every gradient equals that objective's
    on the unsplit model; the loss returned is the task's alone."""
    model, _ = tiny_llama
    batch = random_batch(model.config.vocab_size, batch=3, seq=12, seed=5)
    ref = unsplit_reference(copy.deepcopy(model), CUTS, SPEC, train_trunk=False)
    x = ref.get_input_embeddings()(batch["input_ids"])
    out = ref(input_ids=batch["input_ids"], output_hidden_states=True)
    penalty = 0.5 * distance_correlation(x.detach().flatten(0, 1), out.hidden_states[CUTS[0]].flatten(0, 1))
    task = criterion(out.logits, batch["labels"])
    (task + penalty).backward()
    want = lora_grads(ref)
    with Learner(model, mode="full", cuts=CUTS, address=serve(model, CUTS), lora=SPEC,
                 defence=Defence(nopeek=0.5)) as learner:
        loss = learner.forward_backward(batch)
        got = learner.lora_grads()
        assert float(learner.penalty.detach()) == pytest.approx(float(penalty), rel=1e-5)
    assert float(loss) == pytest.approx(float(task), rel=1e-6)
    assert max_rel_diff(got, want) < 1e-5


def test_distance_correlation_is_one_for_a_linear_copy_and_sees_what_correlation_misses():
    g = torch.Generator().manual_seed(0)
    x = torch.linspace(-1, 1, 1001)[:, None]  # symmetric: x and x² have correlation 0
    assert float(distance_correlation(x, 3 * x + 1)) == pytest.approx(1.0, abs=1e-6)
    assert abs(float(torch.corrcoef(torch.cat([x, x ** 2], 1).T)[0, 1])) < 1e-6  # x² is uncorrelated with x,
    independent = float(distance_correlation(x, torch.randn(1001, 1, generator=g)))
    assert float(distance_correlation(x, x ** 2)) > 0.4 > 0.1 > independent  # but not distance-uncorrelated


def test_a_defence_is_refused_where_it_protects_nothing(tiny_llama, serve):
    model, _ = tiny_llama
    with pytest.raises(ValueError, match="local"):
        Learner(model, mode="local", cuts=CUTS, defence=Defence(h1_clip=1.0))
    with pytest.raises(ValueError, match="detach"):
        Learner(model, mode="detach", cuts=CUTS, address=serve(model, CUTS), defence=Defence(g2_maxnorm=True))
    with pytest.raises(ValueError, match="h1_clip"):
        Defence(h1_snr=2.0)
    with pytest.raises(ValueError, match="g2_clip"):
        Defence(g2_noise=1.0)
    with pytest.raises(ValueError, match="positive"):
        Defence(h1_clip=0)


# ---------------------------------------------------------------------------- the attacks


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_the_white_box_search_reads_a_sentence_back_exactly(name):
    model, tokenizer = load_model(name)
    ids, mask = encode_sentences(tokenizer, SENTENCES[:2])
    bottom = Bottom(model, 4)
    with torch.no_grad():
        h1 = bottom(ids)
    n = int(mask[0].sum())
    found = whitebox_search(model, bottom, h1[0, :n])
    assert torch.equal(found["ids"], ids[0, :n]) and bool(found["explained"].all())
    assert tokenizer.decode(found["ids"]) == SENTENCES[0]
    both = whitebox_sentences(model, bottom, h1, mask, inversion=fit_inversions(model, [4], n_tokens=1024)[4])
    assert torch.equal(both[mask], ids[mask]) and bool((both[~mask] == -1).all())


def test_the_white_box_search_through_a_clipping_defence_knows_the_bound(tiny_llama):
    model, tokenizer = tiny_llama
    ids, mask = encode_sentences(tokenizer, SENTENCES[:1])
    bottom = Bottom(model, 2)
    with torch.no_grad():
        sent = clip_rows(bottom(ids), 0.5, dims=-1)[0]  # (T, d): every token clipped
    found = whitebox_search(model, bottom, sent, defence=Defence(h1_clip=0.5))
    assert torch.equal(found["ids"], ids[0])
    assert float(found["distance"].max()) < 1e-4


def test_a_shortlist_with_a_budget_keeps_the_nearest_and_says_so(tiny_llama):
    model, tokenizer = tiny_llama
    ids, _ = encode_sentences(tokenizer, SENTENCES[:1])
    bottom = Bottom(model, 6)
    with torch.no_grad():
        h1 = bottom(ids)[0]
    found = whitebox_search(model, bottom, h1, shortlist=1, budget=1)
    assert bool((found["tried"] == 1).all())
    hit = found["ids"] == ids[0]
    assert 0 < int(hit.sum()) < len(hit)
    first_miss = int((~hit).nonzero()[0, 0])
    assert bool(found["explained"][:first_miss].all()) and not bool(found["explained"][first_miss])
    assert bool(hit[found["explained"]].all())  # what the search says it explained, it read right
    full = whitebox_search(model, bottom, h1)  # the whole vocabulary as fallback: exact
    assert torch.equal(full["ids"], ids[0]) and int(full["tried"].max()) > 1


def test_secret_positions_cover_the_secret(tiny_llama):
    _, tokenizer = tiny_llama
    sentence = SENTENCES[0]
    positions = secret_positions(tokenizer, sentence, "hunter2")
    ids = tokenizer(sentence, add_special_tokens=False).input_ids
    assert "hunter2" in tokenizer.decode([ids[i] for i in positions])
    assert len(positions) < len(ids)


@pytest.mark.parametrize("words, prompts, truth", [
    (["red", "blue", "green", "teal"], ["Q: one?\nA:", "Q: second one?\nA:"], [2, 0]),
    (["dark red and gold", "blue", "pale sea green", "teal"], ["Q: one?\nA:", "Q: two?\nA:", "Q: 3?\nA:"], [0, 2, 1]),
], ids=["one word", "several tokens"])
def test_answer_match_reads_the_answers_from_dL_dh2(tiny_llama, words, prompts, truth):
    """Answers of one word and of 5 to 16 byte tokens: answer_match names each row's from dL/dh2 alone."""
    model, tokenizer = tiny_llama
    _, trunk, top = split_model(model, CUTS)
    answers = [tokenizer(f" {w}", add_special_tokens=False).input_ids + [0] for w in words]
    prompts = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
    rows = [p + answers[t] for p, t in zip(prompts, truth, strict=True)]
    T = max(map(len, rows))
    ids = torch.tensor([r + [0] * (T - len(r)) for r in rows])
    labels = torch.tensor([[-100] * len(p) + answers[t] + [-100] * (T - len(p) - len(answers[t]))
                           for p, t in zip(prompts, truth, strict=True)])
    with torch.no_grad():
        h2 = trunk(Bottom(model, CUTS[0])(ids))
    x = h2.clone().requires_grad_(True)
    criterion(top(x), labels).backward()
    assert answer_match(top, h2, x.grad, [len(p) for p in prompts], answers) == truth


def test_a_shadow_bottom_trained_with_the_clients_recipe_is_the_clients_bottom(tiny_llama, serve):
    """NoPeek acts through training: the attacker who knows the recipe trains a Bottom of its own the same way. With
    the client's very data, init and order it gets the client's Bottom, bit for bit, and reads through it exactly."""
    model, tokenizer = tiny_llama
    defence = Defence(nopeek=10.0)
    with Learner(model, mode="full", cuts=CUTS, address=serve(model, CUTS), lr=3e-3, lora=LoraSpec(seed=1),
                 defence=defence) as client:
        data = batches(tokenizer, facts(), 8, seed=1)
        for _ in range(3):
            client.step(next(data))
        ids, _ = encode_sentences(tokenizer, SENTENCES[:1])
        with torch.no_grad():
            sent = client.bottom(ids)[0]
    shadow = shadow_bottom(model, tokenizer, CUTS, defence, 3, 3e-3, facts(), seed=1)
    with torch.no_grad():
        assert torch.equal(shadow(ids)[0], sent)
    assert torch.equal(whitebox_search(model, shadow, sent)["ids"], ids[0])
    assert not bool(whitebox_search(model, Bottom(model, CUTS[0]), sent, budget=64)["explained"].all())


def test_generation_sends_h1_through_the_defence_and_is_unchanged_without_one(tiny_llama, serve):
    from splitkit.training.generation import generate_ids

    model, tokenizer = tiny_llama
    address = serve(model, CUTS)
    prompt = torch.tensor([tokenizer("Q: a fact?\nA:", add_special_tokens=False).input_ids])
    tokens, sent = {}, {}
    for name, defence in {"none": None, "off": Defence(seed=3), "clipped": Defence(h1_clip=0.05)}.items():
        with Learner(model, mode="full", cuts=CUTS, address=address, lora=SPEC, defence=defence,
                     log_tensors=True) as learner:
            tokens[name] = generate_ids(learner, prompt, max_new_tokens=5)
            sent[name] = [t for m in learner.client.messages if m["op"] == "infer" for t in m["tensors"]]
    assert torch.equal(tokens["off"], tokens["none"]) and len(sent["clipped"]) == 5  # the prompt, then 4 tokens
    assert all(torch.equal(a, b) for a, b in zip(sent["off"], sent["none"], strict=True))
    assert all(float(h.norm(dim=-1).max()) <= 0.05 * (1 + 1e-5) for h in sent["clipped"])
    assert float(sent["none"][0].norm(dim=-1).min()) > 0.05  # so the bound did clip


def test_the_noise_is_the_clients_secret_unless_a_seed_is_given():
    """Two guards built the default way draw different noise, and neither draws the noise of any seed below 1,000
    (what a server would try first); a given seed draws the same noise every time."""
    from dataclasses import replace

    from splitkit.training.defences import Guard

    h1 = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))
    defence = Defence(h1_clip=1.0, h1_snr=1.0, g2_clip=1.0, g2_noise=1.0)

    def noise(guard):
        return guard.h1(h1) - clip_rows(h1, 1.0, dims=-1), guard.g2(h1) - clip_rows(h1, 1.0, dims=(1, 2))

    first, second = noise(Guard(defence)), noise(Guard(defence))
    assert defence.seed is None and not torch.equal(first[0], second[0]) and not torch.equal(first[1], second[1])
    small = [noise(Guard(replace(defence, seed=s)))[0] for s in range(1000)]
    assert not any(torch.equal(first[0], x) or torch.equal(second[0], x) for x in small)
    again = [noise(Guard(replace(defence, seed=7))) for _ in range(2)]
    assert torch.equal(again[0][0], again[1][0]) and torch.equal(again[0][1], again[1][1])
    assert torch.equal(again[0][0], small[7])
