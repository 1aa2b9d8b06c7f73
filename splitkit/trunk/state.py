"""What one client's session on a trunk server holds, and the Limits on all of them.

A Session keeps its forward states (h1 and h2 with their graph, from a forward until its backward), its
generations' KV caches, its newest reply (to answer a retry without running it twice) and, in full+trunk, the
name of its LoRA adapter and its optimizer. The table of sessions that enforces the Limits is sessions.py.
"""

import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field

import torch
from transformers import DynamicCache

from ..core.lora import LoraSpec, Merged
from ..wire.protocol import STALE, Refused


@dataclass
class Limits:
    """What one trunk server holds at most; a whole class shares these."""

    max_tokens: int = 64 * 1024     # batch × tokens in one request
    states_per_session: int = 4     # forward states a session keeps for its backward (0: every backward recomputes)
    states_total: int = 32          # forward states kept over all sessions; past it the oldest is dropped
    state_max_age_s: float = 300.0  # a forward state not used by a backward within this is dropped
    max_sessions: int = 128         # open sessions; one more hello is refused as busy
    session_idle_s: float = 3600.0  # a session that sends nothing for this long is closed
    generations_per_session: int = 4  # KV caches a session keeps; past it its least recently used is dropped
    generations_total: int = 32       # KV caches over all sessions (0: none kept, every token re-sends the prefix)
    cached_tokens: int = 256 * 1024   # batch × positions over all KV caches; past it the least recently used go
    generation_idle_s: float = 300.0  # a KV cache not used for this long is dropped

    def __post_init__(self):
        negative = [name for name, value in asdict(self).items() if value < 0]
        if negative:
            raise ValueError(f"limits cannot be negative: {', '.join(negative)}")


@dataclass
class State:
    """One forward kept for its backward: h1 (a leaf that will get dL/dh1) and h2 = Trunk(h1) with its graph.

    A forward run together with other sessions' (splitkit.trunk.batching) shares their h1 and h2: `part` is its rows
    and positions in them, `members` the (session, key) of every part. Once one backward has used that graph, the
    parts left keep only their own h1 (h2 None), run again alone at their backward."""

    h1: torch.Tensor  # (B, T, d), requires_grad; joined: (ΣB, longest T, d)
    h2: torch.Tensor | None  # (B, T, d); joined: (ΣB, longest T, d); None: to be run again
    time: float = field(default_factory=time.monotonic)
    part: tuple[slice, slice] | None = None  # joined: (its rows, its positions) of h1 and h2
    pad: list | None = None  # joined or to be run again: its rows' left padding
    members: list | None = None  # joined: [(session, key)] of every part, shared by them

    @property
    def own_h1(self) -> torch.Tensor:
        """This forward's own h1: (B, T, d)."""
        return self.h1 if self.part is None else self.h1[self.part]

    @property
    def nbytes(self) -> int:
        """Bytes of this forward's own h1 and h2 (its graph holds about as much again per block)."""
        return self.own_h1.nbytes * (1 if self.h2 is None else 2)

    def let_go(self):
        """After a backward of a joined forward, let its graph go (a Trunk LoRA in it may step before the other
        backwards come): every part still kept keeps only its own h1 and padding, to be run again at its backward."""
        for session, key in self.members or ():
            kept = session.states.get(key)
            if kept is not None and kept.members is self.members:
                session.states[key] = State(kept.own_h1.detach(), None, kept.time, pad=kept.pad)


@dataclass
class Generation:
    """One generation's Trunk KV cache: keys and values of every position so far, and each row's left padding;
    in full+trunk, the session's Trunk LoRA merged into copies of the weights it touches, as it was at the
    generation's start (the weights the cache was made with), put in place for each of its requests."""

    cache: DynamicCache
    pad: list          # (B,) left padding of each row
    length: int = 0    # positions in the cache
    seen: float = field(default_factory=time.monotonic)
    merged: Merged | None = None

    @property
    def tokens(self) -> int:
        return len(self.pad) * self.length


@dataclass
class Session:
    """One client's state on the server."""

    id: str
    mode: str
    lora: LoraSpec | None = None
    lr: float = 0.0
    optimizer: torch.optim.Optimizer | None = None  # full+trunk: AdamW over this session's Trunk LoRA
    states: OrderedDict = field(default_factory=OrderedDict)  # key -> State, oldest first
    generations: OrderedDict = field(default_factory=OrderedDict)  # gen id -> Generation, least recently used first
    last_id: int = -1  # the newest request answered...
    last_reply: list | None = None  # ...and its reply, sent again if the request comes again
    seen: float = field(default_factory=time.monotonic)
    gaps: tuple = ()  # seconds between its last four requests
    steps: int = 0  # optimizer steps applied to the Trunk LoRA
    requests: int = 0  # requests answered

    @property
    def adapter(self) -> str:
        """The name of this session's LoRA adapter on the shared Trunk."""
        return f"s{self.id}"

    def replay(self, rid: int) -> list | None:
        """The kept reply if request `rid` is the newest one again (a retry: answered again, never applied
        twice); None for a new request. An older id is refused as stale."""
        if rid == self.last_id:
            return self.last_reply
        if rid < self.last_id:
            raise Refused(f"request {rid} is older than {self.last_id}, already answered", STALE)
        return None

    def heard(self, at: float | None = None):
        """A request came now (or `at`, a time.monotonic())."""
        now = time.monotonic() if at is None else at
        self.gaps, self.seen = (*self.gaps[-2:], now - self.seen), now

    @property
    def pace(self) -> float:
        """The longest of the last three gaps between its requests (a training step's requests come at uneven
        intervals: forward, backward, step); 0 before it has sent any."""
        return max(self.gaps, default=0.0)

    def answered(self, rid: int, reply: list):
        """Keep the reply to request `rid`, the newest, for a retry of it."""
        self.last_id, self.last_reply = rid, reply
        self.requests += 1

    def put(self, key: int, state: State, limit: int):
        """Keep a forward state; past `limit` states the oldest is dropped."""
        self.states[key] = state
        while len(self.states) > limit:
            self.states.popitem(last=False)

    def step(self) -> bool:
        """Apply the optimizer to this session's Trunk LoRA if a backward left gradients; say whether it did."""
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        if all(p.grad is None for p in params):
            return False
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        return True

    def pop(self, key: int) -> State | None:
        """The forward state for a backward, used up by it; None if it was never kept or was dropped."""
        return self.states.pop(key, None)
