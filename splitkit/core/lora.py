"""LoRA on the parts, in PEFT's vocabulary: the spec, its config, a seeded init, gradients and changes.

A LoRA layer adds (lora_alpha / r) · B · A to a frozen weight W, with A (r, in) and B (out, r).
Each layer is keyed by its place in the whole model ('12.self_attn.q_proj'), so a gradient from
the split run and one from the unsplit model can be compared name by name.
"""

import re
import secrets
import warnings
import zlib
from dataclasses import dataclass, field, replace

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn

from .split import FAMILIES, Blocks, check_cuts, family


@dataclass
class LoraSpec:
    """What PEFT's LoraConfig gets; scaling = lora_alpha / r. B = 0 at start unless init_b > 0.

    `seed` None (the default) is a secret one: `resolved()` draws it from the operating system's entropy, so two
    clients never start from the same LoRA and a server cannot recompute a client's start. Give a seed to
    reproduce a run, and keep it from the server: with it and the step-0 tensors, the server can replay training.
    """

    r: int = 8
    lora_alpha: int = 16
    target_modules: tuple[str, ...] | None = None  # None: PEFT's default for the model family
    init_b: float = 0.0  # std of a random lora_B (0 = PEFT's default, an adapter that starts as a no-op)
    seed: int | None = None  # None: secret, drawn by resolved()
    extra: dict = field(default_factory=dict)  # any other LoraConfig field

    def resolved(self) -> "LoraSpec":
        """This spec with a seed: its own, or a fresh one from the operating system's entropy."""
        return self if self.seed is not None else replace(self, seed=secrets.randbits(63))

    def to_json(self) -> dict:
        """The `lora` object of a full+trunk hello: the shape of the Trunk's LoRA, never the seed (the server
        draws its own)."""
        return {"r": self.r, "lora_alpha": self.lora_alpha, "init_b": self.init_b,
                "target_modules": None if self.target_modules is None else list(self.target_modules)}

    def targets(self, config) -> list[str]:
        if self.target_modules is not None:
            return list(self.target_modules)
        own = family(config).lora_targets
        return list(own) if own else TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING[config.model_type]


def lora_config(spec: LoraSpec, config) -> LoraConfig:
    return LoraConfig(r=spec.r, lora_alpha=spec.lora_alpha, target_modules=spec.targets(config),
                      lora_dropout=0.0, fan_in_fan_out=family(config).conv1d, **spec.extra)


def add_lora(part: nn.Module, spec: LoraSpec, config, adapter: str = "default"):
    """Wrap a part in a PeftModel with LoRA on its blocks; a part without blocks is just frozen."""
    part.requires_grad_(False)
    if not any(isinstance(m, Blocks) and len(m.layers) for m in part.modules()):
        return part
    peft_part = get_peft_model(part, lora_config(spec, config), adapter_name=adapter)
    init_lora(peft_part, spec, adapter)
    return peft_part


def add_adapter(peft_part: PeftModel, spec: LoraSpec, config, adapter: str):
    """Another adapter on the same base weights (one per server session)."""
    peft_part.add_adapter(adapter, lora_config(spec, config))
    init_lora(peft_part, spec, adapter)


def unsplit_reference(model, cuts, lora: LoraSpec, train_trunk: bool, start: dict | None = None):
    """The unsplit model (changed in place) with LoRA on the blocks a split run trains, same init.

    `start` ({name: tensor}, as Learner.lora_state() gives it) sets the LoRA a split run began from instead of
    the seeded init: in full+trunk the server drew the Trunk's from a seed of its own. With no block to train
    (cuts (0, n) and a frozen Trunk) it is the model itself, frozen: nothing trains.
    """
    n = model.config.num_hidden_layers
    a, b = check_cuts(cuts, n)
    layers = list(range(n)) if train_trunk else [*range(a), *range(b, n)]
    if not layers:  # PEFT reads an empty layers_to_transform as "every layer"
        return model.requires_grad_(False)
    config = lora_config(lora, model.config)
    config.layers_to_transform = layers
    config.layers_pattern = family(model.config).blocks
    with warnings.catch_warnings():  # peft asks transformers a question that transformers has renamed
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = get_peft_model(model, config)
    init_lora(peft_model, lora)
    if start is not None:
        own = dict(lora_parameters(peft_model))
        if own.keys() != start.keys():
            raise ValueError(f"the start does not fit this reference: {sorted(own.keys() ^ start.keys())[:3]} ...")
        with torch.no_grad():
            for name, weight in own.items():
                weight.copy_(start[name])
    return peft_model


