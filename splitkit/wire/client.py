"""The client side of the wire: TrunkClient, one session with a trunk server.

TrunkClient is the zguide's Lazy Pirate client (lpclient.py): a REQ socket, a timeout on
every request, and on timeout close the socket, reconnect and resend, a bounded number of
times, then give up with an error that says what to check. Requests carry ids, so a resent
request that the server already ran is answered from its reply cache, not run twice.
RemoteTrunk (remote.py) makes the server's Trunk a differentiable module over this client.
"""

import itertools
import secrets
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import torch
import zmq

from ..core.models import fingerprint
from . import codec as wire
from . import protocol as P
from .keys import KEY_FILES, NO_KEY_ADVICE, class_keys, connect_curve

REQUEST_TIMEOUT = 30.0  # seconds to wait for one reply
REQUEST_RETRIES = 2     # resends after a timeout, each on a fresh socket
MAX_REPLY_BYTES = 1 << 30  # ZMQ_MAXMSGSIZE of a client: the largest reply it reads
PROBE_TIMEOUT = 10.0    # seconds the class server has to answer one `stats` before a notebook goes on without it



class TrunkError(RuntimeError):
    """The server answered with an error; `code` says which kind."""

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.code = code


class TrunkUnavailable(TrunkError):
    """No answer from the server within the timeout, after every retry."""

    def __init__(self, message: str):
        super().__init__(message, P.UNAVAILABLE)


