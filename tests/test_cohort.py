"""A Cohort trains many students' LoRA in one batch: each adapter ends where the same student's split run over a
real socket ends, and its rounds are the rounds a Flower client runs (federated.local_training)."""


import pytest
import torch

from splitkit import Learner, load_model
from splitkit import federated as F
from splitkit.core.data import COLOURS, encode
from splitkit.core.lora import LoraSpec
from splitkit.federated.leaks import gradient_match, what_the_aggregator_infers, what_the_aggregator_reads
from splitkit.federated.study import Arm, Cohort, cohort_for, drift, own_shards, run_rounds, study_facts
from splitkit.training.testing import max_rel_diff

CUTS = (2, 4)
LR = 1e-2


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-llama")


@pytest.fixture(scope="module")
def pairs():
    return study_facts(seed=0)


def test_each_adapter_trains_as_the_same_student_would_alone_through_the_split(tiny, serve, pairs):
    (llama, tokenizer), spec = tiny, LoraSpec(r=4, lora_alpha=8, init_b=0.02, seed=3)
    cohort = Cohort(llama, CUTS, spec, ["ab", "frozen", "other"])
    cohort.new_optimizers({"ab": (LR, False), "frozen": (2 * LR, True), "other": (LR, False)})
    address = serve(llama, CUTS)
    with Learner(llama, mode="full", cuts=CUTS, address=address, lora=spec, lr=LR) as ab, \
            Learner(llama, mode="full", cuts=CUTS, address=address, lora=spec, lr=2 * LR, freeze_a=True) as frozen:
        assert max_rel_diff(cohort.state("ab"), ab.lora_state()) == 0  # the same seeded init
        for _ in range(3):
            rows = {"ab": pairs[0:2], "frozen": pairs[2:5], "other": pairs[5:8]}
            losses = cohort.step(tokenizer, rows)
            assert losses["ab"] == pytest.approx(ab.step(encode(tokenizer, rows["ab"])), rel=1e-5)
            frozen.step(encode(tokenizer, rows["frozen"]))
        assert max_rel_diff(cohort.state("ab"), ab.lora_state()) < 1e-5
        assert max_rel_diff(cohort.state("frozen"), frozen.lora_state()) < 1e-5
    start, moved = Cohort(llama, CUTS, spec, ["x"]).state("x"), cohort.state("frozen")
    assert all(torch.equal(moved[n], start[n]) == n.endswith("lora_A") for n in start)  # only B trained


def test_a_round_of_the_study_is_a_round_of_the_flower_client(tiny, serve, pairs):
    """Two rounds of FedAvg in the cohort against the same rounds run client by client with
    federated.local_training, the function the ClientApp runs, on a split Learner over a socket."""
    (llama, tokenizer), students = tiny, 4
    config = {**F.DEFAULTS, "model": "tiny-llama", "address": serve(llama, CUTS), "cuts": list(CUTS), "lr": LR,
              "batch-size": 2, "local-steps": 2}
    shards = own_shards(pairs, students)
    arms = [Arm("federated", shards, lr=LR), Arm("alone", shards, averaging=None, lr=LR)]
    study = run_rounds(cohort_for(llama, CUTS, F.lora_spec(config), arms), tokenizer, pairs, arms, 2, 2)

    state = F.initial_lora(llama, config)
    with F.learner(llama, config) as run:
        for r in range(1, 3):
            clients = {k: F.local_training(run, tokenizer, config, state, shards[k], r, k)[0] for k in shards}
            state = {n: sum(c[n] for c in clients.values()) / students for n in state}
            assert max_rel_diff(study["federated"].averages[r - 1], state) < 1e-4, r
    assert max_rel_diff(study["federated"].clients[2][1], clients[1]) < 1e-4
    # alone, each student kept its own LoRA: after round 1 it is that student's round-1 LoRA of the federation
    assert max_rel_diff(study["alone"].starts[1][2], study["federated"].clients[1][2]) < 1e-6
    assert set(study["federated"].scores[-1]) == {"average"} and set(study["alone"].scores[-1]) == set(shards)


