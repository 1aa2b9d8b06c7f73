"""Split federated learning on Flower: many clients, one trunk server, LoRA averaged every round.

Flower runs the rounds; splitkit runs the split inside each client. Each round, the ServerApp sends
the global LoRA to every client. A ClientApp loads it into a splitkit Learner (its own Bottom and Top,
its own session on the shared trunk server over ZeroMQ, as ever), trains `local-steps` steps on its
own shard of the facts, and sends back every LoRA matrix it trained: the Bottom's and the Top's and, in
full+trunk, its session's Trunk LoRA, read from the trunk server (op `lora_state`) and put there again
next round (op `load_lora`). The strategy averages them all, weighted by examples:

"ab"       Flower's FedAvg: A and B averaged separately; mean(B)·mean(A) is not the mean of B·A;
"product"  the mean of B·A itself, factored back into rank r by SVD (exact when its rank is at most r).

With freeze_a (FFA-LoRA) no client changes A, so averaging B averages B·A exactly.

`client_app` and `server_app` are what `flwr run` and `flower-supernode` load (see the README);
`run_simulation` runs them under Flower's simulation engine, many virtual clients on one machine.
"""

import copy
import logging
import os
import warnings
from dataclasses import dataclass, field

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from . import data
from .generation import exact_match, is_exact
from .lora import LoraSpec, lora_parameters, unsplit_reference
from .models import SMOLLM2, load_model
from .protocol import FULL_TRUNK
from .train import Learner, criterion

AVERAGING = ("ab", "product")

# The run's settings, as Flower names them: a pyproject's [tool.flwr.app.config] (flower/pyproject.toml), or
# the config given to run(). The ServerApp sends them to every client with each round.
DEFAULTS = {
    "address": "tcp://127.0.0.1:5555",  # the trunk server every client uses
    "model": SMOLLM2,
    "mode": "full",                      # or "full+trunk": then the Trunk's LoRA is averaged too
    "cuts": [10, 20],
    "rounds": 3,
    "local-steps": 4,                    # training steps per client per round
    "batch-size": 4,
    "lr": 2e-3,
    "lora-r": 8,
    "lora-alpha": 16,
    "seed": 0,
    "freeze-a": False,
    "averaging": "ab",
    "facts": 32,                         # the task: this many facts (task()), dealt out to the clients
    "curve-dir": "",                     # a folder with the trunk server's CURVE keys ("": none, loopback only)
}


def run_settings(given: dict) -> dict:
    """`given` over DEFAULTS; cuts may come as "10,20" (or "10 20"): a pyproject's Flower config holds no lists."""
    settings = {**DEFAULTS, **given}
    if isinstance(settings["cuts"], str):
        settings["cuts"] = [int(c) for c in settings["cuts"].replace(",", " ").split()]
    return settings


def task(n: int = 32) -> list[tuple[str, str]]:
    """n facts about the made-up places: their flags' colours, then their animals."""
    pairs = data.facts("colour") + data.facts("animal")
    if not 0 < n <= len(pairs):
        raise ValueError(f"the task has 1 to {len(pairs)} facts, not {n}")
    return pairs[:n]


def shard(pairs: list, partition: int, partitions: int) -> list:
    """Client `partition`'s own facts: every `partitions`-th one, so no two clients share a fact."""
    if not 0 <= partition < partitions <= len(pairs):
        raise ValueError(f"partition {partition} of {partitions} over {len(pairs)} facts")
    return pairs[partition::partitions]


def lora_spec(config: dict) -> LoraSpec:
    return LoraSpec(r=int(config["lora-r"]), lora_alpha=int(config["lora-alpha"]), seed=int(config["seed"]))


def initial_lora(model, config: dict) -> dict:
    """{name: tensor} of the LoRA every client starts from: the one a Learner of this run puts there."""
    reference = unsplit_reference(copy.deepcopy(model), config["cuts"], lora_spec(config), config["mode"] == FULL_TRUNK)
    return {name: w.detach().clone() for name, w in lora_parameters(reference)}


_MODELS = {}


def _model(name: str):
    """load_model(name), once per process (a simulation's workers each keep theirs)."""
    if name not in _MODELS:
        _MODELS[name] = load_model(name)
    return _MODELS[name]


def learner(model, config: dict) -> Learner:
    """The Learner a client of this run uses: its mode, cuts, LoRA and trunk server."""
    return Learner(model, mode=config["mode"], cuts=tuple(config["cuts"]), address=config["address"],
                   lora=lora_spec(config), lr=float(config["lr"]), freeze_a=bool(config["freeze-a"]),
                   curve_dir=config.get("curve-dir") or None)


