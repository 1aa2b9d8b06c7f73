"""The wire format: round trips over a real socket, zero-copy decoding that is still safe, bad frames refused."""

import json

import numpy as np
import pytest
import torch
import zmq

from splitkit import wire


@pytest.fixture
def pair():
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    port = a.bind_to_random_port("tcp://127.0.0.1")
    b.connect(f"tcp://127.0.0.1:{port}")
    yield a, b
    ctx.destroy(linger=0)


@pytest.mark.parametrize("dtype", list(wire.DTYPES))
@pytest.mark.parametrize("shape", [(1,), (2, 3, 5), (8, 64, 576)])
def test_round_trip_over_a_socket(pair, dtype, shape):
    a, b = pair
    t = torch.randn(shape).to(wire.DTYPES[dtype])
    a.send_multipart(wire.encode({"op": "forward", "id": 7}, [t, t * 2]), copy=False)
    header, (x, y) = wire.decode(b.recv_multipart(copy=False))
    assert header["op"] == "forward" and header["id"] == 7 and header["v"] == wire.PROTOCOL
    assert x.dtype == t.dtype and torch.equal(x, t) and torch.equal(y, t * 2)


def test_received_tensors_are_writable_and_own_their_bytes(pair):
    a, b = pair
    t = torch.arange(4 * 64 * 576, dtype=torch.float32).reshape(4, 64, 576)
    a.send_multipart(wire.encode({}, [t]), copy=False)
    _, (x,) = wire.decode(b.recv_multipart(copy=False))
    x += 1  # no warning, no error: the frame's memory is writable and the tensor keeps it alive
    assert torch.equal(x, t + 1)
    _, (y,) = wire.decode([json.dumps({"v": wire.PROTOCOL, "tensors": [{"dtype": "float32", "shape": [3]}]}).encode(),
                           np.arange(3, dtype=np.float32).tobytes()])  # read-only bytes: copied
    y[0] = 5
    assert y.tolist() == [5, 1, 2]


def test_a_misaligned_frame_is_copied_not_misread():
    raw = bytearray(4 * 6 + 1)
    view = memoryview(raw)[1:]  # one byte off: no float32 can start there
    view[:] = np.arange(6, dtype=np.float32).tobytes()
    header = json.dumps({"v": wire.PROTOCOL, "tensors": [{"dtype": "float32", "shape": [2, 3]}]}).encode()
    _, (t,) = wire.decode([header, view])
    assert t.data_ptr() % 4 == 0 and t.tolist() == [[0, 1, 2], [3, 4, 5]]


def test_encode_casts_to_the_wire_dtype():
    t = torch.randn(2, 3, 4)
    header, _ = wire.decode(wire.encode({}, [t], dtype="bfloat16"))
    assert header["tensors"] == [{"dtype": "bfloat16", "shape": [2, 3, 4]}]
    with pytest.raises(wire.WireError, match="cannot go on the wire"):
        wire.encode({}, [torch.ones(2, dtype=torch.int64)])


@pytest.mark.parametrize("dtype", list(wire.DTYPES.values()))
def test_all_finite(dtype):
    t = torch.randn(4, 5, 6).to(dtype) * 100
    assert wire.all_finite(t) and wire.all_finite(t.transpose(0, 2))
    big = t.clone()
    big[0, 0, :2] = torch.tensor([torch.finfo(dtype).max, -torch.finfo(dtype).max])
    assert wire.all_finite(big)
    for bad in (float("nan"), float("inf"), float("-inf")):
        u = t.clone()
        u[3, 4, 5] = bad
        assert not wire.all_finite(u), (dtype, bad)


def _header(**fields) -> bytes:
    return json.dumps({"v": wire.PROTOCOL, **fields}).encode()


