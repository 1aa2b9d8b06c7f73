"""A notebook uses the class server ($SPLITKIT_TRUNK) only when it runs the notebook's model at its cuts, says in one
line which server it uses and why, never waits long for a server that does not answer, and finds the student's keys
in $SPLITKIT_CURVE_DIR. Against real TrunkServers on loopback, with the tiny test model."""

import copy
import re
import time

import pytest
import torch

from splitkit import Learner, TrunkClient
from splitkit.training.testing import free_port, random_batch
from splitkit.trunk.batching import BatchingServer
from splitkit.trunk.server import class_or_own, connect_or_start
from splitkit.wire.keys import add_student, make_keys

CUTS = (2, 4)


@pytest.fixture
def trunk_env(monkeypatch):
    """set(address, keys=None): $SPLITKIT_TRUNK (and $SPLITKIT_CURVE_DIR) for this test only."""
    monkeypatch.delenv("SPLITKIT_TRUNK", raising=False)
    monkeypatch.delenv("SPLITKIT_CURVE_DIR", raising=False)

    def set_env(address, keys=None):
        monkeypatch.setenv("SPLITKIT_TRUNK", address)
        if keys is not None:
            monkeypatch.setenv("SPLITKIT_CURVE_DIR", str(keys))

    return set_env


@pytest.fixture
def choose():
    """class_or_own(...), the server it may have started stopped after the test."""
    made = []

    def run(*args, say=None, **kwargs):
        made.append(class_or_own(*args, say=say, **kwargs))
        return made[-1]

    yield run
    for choice in made:
        choice.stop()


def one_step(llama, address, cuts=CUTS, **options):
    with Learner(llama, mode="full", cuts=cuts, address=address, lr=1e-2, timeout=5, **options) as learner:
        return learner.step(random_batch(llama.config.vocab_size))


def backwards(address, **options) -> int:
    with TrunkClient(address, timeout=5, retries=0, **options) as c:
        return c.stats()["answered"].get("backward", 0)


def test_without_the_variable_a_server_of_its_own_is_started_and_said(llama, trunk_env, choose, capsys):
    address = choose(llama, CUTS, say=print).address
    line = capsys.readouterr().out
    assert re.fullmatch(rf"\$SPLITKIT_TRUNK is not set: started a trunk server of this notebook's own on "
                        rf"{re.escape(address)} \(cuts \(2, 4\)\)\n", line)
    assert one_step(llama, address) > 0 and backwards(address) == 1


def test_a_class_server_that_runs_the_same_model_and_cuts_is_used(llama, serve, trunk_env, choose, capsys):
    address = serve(llama, CUTS)
    trunk_env(address)
    assert connect_or_start(llama, CUTS) == address
    assert capsys.readouterr().out == f"using the class server at {address} (tiny-llama, cuts (2, 4))\n"
    choice = choose(llama, CUTS)
    assert choice.address == address and choice.server is None
    one_step(llama, choice.address)
    assert backwards(address) == 1  # the step was served by the class server


def test_a_class_server_at_other_cuts_is_left_alone_and_a_server_of_its_own_is_started(llama, serve, trunk_env,
                                                                                        choose):
    address = serve(llama, CUTS)
    trunk_env(address)
    choice = choose(llama, (1, 4))
    assert choice.address != address and choice.server is not None
    assert choice.line.startswith(f"the class server at {address} runs cuts (2, 4), not (1, 4): started a trunk "
                                  f"server of this notebook's own on {choice.address}")
    one_step(llama, choice.address, cuts=(1, 4))
    assert backwards(choice.address) == 1 and backwards(address) == 0


def test_a_class_server_that_batches_is_used_unless_the_lesson_compares_bit_for_bit(llama, trunk_env, choose):
    batching = BatchingServer(llama, CUTS, bind="tcp://127.0.0.1:*", window_ms=2)
    try:
        address = batching.start()
        trunk_env(address)
        assert choose(llama, CUTS).address == address  # results within float rounding are fine here
        exact = choose(llama, CUTS, exact=True)  # not for a lesson that checks bit for bit: one of its own
        assert exact.address != address and exact.server is not None
        assert exact.line.startswith(f"the class server at {address} runs classmates' requests together with yours "
                                     f"(--batch-window-ms)")
        one_step(llama, exact.address)
        assert backwards(exact.address) == 1 and backwards(address) == 0
    finally:
        batching.stop()


