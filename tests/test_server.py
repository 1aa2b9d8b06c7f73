"""A trunk server a class can share: bad input, lost replies, restarts, many clients, keys."""

import json
import pickle
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from splitkit import TrunkClient, TrunkError, TrunkServer, TrunkUnavailable, load_model, lora_grads, make_learner
from splitkit.server import Faults, make_keys
from splitkit.split import split_model
from splitkit.train import forward_backward, train_step, zero_grad
from splitkit.wire import encode

from .conftest import random_batch

ROOT = Path(__file__).resolve().parents[1]
CUTS = (2, 4)


@pytest.fixture(scope="module")
def llama():
    return load_model("tiny-llama")[0]


def hello(client, model, mode="full", **kw):
    return client.hello("tiny-llama", CUTS, model.config.hidden_size, mode=mode, **kw)


def raw_socket(address, timeout_ms=5000):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    sock.rcvtimeo = timeout_ms
    sock.connect(address)
    return sock


def ask(sock, frames):
    """Send frames as a REQ would (empty delimiter first) and return the reply header."""
    sock.send_multipart([b"", *frames])
    reply = sock.recv_multipart()  # raises zmq.Again after rcvtimeo instead of hanging
    assert reply[0] == b""
    return json.loads(reply[1])


# ---------------------------------------------------------------- malformed messages

D = 64  # tiny-llama's hidden size
headers = st.fixed_dictionaries({}, optional={
    "v": st.one_of(st.just(1), st.integers(), st.text(max_size=3)),
    "op": st.one_of(st.sampled_from(["hello", "forward", "backward", "step", "lora_state", "bye", "stats", "exec"]),
                    st.text(max_size=10)),
    "session": st.one_of(st.text(max_size=70), st.just("a" * 32), st.integers()),
    "id": st.one_of(st.integers(min_value=-5, max_value=2**70), st.text(max_size=3), st.none()),
    "key": st.one_of(st.integers(min_value=-5, max_value=10), st.floats()),
    "keep": st.one_of(st.booleans(), st.integers()),
    "mode": st.sampled_from(["forward", "full", "full+trunk", "train", ""]),
    "model": st.sampled_from(["tiny-llama", "gpt-17"]),
    "cuts": st.one_of(st.just([2, 4]), st.lists(st.integers(-3, 9), max_size=3)),
    "hidden_size": st.sampled_from([D, 576, -1]),
    "lora": st.one_of(st.none(), st.dictionaries(st.sampled_from(["r", "lora_alpha", "target_modules", "seed"]),
                                                  st.one_of(st.integers(-2, 10**6), st.lists(st.text(max_size=5)))),
                      st.just({"r": 2, "lora_alpha": 4})),
    "lr": st.one_of(st.floats(allow_nan=True), st.integers()),
    "tensors": st.one_of(
        st.lists(st.fixed_dictionaries({"dtype": st.sampled_from(["float32", "float16", "bfloat16", "int64", "object"]),
                                        "shape": st.lists(st.integers(-2, 2**40), max_size=5)}), max_size=3),
        st.text(max_size=5), st.integers()),
})


@st.composite
def malformed(draw):
    kind = draw(st.sampled_from(["random", "json", "header", "lying", "huge", "pickle", "nan", "deep"]))
    if kind == "random":
        return draw(st.lists(st.binary(max_size=64), min_size=0, max_size=5))
    if kind == "json":
        return [json.dumps(draw(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                                             lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=3), c, max_size=3),
                                             max_leaves=8))).encode()]
    if kind == "header":
        h = draw(headers)
        return [json.dumps(h).encode(), *draw(st.lists(st.binary(max_size=256), max_size=3))]
    if kind == "lying":  # a valid-looking forward whose buffer does not match its shape
        B, T = draw(st.integers(1, 4)), draw(st.integers(1, 8))
        t = torch.zeros(B, T, D)
        frames = encode({"op": "forward", "session": "b" * 32, "id": 1, "keep": False}, [t])
        cut = draw(st.integers(1, max(1, frames[1].nbytes - 1)))
        return [frames[0], bytes(frames[1])[:cut]]
    if kind == "huge":  # claims a shape it cannot back
        h = {"v": 1, "op": "forward", "session": "c" * 32, "id": 1,
             "tensors": [{"dtype": "float32", "shape": draw(st.lists(st.integers(2**20, 2**31 - 1), min_size=3, max_size=3))}]}
        return [json.dumps(h).encode(), b"\0" * 16]
    if kind == "pickle":
        evil = pickle.dumps({"op": "forward", "session": "d" * 32, "id": 1})
        return draw(st.sampled_from([[evil], [json.dumps({"v": 1, "op": "hello", "tensors": [{"dtype": "float32", "shape": [1]}]}).encode(), evil]]))
    if kind == "nan":
        t = torch.full((1, 2, D), float("nan"))
        return encode({"op": "forward", "session": "e" * 32, "id": 1}, [t])
    return [b"[" * 100_000 + b"]" * 100_000]  # deep nesting, over the header limit