def test_drift_is_the_spread_of_the_students_updates_over_their_mean():
    start = {"0.q.lora_A": torch.zeros(1, 3), "0.q.lora_B": torch.ones(2, 1)}
    u, v = torch.tensor([[1.0, 0, 0]]), torch.tensor([[0, 2.0, 0]])

    def moved(a):
        return {"0.q.lora_A": a, "0.q.lora_B": torch.ones(2, 1)}

    assert drift({0: moved(u), 1: moved(u)}, start) == 0  # the same update: no drift
    # updates u + v and u - v: mean u, each v away from it, |v| / |u| = 2
    assert drift({0: moved(u + v), 1: moved(u - v)}, start) == pytest.approx(2.0)


def test_drift_from_the_factors_is_the_spread_of_the_dense_updates():
    """drift works on the rank-r factors; against the dense updates B·A − B₀·A₀ of random LoRA in two layers of
    different shapes, four students, as the definition reads."""
    g = torch.Generator().manual_seed(0)

    def lora():
        return {"0.q.lora_A": torch.randn(4, 12, generator=g), "0.q.lora_B": torch.randn(12, 4, generator=g),
                "0.v.lora_A": torch.randn(4, 12, generator=g), "0.v.lora_B": torch.randn(6, 4, generator=g)}

    start, clients = lora(), {k: lora() for k in range(4)}
    def product(s, p):
        return s[f"0.{p}.lora_B"].double() @ s[f"0.{p}.lora_A"].double()

    moves = torch.stack([torch.cat([(product(c, p) - product(start, p)).flatten() for p in "qv"])
                         for c in clients.values()])  # (4, 12·12 + 6·12)
    mean = moves.mean(0)
    dense = float((moves - mean).pow(2).sum(1).mean().sqrt() / mean.norm())
    assert drift(clients, start) == pytest.approx(dense, rel=1e-9)


def test_the_aggregator_reads_the_secrets_of_a_students_lora(tiny, pairs):
    """A student trained on its own two facts: under its LoRA the aggregator reads both answers, right where they
    belong, and they are most of what the LoRA says to any question. An untrained LoRA gives neither away."""
    (llama, tokenizer), shards = tiny, own_shards(pairs, 4)
    cohort = Cohort(llama, CUTS, LoraSpec(seed=0), ["slot", "student"])
    untrained = cohort.state("student")
    cohort.new_optimizers({"student": (3e-2, False)})
    for step in range(1, 241):  # until the student answers its own two questions: how long varies with rounding
        cohort.step(tokenizer, {"student": shards[1]})
        if step % 20 == 0:
            got = what_the_aggregator_reads(cohort, tokenizer, pairs, shards, {1: cohort.state("student")})[1]
            if got["read"] == 2:
                break
    assert (got["read"], got["of"]) == (2, 2), f"the student had not learned its facts after {step} steps: {got}"
    assert got["secrets"] == 2 and got["share"] > 0.5, got  # its answers are most of what it says to any question
    nothing = what_the_aggregator_reads(cohort, tokenizer, pairs, shards, {1: untrained})[1]
    assert (nothing["read"], nothing["secrets"], nothing["share"]) == (0, 0, 0), nothing
    # scoring every colour for every question against the LoRA it sent, it names the student's two facts
    inferred = what_the_aggregator_infers(cohort, tokenizer, [p for p, _ in pairs], shards,
                                          {1: cohort.state("student")}, untrained)[1]
    assert (inferred["answers"], inferred["facts"], inferred["of"]) == (2, 2, 2), inferred


def test_answer_losses_with_the_question_cached_are_the_scores_of_each_pair(tiny, pairs):
    """The aggregator's scoring runs each question once and its KV cache for every candidate answer: each loss is
    the one score() gives the pair (question, answer) in a batch of whole rows, under a trained LoRA."""
    (llama, tokenizer), shards = tiny, own_shards(pairs, 4)
    cohort = Cohort(llama, CUTS, LoraSpec(seed=0), ["student"])
    cohort.new_optimizers({"student": (3e-2, False)})
    for _ in range(5):
        cohort.step(tokenizer, {"student": shards[0]})
    questions, candidates = [p for p, _ in pairs], [" " + c for c in COLOURS]
    lengths = {len(tokenizer(q, add_special_tokens=False).input_ids) for q in questions}
    assert len(lengths) > 1  # the questions are left-padded to the longest: padding is exercised
    cached = cohort.answer_losses(tokenizer, questions, candidates, "student")  # (8, 16)
    whole = cohort.score(tokenizer, [(q, c) for q in questions for c in candidates], ["student"])["student"]["loss"]
    assert cached.shape == (8, 16) and cached.std() > 0.01, cached
    torch.testing.assert_close(cached, torch.tensor(whole).view(8, 16), rtol=1e-5, atol=1e-5)


