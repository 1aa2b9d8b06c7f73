"""What the trunk server can read, measured: the attacks a curious or malicious server can run on what crosses
the wire (`attacks`: white-box search, answer matching, a shadow Bottom) and the probes notebook 06 and the privacy
benchmark are made of (`probes`: inversions, label probes, curious and steering servers), and the replay of a
client's training by a server that knows its seed (`replay`) and the tracking of it by one that does not
(`tracking`); maximum-likelihood decoding of noisy h1 (`decoding`); the quiet malicious server and the client's
audit of the dL/dh1 it answers (`quiet`).

It imports the core, the wire, the client's training (its defences) and the trunk server, whose ops the probes
run directly; nothing below imports it.
"""

from .attacks import answer_match, linear_read, secret_positions, secrets_recovered, shadow_bottom, whitebox_search
from .decoding import ml_decode, ml_sentences
from .probes import (
                     SECRETS,
                     SENTENCES,
                     CuriousServer,
                     SteeringServer,
                     encode_sentences,
                     fit_inversions,
                     gradient_reach,
                     hidden_by_cut,
                     label_probe,
                     nearest_tokens,
                     recovered_tokens,
                     recovery,
                     top_logits,
)
from .quiet import GradientAudit, quiet
from .replay import Replay, replay, trunk_alone
from .tracking import track

__all__ = ["SECRETS", "SENTENCES", "CuriousServer", "GradientAudit", "Replay", "SteeringServer", "answer_match",
           "encode_sentences", "fit_inversions", "gradient_reach", "hidden_by_cut", "label_probe", "linear_read",
           "ml_decode", "ml_sentences", "nearest_tokens", "quiet", "recovered_tokens", "recovery", "replay",
           "secret_positions", "secrets_recovered", "shadow_bottom", "top_logits", "track", "trunk_alone",
           "whitebox_search"]
