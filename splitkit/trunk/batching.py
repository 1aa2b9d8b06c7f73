"""Requests of different sessions that wait together, run through the Trunk as one batch.

When several students work at once, their requests wait in the server's socket while it serves another. Served one
at a time, each pays the Trunk's cost per call (every block's weights read from memory for a few rows, and the
per-call work around it); gathered, the rows of all of them go through the Trunk in one call. Three kinds join:

- one-token generation steps (`infer`, `start` > 0, `full` or `detach`): each generation keeps its own KV cache;
  for the call the caches are left-padded to the longest and joined, the padding masked out and every row at its
  own position, as generate() pads a batch of prompts; afterwards they are split again;
- forwards kept for a backward (`full` and `full+trunk`): the shorter ones left-padded to the longest, one graph
  over all rows; each full+trunk session's rows go through its own LoRA adapter (PEFT's mixed-adapter batch), so
  that its adapter's gradient comes from its rows alone;
- the backwards of one such joined forward that come together: one backward with each one's dL/dh2 in its rows.
  The joined graph serves one backward: then it is let go, and a part whose backward comes alone or later is run
  again alone from its own h1 (a forward of its rows, then its backward), so a classmate's Trunk LoRA step in between
  changes nothing, and a student whose backward never comes holds the joined graph only until a classmate's does.

A student's h2, dL/dh1 and Trunk LoRA gradient equal what they get alone within float rounding (attention runs over
longer, masked rows, the matrix products over more rows), not bit for bit (tests/test_batching.py). Everything else
is served alone (retries, requests the usual path would refuse, a batch over the token limits, cache layers that are
not plain), and so is every request of a batch that fails: each then gets its own answer or its own error.
"""

import copy
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import partial

import torch
from transformers.cache_utils import DynamicLayer

from ..core.split import left_padding
from ..wire import codec as wire
from ..wire import protocol as P
from ..wire.protocol import FULL_TRUNK, Refused
from .endpoint import on_one_thread
from .server import TrunkServer, _came_in
from .state import State

log = logging.getLogger("splitkit.trunk.server")

@dataclass
class Request:
    """A request that may join a batch: its envelope and frames, and what it asks."""

    envelope: list
    body: list
    header: dict
    session: object
    arrived: float = field(default=0.0, kw_only=True)  # time.monotonic() when it was taken in


@dataclass
class Step(Request):
    """A one-token generation step."""

    gen: int
    start: int
    h1: torch.Tensor  # (B, 1, d)


@dataclass
class Forward(Request):
    """A forward kept for its backward (`full` or `full+trunk`)."""

    key: int
    h1: torch.Tensor  # (B, T, d)
    pad: list  # (B,) each row's left padding


@dataclass
class Backward(Request):
    """A backward of a forward that was run joined with others."""

    key: int
    state: State
    g2: torch.Tensor  # (B, T, d)


def joinable(server, envelope: list, body: list):
    """The request as a Step, Forward or Backward if it can join a batch; None if it is to be served alone."""
    try:
        header, tensors = wire.decode(body)
        op, session = header.get("op"), server.sessions.get(P.session_id(header))
        if op not in (P.INFER, P.FORWARD, P.BACKWARD) or session is None or session.replay(P.request_id(header)):
            return None
        if op == P.INFER:
            return _step(server, envelope, body, header, session, tensors)
        if session.mode not in (P.FULL, FULL_TRUNK) or (session.mode == FULL_TRUNK and server.sessions.peft.training):
            return None  # PEFT mixes adapters in a batch only in eval mode
        key = P.state_key(header)
        if op == P.FORWARD:
            (h1,) = server._hidden(tensors, (1,))
            pad = P.padding(header, *h1.shape[:2])
            return Forward(envelope, body, header, session, key, h1, pad or [0] * h1.shape[0])
        state = session.states.get(key)
        g2 = server._hidden(tensors, (1, 2))[0]
        if state is None or state.part is None or g2.shape != state.own_h1.shape:
            return None
        return Backward(envelope, body, header, session, key, state, g2)
    except (wire.WireError, Refused):
        return None  # served alone: the usual path says what is wrong with it


def _step(server, envelope, body, header, session, tensors) -> Step | None:
    if session.mode == FULL_TRUNK:
        return None
    (h1,) = server._hidden(tensors, (1,))
    gen, start = P.generation(header), P.start(header)
    P.padding(header, h1.shape[0], start + 1)  # checked as alone; after the start, the generation's own counts
    generation = session.generations.get(gen)
    if (h1.shape[1] != 1 or start == 0 or generation is None or generation.length != start
            or len(generation.pad) != h1.shape[0]
            or (start + 1) * h1.shape[0] > min(server.limits.max_tokens, server.limits.cached_tokens)
            or not all(isinstance(layer, DynamicLayer) and type(layer) is DynamicLayer
                       for layer in generation.cache.layers)):
        return None
    return Step(envelope, body, header, session, gen, start, h1)


