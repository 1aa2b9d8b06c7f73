"""Round trips of hidden-state tensors on loopback: splitkit's wire format against send_pyobj (pickle).

An echo process answers three sockets: on the first it decodes our frames, checks the tensor as
the trunk server does and sends it back encoded; on the second it unpickles what `send_pyobj`
sent and pickles it back; on the third it echoes the bare bytes, the floor any format pays. The
client takes them in turns, so all three see the same machine. Pickle appears here only as the
thing to beat: the trunk server never unpickles.

    python bench/wire.py
    python bench/wire.py --shapes 8x64x576 --rounds 40
"""

import argparse
import multiprocessing
import time
from pathlib import Path

import torch
import zmq

from _common import free_port, median_ms, ratio, write_table
from splitkit import wire

SHAPES = [(1, 64, 576), (8, 64, 576), (8, 128, 576), (16, 256, 576)]


def echo(ours: str, pickled: str, bare: str):
    """Serve the three echoes until told to stop (an empty frame on our socket)."""
    ctx = zmq.Context()
    a, b, c = ctx.socket(zmq.ROUTER), ctx.socket(zmq.REP), ctx.socket(zmq.ROUTER)
    poller = zmq.Poller()
    for sock, address in ((a, ours), (b, pickled), (c, bare)):
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
        if b in ready:
            b.send_pyobj(b.recv_pyobj())
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
    sock.send_pyobj(tensor)
    sock.recv_pyobj()
    return time.perf_counter() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["x".join(map(str, s)) for s in SHAPES], metavar="BxTxD")
    p.add_argument("--rounds", type=int, default=20, help="rounds of 10 round trips each way")
    p.add_argument("--out", default=None, help="folder for wire.md (default: bench/results)")
    args = p.parse_args(argv)

    addresses = [f"tcp://127.0.0.1:{free_port()}" for _ in range(3)]
    server = multiprocessing.get_context("spawn").Process(target=echo, args=addresses)
    server.start()
    ctx = zmq.Context()
    sockets = [ctx.socket(zmq.REQ) for _ in addresses]
    for sock, address in zip(sockets, addresses):
        sock.connect(address)
    kinds = list(zip(("splitkit", "pickle", "bare"), sockets, (round_trip_ours, round_trip_pickle, round_trip_bare)))
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
                     ratio(ms["pickle"] / ms["splitkit"]) + (" ✓" if ms["pickle"] / ms["splitkit"] >= 4 else " ✗") * targeted,
                     ratio(ms["pickle"] / ms["bare"])])
    sockets[0].send_multipart([b""])  # stop the echo process
    server.join(10)
    ctx.destroy(linger=0)
    notes = f"""
float32 tensors over TCP on loopback, client and echo in two processes. Median of {10 * args.rounds}
round trips each, after 10 of warm-up, the three kinds in turns; "GB/s" counts the bytes there and
back. bare: the tensor's bytes echoed as one frame, nothing decoded: no format can beat it.
splitkit: a JSON header frame plus the tensor's bytes, sent and received zero-copy, decoded into a
tensor over the received frame and checked (shape, finite) as the trunk server does. pickle:
`send_pyobj(tensor)` / `recv_pyobj()`, as a naive version would do. "pickle / bare" is the most any
format could gain over pickle here. Targets for 8×64×576 (a SmolLM2 batch of 8 × 64 tokens): at most
1.5 ms, and at least 4× faster than pickle.
"""
    write_table("wire", "Wire: round trip of one hidden-state tensor",
                ["shape", "MB", "bare ZeroMQ ms", "splitkit ms", "pickle ms", "splitkit GB/s", "pickle / splitkit",
                 "pickle / bare"],
                rows, notes, out=args.out and Path(args.out))


if __name__ == "__main__":
    main()
