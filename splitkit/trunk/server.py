"""The trunk server: the middle blocks of the model behind a ZeroMQ ROUTER socket.

Built like the zguide's Majordomo broker (mdbroker.py): one loop that polls the socket, and one short
method per op. It pairs with the Lazy Pirate client in client.py: the newest reply of each session is
kept, so a retried request is answered again, never run twice. docs/protocol.md has the messages.
"""

import logging
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass

import torch

from ..core.lora import lora_delta_norms
from ..core.models import fingerprint
from ..core.split import check_cuts
from ..wire import codec as wire
from ..wire import protocol as P
from ..wire.client import PROBE_TIMEOUT
from ..wire.protocol import Refused
from ..wire.remote import class_server
from .endpoint import Endpoint, in_a_thread_of_its_own, on_one_thread, rss_bytes
from .faults import Faults
from .sessions import Limits, Session, Sessions, State

log = logging.getLogger("splitkit.trunk.server")

DEFAULT_BIND = "tcp://127.0.0.1:5555"
POLL_MS = 100  # how often the loop looks up from the socket to sweep and to stop


class TrunkServer:
    """Serves blocks [a, b) of `model` to any number of clients, one session each. `lora_seed`: every Trunk LoRA's
    start (None: a secret one per session); an infer of at most `one_thread_up_to` rows x positions: one thread."""

    def __init__(self, model, cuts, bind: str = DEFAULT_BIND, device: str = "cpu", limits: Limits | None = None,
                 faults: Faults | None = None, curve_dir=None, insecure: bool = False, lora_seed: int | None = None,
                 one_thread_up_to: int = 0):
        self.endpoint = Endpoint(bind, curve_dir, insecure)  # the address checked now, bound when serving starts
        self.name, self.hidden_size = model.config.name_or_path, model.config.hidden_size
        self.cuts = check_cuts(cuts, model.config.num_hidden_layers)
        self.fingerprint = fingerprint(model, self.cuts)  # what the handshake compares, not the name
        self.device = torch.device(device)
        self.limits, self.faults, self.one_thread_up_to = limits or Limits(), faults or Faults(), one_thread_up_to
        self.identity = dict(model=self.name, cuts=list(self.cuts), hidden_size=self.hidden_size,
                             fingerprint=self.fingerprint, device=str(self.device), limits=vars(self.limits),
                             batch_window_ms=None)  # a BatchingServer's window: results then within float rounding
        self.sessions = Sessions.of(model, self.cuts, self.device, self.limits, lora_seed)  # a private copy
        self.counters = dict(requests=0, errors=0, bytes_in=0, bytes_out=0, dropped=0, recomputed=0)
        self.answered, self.refused = Counter(), Counter()  # op -> requests answered ok; code -> refusals
        self._random = random.Random(self.faults.seed)
        self._stop, self._thread, self._started = threading.Event(), None, time.monotonic()

    @property
    def address(self) -> str | None:
        return self.endpoint.address  # the bound address (a `*` port resolved), once serving

    # ------------------------------------------------------------------ the loop

    def start(self) -> str:
        """Serve in a background thread; return the bound address (a `*` port is resolved)."""
        self._thread = threading.Thread(target=self.serve_forever, name="trunk-server", daemon=True)
        self._thread.start()
        return self.endpoint.wait(30)  # once bound; the error that kept it from binding is raised here

    def stop(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def serve_forever(self):
        with self.endpoint.open() as endpoint:  # a failure to bind is raised here, and by start()
            log.info("trunk blocks [%d, %d) of %s on %s, serving %s", *self.cuts, self.name, self.device, self.address)
            while not self._stop.is_set():
                message = endpoint.receive(POLL_MS)  # (envelope, body), or None if nothing came
                if message is not None:
                    if self.faults.crashes(self.counters["requests"]):
                        break
                    self.serve(endpoint, *message)
                self.sessions.sweep()

    def serve(self, endpoint: Endpoint, envelope: list, body: list):
        """Answer one request (splitkit.trunk.batching.BatchingServer serves the ones waiting with it too)."""
        self.counters["requests"] += 1
        self.counters["bytes_in"] += wire.nbytes(body)
        self.send(endpoint, envelope, self.compute(lambda: self.handle(body)))

    def compute(self, work):  # in a thread of its own when this server shares its process (in_a_thread_of_its_own)
        return work() if self._thread is None else in_a_thread_of_its_own(work)

    def send(self, endpoint: Endpoint, envelope: list, reply: list):
        if self.faults.lost(self._random):  # a simulated lost reply (a late one was held back in there)
            self.counters["dropped"] += 1
            return
        self.counters["bytes_out"] += wire.nbytes(reply)
        endpoint.send(envelope, reply)

    def handle(self, frames) -> list:
        """Frames of one request -> frames of its reply. Never raises."""
        header = {}
        try:
            header, tensors = wire.decode(frames)
            return self._dispatch(header, tensors)
        except (wire.WireError, Refused) as e:
            header = getattr(e, "header", header)
            code, message = getattr(e, "code", P.BAD_REQUEST), str(e)
        except Exception as e:  # a bug must not take the class down: log it, answer, go on
            log.exception("internal error on %r", header.get("op"))
            code, message = P.INTERNAL, f"internal error: {type(e).__name__}: {e}"
        self.counters["errors"] += 1
        self.refused[code] += 1
        log.info("refused %s: %s", header.get("op", "?"), message)
        return wire.encode(P.error(header, code, message))  # not kept: a corrected request may reuse the id

    def _dispatch(self, header: dict, tensors: list) -> list:
        op = header.get("op")
        if op not in P.OPS:
            raise Refused(f"unknown op {op!r}; this server knows {', '.join(P.OPS)}")
        if op == P.STATS:
            self.answered[op] += 1
            return wire.encode(P.ok(header, **self.stats()))
        sid, rid = P.session_id(header), P.request_id(header)
        session = self.sessions.get(sid)
        if session is None and op == P.HELLO:
            P.check_fit(header, self.name, self.cuts, self.hidden_size, self.fingerprint)
            session = self.sessions.open(sid, *P.session_options(header), header.get("names"), tensors)
            log.info("session %s… opened (%s), %d open", sid[:8], session.mode, len(self.sessions))
        elif session is None:
            raise Refused(f"no session {sid[:8]}… here (the server restarted or dropped it): say hello again",
                          P.UNKNOWN_SESSION)
        session.heard()
        kept = session.replay(rid)  # a retry is answered again, never applied twice; an older id is refused
        if kept is not None:
            return kept
        reply = getattr(self, f"_{op}")(session, header, tensors)
        session.answered(rid, reply)
        self.answered[op] += 1
        return reply

    # ------------------------------------------------------------------ the ops

    def _hello(self, session: Session, header: dict, tensors: list) -> list:
        P.check_fit(header, self.name, self.cuts, self.hidden_size, self.fingerprint)
        if P.mode(header) != session.mode:  # a hello on an open session may not change it
            raise Refused(f"session {session.id[:8]}… is open in mode {session.mode}; say bye before changing it")
        return wire.encode(P.ok(header, session=session.id, mode=session.mode, wire_dtype=P.wire_dtype(header),
                                wire_dtypes=list(wire.WIRE_DTYPES), **self.identity))

    def _forward(self, session: Session, header: dict, tensors: list) -> list:
        (h1,) = self._hidden(tensors, (1,))                  # (B, T, d), as the client's Bottom gave it
        key = P.state_key(header) if "key" in header else None
        pad = P.padding(header, *h1.shape[:2])               # left padding of each row, or None
        if key is None:                                      # nothing kept: no backward will follow
            with torch.no_grad():
                h2 = self.sessions.run(session, h1.to(self.device, torch.float32), pad)
        elif session.mode == P.DETACH:
            raise Refused("this session was opened in detach mode; open it in 'full' mode to keep states")
        else:
            state = self._forward_with_graph(session, h1, pad)
            self.sessions.keep(session, key, state)
            h2 = state.h2
        return wire.encode(P.ok(header), [h2], dtype=_came_in(header))  # (B, T, d) in the wire dtype h1 came in

    def _infer(self, session: Session, header: dict, tensors: list) -> list:
        gen = P.generation(header)
        try:
            (h1,), start = self._hidden(tensors, (1,)), P.start(header)  # (B, T, d): a generation's new positions
            pad = P.padding(header, h1.shape[0], start + h1.shape[1])
            with on_one_thread(h1.shape[0] * h1.shape[1] <= self.one_thread_up_to):
                h2 = self.sessions.infer(session, gen, start, pad, h1.to(self.device, torch.float32))
        except Refused:
            self.sessions.release(session, gen)              # a refused step leaves no cache to go wrong with
            raise
        return wire.encode(P.ok(header), [h2], dtype=_came_in(header))  # (B, T, d)

    def _release(self, session: Session, header: dict, tensors: list) -> list:
        return wire.encode(P.ok(header, released=self.sessions.release(session, P.generation(header))))

    def _backward(self, session: Session, header: dict, tensors: list) -> list:
        if session.mode == P.DETACH:
            raise Refused("this session was opened in detach mode; there is nothing to differentiate")
        key = P.state_key(header)
        tensors = self._hidden(tensors, (1, 2))              # dL/dh2, and h1 if the client sends it again
        g2 = tensors[0].to(self.device, torch.float32)       # dL/dh2: (B, T, d)
        state = session.states.get(key)
        if state is None and len(tensors) < 2:
            raise Refused(f"no forward state {key} here (evicted, or the server restarted): "
                          f"send h1 with the backward", P.STATE_MISSING)
        if state is not None and g2.shape != state.own_h1.shape:
            raise Refused(f"dL/dh2 has shape {list(g2.shape)}, the forward gave {list(state.own_h1.shape)}")
        if state is None:                                    # the stateless fallback: recompute the forward
            self.counters["recomputed"] += 1
            state = self._forward_with_graph(session, tensors[1], P.padding(header, *g2.shape[:2]))
        session.pop(key)                                     # a state serves one backward, then it is gone
        (g1,) = self.sessions.backward([(session, state, g2)])  # the VJP: J^T · dL/dh2, J = dh2/dh1
        return wire.encode(P.ok(header), [g1], dtype=_came_in(header))  # dL/dh1: (B, T, d)

    def _step(self, session: Session, header: dict, tensors: list) -> list:
        applied = self.sessions.step(session)  # refused unless full+trunk; False if no backward came since the last
        names, values = self.sessions.lora_state(session)
        return wire.encode(P.ok(header, applied=applied, steps=session.steps, names=names,
                                delta_norms=lora_delta_norms(self.sessions.peft, session.adapter)), values)

    def _lora_state(self, session: Session, header: dict, tensors: list) -> list:
        names, values = self.sessions.lora_state(session)  # refused unless full+trunk
        return wire.encode(P.ok(header, names=names), values)

    def _load_lora(self, session: Session, header: dict, tensors: list) -> list:  # refused unless full+trunk
        self.sessions.load(session, header.get("names"), [t.to(self.device, torch.float32) for t in tensors])
        return wire.encode(P.ok(header, steps=session.steps))

    def _bye(self, session: Session, header: dict, tensors: list) -> list:
        self.sessions.close(session)
        return wire.encode(P.ok(header))

    # ------------------------------------------------------------------ helpers

    def _hidden(self, tensors: list, counts: tuple) -> list:
        return P.hidden_states(tensors, counts, self.hidden_size, self.limits.max_tokens)

    def _forward_with_graph(self, session: Session, h1, pad=None) -> State:
        h1 = h1.to(self.device, torch.float32).requires_grad_(True)  # a leaf: the backward leaves dL/dh1 in h1.grad
        with torch.enable_grad():
            return State(h1, self.sessions.run(session, h1, pad))  # h2 = Trunk(h1), graph kept

    def stats(self) -> dict:
        """What the server holds and has done: the counters, memory, and a line per open session."""
        now = time.monotonic()
        return {**self.identity, **self.sessions.totals(), "rss_bytes": rss_bytes(),
                "uptime_s": round(now - self._started, 1), **self.counters, "answered": dict(self.answered),
                "refused": dict(self.refused), **self.endpoint.key_counts(), **self.sessions.lines(now)}


def _came_in(header: dict) -> str:
    """The wire dtype of a request's first tensor: its reply goes back in the same one."""
    return header["tensors"][0]["dtype"]


@dataclass
class TrunkChoice:
    """The trunk server a notebook uses, and the line that says which and why."""

    address: str
    server: TrunkServer | None  # the one started here, in a thread; None: the class server ($SPLITKIT_TRUNK)
    line: str

    def stop(self):
        """Stop the server started here, if one was; the class server goes on."""
        if self.server is not None:
            self.server.stop()


def class_or_own(model, cuts, say=print, timeout: float = PROBE_TIMEOUT, exact: bool = False,
                 **options) -> TrunkChoice:
    """The class server named by $SPLITKIT_TRUNK if it runs `model` at `cuts` (asked, waiting `timeout` s at most;
    with `exact`, only if it serves each request alone), else a new TrunkServer(model, cuts, **options) on a free
    loopback port in a background thread. `say` gets the line that says which server and why (None: nothing)."""
    address, why = class_server(model, cuts, timeout, exact)
    if address is not None:
        choice = TrunkChoice(address, None, why)
    else:
        server = TrunkServer(model, cuts, bind="tcp://127.0.0.1:*", **options)
        address = server.start()
        choice = TrunkChoice(address, server, f"{why}: started a trunk server of this notebook's own on {address} "
                                              f"(cuts {tuple(cuts)})")
    if say is not None:
        say(choice.line)
    return choice


def connect_or_start(model, cuts, exact: bool = False, **options) -> str:
    """class_or_own's address, its line printed: the class server if it fits, else a server started here that runs
    until the kernel ends."""
    return class_or_own(model, cuts, exact=exact, **options).address
