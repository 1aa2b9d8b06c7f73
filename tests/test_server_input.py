"""Bad input to the trunk server: every message gets a clear error reply, and the server goes on."""

import json
import pickle

import psutil
import pytest
import torch
from hypothesis import HealthCheck, given, settings

from splitkit import TrunkError, TrunkServer, load_model, wire
from splitkit.core.models import fingerprint
from splitkit.core.split import split_model
from splitkit.trunk.sessions import Limits
from splitkit.wire import encode
from splitkit.wire import protocol as P

from .strategies import OPEN, D, malformed

CUTS = (2, 4)


def hello(client, model, mode=P.FULL, **kw):
    return client.hello(model, CUTS, mode=mode, **kw)


def ask(sock, frames) -> dict:
    """Send frames as a REQ would (empty delimiter first) and return the reply header."""
    sock.send_multipart([b"", *frames])
    reply = sock.recv_multipart()  # raises zmq.Again after rcvtimeo instead of hanging
    assert reply[0] == b""
    return json.loads(reply[1])


def test_fuzz_server_survives_and_stays_bounded(llama, serve, client, raw_socket, monkeypatch):
    def no_unpickling(*args, **kwargs):
        raise AssertionError("something unpickled bytes from the wire")
    monkeypatch.setattr(pickle, "loads", no_unpickling)
    monkeypatch.setattr(pickle, "load", no_unpickling)
    address = serve(llama, CUTS, limits=Limits(max_sessions=16, states_total=8, generations_total=3))
    server = serve.servers[-1]
    rss_before = psutil.Process().memory_info().rss
    sock = raw_socket(address)
    opened = dict(op=P.HELLO, session=OPEN, id=0, model="tiny-llama", cuts=list(CUTS), mode=P.FULL,
                  hidden_size=D, fingerprint=fingerprint(llama, CUTS))
    assert ask(sock, encode(opened))["ok"]  # requests in this session reach infer and release
    count = answered = 0

    @settings(max_examples=1200, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(malformed())
    def send(frames):
        nonlocal count, answered
        reply = ask(sock, frames)
        count += 1
        answered += reply.get("ok") is True
        assert isinstance(reply, dict) and "ok" in reply and "id" in reply
        if not reply["ok"]:
            assert reply["error"] and reply["code"] in set(P.CODES) - {P.INTERNAL}, reply

    send()
    assert count >= 1000
    assert server.counters["errors"] >= 900 and answered >= 10  # some requests got through to infer and release
    assert server.stats()["states"] <= 8 and len(server.sessions) <= 16 and server.stats()["generations"] <= 3
    assert psutil.Process().memory_info().rss - rss_before < 300 << 20
    # still serving, correctly
    c = client(address, timeout=5)
    hello(c, llama)
    h1 = torch.randn(2, 5, D)
    with torch.no_grad():
        want = split_model(llama, CUTS).trunk(h1)
    assert torch.allclose(c.forward(h1), want, atol=1e-6)


def test_oversized_batch_is_refused(llama, serve, client):
    c = client(serve(llama, CUTS, limits=Limits(max_tokens=32)), timeout=5)
    hello(c, llama)
    with pytest.raises(TrunkError, match="over this server's limit of 32") as e:
        c.forward(torch.zeros(4, 9, D))
    assert e.value.code == P.BAD_REQUEST


def test_wrong_hidden_size_is_refused(llama, serve, client):
    c = client(serve(llama, CUTS), timeout=5)
    hello(c, llama)
    with pytest.raises(TrunkError, match=r"must be \(B, T, 64\)"):
        c.forward(torch.zeros(1, 3, 65))


def test_handshake_refuses_other_cuts(llama, serve, client):
    c = client(serve(llama, CUTS), timeout=5)
    with pytest.raises(TrunkError, match=r"runs blocks \[2, 4\).*cuts=\[3, 4\]") as e:
        c.hello(llama, (3, 4))
    assert e.value.code == P.MISMATCH


def test_handshake_refuses_another_architecture_and_says_so(llama, serve, client):
    gpt2, _ = load_model("tiny-gpt2")
    c = client(serve(llama, CUTS), timeout=5)
    with pytest.raises(TrunkError, match=r"'tiny-gpt2'\) is not this server's \('tiny-llama'\): their configs differ"):
        c.hello(gpt2, CUTS)


def test_handshake_refuses_the_same_architecture_with_other_weights(llama, serve, client):
    other, _ = load_model("tiny-llama", seed=1)  # same config, other random weights
    c = client(serve(llama, CUTS), timeout=5)
    with pytest.raises(TrunkError, match=r"this server's config but other weights in blocks \[2, 4\)") as e:
        c.hello(other, CUTS)
    assert e.value.code == P.MISMATCH


def test_handshake_knows_the_model_by_its_weights_not_its_name(llama, serve, client, tmp_path):
    llama.save_pretrained(tmp_path)
    load_model("tiny-llama")[1].save_pretrained(tmp_path)
    by_path, _ = load_model(str(tmp_path))  # another name, the same model
    assert by_path.config.name_or_path != llama.config.name_or_path
    assert client(serve(llama, CUTS), timeout=5).hello(by_path, CUTS)["ok"]


def test_hello_advertises_the_limits(llama, serve, client):
    c = client(serve(llama, CUTS, limits=Limits(max_tokens=100, states_per_session=2)), timeout=5)
    limits = hello(c, llama)["limits"]
    assert limits["max_tokens"] == 100 and limits["states_per_session"] == 2 and limits["max_sessions"] == 128


def test_the_handshake_refuses_a_wire_dtype_the_server_does_not_read(llama, serve, raw_socket):
    sock = raw_socket(serve(llama, CUTS))
    fields = dict(op=P.HELLO, session="f" * 32, model="tiny-llama", cuts=list(CUTS), mode=P.FULL, hidden_size=D,
                  fingerprint=fingerprint(llama, CUTS))
    refused = ask(sock, encode(dict(fields, id=0, wire_dtype="int4")))
    assert refused["code"] == P.BAD_REQUEST and "float32, float16, bfloat16, blockwise8" in refused["error"]
    agreed = ask(sock, encode(dict(fields, id=1, wire_dtype="blockwise8")))
    assert agreed["wire_dtype"] == "blockwise8" and agreed["wire_dtypes"] == list(wire.WIRE_DTYPES)


def test_detach_session_cannot_keep_a_forward_state(llama, serve, client):
    c = client(serve(llama, CUTS), timeout=5)
    hello(c, llama, mode=P.DETACH)
    with pytest.raises(TrunkError, match="detach mode"):
        c.forward(torch.zeros(1, 2, D), key=0)
    assert c.forward(torch.zeros(1, 2, D)).shape == (1, 2, D)


def test_an_error_reply_is_not_kept_so_a_corrected_request_may_reuse_its_id(llama, serve, client, raw_socket):
    address = serve(llama, CUTS)
    c = client(address, timeout=5)
    hello(c, llama)
    sock = raw_socket(address)
    request = {"op": P.FORWARD, "session": c.session, "id": 50}
    bad = ask(sock, encode(request, [torch.zeros(1, 2, D + 1)]))
    assert not bad["ok"] and bad["id"] == 50 and bad["code"] == P.BAD_REQUEST
    good = ask(sock, encode(request, [torch.zeros(1, 2, D)]))
    assert good["ok"] and good["id"] == 50 and good["tensors"] == [{"dtype": "float32", "shape": [1, 2, D]}]


def full_trunk_session(model, spec):
    """A server (not serving: its handle() is called directly) with session "a"*32 open in full+trunk; its hello,
    and the session's Trunk LoRA names and values."""
    server = TrunkServer(model, CUTS, bind="tcp://127.0.0.1:*")
    hello = {"op": P.HELLO, "session": "a" * 32, "id": 0, "model": "tiny-llama", "cuts": list(CUTS),
             "hidden_size": model.config.hidden_size, "fingerprint": fingerprint(model, CUTS), "mode": P.FULL_TRUNK,
             "lora": spec.to_json(), "lr": 1e-3}
    assert json.loads(server.handle(encode(hello))[0])["ok"]
    names, values = zip(*((n, p.detach().clone()) for n, p in server.sessions.lora_parameters(
        server.sessions.get("a" * 32))), strict=True)
    return server, hello, list(names), list(values)


@pytest.mark.parametrize("damage, message", [("nan", "contains NaN or infinity"), ("shape", "has shape")])
def test_a_bad_trunk_lora_sent_with_hello_is_refused_and_says_why(llama, spec, damage, message):
    server, hello, names, tensors = full_trunk_session(llama, spec)
    tensors[1] = tensors[1][:, :-1] if damage == "shape" else tensors[1].fill_(float("nan"))
    reply = json.loads(server.handle(encode(dict(hello, session="b" * 32, names=list(names)), tensors))[0])
    assert not reply["ok"] and message in reply["error"] and server.sessions.get("b" * 32) is None


@pytest.mark.parametrize("damage, message", [("nan", "contains NaN or infinity"), ("shape", "has shape"),
                                             ("name", "does not match")])
def test_a_bad_trunk_lora_sent_with_load_lora_is_refused_and_changes_nothing(llama, spec, damage, message):
    server, _, names, before = full_trunk_session(llama, spec)
    session = server.sessions.get("a" * 32)
    tensors = [t + 1 for t in before]
    if damage == "name":
        names[0] = "0.self_attn.q_proj.lora_A"  # a Bottom layer's name
    else:
        tensors[1] = tensors[1][:, :-1] if damage == "shape" else tensors[1].fill_(float("nan"))
    reply = json.loads(server.handle(encode({"op": P.LOAD_LORA, "session": "a" * 32, "id": 1, "names": names},
                                            tensors))[0])
    assert not reply["ok"] and reply["code"] == P.BAD_REQUEST and message in reply["error"]
    after = [p for _, p in server.sessions.lora_parameters(session)]
    assert all(torch.equal(a, b) for a, b in zip(after, before, strict=True))


def test_a_hello_may_not_change_an_open_session(llama, serve, client):
    c = client(serve(llama, CUTS), timeout=5)
    hello(c, llama, mode=P.DETACH)
    with pytest.raises(TrunkError, match="open in mode detach") as e:
        hello(c, llama, mode=P.FULL)
    assert e.value.code == P.BAD_REQUEST


def test_an_error_about_the_tensor_frames_still_names_the_request(llama, serve, raw_socket):
    sock = raw_socket(serve(llama, CUTS))
    frames = encode({"op": P.FORWARD, "session": "f" * 32, "id": 9}, [torch.zeros(1, 2, D)])
    reply = ask(sock, [frames[0], bytes(frames[1])[:-4]])
    assert reply["id"] == 9 and reply["code"] == P.BAD_REQUEST and "needs" in reply["error"]


def test_a_float_protocol_version_is_refused(llama, serve, raw_socket):
    reply = ask(raw_socket(serve(llama, CUTS)), [json.dumps({"v": float(P.VERSION), "op": P.STATS}).encode()])
    assert not reply["ok"] and "protocol version" in reply["error"]


def test_a_hello_that_sends_a_seed_is_refused_and_leaves_no_adapter(llama, spec):
    server = TrunkServer(llama, CUTS, bind="tcp://127.0.0.1:*")
    hello = {"op": P.HELLO, "session": "a" * 32, "id": 0, "model": "tiny-llama", "cuts": list(CUTS),
             "hidden_size": D, "fingerprint": fingerprint(llama, CUTS), "mode": P.FULL_TRUNK,
             "lora": dict(spec.to_json(), seed=0), "lr": 1e-3}
    reply = json.loads(server.handle(encode(hello))[0])
    assert not reply["ok"] and "send no seed" in reply["error"]
    assert server.sessions.peft is None and not any("lora_A" in n for n, _ in server.sessions.trunk.named_modules())
