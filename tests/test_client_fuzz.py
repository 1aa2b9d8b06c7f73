"""A client survives a bad server: every malformed reply is a TrunkError that says what was wrong, within the
call's bound, and nothing a reply only claims (a size, a shape) is allocated.

A fake server (a ROUTER socket in a thread) answers each request with the next reply of a list: bad JSON, a header
that promises more bytes than arrive, shapes that do not fit, huge claimed sizes, another request's id, a stale
reply, an `ok` with no tensor, and more, each in several variants."""

import itertools
import json
import random
import threading
import time

import psutil
import pytest
import torch
import zmq

from splitkit import TrunkClient, TrunkError, TrunkUnavailable, wire
from splitkit.training.testing import free_port
from splitkit.wire import protocol as P

D, T = 8, 3
H = torch.ones(1, T, D)
TIMEOUT = 2.0
OPS = ("forward", "backward", "infer", "step", "lora_state", "release", "stats")


def request(client: TrunkClient, op: str):
    """One call of `op`, as a notebook would make it."""
    if op == "forward":
        return client.forward(H)
    if op == "backward":
        return client.backward(H, key=0)
    if op == "infer":
        return client.infer(H, gen=0, start=0)
    if op == "lora_state":
        return client.trunk_lora()
    return getattr(client, op)(*([0] if op == "release" else []))


def header(rid, **fields) -> bytes:
    return json.dumps({"v": P.VERSION, "ok": True, "id": rid, **fields}).encode()


def spec(shape, dtype="float32") -> dict:
    return {"dtype": dtype, "shape": shape}


def bad_replies(op: str, rid: int, rng: random.Random) -> list[tuple[str, list]]:
    """(what is wrong, frames) for a reply to request `rid` of `op` (not the first request)."""
    good = [T * D * 4 * b"\0"]
    n = rng.randrange(1, 5)
    out = [
        ("not JSON", [rng.choice([b"{", b"", b"\xff\xfe", b"nul", b'{"v": 2, "ok": tru'])]),
        ("JSON but not an object", [json.dumps(rng.choice([[1, 2], None, 3, "ok"])).encode()]),
        ("NaN literal", [b'{"v": 2, "ok": true, "id": NaN}']),
        ("another protocol version", [json.dumps({"v": rng.choice([1, 3, "2", 2.0]), "ok": True, "id": rid}).encode()]),
        ("ok missing", [json.dumps({"v": P.VERSION, "id": rid, "tensors": []}).encode()]),
        ("ok not a boolean", [json.dumps({"v": P.VERSION, "ok": rng.choice(["yes", 1, None]), "id": rid}).encode()]),
        ("another request's id", [header(rid + rng.choice([1, 2, 1000]), tensors=[spec([1, T, D])]), *good]),
        ("an id that is no integer", [header(rng.choice(["0", None, 1.5, [rid]]), tensors=[spec([1, T, D])]), *good]),
        ("an error for another request", [json.dumps({"v": P.VERSION, "ok": False, "id": rid + 1, "code": "busy",
                                                      "error": "x"}).encode()]),
        ("a header that promises more bytes than arrive",
         [header(rid, tensors=[spec([1, T, D])]), rng.randrange(0, T * D * 4) * b"\0"]),
        ("more tensors named than frames", [header(rid, tensors=[spec([1, T, D])] * (n + 1)), *good * n]),
        ("more frames than tensors named", [header(rid, tensors=[spec([1, T, D])] * n), *good * (n + 1)]),
        ("a huge claimed size", [header(rid, tensors=[spec([2**30, 2**30, rng.choice([D, 2**20])])]), *good]),
        ("a shape out of range", [header(rid, tensors=[spec(rng.choice([[2**31, D], [0, T, D], [-1, D],
                                                                        [1, 1, 1, 1, 1], "big"]))]), *good]),
        ("a dtype no wire has", [header(rid, tensors=[spec([1, T, D], rng.choice(["float64", "int64", "", 7]))]),
                                 *good]),
        ("'tensors' not a list", [header(rid, tensors=rng.choice(["x", 3, {"a": 1}]))]),
        ("too many tensors", [header(rid, tensors=[spec([1])] * (wire.MAX_TENSORS + 1)),
                              *[b"\0" * 4] * (wire.MAX_TENSORS + 1)]),
        ("a blockwise8 frame of the wrong length", [header(rid, tensors=[spec([1, T, D], "blockwise8")]), *good]),
        ("a header over the limit", [header(rid, pad="x" * (wire.MAX_HEADER_BYTES + 1))]),
        ("a stale reply, to an earlier request",
         [header(rid - 1 - rng.randrange(max(rid, 1)), released=True, names=[], tensors=[])]),
    ]
    if op in ("forward", "backward", "infer"):
        d = rng.choice([D + 1, D - 1])
        out += [
            ("an ok with no tensor", [header(rid, tensors=[])]),
            ("two tensors where one was asked", [header(rid, tensors=[spec([1, T, D])] * 2), *good * 2]),
            ("a shape that does not fit", [header(rid, tensors=[spec([1, T, d])]), T * d * 4 * b"\0"]),
            ("a batch that does not fit", [header(rid, tensors=[spec([2, T, D])]), 2 * T * D * 4 * b"\0"]),
            ("NaN in the tensor", [header(rid, tensors=[spec([1, T, D])]),
                                   torch.full((1, T, D), float("nan")).numpy().tobytes()]),
        ]
    elif op in ("step", "lora_state"):
        out += [
            ("names that do not count the tensors", [header(rid, names=["a", "b"], tensors=[spec([2, 2])]),
                                                     16 * b"\0"]),
            ("names missing", [header(rid, tensors=[])]),
            ("names repeated", [header(rid, names=["a", "a"], tensors=[spec([1])] * 2), b"\0" * 4, b"\0" * 4]),
        ]
    elif op == "release":
        out.append(("'released' missing", [header(rid)]))
    elif op == "stats":
        out += [("stats without its fields", [header(rid, cuts=rng.choice([None, [1], ["a", "b"]]))]),
                ("stats with a bad fingerprint", [header(rid, cuts=[1, 2], hidden_size=D, model="m",
                                                         fingerprint=rng.choice([None, "x", {"config": 1}]))]),
                ("an ok with a tensor stats never sends", [header(rid, tensors=[spec([1])]), b"\0" * 4])]
    return out


