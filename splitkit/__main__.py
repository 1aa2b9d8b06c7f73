"""The kit's command line: prepare the model, make CURVE keys, fine-tune through a trunk server.

    python -m splitkit prepare            convert SmolLM2 once and cache it; JupyterLab's settings for a class
    python -m splitkit keys DIR           CURVE key pairs for a server that others can reach
    python -m splitkit keys DIR --add NAME    issue student NAME a key (--remove NAME withdraws it, --list)
    python -m splitkit keys DIR --flower-host HOST   and Flower's TLS for the SuperLink, SuperNode keys per student
    python -m splitkit train --mode full  fine-tune, print the evaluation, write plots and a PEFT adapter
    python -m splitkit serve --cuts 10 20 serve the Trunk (trunk_server.py's flags: serve --help)
    python -m splitkit assign --out assignments   the student versions of the notebooks (exercises blank)
"""

import argparse
import csv
import json
import logging
import os
import sys
from pathlib import Path

from .core import data
from .core.lora import LoraSpec
from .core.models import MODELS, SMOLLM2, ModelUnavailable, load_model, prepare
from .training.datafiles import DataError, Dataset, load_data, perplexity, text_batches
from .training.export import save_adapter
from .training.generation import exact_match
from .training.train import Learner, train
from .trunk.server import TrunkServer
from .wire.client import REQUEST_RETRIES, REQUEST_TIMEOUT, TrunkError
from .wire.keys import CURVE_ENV, TRUNK_ENV, add_student, authorized, make_keys, remove_student
from .wire.protocol import LOCAL, MODES

TRAIN_EXAMPLES = """examples:
  the kit's task (16 made-up facts, exact match on the same facts: memorisation):
    python -m splitkit train --mode full --steps 30
  your prompt/answer pairs, one JSON object a line: {"prompt": "...", "answer": "..."}
    python -m splitkit train --data qa.jsonl --model ./my-model --cuts 4 20 --out runs/qa
  the same as CSV, with a header row naming the columns prompt and answer:
    python -m splitkit train --data qa.csv --mode full+trunk
  plain text, trained as a causal LM on chunks (loss and perplexity, train and held-out):
    python -m splitkit train --data notes.txt --chunk 64 --steps 50
A share of the examples (--held-out, default 0.2) is kept aside and evaluated separately."""


def evaluate(learner, tokenizer, dataset) -> dict:
    """Exact match (pairs) or loss and perplexity (text), on the training and the held-out examples."""
    out = {}
    for part in ("train", "held_out"):
        examples = getattr(dataset, part)
        if not examples:
            continue
        if dataset.kind == "text":
            out[part] = "loss {:.3f}, perplexity {:.1f}".format(*perplexity(learner, examples))
        else:
            longest = max(len(tokenizer(a, add_special_tokens=False).input_ids) for _, a in examples)
            out[part] = f"exact match {exact_match(learner, tokenizer, examples, longest + 1)[0]:.0%}"
    return out


def cmd_train(args) -> int:
    import matplotlib
    matplotlib.use("Agg")
    from .teaching.plots import plot_lora_changes, plot_losses

    model, tokenizer = load_model(args.model)
    order = 0 if args.seed is None else args.seed  # the data's order and split; the LoRA's start stays secret
    if args.data:
        dataset = load_data(args.data, tokenizer, held_out=args.held_out, seed=order, chunk=args.chunk)
        stream = (text_batches(dataset.train, args.batch_size, order) if dataset.kind == "text"
                  else data.batches(tokenizer, dataset.train, args.batch_size, seed=order))
    else:
        dataset = Dataset("pairs", data.facts(args.task), [])  # every fact trained and scored: memorisation
        stream = data.batches(tokenizer, dataset.train, args.batch_size, seed=order)
    print(f"{args.data or 'the kit task'}: {len(dataset.train)} training and {len(dataset.held_out)} held-out "
          f"examples ({dataset.kind})")
    server, address = None, args.address or os.environ.get(TRUNK_ENV)
    if args.mode != LOCAL and address is None:
        server = TrunkServer(model, args.cuts, bind="tcp://127.0.0.1:*", lora_seed=args.seed)  # its own server
        address = server.start()
        print(f"started a trunk server for blocks [{args.cuts[0]}, {args.cuts[1]}) on {address}")
    curve_dir = args.curve_dir or (os.environ.get(CURVE_ENV) if server is None else None)  # none for our own server
    learner = Learner(model, mode=args.mode, cuts=args.cuts, address=address, lr=args.lr, curve_dir=curve_dir,
                      lora=LoraSpec(seed=args.seed),
                      timeout=args.timeout, retries=args.retries)  # local: the client options go unused
    try:
        print("before:", evaluate(learner, tokenizer, dataset))
        history = train(learner, stream, args.steps)
        print(f"after {args.steps} steps ({args.mode}), loss {history.loss[0]:.2f} -> {history.loss[-1]:.2f}:",
              evaluate(learner, tokenizer, dataset))
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        plot_losses([history]).savefig(out / "loss.png", dpi=100)
        plot_lora_changes([history], model.config.num_hidden_layers).savefig(out / "lora_change.png", dpi=100)
        save_adapter(learner, model, out / "adapter")
        write_losses(history, out / "losses.csv")
        print(f"wrote {out / 'loss.png'}, {out / 'lora_change.png'}, the loss of every step in {out / 'losses.csv'} "
              f"and the PEFT adapter {out / 'adapter'} "
              f"(PeftModel.from_pretrained(base_model, {str(out / 'adapter')!r}))")
    finally:
        learner.close()
        if server is not None:
            server.stop()
    return 0


