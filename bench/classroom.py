"""A whole class on one trunk server: its throughput, and each client's step time, as the class grows.

For each mode and each class size n, n clients (threads of this process, each with its own Learner,
its own session and its own batches) start together against one `trunk_server.py` in a process of
its own, and each trains `--steps` steps. The server serves one request at a time. Reported: the
server's training steps per second (backwards answered over the wall time of the class), its
requests per second, each client's step time (median and 90th percentile over all clients' steps),
and whether client 0's losses are bit for bit those of client 0 training alone (n = 1).

    python bench/classroom.py                           # SmolLM2, cuts (10, 20), 1 2 4 8 16 30 clients
    python bench/classroom.py --clients 1 4 --steps 2
"""

import argparse
import math
import statistics
import threading
import time
from pathlib import Path

from _common import write_table
from splitkit import Learner, LoraSpec, TrunkClient, load_model
from splitkit.core.models import SMOLLM2
from splitkit.training.testing import ServerProcess, random_batch


def parse_size(text: str) -> tuple[int, int]:
    b, _, t = text.lower().partition("x")
    return int(b), int(t)


def one_class(model, address: str, mode: str, n: int, steps: int, cuts, size) -> dict:
    """n clients train `steps` steps each, all at once; their step times, losses, and the server's counters."""
    learners = [Learner(model, mode=mode, cuts=cuts, address=address, lr=1e-3, lora=LoraSpec(seed=i)) for i in range(n)]
    seconds, losses = [[] for _ in range(n)], [[] for _ in range(n)]
    barrier = threading.Barrier(n + 1)

    def client(i):
        barrier.wait()
        for s in range(steps):
            batch = random_batch(model.config.vocab_size, *size, seed=1000 * i + s, prompt=0)
            t0 = time.perf_counter()
            losses[i].append(learners[i].step(batch))
            seconds[i].append(time.perf_counter() - t0)

    with TrunkClient(address) as probe:
        before = probe.stats()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        barrier.wait()
        t0 = time.perf_counter()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        after = probe.stats()
    for learner in learners:
        learner.close()
    backwards = after["answered"].get("backward", 0) - before["answered"].get("backward", 0)
    requests = after["requests"] - before["requests"] - 1  # not the probe's own second stats
    every = sorted(s for client_seconds in seconds for s in client_seconds)
    return {"wall": wall, "backwards": backwards, "requests": requests, "step_median": statistics.median(every),
            "step_p90": every[math.ceil(0.9 * len(every)) - 1],  # nearest rank
            "losses0": losses[0], "rss": after["rss_bytes"]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=SMOLLM2)
    p.add_argument("--cuts", nargs=2, type=int, default=(10, 20))
    p.add_argument("--clients", nargs="+", type=int, default=[1, 2, 4, 8, 16, 30])
    p.add_argument("--modes", nargs="+", default=["full", "full+trunk"])
    p.add_argument("--steps", type=int, default=3, help="training steps per client")
    p.add_argument("--size", type=parse_size, default=(4, 32), metavar="BxT", help="each client's batch (4x32)")
    p.add_argument("--out", default=None, help="folder for classroom.md (default: bench/results)")
    args = p.parse_args(argv)

    model, _ = load_model(args.model)
    rows = []
    # fixed seeds, the clients' and the server's for the Trunk LoRA: client 0 starts alike in every class
    with ServerProcess(args.model, args.cuts, "--max-sessions", str(max(args.clients) + 1),
                       "--lora-seed", "0") as server:
        for mode in args.modes:
            alone = None
            for n in args.clients:
                r = one_class(model, server.address, mode, n, args.steps, args.cuts, args.size)
                alone = alone or r["losses0"]
                assert r["backwards"] == n * args.steps, (mode, n, r["backwards"])
                rows.append([mode, n, f"{r['backwards'] / r['wall']:.2f}", f"{r['requests'] / r['wall']:.1f}",
                             f"{1000 * r['step_median']:.0f}", f"{1000 * r['step_p90']:.0f}",
                             f"{r['wall']:.1f}", "yes" if r["losses0"] == alone else "NO",
                             f"{r['rss'] / 2 ** 20:.0f}"])
                print(rows[-1], flush=True)
    b, t = args.size
    notes = f"""
{args.model}, cuts {tuple(args.cuts)}; each client a thread of this process with its own Learner (Bottom and Top
with LoRA, AdamW), {args.steps} steps of its own random {b}×{t} batches; one `trunk_server.py` in a process of its
own on loopback, serving one request at a time, every client in the same run against it. "steps / s" is the
server's: backwards answered (one per client step) over the wall time from the common start to the last client's
end; "requests / s" likewise. A client's step time includes waiting for the server while it serves the others.
"client 0 = alone": client 0's losses in that run are bit for bit its losses when it trained alone (n = 1).
"server MiB": the server process's resident memory after the run (the same process for all of them).
"""
    write_table("classroom", "A class on one trunk server: throughput and step time by class size",
                ["mode", "clients", "steps / s", "requests / s", "step ms, median", "step ms, p90", "wall s",
                 "client 0 = alone", "server MiB"], rows, notes, out=args.out and Path(args.out))


if __name__ == "__main__":
    main()
