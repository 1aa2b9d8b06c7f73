"""What every benchmark shares: the machine it ran on, medians, tables (servers come from splitkit.training.testing)."""

import os
import platform
import statistics
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"
    return (f"{os.cpu_count()} CPU cores ({cpu}){gpu}, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}, torch {torch.__version__} with {torch.get_num_threads()} threads")


def median_ms(seconds) -> float:
    return 1000 * statistics.median(seconds)


def write_table(name: str, title: str, columns, rows, notes: str = "", out: Path | None = None) -> Path:
    """Print a Markdown table and write it, with the machine and the date, to bench/results/NAME.md."""
    lines = [f"### {title}", "", f"{date.today().isoformat()}, {machine()}.", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    if notes:
        lines += ["", notes.strip()]
    text = "\n".join(lines) + "\n"
    print(text)
    out = out or RESULTS
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.md"
    path.write_text(text)
    return path


def ratio(value: float, target: float | None = None) -> str:
    """'1.01×', with ✓ or ✗ when there is a target."""
    mark = "" if target is None else (" ✓" if value <= target else " ✗")
    return f"{value:.2f}×{mark}"


def in_turns(names, i: int) -> list:
    """`names` rotated by `i`, so that over the runs every variant takes every place in the order."""
    names = list(names)
    return names[i % len(names):] + names[:i % len(names)]


def timed_step(learner, batch) -> tuple[float, float, int]:
    """(loss, seconds, bytes sent + received) of one training step."""
    before, t0 = bytes_so_far(learner), time.perf_counter()
    loss = learner.step(batch)
    return loss, time.perf_counter() - t0, bytes_so_far(learner) - before


def bytes_so_far(learner) -> int:
    """Bytes the learner's client has sent and received so far (0 for the unsplit model)."""
    return learner.client.bytes_sent + learner.client.bytes_received if learner.client else 0


def spread(values, fmt) -> str:
    """The median of `values` as `fmt` writes it, and their range in brackets when they differ: "0.33 (0.30–0.35)"."""
    text = fmt(statistics.median(values))
    return text if min(values) == max(values) else f"{text} ({fmt(min(values))}–{fmt(max(values))})"
