"""Cutting a causal LM into Bottom, Trunk and Top.

U-shaped split learning: the Bottom (embeddings + blocks [0, a)) and the Top (blocks [b, n),
final norm, LM head) stay with the client; the Trunk (blocks [a, b)) runs on a server.
What splitkit must know about each family of models lives here, in FAMILIES.
"""

import inspect
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask


@dataclass(frozen=True)
class Family:
    """What splitkit must know about one family of models, beyond what transformers tells it."""

    base: str = "model"              # the decoder inside the causal LM ("model.layers.3", "transformer.h.3")
    tokens: str = "embed_tokens"     # the token embedding (Gemma's scales by sqrt(d) inside it)
    blocks: str = "layers"           # the block list; PEFT's layers_pattern
    norm: str = "norm"               # the final norm
    head: str = "lm_head"            # the LM head, on the causal LM itself
    positions: str | None = None     # learned position embeddings (GPT-2); None with rotary embeddings
    dropout: str | None = None       # dropout after the embeddings (off in eval mode)
    conv1d: bool = False             # weights stored (in, out) as GPT-2's Conv1D: PEFT's LoRA needs fan_in_fan_out
    lora_targets: tuple[str, ...] | None = None  # default LoRA targets where PEFT has none


FAMILIES = {
    "llama": Family(), "qwen2": Family(), "qwen3": Family(), "mistral": Family(), "gemma2": Family(),
    "gemma3_text": Family(), "phi3": Family(lora_targets=("qkv_proj",)),
    "gpt_neox": Family("gpt_neox", tokens="embed_in", norm="final_layer_norm", dropout="emb_dropout"),
    "gpt2": Family("transformer", tokens="wte", blocks="h", norm="ln_f", positions="wpe", dropout="drop", conv1d=True),
}


def family(config) -> Family:
    """The Family of a transformers config, or a TypeError that names the families splitkit knows."""
    if config.model_type not in FAMILIES:
        raise TypeError(f"splitkit knows the model families {', '.join(FAMILIES)}, not {config.model_type!r}")
    return FAMILIES[config.model_type]


class Layout(NamedTuple):
    """Where one model keeps its pieces."""

    tokens: nn.Embedding
    positions: nn.Embedding | None
    dropout: nn.Module | None
    layers: nn.ModuleList
    rotary: nn.Module | None  # the rotary embedding (no parameters, shared by all parts); None for GPT-2
    norm: nn.Module
    lm_head: nn.Module


def layout(model) -> Layout:
    """Find the pieces of a transformers causal LM, by its family."""
    fam = family(model.config)
    base = getattr(model, fam.base)
    positions, dropout = (getattr(base, name) if name else None for name in (fam.positions, fam.dropout))
    return Layout(getattr(base, fam.tokens), positions, dropout, getattr(base, fam.blocks),
                  getattr(base, "rotary_emb", None), getattr(base, fam.norm), getattr(model, fam.head))


def layer_type(config, i: int) -> str:
    """'full_attention' or 'sliding_attention' for block i, as the model's own forward decides it."""
    if getattr(config, "layer_types", None):
        return config.layer_types[i]
    return "sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"


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

    def forward(self, h, attention_mask=None, position_ids=None, past_key_values=None):  # (B, T, d) -> (B, T, d)
        """Without the keywords: the whole sequence, no padding. For generation: `attention_mask` (B, past + T),
        1 for a token and 0 for padding, `position_ids` (B, T), and a transformers Cache that the blocks fill."""
        if not self.layers:
            return h
        if position_ids is None:
            position_ids = torch.arange(h.shape[1], device=h.device)[None]  # (1, T): positions 0..T-1, no padding
        kinds = {i: layer_type(self.config, int(i)) for i in self.layers}
        first = {kind: int(next(i for i in self.layers if kinds[i] == kind)) for kind in set(kinds.values())}
        masks = {kind: MASKS[kind](config=self.config, inputs_embeds=h, attention_mask=attention_mask,
                                   past_key_values=past_key_values, position_ids=position_ids,
                                   **({} if past_key_values is None else {"layer_idx": first[kind]}))
                 for kind in first}  # layer_idx: a part's cache holds only its own blocks
        rotary = {kind: self._rotary(h, position_ids, kind) for kind in first}
        extra = {} if past_key_values is None else {"past_key_values": past_key_values, "use_cache": True}
        for i, layer in self.layers.items():
            if rotary[kinds[i]] is not None:
                extra["position_embeddings"] = rotary[kinds[i]]
            h = layer(h, attention_mask=masks[kinds[i]], position_ids=position_ids, **extra)
        return h

    def _rotary(self, h, position_ids, kind: str):
        """(cos, sin) for this kind of layer; Gemma 3 keeps one rotary base per kind."""
        if self.rotary is None:
            return None
        if "layer_type" in inspect.signature(self.rotary.forward).parameters:
            return self.rotary(h, position_ids, kind)
        return self.rotary(h, position_ids)


