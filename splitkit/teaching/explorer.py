"""The split-point explorer: what moving the two cuts changes, as numbers, a plot and a widget.

`explore(model, cuts)` is a plain function (tests call it); `explorer_widget(model)` wraps it
in an ipywidgets IntRangeSlider and redraws a table and a bar chart on every move. The bytes
per step are measured: one step of each split mode against a trunk server in a thread.
"""

import io
import math
import threading

import torch
from matplotlib.figure import Figure

from ..core.lora import LoraSpec
from ..core.split import check_cuts, count_parameters, split_model
from ..training.testing import max_rel_diff, random_batch, reference_grads
from ..training.train import Learner
from ..trunk.server import TrunkServer
from ..wire.protocol import DETACH, FULL, FULL_TRUNK, SERVER_MODES, STEP

NOTHING_TO_COMPARE = "nothing to compare"  # the gradient check's answer when the client has no LoRA


def explore(model, cuts, batch_size: int = 2, seq_len: int = 16, lora: LoraSpec | None = None,
            gradient_check: bool = True) -> dict:
    """Blocks, parameters, compute share, measured bytes per step and trainable LoRA per side for one pair of cuts.

    One training step of each mode runs on a random batch of batch_size x seq_len tokens against a
    trunk server in a thread; its bytes come from the client's counters. With gradient_check, the
    client's LoRA gradients of the `full` step are compared with the unsplit model's: `grad_rel_diff`
    is the largest relative difference, or None when the client has no LoRA (cuts (0, n)).
    """
    lora = lora or LoraSpec(init_b=0.02, seed=0)  # fixed, as the server's below: the bytes repeat to the byte (a
    # full+trunk step reply's header holds the Trunk LoRA's change norms, whose digits follow the start)
    n = model.config.num_hidden_layers
    a, b = check_cuts(cuts, n)
    bottom, trunk, top = split_model(model, (a, b))
    block_params = count_parameters(trunk)[0] / (b - a)
    measured = measure_steps(model, (a, b), lora, batch_size, seq_len, gradient_check)
    out = {
        "cuts": (a, b),
        "blocks": {"bottom": a, "trunk": b - a, "top": n - b},
        "params": {"client": count_parameters(torch.nn.ModuleList([bottom, top]))[0],  # the tied table once
                   "server": count_parameters(trunk)[0]},
        # an estimate: per token a block costs ~2 FLOPs per weight; the LM head is the client's
        "compute_share_server": (b - a) * block_params / (n * block_params + model.lm_head.weight.numel()),
        "batch": (batch_size, seq_len),
        "bytes_per_step": measured["bytes"],
        "tensors_per_step": measured["tensors"],
        "trainable": measured["trainable"],
    }
    if gradient_check:
        out["grad_rel_diff"] = measured["grad_rel_diff"]
    return out


def measure_steps(model, cuts, lora: LoraSpec, batch_size: int, seq_len: int, gradient_check: bool) -> dict:
    """One step of each split mode against a trunk server in a thread, measured by the client.

    Returns {"bytes": {mode: bytes sent + received}, "tensors": {mode: (B, T, d) tensors that crossed},
    "trainable": {part: LoRA parameters}, "grad_rel_diff": float | None (with gradient_check)}.
    """
    lora = lora.resolved()  # one start for the split run and its unsplit reference
    batch = random_batch(model.config.vocab_size, batch_size, seq_len, seed=0)
    hidden = [batch_size, seq_len, model.config.hidden_size]  # the shape of h1, h2, dL/dh2, dL/dh1
    out = {"bytes": {}, "tensors": {}, "trainable": {}}
    server = TrunkServer(model, cuts, bind="tcp://127.0.0.1:*", lora_seed=0)
    try:
        address = server.start()
        for mode in SERVER_MODES:
            with Learner(model, mode=mode, cuts=cuts, address=address, lora=lora) as learner:
                client, seen = learner.client, len(learner.client.messages)
                before = client.bytes_sent + client.bytes_received
                learner.step(batch)
                out["bytes"][mode] = client.bytes_sent + client.bytes_received - before
                messages = list(client.messages)[seen:]
                out["tensors"][mode] = sum(shape == hidden for m in messages for shape in m["sent"] + m["received"])
                if mode == FULL:
                    out["trainable"]["bottom"] = count_parameters(learner.bottom)[1]
                    out["trainable"]["top"] = count_parameters(learner.top)[1]
                    grads = learner.lora_grads()  # {name: gradient or None}: a None is a gradient that never came
                if mode == FULL_TRUNK:  # the step reply carries the whole Trunk LoRA
                    out["trainable"]["trunk"] = sum(torch.Size(s).numel() for m in messages if m["op"] == STEP
                                                    for s in m["received"])
    finally:
        server.stop()
    out["trainable"] = {part: out["trainable"][part] for part in ("bottom", "trunk", "top")}
    if gradient_check:
        out["grad_rel_diff"] = gradient_check_of(grads, reference_grads(model, cuts, lora, batch, train_trunk=False))
    return out


