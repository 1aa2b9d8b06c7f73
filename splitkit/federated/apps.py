"""Flower's two apps for split federated learning: the ClientApp (a splitkit Learner per client) and the
ServerApp (SplitFedAvg over the clients' LoRA).

Flower runs the rounds; splitkit runs the split inside each client. Each round, the ServerApp sends
the global LoRA to every client. A ClientApp loads it into a splitkit Learner (its own Bottom and Top,
its own session on the shared trunk server over ZeroMQ, as ever), trains `local-steps` steps on its
own shard of the facts, and sends back every LoRA matrix it trained: the Bottom's and the Top's and, in
full+trunk, its session's Trunk LoRA, read from the trunk server (op `lora_state`) and put there again
next round (op `load_lora`). The strategy averages them all, weighted by examples:

"ab"       Flower's FedAvg: A and B averaged separately; mean(B)·mean(A) is not the mean of B·A;
"product"  the mean of B·A itself, factored back into rank r by SVD (exact when its rank is at most r).

With freeze_a (FFA-LoRA) no client changes A, so averaging B averages B·A exactly.

`client_app` and `server_app` are what `flwr run` and `flower-supernode` load (see the README).
"""

from dataclasses import dataclass, field

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from ..core import data
from ..core.models import load_model
from ..training.generation import exact_match, is_exact
from ..training.train import Learner, criterion
from .averaging import average_products
from .settings import AVERAGING, DEFAULTS, _flat, initial_lora, lora_spec, rounds_file, run_settings, shard, task

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


def make_server_app(config: dict | None = None) -> ServerApp:
    """A ServerApp that runs the rounds with SplitFedAvg: `config` over the run's own config over DEFAULTS."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context):
        settings = run_settings({**dict(context.run_config), **(config or {})})
        saving = rounds_file(settings)
        clients = int(settings.get("clients", 2))
        strategy = SplitFedAvg(settings["averaging"], min_train_nodes=clients, min_available_nodes=clients)
        model, _ = _model(settings["model"])
        strategy.start(grid=grid, initial_arrays=ArrayRecord(initial_lora(model, settings)),
                       num_rounds=int(settings["rounds"]), train_config=ConfigRecord(_flat(settings)))
        if saving:  # a file (torch.save): every round, each client's LoRA and metrics included
            torch.save([{"number": r.number, "clients": r.clients, "metrics": r.metrics, "average": r.average}
                        for r in strategy.rounds], saving)

    return app


server_app = make_server_app()  # what `flwr run` loads: the run's settings come from its config (see the README)


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