class FakeServer:
    """A ROUTER socket in a thread that answers request i with the frames `reply(op, id)` returns."""

    def __init__(self, reply):
        self.reply, self.answered = reply, 0
        self.sock = zmq.Context.instance().socket(zmq.ROUTER)
        self.sock.linger = 0
        self.address = f"tcp://127.0.0.1:{free_port()}"
        self.sock.bind(self.address)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self):
        while not self._stop.is_set():
            if not self.sock.poll(50):
                continue
            envelope, body = self._split(self.sock.recv_multipart())
            request = json.loads(body[0])
            reply = self.reply(request["op"], request["id"])
            self.answered += 1  # before the send: the client may be reading the count as soon as it has the reply
            self.sock.send_multipart(envelope + reply)

    @staticmethod
    def _split(frames):
        at = frames.index(b"") + 1
        return frames[:at], frames[at:]

    def close(self):
        self._stop.set()
        self._thread.join(5)
        self.sock.close(linger=0)


@pytest.fixture
def fake():
    made = []

    def make(reply):
        made.append(FakeServer(reply))
        return made[-1]

    yield make
    for server in made:
        server.close()


def test_a_client_answers_every_bad_reply_with_a_clear_error_within_its_bound(fake):
    now = {}  # the bad reply the next request gets: (op, which, seed)

    def reply(op, rid):
        assert op == now["op"], f"the client sent {op!r} where {now['op']!r} was called"
        return bad_replies(op, rid, random.Random(now["seed"]))[now["which"]][1]

    server = fake(reply)
    seen, calls, memory = {}, 0, psutil.Process().memory_info().rss
    client = TrunkClient(server.address, timeout=TIMEOUT, retries=0)
    try:
        for seed, op in enumerate(itertools.islice(itertools.cycle(OPS), 4 * len(OPS))):
            for which, (what, _) in enumerate(bad_replies(op, 1, random.Random(seed))):
                now.update(op=op, which=which, seed=seed)
                t0 = time.monotonic()
                with pytest.raises(TrunkError) as raised:
                    request(client, op)
                took, calls = time.monotonic() - t0, calls + 1
                assert not isinstance(raised.value, TrunkUnavailable), f"{what} ({op}): {raised.value}"
                assert raised.value.code == P.BAD_REPLY, f"{what} ({op}): {raised.value}"
                assert took < TIMEOUT, f"{what} ({op}) took {took:.2f} s"
                seen.setdefault(what, f"{op}: {raised.value}")
    finally:
        client.close()
    grown = psutil.Process().memory_info().rss - memory
    assert calls >= 500 and server.answered == calls, (calls, server.answered)
    assert len(seen) >= 28, sorted(seen)
    assert grown < 200 << 20, f"the client grew by {grown >> 20} MiB reading replies that claim huge sizes"
    print(f"{calls} bad replies of {len(seen)} kinds, each a TrunkError ({P.BAD_REPLY}) within {TIMEOUT:g} s")
    for what, said in sorted(seen.items()):
        print(f"  {what}: {said}")
