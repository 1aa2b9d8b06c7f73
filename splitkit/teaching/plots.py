"""Matplotlib figures of a training run: loss curves, and each LoRA layer's change coloured by part.

Curves that lie on top of each other (`full+trunk` and `local` do, step for step) are drawn so
that both stay visible: a wide pale band under a thin line with markers, and a note that says so.
"""

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import FuncFormatter

PART_COLOURS = {"bottom": "tab:blue", "trunk": "tab:grey", "top": "tab:orange"}
# mode: how its loss curve is drawn; full+trunk is a wide pale band, local a thin dotted line with markers over it
MODE_STYLES = {"detach": dict(color="tab:red", ls="-", lw=2),
               "full": dict(color="tab:blue", ls="-", lw=2),
               "full+trunk": dict(color="tab:green", ls="-", lw=7, alpha=0.35),
               "local": dict(color="black", ls=":", lw=1.5, marker="x", markersize=5, markevery=2)}
LOSS_LABEL = "cross-entropy (nats per answer token)"


def coinciding(histories, rtol: float = 1e-3, atol: float = 1e-3) -> list[tuple[str, str]]:
    """Pairs of modes whose loss curves agree at every step (to float rounding)."""
    return [(h.mode, g.mode) for i, h in enumerate(histories) for g in histories[i + 1:]
            if len(h.loss) == len(g.loss) and np.allclose(h.loss, g.loss, rtol=rtol, atol=atol)]


def plot_losses(histories, ax=None):
    """One loss curve per run on a log scale; `histories` is a list of train.History."""
    ax = ax or plt.subplots(figsize=(6.5, 3.8))[1]
    for h in histories:
        ax.plot(range(1, len(h.loss) + 1), h.loss, label=h.mode, **MODE_STYLES.get(h.mode, {}))
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))  # 0.1, 1, 10 rather than 10^-1, ...
    ax.set(xlabel="step", ylabel=LOSS_LABEL, title="Training loss (log scale)")
    ax.grid(True, which="both", alpha=0.3)
    same = coinciding(histories)
    note = "; ".join(f"{a} and {b} coincide: one curve lies on the other" for a, b in same)
    ax.legend(title=note or None, title_fontsize=8, loc="lower left")
    return ax.figure


def layer_changes(history) -> dict:
    """{block index: summed ||B @ A * scaling|| of its LoRA layers} after the last step."""
    out = {}
    for key, norm in (history.delta_norms[-1] if history.delta_norms else {}).items():
        i = int(key.split(".", 1)[0])
        out[i] = out.get(i, 0.0) + norm
    return out


NO_LORA, NOT_MOVED, MOVED = "no LoRA", "LoRA present, ΔW = 0 (no gradient)", "LoRA present, moved"


def part_labels(history, n_layers: int) -> dict:
    """{part: NO_LORA | NOT_MOVED | MOVED}: each part's LoRA after the last step."""
    changes, (a, b) = layer_changes(history), history.cuts
    labels = {}
    for part, blocks in (("bottom", range(0, a)), ("trunk", range(a, b)), ("top", range(b, n_layers))):
        if not blocks:
            continue
        moved = [changes[i] for i in blocks if i in changes]
        labels[part] = NO_LORA if not moved else NOT_MOVED if max(moved) == 0 else MOVED
    return labels


def plot_lora_changes(histories, n_layers: int):
    """One bar chart per run, all on one y-axis: how far each block's LoRA moved, coloured Bottom / Trunk / Top.

    A part without LoRA in that mode is marked "no LoRA" (the Trunk in "detach" and "full"); a part
    whose LoRA never moved is marked "LoRA present, ΔW = 0 (no gradient)" (the Bottom in "detach").
    """
    fig, axes = plt.subplots(len(histories), 1, figsize=(7.5, 1.9 * len(histories)), sharex=True, sharey=True,
                             squeeze=False)
    top = max([max(layer_changes(h).values(), default=0.0) for h in histories] + [1e-12])
    for ax, h in zip(axes[:, 0], histories, strict=True):
        changes = layer_changes(h)
        a, b = h.cuts
        spans = {"bottom": (0, a), "trunk": (a, b), "top": (b, n_layers)}
        for part, (start, stop) in spans.items():
            ax.axvspan(start - 0.5, stop - 0.5, color=PART_COLOURS[part], alpha=0.08)
        ax.bar(list(changes), list(changes.values()), color=[PART_COLOURS[h.part_of(f"{i}.")] for i in changes])
        for part, label in part_labels(h, n_layers).items():
            if label != MOVED:  # a part that moved shows its bars; the others say why they have none
                start, stop = spans[part]
                colour = "dimgrey" if label == NO_LORA else PART_COLOURS[part]
                ax.text((start + stop - 1) / 2, 0.5 * top, label.replace(", ", ",\n"), ha="center", va="center",
                        fontsize=8, color=colour)
        ax.set_ylim(0, 1.1 * top)
        ax.set_ylabel("Σ‖ΔW‖ per block", fontsize=9)
        ax.set_title(f"{h.mode}: LoRA change per block after {len(h.loss)} steps", fontsize=10, loc="left")
    axes[-1, 0].set_xlabel("block (blue: Bottom, grey: Trunk, orange: Top); ΔW = (α/r)·B·A, Frobenius norm")
    fig.tight_layout()
    return fig