def test_fuzz_server_survives_and_stays_bounded(llama, serve, monkeypatch):
    def no_unpickling(*args, **kwargs):
        raise AssertionError("something unpickled bytes from the wire")
    monkeypatch.setattr(pickle, "loads", no_unpickling)
    monkeypatch.setattr(pickle, "load", no_unpickling)
    address = serve(llama, CUTS, max_sessions=16, states_total=8)
    server = serve.servers[-1]
    rss_before = psutil.Process().memory_info().rss
    sock = raw_socket(address)
    count = 0

    @settings(max_examples=1200, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(malformed())
    def send(frames):
        nonlocal count
        reply = ask(sock, frames)
        count += 1
        assert isinstance(reply, dict) and "ok" in reply
        if not reply["ok"]:
            assert reply["error"] and reply["code"] in {"bad_request", "unknown_session", "mismatch", "stale",
                                                        "state_missing", "busy"}, reply

    send()
    assert count >= 1000
    assert server.counters["errors"] >= 900 and "internal" not in json.dumps(server.counters)
    # still serving, correctly
    with TrunkClient(address, timeout=5) as client:
        hello(client, llama)
        h1 = torch.randn(2, 5, D)
        with torch.no_grad():
            want = split_model(llama, CUTS).trunk(h1)
        assert torch.allclose(client.compute(h1), want, atol=1e-6)
    assert server.stats()["states"] <= 8 and len(server.sessions) <= 16
    assert psutil.Process().memory_info().rss - rss_before < 300 << 20
    sock.close()


def test_forwards_without_backward_cannot_grow_memory(llama, serve):
    address = serve(llama, CUTS, states_per_session=3, states_total=5)
    server = serve.servers[-1]
    clients = [TrunkClient(address, timeout=5) for _ in range(3)]
    for c in clients:
        hello(c, llama)
        for _ in range(10):
            c.forward(torch.randn(1, 4, D), c.new_key())
    assert all(len(s.states) <= 3 for s in server.sessions.values())
    assert server.stats()["states"] <= 5
    for c in clients:
        c.close()


def test_idle_sessions_and_old_states_are_cleaned_up(llama, serve):
    address = serve(llama, CUTS, session_idle=0.3, state_max_age=0.2)
    server = serve.servers[-1]
    client = TrunkClient(address, timeout=5)
    hello(client, llama)
    client.forward(torch.randn(1, 4, D), client.new_key())
    assert server.stats()["states"] == 1
    time.sleep(0.5)  # the server's loop sweeps every 100 ms
    assert server.stats()["states"] == 0 and server.stats()["sessions"] == 0
    client._close_socket()


def test_oversized_batch_and_wrong_hidden_size_are_refused(llama, serve):
    address = serve(llama, CUTS, max_tokens=32)
    with TrunkClient(address, timeout=5) as client:
        hello(client, llama)
        with pytest.raises(TrunkError, match="over this server's limit of 32"):
            client.compute(torch.zeros(4, 9, D))
        with pytest.raises(TrunkError, match=r"must be \(B, T, 64\)"):
            client.compute(torch.zeros(1, 3, 65))


def test_handshake_refuses_a_client_that_does_not_fit(llama, serve):
    address = serve(llama, CUTS)
    client = TrunkClient(address, timeout=5)
    with pytest.raises(TrunkError, match=r"runs blocks \[2, 4\) of tiny-llama.*cuts=\[3, 4\]") as e:
        client.hello("tiny-llama", (3, 4), D)
    assert e.value.code == "mismatch"
    with pytest.raises(TrunkError, match="hidden_size=576"):
        client.hello("tiny-llama", CUTS, 576)
    client.close()


# ---------------------------------------------------------------- clients never hang

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_no_server_raises_a_clear_error_within_the_timeout():
    client = TrunkClient(f"tcp://127.0.0.1:{free_port()}", timeout=0.3, retries=2)
    start = time.monotonic()
    with pytest.raises(TrunkUnavailable, match=r"no answer from the trunk server at tcp://127\.0\.0\.1:\d+.*3 tries"):
        client.stats()
    assert time.monotonic() - start < 0.3 * 3 + 0.5
    client.close()


def start_server_process(port: int, *extra) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, str(ROOT / "trunk_server.py"), "--model", "tiny-llama",
                             "--cuts", *map(str, CUTS), "--bind", f"tcp://127.0.0.1:{port}", "--log-level", "WARNING",
                             *extra], cwd=ROOT)
    probe = TrunkClient(f"tcp://127.0.0.1:{port}", timeout=0.5, retries=0)
    deadline = time.monotonic() + 60
    while True:
        try:
            probe.stats()
            probe.close()
            return proc
        except TrunkUnavailable:
            assert proc.poll() is None, "trunk_server.py exited"
            assert time.monotonic() < deadline, "trunk_server.py did not answer within 60 s"


