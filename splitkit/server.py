"""The trunk server: the middle blocks of the model behind a ZeroMQ ROUTER socket.

Reliable request-reply in the spirit of the zguide's lpserver.py (which pairs with the
Lazy Pirate client in client.py), as an importable class: a notebook starts it in a thread
with `TrunkServer(model, cuts).start()`, `trunk_server.py` runs it from the command line.
Ops: hello, forward, backward, step, lora_state, stats, bye (see docs/protocol.md).
"""

import copy
import logging
import math
import os
import random
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from ipaddress import ip_address
from pathlib import Path

import torch
import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from . import wire
from .split import LoraSpec, add_adapter, add_lora, check_cuts, lora_delta_norms, lora_layers, split_model

log = logging.getLogger("splitkit.server")

DEFAULT_BIND = "tcp://127.0.0.1:5555"
POLL_MS = 100               # how often the loop looks up from the socket to sweep and to stop
MAX_MESSAGE_BYTES = 256 << 20  # ZMQ_MAXMSGSIZE: a peer that sends a bigger frame is disconnected
MAX_TOKENS = 64 * 1024      # batch x tokens in one request
STATES_PER_SESSION = 4      # forward states kept for a later backward
STATES_TOTAL = 32
STATE_MAX_AGE_S = 300.0
MAX_SESSIONS = 128
SESSION_IDLE_S = 3600.0
MODES = ("forward", "full", "full+trunk")
OPS = ("hello", "forward", "backward", "step", "lora_state", "stats", "bye")


class Refused(Exception):
    """A request the server answers with an error reply; `code` tells the client what to do."""

    def __init__(self, message: str, code: str = "bad_request"):
        super().__init__(message)
        self.code = code


@dataclass
class Faults:
    """Simulated failures (zguide lpserver.py style): lost and late replies, a crash after N requests."""

    drop: float = 0.0        # probability that a reply is never sent
    delay: float = 0.0       # probability that a reply is sent late...
    delay_s: float = 1.0     # ...by this many seconds
    crash_after: int = 0     # stop dead after this many requests (0: never)
    seed: int = 0

    @classmethod
    def parse(cls, text: str) -> "Faults":
        """'drop=0.1,delay=0.2,delay_s=2,crash_after=50' -> Faults."""
        kwargs = {}
        for item in filter(None, text.split(",")):
            name, _, value = item.partition("=")
            name = name.strip().replace("-", "_")
            if name not in cls.__dataclass_fields__:
                raise ValueError(f"unknown fault {name!r}; known: {', '.join(cls.__dataclass_fields__)}")
            kwargs[name] = type(getattr(cls, name))(value)
        return cls(**kwargs)


@dataclass
class Session:
    """One client's state: its forward states, its last reply, and in full+trunk its own LoRA."""

    id: str
    mode: str
    lora: LoraSpec | None = None
    lr: float = 0.0
    optimizer: torch.optim.Optimizer | None = None
    states: OrderedDict = field(default_factory=OrderedDict)  # key -> (h1, h2, time)
    last_id: int = -1
    last_reply: list | None = None
    seen: float = field(default_factory=time.monotonic)
    steps: int = 0


def is_loopback(address: str) -> bool:
    if address.startswith(("ipc://", "inproc://")):
        return True
    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ip_address(host).is_loopback
    except ValueError:
        return False