def write_losses(history, path: Path):
    """The training loss of every step, one row each (step, loss): what two runs compare to say they trained alike."""
    with open(path, "w", newline="") as f:
        rows = csv.writer(f)
        rows.writerow(["step", "loss"])
        rows.writerows((step, repr(loss)) for step, loss in enumerate(history.loss, 1))


def cmd_keys(args) -> int:
    from .federated.credentials import add_supernode_key, make_flower_tls

    folder = Path(args.dir)
    if not (args.add or args.remove or args.list):
        if args.flower_host is None or args.new_server_key or not (folder / "server.key").exists():
            make_keys(folder, replace=args.new_server_key)
            print(f"keys in {folder}: run the server with --curve-dir {folder}; a key for each student: --add NAME, "
                  f"then give that student the folder {folder / 'students' / 'NAME'}. {folder} itself is the "
                  f"teacher's key folder (its client.key_secret is the teacher's): keep it, and never commit it")
        if args.new_server_key:
            print(f"a new server key: every student needs the new {folder / 'server.key'} in their folder; a "
                  f"running server goes on with the old one until it restarts")
        if args.flower_host:
            tls = make_flower_tls(folder, args.flower_host)
            print(f"Flower's TLS for a SuperLink at {args.flower_host} in {tls}/: flower-superlink --ssl-ca-certfile "
                  f"{tls / 'ca.crt'} --ssl-certfile {tls / 'superlink.crt'} --ssl-keyfile {tls / 'superlink.key'}; "
                  f"each student added from now on gets a SuperNode key pair too")
        return 0
    for name in args.remove:
        public = remove_student(folder, name)
        print(f"{name}: withdrawn ({public} deleted). A server running with --curve-dir {folder} refuses this key "
              f"within a second, on a connection already open too (its requests go unanswered: a timeout); "
              f"no restart needed. {folder / 'students' / name} is of no use any more.")
    for name in args.add:
        own = add_student(folder, name)
        print(f"{name}: key pair in {own}/ (client.key_secret, the student's secret, and server.key): give that "
              f"folder to {name} alone, to use as curve_dir (TrunkClient, Learner). Public key: "
              f"{folder / 'authorized' / (name + '.key')}; a server running with --curve-dir {folder} lets "
              f"{name} in within a second.")
        if (folder / "flower" / "ca.crt").is_file():
            public = add_supernode_key(folder, name)
            print(f"{name}: a SuperNode key pair for Flower in {own}/ (flower.key, the student's secret, and "
                  f"flower-ca.crt); register it on the SuperLink with: flwr supernode register {public} FEDERATION")
    if args.list:
        names = authorized(folder)
        print(f"authorized in {folder / 'authorized'}: {', '.join(names) if names else 'nobody'}")
    return 0


def install_lab_settings() -> Path:
    """Copy the kit's JupyterLab settings (no "notified about Jupyter news?" prompt over a lesson) into this
    environment's Lab settings, `overrides.d/splitkit.json`, which JupyterLab reads at start; the path."""
    target = Path(sys.prefix) / "share" / "jupyter" / "lab" / "settings" / "overrides.d" / "splitkit.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes((Path(__file__).parent / "teaching" / "lab_settings.json").read_bytes())
    return target


def cmd_assign(args) -> int:
    from .teaching.course import exercises, write_assignments

    for path in write_assignments(Path(args.notebooks), Path(args.out)):
        count = len(exercises(json.loads(path.read_text())))
        print(f"{path}" + (f": {count} exercise{'s' * (count != 1)}" if count else ""))
    return 0


