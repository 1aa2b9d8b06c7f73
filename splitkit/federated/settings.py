"""A split federated run's settings, as Flower names them, and what they make: the task, each client's shard,
the LoRA every run starts from, and where the ServerApp saves its rounds."""

import copy
from pathlib import Path

from ..core import data
from ..core.lora import LoraSpec, lora_parameters, unsplit_reference
from ..core.models import SMOLLM2
from ..wire.protocol import FULL_TRUNK

AVERAGING = ("ab", "product")

# The run's settings, as Flower names them: a pyproject's [tool.flwr.app.config] (flower/pyproject.toml), or
# the config given to run(). The ServerApp sends them to every client with each round.
DEFAULTS = {
    "address": "tcp://127.0.0.1:5555",  # the trunk server every client uses
    "model": SMOLLM2,
    "mode": "full",                      # or "full+trunk": then the Trunk's LoRA is averaged too
    "cuts": [10, 20],
    "rounds": 3,
    "local-steps": 4,                    # training steps per client per round
    "batch-size": 4,
    "lr": 2e-3,
    "lora-r": 8,
    "lora-alpha": 16,
    "seed": 0,
    "freeze-a": False,
    "averaging": "ab",
    "facts": 32,                         # the task: this many facts (task()), dealt out to the clients
    "curve-dir": "",                     # a folder with the trunk server's CURVE keys ("": none, loopback only)
}


def run_settings(given: dict) -> dict:
    """`given` over DEFAULTS; cuts may come as "10,20" (or "10 20"): a pyproject's Flower config holds no lists."""
    settings = {**DEFAULTS, **given}
    if isinstance(settings["cuts"], str):
        settings["cuts"] = [int(c) for c in settings["cuts"].replace(",", " ").split()]
    return settings


def task(n: int = 32) -> list[tuple[str, str]]:
    """n facts about the made-up places: their flags' colours, then their animals."""
    pairs = data.facts("colour") + data.facts("animal")
    if not 0 < n <= len(pairs):
        raise ValueError(f"the task has 1 to {len(pairs)} facts, not {n}")
    return pairs[:n]


def shard(pairs: list, partition: int, partitions: int) -> list:
    """Client `partition`'s own facts: every `partitions`-th one, so no two clients share a fact."""
    if not 0 <= partition < partitions <= len(pairs):
        raise ValueError(f"partition {partition} of {partitions} over {len(pairs)} facts")
    return pairs[partition::partitions]


def lora_spec(config: dict) -> LoraSpec:
    return LoraSpec(r=int(config["lora-r"]), lora_alpha=int(config["lora-alpha"]), seed=int(config["seed"]))


def initial_lora(model, config: dict) -> dict:
    """{name: tensor} of the LoRA every client starts from: the one a Learner of this run puts there."""
    reference = unsplit_reference(copy.deepcopy(model), config["cuts"], lora_spec(config), config["mode"] == FULL_TRUNK)
    return {name: w.detach().clone() for name, w in lora_parameters(reference)}


def rounds_file(settings: dict) -> Path | None:
    """Where the ServerApp saves its rounds (`save-rounds`), checked before the first round: an absolute path, since
    the ServerApp runs in a process of Flower's whose working folder is not the one `flwr run` ran in; None if ""."""
    saving = settings.get("save-rounds") or None
    if saving is not None and not Path(saving).is_absolute():
        raise ValueError(f"save-rounds must be an absolute path, not {saving!r}: the ServerApp runs in a process "
                         "of Flower's, whose working folder is not the one flwr run ran in")
    return None if saving is None else Path(saving)




def _flat(settings: dict) -> dict:
    """The settings a ConfigRecord can carry (it takes numbers, strings, booleans and lists of them)."""
    return {k: v for k, v in settings.items() if isinstance(v, int | float | str | bool | list)}
