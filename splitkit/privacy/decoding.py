"""Maximum-likelihood decoding of noisy h1: the attacker that knows the noise defence and holds the whole model.

A client that clips each token's h1 to a norm C and adds Gaussian noise of std σ per coordinate sends
y = clip(h1) + noise. A server that knows C and σ (the defence and its setting) scores a guess of the text by how
likely y is under it, log N(y; clip(Bottom(guess)), σ²), and by how likely the guess is as text, the public model's
own log-probability of each token after the ones before it (the server holds every block; the first token's
after the model's start-of-text token). `ml_decode` searches
for the best sum with a beam, left to right (h1 at t depends only on tokens <= t), trying at each position the
inversion's shortlist and the model's most likely next tokens, with no early stop.

The same text sent n times with fresh noise is n looks at one h1: the likelihood of all n is that of their mean
with σ² / n. Training sends each example many times (the kit's 16 facts, 8 a step for 24 steps: 12 times each),
so `sends` may hold several.

What bounds it: the candidates tried per position (`shortlist` + `next_tokens`, not the vocabulary) and the beam;
a result is a lower bound on what this attacker reads.
"""

import math

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from ..training.defences import Defence, clip_rows
from .attacks import _next_h1, _scores


@torch.no_grad()
def ml_decode(model, bottom, sends, defence: Defence, *, inversion=None, beam: int = 4, shortlist: int = 32,
              next_tokens: int = 32, budget: int = 256, prior: bool = True, mismatch: float = 0.0) -> dict:
    """The most likely tokens (T,) of one text from `sends` (n, T, d), the h1 it arrived as n times, through the
    public `bottom` (split.Bottom) and the whole `model` (the prior; `prior=False`: likelihood only). `defence`: the
    client's, with its clip and SNR. Where no candidate of a beam lies within what the noise explains (a squared
    distance of d·σ² and four standard deviations of its spread), that beam goes on down the inversion's ranking in
    growing chunks, to `budget` candidates. `mismatch`: the variance per coordinate by which the attacker's `bottom`
    itself misses the client's (0 for the public Bottom at step 0; a tracked Bottom's fit residual after training),
    added to the noise's in the likelihood. Returns {"ids": (T,), "log_likelihood": (T,) the best path's Gaussian
    term per position, "sigma": the std of the mean's noise}."""
    n, T, d = sends.shape
    target = sends.mean(0)  # (T, d): n looks at one h1, noise std σ/√n
    sigma = defence.h1_sigma(d) / math.sqrt(n)
    var = sigma ** 2 + mismatch
    var = var if var > 0 else 1e-12 * float(target.pow(2).mean())  # no noise, no mismatch: the likelihood decides
    budget = min(max(budget, shortlist), model.config.vocab_size)
    ranking = _scores(model, target, inversion).topk(budget, dim=-1).indices  # (T, budget): best first
    explained = d * var * (1 + 4 * math.sqrt(2 / d)) if sigma ** 2 + mismatch > 0 else \
        1e-6 * float(target.pow(2).sum(-1).max())
    beams = [((), 0.0, ())]  # (tokens, score, per-position log-likelihood)
    bos = model.config.bos_token_id  # the first token's prior: the model's after its start-of-text token, if it has one
    head = None if bos is None else torch.tensor([[bos]])
    for t in range(T):
        prefixes = torch.tensor([b[0] for b in beams], dtype=torch.long).view(len(beams), t)
        context = prefixes if head is None else torch.cat([head.expand(len(beams), 1), prefixes], dim=1)
        if prior and context.shape[1]:
            logp = F.log_softmax(model(input_ids=context).logits[:, -1].float(), dim=-1)  # (beams, vocab)
        else:
            logp = torch.zeros(len(beams), model.config.vocab_size)  # a flat prior
        grown = []
        for i, (tokens, score, lls) in enumerate(beams):
            cache = DynamicCache(config=model.config)
            if t:
                bottom(prefixes[i:i + 1], past_key_values=cache)
            candidates = ranking[t, :shortlist]
            if prior and context.shape[1]:
                candidates = torch.cat([candidates, logp[i].topk(next_tokens).indices]).unique()
            sq = _distances(bottom, cache, candidates, t, target[t], defence)
            start, chunk = shortlist, shortlist
            while float(sq.min()) > explained and start < budget:  # nothing explains h1 here: further down
                more = ranking[t, start:start + chunk]
                more = more[~torch.isin(more, candidates)]
                candidates, sq = torch.cat([candidates, more]), torch.cat([sq, _distances(bottom, cache, more, t,
                                                                                          target[t], defence)])
                start, chunk = start + chunk, chunk * 2
            ll = -sq / (2 * var)  # (k,)
            total = score + ll + logp[i, candidates]
            top = total.topk(min(beam, len(candidates)))
            grown += [((*tokens, int(candidates[j])), float(v), (*lls, float(ll[j])))
                      for v, j in zip(top.values, top.indices, strict=True)]
        beams = sorted(grown, key=lambda b: -b[1])[:beam]
    tokens, _, lls = beams[0]
    return {"ids": torch.tensor(tokens, dtype=torch.long), "log_likelihood": torch.tensor(lls), "sigma": sigma}


def _distances(bottom, cache, candidates, t, target, defence) -> torch.Tensor:  # -> (k,) squared, after clipping
    if not len(candidates):
        return torch.zeros(0)
    out = _next_h1(bottom, cache, candidates, t)  # (k, d)
    if defence.h1_clip is not None:
        out = clip_rows(out, defence.h1_clip, dims=-1)
    return (out - target).pow(2).sum(-1)


def ml_sentences(model, bottom, sends, mask, defence: Defence, **options) -> torch.Tensor:
    """ml_decode on each sentence's real tokens: `sends` (n, S, T, d), `mask` (S, T); -1 outside the mask."""
    out = torch.full(mask.shape, -1, dtype=torch.long)
    for s in range(mask.shape[0]):
        k = int(mask[s].sum())
        out[s, :k] = ml_decode(model, bottom, sends[:, s, :k], defence, **options)["ids"]
    return out
