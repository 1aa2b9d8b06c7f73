"""Split federated learning on Flower: the rounds run under Flower's simulation engine (`flwr run` against a local
simulation SuperLink), the average is the mean of what the clients sent, each client starts its round from that
average, and the loss falls; the run leaves no process behind, failed or not."""

import contextlib
import os
from pathlib import Path

import psutil
import pytest
import torch
from flwr.cli.config_utils import load_and_validate

from splitkit import Learner, TrunkError, load_model
from splitkit import federated as F
from splitkit.federated import runner
from splitkit.training.testing import ROOT, max_rel_diff
from splitkit.wire import protocol as P

CUTS = [2, 4]


@pytest.fixture(scope="module")
def tiny_llama():
    return load_model("tiny-llama")


def flower_processes() -> list[psutil.Process]:
    """The live processes that a run of this test process started: they carry its pid in runner._MARKER."""
    found = []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error):  # gone, or not ours to read
            if (process.environ().get(runner._MARKER, "").startswith(f"{os.getpid()}:")
                    and process.status() != psutil.STATUS_ZOMBIE):
                found.append(process)
    return found


def test_a_flower_simulation_averages_the_clients_lora_and_the_loss_falls(tiny_llama, serve, capfd):
    model, tokenizer = tiny_llama
    config = {"model": "tiny-llama", "address": serve(model, CUTS), "mode": P.FULL_TRUNK, "cuts": CUTS,
              "rounds": 2, "local-steps": 3, "facts": 12, "lr": 1e-2}
    rounds = F.run(config, clients=3)
    assert flower_processes() == []  # the SuperLink, the simulation and Ray's workers are gone
    printed = capfd.readouterr()
    assert "aggregate_train" not in printed.out + printed.err  # quiet: Flower's log of each round stays out
    assert [r.number for r in rounds] == [1, 2] and all(sorted(r.clients) == [0, 1, 2] for r in rounds)
    settings = {**F.DEFAULTS, **config}
    start = F.initial_lora(model, settings)
    assert any(name.startswith("3.") for name in start)  # a Trunk layer: its LoRA is averaged too

    for r in rounds:
        # the mean, computed here from what each client sent, weighted by its examples
        weights = {k: m["num-examples"] for k, m in r.metrics.items()}
        assert sorted(weights.values()) == [4, 4, 4]
        mean = {name: torch.stack([weights[k] * s[name] for k, s in r.clients.items()]).sum(0) / sum(weights.values())
                for name in start}
        assert r.average.keys() == start.keys()
        assert max_rel_diff(r.average, mean) < 1e-6
        assert all(not torch.equal(r.clients[0][n], r.clients[1][n]) for n in start if n.endswith("lora_B"))

    # client 1 of round 2, trained again here from round 1's average: the same LoRA, Trunk's included
    pairs = F.shard(F.task(12), 1, 3)
    with F.learner(model, settings) as run:
        again, _ = F.local_training(run, tokenizer, settings, rounds[0].average, pairs, server_round=2, partition=1)
        assert max_rel_diff(again, rounds[1].clients[1]) < 1e-5

        first = sum(m["loss-first"] for m in rounds[0].metrics.values())
        last = sum(m["loss-last"] for m in rounds[1].metrics.values())
        assert last < first
        everything = F.task(12)
        before = F.evaluate(run, tokenizer, start, everything, answers=False)["loss"]
        after = F.evaluate(run, tokenizer, rounds[1].average, everything, answers=False)["loss"]
        assert sum(after) < sum(before)


def test_a_failed_flower_run_says_why_and_leaves_nothing_running():
    with pytest.raises(RuntimeError, match="(?s)the Flower run failed.*unknown model 'no-such-model'"):
        F.run({"model": "no-such-model", "rounds": 1}, clients=2)  # the ServerApp's load_model raises
    assert flower_processes() == []
    with pytest.raises(ValueError, match="unknown settings \\['round'\\]"):
        F.run({"round": 1}, clients=2)
    with pytest.raises(ValueError, match="whole numbers"):
        F.run({}, clients=2, cpus_per_client=0.5)


