"""Training LoRA through the split, in the four modes, with the simplified version's two client optimizers.

"detach"     the simplified version as written: h1.detach() goes to the server, the gradient
             stops at h2, and the Bottom never learns;
"full"       the complete protocol: dL/dh2 goes to the server, dL/dh1 comes back (frozen Trunk);
"full+trunk" the same, and the server trains the Trunk's own LoRA;
"local"      the unsplit model, LoRA on every block: the reference.
The simplified version is the one in the write-ups this kit answers (see the README).
"""

import copy
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..core.data import encode
from ..core.lora import LoraSpec, add_lora, lora_delta_norms, lora_grads, lora_parameters, unsplit_reference
from ..core.split import check_cuts, left_padding, padding_of, split_model
from ..wire.client import TrunkClient
from ..wire.protocol import DETACH, FULL, FULL_TRUNK, LOCAL, MODES
from ..wire.remote import RemoteTrunk
from .defences import Defence, Guard


def criterion(logits, labels):
    """Next-token cross-entropy over the labelled positions (as transformers' causal LM loss)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)


def adamw(module, lr):
    """The client's optimizer of a part: AdamW without weight decay over what trains in it; None if nothing does."""
    params = [p for p in module.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0) if params else None


class Learner:
    """What one training run holds on the client: the parts with LoRA, their optimizers, the trunk client.

    Learner(model, mode="full", cuts=(10, 20), address=...) copies `model`, puts LoRA where `mode`
    trains it and opens a session on the trunk server at `address`. "local" needs no server; with
    train_trunk=False it puts LoRA only on the blocks a split run keeps on the client. `defence`
    (splitkit.training.defences.Defence) clips and noises h1 and dL/dh2 before they are sent, or adds NoPeek's penalty.
    """

    def __init__(self, model, *, mode: str = FULL, cuts=(10, 20), address: str | None = None,
                 lora: LoraSpec | None = None, lr: float = 1e-3, train_trunk: bool = True, freeze_a: bool = False,
                 defence: Defence | None = None, **client_options):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if mode != LOCAL and address is None:
            raise ValueError(f"mode {mode!r} needs the address of a trunk server")
        if freeze_a and mode == FULL_TRUNK:
            raise ValueError("freeze_a freezes the client's lora_A; the server trains the Trunk's: use mode 'full'")
        self.mode, self.cuts = mode, check_cuts(cuts, model.config.num_hidden_layers)
        self.lora = (lora or LoraSpec()).resolved()  # a secret seed unless one is given
        _check_defence(defence, mode)
        self.guard, self.penalty = Guard(defence), None  # penalty: the newest step's NoPeek term, or None
        self.model = self.bottom = self.top = self.trunk = self.client = None
        self.config, self.lr = model.config, lr
        model = copy.deepcopy(model)
        if mode == LOCAL:
            self.model = unsplit_reference(model, self.cuts, self.lora, train_trunk)  # the unsplit PeftModel
        else:
            bottom, _, top = split_model(model, self.cuts)
            self.bottom, self.top = add_lora(bottom, self.lora, model.config), add_lora(top, self.lora, model.config)
        if freeze_a:  # FFA-LoRA: only B trains, so averaging B averages B·A exactly
            for name, weight in self._lora_parameters():
                weight.requires_grad_(not name.endswith(".lora_A"))
        self._new_optimizers()
        if mode == LOCAL:
            return
        self.client = TrunkClient(address, **client_options)
        trains_trunk = mode == FULL_TRUNK
        self.client.hello(model, self.cuts, mode=mode, lora=self.lora if trains_trunk else None,
                          lr=lr if trains_trunk else None)
        self.trunk = RemoteTrunk(self.client, train_trunk=trains_trunk)

    def _new_optimizers(self):
        if self.mode == LOCAL:
            self.optimizers = [adamw(self.model, self.lr)]
            return
        # the simplified version's two client optimizers; None for a part with no blocks to train
        self.optimizer_bottom, self.optimizer_top = adamw(self.bottom, self.lr), adamw(self.top, self.lr)
        self.optimizers = [self.optimizer_bottom, self.optimizer_top]

    def _lora_parameters(self) -> list:
        """[(name, weight)] of the client's LoRA (the whole model's in local), named as lora.lora_parameters."""
        if self.mode == LOCAL:
            return list(lora_parameters(self.model))
        return [*lora_parameters(self.bottom), *lora_parameters(self.top)]

    def lora_state(self) -> dict:
        """{name: tensor} of every LoRA matrix this run trains: the client's, and in full+trunk the Trunk's from
        the server. Names carry the block index, so the parts never clash."""
        state = {name: w.detach().clone() for name, w in self._lora_parameters()}
        if self.mode == FULL_TRUNK:
            state.update(self.client.trunk_lora())
        return state

    def load_lora(self, state: dict):
        """Set every LoRA matrix from {name: tensor} (as lora_state gives it), the Trunk's on the server in
        full+trunk; every optimizer, the server's included, starts afresh."""
        own = dict(self._lora_parameters())
        trunk = {name: t for name, t in state.items() if name not in own}
        if own.keys() - state.keys() or (trunk and self.mode != FULL_TRUNK):
            raise ValueError(f"the LoRA state does not fit this {self.mode} run: it lacks "
                             f"{sorted(own.keys() - state.keys())[:3]} or has {sorted(trunk)[:3]} too")
        with torch.no_grad():
            for name, weight in own.items():
                weight.copy_(state[name])
        if self.mode == FULL_TRUNK:
            self.client.load_lora(trunk)
        self._new_optimizers()

    def zero_grad(self):
        for opt in filter(None, self.optimizers):
            opt.zero_grad(set_to_none=True)

    def forward_backward(self, batch) -> torch.Tensor:
        """One forward and backward pass; the gradients are left in .grad. Returns the loss. A batch may carry an
        `attention_mask` of left padding (as generation makes it): the parts mask it, and the Trunk's pad crosses
        the wire with the forward (and the stateless fallback's backward)."""
        input_ids, labels = batch["input_ids"], batch["labels"]  # (B, T), (B, T)
        pad, parts = _left_padding(batch.get("attention_mask"))  # None, {} for a batch without a mask
        if self.mode == LOCAL:
            loss = criterion(self.model(input_ids=input_ids, **parts).logits, labels)
            loss.backward()
            return loss
        h1 = self.bottom(input_ids, **parts)  # (B, T, d)
        self.penalty = self.guard.penalty(self.bottom.tokens, input_ids, h1)  # None unless NoPeek is on
        h1 = self.guard.h1(h1)  # what is sent: h1 itself, unless a defence clips or noises it
        if self.mode == DETACH:  # the simplified version, as written
            h2 = self.client.forward(h1.detach(), pad=pad)  # (B, T, d): a new tensor with no history
            h2 = h2.requires_grad_(True)  # a new leaf: backward stops here
        else:
            h2 = self.guard.h2(self.trunk(h1, pad=pad))  # (B, T, d), differentiable through the server
        logits = self.top(h2, **parts)  # (B, T, vocab)
        loss = criterion(logits, labels)  # the task's loss, the one returned
        objective = loss if self.penalty is None else loss + self.penalty
        if objective.requires_grad:  # False only when nothing before the loss trains (cuts (0, n), not full+trunk)
            objective.backward()
        return loss

    def step(self, batch) -> float:
        """One training step: zero_grad, forward_backward, the Trunk's step on the server, the client's steps."""
        loss = self._gradients_of_one_server_life(batch)
        for opt in filter(None, self.optimizers):
            opt.step()
        return loss.item()

    def _gradients_of_one_server_life(self, batch) -> torch.Tensor:
        # In full+trunk the Trunk's gradients live on the server. If the server restarts during
        # this step, the client reopens its session with the Trunk LoRA it last saw, but this
        # step's Trunk gradients died with the old server: compute the whole step again, once,
        # so that the Bottom, the Top and the Trunk all step on the same batch.
        for _ in range(2):
            reopened = self.client.reopened if self.client else 0
            self.zero_grad()
            loss = self.forward_backward(batch)
            if self.mode == FULL_TRUNK:
                self.client.step()
            if self.client is None or self.client.reopened == reopened:
                break
        return loss

    def lora_grads(self) -> dict:
        """{'12.self_attn.q_proj.lora_A': grad or None, ...} of the client's LoRA (the whole model's in local)."""
        if self.mode == LOCAL:
            return lora_grads(self.model)
        return {**lora_grads(self.bottom), **lora_grads(self.top)}

    @torch.no_grad()
    def logits(self, input_ids):  # (B, T) -> (B, T, vocab)
        if self.mode == LOCAL:
            return self.model(input_ids=input_ids).logits
        return self.top(self.client.forward(self.guard.h1(self.bottom(input_ids))))

    def delta_norms(self) -> dict:
        """{layer_key: ||B @ A * scaling||} over every LoRA layer, the Trunk's from the server."""
        if self.mode == LOCAL:
            return lora_delta_norms(self.model)
        return {**lora_delta_norms(self.bottom), **lora_delta_norms(self.top),
                **self.client.last_step.get("delta_norms", {})}

    def close(self):
        if self.client is not None:
            self.client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@torch.no_grad()
