"""Where a trunk server listens: its ROUTER socket, bound with CURVE keys or not, and the process it runs in.

TrunkServer (server.py) makes one Endpoint when it is made, which checks the address (keys.check_bind),
and opens it in its serving thread; start() waits here until the socket is bound or has failed.
"""

import logging
import os
import threading
import time
from contextlib import contextmanager

import torch
import zmq
from zmq.utils.monitor import recv_monitor_message

from ..wire.keys import check_bind, serve_curve

log = logging.getLogger("splitkit.trunk.server")

MAX_MESSAGE_BYTES = 256 << 20  # ZMQ_MAXMSGSIZE: a peer that sends a bigger frame is disconnected, unanswered


class Endpoint:
    """A server's address, checked when it is made; bound by open() in the thread that serves it."""

    def __init__(self, bind: str, curve_dir=None, insecure: bool = False):
        if check_bind(bind, curve_dir, insecure):
            log.warning("serving %s WITHOUT encryption or authentication (--insecure)", bind)
        self.bind, self.curve_dir = bind, curve_dir
        self.address, self.sock, self.error = None, None, None  # the bound address (a `*` port resolved)
        self.monitor = None  # with CURVE: the socket's connections and handshakes, to count clients without a key
        self._handshakes = {}  # monitor event -> how many
        self.keys = None  # with CURVE: the authorized keys, kept up to date with curve_dir/authorized
        self.ready = threading.Event()  # set once open() has bound the socket or failed to

    @contextmanager
    def open(self):
        """Bind, serve within the block (self.sock), and close everything after it; a failure to bind is
        raised here and kept for wait()."""
        ctx = zmq.Context()
        try:
            self.sock, auth, self.keys = bind(ctx, self.bind, self.curve_dir)
            self.address = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
            if self.keys is not None:
                self.monitor = self.sock.get_monitor_socket(
                    zmq.EVENT_ACCEPTED | zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
        except Exception as e:  # reported to start(), and to the command line
            self.error = RuntimeError(f"cannot serve on {self.bind}: {e}")
            ctx.term()
            raise self.error from e
        finally:
            self.ready.set()
        try:
            yield self
        finally:
            if self.monitor is not None:
                self.sock.disable_monitor()
                self.monitor.close(linger=0)
            self.sock.close()
            if auth is not None:
                auth.stop()
            ctx.term()

    def wait(self, timeout: float) -> str:
        """The bound address, once open() has bound it; its error if it could not."""
        if not self.ready.wait(timeout):
            raise RuntimeError(f"trunk server did not start on {self.bind}")
        if self.error:
            raise self.error
        return self.address

    def receive(self, timeout_ms: int) -> tuple[list, list] | None:
        """The next message as (envelope, body): the envelope to send the reply behind (the peer's id, and a REQ
        socket's empty delimiter), the body its frames (zmq.Frame); None if none came within timeout_ms, or if
        it came from a key withdrawn from curve_dir/authorized since its client connected: that one goes
        unanswered, as one from a key never authorized (whose handshake fails) does."""
        if self.keys is not None:
            self.keys.refresh()
            self._read_monitor()
        if not self.sock.poll(timeout_ms):
            return None
        frames = self.sock.recv_multipart(copy=False)
        if self.keys is not None and not self.keys.allows(frames[-1]):  # the last part: from the peer itself
            return None  # counted and logged by allows
        split_at = 2 if len(frames) > 1 and len(frames[1]) == 0 else 1
        return [f.bytes for f in frames[:split_at]], frames[split_at:]

    def waiting(self, window_ms: float, most: int = 63) -> list:
        """The messages that come within `window_ms` (0: those already waiting), at most `most`."""
        out, deadline = [], time.monotonic() + window_ms / 1000
        while len(out) < most:
            message = self.receive(max(0, int(1000 * (deadline - time.monotonic()))))
            if message is not None:
                out.append(message)
            elif time.monotonic() >= deadline:
                break
        return out

    def _read_monitor(self):
        """Count the connections whose handshake failed before any key was checked (a client without a key): the
        authenticator never hears of them, and which side notices the mismatch first is a race, so they are
        counted as connections accepted less those whose handshake succeeded or was refused for its key."""
        while self.monitor.poll(0):
            event = recv_monitor_message(self.monitor)["event"]
            self._handshakes[event] = self._handshakes.get(event, 0) + 1
        accepted, done = self._handshakes.get(zmq.EVENT_ACCEPTED, 0), sum(
            self._handshakes.get(e, 0) for e in (zmq.EVENT_HANDSHAKE_SUCCEEDED, zmq.EVENT_HANDSHAKE_FAILED_AUTH))
        self.keys.without_key(accepted - done)

    def key_counts(self) -> dict:
        """With CURVE, how many handshakes and requests were refused for their keys; nothing without."""
        return {} if self.keys is None else self.keys.counts()

    def send(self, envelope: list, frames: list):
        """A reply, behind the envelope its request came with."""
        self.sock.send_multipart(envelope + frames, copy=False)


def bind(ctx, bind: str, curve_dir):
    """A ROUTER socket bound to `bind`, and with keys (a CURVE server) its authenticator and authorized keys;
    None, None without."""
    sock, auth, keys = ctx.socket(zmq.ROUTER), None, None
    sock.linger = 0
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
    try:
        if curve_dir is not None:
            auth, keys = serve_curve(ctx, sock, curve_dir)
        sock.bind(bind)
    except Exception:
        if auth is not None:
            auth.stop()
        sock.close()
        raise
    return sock, auth, keys


def rss_bytes() -> int | None:
    """Resident memory of this process (Linux's /proc); None where there is none."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


@contextmanager
def on_one_thread(yes: bool):
    """torch's intra-op threads set to one inside the block if `yes` (and back after it)."""
    threads = torch.get_num_threads()
    if not yes or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def in_a_thread_of_its_own(work):
    """work() in a thread that ends with the request, for a server started by start(): it shares its process
    with a notebook's kernel or a test. libgomp gives each thread that runs torch a team of OpenMP threads, and while
    all teams together hold more threads than there are cores, every team waits for work by sleeping instead of
    spinning: the kernel's own computing ran 1.2-1.3x slower beside a server thread that had served once. A team ends
    with its thread, so between requests the kernel's team is alone again."""
    result = []
    worker = threading.Thread(target=lambda: result.append(work()), name="trunk-request")
    worker.start()
    worker.join()
    return result[0] if result else None  # None: work() raised (handle never does; a batch may, and is redone)
