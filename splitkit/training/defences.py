"""Defences a client can turn on: what each changes before a tensor crosses the wire.

A `Defence` is given to a `Learner` (`Learner(..., defence=Defence(h1_clip=20, h1_snr=4))`). Every field is
off by default, and a Learner without one, or with `Defence()`, runs exactly as it would without: the same
tensors, bit for bit. Each protects one thing and not the others:

  h1_clip, h1_snr   what the server reads from h1 (the input). Each token's h1 is scaled to an L2 norm of at
                    most `h1_clip` (per-token norm clipping), then Gaussian noise of variance
                    h1_clip² / (d · h1_snr) per coordinate is added: h1_snr = h1_clip² / E‖noise‖², the
                    signal-to-noise power ratio of a token at the bound (lower for a smaller token). The
                    noise is drawn afresh for every tensor sent and is part of what the client's model
                    computes (its Top sees the noisy h2 too), as in FL-LLaMA's and VFLAIR-LLM's noise defences.
                    It does nothing for the labels.
  nopeek            what the server reads from h1. The client's loss gets + nopeek · dCor(x, h1), the
                    distance correlation between the input embeddings x and h1 over the batch's positions
                    (Vepakomma et al., "NoPeek", 2020): the Bottom's LoRA learns to make h1 less like its input.
                    Nothing changes on the wire; it acts only through training, so at step 0 it does nothing.
  g2_clip, g2_noise what the server reads from dL/dh2 (the labels). Each row's dL/dh2 is scaled to an L2 norm
                    of at most `g2_clip`, then Gaussian noise of std g2_noise · g2_clip per coordinate is
                    added (the clip-and-noise of DP-SGD, applied to the cut layer's gradient). The client's
                    Bottom and Top then train on a noisy gradient. It does nothing for the input.
  g2_maxnorm        what the server reads from dL/dh2. Max-norm alignment (Li et al., "Label leakage and
                    protection in two-party split learning", 2022): each row gets Gaussian noise whose expected
                    squared norm lifts it to the batch's largest row norm, so that norms tell rows apart less.

The cut depth is the other setting that moves what the server reads; it is a `Learner` argument (`cuts`).

The noise is the client's secret: unless `seed` is given, its generator is seeded from the operating system's
entropy, so that nobody can draw the same stream. A server that could would subtract the noise and read `h1` as if
there were none. A fixed seed reproduces a run (notebooks, tests, benchmarks), and gives its noise to whoever knows
the seed.
"""

import secrets
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class Defence:
    """What the client does to h1 and dL/dh2 before they cross the wire, and the penalty it trains with."""

    h1_clip: float | None = None  # per-token L2 norm bound on h1 (None: no clipping)
    h1_snr: float | None = None   # signal-to-noise power ratio at the bound (None: no noise); needs h1_clip
    nopeek: float = 0.0           # weight of dCor(embeddings, h1) in the client's loss
    g2_clip: float | None = None  # per-row L2 norm bound on dL/dh2 (None: no clipping)
    g2_noise: float = 0.0         # noise std on dL/dh2, as a multiple of g2_clip; needs g2_clip
    g2_maxnorm: bool = False      # noise that aligns each row's expected norm with the batch's largest
    seed: int | None = None       # the noise generator's seed; None: from the operating system's entropy (secret)

    def __post_init__(self):
        for name in ("h1_clip", "h1_snr", "g2_clip"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"Defence.{name} must be positive, got {value!r}")
        if self.nopeek < 0 or self.g2_noise < 0:
            raise ValueError("Defence.nopeek and Defence.g2_noise cannot be negative")
        if self.h1_snr is not None and self.h1_clip is None:
            raise ValueError("Defence.h1_snr needs h1_clip: a noise scale means something only against a norm bound")
        if self.g2_noise and self.g2_clip is None:
            raise ValueError("Defence.g2_noise needs g2_clip: the noise std is a multiple of the clipping bound")

    @property
    def on(self) -> bool:
        return self != Defence(seed=self.seed)

    @property
    def touches_h1(self) -> bool:
        return self.h1_clip is not None

    @property
    def touches_g2(self) -> bool:
        return self.g2_clip is not None or self.g2_maxnorm

    def h1_sigma(self, d: int) -> float:
        """The std of the noise on each coordinate of h1 (0 without noise)."""
        return 0.0 if self.h1_snr is None else self.h1_clip / (d * self.h1_snr) ** 0.5

    def describe(self) -> str:
        parts = [f"{k}={v}" for k, v in asdict(self).items() if k != "seed" and v not in (None, 0.0, False)]
        return ", ".join(parts) or "none"


