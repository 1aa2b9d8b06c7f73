"""One-token generation steps of different sessions, run through the Trunk as one batch.

When several students generate at once, their one-token `infer` requests wait in the server's socket while it
serves another. Served one at a time, each pays the Trunk's cost per call (every block's weights read from memory
for a single row, and the per-call work around it); gathered, the rows of all of them go through the Trunk in one
call. Each generation keeps its own KV cache: for the call the caches are left-padded to the longest and joined,
the padding masked out and every row at its own position, as generate() pads a batch of prompts; afterwards they
are split again. A row's h2 equals its h2 served alone within float rounding (its attention runs over a longer,
masked row, and the matrix products over more rows), not bit for bit; greedy tokens come out the same
(tests/test_batching.py).

Only what can join safely joins: a new (not retried) `infer` of one position, `start` > 0, of a `full` or `detach`
session whose generation holds exactly `start` positions of the same rows, on a model whose cache layers are plain
(no sliding window). Everything else is served alone, as without batching, and so is any request of a batch that
fails: each then gets its own answer or its own error.
"""

import copy
import logging
from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicLayer

from ..core.split import left_padding
from ..wire import codec as wire
from ..wire import protocol as P
from ..wire.protocol import FULL_TRUNK, Refused
from .server import TrunkServer

log = logging.getLogger("splitkit.trunk.server")

@dataclass
class Step:
    """A request that may join a batch: its envelope and frames, and what it asks."""

    envelope: list
    body: list
    header: dict
    session: object
    gen: int
    start: int
    h1: torch.Tensor  # (B, 1, d)


def joinable(server, envelope: list, body: list) -> Step | None:
    """The request as a Step if it can join a batch of one-token steps; None if it is to be served alone."""
    try:
        header, tensors = wire.decode(body)
        if header.get("op") != P.INFER:
            return None
        session = server.sessions.get(P.session_id(header))
        if session is None or session.mode == FULL_TRUNK or session.replay(P.request_id(header)) is not None:
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
    except (wire.WireError, Refused):
        return None  # served alone: the usual path says what is wrong with it
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


def _batch(sessions, steps: list[Step]) -> list | None:
    """infer_together, or None (logged) if it failed: a failed batch changes no cache, and each is served alone."""
    try:
        return infer_together(sessions, steps)
    except Exception:
        log.exception("a batch of %d generation steps failed; serving each alone", len(steps))
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
    """A TrunkServer that runs the one-token generation steps of different sessions that wait together as one
    batch. After a request it waits up to `window_ms` for more, only while other sessions generate and only until
    each of them has sent; `trunk_server.py --batch-window-ms MS` runs one."""

    def __init__(self, *args, window_ms: float = 2.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.window_ms = window_ms
        self.counters.update(batches=0, batched=0)

    def serve(self, endpoint, envelope: list, body: list):
        others = self.sessions.generating() - 1
        more = endpoint.waiting(self.window_ms if others > 0 else 0, most=max(others, 0))
        serve_waiting(self, endpoint, [(envelope, body), *more])


def serve_waiting(server, endpoint, messages: list):
    """Serve the messages that waited together: the one-token steps that can join, as one batch (one per session:
    a session's requests follow each other), then every other one alone, in the order they came."""
    steps, alone, sessions, rows, longest = [], [], set(), 0, 0
    limit = min(server.limits.max_tokens, server.limits.cached_tokens)
    for envelope, body in messages:
        step = joinable(server, envelope, body)
        joined = step and (rows + step.h1.shape[0]) * (max(longest, step.start) + 1)  # the joined cache's tokens
        if step is None or step.session.id in sessions or joined > limit:
            alone.append((envelope, body))
        else:
            steps.append(step)
            sessions.add(step.session.id)
            rows, longest = rows + step.h1.shape[0], max(longest, step.start)
    h2s = server.compute(lambda: _batch(server.sessions, steps)) if len(steps) > 1 else None
    if h2s is None:  # one step, or a batch that failed before any cache changed: each is served alone
        alone = [(s.envelope, s.body) for s in steps] + alone
    else:
        server.counters["batched"] += len(steps)
        server.counters["batches"] += 1
        for s, h2 in zip(steps, h2s, strict=True):
            server.counters["requests"] += 1
            server.counters["bytes_in"] += wire.nbytes(s.body)
            reply = wire.encode(P.ok(s.header), [h2], dtype=s.header["tensors"][0]["dtype"])  # as h1 came
            s.session.answered(P.request_id(s.header), reply)
            server.answered[P.INFER] += 1
            server.send(endpoint, s.envelope, reply)
    for envelope, body in alone:
        TrunkServer.serve(server, endpoint, envelope, body)
