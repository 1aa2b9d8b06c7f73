"""Tracking: what a curious server does without the client's seed.

A `full` client's Bottom is the public one at step 0 (its LoRA starts at B = 0 whatever the seed), so the server
reads step 0 exactly. After that the client's LoRA is a secret the server cannot recompute; but every step sends
h1 = Bottom(input) for inputs the server has just read. `track` keeps a Bottom of its own, with a LoRA of its own
start, and at each step (1) reads the step's tokens by white-box search through it, then (2) fits its LoRA, A and B
both, to the (tokens, h1) pairs it just read (least squares on h1). It stays a step behind the client, and near it:
what the client sends next, private text included, is read through a Bottom fitted to the client's latest one.

What it needs: the public weights, the cut, and what crossed the wire; not the client's seed, rate or optimizer.
Against NoPeek, which changes the Bottom only through training, this is the attacker that follows the change.
"""

import copy

import torch

from ..core.lora import LoraSpec, add_lora, lora_parameters
from ..core.split import split_model
from .attacks import whitebox_search
from .replay import Replay


def track(model, cuts, seen, *, lora: LoraSpec | None = None, fit_steps: int = 30, fit_lr: float = 1e-2,
          margin: float | None = None, **search) -> Replay:
    """Follow a `full` client's Bottom from `seen`, the h1 (B, T, d) of each step as the server received them (the
    dL/dh1 beside them, if given as pairs, are not used). `lora`: the tracker's LoRA shape (the client's is public
    in the hello's sense: the kit's default); its start is the tracker's own. `search` goes to whitebox_search
    (shortlist, budget, defence); `margin` stops a position's search once the nearest candidate is that much
    nearer than the second (the tracker's Bottom explains h1 only up to its fit). A batch without padding."""
    spec = (lora or LoraSpec()).resolved()
    bottom = add_lora(split_model(copy.deepcopy(model), cuts).bottom, spec, model.config)
    weights = [w for _, w in lora_parameters(bottom)]
    for w in weights:
        w.requires_grad_(True)
    optimizer = torch.optim.Adam(weights, lr=fit_lr)
    out = Replay(bottom=bottom)
    for step in seen:
        h1 = step[0] if isinstance(step, tuple | list) else step  # (B, T, d)
        with torch.no_grad():
            found = [whitebox_search(model, bottom, row, margin=margin, **search) for row in h1]
        ids = torch.stack([f["ids"] for f in found])  # (B, T)
        out.ids.append(ids)
        out.explained.append(torch.stack([f["explained"] for f in found]))
        fit(bottom, optimizer, ids, h1, fit_steps)
    return out


def fit(bottom, optimizer, ids, h1, steps: int) -> float:
    """`steps` of least squares of bottom(ids) on h1, relative to h1's power; the last value."""
    scale = h1.pow(2).mean()
    loss = torch.tensor(0.0)
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss = (bottom(ids) - h1).pow(2).mean() / scale
        loss.backward()
        optimizer.step()
    return float(loss.detach())