@torch.no_grad()
def infer_together(sessions, steps: list[Step]) -> list[torch.Tensor]:
    """h2 (B_i, 1, d) of each step, from one call of the Trunk over all their rows; each generation's cache grows
    by its one position, as if served alone."""
    generations = [s.session.generations[s.gen] for s in steps]
    longest = max(g.length for g in generations)
    filled = _filled_layers(generations[0].cache)
    cache = copy.copy(generations[0].cache)  # the joined cache: a copy of one's structure (building one costs ~1 ms)
    cache.layers = [copy.copy(layer) for layer in cache.layers]
    for index in filled:
        keys, values = zip(*(_left_padded(g.cache.layers[index], longest - g.length) for g in generations),
                           strict=True)
        cache.layers[index].keys, cache.layers[index].values = torch.cat(keys), torch.cat(values)  # (ΣB, h, L, hd)
    pads = [p + longest - g.length for g in generations for p in g.pad]  # each row's padding in the joined cache
    mask, positions = left_padding(pads, longest, longest + 1, sessions.trunk_device)  # (ΣB, longest+1), (ΣB, 1)
    h1 = torch.cat([s.h1.to(sessions.trunk_device, torch.float32) for s in steps])  # (ΣB, 1, d)
    h2 = sessions.base_trunk()(h1, attention_mask=mask, position_ids=positions, past_key_values=cache)
    split, row = [], 0  # every generation's new keys and values first, then all of them kept: all or none
    for g in generations:
        rows, cut = slice(row, row + len(g.pad)), longest - g.length  # its rows, and the padding it got for the call
        split.append((rows, {index: (cache.layers[index].keys[rows, :, cut:].clone(),
                                     cache.layers[index].values[rows, :, cut:].clone()) for index in filled}))
        row += len(g.pad)
    for s, g, (_, own) in zip(steps, generations, split, strict=True):
        for index, (keys, values) in own.items():
            g.cache.layers[index].keys, g.cache.layers[index].values = keys, values
        g.length += 1
        sessions.touch(s.session, s.gen, g)
    return [h2[rows] for rows, _ in split]


def forward_together(sessions, forwards: list[Forward]) -> list[State]:
    """The forward state of each, from one call of the Trunk over all their rows with the graph kept: shorter ones
    left-padded to the longest (the padding masked out, every row at its own positions), each full+trunk session's
    rows through its own adapter."""
    longest = max(f.h1.shape[1] for f in forwards)
    h1 = torch.cat([torch.nn.functional.pad(f.h1.to(sessions.trunk_device, torch.float32),
                                            (0, 0, longest - f.h1.shape[1], 0)) for f in forwards])
    h1.requires_grad_(True)  # a leaf: (ΣB, longest, d)
    pads = [p + longest - f.h1.shape[1] for f in forwards for p in f.pad]
    adapters = [f.session.adapter if f.session.mode == FULL_TRUNK else None for f in forwards for _ in f.pad]
    with torch.enable_grad():
        h2 = run_together(sessions, h1, pads, adapters)
    states, row, members = [], 0, []  # members: each part's (session, key), once it is kept
    for f in forwards:
        rows, length = f.h1.shape[:2]
        part = (slice(row, row + rows), slice(longest - length, longest))
        states.append(State(h1, h2, part=part, pad=f.pad, members=members))
        row += rows
    return states


def run_together(sessions, h1, pads: list, adapters: list):  # (ΣB, T, d) -> (ΣB, T, d)
    """h2 of rows of different sessions in one call: row i left-padded by pads[i], through the Trunk with adapter
    adapters[i] (None: the base Trunk). PEFT's mixed-adapter batch applies each adapter to its own rows only, so each
    session's LoRA gets the gradient of its own rows; it refuses a model in training mode."""
    mask, positions = left_padding(pads, 0, h1.shape[1], h1.device)  # (ΣB, T), (ΣB, T)
    if not any(adapters):
        return sessions.base_trunk()(h1, attention_mask=mask, position_ids=positions)
    peft = sessions.peft
    peft.base_model.set_adapter(sorted({a for a in adapters if a}))  # each of them trainable in this call
    try:
        return peft(h1, attention_mask=mask, position_ids=positions, adapter_names=[a or "__base__" for a in adapters])
    finally:
        peft.set_adapter(next(a for a in adapters if a))  # one trainable adapter again, as Sessions.activate keeps


def _together(what: str, work, items: list):
    """work(), or None (logged) if it failed: a failed batch changes nothing, and each is served alone."""
    try:
        return work()
    except Exception:
        log.exception("a batch of %d %s failed; serving each alone", len(items), what)
        return None


def _filled_layers(cache) -> list[int]:
    return [i for i, layer in enumerate(cache.layers) if getattr(layer, "keys", None) is not None
            and isinstance(layer.keys, torch.Tensor) and layer.keys.numel()]


