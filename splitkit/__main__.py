"""The kit's command line: prepare the model, make CURVE keys, fine-tune through a trunk server.

    python -m splitkit prepare            convert SmolLM2 once and cache it
    python -m splitkit keys DIR           CURVE key pairs for a server that others can reach
    python -m splitkit train --mode full  fine-tune on the kit's task, print exact match, write plots
"""

import argparse
import logging
import os
import sys
from pathlib import Path

from . import data
from .keys import make_keys
from .models import MODELS, SMOLLM2, ModelUnavailable, load_model, prepare
from .protocol import MODES
from .server import TrunkServer
from .train import Learner, exact_match, train

TRUNK_ENV = "SPLITKIT_TRUNK"


def cmd_train(args) -> int:
    import matplotlib
    matplotlib.use("Agg")
    from .plots import plot_lora_changes, plot_losses

    model, tokenizer = load_model(args.model)
    server = None
    address = args.address or os.environ.get(TRUNK_ENV)
    if args.mode != "local" and address is None:
        server = TrunkServer(model, args.cuts, bind="tcp://127.0.0.1:*")
        address = server.start()
        print(f"started a trunk server for blocks [{args.cuts[0]}, {args.cuts[1]}) on {address}")
    pairs = data.facts(args.task)
    learner = Learner(model, mode=args.mode, cuts=args.cuts, address=address, lr=args.lr)
    before, _ = exact_match(learner, tokenizer, pairs)
    print(f"exact match before: {before:.0%} of {len(pairs)}")
    history = train(learner, data.batches(tokenizer, pairs, args.batch_size, seed=args.seed), args.steps)
    after, answers = exact_match(learner, tokenizer, pairs)
    print(f"exact match after {args.steps} steps ({args.mode}): {after:.0%}; "
          f"loss {history.loss[0]:.2f} -> {history.loss[-1]:.2f}")
    for (prompt, want), got in list(zip(pairs, answers, strict=True))[:4]:
        print(f"  {prompt.splitlines()[0]!r}: {got.strip()!r} (want {want.strip()!r})")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot_losses([history]).savefig(out / "loss.png", dpi=100)
    plot_lora_changes([history], model.config.num_hidden_layers).savefig(out / "lora_change.png", dpi=100)
    print(f"wrote {out / 'loss.png'} and {out / 'lora_change.png'}")
    learner.close()
    if server is not None:
        server.stop()
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m splitkit", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    pp = sub.add_parser("prepare", help="convert SmolLM2 from its GGUF file and cache it")
    pp.add_argument("--force", action="store_true", help="convert again even if cached")
    pk = sub.add_parser("keys", help="make server and client CURVE key pairs in DIR")
    pk.add_argument("dir")
    pt = sub.add_parser("train", help="fine-tune LoRA through a trunk server on the kit's task")
    pt.add_argument("--mode", choices=MODES, default="full")
    pt.add_argument("--model", default=SMOLLM2, help=f"{', '.join(MODELS)}, a model folder, or a cached hub id")
    pt.add_argument("--cuts", nargs=2, type=int, default=(10, 20), metavar=("A", "B"))
    pt.add_argument("--address", help=f"trunk server to use (default: ${TRUNK_ENV}, else start one here)")
    pt.add_argument("--task", choices=sorted(data.TEMPLATES), default="colour")
    pt.add_argument("--steps", type=int, default=30)
    pt.add_argument("--batch-size", type=int, default=8)
    pt.add_argument("--lr", type=float, default=3e-3)
    pt.add_argument("--seed", type=int, default=0)
    pt.add_argument("--out", default="runs", help="folder for loss.png and lora_change.png")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        if args.command == "prepare":
            print(f"SmolLM2 cached in {prepare(args.force)}")
            return 0
        if args.command == "keys":
            folder = make_keys(args.dir)
            print(f"keys in {folder}: give clients client.key_secret and server.key; "
                  f"run the server with --curve-dir {folder}")
            return 0
        return cmd_train(args)
    except (ModelUnavailable, TypeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
