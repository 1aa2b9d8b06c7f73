"""What one LoRA training step costs through the split, against the same step on the unsplit model.

Every variant trains its own copy of the model, on the same batches, in turns (the order rotates
each round), so that a busy machine slows them all alike; each time is the median of several
steps after warm-up. The trunk servers run `trunk_server.py` in processes of their own, reached
over ZeroMQ on loopback, as in a class.

    python bench/step.py                       # SmolLM2, cuts (10, 20), sizes 4x32 8x64 8x128
    python bench/step.py --sizes 8x64 --reps 9
    python bench/step.py --server-device cuda  # the Trunk on a GPU
"""

import argparse
from pathlib import Path

from _common import in_turns, median_ms, ratio, timed_step, write_table
from splitkit import Learner, LoraSpec, load_model
from splitkit.core.models import SMOLLM2
from splitkit.training.testing import ServerProcess, random_batch

# (name, mode, which server, the unsplit variant it is measured against, target ratio)
VARIANTS = [
    ("unsplit", None, None, None, None),
    ("detach", "detach", "server", "unsplit", None),
    ("full", "full", "server", "unsplit", 1.03),
    ("full, stateless fallback", "full", "fallback", "unsplit", 1.20),
    ("unsplit, LoRA on every block", "local", None, None, None),
    ("full+trunk", "full+trunk", "server", "unsplit, LoRA on every block", None),
]


def parse_size(text: str) -> tuple[int, int]:
    b, _, t = text.lower().partition("x")
    return int(b), int(t)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=SMOLLM2)
    p.add_argument("--cuts", nargs=2, type=int, default=(10, 20))
    p.add_argument("--sizes", nargs="+", type=parse_size, default=[(4, 32), (8, 64), (8, 128)],
                   metavar="BxT", help="batch x tokens (default: 4x32 8x64 8x128)")
    p.add_argument("--warmup", type=int, default=2, help="steps per variant before timing")
    p.add_argument("--reps", type=int, default=5, help="timed steps per variant and size")
    p.add_argument("--server-device", default="cpu", help="where the trunk servers run the Trunk")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--out", default=None, help="folder for step.md (default: bench/results)")
    args = p.parse_args(argv)

    model, _ = load_model(args.model)
    vocab, lora = model.config.vocab_size, LoraSpec().resolved()  # one start, a secret one, for every variant
    device = ["--device", args.server_device]
    with ServerProcess(args.model, args.cuts, *device) as server, \
            ServerProcess(args.model, args.cuts, *device, "--keep-states", "0") as fallback:
        addresses = {"server": server.address, "fallback": fallback.address}
        rows, recomputed = [], {"server": 0, "fallback": 0}
        for batch_size, seq in args.sizes:
            learners = {}  # fresh for each size: every variant starts from the same weights
            for name, mode, where, _, _ in VARIANTS:
                # "unsplit": LoRA on the same blocks as the client's parts, what `full` must match
                learners[name] = Learner(model, mode=mode or "local", cuts=args.cuts, address=addresses.get(where),
                                         lora=lora, lr=args.lr, train_trunk=name != "unsplit")
            seconds = {name: [] for name in learners}
            first_loss, wire_bytes = {}, {}
            for i in range(args.warmup + args.reps):
                batch = random_batch(vocab, batch_size, seq, seed=i, prompt=0)
                for name in in_turns(learners, i):
                    loss, took, wire_bytes[name] = timed_step(learners[name], batch)
                    if i >= args.warmup:
                        seconds[name].append(took)
                    first_loss.setdefault(name, loss)
            for name, _, _, baseline, target in VARIANTS:
                ms = median_ms(seconds[name])
                vs = f"{ratio(ms / median_ms(seconds[baseline]), target)} {baseline}" if baseline else "—"
                spread = 1000 * (max(seconds[name]) - min(seconds[name]))
                rows.append([f"{batch_size}×{seq}", name, f"{ms:.0f}", f"{spread:.0f}", vs,
                             f"{wire_bytes[name] / 1e6:.2f}", f"{first_loss[name]:.4f}"])
            for where, name in (("server", "full"), ("fallback", "full, stateless fallback")):
                recomputed[where] = learners[name].client.stats()["recomputed"]
            for learner in learners.values():
                learner.close()
            del learners

    a, b = args.cuts
    notes = f"""
{args.model}, cuts ({a}, {b}): the client runs blocks [0, {a}) and [{b}, {model.config.num_hidden_layers}), the trunk
servers blocks [{a}, {b}) on {args.server_device}, each in a process of its own on loopback. LoRA r={lora.r} on
{', '.join(lora.targets(model.config))}, AdamW. Median of {args.reps} steps after {args.warmup} of warm-up, per variant
and size, the variants in turns; "spread" is the slowest minus the fastest of them. A ratio is against the
unsplit model with LoRA on the same blocks; ✓/✗ marks a target (full ≤ 1.03×, stateless fallback
≤ 1.20×). "loss at step 1" is the same for every variant: the split changes no arithmetic.
The fallback server recomputed {recomputed['fallback']} forwards; the stateful one {recomputed['server']}.
"""
    write_table("step", "Training step: split against unsplit",
                ["batch×tokens", "variant", "ms / step", "spread ms", "ratio", "MB on the wire / step",
                 "loss at step 1"], rows, notes, out=args.out and Path(args.out))


if __name__ == "__main__":
    main()