def local_training(run: Learner, tokenizer, config: dict, state: dict, pairs: list, server_round: int,
                   partition: int):
    """One client's round on an open Learner: load the global LoRA (every optimizer starts afresh), train
    `local-steps` steps on its own pairs; return its LoRA and its losses."""
    run.load_lora(state)
    batches = data.batches(tokenizer, pairs, batch_size=min(int(config["batch-size"]), len(pairs)),
                           seed=1000 * int(config["seed"]) + 100 * server_round + partition)
    losses = [run.step(next(batches)) for _ in range(int(config["local-steps"]))]
    return run.lora_state(), losses


# ---------------------------------------------------------------------------------------------- the ClientApp

client_app = ClientApp()


@client_app.train()
def _train(msg: Message, context: Context) -> Message:
    config = {**DEFAULTS, **dict(msg.content["config"])}
    if context.node_config.get("curve-dir"):  # this SuperNode's own key (a student's folder) over the run's
        config["curve-dir"] = str(context.node_config["curve-dir"])
    partition, partitions = int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    model, tokenizer = _model(config["model"])
    pairs = shard(task(int(config["facts"])), partition, partitions)
    with learner(model, config) as run:
        state, losses = local_training(run, tokenizer, config, msg.content["arrays"].to_torch_state_dict(), pairs,
                                       int(config["server-round"]), partition)
    metrics = MetricRecord({"num-examples": len(pairs), "partition-id": partition,
                            "loss-first": losses[0], "loss-last": losses[-1]})
    return Message(RecordDict({"arrays": ArrayRecord(state), "metrics": metrics}), reply_to=msg)


# ---------------------------------------------------------------------------------------------- the ServerApp

@dataclass
class Round:
    """What one round brought: each client's LoRA and metrics (by partition), and the average made of them."""

    number: int
    clients: dict = field(default_factory=dict)  # partition -> {name: tensor}
    metrics: dict = field(default_factory=dict)  # partition -> {"loss-first", "loss-last", "num-examples"}
    average: dict = field(default_factory=dict)  # {name: tensor}


class SplitFedAvg(FedAvg):
    """FedAvg over the clients' LoRA, every round's inputs and output kept in `rounds` (for a notebook to look at).

    averaging="ab" is Flower's own FedAvg; "product" averages each layer's B·A and factors it back by SVD.
    """

    def __init__(self, averaging: str = "ab", keep: bool = True, **fedavg):
        if averaging not in AVERAGING:
            raise ValueError(f"averaging must be one of {', '.join(AVERAGING)}, got {averaging!r}")
        super().__init__(fraction_evaluate=0.0, **fedavg)
        self.averaging, self.keep, self.rounds = averaging, keep, []

    def aggregate_train(self, server_round: int, replies):
        replies = list(replies)
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is None:
            return arrays, metrics
        contents = [m.content for m in replies if not m.has_error()]
        clients = {int(c["metrics"]["partition-id"]): c["arrays"].to_torch_state_dict() for c in contents}
        if self.averaging == "product":
            weights = {int(c["metrics"]["partition-id"]): float(c["metrics"][self.weighted_by_key]) for c in contents}
            arrays = ArrayRecord(average_products(clients, weights))
        if self.keep:
            self.rounds.append(Round(server_round, clients,
                                     {int(c["metrics"]["partition-id"]): dict(c["metrics"]) for c in contents},
                                     arrays.to_torch_state_dict()))
        return arrays, metrics


def mean_products(clients: dict, weights: dict) -> dict:
    """{layer: the weighted mean of B·A over the clients} for every LoRA layer (named without .lora_A/.lora_B)."""
    total, first = sum(weights.values()), next(iter(clients.values()))
    layers = [name[: -len(".lora_A")] for name in first if name.endswith(".lora_A")]
    return {layer: sum(weights[k] / total * (s[f"{layer}.lora_B"] @ s[f"{layer}.lora_A"]) for k, s in clients.items())
            for layer in layers}


def average_products(clients: dict, weights: dict) -> dict:
    """Per layer, the weighted mean of B·A over the clients, factored back into A (r, in) and B (out, r) by SVD:
    B = U_r √S_r, A = √S_r V_rᵀ, the best rank-r approximation of the mean product."""
    first, out = next(iter(clients.values())), {}
    for layer, mean in mean_products(clients, weights).items():
        r = first[f"{layer}.lora_A"].shape[0]
        u, s, vh = torch.linalg.svd(mean, full_matrices=False)
        root = s[:r].sqrt()
        out[f"{layer}.lora_A"], out[f"{layer}.lora_B"] = root[:, None] * vh[:r], u[:, :r] * root
    return out


