"""One-token generation steps of different sessions served as one batch (splitkit.trunk.batching): each student's
h2 equals what they get served alone within float rounding (relative 1e-5), their greedy tokens are the same, and a
bad request among them gets its own error while the others are answered. On the tiny Llama, over real sockets."""

import threading
import time

import pytest
import torch

from splitkit import Learner, LoraSpec, TrunkClient, TrunkServer
from splitkit.core.split import split_model
from splitkit.training.generation import generate_ids
from splitkit.training.testing import max_rel_diff, random_batch, rel_diff
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


# ---------------------------------------------------------------- training: forwards and backwards of many sessions

SPEC = LoraSpec(r=4, lora_alpha=8, init_b=0.02, seed=0)


def training_sessions(model, server, modes: list[str], starts: dict | None = None) -> dict:
    """Sessions opened on `server` (its handle() called directly), one per mode; each full+trunk one's Trunk LoRA
    set to `starts[sid]` if given, else drawn by the server. {sid: mode}."""
    opened = {}
    for i, mode in enumerate(modes):
        sid = f"{i:032x}"
        hello = {"op": P.HELLO, "session": sid, "id": 0, "model": "tiny-llama", "cuts": list(CUTS),
                 "hidden_size": model.config.hidden_size, "fingerprint": server.fingerprint, "mode": mode}
        if mode == P.FULL_TRUNK:
            hello.update(lora=SPEC.to_json(), lr=1e-2)
        assert codec.decode(server.handle(encode(hello)))[0]["ok"]
        if starts is not None and sid in starts:
            server.sessions.load(server.sessions.get(sid), *starts[sid])
        opened[sid] = mode
    return opened


def requests(model, sessions: dict, op: str, rid: int) -> list:
    """Each session's forward (kept, key 7) or backward of it: rows and lengths of its own, the last one padded."""
    out = []
    for i, sid in enumerate(sessions):
        rows, length = 1 + i % 2, 3 + 2 * i
        g = torch.Generator().manual_seed(10 * i + (op == P.BACKWARD))
        x = torch.randn(rows, length, model.config.hidden_size, generator=g)
        header = {"op": op, "session": sid, "id": rid, "key": 7}
        if op == P.FORWARD and i == len(sessions) - 1:
            header["pad"] = [0, 2][:rows]
        out.append((header, x))
    return out


def test_forwards_and_backwards_of_a_class_run_together_give_each_student_what_they_get_alone(llama):
    modes = [P.FULL, P.FULL_TRUNK, P.FULL, P.FULL_TRUNK, P.FULL_TRUNK]
    batched = BatchingServer(llama, CUTS, bind="tcp://127.0.0.1:*")
    sessions = training_sessions(llama, batched, modes)  # each full+trunk Trunk LoRA from a secret seed of its own
    starts = {sid: batched.sessions.lora_state(batched.sessions.get(sid)) for sid, m in sessions.items()
              if m == P.FULL_TRUNK}
    alone = TrunkServer(llama, CUTS, bind="tcp://127.0.0.1:*")
    training_sessions(llama, alone, modes, starts)
    endpoint = Recording()
    for op, rid in ((P.FORWARD, 1), (P.BACKWARD, 2)):
        sent = requests(llama, sessions, op, rid)
        want = {h["session"]: codec.decode(alone.handle(encode(h, [x]))) for h, x in sent}
        serve_waiting(batched, endpoint, [([h["session"].encode()], encode(h, [x])) for h, x in sent])
        for sid in sessions:
            (reply, got), (reply_alone, expected) = codec.decode(endpoint.sent[sid.encode()]), want[sid]
            assert reply["ok"] and reply_alone["ok"] and got[0].shape == expected[0].shape
            assert rel_diff(got[0], expected[0]) <= TOLERANCE, (op, sid, rel_diff(got[0], expected[0]))
    assert batched.joined == {"forwards": 1, "backwards": 1} and batched.counters["batched"] == 2 * len(modes)
    for sid, mode in sessions.items():
        assert not batched.sessions.get(sid).states  # each state served its one backward
        if mode == P.FULL_TRUNK:  # each student's Trunk LoRA gradient is their own
            got, want = batched.sessions.lora_grads(sid), alone.sessions.lora_grads(sid)
            assert got.keys() == want.keys() and all(g is not None for g in got.values())
            assert max(rel_diff(got[n], want[n]) for n in want) <= TOLERANCE
            others = [s for s, m in sessions.items() if m == P.FULL_TRUNK and s != sid]
            assert max(rel_diff(got[n], batched.sessions.lora_grads(others[0])[n]) for n in want) > 0.1


