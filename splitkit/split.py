"""Cutting a causal LM into Bottom, Trunk and Top.

U-shaped split learning: the Bottom (embeddings + blocks [0, a)) and the Top (blocks [b, n),
final norm, LM head) stay with the client; the Trunk (blocks [a, b)) runs on a server.
What splitkit must know about each family of models lives here, in FAMILIES.
"""

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask


@dataclass(frozen=True)
class Family:
    """What splitkit must know about one family of models, beyond what transformers tells it."""

    blocks: str           # the name of the block list ("model.layers.3", "transformer.h.3"); PEFT's layers_pattern
    conv1d: bool = False  # weights stored (in, out) as GPT-2's Conv1D, so PEFT's LoRA needs fan_in_fan_out


FAMILIES = {"llama": Family("layers"), "qwen2": Family("layers"), "mistral": Family("layers"),
            "gpt2": Family("h", conv1d=True)}


def family(config) -> Family:
    """The Family of a transformers config, or a TypeError that names the families splitkit knows."""
    if config.model_type not in FAMILIES:
        raise TypeError(f"splitkit knows the model families {', '.join(FAMILIES)}, not {config.model_type!r}")
    return FAMILIES[config.model_type]


class Layout(NamedTuple):
    """Where one family of models keeps its pieces."""

    tokens: nn.Embedding
    positions: nn.Embedding | None  # GPT-2's learned positions; None with rotary embeddings
    dropout: nn.Module | None
    layers: nn.ModuleList
    rotary: nn.Module | None  # Llama's rotary embedding (no parameters, shared by all parts)
    norm: nn.Module
    lm_head: nn.Module


def layout(model) -> Layout:
    """Find the pieces of a transformers causal LM."""
    if family(model.config).blocks == "h":  # GPT-2
        t = model.transformer
        return Layout(t.wte, t.wpe, t.drop, t.h, None, t.ln_f, model.lm_head)
    m = model.model  # Llama, Qwen2, Mistral
    return Layout(m.embed_tokens, None, None, m.layers, m.rotary_emb, m.norm, model.lm_head)


def n_layers(model) -> int:
    return len(layout(model).layers)


def check_cuts(cuts, n: int) -> tuple[int, int]:
    """Return cuts as (a, b) with 0 <= a < b <= n, or raise a ValueError that says why not."""
    try:
        a, b = (int(c) for c in cuts)
    except (TypeError, ValueError):
        raise ValueError(f"cuts must be two integers (a, b), got {cuts!r}") from None
    if not 0 <= a < b <= n:
        why = "the Trunk would be empty" if a == b else "they must satisfy 0 <= a < b <= n_layers"
        raise ValueError(f"cuts (a={a}, b={b}) do not fit a model of {n} blocks: {why}")
    return a, b


class Blocks(nn.Module):
    """A run of transformer blocks, keyed by their index in the whole model."""

    def __init__(self, model, start: int, stop: int):
        super().__init__()
        lay = layout(model)
        self.config = model.config
        self.layers = nn.ModuleDict({str(i): lay.layers[i] for i in range(start, stop)})
        self.rotary = lay.rotary

    def forward(self, h):  # (B, T, d) -> (B, T, d)
        if not self.layers:
            return h
        position_ids = torch.arange(h.shape[1], device=h.device)[None]  # (1, T)
        mask = create_causal_mask(config=self.config, inputs_embeds=h, attention_mask=None,
                                  past_key_values=None, position_ids=position_ids)
        extra = {} if self.rotary is None else {"position_embeddings": self.rotary(h, position_ids=position_ids)}
        for layer in self.layers.values():
            h = layer(h, attention_mask=mask, position_ids=position_ids, **extra)
        return h


class Bottom(nn.Module):
    """Token embeddings + blocks [0, a): input_ids (B, T) -> hidden states (B, T, d)."""

    def __init__(self, model, a: int):
        super().__init__()
        lay = layout(model)
        self.tokens, self.positions, self.dropout = lay.tokens, lay.positions, lay.dropout
        self.blocks = Blocks(model, 0, a)

    def forward(self, input_ids):
        h = self.tokens(input_ids)  # (B, T, d)
        if self.positions is not None:
            h = h + self.positions(torch.arange(input_ids.shape[1], device=input_ids.device))
        if self.dropout is not None:
            h = self.dropout(h)
        return self.blocks(h)  # (B, T, d)


class Trunk(Blocks):
    """Blocks [a, b): hidden states (B, T, d) -> (B, T, d). This part runs on the server."""


class Top(nn.Module):
    """Blocks [b, n) + final norm + LM head: hidden states (B, T, d) -> logits (B, T, vocab)."""

    def __init__(self, model, b: int):
        super().__init__()
        lay = layout(model)
        self.blocks = Blocks(model, b, len(lay.layers))
        self.norm, self.lm_head = lay.norm, lay.lm_head

    def forward(self, h):
        return self.lm_head(self.norm(self.blocks(h)))  # (B, T, vocab)


class Parts(NamedTuple):
    bottom: Bottom
    trunk: Trunk
    top: Top


def split_model(model, cuts) -> Parts:
    """Cut `model` into (bottom, trunk, top). The parts share the model's weights (no copy)."""
    n = n_layers(model)
    a, b = check_cuts(cuts, n)
    return Parts(Bottom(model, a), Trunk(model, a, b), Top(model, b))


def count_parameters(module) -> tuple[int, int]:
    """(total, trainable) parameter counts; a shared module counts once."""
    params = {id(p): p for p in module.parameters()}.values()
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)
