"""The lab: train the modes side by side at cuts of your choice, and watch the loss and each block's LoRA move.

`run_lab(model, tokenizer, LabSettings(...))` is a plain function (tests call it): it uses the class server
($SPLITKIT_TRUNK) if that runs the model at the lab's cuts, else starts a trunk server for the cuts, trains one
learner per mode on the same batches in turns, and calls `on_step` after each round. `lab_widget(model,
tokenizer)` wraps it in ipywidgets with Train and Stop buttons, a progress bar, plots redrawn as it trains, and a
table of what was measured at the end.
"""

import html
import io
import statistics
import threading
from dataclasses import dataclass, field

from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..core import data
from ..core.lora import LoraSpec
from ..core.split import split_model
from ..training.generation import exact_match
from ..training.train import History, Learner, record_step
from ..trunk.server import class_or_own
from .plots import LOSS_LABEL, PART_COLOURS, layer_changes

LINE_COLOURS = {"detach": "tab:red", "full": "tab:purple", "full+trunk": "tab:green"}  # unlike the parts' colours

@dataclass
class LabSettings:
    """What the lab's widgets set."""

    cuts: tuple[int, int] = (10, 20)
    modes: tuple[str, ...] = ("detach", "full")
    lr: float = 3e-3
    r: int = 8
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    batch_size: int = 8
    steps: int = 20
    wire_dtype: str = "float32"
    held_out: int = 4  # facts kept aside: their answers are made up, so a right answer there is a guess
    seed: int | None = 0  # the LoRA's start, the same for every mode and every run (None: a secret one per run)


@dataclass
class LabResult:
    """Per mode: the History of its steps, and exact match on the trained and the held-out facts."""

    settings: LabSettings
    histories: dict = field(default_factory=dict)
    exact_match: dict = field(default_factory=dict)  # mode -> (train, held-out)
    stopped: bool = False
    trunk: str = ""  # which trunk server the run used, and why (splitkit.trunk.server.class_or_own's line)

    def rows(self) -> list[dict]:
        """One row a mode: bytes per step (the client's counters), seconds per step, ΔW of the Bottom, exact match."""
        out = []
        for mode, h in self.histories.items():
            bottom = sum(v for i, v in layer_changes(h).items() if i < self.settings.cuts[0])
            train, held = self.exact_match.get(mode, (None, None))
            out.append({"mode": mode, "steps": len(h.loss), "loss": h.loss[-1] if h.loss else None,
                        "bytes/step": statistics.median(s + r for s, r in zip(h.bytes_sent, h.bytes_received,
                                                                               strict=True)) if h.loss else 0,
                        "s/step": statistics.median(h.seconds) if h.seconds else None,
                        "s/step range": (min(h.seconds), max(h.seconds)) if h.seconds else None,
                        "Bottom ΔW": bottom, "exact match (train)": train, "exact match (held-out)": held})
        return out


def run_lab(model, tokenizer, settings: LabSettings, on_step=None, stop: threading.Event | None = None) -> LabResult:
    """Train every mode of `settings` on the kit's task; call on_step(result) after each round of steps."""
    facts = data.facts()
    held, trained = facts[:settings.held_out], facts[settings.held_out:]
    # one start for every mode: the settings' seed (a run repeats, so that two settings compare), or a secret one
    lora = LoraSpec(r=settings.r, lora_alpha=2 * settings.r, target_modules=tuple(settings.targets),
                    seed=settings.seed).resolved()
    result = LabResult(settings)
    trunk = class_or_own(model, settings.cuts, say=None)  # the class server if it runs these cuts, else one of our own
    result.trunk, address = trunk.line, trunk.address
    learners = {}
    try:
        for mode in settings.modes:
            learners[mode] = Learner(model, mode=mode, cuts=settings.cuts, address=address, lora=lora,
                                     lr=settings.lr, wire_dtype=settings.wire_dtype)
            result.histories[mode] = History(mode, tuple(settings.cuts))
        streams = {mode: data.batches(tokenizer, trained, settings.batch_size, seed=0) for mode in learners}
        for _ in range(settings.steps):
            if stop is not None and stop.is_set():
                result.stopped = True
                break
            for mode, learner in learners.items():
                record_step(result.histories[mode], learner, next(streams[mode]))
            if on_step is not None:
                on_step(result)
        for mode, learner in learners.items():
            result.exact_match[mode] = (exact_match(learner, tokenizer, trained)[0],
                                        exact_match(learner, tokenizer, held)[0] if held else None)
    finally:
        for learner in learners.values():
            learner.close()
        trunk.stop()
    return result


