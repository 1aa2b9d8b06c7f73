"""What the server's own Trunk LoRA knows after a `full+trunk` run: the server puts it between the public Bottom and
Top (`splitkit.privacy.replay.trunk_alone`) and asks the client's facts.

For each seed (data order; the LoRA starts are secret) a `full+trunk` client trains on the kit's 16 facts; then the
task's loss and exact match on those facts, and the loss on 16 facts it never saw, for the public model, for the
public model with the server's Trunk LoRA alone, and for the client's whole model.

    python bench/trunk_knows.py      # writes bench/results/privacy-trunk.md
"""

import argparse
from pathlib import Path

import torch

from _common import RESULTS, spread, write_table
from splitkit import Learner, TrunkServer, load_model
from splitkit.core.data import batches, facts
from splitkit.core.models import SMOLLM2
from splitkit.privacy.replay import trunk_alone
from splitkit.training.train import evaluate


def one_run(model, tokenizer, seed: int, args) -> dict:
    server = TrunkServer(model, args.cuts, bind="tcp://127.0.0.1:*")
    pairs, unseen = facts(), facts("animal")
    try:
        with Learner(model, mode="full+trunk", cuts=args.cuts, address=server.start(), lr=args.lr) as learner:
            data = batches(tokenizer, pairs, 8, seed=seed)
            for _ in range(args.steps):
                learner.step(next(data))
            trunk = learner.client.trunk_lora()  # what the server holds: read here through the client's session
            models = {"public model": Learner(model, mode="local", cuts=args.cuts, lora=learner.lora),
                      "public Bottom and Top, the server's Trunk LoRA": trunk_alone(model, args.cuts, learner.lora,
                                                                                     trunk),
                      "the client's whole model": learner}
            out = {}
            for name, m in models.items():
                loss, exact = evaluate(m, tokenizer, pairs)
                out[name] = (loss, exact, evaluate(m, tokenizer, unseen)[0])
            return out
    finally:
        server.stop()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=SMOLLM2)
    p.add_argument("--cuts", nargs=2, type=int, default=(10, 20))
    p.add_argument("--steps", type=int, default=24, help="training steps of 8 facts")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seeds", type=int, default=3, help="runs (data orders 0..seeds-1; the LoRA starts are secret)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model, tokenizer = load_model(args.model)
    runs = [one_run(model, tokenizer, seed, args) for seed in range(args.seeds)]
    rows = [[name, spread([r[name][1] for r in runs], lambda v: f"{v:.0%}"),
             spread([r[name][0] for r in runs], lambda v: f"{v:.2f}"),
             spread([r[name][2] for r in runs], lambda v: f"{v:.2f}")] for name in runs[0]]
    a, b = args.cuts
    write_table("privacy-trunk", "What the server's Trunk LoRA knows of the client's facts", [
        "model", "exact match, the client's 16 facts", "loss on them", "loss on 16 facts never seen"], rows, f"""
{args.model}, cuts ({a}, {b}), `full+trunk`, AdamW at lr {args.lr:g} (the server's Trunk LoRA steps with the same),
{args.steps} steps of 8 of the 16 facts; {args.seeds} runs (data orders 0..{args.seeds - 1}, secret LoRA starts),
median (range). "public Bottom and Top, the server's Trunk LoRA": `splitkit.privacy.replay.trunk_alone`, what the
server can ask on its own after the run; exact match: greedy answers equal to the fact's, as `evaluate` scores them.
""", out=args.out)


if __name__ == "__main__":
    main()