def test_a_bad_forward_among_those_waiting_gets_its_error_and_the_others_their_states(llama):
    modes = [P.FULL, P.FULL_TRUNK, P.FULL]
    batched = BatchingServer(llama, CUTS, bind="tcp://127.0.0.1:*", lora_seed=2)
    sessions = training_sessions(llama, batched, modes)
    alone = TrunkServer(llama, CUTS, bind="tcp://127.0.0.1:*", lora_seed=2)
    training_sessions(llama, alone, modes)
    sent = requests(llama, sessions, P.FORWARD, 1)
    sent[1] = (sent[1][0], torch.full_like(sent[1][1], float("inf")))  # student 1 sends inf
    want = {h["session"]: codec.decode(alone.handle(encode(h, [x]))) for h, x in sent}
    endpoint = Recording()
    serve_waiting(batched, endpoint, [([h["session"].encode()], encode(h, [x])) for h, x in sent])
    got = {sid: codec.decode(endpoint.sent[sid.encode()]) for sid in sessions}
    assert batched.counters["batches"] == 1 and batched.counters["batched"] == 2
    for i, sid in enumerate(sessions):
        (reply, tensors), (reply_alone, tensors_alone) = got[sid], want[sid]
        if i == 1:  # the error it gets alone, and nothing kept
            assert not reply["ok"] and reply == reply_alone and reply["code"] == P.BAD_REQUEST
            assert not batched.sessions.get(sid).states
        else:
            assert reply["ok"] and 7 in batched.sessions.get(sid).states
            assert rel_diff(tensors[0], tensors_alone[0]) <= TOLERANCE


def test_a_backward_that_comes_after_a_classmate_stepped_their_trunk_lora_is_still_right(llama):
    """A joined forward of a full+trunk and a full session; the full+trunk one's backward comes alone, then its
    step changes its Trunk LoRA in place; then the full one's backward. Each is what it gets alone."""
    modes = [P.FULL_TRUNK, P.FULL, P.FULL_TRUNK]
    batched = BatchingServer(llama, CUTS, bind="tcp://127.0.0.1:*", lora_seed=3)
    sessions = list(training_sessions(llama, batched, modes))
    alone = TrunkServer(llama, CUTS, bind="tcp://127.0.0.1:*", lora_seed=3)
    training_sessions(llama, alone, modes)
    endpoint = Recording()
    forwards = requests(llama, dict.fromkeys(sessions), P.FORWARD, 1)
    serve_waiting(batched, endpoint, [([h["session"].encode()], encode(h, [x])) for h, x in forwards])
    for h, x in forwards:
        alone.handle(encode(h, [x]))
    assert batched.joined["forwards"] == 1
    backwards = requests(llama, dict.fromkeys(sessions), P.BACKWARD, 2)
    step = {"op": P.STEP, "session": sessions[0], "id": 3}
    (h0, g0), (h1, g1), (h2, g2) = backwards
    order = [encode(h0, [g0]), encode(step), encode(h1, [g1]), encode(h2, [g2])]
    for frames in order:  # one at a time, as they come: the first backward alone, a step, then the others
        got, want = codec.decode(batched.handle(frames)), codec.decode(alone.handle(frames))
        assert got[0]["ok"] and want[0]["ok"], got[0]
        assert all(rel_diff(g, w) <= TOLERANCE for g, w in zip(got[1], want[1], strict=True))
    got, want = batched.sessions.lora_grads(sessions[2]), alone.sessions.lora_grads(sessions[2])
    assert all(g is not None for g in got.values()) and max_rel_diff(got, want) <= TOLERANCE



