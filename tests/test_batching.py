"""One-token generation steps of different sessions served as one batch (splitkit.trunk.batching): each student's
h2 equals what they get served alone within float rounding (relative 1e-5), their greedy tokens are the same, and a
bad request among them gets its own error while the others are answered. On the tiny Llama, over real sockets."""

import threading

import torch

from splitkit import Learner, LoraSpec, TrunkClient, TrunkServer
from splitkit.core.split import split_model
from splitkit.training.generation import generate_ids
from splitkit.training.testing import rel_diff
from splitkit.trunk.batching import BatchingServer, serve_waiting
from splitkit.trunk.state import Limits
from splitkit.wire import codec, encode
from splitkit.wire import protocol as P

CUTS = (2, 4)
STUDENTS, STEPS = 6, 8
TOLERANCE = 1e-5  # relative, per h2: the batch's attention runs over longer (masked) rows and more of them


def prompts(model, i: int) -> torch.Tensor:  # (B, T): student i's prompt, a length of its own
    g = torch.Generator().manual_seed(i)
    return torch.randint(3, model.config.vocab_size, (1 + i % 2, 3 + 2 * i), generator=g)


def one_student(model, address: str, i: int, barrier=None) -> list:
    """Student i's h2 for a prompt and STEPS one-token steps (random h1 of its own), through a raw TrunkClient."""
    bottom = split_model(model, CUTS).bottom
    ids = prompts(model, i)
    g = torch.Generator().manual_seed(100 + i)
    with TrunkClient(address, timeout=30) as c, torch.no_grad():
        c.hello(model, CUTS, mode=P.FULL)
        gen = c.new_generation()
        out = [c.infer(bottom(ids), gen, 0, pad=[0] * len(ids))]
        for t in range(STEPS):
            if barrier is not None:
                barrier.wait()  # every student's step sent at about the same time: they wait together
            out.append(c.infer(torch.randn(len(ids), 1, model.config.hidden_size, generator=g), gen, ids.shape[1] + t))
    return out