def plot_lab(result: LabResult, n_layers: int) -> bytes:
    """The loss curves (log scale) and, per mode, each block's ΔW on one shared axis, as PNG bytes."""
    modes = list(result.histories)
    fig = Figure(figsize=(9, 2.6 + 1.5 * len(modes)))
    grid = fig.add_gridspec(len(modes), 2, width_ratios=(1, 1.3))
    loss = fig.add_subplot(grid[:, 0])
    for mode, h in result.histories.items():
        loss.plot(range(1, len(h.loss) + 1), h.loss, label=mode, color=LINE_COLOURS.get(mode))
    loss.set(yscale="log", xlabel="step", ylabel=LOSS_LABEL, title="loss (log scale)")
    loss.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    loss.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    loss.legend(fontsize=8)
    a, b = result.settings.cuts
    top = max([max(layer_changes(h).values(), default=0.0) for h in result.histories.values()] + [1e-12])
    for row, (mode, h) in enumerate(result.histories.items()):
        ax = fig.add_subplot(grid[row, 1])
        changes = layer_changes(h)
        colour = {i: PART_COLOURS["bottom" if i < a else "trunk" if i < b else "top"] for i in changes}
        ax.bar(list(changes), list(changes.values()), color=[colour[i] for i in changes])
        ax.set(xlim=(-0.5, n_layers - 0.5), ylim=(0, 1.1 * top), ylabel="Σ ‖ΔW‖",
               title=f"{mode}: each block's LoRA change, Σ ‖(α/r)·B·A‖")
        ax.title.set_fontsize(9)
        if row == len(modes) - 1:
            ax.set_xlabel(f"block (Bottom [0, {a}) · Trunk [{a}, {b}) · Top [{b}, {n_layers}))")
        ax.axvline(a - 0.5, color="black", lw=0.8)
        ax.axvline(b - 0.5, color="black", lw=0.8)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=90)
    return png.getvalue()


def format_rows(result: LabResult) -> str:
    """The end-of-run table as HTML (what the widget shows)."""
    rows = result.rows()
    head = "".join(f"<th>{k}</th>" for k in (rows[0] if rows else {}))
    body = "".join("<tr>" + "".join(f"<td>{_fmt(k, v)}</td>" for k, v in row.items()) + "</tr>" for row in rows)
    note = " (stopped)" if result.stopped else ""
    return (f"<table class='splitkit-lab'><tr>{head}</tr>{body}</table><p>cuts {result.settings.cuts}{note}; "
            f"bytes/step and s/step are medians over the steps, from the client's counters and clock; "
            f"{html.escape(result.trunk, quote=False)}</p>")


def _fmt(key: str, value) -> str:
    if value is None:
        return "—"
    if key.startswith("exact match"):
        return f"{value:.0%}"
    if key == "bytes/step":
        return f"{value / 1e6:.2f} MB"
    if key in ("loss", "s/step"):
        return f"{value:.3f}"
    if key == "s/step range":
        return f"{value[0]:.2f}–{value[1]:.2f}"
    if key == "Bottom ΔW":
        return "0" if value == 0 else f"{value:.4f}"
    return str(value)


def linear_layers(model) -> list[str]:
    """The names of the linear layers in one block of `model`: what LoRA can target."""
    block = split_model(model, (0, 1)).trunk
    return sorted({name.rsplit(".", 1)[-1] for name, m in block.named_modules() if isinstance(m, (nn.Linear, Conv1D))})


def lab_widget(model, tokenizer, settings: LabSettings | None = None):
    """Sliders and menus for LabSettings, Train and Stop buttons, a progress bar, live plots and the final table."""
    import ipywidgets as w

    s = settings or LabSettings()
    n = model.config.num_hidden_layers
    controls = {
        "cuts": w.IntRangeSlider(value=s.cuts, min=0, max=n, description="cuts", continuous_update=False),
        "modes": w.SelectMultiple(options=["detach", "full", "full+trunk"], value=s.modes, description="modes"),
        "lr": w.Dropdown(options=sorted({1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, s.lr}), value=s.lr,
                         description="learning rate"),
        "r": w.IntSlider(value=s.r, min=1, max=64, description="LoRA rank"),
        "targets": w.SelectMultiple(options=linear_layers(model), value=s.targets, description="targets"),
        "batch_size": w.IntSlider(value=s.batch_size, min=1, max=12, description="batch size"),
        "steps": w.IntSlider(value=s.steps, min=1, max=100, description="steps"),
        "wire_dtype": w.Dropdown(options=["float32", "float16", "bfloat16"], value=s.wire_dtype, description="wire"),
    }
    train, stop_button = w.Button(description="Train", button_style="primary"), w.Button(description="Stop")
    progress = w.IntProgress(value=0, min=0, max=s.steps, description="step")
    plot, table = w.Image(format="png"), w.HTML()
    stop = threading.Event()

    def on_step(result):
        progress.value = len(next(iter(result.histories.values())).loss)
        plot.value = plot_lab(result, n)
        table.value = f"<p>training… {html.escape(result.trunk, quote=False)}</p>"  # which server, while it trains

    def run():
        chosen = LabSettings(**{k: tuple(c.value) if k in ("cuts", "modes", "targets") else c.value
                                for k, c in controls.items()})
        progress.max, progress.value, table.value = chosen.steps, 0, "<p>training…</p>"
        try:
            result = run_lab(model, tokenizer, chosen, on_step=on_step, stop=stop)
            plot.value, table.value = plot_lab(result, n), format_rows(result)
        except Exception as e:  # shown in the widget, not lost in a thread
            table.value = f"<p class='splitkit-error'><b>The lab stopped:</b> {type(e).__name__}: {e}</p>"
        finally:
            train.disabled = False

    def start(_):
        if train.disabled or not controls["modes"].value:
            return
        train.disabled = True
        stop.clear()
        threading.Thread(target=run, name="splitkit-lab", daemon=True).start()

    train.on_click(start)
    stop_button.on_click(lambda _: stop.set())
    return w.VBox([*controls.values(), w.HBox([train, stop_button, progress]), plot, table])
