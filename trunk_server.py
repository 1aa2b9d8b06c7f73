"""Trunk server: the middle blocks of a causal LM, served over ZeroMQ (reliable request-reply).

Run:  python trunk_server.py --model smollm2-135m --cuts 10 20
Then point a notebook at it:  SPLITKIT_TRUNK=tcp://127.0.0.1:5555 jupyter lab
The server is splitkit.server.TrunkServer; this file is only its command line.
"""

import argparse
import logging
import sys

from splitkit.models import MODELS, SMOLLM2, load_model
from splitkit.server import DEFAULT_BIND, Faults, TrunkServer
from splitkit.sessions import Limits


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=SMOLLM2, help=f"{', '.join(MODELS)}, a folder saved with save_pretrained, or a "
                                                    f"hub id in the local cache (default: %(default)s)")
    p.add_argument("--cuts", nargs=2, type=int, default=(10, 20), metavar=("A", "B"),
                   help="serve blocks [A, B) (default: 10 20)")
    p.add_argument("--bind", default=DEFAULT_BIND, help="ZeroMQ address to bind (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="torch device for the trunk, e.g. cuda (default: cpu)")
    p.add_argument("--curve-dir", help="folder made by `python -m splitkit keys DIR`: encrypt, and let in "
                                       "only the clients whose public keys are in DIR/authorized")
    p.add_argument("--insecure", action="store_true", help="allow a non-loopback bind without keys")
    p.add_argument("--keep-states", type=int, default=Limits.states_per_session, metavar="N",
                   help="forward states each session keeps for its backward (default: %(default)s); "
                        "0 sends every backward through the stateless fallback, which recomputes the forward")
    p.add_argument("--max-sessions", type=int, default=Limits.max_sessions, metavar="N",
                   help="open sessions at most, one per client (default: %(default)s); one more hello is refused "
                        "as busy")
    p.add_argument("--simulate-faults", default="", metavar="SPEC",
                   help="e.g. drop=0.1,delay=0.2,delay_s=2,crash_after=50 (for showing recovery)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        faults = Faults.parse(args.simulate_faults)
        model, _ = load_model(args.model)
        limits = Limits(states_per_session=args.keep_states, max_sessions=args.max_sessions)
        server = TrunkServer(model, args.cuts, bind=args.bind, device=args.device, curve_dir=args.curve_dir,
                             insecure=args.insecure, faults=faults, limits=limits)
        del model
        server.serve_forever()
    except (ValueError, TypeError, RuntimeError) as e:
        logging.getLogger("splitkit.server").error("%s", e)
        return 2
    except KeyboardInterrupt:
        return 0
    return 3 if faults.crash_after else 0  # a simulated crash exits non-zero, like a real one


if __name__ == "__main__":
    sys.exit(main())
