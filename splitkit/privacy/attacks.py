"""The attacks a server runs when it knows the public base weights, as every trunk server in this kit does.

What each attacker knows (the threat model of notebook 06 and the README):

  white-box search    the public Bottom (base weights, not the client's LoRA) and the defence with its setting.
                      For each position t, left to right, it runs candidate tokens after the tokens already
                      recovered, through the public Bottom with a KV cache of the recovered prefix, and keeps
                      the candidate whose h1 at t is nearest to what arrived (after the defence's clipping,
                      which it applies to its own candidates too). h1 at t depends only on tokens <= t, so
                      one position is decided at a time. Candidates come in the order of a shortlist (the
                      learned inversion's ranking); the stated fallback: while no candidate explains h1 at t
                      (distance within what rounding, or the defence's noise, explains), it goes on down the
                      ranking in growing chunks, to the whole vocabulary or a budget, then keeps the nearest.
  adaptive inversion  the public weights and the defence with its setting: the linear inversion of
                      `privacy.fit_inversions`, refitted on h1 that went through the same defence.
  shadow Bottom       against a defence that acts through training (NoPeek): the recipe and data of the same
                      kind; it trains a Bottom of its own the same way (`shadow_bottom`) and runs the white-box
                      search through it instead of the public one.
  label attacks       the public Top and h2 (the server computed it). `privacy.label_probe` reads labels from
                      dL/dh2 over the whole vocabulary, assuming the client's Top is the public one;
                      `answer_match` knows the data distribution too (the task's possible answers and where
                      they sit) and picks, per row, the answer whose dL/dh2 under the public Top points the
                      most the same way as what arrived.

  replay              the client's LoRA seed, learning rate and optimizer besides: `privacy.replay` runs a copy of
                      the client's Bottom, reading each step exactly and stepping the copy as the client does.
  tracking            no seed: `privacy.track` reads step 0 through the public Bottom (the client's, B = 0), then at
                      each step fits a LoRA of its own start to the tokens it read and the h1 that came, and reads
                      the next step through it.
  ML decoding         the defence's noise, known in law, not in value: `privacy.ml_decode` scores guesses by the
                      Gaussian likelihood of what arrived plus the public model's prior, over a beam, with no early
                      stop, and combines the repeated sends of one text.
  quiet server        malicious: it answers a smaller dL/dh1 (`privacy.quiet`), so that the client's Bottom stays the
                      public one and the white-box search reads every step exactly; `privacy.quiet.GradientAudit` is
                      the client's check of what comes back.

Not built here: feature-space hijacking (Pasquini et al., "Unleashing the tiger", 2021), where a malicious
server trains the client's Bottom towards an invertible space it chose; inversion by a trained decoder on
natural text (BiSR of SplitLLM, VFLAIR-LLM's learned attacks); membership inference.
"""

import copy
import math

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from ..core.data import batches
from ..core.lora import LoraSpec
from ..training.defences import Defence, clip_rows
from ..training.train import Learner
from ..trunk.server import TrunkServer
from .probes import top_logits


def _scores(model, h1, inversion):  # (T, d) -> (T, vocab)
    """Each position's cosine between h1 @ inversion and every embedding, both centred on the embeddings' mean
    (plain cosine ranks a cluster of rare tokens near the mean first)."""
    table = model.get_input_embeddings().weight  # (vocab, d)
    mean = table.mean(0)
    h = h1 if inversion is None else h1 @ inversion
    return F.normalize(h - mean, dim=-1) @ F.normalize(table - mean, dim=-1).T


@torch.no_grad()
def whitebox_search(model, bottom, h1, *, inversion=None, defence: Defence | None = None, shortlist: int = 64,
                    budget: int | None = None, rtol: float = 1e-3, margin: float | None = None) -> dict:
    """Recover one sentence's tokens from its h1 (T, d) through the public `bottom` (split.Bottom of the base
    model). `inversion`: a (d, d) map from `privacy.fit_inversions` that ranks the candidates (None: h1 itself);
    `shortlist`: the first chunk of candidates; `budget`: candidates tried at most per position (None: the whole
    vocabulary); `margin`: also stop going down the ranking once the nearest candidate is nearer than `margin`
    times the second nearest (for a Bottom whose LoRA the attacker does not know, where nothing is explained).
    Returns {"ids": (T,), "distance": (T,) relative, "explained": (T,) bool, "tried": (T,)}."""
    defence = defence or Defence()
    T, d = h1.shape
    vocab = model.config.vocab_size
    budget = vocab if budget is None else min(budget, vocab)
    ranking = _scores(model, h1, inversion).argsort(dim=-1, descending=True)  # (T, vocab): best first
    sigma = defence.h1_sigma(d)
    cache = DynamicCache(config=model.config)
    ids, dist, explained, tried = (torch.zeros(T, dtype=torch.long), torch.zeros(T), torch.zeros(T, dtype=torch.bool),
                                   torch.zeros(T, dtype=torch.long))
    for t in range(T):
        target = h1[t]  # (d,)
        # what rounding (rtol) and the defence's noise (d·σ², with 4 standard deviations of its spread) explain
        allowed = (rtol * target.norm()) ** 2 + d * sigma ** 2 * (1 + 4 * math.sqrt(2 / d))
        best, best_sq, second_sq, start, chunk = -1, math.inf, math.inf, 0, shortlist
        while start < budget:
            candidates = ranking[t, start:min(start + chunk, budget)]  # (k,)
            out = _next_h1(bottom, cache, candidates, t)  # (k, d)
            if defence.h1_clip is not None:
                out = clip_rows(out, defence.h1_clip, dims=-1)
            sq = (out - target).pow(2).sum(-1)  # (k,)
            two = sq.topk(min(2, len(sq)), largest=False)
            for value, i in zip(two.values.tolist(), two.indices.tolist(), strict=True):
                if value < best_sq:
                    best, best_sq, second_sq = int(candidates[i]), value, best_sq
                elif value < second_sq:
                    second_sq = value
            start, chunk = start + len(candidates), chunk * 4
            if best_sq <= allowed or (margin is not None and best_sq < margin ** 2 * second_sq):
                break
        ids[t], tried[t] = best, start
        dist[t], explained[t] = math.sqrt(best_sq) / float(target.norm()), best_sq <= allowed
        bottom(ids[t].view(1, 1), position_ids=torch.tensor([[t]]), past_key_values=cache)  # the prefix grows
    return {"ids": ids, "distance": dist, "explained": explained, "tried": tried}