def test_a_server_learning_rate_is_flowers_fedavgm_step_along_the_mean_update(tiny, pairs):
    """An arm with a server learning rate averages through Flower's FedAvgM: each round's global LoRA is the last
    one plus η times the students' mean move, computed here from the students' LoRA; at η = 1 it is FedAvg's."""
    (llama, tokenizer), shards = tiny, own_shards(pairs, 4)
    arms = [Arm("fedavg", shards, lr=LR), Arm("eta 1", shards, lr=LR, server_lr=1.0),
            Arm("eta 3", shards, lr=LR, server_lr=3.0)]
    study = run_rounds(cohort_for(llama, CUTS, LoraSpec(seed=1), arms), tokenizer, pairs, arms, 2, 2)
    assert arms[1].strategy({}) is None  # η = 1 and no momentum: FedAvg itself
    fast = study["eta 3"]
    for r in (1, 2):
        before, clients = fast.starts[r - 1][0], fast.clients[r]
        want = {n: before[n] + 3.0 * (sum(c[n] for c in clients.values()) / 4 - before[n]) for n in before}
        assert max_rel_diff(fast.averages[r - 1], want) < 1e-5, r
    assert max_rel_diff(study["eta 1"].averages[1], study["fedavg"].averages[1]) == 0
    assert max_rel_diff(fast.averages[1], study["fedavg"].averages[1]) > 0.1


def test_an_arm_that_keeps_adam_trains_on_as_one_optimizer_would(tiny, pairs):
    """keep_adam: one student, so the average is its own LoRA; 2 rounds of 2 steps with AdamW kept are 4 steps of
    one AdamW, and differ from 2 rounds with AdamW fresh each round."""
    (llama, tokenizer), shard = tiny, {0: pairs[:2]}
    arms = [Arm("kept", shard, lr=LR, keep_adam=True), Arm("fresh", shard, lr=LR)]
    study = run_rounds(cohort_for(llama, CUTS, LoraSpec(seed=2), arms), tokenizer, pairs, arms, 2, 2)
    one = Cohort(llama, CUTS, LoraSpec(seed=2), ["one"])
    one.new_optimizers({"one": (LR, False)})
    for _ in range(4):
        one.step(tokenizer, {"one": pairs[:2]})
    assert max_rel_diff(study["kept"].averages[1], one.state("one")) < 1e-5
    assert max_rel_diff(study["fresh"].averages[1], one.state("one")) > 1e-2


def test_gradient_matching_names_a_students_facts_from_one_round_of_updates(tiny, pairs):
    """The aggregator's gradient-matching read: after one round of 2 steps on their own 2 facts, the candidates
    (question, colour) whose gradients at the LoRA it sent point along each student's update are the student's
    own facts, with their questions; against an update of random direction it names almost none."""
    (llama, tokenizer), shards = tiny, own_shards(pairs, 4)
    arms = [Arm("fedavg", shards, lr=LR)]
    cohort = cohort_for(llama, CUTS, LoraSpec(seed=0), arms)
    start = cohort.state(cohort.names[0])
    study = run_rounds(cohort, tokenizer, pairs, arms, 1, 2)
    probe = Cohort(llama, CUTS, LoraSpec(seed=0), [f"c{i}" for i in range(len(COLOURS))])
    questions = [p for p, _ in pairs]
    read = gradient_match(probe, tokenizer, questions, start, study["fedavg"].clients[1], shards)
    assert sum(r["facts"] for r in read.values()) >= 7, read  # of 8
    g = torch.Generator().manual_seed(0)
    noise = {k: {n: w + 1e-3 * torch.randn(w.shape, generator=g) for n, w in start.items()} for k in shards}
    blind = gradient_match(probe, tokenizer, questions, start, noise, shards)
    assert sum(r["facts"] for r in blind.values()) <= 2, blind
