"""Looking inside autograd: requires_grad at each stage, and which parameters the graph reaches.

Used by the notebooks to show where the simplified version cuts the gradient.
"""

import matplotlib.pyplot as plt
import torch


def stage_table(stages: dict) -> str:
    """A text table of requires_grad, is_leaf, grad_fn and whether .grad is set, one row a stage."""
    rows = [("stage", "shape", "requires_grad", "is_leaf", "grad_fn", ".grad set")]
    for name, t in stages.items():
        fn = type(t.grad_fn).__name__ if t.grad_fn is not None else "None"
        rows.append((name, str(tuple(t.shape)), str(t.requires_grad), str(t.is_leaf), fn, str(t.grad is not None)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)


def reached_parameters(output: torch.Tensor) -> set[int]:
    """ids of the leaf tensors that output.backward() would give a gradient (walks grad_fn)."""
    seen, found, todo = set(), set(), [output.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if hasattr(fn, "variable"):  # AccumulateGrad: the end of a path, at a leaf
            found.add(id(fn.variable))
        todo.extend(f for f, _ in fn.next_functions)
    return found


def graph_reaches(output: torch.Tensor, module) -> bool:
    """Does the autograd graph of `output` reach any trainable parameter of `module`?"""
    reached = reached_parameters(output)
    return any(id(p) in reached for p in module.parameters() if p.requires_grad)


def draw_gradient_flow(flows: dict, title: str, ax=None):
    """Boxes for Bottom, Trunk (server), Top and the loss; the backward arrows are green where
    the gradient crosses, red and broken where it stops. `flows` maps 'top', 'trunk', 'bottom' to bools."""
    ax = ax or plt.subplots(figsize=(7, 1.6))[1]
    boxes = [("Bottom\n(client)", "tab:blue"), ("Trunk\n(server)", "tab:grey"), ("Top\n(client)", "tab:orange"),
             ("loss", "white")]
    for i, (label, colour) in enumerate(boxes):
        ax.add_patch(plt.Rectangle((i * 2.2, 0), 1.4, 1, facecolor=colour, alpha=0.35, edgecolor="black"))
        ax.text(i * 2.2 + 0.7, 0.5, label, ha="center", va="center", fontsize=9)
    for i, part in enumerate(["bottom", "trunk", "top"]):  # arrow from box i+1 back into box i
        ok = flows[part]
        ax.annotate("", xy=(i * 2.2 + 1.4, 0.5), xytext=((i + 1) * 2.2, 0.5),
                    arrowprops=dict(arrowstyle="->", lw=2, color="green" if ok else "red",
                                    linestyle="-" if ok else "--"))
        if not ok:
            ax.text(i * 2.2 + 1.8, 0.75, "✗", color="red", ha="center", fontsize=14)
    ax.set(xlim=(-0.2, 8.2), ylim=(-0.2, 1.2), title=title)
    ax.axis("off")
    return ax.figure