def clip_rows(x: torch.Tensor, bound: float, dims) -> torch.Tensor:
    """x scaled so that its L2 norm over `dims` is at most `bound` (unchanged where it already is)."""
    norm = x.norm(dim=dims, keepdim=True)
    return x * (bound / norm.clamp_min(1e-30)).clamp(max=1.0)


def distance_correlation(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Székely's sample distance correlation between the rows of x (n, p) and y (n, q), in [0, 1]."""
    def centred(z):
        dist = torch.cdist(z, z)  # (n, n)
        return dist - dist.mean(0, keepdim=True) - dist.mean(1, keepdim=True) + dist.mean()

    a, b = centred(x.double()), centred(y.double())
    dcov_xy, dcov_xx, dcov_yy = (a * b).mean(), (a * a).mean(), (b * b).mean()
    return (dcov_xy / (dcov_xx * dcov_yy).sqrt().clamp_min(1e-30)).clamp_min(0).sqrt().to(x.dtype)


class Guard:
    """A Learner's defence at work: the noise generator, and the three places it acts."""

    def __init__(self, defence: Defence | None):
        self.defence = defence or Defence()
        seed = self.defence.seed if self.defence.seed is not None else secrets.randbits(63)
        self.generator = torch.Generator().manual_seed(seed)

    def h1(self, h1: torch.Tensor) -> torch.Tensor:  # (B, T, d) -> (B, T, d): what is sent
        """Clip each token's h1 and add noise; differentiable (the noise is a constant of the step)."""
        d = self.defence
        if d.h1_clip is None:
            return h1
        h1 = clip_rows(h1, d.h1_clip, dims=-1)
        if d.h1_snr is None:
            return h1
        noise = torch.randn(h1.shape, generator=self.generator, dtype=h1.dtype) * d.h1_sigma(h1.shape[-1])
        return h1 + noise

    def penalty(self, tokens, input_ids: torch.Tensor, h1: torch.Tensor) -> torch.Tensor | None:
        """nopeek · dCor(tokens(input_ids), h1) over the batch's B·T positions, or None when NoPeek is off."""
        if not self.defence.nopeek:
            return None
        with torch.no_grad():
            x = tokens(input_ids)  # (B, T, d): the input embeddings, frozen
        return self.defence.nopeek * distance_correlation(x.flatten(0, 1), h1.flatten(0, 1))

    def h2(self, h2: torch.Tensor) -> torch.Tensor:  # (B, T, d) -> (B, T, d): the same values
        """h2 unchanged; on the backward, dL/dh2 is clipped and noised before it goes to the server."""
        if not self.defence.touches_g2:
            return h2
        return _GradientGuard.apply(h2, self)

    def g2(self, g2: torch.Tensor) -> torch.Tensor:  # (B, T, d) -> (B, T, d): what is sent
        d = self.defence
        if d.g2_clip is not None:
            g2 = clip_rows(g2, d.g2_clip, dims=(1, 2))
            if d.g2_noise:
                g2 = g2 + torch.randn(g2.shape, generator=self.generator, dtype=g2.dtype) * (d.g2_noise * d.g2_clip)
        if d.g2_maxnorm:
            sq = g2.pow(2).sum(dim=(1, 2), keepdim=True)  # (B, 1, 1)
            std = ((sq.max() - sq) / g2[0].numel()).sqrt()  # E‖noise_b‖² = max‖g‖² − ‖g_b‖²
            g2 = g2 + torch.randn(g2.shape, generator=self.generator, dtype=g2.dtype) * std
        return g2


class _GradientGuard(torch.autograd.Function):
    """Identity on the forward; on the backward, the Guard's g2 transform of dL/dh2."""

    @staticmethod
    def forward(ctx, h2, guard):
        ctx.guard = guard
        return h2.view_as(h2)

    @staticmethod
    def backward(ctx, g2):
        return ctx.guard.g2(g2), None