def left_padding(pad, start: int, stop: int, device=None):
    """(attention_mask (B, stop), position_ids (B, stop - start)) of columns [start, stop) of rows that are
    left-padded by `pad` (B,) tokens, as transformers' generate() makes them: 0 on padding, positions from 0."""
    pad = torch.as_tensor(pad, device=device)[:, None]  # (B, 1)
    mask = (torch.arange(stop, device=device)[None] >= pad).long()  # (B, stop)
    return mask, (torch.arange(start, stop, device=device)[None] - pad).clamp(min=0)  # (B, stop - start)


def padding_of(attention_mask) -> torch.Tensor:  # (B, T) -> (B,)
    """Each row's left padding, from an attention_mask that is 0s then 1s in each row; a ValueError otherwise."""
    pad = (attention_mask == 0).sum(dim=1)
    if not torch.equal(left_padding(pad, 0, attention_mask.shape[1])[0], attention_mask.long()):
        raise ValueError("attention_mask must be left padding: each row 0s, then 1s")
    return pad


MASKS = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}


class Bottom(nn.Module):
    """Token embeddings + blocks [0, a): input_ids (B, T) -> hidden states (B, T, d)."""

    def __init__(self, model, a: int):
        super().__init__()
        lay = layout(model)
        self.tokens, self.positions, self.dropout = lay.tokens, lay.positions, lay.dropout
        self.blocks = Blocks(model, 0, a)

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None):
        h = self.tokens(input_ids)  # (B, T, d)
        if self.positions is not None:
            where = torch.arange(input_ids.shape[1], device=input_ids.device) if position_ids is None else position_ids
            h = h + self.positions(where)
        if self.dropout is not None:
            h = self.dropout(h)
        return self.blocks(h, attention_mask, position_ids, past_key_values)  # (B, T, d)


class Trunk(Blocks):
    """Blocks [a, b): hidden states (B, T, d) -> (B, T, d). This part runs on the server."""


class Top(nn.Module):
    """Blocks [b, n) + final norm + LM head: hidden states (B, T, d) -> logits (B, T, vocab)."""

    def __init__(self, model, b: int):
        super().__init__()
        lay = layout(model)
        self.blocks = Blocks(model, b, len(lay.layers))
        self.norm, self.lm_head = lay.norm, lay.lm_head
        self.softcap = getattr(model.config, "final_logit_softcapping", None)  # Gemma 2: cap * tanh(logits / cap)

    def forward(self, h, attention_mask=None, position_ids=None, past_key_values=None, logits_to_keep: int = 0):
        """logits_to_keep k > 0: the logits of the last k positions only (B, k, vocab), as transformers' models
        compute them for generate(); the blocks still see every position (they fill the cache)."""
        h = self.blocks(h, attention_mask, position_ids, past_key_values)  # (B, T, d)
        logits = self.lm_head(self.norm(h[:, -logits_to_keep:] if logits_to_keep else h))  # (B, T or k, vocab)
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


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