def product_gap(clients: dict, weights: dict, average: dict) -> float:
    """‖B̄·Ā − mean(B·A)‖ / ‖mean(B·A)‖ over all layers together: how far an average is from the mean update."""
    num = den = 0.0
    for layer, mean in mean_products(clients, weights).items():
        num += float((average[f"{layer}.lora_B"] @ average[f"{layer}.lora_A"] - mean).norm() ** 2)
        den += float(mean.norm() ** 2)
    return (num / den) ** 0.5 if den else 0.0


def make_server_app(config: dict | None = None, strategy: SplitFedAvg | None = None, evaluate=None,
                    out: dict | None = None) -> ServerApp:
    """A ServerApp that runs the rounds: `config` over the run's own config over DEFAULTS; the strategy (and the
    Result) land in `out` if given; `evaluate(round, {name: tensor}) -> dict` scores each round's average."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context):
        settings = run_settings({**dict(context.run_config), **(config or {})})
        clients = int(settings.get("clients", 2))
        chosen = strategy or SplitFedAvg(settings["averaging"], min_train_nodes=clients, min_available_nodes=clients)
        model, _ = _model(settings["model"])
        scored = None if evaluate is None else (
            lambda r, arrays: MetricRecord(evaluate(r, arrays.to_torch_state_dict())))
        result = chosen.start(grid=grid, initial_arrays=ArrayRecord(initial_lora(model, settings)),
                              num_rounds=int(settings["rounds"]), train_config=ConfigRecord(_flat(settings)),
                              evaluate_fn=scored)
        if out is not None:
            out.update(strategy=chosen, result=result)
        if settings.get("save-rounds"):  # a file: every round's average and metrics, for a run under `flwr run`
            torch.save([{"number": r.number, "average": r.average, "metrics": r.metrics}
                        for r in getattr(chosen, "rounds", [])],
                       settings["save-rounds"])

    return app


server_app = make_server_app()  # what `flwr run` loads: the run's settings come from its config (see the README)


def _flat(settings: dict) -> dict:
    """The settings a ConfigRecord can carry (it takes numbers, strings, booleans and lists of them)."""
    return {k: v for k, v in settings.items() if isinstance(v, int | float | str | bool | list)}


def run(config: dict, clients: int, strategy: SplitFedAvg | None = None, evaluate=None, cpus_per_client: float = 1,
        quiet: bool = True):
    """Flower's simulation engine: `clients` virtual clients on this machine, each a ClientApp of its own shard.
    Returns {"strategy": ..., "result": ...}. `quiet` keeps Flower's and the clients' logs out of the way."""
    from flwr.simulation import run_simulation

    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # no GPU to hide; Ray's notice says so
    out, flower = {}, logging.getLogger("flwr")
    level = flower.level
    if quiet:  # Flower logs every round, and that run_simulation is deprecated in favour of `flwr run`
        flower.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            run_simulation(make_server_app({**config, "clients": clients}, strategy, evaluate, out), client_app,
                           num_supernodes=clients,
                           backend_config={"client_resources": {"num_cpus": cpus_per_client, "num_gpus": 0.0},
                                           "init_args": {"log_to_driver": not quiet}})
    finally:
        flower.setLevel(level)
    if "result" not in out:
        raise RuntimeError("the Flower simulation ended without a result (see its log above)")
    return out


def evaluate(run: Learner, tokenizer, state: dict, pairs: list, answers: bool = True) -> dict:
    """Per pair, with the LoRA `state` loaded into the open Learner `run`: "loss", the cross-entropy of its answer
    tokens, and "exact", whether its greedy answer is the expected one (None without `answers`)."""
    run.load_lora(state)
    batch = data.encode(tokenizer, pairs)
    with torch.no_grad():
        logits = run.logits(batch["input_ids"])  # (B, T, vocab)
    losses = [float(criterion(logits[i:i + 1], batch["labels"][i:i + 1])) for i in range(len(pairs))]
    exact = None
    if answers:
        _, said = exact_match(run, tokenizer, pairs)
        exact = [is_exact(a, want) for a, (_, want) in zip(said, pairs, strict=True)]
    return {"loss": losses, "exact": exact}