class TrunkClient:
    """One client session with a trunk server. Counts the bytes it sends and receives."""

    def __init__(self, address: str, timeout: float = REQUEST_TIMEOUT, retries: int = REQUEST_RETRIES,
                 wire_dtype: str = "float32", curve_dir: str | Path | None = None, log_tensors: bool = False):
        if wire_dtype not in wire.WIRE_DTYPES:
            raise ValueError(f"wire_dtype must be one of {', '.join(wire.WIRE_DTYPES)}")
        self.address, self.timeout, self.retries, self.wire_dtype = address, timeout, retries, wire_dtype
        self.curve_dir = class_keys(address) if curve_dir is None else Path(curve_dir)
        if self.curve_dir is not None and not all((self.curve_dir / f).is_file() for f in KEY_FILES):
            where = "" if self.curve_dir.is_absolute() else (
                f"; a relative folder is read from where this process runs, {Path.cwd()} (a notebook's kernel runs "
                f"in the notebook's folder): give the absolute path")
            raise ValueError(f"{self.curve_dir} is not a folder of keys: it needs {' and '.join(KEY_FILES)} (the "
                             f"folder `python -m splitkit keys DIR --add NAME` made, DIR/students/NAME){where}")
        self.session = secrets.token_hex(16)
        self.bytes_sent = self.bytes_received = 0
        self.reopened = 0        # times the session was opened again on a restarted server
        self.resent = 0          # generation steps whose KV cache the server had lost: the prefix went again
        self.last_step = {}      # the newest reply to step(): delta norms of the trunk LoRA
        self.messages = deque(maxlen=1000)  # what crossed the wire: op, shapes and bytes each way
        self.log_tensors = log_tensors  # True: each message also keeps the tensors sent, as the server decodes them
        self._ids = itertools.count()
        self._keys = itertools.count()
        self._generations = itertools.count()
        self._hello = None       # what the handshake said, to say it again after a restart
        self._trunk_lora = None  # (names, tensors): the newest trunk LoRA, restored after a restart
        self._ctx = zmq.Context.instance()
        self._sock = None
        self._monitor = None  # with keys: the socket's handshake failures, to say a refusal as one

    # ------------------------------------------------------------------ the ops

    def hello(self, model, cuts, mode: str = P.DETACH, lora=None, lr: float | None = None) -> dict:
        """The handshake: open this client's session for `model` split at `cuts`; refused, with what
        differs, if the model is not the server's (compared by fingerprint, not by name)."""
        hello = {"op": P.HELLO, "model": model.config.name_or_path, "cuts": list(cuts),
                 "hidden_size": model.config.hidden_size, "fingerprint": fingerprint(model, cuts),
                 "mode": mode, "lora": None if lora is None else lora.to_json(), "lr": lr,
                 "wire_dtype": self.wire_dtype}
        header, _ = self._call(dict(hello), reopen=False)
        self._hello = hello  # a refused hello opens no session: nothing to say bye to, or to reopen
        if mode == P.FULL_TRUNK:  # the server drew the Trunk LoRA from a seed of its own: keep it for a restart
            state = self.trunk_lora()
            self._trunk_lora = (list(state), list(state.values()))
        return header

    def forward(self, h1: torch.Tensor, key: int | None = None, pad: list | None = None) -> torch.Tensor:
        """h2 = Trunk(h1). With a `key`, the server keeps the graph under it for the backward; with `pad`
        (each row's left padding), padding is masked out and positions start at each row's first token."""
        header = {"op": P.FORWARD, **_given(key=key, pad=pad)}
        _, (h2,) = self._call(header, [h1])
        return h2.to(h1.dtype)

    def backward(self, g2: torch.Tensor, key: int, h1: torch.Tensor | None = None,
                 pad: list | None = None) -> torch.Tensor:
        """dL/dh1 from dL/dh2. If the server lost the state, send h1 (and its forward's `pad`) so that it recomputes."""
        try:
            _, (g1,) = self._call({"op": P.BACKWARD, "key": key}, [g2])
        except TrunkError as e:
            if e.code != P.STATE_MISSING or h1 is None:
                raise
            _, (g1,) = self._call({"op": P.BACKWARD, "key": key, **_given(pad=pad)}, [g2, h1])
        return g1.to(g2.dtype)

    def infer(self, h1: torch.Tensor, gen: int, start: int, pad: list | None = None,
              prefix: torch.Tensor | Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
        """h2 for positions [start, start + T) of generation `gen`, the server keeping the Trunk's KV cache.
        `start` 0 begins a generation (rows left-padded by `pad`); if the server lost the cache, `prefix`
        (the h1 of positions [0, start)) is sent again with h1, and the server builds the cache anew.
        `prefix` may be a function that returns it: it is called only then, when the prefix must go again."""
        try:
            _, (h2,) = self._call({"op": P.INFER, "gen": gen, "start": start, **_given(pad=pad)}, [h1])
        except TrunkError as e:
            if e.code != P.CACHE_MISSING or prefix is None:
                raise
            self.resent += 1
            prefix = prefix() if callable(prefix) else prefix  # (B, start, d)
            _, (h2,) = self._call({"op": P.INFER, "gen": gen, "start": 0, **_given(pad=pad)},
                                  [torch.cat([prefix, h1], dim=1)])
            h2 = h2[:, start:]  # (B, T, d): the new positions
        return h2.to(h1.dtype)

    def release(self, gen: int) -> bool:
        """Drop generation `gen`'s KV cache on the server; say whether it still had one."""
        header, _ = self._call({"op": P.RELEASE, "gen": gen})
        return header["released"]

    def new_generation(self) -> int:
        return next(self._generations)

    def step(self) -> dict:
        """Apply the trunk LoRA's optimizer on the server (full+trunk); keep a copy of the new LoRA."""
        header, tensors = self._call({"op": P.STEP})
        self._trunk_lora = (header["names"], tensors)
        self.last_step = header
        return header

    def trunk_lora(self) -> dict:
        """{name: tensor} of this session's trunk LoRA, to save or inspect."""
        header, tensors = self._call({"op": P.LORA_STATE})
        return dict(zip(header["names"], tensors, strict=True))

    def load_lora(self, state: dict) -> dict:
        """Replace this session's trunk LoRA with {name: tensor} (a federated round's average, say); the
        server's optimizer for it starts afresh."""
        names, tensors = list(state), [t.detach().float() for t in state.values()]
        header, _ = self._call({"op": P.LOAD_LORA, "names": names}, tensors, dtype="float32")  # never rounded
        self._trunk_lora = (names, tensors)
        return header

    def stats(self) -> dict:
        header, _ = self._call({"op": P.STATS}, reopen=False)
        return header

    def close(self):
        """Say bye (best effort: one try, at most 1 s) and close the socket; the client's settings stay as they were."""
        if self._hello is not None and self._sock is not None:
            timeout, retries = self.timeout, self.retries
            self.timeout, self.retries = min(timeout, 1.0), 0
            try:
                self._call({"op": P.BYE}, reopen=False)
            except TrunkError:
                pass  # the session times out on the server anyway
            finally:
                self.timeout, self.retries = timeout, retries
        self._close_socket()

    def new_key(self) -> int:
        return next(self._keys)

    # ------------------------------------------------------------------ the Lazy Pirate

    def _call(self, header: dict, tensors=(), reopen: bool = True, dtype: str | None = None):
        """Send one request and return (header, tensors) of its reply; reopen the session if the server lost it."""
        for _ in range(3):
            try:
                return self._request(header, tensors, dtype)
            except TrunkError as e:
                if e.code != P.UNKNOWN_SESSION or not reopen or self._hello is None:
                    raise
                self._reopen()
        raise TrunkError(f"{self.address} keeps losing this session", P.UNKNOWN_SESSION)

    def _reopen(self):
        """After a server restart: open the same session again, with the trunk LoRA as we last saw it."""
        names, tensors = self._trunk_lora or (None, ())
        self._request(dict(self._hello, names=names), tensors, dtype="float32")  # the LoRA as it was, not rounded
        self.reopened += 1

    def _request(self, header: dict, tensors=(), dtype: str | None = None):
        header = dict(header, session=self.session, id=next(self._ids))
        frames = wire.encode(header, tensors, dtype=dtype or self.wire_dtype)
        sent_none, refused = True, None  # no try got its request out: no connection was made; why, if known
        for _ in range(self.retries + 1):
            deadline = time.monotonic() + self.timeout  # one try: its send and its wait for the reply, together
            sock = self._socket()
            try:
                sock.send_multipart(frames, copy=False)  # bounded by SNDTIMEO: raises zmq.Again when no peer took it
            except zmq.Again:
                refused = self._refused() or refused
                self._close_socket()
                continue
            sent_none = False
            self.bytes_sent += wire.nbytes(frames)
            if sock.poll(max(0.0, deadline - time.monotonic()) * 1000):
                reply = sock.recv_multipart(copy=False)
                self.bytes_received += wire.nbytes(reply)
                rh, rt = self._decode_reply(reply, header, [t.shape for t in tensors])
                self.messages.append({"op": header["op"], "sent": [list(t.shape) for t in tensors],
                                      "sent_bytes": wire.nbytes(frames), "received": [list(t.shape) for t in rt],
                                      "received_bytes": wire.nbytes(reply), "dtype": dtype or self.wire_dtype,
                                      "code": None if rh.get("ok") else rh.get("code"),
                                      **({"tensors": wire.decode(frames)[1]} if self.log_tensors else {})})
                if not rh.get("ok"):
                    raise TrunkError(f"trunk server at {self.address}: {rh.get('error')}", rh.get("code", "?"))
                return rh, rt
            self._close_socket()  # a REQ socket that got no reply cannot send again: start afresh
        if refused and sent_none:
            raise TrunkUnavailable(refused)
        raise TrunkUnavailable(
            f"no answer from the trunk server at {self.address} to {header['op']!r} within "
            f"{self.timeout:g} s, {self.retries + 1} tries"
            + (" (no connection was made: nothing listening there, or a handshake that failed)" if sent_none else "")
            + f". Is trunk_server.py running there, with the same address{' and keys' if self.curve_dir else ''}? "
              "(python trunk_server.py --help)"
            + ("" if self.curve_dir else " A server run with --curve-dir answers no client without a key: "
                                         + NO_KEY_ADVICE))

    def _decode_reply(self, reply, header: dict, sent: list) -> tuple[dict, list]:
        """The reply's (header, tensors), checked: a malformed reply, or one to another request, is a TrunkError."""
        try:
            rh, rt = wire.decode(reply)
        except wire.WireError as e:
            raise TrunkError(f"trunk server at {self.address} sent a malformed reply to {header['op']!r}: {e}",
                             P.BAD_REPLY) from None
        if not isinstance(rh.get("ok"), bool):
            raise TrunkError(f"trunk server at {self.address} sent a reply to {header['op']!r} without a "
                             "true or false 'ok'", P.BAD_REPLY)
        if rh.get("id") != header["id"] and not (rh.get("id") is None and rh["ok"] is False):
            raise TrunkError(f"trunk server at {self.address} answered request {rh.get('id')!r} where "
                             f"{header['id']} ({header['op']!r}) was asked", P.BAD_REPLY)
        if rh["ok"] and (problem := P.check_reply(header["op"], rh, rt, sent)):
            raise TrunkError(f"trunk server at {self.address} sent a reply to {header['op']!r} that does not "
                             f"fit: {problem}", P.BAD_REPLY)
        return rh, rt

    def _socket(self):
        if self._sock is None:
            sock = self._ctx.socket(zmq.REQ)
            sock.linger = 0
            # A REQ socket's send blocks while it has no peer, and a refused CURVE handshake leaves it none for
            # good: IMMEDIATE queues a request only on a connection whose handshake is done, and SNDTIMEO bounds
            # the wait for one, so that a send too ends within the timeout.
            sock.immediate = True
            sock.sndtimeo = max(1, int(self.timeout * 1000))
            sock.maxmsgsize = MAX_REPLY_BYTES  # a bigger reply drops the connection unread: no allocation of it
            if self.curve_dir is not None:
                connect_curve(sock, self.curve_dir)
                self._monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH)
            sock.connect(self.address)
            self._sock = sock
        return self._sock

    def _refused(self) -> str | None:
        """Why no connection was made, if the server said so: a CURVE handshake refused for this key."""
        if self._monitor is None or not self._monitor.poll(0):
            return None
        return (f"the trunk server at {self.address} refused this client's key ({self.curve_dir}) in the CURVE "
                "handshake: it is not authorized there, or not any more. Ask your teacher whether your key was "
                "withdrawn, or whether the folder is the one they gave you.")

    def _close_socket(self):
        if self._sock is not None:
            if self._monitor is not None:
                self._sock.disable_monitor()
                self._monitor.close(linger=0)
                self._monitor = None
            self._sock.close(linger=0)
            self._sock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _given(**fields) -> dict:
    """The optional header fields that have a value."""
    return {k: v for k, v in fields.items() if v is not None}
