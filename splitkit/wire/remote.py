"""The remote Trunk as a differentiable module: RemoteTrunk runs h2 = Trunk(h1) on the server, and its backward
sends dL/dh2 and returns the server's dL/dh1, so `loss.backward()` crosses the wire.

class_server asks the class server ($SPLITKIT_TRUNK) whether it runs the caller's model at the caller's cuts; its
keys, if it has any, are in $SPLITKIT_CURVE_DIR.
"""

import os

import torch
import zmq
from torch import nn

from ..core.models import fingerprint
from .client import PROBE_TIMEOUT, TrunkClient, TrunkError, TrunkUnavailable
from .keys import CURVE_ENV, TRUNK_ENV, class_keys


def class_server(model, cuts, timeout: float = PROBE_TIMEOUT, exact: bool = False) -> tuple[str | None, str]:
    """($SPLITKIT_TRUNK, a line that says so) if that server runs the Trunk of `model` split at `cuts`; (None, why
    not) if it is not set, does not answer one `stats` within `timeout` seconds, or runs other cuts or another model,
    or, with `exact` (a lesson whose checks compare bit for bit or within 1e-5), if it batches students' requests."""
    address = os.environ.get(TRUNK_ENV)
    if not address:
        return None, f"${TRUNK_ENV} is not set"
    where, cuts = f"the class server at {address}", tuple(cuts)
    try:
        with TrunkClient(address, timeout=timeout, retries=0) as probe:
            stats = probe.stats()
    except TrunkUnavailable:
        keys = class_keys(address)
        return None, (f"no answer from {where} within {timeout:g} s (is it running there? "
                      + (f"are the keys in ${CURVE_ENV}={keys} authorized?)" if keys else
                         f"if it has keys, set ${CURVE_ENV} to the folder your teacher gave you)"))
    except (TrunkError, ValueError, OSError, zmq.ZMQError) as e:  # a refusal, an address or a key folder unusable
        return None, f"cannot use {where}: {e}"
    if tuple(stats["cuts"]) != cuts:
        return None, f"{where} runs cuts {tuple(stats['cuts'])}, not {cuts}"
    mine = fingerprint(model, cuts)
    if stats["hidden_size"] != model.config.hidden_size or stats["fingerprint"]["config"] != mine["config"]:
        return None, f"{where} runs another model ({stats['model']}), not {model.config.name_or_path}"
    if stats["fingerprint"]["trunk"] != mine["trunk"]:
        return None, f"{where} runs {stats['model']} with other weights in blocks [{cuts[0]}, {cuts[1]})"
    if exact and stats.get("batch_window_ms") is not None:
        return None, (f"{where} runs classmates' requests together with yours (--batch-window-ms), equal to yours "
                      f"alone within float rounding; this lesson's checks compare more closely")
    return address, f"using {where} ({stats['model']}, cuts {cuts})"


class _RemoteTrunkFunction(torch.autograd.Function):
    """h2 = Trunk(h1) on the server; backward sends dL/dh2 and returns the server's dL/dh1."""

    @staticmethod
    def forward(ctx, h1, client, pad):
        ctx.client, ctx.key, ctx.pad = client, client.new_key(), pad
        ctx.save_for_backward(h1)  # kept for the stateless fallback
        return client.forward(h1, key=ctx.key, pad=pad)  # (B, T, d)

    @staticmethod
    def backward(ctx, g2):
        (h1,) = ctx.saved_tensors
        return ctx.client.backward(g2.contiguous(), ctx.key, h1, pad=ctx.pad), None, None  # dL/dh1 only


class RemoteTrunk(nn.Module):
    """The server's Trunk as a module: differentiable when its input needs a gradient (or the trunk trains)."""

    def __init__(self, client: TrunkClient, train_trunk: bool = False):
        super().__init__()
        self.client, self.train_trunk = client, train_trunk

    def forward(self, h1, pad: list | None = None):  # (B, T, d) -> (B, T, d); pad: each row's left padding
        if not torch.is_grad_enabled():
            return self.client.forward(h1, pad=pad)
        if not h1.requires_grad:
            if not self.train_trunk:
                return self.client.forward(h1, pad=pad)
            h1 = h1.detach().requires_grad_(True)  # a = 0: only the trunk LoRA needs the backward
        return _RemoteTrunkFunction.apply(h1, self.client, pad)
