"""Shared fixtures: tiny models, SmolLM2, and trunk servers on random loopback ports."""

import copy

import pytest
import torch

from splitkit import LoraSpec, TrunkServer, load_model

RTOL = 1e-5


@pytest.fixture(scope="session")
def smollm2():
    return load_model("smollm2-135m")


@pytest.fixture(scope="session", params=["tiny-llama", "tiny-gpt2"])
def tiny(request):
    return load_model(request.param)


@pytest.fixture
def serve():
    """serve(model, cuts, **options) -> address of a TrunkServer in a thread; stopped after the test."""
    servers = []

    def start(model, cuts, **options):
        server = TrunkServer(model, cuts, bind="tcp://127.0.0.1:*", **options)
        servers.append(server)
        return server.start()

    start.servers = servers
    yield start
    for s in servers:
        s.stop()


@pytest.fixture
def spec():
    """A LoRA whose B starts non-zero, so that lora_A gets a gradient too."""
    return LoraSpec(r=4, lora_alpha=8, init_b=0.02, seed=3)


def random_batch(vocab: int, B: int = 2, T: int = 12, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, T), generator=g)
    labels = ids.clone()
    labels[:, : T // 3] = -100
    return {"input_ids": ids, "labels": labels}


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def reference_grads(model, cuts, spec, batch, train_trunk: bool) -> dict:
    """LoRA gradients of the unsplit model on `batch`."""
    from splitkit.split import lora_grads
    from splitkit.train import criterion, unsplit_reference

    ref = unsplit_reference(copy.deepcopy(model), cuts, spec, train_trunk)
    criterion(ref(input_ids=batch["input_ids"]).logits, batch["labels"]).backward()
    return lora_grads(ref)
