"""Notebook 09's study of split federated learning, run on a Cohort: the facts and how they are dealt, the arms
(ways to train a class: FedAvg, Flower's FedAvgM, the product of the factors, A frozen, alone, all the data), their
rounds and client drift. What the federation leaks is in `leaks`.

Everything here is unsplit: in `full` mode the split's gradients are the unsplit model's, so a Cohort trains the
study's many arms and seeds in one batch; the split itself, over a trunk server, is in notebook 09's first section.
"""

import logging
from dataclasses import dataclass, field

import torch
from flwr.app import ArrayRecord, Message, Metadata, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvgM

from ..core.data import facts
from ..core.lora import LoraSpec
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
    optimizers. averaging: "ab" (FedAvg), "product" (the mean of B·A by SVD) or None (each student alone).
    server_lr, server_momentum: the server's step along the mean update, through Flower's FedAvgM (1 and 0 are
    FedAvg). keep_adam: each student's AdamW keeps its moments from round to round (fresh each round otherwise,
    as a Flower client gets it)."""

    name: str
    shards: dict  # student -> its pairs
    averaging: str | None = "ab"
    lr: float = 5e-3
    freeze_a: bool = False
    server_lr: float = 1.0
    server_momentum: float = 0.0
    keep_adam: bool = False

    def strategy(self, start: dict) -> FedAvgM | None:
        """Flower's FedAvgM for this arm, at the LoRA every student starts from; None where the arm is FedAvg."""
        if (self.server_lr, self.server_momentum) == (1.0, 0.0):
            return None
        if self.averaging != "ab":
            raise ValueError(f"{self.name}: a server step is taken along FedAvg's average, not {self.averaging!r}")
        strategy = FedAvgM(server_learning_rate=self.server_lr, server_momentum=self.server_momentum,
                           min_train_nodes=1, min_available_nodes=1)
        strategy.current_arrays = ArrayRecord(start)  # what configure_train sets in a run on a Grid
        return strategy


# The arms of bench/federated.py and notebook 09: name -> Arm options (FedAvgM's server rate comes on its own).
# A client on its own has no rounds to restart its AdamW at: alone and all the data keep theirs.
ARMS = {"FedAvg": dict(averaging="ab"), "FedAvg, A frozen": dict(averaging="ab", freeze_a=True),
        "FedAvg, the product": dict(averaging="product"), "FedAvg, Adam kept": dict(averaging="ab", keep_adam=True),
        "alone": dict(averaging=None, keep_adam=True), "all the data": dict(averaging=None, keep_adam=True)}
FEDAVGM = "FedAvgM"


def make_arm(name: str, lr: float, pairs: list, server_lr: float = 1.0) -> Arm:
    """The arm `name` of ARMS (or FEDAVGM, FedAvg with the server's rate `server_lr`) at client rate `lr`, named
    "name @ rate"."""
    if name == FEDAVGM:
        return Arm(f"{name} @ {server_lr:g}", own_shards(pairs), lr=lr, server_lr=server_lr)
    shards = {0: pairs} if name == "all the data" else own_shards(pairs)
    return Arm(f"{name} @ {lr:g}", shards, lr=lr, **ARMS[name])


def outcome(result: "ArmRounds", pairs: list, r: int = -1) -> tuple[float, int]:
    """(loss, facts exact) after round r + 1 (the last by default): the model's mean loss on all the facts and how
    many it answers exactly; alone, each student's mean loss on its own facts, averaged over the students, and the
    facts its students answer of their own."""
    scores = result.scores[r]
    if "average" in scores or len(scores) == 1:
        (s,) = scores.values()
        return sum(s["loss"]) / len(s["loss"]), sum(s["exact"])
    own = {k: [i for i, p in enumerate(pairs) if p in result.arm.shards[k]] for k in scores}
    return (sum(sum(scores[k]["loss"][i] for i in own[k]) / len(own[k]) for k in scores) / len(scores),
            sum(scores[k]["exact"][i] for k in scores for i in own[k]))


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


def run_rounds(cohort: Cohort, tokenizer, pairs: list, arms: list[Arm], rounds: int, local_steps: int) -> dict:
    """`rounds` rounds of `local_steps` steps for every arm at once, every optimizer fresh each round (the rule
    of a federated round) unless the arm keeps it. Each round ends with each federated arm's average, and every
    model is scored on all `pairs`. Returns {arm name: ArmRounds}."""
    start = cohort.state(cohort.names[0])

    def adapter(arm, k):
        return cohort.slots[(arm.name, k)]

    out = {arm.name: ArmRounds(arm) for arm in arms}
    strategies = {arm.name: arm.strategy(start) for arm in arms}
    current = {arm.name: {k: start for k in arm.shards} for arm in arms}  # what each student starts a round from
    for r in range(1, rounds + 1):
        for arm in arms:
            out[arm.name].starts.append(current[arm.name])
            for k in arm.shards:
                cohort.load(adapter(arm, k), current[arm.name][k])
        cohort.new_optimizers({adapter(arm, k): (arm.lr, arm.freeze_a) for arm in arms for k in arm.shards
                               if r == 1 or not arm.keep_adam})
        for _ in range(local_steps):
            cohort.step(tokenizer, {adapter(arm, k): shard for arm in arms for k, shard in arm.shards.items()})
        scored = []
        for arm in arms:
            result, clients = out[arm.name], {k: cohort.state(adapter(arm, k)) for k in arm.shards}
            result.clients[r] = clients
            if arm.averaging is None:
                current[arm.name] = clients
                scored += [(arm, k, adapter(arm, k)) for k in arm.shards]
                continue
            weights = {k: float(len(arm.shards[k])) for k in arm.shards}
            if strategies[arm.name] is None:
                average = average_of(clients, weights, arm.averaging)
            else:
                average = flower_step(strategies[arm.name], clients, weights, r)
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


def flower_step(strategy: FedAvgM, clients: dict, weights: dict, server_round: int) -> dict:
    """The students' LoRA through Flower's own aggregate_train, as replies of a round; returns the new global LoRA
    (the strategy keeps it, and its momentum, for the next round)."""
    replies = [Message(RecordDict({"arrays": ArrayRecord(state),
                                   "metrics": MetricRecord({"num-examples": weights[k]})}),
                       metadata=Metadata(run_id=0, message_id=str(k), src_node_id=k + 1, dst_node_id=0,
                                         reply_to_message_id="", group_id=str(server_round), created_at=0.0,
                                         ttl=3600.0, message_type="train"))
               for k, state in clients.items()]
    log = logging.getLogger("flwr")
    level, _ = log.level, log.setLevel(logging.WARNING)  # Flower logs every aggregation at INFO
    try:
        arrays, _ = strategy.aggregate_train(server_round, replies)
    finally:
        log.setLevel(level)
    return arrays.to_torch_state_dict()


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
