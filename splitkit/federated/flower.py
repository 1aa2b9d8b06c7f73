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

`client_app` and `server_app` are what `flwr run` and `flower-supernode` load (see the README); `run` runs
them with `flwr run` against a local simulation SuperLink: many virtual clients on one machine.
"""

import contextlib
import copy
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

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


def _flat(settings: dict) -> dict:
    """The settings a ConfigRecord can carry (it takes numbers, strings, booleans and lists of them)."""
    return {k: v for k, v in settings.items() if isinstance(v, int | float | str | bool | list)}


def run(config: dict, clients: int, cpus_per_client: float = 1, quiet: bool = True) -> list[Round]:
    """`flwr run` of this app against a local simulation SuperLink: `clients` virtual SuperNodes on this machine,
    each a ClientApp with its own shard and `cpus_per_client` CPUs (a whole number: Flower's federation config
    takes no fractions), no GPU. `config` overrides DEFAULTS. Returns every round, read from the file the
    ServerApp saves (`save-rounds`). Flower's home, the app, the logs and Ray's files live in a temporary folder;
    the SuperLink and every process it started are stopped before `run` returns, whatever happens. `quiet` keeps
    Flower's log out of the output; a failed run raises RuntimeError with the end of that log."""
    if min(clients, cpus_per_client) < 1 or clients != int(clients) or cpus_per_client != int(cpus_per_client):
        raise ValueError(f"clients and cpus_per_client are whole numbers from 1, got {clients} and {cpus_per_client}")
    overrides = {**config, "clients": clients}  # over the app's config (_app_config()), with `--run-config`
    if unknown := sorted(overrides.keys() - _app_config().keys()):
        raise ValueError(f"unknown settings {unknown}; a run takes {', '.join(_app_config())}")
    flwr = shutil.which("flwr", path=Path(sys.executable).parent)  # its processes are found on PATH: this bin first
    if flwr is None:
        raise RuntimeError(f"no `flwr` beside {sys.executable}: install splitkit (Flower comes with it)")
    with tempfile.TemporaryDirectory(prefix="splitkit-flower-", ignore_cleanup_errors=True) as tmp:
        tmp = Path(tmp)
        saved, home, app = tmp / "rounds.pt", tmp / "flwr-home", tmp / "app"
        home.mkdir()
        (home / "config.toml").write_text('[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n')
        app.mkdir()
        (app / "pyproject.toml").write_text(_APP_PYPROJECT + "".join(f"{k} = {_toml(v)}\n"
                                                                    for k, v in _app_config().items()))
        (app / "splitkit_apps.py").write_text(_APP_MODULE)
        overrides["save-rounds"] = str(saved)
        federation = f"num-supernodes={int(clients)} client-resources-num-cpus={int(cpus_per_client)}"
        command = [flwr, "run", str(app), "local", "--stream",
                   *[f"--run-config={k}={_toml(v)}" for k, v in overrides.items()],
                   "--federation-config", f"{federation} client-resources-num-gpus=0"]
        log, failure = _flwr_run(command, tmp, quiet)
        rounds = torch.load(saved, weights_only=True) if failure is None and saved.exists() else []
        if len(rounds) < (wanted := int(overrides.get("rounds", DEFAULTS["rounds"]))):
            failure = failure or f"the ServerApp saved {len(rounds)} of {wanted} rounds"
            raise RuntimeError(f"the Flower run failed: {failure}. The end of Flower's log:\n"
                               + _tail(log, home / "local-superlink" / "superlink.log"))
    return [Round(**r) for r in rounds]


_TIMEOUT_S = 3600  # the longest a run may take before it is stopped
_MARKER = "SPLITKIT_FLOWER_RUN"  # the variable that marks a run's processes, all of them, Ray's workers included
_APP_PYPROJECT = """# The Flower app `run` starts: splitkit's apps, the run's settings and their defaults (DEFAULTS)
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "splitkit-federated"
version = "0.1.0"
description = "Split federated learning with LoRA: Flower runs the rounds, splitkit the split"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "splitkit"

[tool.flwr.app.components]
serverapp = "splitkit_apps:server_app"
clientapp = "splitkit_apps:client_app"

[tool.flwr.app.config]
"""
# The app's module: splitkit's apps under names Flower's CLI finds without importing splitkit (and torch)
_APP_MODULE = """from splitkit import federated

server_app = federated.server_app
client_app = federated.client_app
"""


