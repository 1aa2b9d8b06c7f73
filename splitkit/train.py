"""Training LoRA through the split, in four modes, with the seeds' two client optimizers.

"detach"     the seeds' simplified version as written: h1.detach() goes to the server, the
             gradient stops at h2, and the Bottom never learns;
"full"       the gradient protocol: dL/dh2 goes to the server, dL/dh1 comes back (frozen Trunk);
"full+trunk" the same, and the server trains the Trunk's own LoRA;
"local"      the unsplit model with LoRA on every block: the baseline.
"""

import copy
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from peft import get_peft_model
from torch import nn
from tqdm.auto import tqdm

from .client import RemoteTrunk, TrunkClient
from .split import LoraSpec, add_lora, check_cuts, init_lora, lora_config, lora_delta_norms, split_model

MODES = ("detach", "full", "full+trunk", "local")
SERVER_MODE = {"detach": "forward", "full": "full", "full+trunk": "full+trunk"}


def criterion(logits, labels):
    """Next-token cross-entropy over the labelled positions (as transformers' causal LM loss)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)


def _adamw(module, lr):
    params = [p for p in module.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0) if params else None


@dataclass
class Learner:
    """What one training run holds on the client."""

    mode: str
    cuts: tuple[int, int]
    bottom: nn.Module | None = None
    trunk: RemoteTrunk | None = None
    top: nn.Module | None = None
    optimizer_bottom: torch.optim.Optimizer | None = None
    optimizer_top: torch.optim.Optimizer | None = None
    client: TrunkClient | None = None
    model: nn.Module | None = None  # "local" only: the unsplit PeftModel
    optimizer: torch.optim.Optimizer | None = None  # "local" only

    @torch.no_grad()
    def logits(self, input_ids):  # (B, T) -> (B, T, vocab)
        if self.mode == "local":
            return self.model(input_ids=input_ids).logits
        return self.top(self.client.compute(self.bottom(input_ids)))

    def delta_norms(self) -> dict:
        """{layer_key: ||B @ A * scaling||} over every LoRA layer, the Trunk's from the server."""
        if self.mode == "local":
            return lora_delta_norms(self.model)
        out = {}
        for part in (self.bottom, self.top):
            out.update(lora_delta_norms(part))
        out.update(self.client.last_step.get("delta_norms", {}))
        return out

    def close(self):
        if self.client is not None:
            self.client.close()


