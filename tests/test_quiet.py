"""The quiet malicious server and the client's audit, on the tiny Llama over real sockets: a server that answers
zeros keeps the client's Bottom public, so it reads every step's h1 exactly; a smaller dL/dh1 does not slow AdamW;
the client's exact audit flags every forged step it looks at and no honest one (with NoPeek on, with left padding
too); its ratio check misses a forgery that keeps the norm."""

import pytest
import torch

from splitkit import Learner, LoraSpec
from splitkit.core.lora import lora_parameters
from splitkit.core.split import Bottom
from splitkit.privacy.attacks import whitebox_search
from splitkit.privacy.probes import SteeringServer
from splitkit.privacy.quiet import GradientAudit, quiet
from splitkit.training.defences import Defence
from splitkit.training.testing import random_batch

CUTS = (2, 4)
STEPS = 6


def train(model, scale, share=1.0, defence=None):
    """STEPS steps of a `full` learner (lr 1e-2, seed 3) audited on every step, through a server that answers
    scale·dL/dh1 (None: honest). Returns each step's (batch, h1 sent, check) and the Bottom's LoRA."""
    server = SteeringServer(model, CUTS, bind="tcp://127.0.0.1:*", forge=None if scale is None else quiet(scale))
    try:
        with Learner(model, mode="full", cuts=CUTS, address=server.start(), lr=1e-2, lora=LoraSpec(seed=3),
                     defence=defence) as learner:
            audit = GradientAudit(learner, model, share=share, seed=0)
            audit.calibrate([random_batch(model.config.vocab_size, seq=12, seed=100 + i) for i in range(4)])
            steps = []
            for k in range(STEPS):
                batch = random_batch(model.config.vocab_size, seq=12, seed=k)
                learner.step(batch)
                steps.append((batch, audit.tap.seen["h1"], audit.check()))
            return steps, {n: w.detach().clone() for n, w in lora_parameters(learner.bottom)}
    finally:
        server.stop()


def read_exactly(model, steps) -> list[float]:
    """Per step, the share of positions the white-box search through the public Bottom reads right and explains."""
    public = Bottom(model, CUTS[0])
    shares = []
    for batch, h1, _ in steps:
        found = [whitebox_search(model, public, row) for row in h1]
        right = torch.stack([f["explained"] for f in found]) & (torch.stack([f["ids"] for f in found])
                                                                 == batch["input_ids"])
        shares.append(float(right.float().mean()))
    return shares


@pytest.fixture(scope="module")
def runs(llama):
    return {scale: train(llama, scale) for scale in (None, 1e-3, 0.0, -1.0)}


def test_a_server_that_answers_zeros_reads_every_step_exactly_where_an_honest_one_reads_only_the_first(llama, runs):
    quiet_read, honest_read = read_exactly(llama, runs[0.0][0]), read_exactly(llama, runs[None][0])
    assert quiet_read == [1.0] * STEPS
    assert honest_read[0] == 1.0 and max(honest_read[1:]) < 0.5  # after a step the client's Bottom is its own
    assert all(float(w.abs().max()) == 0 for n, w in runs[0.0][1].items() if n.endswith("lora_B"))


def test_a_smaller_gradient_does_not_slow_adamw(runs):
    honest, shrunk = runs[None][1], runs[1e-3][1]
    names = [n for n in honest if n.endswith("lora_B")]  # every lora_B starts at 0: ‖honest‖ is how far it moved
    gap = (sum((shrunk[n] - honest[n]).norm() ** 2 for n in names) / sum(honest[n].norm() ** 2 for n in names)) ** 0.5
    assert gap < 0.2  # a thousandth of the gradient moves the Bottom about as far (zeros: not at all)


def test_the_audit_flags_every_forged_step_and_no_honest_one(runs):
    honest = [c for _, _, c in runs[None][0]]
    assert all(c["audited"] and not c["audit_flag"] and c["difference"] < 1e-5 for c in honest)
    assert not any(c["ratio_flag"] for c in honest)
    for scale in (1e-3, 0.0):
        forged = [c for _, _, c in runs[scale][0]]
        assert all(c["audit_flag"] and c["ratio_flag"] for c in forged)
    negated = [c for _, _, c in runs[-1.0][0]]  # the honest norm: only the audit sees it
    assert all(c["audit_flag"] and c["difference"] > 1.9 and not c["ratio_flag"] for c in negated)


def test_an_honest_server_passes_the_audit_with_nopeek_on_and_with_left_padding(llama, serve):
    steps, _ = train(llama, None, defence=Defence(nopeek=1.0))  # NoPeek's gradient on h1 is the client's own
    assert all(c["audited"] and c["difference"] < 1e-5 for _, _, c in steps)
    batch = random_batch(llama.config.vocab_size, seq=12, seed=7)
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    batch["attention_mask"][0, :4] = 0  # the first row left-padded by 4
    with Learner(llama, mode="full", cuts=CUTS, address=serve(llama, CUTS)) as learner:
        audit = GradientAudit(learner, llama, share=1.0)
        learner.step(batch)
        check = audit.check()
        with pytest.raises(RuntimeError, match="no step to check"):
            audit.check()  # each step is checked once
    assert audit.tap.seen == {} and check["audited"] and check["difference"] < 1e-5


def test_which_steps_are_audited_is_the_clients_secret(llama, serve):
    address = serve(llama, CUTS)
    draws = []
    for _ in range(2):
        with Learner(llama, mode="full", cuts=CUTS, address=address) as learner:
            draws.append(GradientAudit(learner, llama).draw.random())
    assert draws[0] != draws[1]


def test_the_audit_needs_the_public_trunk_and_unrounded_tensors(llama, serve):
    address = serve(llama, CUTS)
    with Learner(llama, mode="full+trunk", cuts=CUTS, address=address) as learner, \
            pytest.raises(ValueError, match="mode 'full' only"):
        GradientAudit(learner, llama)
    with Learner(llama, mode="full", cuts=CUTS, address=address, wire_dtype="float16") as learner, \
            pytest.raises(ValueError, match="wire_dtype 'float32' only"):
        GradientAudit(learner, llama)