def _flwr_run(command: list, tmp: Path, quiet: bool) -> tuple[list, str | None]:
    """Run `command` (`flwr run ...`) in `tmp` for at most _TIMEOUT_S, then stop every process it started.
    Returns its output's lines and what went wrong (None: it exited with 0)."""
    marker = f"{os.getpid()}:{tmp}"  # in the environment of every process of this run, to find them all after
    log, failure = [], None
    try:
        flower = subprocess.Popen(command, cwd=tmp, env=_flower_env(tmp, marker), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, errors="replace")
        reader = threading.Thread(target=_read_log, args=(flower.stdout, log, quiet), daemon=True)
        reader.start()
        try:
            if code := flower.wait(timeout=_TIMEOUT_S):
                failure = f"`flwr run` exited with {code}"
        except subprocess.TimeoutExpired:
            failure = f"the run did not end within {_TIMEOUT_S} s"
        finally:
            if flower.poll() is None:  # timed out, or interrupted
                flower.kill()
                flower.wait()
            reader.join(timeout=10)
    finally:
        _stop(marker)  # `flwr run` leaves the SuperLink it started running: it is ours to stop
    return log, failure


def rounds_file(settings: dict) -> Path | None:
    """Where the ServerApp saves its rounds (`save-rounds`), checked before the first round: an absolute path, since
    the ServerApp runs in a process of Flower's whose working folder is not the one `flwr run` ran in; None if ""."""
    saving = settings.get("save-rounds") or None
    if saving is not None and not Path(saving).is_absolute():
        raise ValueError(f"save-rounds must be an absolute path, not {saving!r}: the ServerApp runs in a process "
                         "of Flower's, whose working folder is not the one flwr run ran in")
    return None if saving is None else Path(saving)


def _app_config() -> dict:
    """The settings a run takes, with their defaults: DEFAULTS, the number of clients and the file of rounds."""
    return {**DEFAULTS, "clients": 2, "save-rounds": ""}


def _toml(value) -> str:
    """A setting as a TOML value, the way Flower's config holds it (no lists: cuts are "10,20")."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        value = ",".join(str(v) for v in value)
    if not isinstance(value, str) or "'" in value:
        raise ValueError(f"a setting is a number, a boolean or a string without ', not {value!r}")
    return f"'{value}'"  # a literal string: backslashes stay as they are


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _flower_env(tmp: Path, marker: str) -> dict:
    """The environment of `flwr run` and all it starts: Flower's home, Ray's files and the SuperLink's ports of
    this run only; no telemetry, usage stats, update check or dependency installation (nothing leaves the machine)."""
    return {**os.environ, _MARKER: marker, "FLWR_HOME": str(tmp / "flwr-home"), "RAY_TMPDIR": str(tmp),
            "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(_free_port()), "FLWR_LOCAL_CONTROL_API_PORT": str(_free_port()),
            "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "RAY_USAGE_STATS_ENABLED": "0",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",  # no GPU to hide; Ray's notice says so
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
            # the apps run the splitkit this process imported
            "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent.parent),
                                           *filter(None, [os.environ.get("PYTHONPATH")])])}


def _read_log(stream, log: list, quiet: bool):
    for line in stream:
        log.append(line)
        if not quiet:
            print(line, end="", flush=True)


def _tail(log: list, superlink_log: Path, lines: int = 40) -> str:
    """The end of `flwr run`'s output; and the SuperLink's own log (less its HTTP requests) if no run started."""
    text = log[-lines:]
    if not any("Successfully started run" in line for line in log) and superlink_log.exists():
        text += [line + "\n" for line in superlink_log.read_text().splitlines() if "HTTP/1.1" not in line][-lines:]
    return re.sub(r"\x1b\[[0-9;]*m", "", "".join(text))  # without the terminal's colours


def _processes(marker: str) -> list[int]:
    """The live processes whose environment holds `marker`: the run's SuperLink and all it started."""
    entry, found = f"{_MARKER}={marker}".encode(), []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            with contextlib.suppress(OSError):  # gone, or not ours to read
                if entry in (proc / "environ").read_bytes().split(b"\0"):
                    found.append(int(proc.name))
    return found


def _stop(marker: str):
    """SIGTERM to every process of the run, then SIGKILL to those left after 10 s; wait until none is left."""
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        for pid in _processes(marker):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while _processes(marker) and time.monotonic() < deadline:
            time.sleep(0.2)
    if left := _processes(marker):
        raise RuntimeError(f"processes {left} of a Flower run outlived SIGKILL")


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