def make_learner(model, mode: str, cuts, address: str | None = None, lora: LoraSpec | None = None,
                 lr: float = 1e-3, **client_options) -> Learner:
    """Copy `model`, put LoRA where `mode` trains it, connect to the trunk server at `address`."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    lora = lora or LoraSpec()
    cuts = check_cuts(cuts, model.config.num_hidden_layers)
    model = copy.deepcopy(model)
    if mode == "local":
        peft_model = unsplit_reference(model, cuts, lora, train_trunk=True)
        return Learner(mode, cuts, model=peft_model, optimizer=_adamw(peft_model, lr))
    if address is None:
        raise ValueError(f"mode {mode!r} needs the address of a trunk server")
    bottom_part, _, top_part = split_model(model, cuts)
    bottom_peft, top_peft = add_lora(bottom_part, lora, model.config), add_lora(top_part, lora, model.config)
    client = TrunkClient(address, **client_options)
    client.hello(model.config.name_or_path, cuts, model.config.hidden_size, mode=SERVER_MODE[mode],
                 lora=lora if mode == "full+trunk" else None, lr=lr if mode == "full+trunk" else None)
    return Learner(mode, cuts, bottom_peft, RemoteTrunk(client, train_trunk=mode == "full+trunk"), top_peft,
                   _adamw(bottom_peft, lr), _adamw(top_peft, lr), client)


def unsplit_reference(model, cuts, lora: LoraSpec, train_trunk: bool):
    """The unsplit model (changed in place) with LoRA on the blocks a split run trains, same init."""
    a, b = check_cuts(cuts, model.config.num_hidden_layers)
    n = model.config.num_hidden_layers
    layers = list(range(n)) if train_trunk else [*range(a), *range(b, n)]
    config = lora_config(lora, model.config)
    config.layers_to_transform = layers
    config.layers_pattern = "h" if model.config.model_type == "gpt2" else "layers"
    peft_model = get_peft_model(model, config)
    init_lora(peft_model, lora)
    return peft_model


def forward_backward(learner: Learner, batch) -> torch.Tensor:
    """One forward and backward pass; the gradients are left in .grad. Returns the loss."""
    input_ids, labels = batch["input_ids"], batch["labels"]  # (B, T), (B, T)
    if learner.mode == "local":
        loss = criterion(learner.model(input_ids=input_ids).logits, labels)
        loss.backward()
        return loss
    hidden_1 = learner.bottom(input_ids)  # (B, T, d)
    if learner.mode == "detach":  # the seeds' code, as written
        hidden_2 = learner.client.compute(hidden_1.detach())  # (B, T, d)
        hidden_2 = hidden_2.requires_grad_(True)  # a new leaf: backward stops here
    else:
        hidden_2 = learner.trunk(hidden_1)  # (B, T, d), differentiable through the server
    output = learner.top(hidden_2)  # (B, T, vocab)
    loss = criterion(output, labels)
    if loss.requires_grad:  # False only when nothing before the loss is trainable (cuts (0, n), not full+trunk)
        loss.backward()
    return loss


def zero_grad(learner: Learner):
    for opt in (learner.optimizer_bottom, learner.optimizer_top, learner.optimizer):
        if opt is not None:
            opt.zero_grad(set_to_none=True)


def train_step(learner: Learner, batch) -> float:
    """forward_backward, then every optimizer steps. A server restart mid-step costs one redo."""
    for _ in range(2):
        reopened = learner.client.reopened if learner.client else 0
        zero_grad(learner)
        loss = forward_backward(learner, batch)
        if learner.mode == "full+trunk":
            learner.client.step()
        if learner.client is None or learner.client.reopened == reopened:
            break  # else the trunk's gradients died with the old server: do the step again
    for opt in (learner.optimizer_bottom, learner.optimizer_top, learner.optimizer):
        if opt is not None:
            opt.step()
    return loss.item()


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
        sent0, recv0, t0 = _bytes(learner) + (time.perf_counter(),)
        loss = train_step(learner, next(batches))
        sent1, recv1 = _bytes(learner)
        history.loss.append(loss)
        history.seconds.append(time.perf_counter() - t0)
        history.bytes_sent.append(sent1 - sent0)
        history.bytes_received.append(recv1 - recv0)
        history.delta_norms.append(learner.delta_norms())
        bar.set_postfix(loss=f"{loss:.3f}")
    return history


def _bytes(learner):
    c = learner.client
    return (c.bytes_sent, c.bytes_received) if c else (0, 0)


@torch.no_grad()
def generate(learner: Learner, tokenizer, prompts, max_new_tokens: int = 4) -> list[str]:
    """Greedy continuations, batched with right padding (causal attention ignores what follows)."""
    rows = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
    lengths = [len(r) for r in rows]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.full((len(rows), max(lengths) + max_new_tokens), pad)  # (B, T)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
    new = [[] for _ in rows]
    for _ in range(max_new_tokens):
        logits = learner.logits(ids[:, :max(lengths)])  # (B, T, vocab)
        for i, n in enumerate(lengths):
            if new[i] and new[i][-1] == tokenizer.eos_token_id:
                continue
            token = int(logits[i, n - 1].argmax())
            ids[i, n] = token
            lengths[i] += 1
            new[i].append(token)
    return [tokenizer.decode(t, skip_special_tokens=True) for t in new]


def exact_match(learner: Learner, tokenizer, pairs) -> tuple[float, list[str]]:
    """Fraction of prompts whose greedy answer (first line) equals the expected one; and the answers."""
    answers = generate(learner, tokenizer, [p for p, _ in pairs])
    hits = [a.strip().split("\n")[0] == want.strip() for a, (_, want) in zip(answers, pairs)]
    return sum(hits) / len(pairs), answers
