"""Notebook 09's study of split federated learning, run on a Cohort: the facts and how they are dealt, the arms
(ways to train a class), their rounds, client drift, and what the aggregator reads from a student's LoRA.

Everything here is unsplit: in `full` mode the split's gradients are the unsplit model's, so a Cohort trains the
study's many arms and seeds in one batch; the split itself, over a trunk server, is in notebook 09's first section.
"""

import random
from dataclasses import dataclass, field

import torch

from ..core.data import COLOURS, facts
from ..core.lora import LoraSpec
from ..training.generation import is_exact
from . import settings
from .averaging import average_products, product_gap
from .cohort import Cohort

# ---------------------------------------------------------------------------------------------- a study in rounds

# Notebook 09's study and bench/federated.py: 4 students, 2 facts each, 6 rounds of 2 local steps.
STUDENTS, FACTS, ROUNDS, LOCAL_STEPS = 4, 8, 6, 2


def study_facts(seed: int, n: int = FACTS) -> list:
    """The facts of one seed: n flags whose colours are a seeded shuffle (seed 0: federated.task(n))."""
    return facts("colour", 16, seed=seed)[:n]


def own_shards(pairs: list, students: int = STUDENTS) -> dict:
    """{student: its own facts}, dealt like cards (federated.shard): no two students share a fact."""
    return {k: settings.shard(pairs, k, students) for k in range(students)}


@dataclass
class Arm:
    """One way to train a class: its students' shards, how their LoRA is combined after each round, and its
    optimizer. averaging: "ab" (FedAvg), "product" (the mean of B·A by SVD) or None (each student alone)."""

    name: str
    shards: dict  # student -> its pairs
    averaging: str | None = "ab"
    lr: float = 5e-3
    freeze_a: bool = False
    dealt: bool = False  # each step, the shards' pairs shuffled and dealt out anew (IID): as many to each student

    def batches(self, rng: random.Random) -> dict:
        """{student: its pairs for one step}: its own shard, or a share of all the pairs dealt anew."""
        if not self.dealt:
            return self.shards
        pool = rng.sample([p for shard in self.shards.values() for p in shard], k=sum(map(len, self.shards.values())))
        out, i = {}, 0
        for k, shard in self.shards.items():
            out[k], i = pool[i:i + len(shard)], i + len(shard)
        return out


@dataclass
class ArmRounds:
    """What one arm did, round by round: the scores of its model(s) on every pair, and how far apart its
    students' updates were. `clients` keeps the students' LoRA of every round."""

    arm: Arm
    scores: list = field(default_factory=list)  # per round: {student or "average": {"loss": [...], "exact": [...]}}
    drift: list = field(default_factory=list)  # per round: spread of the students' updates (federated arms)
    gap: list = field(default_factory=list)  # per round: ‖average's B·A − mean(B·A)‖ / ‖mean(B·A)‖
    starts: list = field(default_factory=list)  # per round: the LoRA each student started from ({student: state})
    clients: dict = field(default_factory=dict)  # round -> {student: its LoRA at the round's end}
    averages: list = field(default_factory=list)  # per round: the average (federated arms)


def cohort_for(model, cuts, lora: LoraSpec, arms: list[Arm]) -> Cohort:
    """A Cohort with an adapter for every student of every arm: `cohort.slots[(arm name, student)]` names it."""
    slots = {(arm.name, k): f"arm{i}_{k}" for i, arm in enumerate(arms) for k in arm.shards}
    cohort = Cohort(model, cuts, lora, list(slots.values()))
    cohort.slots = slots
    return cohort


def run_rounds(cohort: Cohort, tokenizer, pairs: list, arms: list[Arm], rounds: int, local_steps: int,
               seed: int = 0) -> dict:
    """`rounds` rounds of `local_steps` steps for every arm at once, every optimizer fresh each round (the rule
    of a federated round, applied to every arm). Each round ends with each federated arm's average, and every
    model is scored on all `pairs`. Returns {arm name: ArmRounds}."""
    start = cohort.state(cohort.names[0])

    def adapter(arm, k):
        return cohort.slots[(arm.name, k)]

    out = {arm.name: ArmRounds(arm) for arm in arms}
    current = {arm.name: {k: start for k in arm.shards} for arm in arms}  # what each student starts a round from
    for r in range(1, rounds + 1):
        for arm in arms:
            out[arm.name].starts.append(current[arm.name])
            for k in arm.shards:
                cohort.load(adapter(arm, k), current[arm.name][k])
        cohort.new_optimizers({adapter(arm, k): (arm.lr, arm.freeze_a) for arm in arms for k in arm.shards})
        for step in range(local_steps):
            rng = random.Random(f"{seed}/{r}/{step}")
            cohort.step(tokenizer, {adapter(arm, k): pairs for arm in arms for k, pairs in arm.batches(rng).items()})
        scored = []
        for arm in arms:
            result, clients = out[arm.name], {k: cohort.state(adapter(arm, k)) for k in arm.shards}
            result.clients[r] = clients
            if arm.averaging is None:
                current[arm.name] = clients
                scored += [(arm, k, adapter(arm, k)) for k in arm.shards]
                continue
            weights = {k: float(len(arm.shards[k])) for k in arm.shards}
            average = average_of(clients, weights, arm.averaging)
            result.averages.append(average)
            result.gap.append(product_gap(clients, weights, average))
            result.drift.append(drift(clients, current[arm.name][next(iter(arm.shards))]))
            current[arm.name] = {k: average for k in arm.shards}
            first = adapter(arm, next(iter(arm.shards)))
            cohort.load(first, average)
            scored.append((arm, "average", first))
        scores = cohort.score(tokenizer, pairs, [name for _, _, name in scored])
        for arm in arms:
            out[arm.name].scores.append({k: scores[name] for a, k, name in scored if a is arm})
    return out


