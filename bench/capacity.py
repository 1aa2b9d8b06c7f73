"""What one trunk server sustains for a class, the server alone: students as replay clients.

A student here is a replay client: it sends what a real client sends, with random tensors of the right shapes (no
Bottom, no Top), so that its own compute is small and the figure is the server's (in a class every student computes
on their own machine). `trunk_server.py` runs in a process of its own on loopback, once serving one request at a time
and once with `--batch-window-ms` (requests of different students that wait together go through the Trunk as one
batch). For each class size n: the same work done by the n students one after another ("serial", what a server that
never overlaps students gives) and by all n at once ("together").

  generation: a prompt of --prompt tokens (start 0), then --new one-token steps, per student;
  training:   --steps steps of a forward (kept for its backward) and backward of --rows × --tokens tokens, in
              `full` and in `full+trunk` (with the step of the student's Trunk LoRA).

    python bench/capacity.py                       # SmolLM2, cuts (10, 20), classes of 1 2 4 8
    python bench/capacity.py --pin                 # the server on a core of its own (capacity-pinned.md)
    python bench/capacity.py --pin --rows 8 --tokens 24 --work training "training full+trunk"  # 04's batch size
"""

import argparse
import multiprocessing
import os
import time
from functools import partial
from pathlib import Path

import torch

from _common import write_table
from splitkit import LoraSpec, TrunkClient, load_model
from splitkit.core.models import SMOLLM2
from splitkit.training.testing import ServerProcess
from splitkit.wire import protocol as P


def connected(model, address: str, args, mode: str) -> TrunkClient:
    """A student's client with its session open (the handshake is not part of what is timed)."""
    c = TrunkClient(address, timeout=120)
    c.hello(model, args.cuts, mode=mode, **({"lora": LoraSpec(r=8, lora_alpha=16), "lr": 1e-3}
                                            if mode == P.FULL_TRUNK else {}))
    return c


def generation(c: TrunkClient, d: int, args, seed: int) -> int:
    """One student's generation, replayed; the tokens made."""
    g = torch.Generator().manual_seed(seed)
    gen = c.new_generation()
    c.infer(torch.randn(1, args.prompt, d, generator=g), gen, 0, pad=[0])
    for t in range(args.new):
        c.infer(torch.randn(1, 1, d, generator=g), gen, args.prompt + t)
    c.release(gen)
    return args.new


