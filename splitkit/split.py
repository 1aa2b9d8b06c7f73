"""Cutting a causal LM into Bottom, Trunk and Top, and putting PEFT's LoRA on the parts.

U-shaped split learning: the Bottom (embeddings + blocks [0, a)) and the Top (blocks [b, n),
final norm, LM head) stay with the client; the Trunk (blocks [a, b)) runs on a server.
Works for the Llama layout (Llama, Qwen2, Mistral, SmolLM2) and for GPT-2.
"""

import re
import zlib
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn
from transformers.masking_utils import create_causal_mask


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
    if hasattr(model, "model") and hasattr(model.model, "layers"):  # Llama, Qwen2, Mistral
        m = model.model
        return Layout(m.embed_tokens, None, None, m.layers, m.rotary_emb, m.norm, model.lm_head)
    if hasattr(model, "transformer") and hasattr(model.transformer, "h"):  # GPT-2
        t = model.transformer
        return Layout(t.wte, t.wpe, t.drop, t.h, None, t.ln_f, model.lm_head)
    raise TypeError(f"splitkit knows the Llama and GPT-2 layouts, not {type(model).__name__}")


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


# ---------------------------------------------------------------- LoRA, in PEFT's vocabulary


@dataclass
class LoraSpec:
    """What PEFT's LoraConfig gets; scaling = lora_alpha / r. B = 0 at start unless init_b > 0."""

    r: int = 8
    lora_alpha: int = 16
    target_modules: tuple[str, ...] | None = None  # None: PEFT's default for the model family
    init_b: float = 0.0  # std of a random lora_B (0 = PEFT's default, an adapter that starts as a no-op)
    seed: int = 0
    extra: dict = field(default_factory=dict)  # any other LoraConfig field

    def to_json(self) -> dict:
        return {"r": self.r, "lora_alpha": self.lora_alpha, "seed": self.seed, "init_b": self.init_b,
                "target_modules": None if self.target_modules is None else list(self.target_modules)}

    def targets(self, config) -> list[str]:
        if self.target_modules is not None:
            return list(self.target_modules)
        return TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING[config.model_type]


def lora_config(spec: LoraSpec, config) -> LoraConfig:
    return LoraConfig(r=spec.r, lora_alpha=spec.lora_alpha, target_modules=spec.targets(config),
                      lora_dropout=0.0, fan_in_fan_out=config.model_type == "gpt2", **spec.extra)


def add_lora(part: nn.Module, spec: LoraSpec, config, adapter: str = "default"):
    """Wrap a part in a PeftModel with LoRA on its blocks; a part without blocks is just frozen."""
    part.requires_grad_(False)
    if not any(True for _ in _blocks_of(part)):
        return part
    peft_part = get_peft_model(part, lora_config(spec, config), adapter_name=adapter)
    init_lora(peft_part, spec, adapter)
    return peft_part


def add_adapter(peft_part: PeftModel, spec: LoraSpec, config, adapter: str):
    """Another adapter on the same base weights (one per server session)."""
    peft_part.add_adapter(adapter, lora_config(spec, config))
    init_lora(peft_part, spec, adapter)


def _blocks_of(part):
    return (m for m in part.modules() if isinstance(m, Blocks) and len(m.layers))


_LAYER = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)\.(.+?)(?:\.base_layer)?$")


def layer_key(module_name: str) -> str:
    """'base_model.model.blocks.layers.12.self_attn.q_proj' -> '12.self_attn.q_proj' (also for HF names)."""
    m = _LAYER.search(module_name)
    if m is None:
        raise ValueError(f"{module_name!r} is not inside a transformer block")
    return f"{m.group(1)}.{m.group(2)}"


def lora_layers(module, adapter: str = "default") -> dict:
    """{layer_key: LoRA layer} for every LoRA layer of `module` that holds `adapter`."""
    return {layer_key(name): m for name, m in module.named_modules()
            if isinstance(m, LoraLayer) and adapter in m.lora_A}


def init_lora(module, spec: LoraSpec, adapter: str = "default"):
    """Initialise each LoRA layer from a seed and its place in the whole model.

    A layer gets the same lora_A (and lora_B) whether it sits in the unsplit model, in a Part
    on the client or in the Trunk on the server, so split and unsplit runs start identical.
    A is PEFT's default (kaiming-uniform, a=sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in))).
    """
    with torch.no_grad():
        for key, layer in lora_layers(module, adapter).items():
            g = torch.Generator().manual_seed(spec.seed * 1_000_003 + zlib.crc32(key.encode()))
            A, B = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight  # (r, in), (out, r)
            bound = A.shape[1] ** -0.5
            A.copy_(torch.rand(A.shape, generator=g) * 2 * bound - bound)
            B.copy_(torch.randn(B.shape, generator=g) * spec.init_b)


def lora_grads(module, adapter: str = "default") -> dict:
    """{'12.self_attn.q_proj.lora_A': grad or None, ...}: comparable across split and unsplit."""
    out = {}
    for key, layer in lora_layers(module, adapter).items():
        for ab in ("lora_A", "lora_B"):
            g = getattr(layer, ab)[adapter].weight.grad
            out[f"{key}.{ab}"] = None if g is None else g.detach().clone()
    return out


def lora_delta_norms(module, adapter: str = "default") -> dict:
    """{layer_key: ||B @ A * scaling||}: how far each LoRA layer has moved the base weight."""
    with torch.no_grad():
        return {key: float(layer.get_delta_weight(adapter).norm()) for key, layer in lora_layers(module, adapter).items()}


def count_parameters(module) -> tuple[int, int]:
    """(total, trainable) parameter counts; a shared module counts once."""
    params = {id(p): p for p in module.parameters()}.values()
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)
