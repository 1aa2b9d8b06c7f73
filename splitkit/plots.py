"""Matplotlib figures of a training run: loss curves, and each LoRA layer's change coloured by part."""

import matplotlib.pyplot as plt

PART_COLOURS = {"bottom": "tab:blue", "trunk": "tab:grey", "top": "tab:orange"}
MODE_STYLES = {"detach": "-", "full": "-", "full+trunk": "--", "local": ":"}


def plot_losses(histories, ax=None):
    """One loss curve per run; `histories` is a list of train.History."""
    ax = ax or plt.subplots(figsize=(6, 3.5))[1]
    for h in histories:
        ax.plot(range(1, len(h.loss) + 1), h.loss, MODE_STYLES.get(h.mode, "-"), label=h.mode, lw=2)
    ax.set(xlabel="step", ylabel="loss (answer tokens)", title="Training loss")
    ax.legend()
    return ax.figure


def layer_changes(history) -> dict:
    """{block index: summed ||B @ A * scaling|| of its LoRA layers} after the last step."""
    out = {}
    for key, norm in (history.delta_norms[-1] if history.delta_norms else {}).items():
        i = int(key.split(".", 1)[0])
        out[i] = out.get(i, 0.0) + norm
    return out


def plot_lora_changes(histories, n_layers: int):
    """One bar chart per run: how far each block's LoRA moved, coloured Bottom / Trunk / Top.

    A block with no bar has no LoRA in that mode (the Trunk in "detach" and "full");
    a bar of height zero is a LoRA layer that never moved (the Bottom in "detach").
    """
    fig, axes = plt.subplots(len(histories), 1, figsize=(7, 1.9 * len(histories)), sharex=True, squeeze=False)
    for ax, h in zip(axes[:, 0], histories, strict=True):
        changes = layer_changes(h)
        a, b = h.cuts
        for start, stop, part in ((0, a, "bottom"), (a, b, "trunk"), (b, n_layers, "top")):
            ax.axvspan(start - 0.5, stop - 0.5, color=PART_COLOURS[part], alpha=0.08)
        ax.bar(list(changes), list(changes.values()), color=[PART_COLOURS[h.part_of(f"{i}.")] for i in changes])
        ax.set_ylabel("‖ΔW‖")
        ax.set_title(f"{h.mode}: LoRA change per block", fontsize=10, loc="left")
    axes[-1, 0].set_xlabel("block (blue: Bottom, grey: Trunk, orange: Top)")
    fig.tight_layout()
    return fig
