"""Lost replies, retries and restarts: the client never hangs, and nothing is applied twice."""

import time

import pytest
import torch

from splitkit import Learner, TrunkUnavailable
from splitkit.training.testing import ServerProcess, free_port, random_batch
from splitkit.trunk.faults import Faults
from splitkit.wire import encode
from splitkit.wire import protocol as P

from .strategies import D
from .test_server_input import ask

CUTS = (2, 4)


def test_no_server_raises_a_clear_error_within_the_timeout(client):
    c = client(f"tcp://127.0.0.1:{free_port()}", timeout=0.3, retries=2)
    start = time.monotonic()
    with pytest.raises(TrunkUnavailable, match=r"no answer from the trunk server at tcp://127\.0\.0\.1:\d+.*3 tries"):
        c.stats()
    assert time.monotonic() - start < 0.3 * 3 + 0.5


@pytest.mark.parametrize("mode", [P.FULL, P.FULL_TRUNK])
def test_server_killed_mid_training_then_restarted(llama, mode):
    server = ServerProcess("tiny-llama", CUTS, timeout=60)
    port = int(server.address.rsplit(":", 1)[1])
    timeout, retries = 1.0, 1
    losses = []
    with Learner(llama, mode=mode, cuts=CUTS, address=server.address, lr=1e-2, timeout=timeout,
                 retries=retries) as learner:
        try:
            for step in range(8):
                if step == 3:
                    server.kill()
                    start = time.monotonic()
                    with pytest.raises(TrunkUnavailable, match=server.address):
                        learner.step(random_batch(259, seed=step))
                    assert time.monotonic() - start < timeout * (retries + 1) + 1.0
                    server = ServerProcess("tiny-llama", CUTS, port=port, timeout=60)
                losses.append(learner.step(random_batch(259, seed=step)))
        finally:
            server.kill()
        assert learner.client.reopened == 1
    assert len(losses) == 8 and all(torch.isfinite(torch.tensor(losses)))


def test_simulated_crash_stops_the_thread(llama, serve, client):
    c = client(serve(llama, CUTS, faults=Faults(crash_after=2)), timeout=0.5, retries=0)
    c.hello(llama, CUTS, mode=P.DETACH)
    c.forward(torch.zeros(1, 2, D))
    with pytest.raises(TrunkUnavailable):
        c.forward(torch.zeros(1, 2, D))


def test_faults_parse():
    assert Faults.parse("drop=0.1,delay=0.5,delay_s=2,crash-after=50") == Faults(drop=0.1, delay=0.5, delay_s=2.0,
                                                                                crash_after=50)
    with pytest.raises(ValueError, match="unknown fault 'explode'"):
        Faults.parse("explode=1")


@pytest.fixture
def trained_once(llama, serve, client, raw_socket, spec):
    """A full+trunk session with one forward kept, and two sockets to send the same request from."""
    address = serve(llama, CUTS)
    c = client(address, timeout=5)
    c.hello(llama, CUTS, mode=P.FULL_TRUNK, lora=spec, lr=1e-2)
    c.forward(torch.randn(2, 5, D), key=7)
    return serve.servers[-1], c, raw_socket(address), raw_socket(address)


def trunk_lora(server, c) -> dict:
    return {n: p.detach().clone() for n, p in server.sessions.lora_parameters(server.sessions.get(c.session))}


def test_a_backward_sent_twice_is_applied_once(trained_once):
    server, c, first, second = trained_once
    # the same request from two sockets, as a Lazy Pirate retry after a reconnect sends it
    backward = encode({"op": P.BACKWARD, "session": c.session, "id": 100, "key": 7}, [torch.randn(2, 5, D)])
    assert ask(first, backward)["ok"]
    once = server.sessions.lora_grads(c.session)
    assert ask(second, backward)["ok"]
    assert all(torch.equal(once[k], g) for k, g in server.sessions.lora_grads(c.session).items())


def test_a_step_sent_twice_is_applied_once(trained_once):
    server, c, first, second = trained_once
    backward = encode({"op": P.BACKWARD, "session": c.session, "id": 100, "key": 7}, [torch.randn(2, 5, D)])
    assert ask(first, backward)["ok"]
    before = trunk_lora(server, c)
    step = encode({"op": P.STEP, "session": c.session, "id": 200})
    assert ask(first, step)["steps"] == 1
    assert ask(second, step)["steps"] == 1  # the stored reply, not a second step
    after = trunk_lora(server, c)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert server.sessions.get(c.session).steps == 1
    assert ask(first, encode({"op": P.STEP, "session": c.session, "id": 300}))["applied"] is False  # no new grads


def test_a_request_older_than_the_newest_is_refused_never_run(trained_once):
    server, c, first, _ = trained_once
    assert ask(first, encode({"op": P.STEP, "session": c.session, "id": 200}))["ok"]
    lora = trunk_lora(server, c)
    stale = ask(first, encode({"op": P.STEP, "session": c.session, "id": 1}))
    assert stale["code"] == P.STALE
    assert all(torch.equal(lora[k], t) for k, t in trunk_lora(server, c).items())


def test_lost_and_late_replies_change_nothing(llama, serve, spec):
    """With a third of the replies dropped, the client's retries give the same training as a clean run."""
    faults = Faults(drop=0.3, delay=0.2, delay_s=0.05, seed=1)
    with Learner(llama, mode=P.FULL_TRUNK, cuts=CUTS, address=serve(llama, CUTS, lora_seed=0), lora=spec,
                 lr=1e-2) as clean, \
            Learner(llama, mode=P.FULL_TRUNK, cuts=CUTS, address=serve(llama, CUTS, faults=faults, lora_seed=0),
                    lora=spec, lr=1e-2, timeout=0.3, retries=8) as lossy:
        for seed in range(4):
            batch = random_batch(259, seed=seed)
            assert clean.step(batch) == lossy.step(batch)
        assert serve.servers[-1].counters["dropped"] > 0
        assert clean.delta_norms() == lossy.delta_norms()