@pytest.mark.parametrize("mode", ["full", "full+trunk"])
def test_server_killed_mid_training_then_restarted(llama, mode):
    port = free_port()
    proc = start_server_process(port)
    timeout, retries = 1.0, 1
    learner = make_learner(llama, mode, CUTS, f"tcp://127.0.0.1:{port}", lr=1e-2, timeout=timeout, retries=retries)
    losses = []
    try:
        for step in range(8):
            if step == 3:
                proc.kill()
                proc.wait()
                start = time.monotonic()
                with pytest.raises(TrunkUnavailable, match=f"tcp://127.0.0.1:{port}"):
                    train_step(learner, random_batch(259, seed=step))
                assert time.monotonic() - start < timeout * (retries + 1) + 1.0
                proc = start_server_process(port)
            losses.append(train_step(learner, random_batch(259, seed=step)))
    finally:
        proc.kill()
        proc.wait()
    assert len(losses) == 8 and all(torch.isfinite(torch.tensor(losses)))
    assert learner.client.reopened == 1
    learner.close()


def test_simulated_crash_stops_the_thread(llama, serve):
    address = serve(llama, CUTS, faults=Faults(crash_after=2))
    client = TrunkClient(address, timeout=0.5, retries=0)
    hello(client, llama)
    client.compute(torch.zeros(1, 2, D))
    with pytest.raises(TrunkUnavailable):
        client.compute(torch.zeros(1, 2, D))
    client.close()


def test_faults_parse():
    assert Faults.parse("drop=0.1,delay=0.5,delay_s=2,crash-after=50") == Faults(drop=0.1, delay=0.5, delay_s=2.0, crash_after=50)
    with pytest.raises(ValueError, match="unknown fault 'explode'"):
        Faults.parse("explode=1")


# ---------------------------------------------------------------- retries apply once

def test_repeated_backward_and_step_are_applied_once(llama, serve, spec):
    address = serve(llama, CUTS)
    server = serve.servers[-1]
    client = TrunkClient(address, timeout=5)
    hello(client, llama, mode="full+trunk", lora=spec, lr=1e-2)
    adapter = f"s{client.session}"
    h1, g2 = torch.randn(2, 5, D), torch.randn(2, 5, D)
    client.forward(h1, key=7)
    # the same backward request twice, from two sockets, as a Lazy Pirate retry after a reconnect sends it
    backward = encode({"op": "backward", "session": client.session, "id": next(client._ids), "key": 7}, [g2])
    first = raw_socket(address)
    second = raw_socket(address)
    assert ask(first, backward)["ok"]
    grads_once = lora_grads(server.peft, adapter)
    assert ask(second, backward)["ok"]
    assert all(torch.equal(grads_once[k], g) for k, g in lora_grads(server.peft, adapter).items())
    before = {k: t.clone() for k, t in client.trunk_lora().items()}
    step = encode({"op": "step", "session": client.session, "id": next(client._ids)})
    assert ask(first, step)["steps"] == 1
    assert ask(second, step)["steps"] == 1  # the stored reply, not a second step
    after_one = client.trunk_lora()
    assert server.sessions[client.session].steps == 1
    # a request older than the newest is refused, never run
    stale = ask(first, encode({"op": "step", "session": client.session, "id": 1}))
    assert stale["code"] == "stale"
    assert all(torch.equal(after_one[k], t) for k, t in client.trunk_lora().items())
    assert any(not torch.equal(before[k], after_one[k]) for k in before)
    first.close(), second.close(), client.close()


