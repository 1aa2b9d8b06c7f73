"""A student of tests/test_netns_class.py: one process, in a network namespace of its own, training with Learner.

    python tests/netns_student.py ADDRESS --curve-dir KEYS --steps 40 --seed 1 --out DIR --go FILE [FILE ...]

It loads the tiny model and says {"ready": ...}; then, for each FILE k in turn, it waits for FILE (so that the
test starts every student's run at once), opens a session (a Learner from the same seed each time) and trains,
one JSON line per step ({"run": k, "step", "loss", "s", "t": time.monotonic()}), saves its LoRA to
DIR/k/lora.pt, closes the session and says {"done": k}. With --hang FILE it stops training once FILE exists,
sends one forward whose state the server keeps for a backward that never comes, says {"hanging": ...} and sleeps
(for the test to SIGKILL it). A client that gets no answer says {"unavailable": message, "seconds": ...}, exit 3.

    python tests/netns_student.py ADDRESS --curve-dir KEYS --watch FILE

is the teacher's view instead: the server's `stats`, every 0.2 s, one JSON line each (with "t"), until FILE exists.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from splitkit import Learner, LoraSpec, TrunkClient, TrunkError, TrunkUnavailable, load_model
from splitkit.training.testing import random_batch

CUTS, BATCH, SEQ = (2, 4), 4, 32


def say(**line):
    print(json.dumps(line), flush=True)


def watch(address: str, curve_dir, stop: Path) -> int:
    with TrunkClient(address, timeout=2.0, retries=0, curve_dir=curve_dir) as client:
        while not stop.exists():
            try:
                say(**client.stats(), t=time.monotonic())
            except TrunkError as e:
                say(error=str(e), t=time.monotonic())
            time.sleep(0.2)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("address")
    p.add_argument("--curve-dir")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out")
    p.add_argument("--go", nargs="+", default=[], help="one run for each: wait for the file, then train")
    p.add_argument("--hang", help="once this file exists, hold a forward state on the server and sleep")
    p.add_argument("--timeout", type=float, default=10.0)
    p.add_argument("--retries", type=int, default=1)
    p.add_argument("--watch", help="poll the server's stats until this file exists")
    args = p.parse_args(argv)
    if args.watch:
        return watch(args.address, args.curve_dir, Path(args.watch))
    torch.manual_seed(args.seed)
    model, _ = load_model("tiny-llama")
    say(ready=True)
    for run, go in enumerate(args.go):
        while not Path(go).exists():
            time.sleep(0.02)
        started = time.monotonic()
        try:
            learner = Learner(model, mode="full", cuts=CUTS, address=args.address, curve_dir=args.curve_dir, lr=1e-2,
                              lora=LoraSpec(r=4, lora_alpha=8, init_b=0.02, seed=args.seed), timeout=args.timeout,
                              retries=args.retries)
        except TrunkUnavailable as e:
            say(unavailable=str(e), seconds=time.monotonic() - started)
            return 3
        say(run=run, session=learner.client.session)
        for i in range(args.steps):
            batch = random_batch(model.config.vocab_size, BATCH, SEQ, seed=1000 * args.seed + i)
            if args.hang and Path(args.hang).exists():
                h1 = learner.bottom(batch["input_ids"]).detach()
                learner.client.forward(h1, key=learner.client.new_key())  # the server keeps its graph: no backward
                say(hanging=True, t=time.monotonic())
                time.sleep(3600)
            t = time.monotonic()
            loss = learner.step(batch)
            say(run=run, step=i, loss=loss, s=time.monotonic() - t, t=time.monotonic())
        if args.out:
            (Path(args.out) / str(run)).mkdir(parents=True, exist_ok=True)
            torch.save(learner.lora_state(), Path(args.out) / str(run) / "lora.pt")
        learner.close()
        say(done=run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