def test_batched_steps_give_each_student_what_they_get_alone(llama):
    alone_server = TrunkServer(llama, CUTS, bind="tcp://127.0.0.1:*")
    batched_server = BatchingServer(llama, CUTS, bind="tcp://127.0.0.1:*", window_ms=20)
    try:
        alone_address = alone_server.start()
        alone = [one_student(llama, alone_address, i) for i in range(STUDENTS)]
        address, together = batched_server.start(), [None] * STUDENTS
        barrier = threading.Barrier(STUDENTS)

        def student(i):
            together[i] = one_student(llama, address, i, barrier)

        threads = [threading.Thread(target=student, args=(i,)) for i in range(STUDENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        alone_server.stop()
        batched_server.stop()
    counters = batched_server.counters
    assert counters["batches"] >= STEPS // 2 and counters["batched"] >= 2 * counters["batches"]  # they did batch
    worst = max(rel_diff(b, a) for i in range(STUDENTS) for a, b in zip(alone[i], together[i], strict=True))
    assert worst <= TOLERANCE, f"largest relative difference {worst:.1e}"


def test_batched_generation_makes_the_greedy_tokens_of_generation_alone(tiny, serve):
    model, _ = tiny
    cuts = (1, model.config.num_hidden_layers - 1)
    spec = LoraSpec(r=4, lora_alpha=8, init_b=0.02, seed=3)
    alone_address = serve(model, cuts)
    batched = BatchingServer(model, cuts, bind="tcp://127.0.0.1:*", window_ms=20)
    batched_address = batched.start()
    ids = [prompts(model, i) for i in range(4)]
    with Learner(model, mode="full", cuts=cuts, address=alone_address, lora=spec) as learner:
        want = [generate_ids(learner, x, max_new_tokens=10) for x in ids]
    got = [None] * len(ids)

    def student(i):
        with Learner(model, mode="full", cuts=cuts, address=batched_address, lora=spec) as learner:
            got[i] = generate_ids(learner, ids[i], max_new_tokens=10)

    threads = [threading.Thread(target=student, args=(i,)) for i in range(len(ids))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    batched.stop()
    assert batched.counters["batched"] > 0
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


class Recording:
    """An endpoint that keeps what is sent, for serve_waiting called directly."""

    def __init__(self):
        self.sent = {}

    def send(self, envelope, frames):
        self.sent[envelope[0]] = frames


def opened(model, sessions, **options) -> tuple[TrunkServer, list]:
    """A server (not serving: its handle() is called directly) with a generation begun in each session; the next
    one-token step of each, (header, h1)."""
    server = BatchingServer(model, CUTS, bind="tcp://127.0.0.1:*", **options)
    bottom, d = split_model(model, CUTS).bottom, model.config.hidden_size
    steps = []
    for i, sid in enumerate(sessions):
        hello = {"op": P.HELLO, "session": sid, "id": 0, "model": "tiny-llama", "cuts": list(CUTS),
                 "hidden_size": d, "fingerprint": server.fingerprint, "mode": P.FULL}
        assert codec.decode(server.handle(encode(hello)))[0]["ok"]
        with torch.no_grad():
            h1 = bottom(prompts(model, i)[:1])  # (1, T, d)
        first = {"op": P.INFER, "session": sid, "id": 1, "gen": 0, "start": 0, "pad": [0]}
        assert codec.decode(server.handle(encode(first, [h1])))[0]["ok"]
        x = torch.randn(1, 1, d, generator=torch.Generator().manual_seed(i))
        steps.append(({"op": P.INFER, "session": sid, "id": 2, "gen": 0, "start": h1.shape[1]}, x))
    return server, steps


def test_a_bad_request_in_a_batch_gets_its_error_and_the_others_their_answers(llama):
    sessions = [f"{i:032x}" for i in range(4)]
    alone, steps = opened(llama, sessions)
    batched, _ = opened(llama, sessions)
    header, x = steps[2]
    steps[2] = (header, torch.full_like(x, float("nan")))  # student 2 sends NaN
    want = {h["session"]: codec.decode(alone.handle(encode(h, [x]))) for h, x in steps}
    endpoint = Recording()
    serve_waiting(batched, endpoint, [([h["session"].encode()], encode(h, [x])) for h, x in steps])
    got = {sid: codec.decode(endpoint.sent[sid.encode()]) for sid in sessions}
    assert batched.counters["batches"] == 1 and batched.counters["batched"] == 3
    for (header, _), sid in zip(steps, sessions, strict=True):
        (reply, tensors), (reply_alone, tensors_alone) = got[sid], want[sid]
        if sid == sessions[2]:  # the same error it gets alone, and its generation is gone, as alone
            assert not reply["ok"] and reply["code"] == P.BAD_REQUEST and "NaN" in reply["error"]
            assert reply == reply_alone and 0 not in batched.sessions.get(sid).generations
        else:
            assert reply["ok"] and rel_diff(tensors[0], tensors_alone[0]) <= TOLERANCE
            assert batched.sessions.get(sid).generations[0].length == header["start"] + 1
    # the same request again is a retry: answered from the kept reply, not run twice
    h, x = steps[0]
    assert codec.decode(batched.handle(encode(h, [x])))[1][0].equal(got[sessions[0]][1][0])
    assert batched.sessions.get(sessions[0]).generations[0].length == h["start"] + 1


def test_a_batch_joins_no_more_than_the_token_limit_and_the_rest_is_served_alone(llama):
    sessions = [f"{i:032x}" for i in range(4)]  # prompts of 3, 5, 7 and 9 positions
    server, steps = opened(llama, sessions, limits=Limits(max_tokens=25))
    endpoint = Recording()
    serve_waiting(server, endpoint, [([h["session"].encode()], encode(h, [x])) for h, x in steps])
    # joined, the first three hold 3 rows x (7 + 1) positions = 24 <= 25; with the fourth, 4 x 10 = 40: alone
    assert server.counters["batches"] == 1 and server.counters["batched"] == 3
    assert all(codec.decode(endpoint.sent[sid.encode()])[0]["ok"] for sid in sessions)
    assert [server.sessions.get(sid).generations[0].length for sid in sessions] == [h["start"] + 1 for h, _ in steps]