@pytest.mark.parametrize("frames, message", [
    ([], "empty message"),
    ([b"\xff\xfe"], "not UTF-8 JSON"),
    ([b"[1, 2]"], "must be a JSON object"),
    ([b'{"v": 1, "x": NaN}'], "not UTF-8 JSON"),
    ([json.dumps({"v": wire.PROTOCOL + 1}).encode()], f"protocol version {wire.PROTOCOL + 1}"),
    ([b"{" * (wire.MAX_HEADER_BYTES + 1)], "limit"),
    ([_header(tensors=[{"dtype": "float32", "shape": [2]}])], "1 tensor\\(s\\) but 0"),
    ([_header(tensors=[{"dtype": "int64", "shape": [2]}]), b"\0" * 16], "dtype must be one of"),
    ([_header(tensors=[{"dtype": "float32", "shape": [-2]}]), b"\0" * 8], "positive integers"),
    ([_header(tensors=[{"dtype": "float32", "shape": [1, 1, 1, 1, 1]}]), b"\0" * 4], "positive integers"),
    ([_header(tensors=[{"dtype": "float32", "shape": [3]}]), b"\0" * 8], "needs 12 bytes, the frame has 8"),
    ([_header(tensors=[{}] * (wire.MAX_TENSORS + 1))], f"at most {wire.MAX_TENSORS}"),
])
def test_bad_messages_say_what_is_wrong(frames, message):
    with pytest.raises(wire.WireError, match=message):
        wire.decode(frames)


def test_blockwise8_keeps_each_value_within_half_a_step_of_its_block(pair):
    a, b = pair
    t = torch.randn(3, 7, 50) * torch.logspace(-3, 3, 50)  # neighbouring blocks of very different sizes
    frames = wire.encode({"op": "forward"}, [t], dtype=wire.BLOCKWISE8)
    a.send_multipart(frames, copy=False)
    header, (x,) = wire.decode(b.recv_multipart(copy=False))
    assert header["tensors"] == [{"dtype": "blockwise8", "shape": [3, 7, 50]}]
    assert x.dtype == torch.float32 and x.shape == t.shape
    n, blocks = t.numel(), -(-t.numel() // 64)
    assert wire.nbytes(frames[1:]) == 4 * blocks + n  # a float32 scale per 64 values, then a byte per value
    for j in range(blocks):  # each value within half a quantisation step (its block's absmax / 127) of the truth
        want, got = t.reshape(-1)[64 * j:64 * (j + 1)], x.reshape(-1)[64 * j:64 * (j + 1)]
        assert (got - want).abs().max() <= want.abs().max() / 127 / 2 * (1 + 1e-5)


def test_blockwise8_of_a_hidden_state_is_under_027_of_float32():
    t = torch.randn(8, 64, 576)
    sizes = {d: wire.nbytes(wire.encode({}, [t], dtype=d)[1:]) for d in ("float32", wire.BLOCKWISE8)}
    assert sizes[wire.BLOCKWISE8] / sizes["float32"] <= 0.27
    assert torch.equal(wire.decode(wire.encode({}, [torch.zeros(2, 3)], dtype=wire.BLOCKWISE8))[1][0],
                       torch.zeros(2, 3))  # a block of zeros has scale 0, and comes back as zeros


@pytest.mark.parametrize("scale, message", [(float("nan"), "NaN or infinite"), (-1.0, "negative")])
def test_a_bad_blockwise8_scale_is_refused(scale, message):
    frame = bytearray(wire.quantize_blockwise(torch.ones(70)).numpy().tobytes())
    frame[4:8] = np.float32(scale).tobytes()  # the second block's scale
    with pytest.raises(wire.WireError, match=message):
        wire.decode([_header(tensors=[{"dtype": "blockwise8", "shape": [70]}]), bytes(frame)])


def test_a_blockwise8_frame_of_the_wrong_length_says_what_it_needs():
    with pytest.raises(wire.WireError, match=r"needs 78 bytes \(2 float32 scales, 70 int8 values\), the frame has 77"):
        wire.decode([_header(tensors=[{"dtype": "blockwise8", "shape": [70]}]), b"\0" * 77])
