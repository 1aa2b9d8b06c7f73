"""Sessions on a shared trunk server: bounded memory, cleanup, many clients at once, and who may connect."""

import os
import threading
import time

import pytest
import torch

from splitkit import Learner, TrunkError, TrunkServer, TrunkUnavailable
from splitkit.training.testing import free_port, random_batch
from splitkit.trunk.sessions import Limits
from splitkit.trunk.teacher import render
from splitkit.wire import protocol as P
from splitkit.wire.keys import make_keys

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


CLASS = 30  # students on one server


@pytest.mark.parametrize("mode", [P.FULL, P.FULL_TRUNK])
def test_thirty_concurrent_clients_train_bit_for_bit_as_alone_in_bounded_memory(llama, serve, client, spec, mode):
    limits = Limits(states_per_session=1, states_total=8, max_sessions=CLASS)
    address = serve(llama, CUTS, limits=limits, lora_seed=0)  # every session's Trunk LoRA from the same start

    def train(i):  # three steps of student i's own batches: its losses and its LoRA, the Trunk's included
        with Learner(llama, mode=mode, cuts=CUTS, address=address, lora=spec, lr=1e-2) as learner:
            losses = [learner.step(random_batch(259, seed=100 * i + s)) for s in range(3)]
            return losses, learner.lora_state()

    alone = [train(i) for i in range(CLASS)]
    together, peak = [None] * CLASS, dict(sessions=0, states=0, state_bytes=0)
    barrier, done = threading.Barrier(CLASS), threading.Event()

    def student(i):
        barrier.wait()
        together[i] = train(i)

    def watch():  # the server's own numbers, asked over the socket while the class trains
        probe = client(address, timeout=5)
        while not done.is_set():
            stats = probe.stats()
            for k in peak:
                peak[k] = max(peak[k], stats[k])
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    threads = [threading.Thread(target=student, args=(i,)) for i in range(CLASS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    done.set()
    watcher.join(10)
    for (losses, lora), result in zip(alone, together, strict=True):
        assert result is not None
        assert result[0] == losses  # the same floats, bit for bit
        assert lora.keys() == result[1].keys() and all(torch.equal(lora[k], result[1][k]) for k in lora)
    assert 1 < peak["sessions"] <= CLASS and peak["states"] <= limits.states_total
    state_bytes = 2 * 2 * 12 * D * 4  # h1 and h2 of one (2, 12) batch in float32
    assert peak["state_bytes"] <= limits.states_total * state_bytes
    final = client(address, timeout=5).stats()
    assert final["sessions"] == 0 and final["states"] == 0
    assert final["errors"] == final["refused"].get("state_missing", 0)  # evicted states were sent again, no other


def test_curve_keys_let_in_the_key_holder(llama, tmp_path, serve, client):
    keys = make_keys(tmp_path / "keys")
    good = client(serve(llama, CUTS, curve_dir=keys), timeout=5, curve_dir=keys)
    hello(good, llama)
    assert good.forward(torch.zeros(1, 2, D)).shape == (1, 2, D)


def test_curve_keys_keep_out_a_client_without_keys(llama, tmp_path, serve, client):
    address = serve(llama, CUTS, curve_dir=make_keys(tmp_path / "keys"))
    with pytest.raises(TrunkUnavailable, match="no connection was made.*--curve-dir FOLDER on the command line"):
        client(address, timeout=0.5, retries=1).stats()
    # ZeroMQ fails the handshake before the authenticator is asked; the server's socket monitor counts the failed
    # connections (a try without a key can make several: who notices the mismatch first is a race)
    deadline = time.monotonic() + 2
    while (stats := serve.servers[-1].stats())["handshakes_without_key"] < 2:
        assert time.monotonic() < deadline, {k: v for k, v in stats.items() if "key" in k or "handshake" in k}
        time.sleep(0.05)
    assert stats["handshakes_refused"] == stats["keys_refused"] == 0


def test_curve_keys_keep_out_a_key_the_server_never_authorized(llama, tmp_path, serve, client, caplog):
    keys = make_keys(tmp_path / "keys")
    address = serve(llama, CUTS, curve_dir=keys)
    other = make_keys(tmp_path / "other")
    (other / "server.key").write_bytes((keys / "server.key").read_bytes())
    with pytest.raises(TrunkUnavailable, match="refused this client's key"):
        client(address, timeout=0.5, retries=2, curve_dir=other).stats()
    # the server counts the refused handshakes, tries and keys, and logs the key once, as no student's
    stats = serve.servers[-1].stats()
    assert stats["handshakes_refused"] == 3 and stats["keys_refused"] == 1, stats
    assert stats["requests_from_withdrawn_keys"] == stats["handshakes_without_key"] == 0
    refusals = [r.getMessage() for r in caplog.records if "refused a CURVE handshake" in r.getMessage()]
    assert len(refusals) == 1 and f"no student's key in {keys / 'students'}" in refusals[0]
    # the teacher's view shows the count from a server with keys, and no such line from one without
    shown = "class='sk-handshakes-refused' style='text-align:right;padding:0 8px'>{}</td>"
    assert shown.format(stats["handshakes_refused"]) in render(stats, None)
    plain = TrunkServer(llama, CUTS, bind="tcp://127.0.0.1:*").stats()
    assert "handshakes_refused" not in plain and "sk-handshakes-refused" not in render(plain, None)


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


def test_a_server_in_a_thread_keeps_no_threads_between_requests(smollm2, serve):
    """A server started by start() shares its process with a notebook's kernel. torch gives each thread that computes
    a team of OpenMP threads, and while the process holds more of them than it has cores, libgomp has every team
    sleep rather than spin between parallel regions: the kernel's own computing ran 1.2-1.3x slower. So each request
    runs in a thread that ends with it, and its team with it."""
    model, _ = smollm2
    threads = lambda: len(os.listdir("/proc/self/task"))  # noqa: E731  the process's threads, OpenMP's included
    step = lambda learner, seed: learner.step(random_batch(model.config.vocab_size, batch=4, seq=32, seed=seed))  # noqa: E731
    was = torch.get_num_threads()
    torch.set_num_threads(2)  # teams of two, here and in the server's requests, however many cores there are
    try:
        with Learner(model, mode="full", cuts=(10, 20), address=serve(model, (10, 20))) as first:
            step(first, 0)  # this thread's team, and pyzmq's threads for sending tensors, made once per process
        serve.servers[-1].stop()  # its thread ends, and with it any team it kept
        with Learner(model, mode="full", cuts=(10, 20), address=serve(model, (10, 20))) as learner:
            before = threads()
            for seed in (1, 2):
                step(learner, seed)
                assert threads() <= before  # none kept; fewer if an earlier test's thread has ended since
    finally:
        torch.set_num_threads(was)
