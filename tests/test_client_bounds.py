"""No client call waits longer than its bound, timeout x (retries + 1), whatever the server or the handshake does.

A REQ socket's send blocks while it has no peer, and a refused CURVE handshake can leave it none for good: then a
send without a timeout never returns. The knocking clients (tests/knocking_client.py) run in a process of their own
against a real CURVE server whose keys are refused, withdrawn, re-authorized and restarted under them, so that a
call blocked for ever shows as a process killed at the deadline, with the call it was in."""

import json
import subprocess
import sys
from pathlib import Path

SLACK_S = 0.5  # what a call may take beyond timeout x tries: encoding, closing a socket, a busy scheduler
DEADLINE_S = 150  # the whole knocking run takes about 40 s here


def test_every_call_of_a_knocking_client_ends_within_its_bound(tmp_path):
    run = _run(Path(__file__).with_name("knocking_client.py"), tmp_path)
    lines = [json.loads(line) for line in run.splitlines() if line.startswith("{")]
    calls = [c for c in lines if "took" in c]
    started = [c for c in lines if c.get("started")]
    hung = started[len(calls):]
    assert not hung, f"a call never ended: {hung[0]} (after {len(calls)} calls that did)"
    assert lines and lines[-1] == {"done": True}, f"the knocking run did not finish: {run[-2000:]}"
    over = [c for c in calls if c["took"] > c["bound"] + SLACK_S]
    assert not over, f"{len(over)} of {len(calls)} calls took longer than their bound: {over[:3]}"
    by = {s: [c for c in calls if c["scenario"] == s] for s in ("refused", "restarted", "re-authorized", "toggled")}
    assert all(c["ended"] == "TrunkUnavailable" and "refused this client's key" in c["said"]
               for c in by["refused"] if c["op"] == "hello"), by["refused"]
    assert all(c["ended"] == "ok" for c in by["re-authorized"])
    assert sum(c["ended"] != "ok" for c in by["restarted"]) >= 30, "the restarted server let withdrawn keys in"
    assert {c["ended"] for c in by["toggled"]} >= {"ok", "TrunkUnavailable"}, "the toggled key was never refused"
    worst = max(c["took"] for c in calls)
    print(f"{len(calls)} calls, worst {worst:.3f} s against a bound of {calls[0]['bound']:g} s")


def _run(script: Path, tmp_path) -> str:
    """The knocking client's output; killed at the deadline, what it said until then."""
    with subprocess.Popen([sys.executable, str(script), str(tmp_path / "keys")], stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True) as proc:
        try:
            out, _ = proc.communicate(timeout=DEADLINE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    return out