def cmd_serve(argv: list, own_process: bool) -> int:
    """trunk_server.py's command line. Its OpenMP threads must wait passively, set before torch loads: splitkit has
    loaded it by now, so a process of the command line's own starts again with OMP_WAIT_POLICY set (unless set)."""
    if own_process and "OMP_WAIT_POLICY" not in os.environ:
        os.execve(sys.executable, [sys.executable, "-m", "splitkit", "serve", *argv],
                  {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    from .trunk.command import main as serve
    return serve(argv, prog="python -m splitkit serve")


def main(argv=None) -> int:
    own_process, argv = argv is None, sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["serve"]:
        return cmd_serve(argv[1:], own_process)
    p = argparse.ArgumentParser(prog="python -m splitkit", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="run a trunk server: the flags of trunk_server.py (python -m splitkit serve --help)")
    pp = sub.add_parser("prepare", help="convert SmolLM2 from its GGUF file and cache it")
    pp.add_argument("--force", action="store_true", help="convert again even if cached")
    pk = sub.add_parser("keys", help="make server and client CURVE key pairs in DIR; issue and withdraw students' "
                                     "keys")
    pk.add_argument("dir")
    pk.add_argument("--add", action="append", default=[], metavar="NAME",
                    help="issue student NAME a key pair, in DIR/students/NAME/ (give that folder to NAME), and "
                         "authorize it (DIR/authorized/NAME.key); DIR needs its server key first: keys DIR")
    pk.add_argument("--remove", action="append", default=[], metavar="NAME",
                    help="withdraw NAME's key: delete DIR/authorized/NAME.key; a running server refuses it within "
                         "a second")
    pk.add_argument("--list", action="store_true", help="print who is authorized (DIR/authorized/*.key)")
    pk.add_argument("--flower-host", metavar="HOST",
                    help="also make Flower's TLS for a SuperLink at HOST (an IP address or a name): a certificate "
                         "authority and the SuperLink's certificate in DIR/flower/; every student added after it gets "
                         "a SuperNode key pair for Flower's SuperNode authentication")
    pk.add_argument("--new-server-key", action="store_true",
                    help="make a new server key pair in a DIR that has one (without it, keys DIR refuses: every "
                         "student's copy of server.key stops working)")
    pt = sub.add_parser("train", help="fine-tune LoRA through a trunk server, on the kit's task or your data",
                        epilog=TRAIN_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    pt.add_argument("--mode", choices=MODES, default="full")
    pt.add_argument("--model", default=SMOLLM2, help=f"{', '.join(MODELS)}, a model folder, or a cached hub id")
    pt.add_argument("--cuts", nargs=2, type=int, default=(10, 20), metavar=("A", "B"))
    pt.add_argument("--address", help=f"trunk server to use (default: ${TRUNK_ENV}, else start one here)")
    pt.add_argument("--curve-dir", help="the folder of keys your teacher gave you (server.key and client.key_secret: "
                                        "`python -m splitkit keys DIR --add NAME` made it); none on loopback (default: "
                                        f"${CURVE_ENV}, unless no address is given and a server is started here)")
    pt.add_argument("--timeout", type=float, default=REQUEST_TIMEOUT,
                    help="seconds to wait for each answer of the trunk server (default: %(default)s)")
    pt.add_argument("--retries", type=int, default=REQUEST_RETRIES,
                    help="times a request is sent again after a timeout; then the run stops with an error naming "
                         "the server (default: %(default)s)")
    pt.add_argument("--data", help="a .jsonl or .csv file of prompt/answer pairs, or a .txt file of plain text")
    pt.add_argument("--held-out", type=float, default=0.2, help="share of --data kept aside (default: %(default)s)")
    pt.add_argument("--chunk", type=int, default=64, help="tokens per example of a text file (default: %(default)s)")
    pt.add_argument("--task", choices=sorted(data.TEMPLATES), default="colour", help="the kit's task, without --data")
    pt.add_argument("--steps", type=int, default=30)
    pt.add_argument("--batch-size", type=int, default=8)
    pt.add_argument("--lr", type=float, default=3e-3)
    pt.add_argument("--seed", type=int, help="fix the data order and the LoRA's start (the Trunk's too, on the server "
                    "this command starts) to repeat a run; a server that knows it can replay the training "
                    "(notebook 06). Default: a secret start, the data in order 0")
    pt.add_argument("--out", default="runs", help="folder for loss.png, lora_change.png and adapter/")
    pa = sub.add_parser("assign", help="write the student versions of the notebooks: each exercise's solution "
                                       "blanked (nbgrader's format), outputs cleared")
    pa.add_argument("--notebooks", default="notebooks", help="the folder of source notebooks (default: %(default)s)")
    pa.add_argument("--out", default="assignments", help="where the student versions go (default: %(default)s)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        if args.command == "prepare":
            print(f"SmolLM2 cached in {prepare(args.force)}")
            print(f"JupyterLab's settings for a class in {install_lab_settings()}")
            return 0
        if args.command == "keys":
            return cmd_keys(args)
        if args.command == "assign":
            return cmd_assign(args)
        return cmd_train(args)
    except (ModelUnavailable, DataError, TrunkError, TypeError, ValueError) as e:  # TrunkError: no server, or refused
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