def average_of(clients: dict, weights: dict, averaging: str) -> dict:
    """FedAvg of the students' LoRA: A and B apart ("ab"), or the mean of B·A factored back by SVD ("product")."""
    if averaging == "product":
        return average_products(clients, weights)
    total = sum(weights.values())
    return {n: sum(weights[k] / total * s[n] for k, s in clients.items()) for n in next(iter(clients.values()))}


def drift(clients: dict, start: dict) -> float:
    """Client drift of one round: the root-mean-square distance of the students' updates (the change of B·A in
    every layer, all layers as one vector) from their mean, over the mean's norm. 0 when every student moved the
    same way; √(n − 1) for n students whose moves are unrelated (orthogonal, of equal size); more when they partly
    undo each other. Computed from the rank-r factors, in float64: ⟨B·A, B'·A'⟩ = Σ (BᵀB') ⊙ (A·A'ᵀ)."""
    states = [start, *clients.values()]
    n = len(clients)
    inner = torch.zeros(n + 1, n + 1, dtype=torch.float64)  # ⟨P_i, P_j⟩ summed over layers; P_0 is the start
    for layer in sorted(name[: -len(".lora_A")] for name in start if name.endswith(".lora_A")):
        A = [s[f"{layer}.lora_A"].double() for s in states]  # (r, in) each
        B = [s[f"{layer}.lora_B"].double() for s in states]  # (out, r) each
        for i in range(n + 1):
            for j in range(i, n + 1):
                inner[i, j] += ((B[i].T @ B[j]) * (A[i] @ A[j].T)).sum()
                inner[j, i] = inner[i, j]
    moves = inner[1:, 1:] - inner[1:, :1] - inner[:1, 1:] + inner[0, 0]  # ⟨m_i, m_j⟩, m_k = P_k − P_0
    mean_sq = moves.sum() / n ** 2  # ‖mean move‖²
    spread_sq = (moves.diagonal().mean() - mean_sq).clamp_min(0)  # mean ‖m_k − mean‖²
    return float(spread_sq.sqrt() / mean_sq.clamp_min(1e-60).sqrt())


def what_the_aggregator_reads(cohort: Cohort, tokenizer, pairs: list, shards: dict, clients: dict) -> dict:
    """What an aggregator that knows the public weights and the questions, not the answers, reads from each
    student's LoRA of one round: it asks every question under that LoRA (greedy). {student: {"said": the answers
    (their first lines), "read": the student's own questions answered right, "secrets": the student's own
    answers found anywhere in what it said, "share": the fraction of what it said that is one of them,
    "of": len(shard)}}."""
    prompts, out = [p for p, _ in pairs], {}
    distinct = {id(state): state for state in clients.values()}  # one LoRA given to several students is asked once
    slots = dict(zip(distinct, cohort.names, strict=False))
    for key, state in distinct.items():
        cohort.load(slots[key], state)
    answers = cohort.answers(tokenizer, prompts, list(slots.values()))
    for k, state in clients.items():
        said = [a.strip().split("\n")[0] for a in answers[slots[id(state)]]]  # the first line of each answer
        own = [(i, answer) for i, (p, answer) in enumerate(pairs) if (p, answer) in shards[k]]
        secrets = {answer.strip() for _, answer in own}
        out[k] = {"said": said, "read": sum(is_exact(said[i], answer) for i, answer in own),
                  "secrets": len(secrets & set(said)), "share": sum(a in secrets for a in said) / len(said),
                  "of": len(own)}
    return out


def what_the_aggregator_infers(cohort: Cohort, tokenizer, questions: list, shards: dict, clients: dict, sent: dict,
                               candidates: tuple = tuple(" " + c for c in COLOURS)) -> dict:
    """A stronger read than asking: the aggregator knows the public weights, the LoRA it sent this round (`sent`),
    the questions and the possible answers (the colours), not who holds which. For each student it scores every
    (question, answer) under the student's LoRA and under `sent`: the gain of a pair is how much its loss fell.
    Its guess of the student's answers: the candidates whose mean gain over the questions is largest, as many as
    the student holds; of each one's question: where that answer gained most over the mean of all answers.
    {student: {"answers": guessed answers right, "facts": guessed (question, answer) pairs right, "of": len(shard),
    "guess": [(question, answer)]}}."""
    slot = cohort.names[0]

    def losses(state):  # (questions, candidates): the loss of each answer to each question under `state`
        cohort.load(slot, state)
        return cohort.answer_losses(tokenizer, questions, list(candidates), slot)

    before, out = losses(sent), {}
    for k, state in clients.items():
        gain = before - losses(state)  # (questions, candidates)
        answers = gain.mean(0).topk(len(shards[k])).indices.tolist()
        margin = gain - gain.mean(1, keepdim=True)  # how much more an answer gained than the others, per question
        guess = [(questions[int(margin[:, c].argmax())], candidates[c]) for c in answers]
        truth = set(shards[k])
        out[k] = {"guess": guess, "answers": len({a for _, a in guess} & {a for _, a in truth}),
                  "facts": len(set(guess) & truth), "of": len(truth)}
    return out