def gradient_check_of(got: dict, want: dict) -> float | None:
    """The largest relative difference of the split's LoRA gradients to the unsplit model's.

    None when there is nothing to compare (no LoRA on the client); infinity when a gradient the unsplit
    model has is missing in the split (None, as in the simplified version) or the two name other tensors.
    """
    if not want and not got:
        return None
    if got.keys() != want.keys() or any(g is None for g in got.values()):
        return math.inf
    return max_rel_diff(got, want)


def plot_explore(result: dict, ax=None):
    """Bars: blocks, parameters and trainable LoRA parameters on each side, and the measured bytes per step."""
    if ax is None:  # a Figure of its own, outside pyplot's global state, as the widget's callback needs
        fig = Figure(figsize=(12, 2.6))
        axes = fig.subplots(1, 4)
    else:
        fig, axes = ax[0].figure, ax
    colours = {"bottom": "tab:blue", "trunk": "tab:grey", "top": "tab:orange", "client": "tab:blue",
               "server": "tab:grey", DETACH: "tab:red", FULL: "tab:blue", FULL_TRUNK: "tab:green"}
    B, T = result["batch"]
    panels = [("blocks", result["blocks"], 1), ("parameters (M)", result["params"], 1e6),
              ("trainable LoRA (k)", result["trainable"], 1e3),
              (f"kB per step, batch {B}×{T} (measured)", result["bytes_per_step"], 1e3)]
    for ax_, (title, values, scale) in zip(axes, panels, strict=True):
        ax_.bar(list(values), [v / scale for v in values.values()], color=[colours[k] for k in values])
        ax_.set_title(title, fontsize=10)
    fig.suptitle(f"cuts = {result['cuts']}", fontsize=10)
    fig.tight_layout()
    return fig


def plot_png(result: dict) -> bytes:
    """plot_explore as PNG bytes: what the widget shows, drawn without pyplot or the inline backend."""
    png = io.BytesIO()
    plot_explore(result).savefig(png, format="png", dpi=100, bbox_inches="tight")
    return png.getvalue()


def format_grad_check(value) -> str:
    if value is None:
        return NOTHING_TO_COMPARE
    return "gradients missing" if math.isinf(value) else f"{value:.1e}"


def format_explore(result: dict) -> str:
    """The numbers as an HTML table (what the widget shows)."""
    B, T = result["batch"]
    kb = {mode: f"{result['bytes_per_step'][mode] / 1e3:,.1f} kB" for mode in SERVER_MODES}
    tensors = result["tensors_per_step"]
    rows = [("blocks (bottom / trunk / top)", " / ".join(str(v) for v in result["blocks"].values())),
            ("parameters on the client", f"{result['params']['client'] / 1e6:.1f} M"),
            ("parameters on the server", f"{result['params']['server'] / 1e6:.1f} M"),
            ("share of the compute on the server (estimated from the weights)",
             f"{result['compute_share_server']:.0%}"),
            (f"measured bytes per step, batch {B} × {T} tokens: detach / full / full+trunk",
             f"{kb[DETACH]} / {kb[FULL]} / {kb[FULL_TRUNK]}"),
            ("(B, T, d) tensors on the wire per step: detach / full / full+trunk",
             f"{tensors[DETACH]} / {tensors[FULL]} / {tensors[FULL_TRUNK]}"),
            ("trainable LoRA, client (full)", f"{(result['trainable']['bottom'] + result['trainable']['top']):,}"),
            ("trainable LoRA, server (full+trunk)", f"{result['trainable']['trunk']:,}")]
    if "grad_rel_diff" in result:
        rows.append(("gradient check vs unsplit (max rel. diff)", format_grad_check(result["grad_rel_diff"])))
    body = "".join(f"<tr><td style='text-align:left'>{k}</td><td class='value' style='text-align:right'>{v}</td></tr>"
                   for k, v in rows)
    return f"<table class='splitkit-explore'>{body}</table>"


def explorer_widget(model, cuts=(10, 20), result: dict | None = None, **options):
    """An IntRangeSlider for the two cuts, with the table and the plot it updates.

    `result` is explore()'s answer for `cuts` if it was computed already; it is drawn at once. Each
    cut measured is kept, so that moving back to it redraws at once too.
    """
    import ipywidgets as widgets
    from IPython.display import HTML, Image, display

    n = model.config.num_hidden_layers
    slider = widgets.IntRangeSlider(value=cuts, min=0, max=n, step=1, description="cuts",
                                    continuous_update=False, layout=widgets.Layout(width="500px"))
    out = widgets.Output()
    busy = threading.Lock()  # one redraw at a time, however fast the slider moves
    known = {} if result is None else {tuple(result["cuts"]): result}  # cuts -> explore()'s answer

    def update(change=None):
        with busy, out:
            out.clear_output(wait=True)
            cuts = tuple(slider.value)
            try:
                if cuts not in known:
                    known[cuts] = explore(model, cuts, **options)
            except ValueError as e:
                display(HTML(f"<p class='splitkit-error'><b>These cuts do not work:</b> {e}</p>"))
                return
            display(HTML(format_explore(known[cuts])), Image(plot_png(known[cuts])))

    slider.observe(update, names="value")
    update()
    return widgets.VBox([slider, out])
