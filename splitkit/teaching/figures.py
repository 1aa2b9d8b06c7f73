"""Pictures of the protocol: the U-shape, the gradient flow drawn on it, and the messages of one step.

Drawn with matplotlib on Figures of their own (no pyplot state), so a notebook shows them and a
test can read them. The gradient-flow picture takes measured facts, never literals: which backward
arrows carried a gradient comes from the autograd graph and from the messages that crossed.
"""

from matplotlib.figure import Figure
from matplotlib.patches import FancyBboxPatch

PART_COLOURS = {"bottom": "tab:blue", "trunk": "tab:grey", "top": "tab:orange", "loss": "white"}
# boxes as (x, y, width, height) of their lower-left corner: the client on the left, the server on the right
_BOXES = {"bottom": (0.0, 0.6, 2.2, 0.8), "top": (0.0, 2.6, 2.2, 0.8), "loss": (0.0, 4.0, 2.2, 0.5),
          "trunk": (3.9, 0.6, 2.0, 2.8)}
_LABELS = {"bottom": "Bottom\nembeddings + blocks [0, a)", "top": "Top\nblocks [b, n) + norm + head",
           "loss": "loss (the labels stay here)", "trunk": "Trunk\nblocks [a, b)"}
# arrows as (x0, y0, x1, y1, label, where the label goes): forward first, then backward by its key
_FORWARD = [(2.2, 1.15, 3.9, 1.15, "h1 (B, T, d)", "above"), (3.9, 3.15, 2.2, 3.15, "h2 (B, T, d)", "above"),
            (0.8, 3.4, 0.8, 4.0, "logits", "left")]
_BACKWARD = {"loss→top": (1.4, 4.0, 1.4, 3.4, "dL/dlogits", "right"),
             "top→trunk": (2.2, 2.85, 3.9, 2.85, "dL/dh2 (B, T, d)", "below"),
             "trunk→bottom": (3.9, 0.85, 2.2, 0.85, "dL/dh1 (B, T, d)", "below")}
# what a red arrow says: dL/dh2 exists on the client but is not sent; dL/dh1 is never computed
MISSING = {"loss→top": "  ✗ no gradient", "top→trunk": "  ✗ not sent", "trunk→bottom": "  ✗ no gradient"}
_TEXT_AT = {"above": (0, 0.07, "center", "bottom"), "below": (0, -0.07, "center", "top"),
            "left": (-0.08, 0, "right", "center"), "right": (0.08, 0, "left", "center")}


def _figure(ax, size):
    if ax is None:
        ax = Figure(figsize=size).subplots()
    return ax.figure, ax


def _box(ax, part: str):
    x, y, w, h = _BOXES[part]
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.04", facecolor=PART_COLOURS[part], alpha=0.35,
                                edgecolor="black"))
    ax.text(x + w / 2, y + h / 2, _LABELS[part], ha="center", va="center", fontsize=8)


def _arrow(ax, arrow: tuple, style: dict, note: str = ""):
    x0, y0, x1, y1, label, where = arrow
    ax.annotate("", xy=(x1, y1), xytext=(x0, y0), arrowprops=dict(arrowstyle="-|>", lw=1.6, **style))
    dx, dy, ha, va = _TEXT_AT[where]
    ax.text((x0 + x1) / 2 + dx, (y0 + y1) / 2 + dy, label + note, ha=ha, va=va, fontsize=7.5, color=style["color"])


def draw_u_shape(flows: dict | None = None, title: str = "U-shaped split learning", ax=None):
    """The client (Bottom, Top, loss) and the server (Trunk) with the network between them.

    Forward arrows are black. Backward arrows are blue without `flows`; with `flows` (keys
    'loss→top', 'top→trunk', 'trunk→bottom', each True or False as measured) an arrow is green
    where the gradient crossed it and red, broken and marked where it did not (MISSING says how).
    """
    fig, ax = _figure(ax, (7.5, 3.4))
    ax.axvspan(2.5, 3.6, color="tab:purple", alpha=0.08)
    for x, text in ((1.1, "client (your notebook)"), (3.05, "network (ZeroMQ)"), (4.9, "trunk server")):
        ax.text(x, 4.75, text, ha="center", va="bottom", fontsize=8.5, weight="bold")
    for part in _BOXES:
        _box(ax, part)
    for arrow in _FORWARD:
        _arrow(ax, arrow, {"color": "black"})
    for key, arrow in _BACKWARD.items():
        crossed = None if flows is None else bool(flows[key])
        colour = "tab:blue" if crossed is None else "green" if crossed else "red"
        _arrow(ax, arrow, {"color": colour, "linestyle": "--" if crossed is False else "-"},
               MISSING[key] if crossed is False else "")
    ax.set(xlim=(-0.2, 6.1), ylim=(0.2, 5.1))
    ax.set_title(title, fontsize=10)
    ax.axis("off")
    return fig


def draw_message_sequence(messages, title: str = "the messages of one step", ax=None):
    """A sequence diagram: client and server lifelines, one arrow pair per message in `messages`
    (TrunkClient.messages: op, shapes and bytes each way, and the error code of a refused request)."""
    messages = list(messages)
    fig, ax = _figure(ax, (7.5, 0.9 + 0.75 * len(messages)))
    top = len(messages) + 0.5
    for x, name in ((0.0, "client"), (1.0, "trunk server")):
        ax.plot([x, x], [0, top], color="black", lw=1)
        ax.text(x, top + 0.05, name, ha="center", va="bottom", fontsize=9, weight="bold")
    for i, m in enumerate(messages):
        y = top - 0.5 - i
        sent = ", ".join(str(tuple(s)) for s in m["sent"]) or "no tensor"
        back = ", ".join(str(tuple(s)) for s in m["received"]) or "no tensor"
        ax.annotate("", xy=(1.0, y + 0.12), xytext=(0.0, y + 0.12), arrowprops=dict(arrowstyle="-|>", color="black"))
        ax.text(0.5, y + 0.17, f"{m['op']}: {sent}, {m['sent_bytes']:,} B", ha="center", va="bottom", fontsize=7.5)
        refused = m.get("code") is not None
        colour = "red" if refused else "tab:green"
        ax.annotate("", xy=(0.0, y - 0.18), xytext=(1.0, y - 0.18), arrowprops=dict(arrowstyle="-|>", color=colour))
        reply = f"refused: {m['code']}" if refused else f"reply: {back}, {m['received_bytes']:,} B"
        ax.text(0.5, y - 0.23, reply, ha="center", va="top", fontsize=7.5, color=colour)
    ax.set(xlim=(-0.3, 1.3), ylim=(-0.3, top + 0.4), title=title)
    ax.axis("off")
    return fig
