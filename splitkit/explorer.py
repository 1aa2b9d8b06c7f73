"""The split-point explorer: what moving the two cuts changes, as numbers, a plot and a widget.

`explore(model, cuts)` is a plain function (tests call it); `explorer_widget(model)` wraps it
in an ipywidgets IntRangeSlider and redraws a table and a bar chart on every move.
"""

import io
import threading

import torch
from matplotlib.figure import Figure

from .lora import LoraSpec
from .server import TrunkServer
from .split import check_cuts, count_parameters, split_model
from .testing import max_rel_diff, reference_grads
from .train import Learner


def explore(model, cuts, batch_size: int = 8, seq_len: int = 64, lora: LoraSpec | None = None,
            gradient_check: bool = True) -> dict:
    """Parameters, compute, bytes per step and trainable LoRA per side for one pair of cuts.

    With gradient_check, one full-mode step over a real trunk server is compared with the
    unsplit model: `grad_rel_diff` is the largest relative difference over all LoRA gradients.
    """
    lora = lora or LoraSpec(init_b=0.02)
    n = model.config.num_hidden_layers
    a, b = check_cuts(cuts, n)
    bottom, trunk, top = split_model(model, (a, b))
    client_params = count_parameters(torch.nn.ModuleList([bottom, top]))[0]
    server_params = count_parameters(trunk)[0]
    block_params = count_parameters(trunk)[0] / (b - a)
    lora_per_block = _lora_params_per_block(model, lora)
    hidden = batch_size * seq_len * model.config.hidden_size * 4  # one float32 (B, T, d) tensor
    out = {
        "cuts": (a, b),
        "blocks": {"bottom": a, "trunk": b - a, "top": n - b},
        "params": {"client": client_params, "server": server_params},
        # per token a block costs ~2 FLOPs per weight forward; the LM head is the client's
        "compute_share_server": (b - a) * block_params / (n * block_params + model.lm_head.weight.numel()),
        "bytes_per_step": {"detach": 2 * hidden, "full": 4 * hidden, "full+trunk": 4 * hidden},
        "trainable": {"bottom": a * lora_per_block, "trunk": (b - a) * lora_per_block, "top": (n - b) * lora_per_block},
    }
    if gradient_check:
        out["grad_rel_diff"] = gradient_check_full(model, (a, b), lora)
    return out


def _lora_params_per_block(model, lora: LoraSpec) -> int:
    block = split_model(model, (0, 1)).trunk
    wanted = set(lora.targets(model.config))
    return sum(lora.r * sum(m.weight.shape) for name, m in block.named_modules()  # A: (r, in), B: (out, r)
               if name.rsplit(".", 1)[-1] in wanted)


def gradient_check_full(model, cuts, lora: LoraSpec, tokens: int = 8) -> float:
    """Largest relative difference between split (full mode, real socket) and unsplit LoRA gradients."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, min(model.config.vocab_size, 2000), (1, tokens), generator=g)
    batch = {"input_ids": ids, "labels": ids}
    server = TrunkServer(model, cuts, bind="tcp://127.0.0.1:*")
    try:
        with Learner(model, mode="full", cuts=cuts, address=server.start(), lora=lora) as learner:
            learner.forward_backward(batch)
            got = learner.lora_grads()
    finally:
        server.stop()
    return max_rel_diff(got, reference_grads(model, cuts, lora, batch, train_trunk=False))


def plot_explore(result: dict, ax=None):
    """Bars: blocks, parameters and trainable LoRA parameters on each side."""
    if ax is None:  # a Figure of its own, outside pyplot's global state, as the widget's callback needs
        fig = Figure(figsize=(9, 2.6))
        axes = fig.subplots(1, 3)
    else:
        fig, axes = ax[0].figure, ax
    colours = {"bottom": "tab:blue", "trunk": "tab:grey", "top": "tab:orange",
               "client": "tab:blue", "server": "tab:grey"}
    for ax_, (title, values, scale) in zip(axes, [("blocks", result["blocks"], 1),
                                                  ("parameters (M)", result["params"], 1e6),
                                                  ("trainable LoRA (k)", result["trainable"], 1e3)], strict=True):
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


def format_explore(result: dict) -> str:
    """The numbers as an HTML table (what the widget shows)."""
    rows = [("blocks (bottom / trunk / top)", " / ".join(str(v) for v in result["blocks"].values())),
            ("parameters on the client", f"{result['params']['client'] / 1e6:.1f} M"),
            ("parameters on the server", f"{result['params']['server'] / 1e6:.1f} M"),
            ("share of the compute on the server", f"{result['compute_share_server']:.0%}"),
            ("bytes per step, detach", f"{result['bytes_per_step']['detach'] / 1e6:.2f} MB"),
            ("bytes per step, full", f"{result['bytes_per_step']['full'] / 1e6:.2f} MB"),
            ("trainable LoRA, client (full)", f"{(result['trainable']['bottom'] + result['trainable']['top']):,}"),
            ("trainable LoRA, server (full+trunk)", f"{result['trainable']['trunk']:,}")]
    if "grad_rel_diff" in result:
        rows.append(("gradient check vs unsplit (max rel. diff)", f"{result['grad_rel_diff']:.1e}"))
    body = "".join(f"<tr><td style='text-align:left'>{k}</td><td class='value' style='text-align:right'>{v}</td></tr>"
                   for k, v in rows)
    return f"<table class='splitkit-explore'>{body}</table>"


def explorer_widget(model, cuts=(10, 20), **options):
    """An IntRangeSlider for the two cuts, with the table and the plot it updates."""
    import ipywidgets as widgets
    from IPython.display import HTML, Image, display

    n = model.config.num_hidden_layers
    slider = widgets.IntRangeSlider(value=cuts, min=0, max=n, step=1, description="cuts",
                                    continuous_update=False, layout=widgets.Layout(width="500px"))
    out = widgets.Output()
    busy = threading.Lock()  # one redraw at a time, however fast the slider moves

    def update(change=None):
        with busy, out:
            out.clear_output(wait=True)
            try:
                result = explore(model, slider.value, **options)
            except ValueError as e:
                display(HTML(f"<p class='splitkit-error'><b>These cuts do not work:</b> {e}</p>"))
                return
            display(HTML(format_explore(result)), Image(plot_png(result)))

    slider.observe(update, names="value")
    update()
    return widgets.VBox([slider, out])
