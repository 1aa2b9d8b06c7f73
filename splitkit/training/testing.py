"""What the tests and the benchmarks share: a free port, a trunk server in a process, random batches.

Correctness in splitkit means "the split gives what the unsplit model gives", so the reference
gradients live here too, next to the one relative difference every check uses.
"""

import copy
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

from ..core.lora import LoraSpec, lora_grads, unsplit_reference
from ..wire.client import TrunkClient, TrunkError
from .train import criterion

ROOT = Path(__file__).resolve().parents[2]  # the checkout: splitkit/training/testing.py is two folders down


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def random_batch(vocab: int, batch: int = 2, seq: int = 12, seed: int = 0, prompt: int | None = None) -> dict:
    """Random token ids (B, T) and labels; the first `prompt` positions (default T // 3) are not labelled."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, seq), generator=g)
    labels = ids.clone()
    labels[:, : seq // 3 if prompt is None else prompt] = -100
    return {"input_ids": ids, "labels": labels}


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖: how far `a` is from the reference `b`."""
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def max_rel_diff(got: dict, want: dict) -> float:
    """The largest rel_diff over the tensors of `got`, each against the tensor of the same name in `want`."""
    return max((rel_diff(g, want[name]) for name, g in got.items()), default=0.0)


def reference_grads(model, cuts, lora: LoraSpec, batch: dict, train_trunk: bool, start: dict | None = None) -> dict:
    """LoRA gradients of the unsplit model on `batch`, with LoRA where a split run would put it, from `start` if
    given (a split run's Learner.lora_state(): in full+trunk it holds the server's own Trunk LoRA)."""
    ref = unsplit_reference(copy.deepcopy(model), cuts, lora, train_trunk, start)
    loss = criterion(ref(input_ids=batch["input_ids"]).logits, batch["labels"])
    if loss.requires_grad:  # else no block has LoRA there: no gradient to compare
        loss.backward()
    return lora_grads(ref)


class ServerProcess:
    """`trunk_server.py` in a process of its own, as a class would run it; ready when it answers."""

    def __init__(self, model: str, cuts, *args: str, port: int | None = None, timeout: float = 300,
                 host: str = "127.0.0.1", prefix=()):
        """`prefix` runs the server through another command, e.g. ("ip", "netns", "exec", NAME) for a namespace."""
        self.address = f"tcp://{host}:{port or free_port()}"
        command = [*prefix, sys.executable, str(ROOT / "trunk_server.py"), "--model", model, "--cuts",
                   *map(str, cuts), "--bind", self.address, "--log-level", "WARNING", *args]
        self.started = time.perf_counter()
        self.process = subprocess.Popen(command, cwd=ROOT)
        self.ready_after = self._wait(timeout)

    def _wait(self, timeout: float) -> float:
        """Seconds from the start of the process to its first answer."""
        deadline = self.started + timeout
        with TrunkClient(self.address, timeout=0.2, retries=0) as probe:
            while time.perf_counter() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"trunk_server.py exited with {self.process.returncode}")
                try:
                    probe.stats()
                    return time.perf_counter() - self.started
                except TrunkError:
                    continue
        self.stop()
        raise RuntimeError(f"trunk_server.py did not answer within {timeout:g} s")

    def kill(self):
        """Stop dead, as a crash would."""
        self.process.kill()
        self.process.wait()

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.kill()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
