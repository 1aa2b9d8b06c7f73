"""A `full` step over a rate-limited link, per wire dtype: what a classroom network costs.

The trunk server runs in a network namespace of its own, joined to this one by a veth pair; `tc`
HTB limits the rate of both ends (client to server and back). Rows: loopback (the server in this
namespace), then each rate; columns: the wire dtypes. Each cell is the median seconds of a `full`
step, and its ratio to the loopback float32 step. All cells are measured in turns, in one run.
Making the namespace needs root (`ip netns`, `ip link`, `tc`); without it the benchmark says so
and measures loopback only.

    sudo .venv/bin/python bench/network.py
"""

import argparse
import shutil
import subprocess
from pathlib import Path

from _common import in_turns, median_ms, timed_step, write_table
from splitkit import Learner, LoraSpec, load_model, wire
from splitkit.core.models import SMOLLM2
from splitkit.training.testing import ServerProcess, random_batch
from step import parse_size

DTYPES = wire.WIRE_DTYPES  # float32, float16, bfloat16, blockwise8
NAMESPACE, HOST_IF, NS_IF = "splitkit-bench", "skbench0", "skbench1"
HOST_IP, NS_IP = "10.231.7.1", "10.231.7.2"


def sh(*command: str):
    subprocess.run(command, check=True, capture_output=True, text=True)


class Link:
    """A namespace joined to this one by a veth pair, with an HTB rate limit on both ends."""

    def __init__(self):
        self.close()  # what a run that was killed may have left
        sh("ip", "netns", "add", NAMESPACE)
        sh("ip", "link", "add", HOST_IF, "type", "veth", "peer", "name", NS_IF)
        sh("ip", "link", "set", NS_IF, "netns", NAMESPACE)
        sh("ip", "addr", "add", f"{HOST_IP}/24", "dev", HOST_IF)
        sh("ip", "link", "set", HOST_IF, "up")
        self.ns("ip", "addr", "add", f"{NS_IP}/24", "dev", NS_IF)
        self.ns("ip", "link", "set", NS_IF, "up")
        self.ns("ip", "link", "set", "lo", "up")
        for run, dev in ((sh, HOST_IF), (self.ns, NS_IF)):
            run("tc", "qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "10")
            run("tc", "class", "add", "dev", dev, "parent", "1:", "classid", "1:10", "htb", "rate", "10gbit")

    @staticmethod
    def ns(*command: str):
        sh("ip", "netns", "exec", NAMESPACE, *command)

    def rate(self, mbit: int):
        for run, dev in ((sh, HOST_IF), (self.ns, NS_IF)):
            run("tc", "class", "change", "dev", dev, "parent", "1:", "classid", "1:10", "htb",
                "rate", f"{mbit}mbit", "ceil", f"{mbit}mbit")

    @staticmethod
    def close():
        subprocess.run(["ip", "link", "del", HOST_IF], capture_output=True)
        subprocess.run(["ip", "netns", "del", NAMESPACE], capture_output=True)


def make_link() -> tuple[Link | None, str]:
    """The link, or None and why it could not be made."""
    if not all(shutil.which(tool) for tool in ("ip", "tc")):
        return None, "`ip` or `tc` is not installed"
    try:
        return Link(), ""
    except subprocess.CalledProcessError as e:
        Link.close()
        return None, f"`{' '.join(e.cmd)}` failed: {e.stderr.strip() or e.returncode} (root is needed)"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=SMOLLM2)
    p.add_argument("--cuts", nargs=2, type=int, default=(10, 20))
    p.add_argument("--size", type=parse_size, default=(8, 64), metavar="BxT")
    p.add_argument("--rates", nargs="*", type=int, default=[100, 50, 10], help="Mbit/s")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", default=None, help="folder for network.md (default: bench/results)")
    args = p.parse_args(argv)

    model, _ = load_model(args.model)
    link, why = make_link()
    if link is None:
        print(f"no network namespace could be made ({why}): measuring loopback only", flush=True)
    rows_of = {"loopback": None, **({f"{r} Mbit/s": r for r in args.rates} if link else {})}
    seconds = {(row, d): [] for row in rows_of for d in DTYPES}
    wire_bytes = {}
    servers = []
    try:
        servers.append(ServerProcess(args.model, args.cuts))
        if link:
            servers.append(ServerProcess(args.model, args.cuts, "--insecure", host=NS_IP,
                                         prefix=("ip", "netns", "exec", NAMESPACE)))
        start = LoraSpec().resolved()  # one start, a secret one, for every server and dtype
        learners = {(server, d): Learner(model, mode="full", cuts=args.cuts, address=server.address, wire_dtype=d,
                                         lora=start) for server in servers for d in DTYPES}
        for i in range(args.warmup + args.reps):
            batch = random_batch(model.config.vocab_size, *args.size, seed=i, prompt=0)
            for row, mbit in rows_of.items():
                server = servers[0] if mbit is None else servers[1]
                if mbit is not None:
                    link.rate(mbit)
                for d in in_turns(DTYPES, i):
                    _, took, wire_bytes[d] = timed_step(learners[server, d], batch)
                    if i >= args.warmup:
                        seconds[row, d].append(took)
        for learner in learners.values():
            learner.close()
    finally:
        for server in servers:
            server.stop()
        if link:
            link.close()

    base = median_ms(seconds["loopback", "float32"])

    def cell(row, d):
        s = seconds[row, d]
        return f"{median_ms(s) / 1e3:.2f} s ({median_ms(s) / base:.2f}×), spread {max(s) - min(s):.2f}"

    rows = [[row, "—" if mbit is None else f"{wire_bytes['float32'] * 8 / (mbit * 1e6):.2f} s"]
            + [cell(row, d) for d in DTYPES] for row, mbit in rows_of.items()]
    rows.append(["MB on the wire per step", ""] + [f"{wire_bytes[d] / 1e6:.3f}" for d in DTYPES])
    b, t = args.size
    where = ("the trunk server in a network namespace of its own, joined by a veth pair, with `tc` HTB "
             "limiting both directions to the row's rate" if link else
             f"**loopback only: no network namespace could be made** ({why})")
    notes = f"""
{args.model}, cuts {tuple(args.cuts)}, `full` mode, a step at {b}×{t} tokens; {where}. Loopback: the
server in a process of its own in this namespace. Each cell: the median of {args.reps} steps after
{args.warmup} of warm-up, every row and dtype in turns; in brackets, the ratio to the loopback float32 step;
"spread": the slowest minus the fastest of them, in seconds. "float32 bytes at this rate": the float32 step's
bytes divided by the rate, computed, not measured: what the link adds if nothing overlaps the transfers.
HTB limits the rate only: no latency is added.
"""
    write_table("network", "A `full` step over a limited link, per wire dtype",
                ["link", "float32 bytes at this rate", *DTYPES], rows, notes, out=args.out and Path(args.out))


if __name__ == "__main__":
    main()
