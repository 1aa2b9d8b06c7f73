"""Hypothesis strategies for messages a trunk server must survive: random bytes, bad headers, lies."""

import itertools
import json
import pickle

import torch
from hypothesis import strategies as st

from splitkit import wire
from splitkit.wire import encode
from splitkit.wire import protocol as P

D = 64  # tiny-llama's hidden size

headers = st.fixed_dictionaries({}, optional={
    "v": st.one_of(st.just(P.VERSION), st.integers(), st.text(max_size=3)),
    "op": st.one_of(st.sampled_from([*P.OPS, "exec"]), st.text(max_size=10)),
    "session": st.one_of(st.text(max_size=70), st.just("a" * 32), st.integers()),
    "id": st.one_of(st.integers(min_value=-5, max_value=2**70), st.text(max_size=3), st.none()),
    "key": st.one_of(st.integers(min_value=-5, max_value=10), st.floats()),
    "mode": st.sampled_from([*P.MODES, "train", ""]),
    "model": st.sampled_from(["tiny-llama", "gpt-17"]),
    "cuts": st.one_of(st.just([2, 4]), st.lists(st.integers(-3, 9), max_size=3)),
    "hidden_size": st.sampled_from([D, 576, -1]),
    "fingerprint": st.one_of(st.none(), st.text(max_size=5),
                             st.dictionaries(st.sampled_from(["config", "trunk"]), st.text(max_size=16), max_size=2)),
    "lora": st.one_of(st.none(), st.dictionaries(st.sampled_from(["r", "lora_alpha", "target_modules", "seed"]),
                                                  st.one_of(st.integers(-2, 10**6), st.lists(st.text(max_size=5)))),
                      st.just({"r": 2, "lora_alpha": 4})),
    "lr": st.one_of(st.floats(allow_nan=True), st.integers()),
    "names": st.one_of(st.none(), st.lists(st.text(max_size=8), max_size=3)),
    "gen": st.one_of(st.integers(-3, 2**60), st.floats(), st.text(max_size=3)),
    "start": st.one_of(st.integers(-3, 2**40), st.none()),
    "pad": st.one_of(st.none(), st.lists(st.one_of(st.integers(-2, 50), st.text(max_size=2)), max_size=4)),
    "wire_dtype": st.sampled_from(["float32", "blockwise8", "int4", ""]),
    "tensors": st.one_of(
        st.lists(st.fixed_dictionaries({"dtype": st.sampled_from([*wire.WIRE_DTYPES, "int64", "object"]),
                                        "shape": st.lists(st.integers(-2, 2**40), max_size=5)}), max_size=3),
        st.text(max_size=5), st.integers()),
})


def _json_values():
    leaves = st.none() | st.booleans() | st.integers() | st.text(max_size=5)
    return st.recursive(leaves, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=3), c, max_size=3),
                        max_leaves=8)


OPEN = "a" * 32  # a session the fuzz test opens first, so that requests in it reach the ops
_ids = itertools.count(1)


@st.composite
def generation(draw):
    """An infer or release in the open session, with fields that are right, wrong or missing."""
    op = draw(st.sampled_from([P.INFER, P.INFER, P.RELEASE]))
    header = {"op": op, "session": OPEN, "id": next(_ids), "gen": draw(st.integers(0, 3)),
              **draw(st.fixed_dictionaries({}, optional={"start": st.one_of(st.just(0), st.integers(-1, 12)),
                                                          "pad": st.lists(st.integers(-1, 9), max_size=4)}))}
    shape = (draw(st.integers(1, 3)), draw(st.integers(1, 9)), draw(st.sampled_from([D, D, 5])))
    dtype = draw(st.sampled_from(["float32", "float16", "blockwise8"]))
    return encode(header, [torch.randn(shape)] if op == P.INFER else [], dtype=dtype)


@st.composite
def malformed(draw):
    """Frames of one message that is wrong in one of nine ways, or an infer or release that may be right."""
    kind = draw(st.sampled_from(["random", "json", "header", "lying", "huge", "pickle", "nan", "deep", "generation"]))
    if kind == "generation":
        return draw(generation())
    if kind == "random":
        return draw(st.lists(st.binary(max_size=64), min_size=0, max_size=5))
    if kind == "json":
        return [json.dumps(draw(_json_values())).encode()]
    if kind == "header":
        return [json.dumps(draw(headers)).encode(), *draw(st.lists(st.binary(max_size=256), max_size=3))]
    if kind == "lying":  # a valid-looking forward whose buffer does not match its shape
        t = torch.zeros(draw(st.integers(1, 4)), draw(st.integers(1, 8)), D)
        frames = encode({"op": P.FORWARD, "session": "b" * 32, "id": 1}, [t])
        cut = draw(st.integers(1, max(1, frames[1].nbytes - 1)))
        return [frames[0], bytes(frames[1])[:cut]]
    if kind == "huge":  # claims a shape it cannot back
        shape = draw(st.lists(st.integers(2**20, 2**31 - 1), min_size=3, max_size=3))
        h = {"v": P.VERSION, "op": P.FORWARD, "session": "c" * 32, "id": 1,
             "tensors": [{"dtype": "float32", "shape": shape}]}
        return [json.dumps(h).encode(), b"\0" * 16]
    if kind == "pickle":
        evil = pickle.dumps({"op": P.FORWARD, "session": "d" * 32, "id": 1})
        hello = {"v": P.VERSION, "op": P.HELLO, "tensors": [{"dtype": "float32", "shape": [1]}]}
        return draw(st.sampled_from([[evil], [json.dumps(hello).encode(), evil]]))
    if kind == "nan":
        return encode({"op": P.FORWARD, "session": "e" * 32, "id": 1}, [torch.full((1, 2, D), float("nan"))])
    return [b"[" * 150_000 + b"]" * 150_000]  # deep nesting, over the header limit
