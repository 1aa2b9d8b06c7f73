"""The quiet malicious server, and the client's audit of the dL/dh1 it gets back.

A server that reads h1 through the public Bottom (`whitebox_search`) reads it exactly only while the client's
Bottom is the public one. A quiet server keeps it so by answering each backward with a smaller dL/dh1
(`SteeringServer(forge=quiet(scale))`): the client cannot compute the Trunk's part of the gradient itself without
the Trunk, and its loss still falls through the Top. Against the kit's AdamW a smaller gradient is not a slower one:
Adam divides each parameter's step by that parameter's own running gradient scale, so the Bottom stays public only
when what comes back is below Adam's eps (1e-8), that is, next to nothing. `quiet(0)` sends zeros.

In `full` the Trunk is the public model's, which the client holds: `GradientAudit` checks what comes back in two
ways, with randomness that is the client's secret.

  audit   on a share of steps drawn by the client, it recomputes dL/dh1 through its own copy of the public Trunk
          (one Trunk forward and backward on the client) and flags a relative difference over `tol`. The server
          cannot tell which steps are audited: one that forges k steps goes unseen with chance (1 - share)^k.
  ratio   on every step, at no cost: ‖dL/dh1‖ / ‖dL/dh2‖ against the range the client measured through its own
          Trunk on its own batches (`calibrate`), widened `widen` times either way. It sees only a norm: a forgery
          that keeps ‖dL/dh1‖ (the server knows it) passes it; only the audit catches that.
"""

import copy
import random
import secrets

import torch

from ..core.split import left_padding, split_model


def quiet(scale: float):
    """forge for a SteeringServer: dL/dh1 scaled by `scale` (0: zeros)."""
    return lambda g1: g1 * scale


class _PublicTrunk(torch.nn.Module):
    """The client's own copy of the public Trunk, called as the learner calls its remote one."""

    def __init__(self, model, cuts):
        super().__init__()
        self.trunk = copy.deepcopy(split_model(model, cuts).trunk).requires_grad_(False)

    def forward(self, h1, pad=None):  # (B, T, d) -> (B, T, d); pad: each row's left padding
        if pad is None:
            return self.trunk(h1)
        mask, positions = left_padding(pad, 0, h1.shape[1])
        return self.trunk(h1, attention_mask=mask, position_ids=positions)


class _Tap(torch.nn.Module):
    """A Trunk, unchanged, keeping what crossed it on the newest step: h1, dL/dh2 and dL/dh1."""

    def __init__(self, trunk):
        super().__init__()
        self.trunk, self.seen = trunk, {}

    def forward(self, h1, pad=None):  # (B, T, d) -> (B, T, d)
        self.seen = {"h1": h1.detach(), "pad": pad}
        if h1.requires_grad:  # an alias, so that the hook sees the Trunk's gradient only (not NoPeek's on h1)
            h1 = h1.view_as(h1)
            h1.register_hook(lambda g: self.seen.__setitem__("g1", g.detach()))
        h2 = self.trunk(h1, pad=pad)
        if h2.requires_grad:
            h2.register_hook(lambda g: self.seen.__setitem__("g2", g.detach()))
        return h2


class GradientAudit:
    """GradientAudit(learner, model, share=0.25) taps a `full` learner's Trunk; after each `learner.step(batch)`,
    `check()` says what the two checks made of that step. `model` is the public model the learner was built from;
    `seed` fixes which steps are audited (None: a secret one)."""

    def __init__(self, learner, model, share: float = 0.25, tol: float = 1e-3, widen: float = 4.0, seed=None):
        if learner.mode != "full":
            raise ValueError(f"the audit recomputes the public Trunk: mode 'full' only, got {learner.mode!r}")
        if learner.client.wire_dtype != "float32":
            raise ValueError(f"the audit compares to rounding: wire_dtype 'float32' only, got "
                             f"{learner.client.wire_dtype!r}")
        self.learner, self.share, self.tol, self.widen = learner, share, tol, widen
        self.public = _PublicTrunk(model, learner.cuts)
        self.tap = learner.trunk = _Tap(learner.trunk)
        self.draw = random.Random(secrets.randbits(64) if seed is None else seed)
        self.range = None  # (lowest, highest) ratio of the calibration

    def _ratio(self, seen) -> float:
        return float(seen["g1"].norm() / seen["g2"].norm())

    def calibrate(self, batches) -> tuple[float, float]:
        """The ratio's range over the client's own batches, each step computed through its own public Trunk (and
        its own defence, if any) with no server and no step taken."""
        remote, self.tap.trunk, ratios = self.tap.trunk, self.public, []
        try:
            for batch in batches:
                self.learner.zero_grad()
                self.learner.forward_backward(batch)
                ratios.append(self._ratio(self.tap.seen))
        finally:
            self.tap.trunk, self.tap.seen = remote, {}
            self.learner.zero_grad()
        self.range = (min(ratios), max(ratios))
        return self.range

    def check(self) -> dict:
        """The newest step, once: {"ratio", "ratio_flag", "audited", "audit_flag" (None unless audited),
        "difference"}."""
        seen, self.tap.seen = self.tap.seen, {}
        if "g1" not in seen or "g2" not in seen:
            raise RuntimeError("no step to check: call learner.step(batch) first")
        ratio = self._ratio(seen)
        out = {"ratio": ratio, "audited": self.draw.random() < self.share, "audit_flag": None, "difference": None}
        out["ratio_flag"] = (self.range is not None
                             and not self.range[0] / self.widen <= ratio <= self.range[1] * self.widen)
        if out["audited"]:
            h1 = seen["h1"].detach().requires_grad_(True)
            (true,) = torch.autograd.grad(self.public(h1, pad=seen["pad"]), h1, seen["g2"])
            out["difference"] = float((seen["g1"] - true).norm() / true.norm().clamp_min(1e-30))
            out["audit_flag"] = out["difference"] > self.tol
        return out
