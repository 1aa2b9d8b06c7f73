"""The trunk server's command line: `python trunk_server.py` in a clone, `python -m splitkit serve` where the kit is
installed. Both parse these flags and run this main; the server itself is TrunkServer (server.py).

OpenMP threads that spin after each op would take the cores the server's clients need, so the server's process
runs with OMP_WAIT_POLICY=PASSIVE unless its environment says otherwise. libgomp reads it once, when torch loads,
so each entry point sets it before torch is imported: trunk_server.py before its first import, `splitkit serve` by
starting its process again with it set (splitkit's package has loaded torch by then).
"""

import argparse
import logging
from dataclasses import fields

from ..core.models import MODELS, SMOLLM2, load_model
from .batching import BatchingServer
from .faults import Faults
from .server import DEFAULT_BIND, TrunkServer
from .sessions import Limits

USAGE = """Trunk server: the middle blocks of a causal LM, served over ZeroMQ (reliable request-reply).

Run:  python trunk_server.py --model smollm2-135m --cuts 10 20   (or: python -m splitkit serve ...)
Then point a notebook at it:  SPLITKIT_TRUNK=tcp://127.0.0.1:5555 jupyter lab
"""

# Limits field -> (flag, metavar, what it bounds); the default shown in --help is the field's own
LIMIT_FLAGS = {
    "max_tokens": ("--max-tokens", "N", "batch x tokens in one request at most; a bigger one is refused"),
    "states_per_session": ("--keep-states", "N", "forward states each session keeps for its backward; 0 sends "
                                                 "every backward through the stateless fallback, which recomputes "
                                                 "the forward"),
    "states_total": ("--states-total", "N", "forward states kept over all sessions; past it the oldest is dropped"),
    "state_max_age_s": ("--state-max-age", "S", "seconds a forward state waits for its backward before it is dropped"),
    "max_sessions": ("--max-sessions", "N", "open sessions at most, one per client; one more hello is refused as busy"),
    "session_idle_s": ("--session-idle", "S", "seconds without a request after which a session is closed"),
    "generations_per_session": ("--keep-generations", "N", "KV caches (generations) each session keeps; past it its "
                                                           "least recently used is dropped"),
    "generations_total": ("--generations-total", "N", "KV caches over all sessions; 0 keeps none, and every generated "
                                                      "token sends its whole prefix again"),
    "cached_tokens": ("--cached-tokens", "N", "batch x positions over all KV caches; past it the least recently used "
                                              "are dropped"),
    "generation_idle_s": ("--generation-idle", "S", "seconds a KV cache may go unused before it is dropped"),
}


def parse_args(argv=None, prog: str | None = None):
    p = argparse.ArgumentParser(prog=prog, description=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=SMOLLM2, help=f"{', '.join(MODELS)}, a folder saved with save_pretrained, or a "
                                                    f"hub id in the local cache (default: %(default)s)")
    p.add_argument("--cuts", nargs=2, type=int, default=(10, 20), metavar=("A", "B"),
                   help="serve blocks [A, B) (default: 10 20)")
    p.add_argument("--bind", default=DEFAULT_BIND, help="ZeroMQ address to bind (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="torch device for the trunk, e.g. cuda (default: cpu)")
    p.add_argument("--curve-dir", help="folder made by `python -m splitkit keys DIR`: encrypt, and let in "
                                       "only the clients whose public keys are in DIR/authorized (read again "
                                       "within a second when it changes: `keys DIR --add/--remove NAME`)")
    p.add_argument("--insecure", action="store_true", help="allow a non-loopback bind without keys")
    p.add_argument("--simulate-faults", default="", metavar="SPEC",
                   help="e.g. drop=0.1,delay=0.2,delay_s=2,crash_after=50 (for showing recovery)")
    p.add_argument("--batch-window-ms", type=float, metavar="MS",
                   help="run the requests of different students that wait together as one batch (one-token generation "
                        "steps, kept forwards and their backwards), "
                        "gathered for up to MS ms after the first (0: only those already waiting); results equal "
                        "those served alone within float rounding, not bit for bit (default: off, one at a time)")
    p.add_argument("--one-thread-up-to", type=int, default=32, metavar="N",
                   help="run a generation step of at most N new tokens (rows x positions) on one thread: for so few, "
                        "waking torch's other threads for each matrix product costs more than they save "
                        "(bench/generation.py); 0: never (default: %(default)s)")
    p.add_argument("--lora-seed", type=int, metavar="N",
                   help="start every full+trunk session's Trunk LoRA from seed N, to repeat a run (default: a secret "
                        "seed per session, from the operating system's entropy)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    limits = p.add_argument_group("limits", "what the server holds at most (splitkit.trunk.state.Limits); 0 is "
                                            "allowed, a negative value is refused")
    for f in fields(Limits):
        flag, metavar, what = LIMIT_FLAGS[f.name]
        limits.add_argument(flag, dest=f.name, type=type(f.default), default=f.default, metavar=metavar,
                            help=f"{what} (default: %(default)s)")
    return p.parse_args(argv)


def limits_from(args) -> Limits:
    """The Limits the parsed flags ask for (Limits refuses a negative value with a ValueError)."""
    return Limits(**{f.name: getattr(args, f.name) for f in fields(Limits)})


def main(argv=None, prog: str | None = None) -> int:
    args = parse_args(argv, prog)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        faults = Faults.parse(args.simulate_faults)
        limits = limits_from(args)  # before the model loads: a bad value is told at once
        model, _ = load_model(args.model)
        kind, batching = (TrunkServer, {}) if args.batch_window_ms is None else (
            BatchingServer, {"window_ms": args.batch_window_ms})
        server = kind(model, args.cuts, bind=args.bind, device=args.device, curve_dir=args.curve_dir,
                             insecure=args.insecure, faults=faults, limits=limits, lora_seed=args.lora_seed,
                             one_thread_up_to=args.one_thread_up_to, **batching)
        del model
        server.serve_forever()
    except (ValueError, TypeError, RuntimeError) as e:
        logging.getLogger("splitkit.trunk.server").error("%s", e)
        return 2
    except KeyboardInterrupt:
        return 0
    return 3 if faults.crash_after else 0  # a simulated crash exits non-zero, like a real one