def _left_padded(layer, extra: int):
    """(keys, values) of a cache layer with `extra` zero positions in front (masked out in the call)."""
    if extra == 0:
        return layer.keys, layer.values
    pad = (0, 0, extra, 0)  # the positions' dimension, the third of (B, heads, positions, head_dim)
    return torch.nn.functional.pad(layer.keys, pad), torch.nn.functional.pad(layer.values, pad)


class BatchingServer(TrunkServer):
    """A TrunkServer that runs requests of different sessions that wait together as one batch: one-token generation
    steps, forwards kept for a backward, and the backwards of a forward run together. With a request it takes every
    one already waiting, and waits up to `window_ms` for more only while other sessions keep a pace that makes their
    next request due (Sessions.active), until each of them has sent; `trunk_server.py --batch-window-ms MS`."""

    def __init__(self, *args, window_ms: float = 2.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.window_ms = self.identity["batch_window_ms"] = window_ms
        self.counters.update(batches=0, batched=0)
        self.joined = Counter()  # batches run, by kind: "generation steps", "forwards", "backwards"

    def serve(self, endpoint, envelope: list, body: list):
        more = endpoint.waiting(0, most=self.limits.max_sessions)  # what is already waiting
        due = self.sessions.active() - 1 - len(more)  # the others whose next request is due
        if due > 0:
            more += endpoint.waiting(self.window_ms, most=due)
        serve_waiting(self, endpoint, [(envelope, body), *more])


def serve_waiting(server, endpoint, messages: list):
    """Serve the messages that waited together, one per session (a session's requests follow each other): the
    one-token steps that can join, as one batch; the forwards, as one; the backwards of each joined forward, as one;
    then every other one alone, in the order they came."""
    steps, forwards, backwards, alone, sessions = [], [], {}, [], set()
    for envelope, body in messages:
        item = joinable(server, envelope, body)
        if item is None or item.session.id in sessions or not _fits(server.limits, item, steps, forwards):
            alone.append((envelope, body))
            continue
        sessions.add(item.session.id)
        item.arrived = time.monotonic()  # for the session's pace, if it is answered in a batch
        if isinstance(item, Step):
            steps.append(item)
        elif isinstance(item, Forward):
            forwards.append(item)
        else:
            backwards.setdefault(id(item.state.h2), []).append(item)  # grouped by the forward they belong to
    small = on_one_thread(sum(s.h1.shape[0] for s in steps) <= server.one_thread_up_to)  # one position each
    batches = [(steps, small(partial(infer_together, server.sessions, steps)), "generation steps"),
               (forwards, lambda: forward_together(server.sessions, forwards), "forwards")]
    batches += [(group, lambda group=group: server.sessions.backward([(b.session, b.state, b.g2) for b in group]),
                 "backwards") for group in backwards.values()]
    for items, work, what in batches:
        results = server.compute(partial(_together, what, work, items)) if len(items) > 1 else None
        if results is None:  # one, or a batch that failed before anything changed: each is served alone
            alone = [(i.envelope, i.body) for i in items] + alone
            continue
        server.counters["batched"] += len(items)
        server.counters["batches"] += 1
        server.joined[what] += 1
        for item, result in zip(items, results, strict=True):
            _answer(server, endpoint, item, result)
    for envelope, body in alone:
        TrunkServer.serve(server, endpoint, envelope, body)


def _fits(limits, item, steps: list, forwards: list) -> bool:
    """Whether the batch `item` would join stays within the token limits with it."""
    if isinstance(item, Step):  # the joined cache: every row as long as the longest, and one position more
        joined = [*steps, item]
        return (sum(s.h1.shape[0] for s in joined) * (max(s.start for s in joined) + 1)
                <= min(limits.max_tokens, limits.cached_tokens))
    if isinstance(item, Forward):  # every row as long as the longest
        joined = [*forwards, item]
        return sum(f.h1.shape[0] for f in joined) * max(f.h1.shape[1] for f in joined) <= limits.max_tokens
    return True


def _answer(server, endpoint, item, result):
    """Reply to one request of a batch with its part of the result, as if it had been served alone."""
    server.counters["requests"] += 1
    server.counters["bytes_in"] += wire.nbytes(item.body)
    item.session.heard(item.arrived)
    if isinstance(item, Step):
        out, op = result, P.INFER
    elif isinstance(item, Forward):
        server.sessions.keep(item.session, item.key, result)
        result.members.append((item.session, item.key))
        out, op = result.h2[result.part], P.FORWARD
    else:
        item.session.pop(item.key)  # a state serves one backward, then it is gone
        out, op = result, P.BACKWARD
    reply = wire.encode(P.ok(item.header), [out], dtype=_came_in(item.header))  # as h1 (or dL/dh2) came
    item.session.answered(P.request_id(item.header), reply)
    server.answered[op] += 1
    server.send(endpoint, item.envelope, reply)
