"""Clients knocking at a CURVE trunk server whose keys change under them, one line of JSON a call.

Run by tests/test_client_bounds.py in a process of its own, so that a call blocked for ever shows as a killed
process with its last line said, not as a test run that never ends. Each line: the scenario, the op, how long
the call took, the bound it had (timeout x tries), and what it ended with ("ok" or the error's class).

    python tests/knocking_client.py FOLDER
"""

import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import torch

from splitkit import TrunkClient, TrunkError, TrunkServer, load_model
from splitkit.training.testing import free_port
from splitkit.wire import protocol as P
from splitkit.wire.keys import add_student, make_keys, remove_student

TIMEOUT, RETRIES = 0.5, 1
BOUND = TIMEOUT * (RETRIES + 1)
REFRESH_S = 1.2  # the server reads its authorized folder again at most once a second
TOGGLE_S = 1.5   # how long the toggled key stays withdrawn, then authorized


_SAYING = threading.Lock()


def say(line: dict):
    """One line of JSON, written whole: the restarted scenario's clients knock from threads of their own."""
    with _SAYING:
        sys.stdout.write(json.dumps(line) + "\n")
        sys.stdout.flush()


def timed(scenario: str, op: str, call) -> bool:
    """Run one call, say how it ended and how long it took; True if it answered."""
    say({"scenario": scenario, "op": op, "started": True})
    t0, ended, said = time.monotonic(), "ok", ""
    try:
        call()
    except TrunkError as e:
        ended, said = type(e).__name__, str(e)
    say({"scenario": scenario, "op": op, "took": time.monotonic() - t0, "bound": BOUND, "ended": ended,
         "said": said})
    return ended == "ok"


def main(folder: Path):
    model, _ = load_model("tiny-llama")
    cuts, h1 = (2, 4), torch.zeros(1, 3, model.config.hidden_size)
    make_keys(folder)
    for name in ("alice", "mallory"):
        add_student(folder, name)
    shutil.copytree(folder / "students" / "mallory", folder / "mallory")  # her folder, kept after withdrawal
    remove_student(folder, "mallory")
    address = f"tcp://127.0.0.1:{free_port()}"
    server = TrunkServer(model, cuts, bind=address, curve_dir=folder)
    server.start()

    def client(name):
        where = folder / "mallory" if name == "mallory" else folder / "students" / name
        return TrunkClient(address, timeout=TIMEOUT, retries=RETRIES, curve_dir=where)

    # a key the server never authorized: each call a fresh client, hello then forward
    for _ in range(4):
        with client("mallory") as c:
            timed("refused", "hello", lambda c=c: c.hello(model, cuts, mode=P.FULL))
            timed("refused", "forward", lambda c=c: c.forward(h1))

    # a key withdrawn while its clients are connected, then the server restarted: their connections come back to a
    # handshake that is refused, and each next call must still end. Whether a REQ socket is left with no peer (and
    # its send blocked for ever) depends on timing, so six clients a round, each waiting a little longer
    for a in (0.1, 0.6, 1.2, 0.3, 0.9):
        clients = [client("alice") for _ in range(6)]
        for c in clients:
            assert timed("restarted", "stats", c.stats)
        remove_student(folder, "alice")
        time.sleep(a)
        server.stop()
        server = TrunkServer(model, cuts, bind=address, curve_dir=folder)
        server.start()

        def knock(c, wait):
            time.sleep(wait)
            timed("restarted", "stats", c.stats)
            timed("restarted", "hello", lambda: c.hello(model, cuts, mode=P.FULL))

        threads = [threading.Thread(target=knock, args=(c, 0.1 + 0.2 * i)) for i, c in enumerate(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        add_student(folder, "alice")
        time.sleep(REFRESH_S)
        assert timed("re-authorized", "hello", lambda c=clients[0]: c.hello(model, cuts, mode=P.FULL))
        assert timed("re-authorized", "forward", lambda c=clients[0]: c.forward(h1))
        for c in clients:
            c.close()

    # the key withdrawn and authorized again and again while the client knocks
    stop = threading.Event()

    on, off = folder / "authorized" / "alice.key", folder / "alice.key.withdrawn"

    def toggle():  # the same key withdrawn and authorized again, each move in one step, slower than the server looks
        while not stop.wait(TOGGLE_S):
            os.replace(on, off)
            stop.wait(TOGGLE_S)
            os.replace(off, on)

    flipper = threading.Thread(target=toggle)
    flipper.start()
    answered, deadline = 0, time.monotonic() + 4 * TOGGLE_S
    try:
        while time.monotonic() < deadline:
            with client("alice") as c:
                answered += timed("toggled", "hello", lambda c=c: c.hello(model, cuts, mode=P.FULL))
                answered += timed("toggled", "forward", lambda c=c: c.forward(h1))
    finally:
        stop.set()
        flipper.join()
        server.stop()
    say({"done": True})


if __name__ == "__main__":
    main(Path(sys.argv[1]))
