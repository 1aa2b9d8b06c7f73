"""What every benchmark shares: the machine it ran on, medians, tables (servers come from splitkit.testing)."""

import os
import platform
import statistics
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
