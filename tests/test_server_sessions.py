"""Sessions on a shared trunk server: bounded memory, cleanup, many clients at once, and who may connect."""

import threading
import time

import pytest
import torch

from splitkit import Learner, TrunkError, TrunkServer, TrunkUnavailable
from splitkit import protocol as P
from splitkit.keys import make_keys
from splitkit.sessions import Limits
from splitkit.testing import free_port, random_batch

from .strategies import D

CUTS = (2, 4)


def hello(client, model, mode=P.FULL, **kw):
    return client.hello(model, CUTS, mode=mode, **kw)


def test_forwards_without_backward_cannot_grow_memory(llama, serve, client):
    address = serve(llama, CUTS, limits=Limits(states_per_session=3, states_total=5))
    server = serve.servers[-1]
    for _ in range(3):
        c = client(address, timeout=5)
        hello(c, llama)
        for _ in range(10):
            c.forward(torch.randn(1, 4, D), key=c.new_key())
    assert all(len(s.states) <= 3 for s in server.sessions.table.values())
    assert server.stats()["states"] == 5


def test_a_forward_state_is_used_up_by_its_backward(llama, serve, client):
    address = serve(llama, CUTS)
    server = serve.servers[-1]
    c = client(address, timeout=5)
    hello(c, llama)
    c.forward(torch.randn(1, 4, D), key=0)
    assert server.stats()["states"] == 1
    c.backward(torch.randn(1, 4, D), key=0)
    assert server.stats()["states"] == 0
    with pytest.raises(TrunkError) as e:
        c.backward(torch.randn(1, 4, D), key=0)
    assert e.value.code == P.STATE_MISSING


def test_idle_sessions_and_old_states_are_cleaned_up(llama, serve, client):
    address = serve(llama, CUTS, limits=Limits(session_idle_s=0.3, state_max_age_s=0.2))
    server = serve.servers[-1]
    c = client(address, timeout=5)
    hello(c, llama)
    c.forward(torch.randn(1, 4, D), key=c.new_key())
    assert server.stats()["states"] == 1
    deadline = time.monotonic() + 5  # the server's loop sweeps every 100 ms
    while server.stats()["sessions"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.stats()["states"] == 0 and server.stats()["sessions"] == 0


def test_a_full_server_refuses_one_more_session_as_busy(llama, serve, client):
    address = serve(llama, CUTS, limits=Limits(max_sessions=2))
    for _ in range(2):
        hello(client(address, timeout=5), llama)
    with pytest.raises(TrunkError, match="its limit") as e:
        hello(client(address, timeout=5), llama)
    assert e.value.code == P.BUSY


def test_eight_concurrent_clients_get_their_own_gradients(llama, serve, spec):
    address = serve(llama, CUTS)
    sessions = serve.servers[-1].sessions
    batches = [random_batch(259, seed=i) for i in range(8)]

    def grads(batch):
        with Learner(llama, mode=P.FULL_TRUNK, cuts=CUTS, address=address, lora=spec, lr=1e-2) as learner:
            learner.forward_backward(batch)
            trunk = sessions.lora_grads(learner.client.session)
            learner.client.step()
            return {**learner.lora_grads(), **{f"trunk.{k}": v for k, v in trunk.items()}}

    alone = [grads(b) for b in batches]
    together = [None] * 8
    barrier = threading.Barrier(8)

    def run(i):
        barrier.wait()
        together[i] = grads(batches[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for a, b in zip(alone, together, strict=True):
        assert b is not None and a.keys() == b.keys()
        assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7) for k in a)


def test_curve_keys_let_in_the_key_holder(llama, tmp_path, serve, client):
    keys = make_keys(tmp_path / "keys")
    good = client(serve(llama, CUTS, curve_dir=keys), timeout=5, curve_dir=keys)
    hello(good, llama)
    assert good.forward(torch.zeros(1, 2, D)).shape == (1, 2, D)


def test_curve_keys_keep_out_a_client_without_keys(llama, tmp_path, serve, client):
    address = serve(llama, CUTS, curve_dir=make_keys(tmp_path / "keys"))
    with pytest.raises(TrunkUnavailable):
        client(address, timeout=0.5, retries=0).stats()


def test_curve_keys_keep_out_a_key_the_server_never_authorized(llama, tmp_path, serve, client):
    keys = make_keys(tmp_path / "keys")
    address = serve(llama, CUTS, curve_dir=keys)
    other = make_keys(tmp_path / "other")
    (other / "server.key").write_bytes((keys / "server.key").read_bytes())
    with pytest.raises(TrunkUnavailable):
        client(address, timeout=0.5, retries=0, curve_dir=other).stats()


def test_public_bind_needs_keys_or_insecure(llama):
    with pytest.raises(ValueError, match=r"refusing to bind tcp://0\.0\.0\.0:\d+.*--curve-dir.*--insecure"):
        TrunkServer(llama, CUTS, bind=f"tcp://0.0.0.0:{free_port()}")


def test_the_command_line_refuses_a_public_bind_without_keys(caplog):
    from trunk_server import main
    assert main(["--model", "tiny-llama", "--cuts", "2", "4", "--bind", "tcp://10.1.2.3:5555"]) == 2
    assert "refusing to bind tcp://10.1.2.3:5555" in caplog.text


def test_insecure_public_bind_is_allowed_with_a_warning(llama, caplog):
    TrunkServer(llama, CUTS, bind="tcp://0.0.0.0:*", insecure=True)
    assert "WITHOUT encryption" in caplog.text
