"""splitkit: U-shaped split learning of a causal LM with LoRA, for teaching and trying out.

Bottom and Top run on the client, the Trunk on a ZeroMQ trunk server. Start with
`load_model`, `split_model`, `TrunkServer`, `TrunkClient` and `make_learner`.
"""

from .client import RemoteTrunk, TrunkClient, TrunkError, TrunkUnavailable
from .models import MODELS, SMOLLM2, ModelUnavailable, load_model
from .server import TrunkServer
from .split import LoraSpec, add_lora, count_parameters, lora_delta_norms, lora_grads, split_model
from .train import MODES, Learner, exact_match, generate, make_learner, train, train_step, unsplit_reference

__all__ = ["MODELS", "MODES", "SMOLLM2", "Learner", "LoraSpec", "ModelUnavailable", "RemoteTrunk", "TrunkClient",
           "TrunkError", "TrunkServer", "TrunkUnavailable", "add_lora", "count_parameters", "exact_match",
           "generate", "load_model", "lora_delta_norms", "lora_grads", "make_learner", "split_model", "train",
           "train_step", "unsplit_reference"]
