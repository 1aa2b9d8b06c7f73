"""What a trunk server remembers: one Session per client, within Limits, and each session's Trunk LoRA.

A session holds its forward states (h1 and h2 with their graph, kept from a forward until its
backward), its generations' KV caches, its newest reply (to answer a retry without running it
twice) and, in full+trunk, its own LoRA adapter on the one shared Trunk, with its own optimizer.
"""

import contextlib
import copy
import time
import warnings
from collections import Counter
from dataclasses import replace

import torch
from transformers import DynamicCache

from ..core.lora import LoraSpec, Merged, add_adapter, add_lora, lora_grads, lora_parameters
from ..core.split import left_padding, split_model
from ..wire.protocol import BUSY, CACHE_MISSING, FULL_TRUNK, Refused, lora_state
from .state import Generation, Limits, Session, State


class Sessions:
    """The session table of one server: open, find, close, sweep, and the per-session LoRA on the Trunk."""

    def __init__(self, trunk, config, limits: Limits, lora_seed: int | None = None):
        self.trunk, self.config, self.limits, self.lora_seed = trunk, config, limits, lora_seed
        self.peft = None  # the PeftModel around the Trunk while any full+trunk session is open
        self.table: dict[str, Session] = {}

    @classmethod
    def of(cls, model, cuts, device, limits: Limits, lora_seed: int | None = None) -> "Sessions":
        """The table of a server of blocks [a, b) of `model`: a private copy of them on `device`, as on a
        separate machine (the client's LoRA never reaches it)."""
        trunk = copy.deepcopy(split_model(model, cuts).trunk).to(device).requires_grad_(False).eval()  # no dropout
        return cls(trunk, model.config, limits, lora_seed)

    def __len__(self):
        return len(self.table)

    def get(self, sid: str) -> Session | None:
        return self.table.get(sid)

    def open(self, sid: str, mode: str, lora: LoraSpec | None = None, lr: float = 0.0,
             names=None, tensors=()) -> Session:
        """A new session; in full+trunk with its own adapter, restored from `tensors` if the client sent them."""
        self.sweep()
        if len(self.table) >= self.limits.max_sessions:
            raise Refused(f"the server holds {len(self.table)} sessions, its limit; try again later", BUSY)
        if lora is not None:  # the Trunk LoRA's seed is the server's: its own fixed one, or a fresh secret one
            lora = replace(lora, seed=self.lora_seed).resolved()
        session = Session(sid, mode, lora, lr)
        if mode == FULL_TRUNK:
            self._add_adapter(session, names, tensors)
        self.table[sid] = session
        return session

    def close(self, session: Session):
        self.table.pop(session.id, None)
        if session.mode == FULL_TRUNK and self.peft is not None:
            self._drop_adapter(session.adapter)

    def keep(self, session: Session, key: int, state: State):
        """Keep a forward state within both limits: the session's own and the server's total."""
        session.put(key, state, self.limits.states_per_session)
        while self.states() > self.limits.states_total:
            oldest = min((s for s in self.table.values() if s.states), key=lambda s: next(iter(s.states.values())).time)
            oldest.states.popitem(last=False)

    def states(self) -> int:
        return sum(len(s.states) for s in self.table.values())

    def state_bytes(self) -> int:
        """Bytes of h1 and h2 held in forward states (their graphs hold about as much again per block)."""
        return sum(st.nbytes for s in self.table.values() for st in s.states.values())

    def totals(self) -> dict:
        """What the table holds, for the server's stats: sessions, forward states, KV caches, and their bytes."""
        return {"sessions": len(self), "states": self.states(), "state_bytes": self.state_bytes(),
                "generations": self.generations(), "cached_tokens": self.cached_tokens(),
                "cache_bytes": self.cache_bytes()}

    def lines(self, now: float) -> dict:
        """For the server's stats: the open sessions by mode, and a line per session (idle time up to `now`)."""
        table = self.table.values()
        return {"modes": dict(Counter(s.mode for s in table)),
                "session_list": [dict(id=s.id[:6], mode=s.mode, requests=s.requests, trunk_steps=s.steps,
                                      states=len(s.states), generations=len(s.generations),
                                      idle_s=round(now - s.seen, 1)) for s in table]}

    def sweep(self):
        """Close idle sessions, drop forward states that waited too long for their backward and idle KV caches."""
        now = time.monotonic()
        for s in list(self.table.values()):
            if now - s.seen > self.limits.session_idle_s:
                self.close(s)
                continue
            for key in [k for k, state in s.states.items() if now - state.time > self.limits.state_max_age_s]:
                del s.states[key]
            for gen in [g for g, c in s.generations.items() if now - c.seen > self.limits.generation_idle_s]:
                del s.generations[gen]

    # ---------------------------------------------------------------- generation: the Trunk's KV caches

    def infer(self, session: Session, gen: int, start: int, pad: list | None, h1):  # (B, T, d) -> (B, T, d)
        """h2 for the next positions of generation `gen`; start 0 begins it (and needs `pad`), else its cache
        must hold exactly `start` positions of the same batch, or the client is told to send the prefix again."""
        batch, total = h1.shape[0], start + h1.shape[1]
        generation = session.generations.pop(gen, None)  # whatever happens next, a failed request leaves none
        if total * batch > min(self.limits.max_tokens, self.limits.cached_tokens):
            raise Refused(f"a generation of {batch} x {total} positions is over this server's limit of "
                          f"{min(self.limits.max_tokens, self.limits.cached_tokens)} tokens")
        if start == 0:
            generation = Generation(DynamicCache(config=self.config), pad if pad is not None else [0] * batch,
                                    merged=Merged(self.peft, session.adapter) if session.mode == FULL_TRUNK else None)
        elif generation is None or generation.length != start or len(generation.pad) != batch:
            have = "none" if generation is None else f"{len(generation.pad)} x {generation.length}"
            raise Refused(f"no KV cache of generation {gen} for {batch} x {start} positions here (it holds "
                          f"{have}; dropped, or the server restarted): send the whole prefix with start 0",
                          CACHE_MISSING)
        mask, positions = left_padding(generation.pad, start, total, h1.device)  # (B, start + T), (B, T)
        trunk = self._trunk(session)  # the session's adapter made the active one before it is merged
        with torch.no_grad(), generation.merged or contextlib.nullcontext():  # the base weights as they were after
            h2 = trunk(h1, attention_mask=mask, position_ids=positions, past_key_values=generation.cache)
        generation.length = total
        self.touch(session, gen, generation)  # the most recently used, within the limits
        return h2

    def touch(self, session: Session, gen: int, generation: Generation):
        """Keep `generation` as the session's most recently used one, within the limits (after each step)."""
        generation.seen = time.monotonic()
        session.generations.pop(gen, None)
        session.generations[gen] = generation
        self._bound_generations(session)

    @property
    def trunk_device(self) -> torch.device:
        return next(self.trunk.parameters()).device

    def base_trunk(self):
        """The Trunk with no session's adapter: what `full` and `detach` sessions run."""
        return self.trunk if self.peft is None else _without_adapters(self.peft, self.trunk)

    def release(self, session: Session, gen: int) -> bool:
        """Drop a generation's KV cache; say whether there was one."""
        return session.generations.pop(gen, None) is not None

    def active(self, within_s: float = 1.0) -> int:
        """Sessions that keep a pace and whose next request is due: the last came within twice their pace
        (Session.pace), and within `within_s`. A batching server waits for these; a student who stopped is not
        waited for once twice their pace has gone by."""
        now = time.monotonic()
        return sum(1 for s in self.table.values() if now - s.seen < min(within_s, 2 * s.pace))

    def generations(self) -> int:
        return sum(len(s.generations) for s in self.table.values())

    def cached_tokens(self) -> int:
        return sum(g.tokens for s in self.table.values() for g in s.generations.values())

    def cache_bytes(self) -> int:
        """Bytes of keys and values held in every KV cache, and of the merged weights of full+trunk generations."""
        generations = [g for s in self.table.values() for g in s.generations.values()]
        return sum(t.nbytes for g in generations
                   for layer in g.cache.layers for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
                   if isinstance(t, torch.Tensor)) + sum(g.merged.nbytes for g in generations if g.merged)

    def _bound_generations(self, session: Session):
        while len(session.generations) > self.limits.generations_per_session:
            session.generations.popitem(last=False)
        while session.generations and (self.generations() > self.limits.generations_total
                                       or self.cached_tokens() > self.limits.cached_tokens):
            owner = min((s for s in self.table.values() if s.generations),
                        key=lambda s: next(iter(s.generations.values())).seen)
            owner.generations.popitem(last=False)

    # ---------------------------------------------------------------- the Trunk, with each session's LoRA

    def run(self, session: Session, h1, pad: list | None = None):  # (B, T, d) -> (B, T, d)
        """h2 = Trunk(h1), with the session's own adapter in full+trunk; rows left-padded by `pad` if given."""
        if pad is None:
            return self._trunk(session)(h1)
        mask, positions = left_padding(pad, 0, h1.shape[1], h1.device)  # (B, T), (B, T)
        return self._trunk(session)(h1, attention_mask=mask, position_ids=positions)

    def backward(self, parts: list) -> list:
        """dL/dh1 (B, T, d) of each (session, state, dL/dh2), all of one forward, from one backward through it; a
        full+trunk session's LoRA gets the gradient of its own rows in .grad. A part of a joined forward that comes
        alone is run again alone (cheaper than a backward through every row); see State.let_go."""
        session, state, g2 = parts[0]
        if len(parts) == 1 and (state.part is not None or state.h2 is None):
            state.let_go()
            state = self.again(session, state)
        if state.part is None:  # a forward of its own: h1.grad = J^T · dL/dh2, and the active adapter's .grad
            self.activate(session)
            torch.autograd.backward(state.h2, g2)
            return [state.h1.grad]
        h1, h2 = state.h1, state.h2
        grad = torch.zeros_like(h2)  # the joined forward's dL/dh2: these parts' own, zero in the others' rows
        for _, st, g in parts:
            grad[st.part] = g
        adapters = sorted({s.adapter for s, _, _ in parts if s.mode == FULL_TRUNK})
        params = [p for s, _, _ in parts if s.mode == FULL_TRUNK for _, p in self.lora_parameters(s)]
        if adapters:
            self.peft.base_model.set_adapter(adapters)  # differentiable, for autograd's check
        try:
            grads = torch.autograd.grad(h2, [h1, *params], grad, allow_unused=True)
        finally:
            if adapters:
                self.peft.set_adapter(adapters[0])
        for p, g in zip(params, grads[1:], strict=True):
            if g is not None:
                p.grad = g if p.grad is None else p.grad + g
        state.let_go()
        return [grads[0][st.part] for _, st, _ in parts]

    def again(self, session: Session, state: State) -> State:
        """A part of a joined forward run again alone: its own rows, with the graph kept."""
        h1 = state.own_h1.detach().requires_grad_(True)
        with torch.enable_grad():
            return State(h1, self.run(session, h1, state.pad))

    def _trunk(self, session: Session):
        """The Trunk as this session sees it: with its own adapter in full+trunk, with none otherwise."""
        if session.mode == FULL_TRUNK:
            self.activate(session)
            return self.peft
        return self.base_trunk()

    def activate(self, session: Session):
        """Make the session's adapter the trainable one (PEFT freezes the others), before its forward or backward."""
        if session.mode == FULL_TRUNK:
            self.peft.set_adapter(session.adapter)

    def lora_parameters(self, session: Session) -> list:
        """[(name, weight)] of the session's Trunk LoRA, named as in lora.lora_parameters."""
        return list(lora_parameters(self.peft, session.adapter))

    def step(self, session: Session) -> bool:
        """Session.step for a full+trunk session; a session in another mode has no Trunk LoRA to train."""
        if session.mode != FULL_TRUNK:
            raise Refused("only a full+trunk session trains the trunk's LoRA")
        return session.step()

    def lora_state(self, session: Session) -> tuple[list, tuple]:
        """(names, tensors) of a full+trunk session's Trunk LoRA; a session in another mode has none."""
        if session.mode != FULL_TRUNK:
            raise Refused("only a full+trunk session has a trunk LoRA")
        names, values = zip(*self.lora_parameters(session), strict=True)
        return list(names), values

    def lora_grads(self, sid: str) -> dict:
        """{name: .grad} of a full+trunk session's Trunk LoRA, named as on the client (for checks)."""
        return lora_grads(self.peft, self.table[sid].adapter)

    def _add_adapter(self, session: Session, names, tensors):
        try:
            if self.peft is None:
                self.peft = add_lora(self.trunk, session.lora, self.config, adapter=session.adapter)
            else:
                add_adapter(self.peft, session.lora, self.config, session.adapter)
            self.peft.eval()  # as the Trunk: PEFT runs a batch of different adapters in eval mode only
        except ValueError as e:
            raise Refused(f"cannot put LoRA on the trunk: {e}") from None
        try:
            self.load(session, names, tensors)
        except Refused:
            self._drop_adapter(session.adapter)
            raise

    def load(self, session: Session, names, tensors):
        """Put `tensors` (a whole Trunk LoRA, or none) into the session's adapter; its optimizer starts afresh."""
        if session.mode != FULL_TRUNK:
            raise Refused("only a full+trunk session has a trunk LoRA")
        params = self.lora_parameters(session)
        if tensors:  # the client's copy after a server restart, or a federated round's average
            pairs = lora_state(names, list(tensors), dict(params))
            with torch.no_grad():
                for param, t in pairs:
                    param.copy_(t)
        session.optimizer = torch.optim.AdamW([p for _, p in params], lr=session.lr, weight_decay=0.0)

    def _drop_adapter(self, adapter: str):
        if list(self.peft.peft_config) == [adapter]:  # the last one: back to the plain Trunk
            self.trunk, self.peft = self.peft.unload(), None
        else:  # PEFT warns when the adapter it deletes was the active one: here that is every time, and harmless
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*was active which is now deleted", category=UserWarning)
                self.peft.delete_adapter(adapter)



def _without_adapters(peft, trunk):
    """Trunk(h, ...) with every session's adapter switched off for the call (PEFT's disable_adapter)."""
    def call(*args, **kwargs):
        with peft.disable_adapter():
            return trunk(*args, **kwargs)
    return call
