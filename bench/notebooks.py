"""Wall time of each notebook as nbval runs it in `make test`: a class waits this long for Run All.

    python bench/notebooks.py
"""

import argparse
import subprocess
import sys
import time
from pathlib import Path

from _common import ROOT, write_table

TARGET_S = 15 * 60


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("notebooks", nargs="*", help="default: every notebook in notebooks/")
    p.add_argument("--out", default=None, help="folder for notebooks.md (default: bench/results)")
    args = p.parse_args(argv)

    paths = [Path(n) for n in args.notebooks] or sorted((ROOT / "notebooks").glob("*.ipynb"))
    rows, total = [], 0.0
    for path in paths:
        t0 = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "pytest", "--nbval-lax", str(path), "-q",
                                 "-p", "no:cacheprovider"], cwd=ROOT, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        total += seconds
        outcome = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else f"exit {result.returncode}"
        rows.append([path.name, f"{seconds:.0f}", outcome.strip("= ")])
    rows.append(["**all**", f"**{total:.0f}** ({total / 60:.1f} min)",
                 f"target < {TARGET_S // 60} min {'✓' if total < TARGET_S else '✗'}"])
    notes = """
Each notebook in its own `pytest --nbval-lax` run, kernel start included, on the real model (cached).
"""
    write_table("notebooks", "Notebooks: wall time under nbval", ["notebook", "seconds", "nbval"], rows, notes,
                out=args.out and Path(args.out))


if __name__ == "__main__":
    main()
