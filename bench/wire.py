"""Round trips of hidden-state tensors on loopback: splitkit's wire format against pickle.

An echo process answers two sockets: on the first it decodes our frames, checks the tensor as
the trunk server does and sends it back encoded; on the second it echoes bare bytes, the floor
any format pays. The pickle round trip is what `send_pyobj`/`recv_pyobj` on both ends would
cost: the client pickles the tensor, the bare echo returns the bytes, and the far side's unpickle
and pickle are then done in the client, on the bytes the client made itself. So nothing that
arrives on a socket is ever unpickled, here or anywhere in splitkit. The client takes the three
kinds in turns, so all three see the same machine.

    python bench/wire.py
    python bench/wire.py --shapes 8x64x576 --rounds 40
"""

import argparse
import multiprocessing
import pickle
import time
from pathlib import Path

import torch
import zmq
from zmq.sugar.socket import DEFAULT_PROTOCOL  # what send_pyobj pickles with

from _common import median_ms, ratio, write_table
from splitkit import wire
from splitkit.training.testing import free_port

SHAPES = [(1, 64, 576), (8, 64, 576), (8, 128, 576), (16, 256, 576)]


def echo(ours: str, bare: str):
    """Serve both echoes until told to stop (an empty frame on our socket)."""
    ctx = zmq.Context()
    a, c = ctx.socket(zmq.ROUTER), ctx.socket(zmq.ROUTER)
    poller = zmq.Poller()
    for sock, address in ((a, ours), (c, bare)):
        sock.bind(address)
        poller.register(sock, zmq.POLLIN)
    while True:
        ready = dict(poller.poll())
        if a in ready:
            frames = a.recv_multipart(copy=False)
            if len(frames[2]) == 0:
                break
            header, tensors = wire.decode(frames[2:])
            assert all(wire.all_finite(t) for t in tensors)  # as the server checks them
            a.send_multipart(frames[:2] + wire.encode({"ok": True, "id": header["id"]}, tensors), copy=False)
        if c in ready:
            c.send_multipart(c.recv_multipart(copy=False), copy=False)
    ctx.destroy(linger=0)


def round_trip_ours(sock, tensor, i: int) -> float:
    t0 = time.perf_counter()
    sock.send_multipart(wire.encode({"op": "forward", "id": i}, [tensor]), copy=False)
    _, (back,) = wire.decode(sock.recv_multipart(copy=False))
    return time.perf_counter() - t0


def round_trip_bare(sock, tensor, i: int) -> float:
    t0 = time.perf_counter()
    sock.send_multipart([b"", tensor.numpy()], copy=False)
    sock.recv_multipart(copy=False)
    return time.perf_counter() - t0


def round_trip_pickle(sock, tensor, i: int) -> float:
    t0 = time.perf_counter()
    data = pickle.dumps(tensor, DEFAULT_PROTOCOL)  # the client's send_pyobj...
    sock.send(data)
    sock.recv()  # ...the bytes there and back...
    answer = pickle.dumps(pickle.loads(data), DEFAULT_PROTOCOL)  # ...the server's recv_pyobj and send_pyobj...
    pickle.loads(answer)  # ...and the client's recv_pyobj, all on bytes made here
    return time.perf_counter() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["x".join(map(str, s)) for s in SHAPES], metavar="BxTxD")
    p.add_argument("--rounds", type=int, default=20, help="rounds of 10 round trips each way")
    p.add_argument("--out", default=None, help="folder for wire.md (default: bench/results)")
    args = p.parse_args(argv)

    ours, bare = (f"tcp://127.0.0.1:{free_port()}" for _ in range(2))
    server = multiprocessing.get_context("spawn").Process(target=echo, args=(ours, bare))
    server.start()
    ctx = zmq.Context()
    sockets = [ctx.socket(zmq.REQ) for _ in range(3)]
    for sock, address in zip(sockets, (ours, bare, bare), strict=True):
        sock.connect(address)
    kinds = list(zip(("splitkit", "pickle", "bare"), sockets, (round_trip_ours, round_trip_pickle, round_trip_bare),
                     strict=True))
    rows = []
    for shape in args.shapes:
        shape = tuple(int(s) for s in shape.split("x"))
        tensor = torch.randn(shape)
        seconds = {kind: [] for kind, _, _ in kinds}
        for r in range(args.rounds + 1):  # round 0 warms up
            for kind, sock, round_trip in kinds:
                times = [round_trip(sock, tensor, 10 * r + k) for k in range(10)]
                if r:
                    seconds[kind] += times
        ms = {kind: median_ms(t) for kind, t in seconds.items()}
        mb = tensor.numel() * 4 / 1e6
        targeted = shape == (8, 64, 576)
        rows.append(["×".join(map(str, shape)), f"{mb:.2f}", f"{ms['bare']:.3f}",
                     f"{ms['splitkit']:.3f}" + (" ✓" if ms["splitkit"] <= 1.5 else " ✗") * targeted,
                     f"{ms['pickle']:.3f}", f"{2 * mb / ms['splitkit']:.2f}",
                     ratio(ms["pickle"] / ms["splitkit"])
                     + (" ✓" if ms["pickle"] / ms["splitkit"] >= 4 else " ✗") * targeted,
                     ratio(ms["pickle"] / ms["bare"])])
    sockets[0].send_multipart([b""])  # stop the echo process
    server.join(10)
    ctx.destroy(linger=0)
    notes = f"""
float32 tensors over TCP on loopback, client and echo in two processes. Median of {10 * args.rounds}
round trips each, after 10 of warm-up, the three kinds in turns; "GB/s" counts the bytes there and
back. bare: the tensor's bytes echoed as one frame, nothing decoded: no format can beat it.
splitkit: a JSON header frame plus the tensor's bytes, sent and received zero-copy, decoded into a
tensor over the received frame and checked (shape, finite) as the trunk server does. pickle: what
`send_pyobj(tensor)` / `recv_pyobj()` on both ends would cost, as a naive version would do it; the
far side's unpickling and pickling are done by the client on its own bytes, so nothing received is
unpickled. "pickle / bare" is the most any format could gain over pickle here. Targets for 8×64×576
(a SmolLM2 batch of 8 × 64 tokens): at most 1.5 ms, and at least 4× faster than pickle.
"""
    write_table("wire", "Wire: round trip of one hidden-state tensor",
                ["shape", "MB", "bare ZeroMQ ms", "splitkit ms", "pickle ms", "splitkit GB/s", "pickle / splitkit",
                 "pickle / bare"],
                rows, notes, out=args.out and Path(args.out))


if __name__ == "__main__":
    main()