def test_the_settings_take_cuts_as_a_string_as_a_pyproject_gives_them():
    assert F.run_settings({"cuts": "2,4"})["cuts"] == [2, 4] == F.run_settings({"cuts": "2 4"})["cuts"]
    assert F.run_settings({})["cuts"] == F.DEFAULTS["cuts"]
    # the Flower app of the README, as `flwr run` reads it: valid, and its components importable
    flower = load_and_validate(ROOT / "flower" / "pyproject.toml", check_module=True)[0]["tool"]["flwr"]["app"]
    assert flower["components"] == {"serverapp": "splitkit.federated:server_app",
                                    "clientapp": "splitkit.federated:client_app"}
    settings = F.run_settings(flower["config"])
    assert settings.keys() == F.DEFAULTS.keys() | {"clients", "save-rounds"} and settings["cuts"] == [10, 20]
    # save-rounds: nothing by default, an absolute path, and a relative one refused before any round
    assert F.rounds_file(settings) is None and F.rounds_file({"save-rounds": "/tmp/r.pt"}) == Path("/tmp/r.pt")
    with pytest.raises(ValueError, match="absolute path, not 'rounds.pt'"):
        F.rounds_file({"save-rounds": "rounds.pt"})


def test_averaging_the_products_is_exact_when_their_sum_fits_the_rank():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1, 6, generator=g), torch.randn(5, 1, generator=g)  # one direction: rank 1 in total
    clients = {0: {"0.q.lora_A": torch.cat([a, torch.zeros(1, 6)]), "0.q.lora_B": torch.cat([b, b], 1)},
               1: {"0.q.lora_A": torch.cat([2 * a, torch.zeros(1, 6)]), "0.q.lora_B": torch.cat([-b, b], 1)}}
    weights = {0: 1.0, 1: 3.0}
    mean = (1 * b @ a + 3 * -b @ (2 * a)) / 4
    product = F.average_products(clients, weights)
    assert torch.allclose(product["0.q.lora_B"] @ product["0.q.lora_A"], mean, atol=1e-6)
    assert F.product_gap(clients, weights, product) < 1e-6
    ab = {n: (clients[0][n] * 1 + clients[1][n] * 3) / 4 for n in clients[0]}
    # A and B averaged apart: their product is -7/8 b·a, the mean product -5/4 b·a
    assert F.product_gap(clients, weights, ab) == pytest.approx(0.3, abs=1e-6)


def test_a_frozen_a_makes_the_average_of_b_the_average_of_the_product(tiny_llama, serve):
    model, tokenizer = tiny_llama
    settings = {**F.DEFAULTS, "model": "tiny-llama", "address": serve(model, CUTS), "cuts": CUTS, "local-steps": 2,
                "facts": 12, "lr": 1e-2, "freeze-a": True}
    start = F.initial_lora(model, settings)
    with F.learner(model, settings) as run:  # one Learner for both clients: load_lora starts each afresh
        clients = {k: F.local_training(run, tokenizer, settings, start, F.shard(F.task(12), k, 2), 1, k)[0]
                   for k in range(2)}
    assert all(torch.equal(clients[k][n], start[n]) for k in clients for n in start if n.endswith("lora_A"))
    weights = {0: 1.0, 1: 1.0}
    ab = {n: (clients[0][n] + clients[1][n]) / 2 for n in start}
    assert F.product_gap(clients, weights, ab) < 1e-6


def test_load_lora_puts_the_trunk_lora_on_the_server_and_refuses_a_wrong_one(llama, serve, spec):
    address = serve(llama, CUTS)
    with Learner(llama, mode=P.FULL_TRUNK, cuts=CUTS, address=address, lora=spec) as learner:
        state = learner.lora_state()
        changed = {name: t + 0.5 for name, t in state.items()}
        learner.load_lora(changed)
        assert max_rel_diff(learner.lora_state(), changed) == 0
        trunk = {n: t for n, t in changed.items() if n.startswith(("2.", "3."))}
        assert trunk and learner.client.trunk_lora().keys() == trunk.keys()
        with pytest.raises(TrunkError, match="does not match"):
            learner.client.load_lora(dict(list(trunk.items())[1:]))
        with pytest.raises(ValueError, match="does not fit"):
            learner.load_lora({n: t for n, t in changed.items() if n not in trunk and not n.startswith("0.")})
    with Learner(llama, mode=P.FULL, cuts=CUTS, address=address, lora=spec) as learner, \
            pytest.raises(TrunkError, match="only a full\\+trunk"):
        learner.client.load_lora(trunk)
