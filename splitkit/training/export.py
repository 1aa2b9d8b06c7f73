"""Adapters you can take away: a split run saved as one standard PEFT adapter for the unsplit model.

The Bottom's and the Top's LoRA come from the client; in full+trunk the Trunk's LoRA is fetched
from the server. Each LoRA matrix is keyed by its block's place in the whole model, so it lands on
the layer PEFT expects, and `PeftModel.from_pretrained(base_model, folder)` gives the split model's logits.
"""

import copy
import json
from pathlib import Path

import torch

from ..core.lora import lora_parameters, unsplit_reference
from ..wire.protocol import FULL_TRUNK, LOCAL


def save_adapter(learner, base_model, folder) -> Path:
    """Save the LoRA of `learner` (any mode) as a PEFT adapter for `base_model`, the unsplit model it started from."""
    folder = Path(folder)
    if learner.mode == LOCAL:
        learner.model.save_pretrained(folder)
        return _stable_config(folder)
    trained = {**dict(lora_parameters(learner.bottom)), **dict(lora_parameters(learner.top))}
    if learner.mode == FULL_TRUNK:
        trained.update(learner.client.trunk_lora())  # the server's copy of this session's Trunk LoRA
    if not trained:
        raise ValueError(f"nothing to save: with cuts {learner.cuts} in mode {learner.mode!r} no block has LoRA")
    unsplit = unsplit_reference(copy.deepcopy(base_model), learner.cuts, learner.lora,
                                train_trunk=learner.mode == FULL_TRUNK)
    slots = dict(lora_parameters(unsplit))
    if slots.keys() != trained.keys():
        raise ValueError(f"the run's LoRA does not fit {base_model.config.name_or_path}: "
                         f"{sorted(slots.keys() ^ trained.keys())[:4]} ...")
    with torch.no_grad():
        for name, weight in slots.items():
            weight.copy_(trained[name])
    unsplit.save_pretrained(folder)
    return _stable_config(folder)


def _stable_config(folder: Path) -> Path:
    """PEFT writes target_modules in a set's order, which differs between processes: sort it, and the keys, so that
    two identical runs write identical folders."""
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return folder