def shadow_bottom(model, tokenizer, cuts, defence: Defence, steps: int, lr: float, pairs, seed: int = 1):
    """A Bottom trained the way the client trains its own, on data of the same kind that the attacker has
    (`pairs`), with the same defence and recipe but its own LoRA init and data order: what an attacker who knows
    a defence that acts through training (NoPeek) searches through instead of the public Bottom."""
    server = TrunkServer(model, cuts, bind="tcp://127.0.0.1:*")
    try:
        with Learner(model, mode="full", cuts=cuts, address=server.start(), lr=lr, lora=LoraSpec(seed=seed),
                     defence=defence) as shadow:
            data = batches(tokenizer, pairs, 8, seed=seed)
            for _ in range(steps):
                shadow.step(next(data))
            return shadow.bottom
    finally:
        server.stop()


def _next_h1(bottom, cache, candidates, t: int):  # -> (k, d): h1 at t of each candidate after the prefix
    k = len(candidates)
    if t == 0:
        return bottom(candidates[:, None])[:, 0]
    trial = copy.deepcopy(cache)
    trial.batch_repeat_interleave(k)
    return bottom(candidates[:, None], position_ids=torch.full((k, 1), t), past_key_values=trial)[:, 0]


def whitebox_sentences(model, bottom, h1, mask, **options) -> torch.Tensor:  # (S, T, d), (S, T) -> (S, T)
    """whitebox_search on each sentence's real tokens; -1 outside `mask`."""
    out = torch.full(mask.shape, -1, dtype=torch.long)
    for s in range(len(h1)):
        n = int(mask[s].sum())
        out[s, :n] = whitebox_search(model, bottom, h1[s, :n], **options)["ids"]
    return out


@torch.no_grad()
def linear_read(model, h1, inversion, mask) -> torch.Tensor:  # (S, T, d) -> (S, T)
    """The learned inversion's top token per position; -1 outside `mask`."""
    out = torch.full(mask.shape, -1, dtype=torch.long)
    out[mask] = _scores(model, h1[mask], inversion).argmax(dim=-1)
    return out


# ---------------------------------------------------------------------------- secrets


def secret_positions(tokenizer, sentence: str, secret: str) -> list[int]:
    """The positions of the tokens of `sentence` that overlap the characters of `secret`."""
    start = sentence.index(secret)
    ids = tokenizer(sentence, add_special_tokens=False).input_ids
    ends = [len(tokenizer.decode(ids[:i])) for i in range(len(ids) + 1)]  # where each token's text ends
    return [i for i in range(len(ids)) if ends[i] < start + len(secret) and ends[i + 1] > start]


def secrets_recovered(tokenizer, sentences, secrets, ids, recovered) -> list[bool]:
    """Per sentence: whether every token of its secret came back exactly at its position."""
    return [all(int(recovered[s, i]) == int(ids[s, i]) for i in secret_positions(tokenizer, text, secret))
            for s, (text, secret) in enumerate(zip(sentences, secrets, strict=True))]


# ---------------------------------------------------------------------------- labels


def answer_match(top, h2, g2, prompt_lengths, answers) -> list[int]:
    """For each row b, the index of the answer in `answers` (lists of token ids, the end token included) whose
    loss on the public `top`, labelled from position prompt_lengths[b], gives a dL/dh2 most aligned (cosine)
    with the g2[b] that arrived. A server that knows the task's possible answers and its layout."""
    B, T, _ = h2.shape
    picks = []
    for b in range(B):
        start = prompt_lengths[b]
        positions = list(range(start - 1, min(start - 1 + max(map(len, answers)), T - 1)))  # logits that predict
        x = h2[b:b + 1].detach().expand(len(answers), -1, -1).clone().requires_grad_(True)  # (A, T, d)
        with torch.enable_grad():
            logits = top_logits(top, x, positions)  # (A, P, vocab): the LM head only where the answers are
            losses = [F.cross_entropy(logits[i, :min(len(ans), len(positions))],
                                      torch.tensor(ans[:len(positions)]), reduction="sum")
                      for i, ans in enumerate(answers)]
            (grads,) = torch.autograd.grad(torch.stack(losses).sum(), x)  # row i: the dL/dh2 answer i would give
        picks.append(int(F.cosine_similarity(grads.flatten(1), g2[b].flatten()[None], dim=-1).argmax()))
    return picks
