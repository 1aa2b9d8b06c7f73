"""float16, bfloat16 and 8-bit blockwise on the wire against float32: bytes, time, gradients and the loss curve.

The client casts (or quantises) h1 and dL/dh2 to the wire dtype, the server reads them back as
float32 to compute and answers in the dtype it was sent. Four `full` learners, one per wire dtype, share a trunk
server process and start from the same weights:
- gradients: the LoRA gradients of one batch, against float32's;
- time and bytes: steps at batch x tokens, in turns, median after warm-up;
- loss curve: the kit's task trained for some steps, the same batches for each.

    python bench/compression.py
"""

import argparse
from pathlib import Path

from _common import in_turns, median_ms, timed_step, write_table
from splitkit import Learner, LoraSpec, load_model, wire
from splitkit.core.data import batches, facts
from splitkit.core.models import SMOLLM2
from splitkit.training.testing import ServerProcess, max_rel_diff, random_batch
from step import parse_size

DTYPES = wire.WIRE_DTYPES  # float32, float16, bfloat16, blockwise8


def gradients(learner, batch) -> dict:
    learner.zero_grad()
    learner.forward_backward(batch)
    return learner.lora_grads()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=SMOLLM2)
    p.add_argument("--cuts", nargs=2, type=int, default=(10, 20))
    p.add_argument("--size", type=parse_size, default=(8, 64), metavar="BxT")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--steps", type=int, default=30, help="training steps for the loss curve")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--out", default=None, help="folder for compression.md (default: bench/results)")
    args = p.parse_args(argv)

    model, tokenizer = load_model(args.model)
    with ServerProcess(args.model, args.cuts) as server:
        start = LoraSpec().resolved()  # one start, a secret one, for every dtype
        learners = {d: Learner(model, mode="full", cuts=args.cuts, address=server.address, lr=args.lr, wire_dtype=d,
                               lora=start) for d in DTYPES}
        # 1. gradients of one batch (nothing has trained yet, so all four hold the same weights)
        batch = next(batches(tokenizer, facts(), 8, seed=123))
        grads = {d: gradients(learner, batch) for d, learner in learners.items()}
        # 2. the loss curve on the kit's task
        curves = {d: [] for d in DTYPES}
        streams = {d: batches(tokenizer, facts(), 8, seed=0) for d in DTYPES}
        for _ in range(args.steps):
            for d, learner in learners.items():
                curves[d].append(learner.step(next(streams[d])))
        # 3. time and bytes per step at the given size, in turns
        seconds, wire_bytes = {d: [] for d in DTYPES}, {}
        for i in range(args.warmup + args.reps):
            timed = random_batch(model.config.vocab_size, *args.size, seed=i, prompt=0)
            for d in in_turns(DTYPES, i):
                _, took, wire_bytes[d] = timed_step(learners[d], timed)
                if i >= args.warmup:
                    seconds[d].append(took)
        for learner in learners.values():
            learner.close()

    ms32, mb32 = median_ms(seconds["float32"]), wire_bytes["float32"]
    rows = []
    for d in DTYPES:
        ms = median_ms(seconds[d])
        max_gap = max(abs(x - y) for x, y in zip(curves[d], curves["float32"], strict=True))
        rows.append([d, f"{wire_bytes[d] / 1e6:.2f}", f"{wire_bytes[d] / mb32:.2f}", f"{ms:.0f}",
                     f"{ms / ms32:.3f}", f"{max_rel_diff(grads[d], grads['float32']):.1e}",
                     f"{curves[d][0]:.3f} → {curves[d][9]:.3f} → {curves[d][-1]:.3f}", f"{max_gap:.3f}"])
    b, t = args.size
    notes = f"""
{args.model}, cuts {tuple(args.cuts)}, `full` mode, trunk server in its own process on loopback.
Bytes and time: a step at {b}×{t} tokens, median of {args.reps} after {args.warmup} of warm-up, the
four learners in turns. Gradient difference: the largest ‖g − g_float32‖ / ‖g_float32‖ over the LoRA gradients
of the Bottom and the Top, one batch of the kit's task. Loss: steps 1, 10 and {args.steps} of training
on the kit's task (lr {args.lr}, batches of 8), and the largest gap to float32's curve at any step.
"""
    write_table("compression", "Wire compression: float16, bfloat16 and blockwise8 against float32",
                ["wire dtype", "MB / step", "bytes vs float32", "ms / step", "time vs float32",
                 "gradient difference", f"loss at steps 1 → 10 → {args.steps}", "largest loss gap"],
                rows, notes, out=args.out and Path(args.out))


if __name__ == "__main__":
    main()