def evaluate(learner: Learner, tokenizer, pairs) -> tuple[float, float]:
    """(loss, exact match) of (prompt, answer) pairs through the learner, its defence included. Exact match
    here: every answer token and the end token is the argmax given the tokens before it, which is exactly
    when greedy decoding writes the answer and stops."""
    batch = encode(tokenizer, pairs)
    logits = learner.logits(batch["input_ids"])  # (B, T, vocab)
    labels = batch["labels"]
    hit = (logits[:, :-1].argmax(-1) == labels[:, 1:]) | (labels[:, 1:] == -100)  # (B, T - 1)
    return float(criterion(logits, labels)), float(hit.all(dim=1).float().mean())


def _left_padding(attention_mask) -> tuple[list | None, dict]:
    """(each row's left padding, the parts' attention_mask and position_ids) for a left-padded batch, as
    generation masks it; (None, {}) without a mask. A mask that is not 0s then 1s in each row is refused."""
    if attention_mask is None:
        return None, {}
    pad = padding_of(attention_mask)  # (B,)
    mask, positions = left_padding(pad, 0, attention_mask.shape[1])
    return pad.tolist(), {"attention_mask": mask, "position_ids": positions}


def _check_defence(defence: Defence | None, mode: str):
    """A ValueError when the defence protects a tensor that this mode never sends."""
    if defence is None or not defence.on:
        return
    if mode == LOCAL:
        raise ValueError("mode 'local' sends nothing to a server: a defence has nothing to protect")
    if mode == DETACH and defence.touches_g2:
        raise ValueError("mode 'detach' sends no dL/dh2: g2_clip, g2_noise and g2_maxnorm protect nothing there")


