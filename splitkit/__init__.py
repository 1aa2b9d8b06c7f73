"""splitkit: U-shaped split learning of a causal LM with LoRA, for teaching and trying out.

Bottom and Top run on the client, the Trunk on a ZeroMQ trunk server. Start with
`load_model`, `split_model`, `TrunkServer`, `TrunkClient` and `Learner`.
"""

from .core.lora import LoraSpec, add_lora, lora_delta_norms, lora_grads, unsplit_reference
from .core.models import MODELS, SMOLLM2, ModelUnavailable, load_model
from .core.split import count_parameters, split_model
from .training.generation import exact_match, generate
from .training.train import Learner, train
from .trunk.server import TrunkServer
from .trunk.sessions import Limits
from .wire.client import TrunkClient, TrunkError, TrunkUnavailable
from .wire.protocol import MODES
from .wire.remote import RemoteTrunk

__all__ = ["MODELS", "MODES", "SMOLLM2", "Learner", "Limits", "LoraSpec", "ModelUnavailable", "RemoteTrunk",
           "TrunkClient", "TrunkError", "TrunkServer", "TrunkUnavailable", "add_lora", "count_parameters",
           "exact_match", "generate", "load_model", "lora_delta_norms", "lora_grads", "split_model", "train",
           "unsplit_reference"]
