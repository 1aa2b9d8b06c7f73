"""`flwr run` of the apps against a local simulation SuperLink, from Python: a temporary Flower home and app,
free ports, the run's processes marked, and every one of them stopped when the run ends."""

import contextlib
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
from pathlib import Path

import torch

from .apps import Round
from .settings import DEFAULTS


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
            "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]),
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