def test_a_class_server_with_another_model_or_other_weights_is_left_alone(llama, tiny, serve, trunk_env, choose):
    address = serve(llama, CUTS)
    trunk_env(address)
    other, _ = tiny
    if other.config.name_or_path == "tiny-llama":  # the same config: change the Trunk's weights
        other = copy.deepcopy(other)
        with torch.no_grad():
            other.model.layers[CUTS[0]].mlp.down_proj.weight.add_(1e-3)
        want = f"the class server at {address} runs tiny-llama with other weights in blocks [2, 4)"
    else:
        want = f"the class server at {address} runs another model (tiny-llama), not tiny-gpt2"
    choice = choose(other, CUTS)
    assert choice.server is not None and choice.line.startswith(want + ": started")


def test_a_dead_address_is_given_up_on_after_the_timeout_and_a_server_of_its_own_is_started(llama, trunk_env, choose):
    dead = f"tcp://127.0.0.1:{free_port()}"
    trunk_env(dead)
    t0 = time.monotonic()
    choice = choose(llama, CUTS, timeout=0.5)
    assert time.monotonic() - t0 < 5
    assert choice.line.startswith(f"no answer from the class server at {dead} within 0.5 s (is it running there? "
                                  f"if it has keys, set $SPLITKIT_CURVE_DIR to the folder your teacher gave you): "
                                  f"started a trunk server of this notebook's own on {choice.address}")
    assert one_step(llama, choice.address) > 0


def test_an_address_zeromq_cannot_use_is_said_and_a_server_of_its_own_is_started(llama, trunk_env, choose):
    trunk_env("tcp://nowhere")
    choice = choose(llama, CUTS, timeout=0.5)
    assert choice.line.startswith("cannot use the class server at tcp://nowhere: ") and choice.server is not None


def test_a_class_server_with_keys_is_used_with_the_students_folder_from_the_variable(llama, serve, trunk_env, choose,
                                                                                    tmp_path):
    keys = make_keys(tmp_path / "classkeys")
    alice = add_student(keys, "alice")
    address = serve(llama, CUTS, curve_dir=keys)
    trunk_env(address, alice)
    choice = choose(llama, CUTS, timeout=2)
    assert choice.server is None and choice.line == f"using the class server at {address} (tiny-llama, cuts (2, 4))"
    one_step(llama, address)  # a Learner given the address alone: the keys come from $SPLITKIT_CURVE_DIR
    assert backwards(address) == 1
    assert TrunkClient(f"tcp://127.0.0.1:{free_port()}").curve_dir is None  # any other address: no keys


def test_a_class_server_with_keys_and_no_usable_folder_is_said_why(llama, serve, trunk_env, choose, tmp_path):
    keys = make_keys(tmp_path / "classkeys")
    address = serve(llama, CUTS, curve_dir=keys)
    trunk_env(address)
    choice = choose(llama, CUTS, timeout=0.5)
    assert choice.server is not None and "set $SPLITKIT_CURVE_DIR to the folder your teacher gave you" in choice.line
    trunk_env(address, tmp_path / "empty")
    choice = choose(llama, CUTS, timeout=0.5)
    assert choice.line.startswith(f"cannot use the class server at {address}: {tmp_path / 'empty'} is not a folder "
                                  f"of keys: it needs client.key_secret and server.key")
    trunk_env(address, make_keys(tmp_path / "strangers"))  # keys the class server never authorized
    choice = choose(llama, CUTS, timeout=0.5)
    assert f"are the keys in $SPLITKIT_CURVE_DIR={tmp_path / 'strangers'} authorized?" in choice.line


def test_the_command_line_trains_on_the_class_server_with_the_keys_from_the_variables(llama, serve, trunk_env,
                                                                                      tmp_path, capsys):
    from splitkit.__main__ import main

    keys = make_keys(tmp_path / "classkeys")
    address = serve(llama, CUTS, curve_dir=keys)
    trunk_env(address, add_student(keys, "bob"))
    assert main(["train", "--model", "tiny-llama", "--cuts", "2", "4", "--steps", "2", "--batch-size", "2",
                 "--timeout", "5", "--out", str(tmp_path / "run")]) == 0, capsys.readouterr().err
    assert "started a trunk server" not in capsys.readouterr().out and backwards(address) == 2