@dataclass
class History:
    """Per step: loss, bytes on the wire, seconds, and each LoRA layer's change."""

    mode: str
    cuts: tuple[int, int]
    loss: list = field(default_factory=list)
    bytes_sent: list = field(default_factory=list)
    bytes_received: list = field(default_factory=list)
    seconds: list = field(default_factory=list)
    delta_norms: list = field(default_factory=list)

    def part_of(self, layer_key: str) -> str:
        i = int(layer_key.split(".", 1)[0])
        return "bottom" if i < self.cuts[0] else "trunk" if i < self.cuts[1] else "top"


def train(learner: Learner, batches, steps: int, progress: bool = True) -> History:
    """Run `steps` training steps with a tqdm bar; return the History."""
    history = History(learner.mode, learner.cuts)
    bar = tqdm(range(steps), desc=learner.mode, disable=not progress)
    for _ in bar:
        loss = record_step(history, learner, next(batches))
        bar.set_postfix(loss=f"{loss:.3f}")
    return history


def record_step(history: History, learner: Learner, batch) -> float:
    """One training step; its loss, seconds, bytes each way and LoRA changes are appended to `history`."""
    sent0, recv0, t0 = _bytes(learner) + (time.perf_counter(),)
    loss = learner.step(batch)
    sent1, recv1 = _bytes(learner)
    history.loss.append(loss)
    history.seconds.append(time.perf_counter() - t0)
    history.bytes_sent.append(sent1 - sent0)
    history.bytes_received.append(recv1 - recv0)
    history.delta_norms.append(learner.delta_norms())
    return loss


def _bytes(learner):
    c = learner.client
    return (c.bytes_sent, c.bytes_received) if c else (0, 0)