_LAYER = re.compile(rf"(?:^|\.)(?:{'|'.join(sorted({f.blocks for f in FAMILIES.values()}))})\.(\d+)\.(.+?)"
                    r"(?:\.base_layer)?$")


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


def lora_parameters(module, adapter: str = "default"):
    """('12.self_attn.q_proj.lora_A', weight), ... for every LoRA matrix of `adapter`."""
    for key, layer in lora_layers(module, adapter).items():
        for ab in ("lora_A", "lora_B"):
            yield f"{key}.{ab}", getattr(layer, ab)[adapter].weight


def init_lora(module, spec: LoraSpec, adapter: str = "default"):
    """Initialise each LoRA layer from the spec's seed (a secret one if it gives none) and its place in the model.

    A layer gets the same lora_A (and lora_B) whether it sits in the unsplit model, in a Part
    on the client or in the Trunk on the server, so split and unsplit runs start identical.
    A is PEFT's default (kaiming-uniform, a=sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in))).
    """
    seed = spec.resolved().seed  # one secret seed for every layer when the spec gives none
    with torch.no_grad():
        for key, layer in lora_layers(module, adapter).items():
            g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(key.encode())) % 2**64)
            A, B = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight  # (r, in), (out, r)
            bound = A.shape[1] ** -0.5
            A.copy_(torch.rand(A.shape, generator=g) * 2 * bound - bound)
            B.copy_(torch.randn(B.shape, generator=g) * spec.init_b)


def lora_grads(module, adapter: str = "default") -> dict:
    """{'12.self_attn.q_proj.lora_A': grad or None, ...}: comparable across split and unsplit."""
    return {name: None if w.grad is None else w.grad.detach().clone() for name, w in lora_parameters(module, adapter)}


def lora_delta_norms(module, adapter: str = "default") -> dict:
    """{layer_key: ||B @ A * scaling||}: how far each LoRA layer has moved the base weight."""
    with torch.no_grad():
        return {key: float(layer.get_delta_weight(adapter).norm())
                for key, layer in lora_layers(module, adapter).items()}


class Merged:
    """A context in which one adapter is merged into the base weights of `module`'s LoRA layers: inside it a
    LoRA layer computes W' x with W' = W + scaling · B A, its base layer alone without the LoRA's two small
    matmuls, for inference (no gradient reaches the LoRA through a merged weight). Not re-entrant.

    PEFT does the merge (LoraLayer.merge, which knows GPT-2's fan_in_fan_out and the scaling), into a copy of
    each base weight; the merged copies are kept, so entering again costs no arithmetic. On the way out, after
    an error too, each base layer gets back the very tensors it had: nothing changes by a bit, as PEFT's
    unmerge (W + d - d in floating point) would not promise. The adapter must not change while merged: the
    copies are of the LoRA as it was on the first entry."""

    def __init__(self, module, adapter: str = "default"):
        self.adapter, self.layers = adapter, list(lora_layers(module, adapter).values())
        self.weights = None  # per layer, the merged tensors of its base weight (and bias), once merged
        self._own = []  # per entered layer: [(parameter, the tensor it had)]

    @property
    def nbytes(self) -> int:
        """Bytes of the merged copies (0 before the first entry)."""
        return sum(t.nbytes for tensors in self.weights or () for t in tensors)

    def __enter__(self):
        first, merged = self.weights is None, []
        try:
            for i, layer in enumerate(self.layers):
                params = _base_parameters(layer)
                self._own.append([(p, p.data) for p in params])
                if first:
                    for p in params:
                        p.data = p.data.clone()  # PEFT merges into this copy; the original is never written
                    layer.merge(adapter_names=[self.adapter])
                    merged.append([p.data for p in params])
                else:
                    for p, w in zip(params, self.weights[i], strict=True):
                        p.data = w
                    layer.merged_adapters.append(self.adapter)  # what layer.merge records: forward skips the LoRA
        except BaseException:
            self.__exit__()
            raise
        if first:
            self.weights = merged
        return self

    def __exit__(self, *exc):
        for layer, own in zip(self.layers, self._own, strict=False):  # the layers entered, all or the first few
            for p, w in own:
                p.data = w
            if self.adapter in layer.merged_adapters:
                layer.merged_adapters.remove(self.adapter)
        self._own = []


def _base_parameters(layer) -> list:
    """The base layer's weight and bias (if it has one): what a merge may write."""
    base = layer.get_base_layer()
    return [p for p in (base.weight, getattr(base, "bias", None)) if p is not None]