class TrunkServer:
    """Serves blocks [a, b) of `model` to any number of clients, one session each."""

    def __init__(self, model, cuts, bind: str = DEFAULT_BIND, device: str = "cpu", name: str | None = None,
                 curve_dir: str | Path | None = None, insecure: bool = False, faults: Faults | None = None,
                 max_tokens: int = MAX_TOKENS, states_per_session: int = STATES_PER_SESSION,
                 states_total: int = STATES_TOTAL, state_max_age: float = STATE_MAX_AGE_S,
                 max_sessions: int = MAX_SESSIONS, session_idle: float = SESSION_IDLE_S):
        if min(states_per_session, states_total, max_sessions) < 0:
            raise ValueError("states_per_session, states_total and max_sessions cannot be negative")
        if not is_loopback(bind) and curve_dir is None and not insecure:
            raise ValueError(f"refusing to bind {bind}: anyone who can reach it could use the server. "
                             f"Give CURVE keys (--curve-dir, made by `python -m splitkit keys DIR`) "
                             f"or say --insecure if this network is trusted.")
        if not is_loopback(bind) and curve_dir is None:
            log.warning("serving %s WITHOUT encryption or authentication (--insecure)", bind)
        self.config = model.config
        self.name = name or model.config.name_or_path
        self.cuts = check_cuts(cuts, model.config.num_hidden_layers)
        self.hidden_size = model.config.hidden_size
        self.device = torch.device(device)
        # A private copy of the blocks, as on a separate machine; the client's LoRA never reaches it.
        self.trunk = copy.deepcopy(split_model(model, self.cuts).trunk).to(self.device).requires_grad_(False)
        self.peft = None  # the PeftModel around self.trunk once a full+trunk session exists
        self.bind, self.curve_dir, self.faults = bind, curve_dir, faults or Faults()
        self.max_tokens, self.states_per_session, self.states_total = max_tokens, states_per_session, states_total
        self.state_max_age, self.max_sessions, self.session_idle = state_max_age, max_sessions, session_idle
        self.sessions: dict[str, Session] = {}
        self.counters = dict(requests=0, errors=0, bytes_in=0, bytes_out=0, dropped=0, recomputed=0)
        self.address = None
        self._random = random.Random(self.faults.seed)
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = None
        self._started = time.monotonic()

    # ------------------------------------------------------------------ running

    def start(self) -> str:
        """Serve in a background thread; return the bound address (a `*` port is resolved)."""
        self._thread = threading.Thread(target=self.serve_forever, name="trunk-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError(f"trunk server did not start on {self.bind}")
        if self._error:
            raise self._error
        return self.address

    def stop(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    _error = None

    def serve_forever(self):
        ctx = zmq.Context()
        auth = None
        sock = ctx.socket(zmq.ROUTER)
        sock.linger = 0
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        try:
            if self.curve_dir is not None:
                auth = ThreadAuthenticator(ctx)
                auth.start()
                auth.configure_curve(domain="*", location=str(Path(self.curve_dir) / "authorized"))
                sock.curve_publickey, sock.curve_secretkey = zmq.auth.load_certificate(Path(self.curve_dir) / "server.key_secret")
                sock.curve_server = True
            sock.bind(self.bind)
            self.address = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        except Exception as e:  # reported to start(), and to the command line
            self._error = RuntimeError(f"cannot serve on {self.bind}: {e}")
            self._ready.set()
            sock.close()
            ctx.term()
            raise self._error from e
        log.info("trunk blocks [%d, %d) of %s on %s, serving %s", *self.cuts, self.name, self.device, self.address)
        self._ready.set()
        try:
            while not self._stop.is_set():
                if sock.poll(POLL_MS):
                    frames = sock.recv_multipart(copy=False)
                    if self._crash_due():
                        log.error("simulated crash after %d requests", self.counters["requests"])
                        break
                    self._serve_one(sock, frames)
                self._sweep()
        finally:
            sock.close()
            if auth is not None:
                auth.stop()
            ctx.term()

    def _crash_due(self) -> bool:
        return bool(self.faults.crash_after) and self.counters["requests"] >= self.faults.crash_after

    def _serve_one(self, sock, frames):
        self.counters["requests"] += 1
        self.counters["bytes_in"] += wire.nbytes(frames[1:])
        # Envelope: the peer identity, then an empty delimiter from a REQ socket.
        split_at = 2 if len(frames) > 1 and len(frames[1]) == 0 else 1
        envelope, body = [f.bytes for f in frames[:split_at]], frames[split_at:]
        reply = self.handle(body)
        if self.faults.drop and self._random.random() < self.faults.drop:
            self.counters["dropped"] += 1
            return
        if self.faults.delay and self._random.random() < self.faults.delay:
            time.sleep(self.faults.delay_s)
        self.counters["bytes_out"] += wire.nbytes(reply)
        sock.send_multipart(envelope + reply, copy=False)

    def handle(self, frames) -> list:
        """Frames of one request -> frames of its reply. Never raises."""
        header = {}
        try:
            header, tensors = wire.decode(frames)
            return self._dispatch(header, tensors)
        except (wire.WireError, Refused) as e:
            code, error = getattr(e, "code", "bad_request"), str(e)
        except Exception as e:  # a bug must not take the class down: log it, answer, go on
            log.exception("internal error on %r", header.get("op"))
            code, error = "internal", f"internal error: {type(e).__name__}: {e}"
        self.counters["errors"] += 1
        log.info("refused %s: %s", header.get("op", "?"), error)
        return wire.encode({"ok": False, "code": code, "error": error, "id": _safe_id(header)})

    # ------------------------------------------------------------------ the ops

    def _dispatch(self, header: dict, tensors: list) -> list:
        op = header.get("op")
        if op not in OPS:
            raise Refused(f"unknown op {op!r}; this server knows {', '.join(OPS)}")
        if op == "stats":
            return wire.encode({"ok": True, **self.stats()})
        sid, rid = header.get("session"), header.get("id")
        if not (isinstance(sid, str) and 16 <= len(sid) <= 64 and sid.isalnum()):
            raise Refused("'session' must be an alphanumeric string of 16 to 64 characters")
        if type(rid) is not int or rid < 0:
            raise Refused("'id' must be a non-negative integer")
        if op == "hello":
            session = self.sessions.get(sid) or self._open(sid, header, tensors)
        else:
            session = self.sessions.get(sid)
            if session is None:
                raise Refused(f"no session {sid[:8]}… here (the server restarted or dropped it): say hello again",
                              "unknown_session")
        session.seen = time.monotonic()
        if rid == session.last_id:  # a retry: answer it again, never apply it twice
            return session.last_reply
        if rid < session.last_id:
            raise Refused(f"request {rid} is older than {session.last_id}, already answered", "stale")
        reply = getattr(self, f"_op_{op}")(session, header, tensors)
        session.last_id, session.last_reply = rid, reply
        return reply

    def _open(self, sid: str, header: dict, tensors: list) -> Session:
        self._check_fit(header)
        mode = header.get("mode")
        if mode not in MODES:
            raise Refused(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        self._sweep()
        if len(self.sessions) >= self.max_sessions:
            raise Refused(f"the server holds {len(self.sessions)} sessions, its limit; try again later", "busy")
        session = Session(sid, mode)
        if mode == "full+trunk":
            session.lora, session.lr = _lora_spec(header.get("lora")), header.get("lr")
            if not isinstance(session.lr, (int, float)) or not 0 < session.lr < 1:
                raise Refused("full+trunk needs a learning rate 'lr' between 0 and 1")
            self._add_adapter(session, header, tensors)
        self.sessions[sid] = session
        log.info("session %s… opened (%s), %d open", sid[:8], mode, len(self.sessions))
        return session

    def _check_fit(self, header: dict):
        """The handshake: refuse a client whose Bottom/Top do not fit this Trunk."""
        theirs = (header.get("model"), header.get("cuts"), header.get("hidden_size"))
        ours = (self.name, list(self.cuts), self.hidden_size)
        if theirs != ours:
            raise Refused(f"this server runs blocks [{self.cuts[0]}, {self.cuts[1]}) of {self.name} "
                          f"(hidden size {self.hidden_size}); the client has model={theirs[0]!r}, "
                          f"cuts={theirs[1]!r}, hidden_size={theirs[2]!r}. Split the client's model at "
                          f"cuts={self.cuts} or start a server that matches.", "mismatch")

    def _add_adapter(self, session: Session, header: dict, tensors: list):
        name = f"s{session.id}"
        try:
            if self.peft is None:
                self.peft = add_lora(self.trunk, session.lora, self.config, adapter=name)
            else:
                add_adapter(self.peft, session.lora, self.config, name)
        except ValueError as e:
            raise Refused(f"cannot put LoRA on the trunk: {e}") from None
        if tensors:  # the client's copy of its trunk LoRA, after a server restart
            self._restore(name, header.get("names"), tensors)
        params = [p for n, p in self.peft.named_parameters() if f".{name}." in n]
        session.optimizer = torch.optim.AdamW(params, lr=session.lr, weight_decay=0.0)

    def _restore(self, adapter: str, names, tensors: list):
        params = dict(self._lora_params(adapter))
        if not isinstance(names, list) or sorted(map(str, names)) != sorted(params) or len(names) != len(tensors):
            self._drop_adapter(adapter)
            raise Refused("the LoRA state sent with hello does not match this trunk's LoRA layers")
        with torch.no_grad():
            for n, t in zip(names, tensors):
                wrong = (f"has shape {list(t.shape)}, expected {list(params[n].shape)}" if t.shape != params[n].shape
                         else "contains NaN or infinity" if not wire.all_finite(t) else None)
                if wrong:
                    self._drop_adapter(adapter)
                    raise Refused(f"LoRA tensor {n} {wrong}")
                params[n].copy_(t)

    def _lora_params(self, adapter: str):
        for key, layer in lora_layers(self.peft, adapter).items():
            for ab in ("lora_A", "lora_B"):
                yield f"{key}.{ab}", getattr(layer, ab)[adapter].weight

    def _op_hello(self, session: Session, header: dict, tensors: list) -> list:
        a, b = self.cuts
        return wire.encode({"ok": True, "id": header["id"], "session": session.id, "mode": session.mode,
                            "model": self.name, "cuts": [a, b], "hidden_size": self.hidden_size,
                            "device": str(self.device)})

    def _op_forward(self, session: Session, header: dict, tensors: list) -> list:
        (h1,) = self._hidden(tensors, 1)
        keep = header.get("keep", False) is True
        if keep and session.mode == "forward":
            raise Refused("this session was opened in forward mode; open it in 'full' mode to keep states")
        if keep:
            key = _key(header)
            h1, h2 = self._forward_with_graph(session, h1)
            self._store(session, key, h1, h2)
        else:
            with torch.no_grad():
                h2 = self._run(session, h1.to(self.device, torch.float32))
        return wire.encode({"ok": True, "id": header["id"]}, [h2], dtype=tensors[0].dtype)

    def _op_backward(self, session: Session, header: dict, tensors: list) -> list:
        if session.mode == "forward":
            raise Refused("this session was opened in forward mode; there is nothing to differentiate")
        key = _key(header)
        tensors = self._hidden(tensors, (1, 2))
        g2 = tensors[0].to(self.device, torch.float32)
        state = session.states.pop(key, None)
        if state is None:
            if len(tensors) < 2:
                raise Refused(f"no forward state {key} here (evicted, or the server restarted): "
                              f"send h1 with the backward", "state_missing")
            self.counters["recomputed"] += 1
            h1, h2 = self._forward_with_graph(session, tensors[1])
        else:
            h1, h2, _ = state
        if g2.shape != h2.shape:
            raise Refused(f"dL/dh2 has shape {list(g2.shape)}, the forward gave {list(h2.shape)}")
        if session.mode == "full+trunk":
            self.peft.set_adapter(f"s{session.id}")
        torch.autograd.backward(h2, g2)
        return wire.encode({"ok": True, "id": header["id"]}, [h1.grad], dtype=tensors[0].dtype)

    def _op_step(self, session: Session, header: dict, tensors: list) -> list:
        if session.mode != "full+trunk":
            raise Refused("only a full+trunk session trains the trunk's LoRA")
        adapter = f"s{session.id}"
        params = [p for g in session.optimizer.param_groups for p in g["params"]]
        applied = any(p.grad is not None for p in params)
        if applied:
            session.optimizer.step()
            session.optimizer.zero_grad(set_to_none=True)
            session.steps += 1
        names, values = zip(*self._lora_params(adapter))
        return wire.encode({"ok": True, "id": header["id"], "applied": applied, "steps": session.steps,
                            "delta_norms": lora_delta_norms(self.peft, adapter), "names": list(names)}, values)

    def _op_lora_state(self, session: Session, header: dict, tensors: list) -> list:
        if session.mode != "full+trunk":
            raise Refused("only a full+trunk session has a trunk LoRA")
        names, values = zip(*self._lora_params(f"s{session.id}"))
        return wire.encode({"ok": True, "id": header["id"], "names": list(names)}, values)

    def _op_bye(self, session: Session, header: dict, tensors: list) -> list:
        self._close(session)
        return wire.encode({"ok": True, "id": header["id"]})

    # ------------------------------------------------------------------ helpers

    def _hidden(self, tensors: list, count) -> list:
        """Check hidden-state tensors: (B, T, d) with this trunk's d, within limits, finite."""
        counts = count if isinstance(count, tuple) else (count,)
        if len(tensors) not in counts:
            raise Refused(f"expected {' or '.join(map(str, counts))} tensor(s), got {len(tensors)}")
        for t in tensors:
            if t.dim() != 3 or t.shape[-1] != self.hidden_size:
                raise Refused(f"hidden states must be (B, T, {self.hidden_size}), got {list(t.shape)}")
            if t.shape[0] * t.shape[1] > self.max_tokens:
                raise Refused(f"{t.shape[0]} x {t.shape[1]} tokens is over this server's limit of {self.max_tokens}")
            if not wire.all_finite(t):
                raise Refused("hidden states contain NaN or infinity")
        if len(tensors) == 2 and tensors[0].shape != tensors[1].shape:
            raise Refused(f"dL/dh2 {list(tensors[0].shape)} and h1 {list(tensors[1].shape)} differ in shape")
        return tensors

    def _run(self, session: Session, h1):
        if session.mode == "full+trunk":
            self.peft.set_adapter(f"s{session.id}")
            return self.peft(h1)
        if self.peft is not None:
            with self.peft.disable_adapter():
                return self.trunk(h1)
        return self.trunk(h1)

    def _forward_with_graph(self, session: Session, h1):
        h1 = h1.to(self.device, torch.float32).requires_grad_(True)
        with torch.enable_grad():
            h2 = self._run(session, h1)
        return h1, h2

    def _store(self, session: Session, key: int, h1, h2):
        session.states[key] = (h1, h2, time.monotonic())
        while len(session.states) > self.states_per_session:
            session.states.popitem(last=False)
        while sum(len(s.states) for s in self.sessions.values()) > self.states_total:
            oldest = min((s for s in self.sessions.values() if s.states),
                         key=lambda s: next(iter(s.states.values()))[2])
            oldest.states.popitem(last=False)

    def _sweep(self):
        now = time.monotonic()
        for s in list(self.sessions.values()):
            if now - s.seen > self.session_idle:
                log.info("session %s… idle for %.0f s, closed", s.id[:8], now - s.seen)
                self._close(s)
                continue
            for key in [k for k, (_, _, t) in s.states.items() if now - t > self.state_max_age]:
                del s.states[key]

    def _close(self, session: Session):
        self.sessions.pop(session.id, None)
        if session.mode == "full+trunk" and self.peft is not None:
            self._drop_adapter(f"s{session.id}")

    def _drop_adapter(self, adapter: str):
        if list(self.peft.peft_config) == [adapter]:  # the last one: back to the plain trunk
            self.trunk, self.peft = self.peft.unload(), None
        else:
            self.peft.delete_adapter(adapter)

    def stats(self) -> dict:
        return {"model": self.name, "cuts": list(self.cuts), "sessions": len(self.sessions),
                "states": sum(len(s.states) for s in self.sessions.values()),
                "uptime_s": round(time.monotonic() - self._started, 1), **self.counters}


def _key(header: dict) -> int:
    key = header.get("key")
    if type(key) is not int or key < 0:
        raise Refused("'key' (the step's state key) must be a non-negative integer")
    return key


def _safe_id(header: dict):
    rid = header.get("id") if isinstance(header, dict) else None
    return rid if type(rid) is int else None


def _lora_spec(obj) -> LoraSpec:
    if not isinstance(obj, dict):
        raise Refused("full+trunk needs a 'lora' object {r, lora_alpha, target_modules, seed, init_b}")
    r, alpha, seed, init_b = obj.get("r"), obj.get("lora_alpha"), obj.get("seed", 0), obj.get("init_b", 0.0)
    targets = obj.get("target_modules")
    if type(r) is not int or not 1 <= r <= 256 or type(alpha) not in (int, float) or not 0 < alpha <= 4096:
        raise Refused("lora: r must be an integer in [1, 256] and lora_alpha a number in (0, 4096]")
    if type(seed) is not int or type(init_b) not in (int, float) or not (0 <= init_b < 10) or math.isnan(init_b):
        raise Refused("lora: seed must be an integer and init_b a number in [0, 10)")
    if targets is not None and (not isinstance(targets, list) or not 0 < len(targets) <= 16
                                or not all(isinstance(t, str) and t.isidentifier() for t in targets)):
        raise Refused("lora: target_modules must be a list of up to 16 module names")
    return LoraSpec(r=r, lora_alpha=alpha, seed=seed, init_b=float(init_b),
                    target_modules=None if targets is None else tuple(targets))


def connect_or_start(model, cuts, **options) -> str:
    """The trunk server a notebook should use: $SPLITKIT_TRUNK if set (a `trunk_server.py`
    started separately), else a new TrunkServer on a free loopback port in a background thread."""
    address = os.environ.get("SPLITKIT_TRUNK")
    if address:
        return address
    return TrunkServer(model, cuts, bind="tcp://127.0.0.1:*", **options).start()


def make_keys(folder) -> Path:
    """Server and client CURVE key pairs in `folder`; the client's public key is authorized."""
    folder = Path(folder)
    (folder / "authorized").mkdir(parents=True, exist_ok=True)
    zmq.auth.create_certificates(folder, "server")
    public, _ = zmq.auth.create_certificates(folder, "client")
    os.replace(public, folder / "authorized" / "client.key")
    return folder
