"""What every benchmark shares: the machine it ran on, a trunk server in its own process, tables."""

import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch

from splitkit.client import TrunkClient, TrunkError

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`trunk_server.py` in a process of its own, as a class would run it; ready when it answers."""

    def __init__(self, model: str, cuts, *args: str, timeout: float = 300):
        self.address = f"tcp://127.0.0.1:{free_port()}"
        command = [sys.executable, str(ROOT / "trunk_server.py"), "--model", model, "--cuts", *map(str, cuts),
                   "--bind", self.address, "--log-level", "WARNING", *args]
        self.started = time.perf_counter()
        self.process = subprocess.Popen(command)
        self.ready_after = self._wait(timeout)

    def _wait(self, timeout: float) -> float:
        """Seconds from the start of the process to its first answer."""
        deadline = self.started + timeout
        with TrunkClient(self.address, timeout=0.2, retries=0) as probe:
            while time.perf_counter() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"trunk_server.py exited with {self.process.returncode}")
                try:
                    probe.stats()
                    return time.perf_counter() - self.started
                except TrunkError:
                    continue
        self.stop()
        raise RuntimeError(f"trunk_server.py did not answer within {timeout:g} s")

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


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