def test_lost_and_late_replies_change_nothing(llama, serve, spec):
    """With a third of the replies dropped, the client's retries give the same training as a clean run."""
    clean = make_learner(llama, "full+trunk", CUTS, serve(llama, CUTS), lora=spec, lr=1e-2)
    lossy = make_learner(llama, "full+trunk", CUTS, serve(llama, CUTS, faults=Faults(drop=0.3, delay=0.2, delay_s=0.05, seed=1)),
                         lora=spec, lr=1e-2, timeout=0.3, retries=8)
    for seed in range(4):
        batch = random_batch(259, seed=seed)
        assert train_step(clean, batch) == train_step(lossy, batch)
    assert serve.servers[-1].counters["dropped"] > 0
    assert clean.delta_norms() == lossy.delta_norms()
    clean.close(), lossy.close()


# ---------------------------------------------------------------- many clients

def test_eight_concurrent_clients_get_their_own_gradients(llama, serve, spec):
    address = serve(llama, CUTS)
    batches = [random_batch(259, seed=i) for i in range(8)]

    def grads(batch):
        learner = make_learner(llama, "full+trunk", CUTS, address, lora=spec, lr=1e-2)
        zero_grad(learner)
        forward_backward(learner, batch)
        out = {**lora_grads(learner.bottom), **lora_grads(learner.top)}
        out.update({f"trunk.{k}": v for k, v in lora_grads(serve.servers[-1].peft, f"s{learner.client.session}").items()})
        learner.client.step()
        learner.close()
        return out

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
    for a, b in zip(alone, together):
        assert b is not None and a.keys() == b.keys()
        assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7) for k in a)


# ---------------------------------------------------------------- keys

def test_curve_keys_let_in_only_the_key_holder(llama, tmp_path, serve):
    keys = make_keys(tmp_path / "keys")
    address = serve(llama, CUTS, curve_dir=keys)
    with TrunkClient(address, timeout=5, curve_dir=keys) as good:
        hello(good, llama)
        assert good.compute(torch.zeros(1, 2, D)).shape == (1, 2, D)
    stranger = TrunkClient(address, timeout=0.5, retries=0)
    with pytest.raises(TrunkUnavailable):
        stranger.stats()
    other = make_keys(tmp_path / "other")  # a key pair the server never authorized
    (other / "server.key").write_bytes((keys / "server.key").read_bytes())
    impostor = TrunkClient(address, timeout=0.5, retries=0, curve_dir=other)
    with pytest.raises(TrunkUnavailable):
        impostor.stats()
    stranger.close(), impostor.close()


def test_public_bind_needs_keys_or_insecure(llama, caplog):
    with pytest.raises(ValueError, match=r"refusing to bind tcp://0\.0\.0\.0:\d+.*--curve-dir.*--insecure"):
        TrunkServer(llama, CUTS, bind=f"tcp://0.0.0.0:{free_port()}")
    from trunk_server import main
    assert main(["--model", "tiny-llama", "--cuts", "2", "4", "--bind", "tcp://10.1.2.3:5555"]) == 2
    assert "refusing to bind tcp://10.1.2.3:5555" in caplog.text
    server = TrunkServer(llama, CUTS, bind="tcp://0.0.0.0:*", insecure=True)  # allowed, with a warning
    assert "WITHOUT encryption" in caplog.text
    del server


@pytest.mark.parametrize("damage, message", [("nan", "contains NaN or infinity"), ("shape", "has shape")])
def test_a_bad_trunk_lora_sent_with_hello_is_refused_and_says_why(llama, spec, damage, message):
    server = TrunkServer(llama, CUTS, bind="tcp://127.0.0.1:*")
    hello = {"op": "hello", "session": "a" * 32, "id": 0, "model": "tiny-llama", "cuts": list(CUTS),
             "hidden_size": llama.config.hidden_size, "mode": "full+trunk", "lora": spec.to_json(), "lr": 1e-3}
    assert json.loads(server.handle(encode(hello))[0])["ok"]
    names, tensors = zip(*((n, p.detach().clone()) for n, p in server._lora_params(f"s{'a' * 32}")))
    tensors = list(tensors)
    tensors[1] = tensors[1][:, :-1] if damage == "shape" else tensors[1].fill_(float("nan"))
    reply = json.loads(server.handle(encode(dict(hello, session="b" * 32, names=list(names)), tensors))[0])
    assert not reply["ok"] and message in reply["error"] and "b" * 32 not in server.sessions