def test_a_class_training_together_over_sockets_ends_where_each_student_ends_alone(llama, serve):
    """Four students train 3 steps each at once (full and full+trunk) through a batching server; each one's
    losses and LoRA (client's and Trunk's) match the same student trained alone, within float rounding."""
    modes, steps = [P.FULL, P.FULL_TRUNK, P.FULL, P.FULL_TRUNK], 3
    spec = LoraSpec(r=4, lora_alpha=8, init_b=0.02, seed=1)
    batches = [random_batch(llama.config.vocab_size, batch=1 + i % 2, seq=6 + i, seed=i) for i in range(len(modes))]

    def student(address, i, barrier=None) -> tuple[list, dict]:
        with Learner(llama, mode=modes[i], cuts=CUTS, address=address, lora=spec, lr=1e-2) as learner:
            losses = []
            for _ in range(steps):
                if barrier is not None:
                    barrier.wait()  # every student's step sent at about the same time: they wait together
                losses.append(learner.step(batches[i]))
            return losses, learner.lora_state()

    alone = [student(serve(llama, CUTS, lora_seed=5), i) for i in range(len(modes))]
    batched = BatchingServer(llama, CUTS, bind="tcp://127.0.0.1:*", window_ms=50, lora_seed=5)
    address, together, barrier = batched.start(), [None] * len(modes), threading.Barrier(len(modes))
    threads = [threading.Thread(target=lambda i=i: together.__setitem__(i, student(address, i, barrier)))
               for i in range(len(modes))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    batched.stop()
    assert min(batched.joined[kind] for kind in ("forwards", "backwards")) >= steps // 2  # both kinds joined
    for (losses, lora), (losses_alone, lora_alone) in zip(together, alone, strict=True):
        assert losses == pytest.approx(losses_alone, rel=1e-5)
        assert lora.keys() == lora_alone.keys() and max_rel_diff(lora, lora_alone) <= 1e-4


def test_the_server_waits_for_students_who_keep_a_pace_and_not_for_one_who_stopped(llama):
    """Sessions.active: a session is waited for while its next request is due (its last came within twice its pace,
    the longest of its last three gaps), so a student who stopped costs the others no window."""
    server = BatchingServer(llama, CUTS, bind="tcp://127.0.0.1:*")
    steady, stopped = training_sessions(llama, server, [P.FULL, P.FULL])

    def release(sid, rid):  # a cheap request of that session
        assert codec.decode(server.handle(encode({"op": P.RELEASE, "session": sid, "id": rid, "gen": 0})))[0]["ok"]

    assert server.sessions.active() == 0  # a hello alone sets no pace
    for rid in range(1, 4):
        release(steady, rid)
        release(stopped, rid)
        time.sleep(0.02)
    assert server.sessions.active() == 2  # both keep a pace of about 20 ms
    time.sleep(0.2)  # ten times the pace without a request: neither is due
    assert server.sessions.active() == 0
    release(steady, 4)
    assert server.sessions.active() == 1  # the one that came back, at its new pace of about 0.2 s


def test_joined_forwards_stay_within_the_token_limit_and_a_retry_is_answered_from_its_kept_reply(llama):
    """Forwards of 1x3, 2x5 and 1x7 positions: joined, every row as long as the longest. Within max_tokens = 16 the
    first two join (3 rows x 5 = 15), the third would make 4 x 7 = 28 and is served alone; a forward sent again
    gets the reply it got, and is not run twice (its state is the same)."""
    batched = BatchingServer(llama, CUTS, bind="tcp://127.0.0.1:*", limits=Limits(max_tokens=16))
    sessions = training_sessions(llama, batched, [P.FULL, P.FULL, P.FULL])
    sent = requests(llama, sessions, P.FORWARD, 1)
    sent[2] = ({k: v for k, v in sent[2][0].items() if k != "pad"}, sent[2][1][:1])  # 1 x 7, no padding
    endpoint = Recording()
    messages = [([h["session"].encode()], encode(h, [x])) for h, x in sent]
    serve_waiting(batched, endpoint, messages)
    assert batched.joined == {"forwards": 1} and batched.counters["batched"] == 2
    assert all(codec.decode(endpoint.sent[sid.encode()])[0]["ok"] for sid in sessions)
    first, state = endpoint.sent[b"0" * 32], batched.sessions.get("0" * 32).states[7]
    serve_waiting(batched, endpoint, messages[:2])  # the same two again: retries
    assert batched.joined == {"forwards": 1} and endpoint.sent[b"0" * 32] is first
    assert batched.sessions.get("0" * 32).states[7] is state
