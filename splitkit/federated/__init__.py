"""Split federated learning: many clients, one trunk server, LoRA averaged every round.

Flower runs the rounds: `apps` holds its ClientApp (a splitkit Learner per client, on its own shard) and its
ServerApp (SplitFedAvg), `averaging` the maths of averaging LoRA factors, `settings` a run's settings and the task,
`runner` runs the apps with `flwr run` against a local simulation SuperLink. `cohort` trains a class of adapters in
one batch, and `study` is notebook 09's study on it. It imports the core and the client's training; `client_app`
and `server_app` here are what `flwr run` loads (flower/pyproject.toml names `splitkit.federated`).
"""

from .apps import Round, SplitFedAvg, client_app, evaluate, learner, local_training, make_server_app, server_app
from .averaging import average_products, mean_products, product_gap
from .runner import run
from .settings import AVERAGING, DEFAULTS, initial_lora, lora_spec, rounds_file, run_settings, shard, task

__all__ = ["AVERAGING", "DEFAULTS", "Round", "SplitFedAvg", "average_products", "client_app", "evaluate",
           "initial_lora", "learner", "local_training", "lora_spec", "make_server_app", "mean_products",
           "product_gap", "rounds_file", "run", "run_settings", "server_app", "shard", "task"]
