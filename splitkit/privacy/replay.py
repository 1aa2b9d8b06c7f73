"""The replay: what a curious server does with a client's seed.

In `full` mode the server sees, at every step, the h1 the client sent and the dL/dh1 it answered. If it also knows
the seed the client's LoRA started from, its learning rate and its optimizer (the kit's AdamW), it can run a copy of
the client's Bottom beside the client: read the step's tokens from h1 by white-box search through the copy (exact,
for the copy *is* the client's Bottom), backpropagate its own dL/dh1 through the copy and step it as the client steps
its own. Every step is then read as step 0 is read through the public Bottom. With a wrong seed the copy leaves the
client's Bottom after the first step, and the search says so: positions it cannot explain.

A Bottom whose LoRA starts at B = 0 is the public one at step 0 whatever the seed; the seed decides everything after.

In `full+trunk` the server needs no seed to hold something of the client's data: the Trunk LoRA trained on it is
the server's own. `trunk_alone` puts it between the public Bottom and Top, a model the server can ask on its own.
"""

import copy
from dataclasses import dataclass, field

import torch

from ..core.lora import LoraSpec, add_lora
from ..core.split import split_model
from ..training.train import Learner, adamw
from .attacks import whitebox_search


@dataclass
class Replay:
    """What the replay read: per step the tokens (B, T), each position's distance from what arrived relative to its
    norm (B, T), and whether that is within rounding, explained (B, T); the copy."""

    ids: list = field(default_factory=list)
    distance: list = field(default_factory=list)
    explained: list = field(default_factory=list)
    bottom: torch.nn.Module | None = None


def replay(model, cuts, lora: LoraSpec, lr: float, seen, known=(), rtol: float = 1e-3, **search) -> Replay:
    """Replay a `full` client's training from `seen`, [(h1, dL/dh1)] per step as the server saw and answered them
    (`CuriousServer.seen` and `.sent_back`), with the client's LoRA spec (its seed) and learning rate. `known`: the
    tokens (B, T) of the first steps, read already (a server that tries several seeds reads step 0 once); the other
    steps are read by whitebox_search, to which `search` goes (inversion, shortlist, budget). A step's tokens as the
    kit's task sends them: every row's padding is a token the Bottom runs like any other."""
    if lora.seed is None:
        raise ValueError("the replay needs the client's seed: a LoraSpec with seed=")
    bottom = add_lora(split_model(copy.deepcopy(model), cuts).bottom, lora, model.config)
    optimizer = adamw(bottom, lr)
    out = Replay(bottom=bottom)
    for step, (h1, g1) in enumerate(seen):  # (B, T, d), (B, T, d)
        if step < len(known):
            ids = known[step]  # (B, T)
            with torch.no_grad():
                distance = (bottom(ids) - h1).norm(dim=-1) / h1.norm(dim=-1)
            explained = distance <= rtol
        else:
            found = [whitebox_search(model, bottom, row, rtol=rtol, **search) for row in h1]
            ids, distance, explained = (torch.stack([f[k] for f in found]) for k in ("ids", "distance", "explained"))
        out.ids.append(ids)
        out.distance.append(distance)
        out.explained.append(explained)
        if optimizer is not None:  # the client's step, done by the server: dL/dh1 through the copy, then AdamW
            optimizer.zero_grad(set_to_none=True)
            bottom(ids).backward(g1)
            optimizer.step()
    return out


def trunk_alone(model, cuts, lora: LoraSpec, trunk: dict) -> Learner:
    """The public model with only the Trunk LoRA of a `full+trunk` run, `trunk` ({name: tensor}, as the server holds
    it and `TrunkClient.trunk_lora()` reads it), and no LoRA of the client's: a `local` Learner, to evaluate."""
    learner = Learner(model, mode="local", cuts=cuts, lora=lora)
    state = {name: torch.zeros_like(w) if name.endswith("lora_B") else w for name, w in learner.lora_state().items()}
    if trunk.keys() - state.keys():
        raise ValueError(f"not a Trunk LoRA of these cuts: {sorted(trunk.keys() - state.keys())[:3]}")
    learner.load_lora({**state, **trunk})
    return learner