def training(c: TrunkClient, d: int, args, seed: int, trunk_lora: bool = False) -> int:
    """One student's training steps, replayed (in full+trunk with the step of the Trunk LoRA); the steps made."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(args.steps):
        key = c.new_key()
        c.forward(torch.randn(args.rows, args.tokens, d, generator=g), key=key)
        c.backward(torch.randn(args.rows, args.tokens, d, generator=g) * 1e-3, key=key)
        if trunk_lora:
            c.step()
    return args.steps


WORK = {"generation": (generation, P.FULL), "training": (training, P.FULL),
        "training full+trunk": (partial(training, trunk_lora=True), P.FULL_TRUNK)}


def student(name, model, address: str, args, i: int, go, results):
    """A student in a process of its own (as on a machine of its own: no lock shared with the others)."""
    torch.set_num_threads(1)
    if args.pin:
        os.sched_setaffinity(0, args.client_cores)
    work, mode = WORK[name]
    with connected(model, address, args, mode) as c:
        go.wait()
        results.put(work(c, model.config.hidden_size, args, i))


def rate(name, model, address: str, args, n: int, together: bool) -> float:
    """Units of work (tokens or steps) per second for n students, at once or one after another."""
    if not together:
        work, mode = WORK[name]
        clients = [connected(model, address, args, mode) for _ in range(n)]
        t0 = time.perf_counter()
        done = sum(work(c, model.config.hidden_size, args, i) for i, c in enumerate(clients))
        took = time.perf_counter() - t0
        for c in clients:
            c.close()
        return done / took
    fork = multiprocessing.get_context("fork")
    go, results = fork.Barrier(n + 1), fork.Queue()
    students = [fork.Process(target=student, args=(name, model, address, args, i, go, results)) for i in range(n)]
    for s in students:
        s.start()
    go.wait()
    t0 = time.perf_counter()
    done = sum(results.get() for _ in range(n))
    took = time.perf_counter() - t0
    for s in students:
        s.join()
    return done / took


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=SMOLLM2)
    p.add_argument("--cuts", nargs=2, type=int, default=(10, 20))
    p.add_argument("--classes", nargs="+", type=int, default=[1, 2, 4, 8])
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--work", nargs="+", choices=list(WORK), default=list(WORK))
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--rows", type=int, default=1, help="rows of a training step (its file is named by the size "
                   "unless it is 1 x 16)")
    p.add_argument("--window", type=float, default=2.0, help="the batching server's --batch-window-ms")
    p.add_argument("--server-device", default="cpu")
    p.add_argument("--pin", action="store_true", help="the server on core 0 with one thread, the students on the "
                   "others (taskset): the server's core its own, as on a machine of its own")
    p.add_argument("--out", default=None, help="folder for capacity.md (default: bench/results)")
    args = p.parse_args(argv)

    model, _ = load_model(args.model)
    rows, prefix = [], ()
    if args.pin:
        args.client_cores = set(range(1, os.cpu_count()))
        os.sched_setaffinity(0, args.client_cores)  # this process: the serial students
        os.environ["OMP_NUM_THREADS"] = "1"  # read by the server process when it loads torch
        prefix = ("taskset", "-c", "0")
    for batching in (False, True):
        flags = ["--device", args.server_device, "--max-sessions", str(2 * max(args.classes) + 2)]
        flags += ["--batch-window-ms", str(args.window)] if batching else []
        with ServerProcess(args.model, args.cuts, *flags, prefix=prefix) as server:
            rate("generation", model, server.address, args, 1, together=False)  # warm-up
            for name in args.work:
                unit = "tokens / s" if name == "generation" else "steps / s"
                for n in args.classes:
                    serial = rate(name, model, server.address, args, n, together=False)
                    together = rate(name, model, server.address, args, n, together=True)
                    rows.append([name, f"{args.window:g} ms" if batching else "off", n, unit, f"{serial:.1f}",
                                 f"{together:.1f}", f"{together / serial:.2f}×"])
                    print(rows[-1], flush=True)
    where = ("the server pinned to core 0 with one thread (the line above is this process's), the students to the "
             "other cores" if args.pin else "server and students sharing every core")
    notes = f"""
{args.model}, cuts {tuple(args.cuts)}, Trunk on {args.server_device}; `trunk_server.py` in its own process on loopback
(its OpenMP threads passive, as it sets them); {where}. The students are replay clients (random tensors of the
right shapes, no model of their own): "together", each in a process of its own; "serial", one after another in one
process. Generation: a prompt of {args.prompt} tokens, then {args.new} one-token steps per student; training:
{args.steps} steps of {args.rows} × {args.tokens} tokens per student (a forward kept for its backward, the backward,
and in `full+trunk` the step of the student's own Trunk LoRA, r = 8); each student's handshake is made before the
clock starts. Batching (`--batch-window-ms {args.window:g}`) joins the one-token generation steps, the kept forwards
and the backwards of different students that wait together, and waits for more only while other students' next
requests are due, until each has sent. One run of each (no repeats): a figure moves by about a tenth from run to run.
"""
    size = "" if (args.rows, args.tokens) == (1, 16) else f"-{args.rows}x{args.tokens}"  # a training step's size
    write_table(("capacity-pinned" if args.pin else "capacity") + size,
                "One trunk server for a class, the server alone: throughput by class size",
                ["work", "batching", "students", "unit", "serial", "together", "together / serial"], rows, notes,
                out=args.out and Path(args.out))


if __name__ == "__main__":
    main()
