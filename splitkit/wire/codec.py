"""The message format between a client and the trunk server: never pickle.

A message is one ZeroMQ multipart message (after the envelope the sockets add):
    Frame 0: header, UTF-8 JSON object {"v": 2, "op": ..., "tensors": [{"dtype", "shape"}, ...], ...}
    Frame 1..k: the raw bytes of each tensor named in the header, C order, little-endian
as in pyzmq's examples/serialization/serialsocket.py. "blockwise8" is 8-bit blockwise quantisation (as
hivemind's BLOCKWISE_8BIT and bitsandbytes' quantize_blockwise, with a linear code): a float32 scale per
block of BLOCK values, then one int8 per value; it arrives as float32. Everything a peer sends is checked
here before anything is built from it; a bad message raises WireError with the reason.
"""

import json
import math
import sys

import numpy as np
import torch

PROTOCOL = 2
MAX_HEADER_BYTES = 256 * 1024
MAX_TENSORS = 1024  # a Trunk LoRA on 30 blocks x 7 targets has 420 matrices
MAX_RANK = 4
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
BLOCKWISE8, BLOCK = "blockwise8", 64  # a scale per 64 values: 1 + 4/64 bytes a value, 0.27 of float32
WIRE_DTYPES = (*DTYPES, BLOCKWISE8)
_EXPONENT = {torch.float16: (torch.int16, 0x7C00), torch.bfloat16: (torch.int16, 0x7F80)}

assert sys.byteorder == "little", "the wire is little-endian and so is every host splitkit runs on"


class WireError(ValueError):
    """A message that breaks the format; the text says what was wrong."""


def encode(header: dict, tensors=(), dtype=None) -> list:
    """Frames for a header and tensors (cast to `dtype` first if given). Tensor frames are zero-copy."""
    header = dict(header, v=PROTOCOL)
    frames, specs = [], []
    for t in tensors:
        t = t.detach()
        if dtype == BLOCKWISE8:
            specs.append({"dtype": BLOCKWISE8, "shape": list(t.shape)})
            frames.append(quantize_blockwise(t).numpy())
            continue
        if dtype is not None:
            t = t.to(DTYPES[dtype] if isinstance(dtype, str) else dtype)
        t = t.contiguous().cpu()
        if t.dtype not in DTYPE_NAMES:
            raise WireError(f"dtype {t.dtype} cannot go on the wire; use one of {', '.join(DTYPES)}")
        specs.append({"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape)})
        frames.append(t.reshape(-1).view(torch.uint8).numpy())  # a buffer over the tensor's memory
    header["tensors"] = specs
    return [json.dumps(header).encode(), *frames]


def decode(frames) -> tuple[dict, list]:
    """(header, tensors) from received frames (bytes or zmq.Frame); raises WireError."""
    if not frames:
        raise WireError("empty message: expected a JSON header frame")
    header = decode_header(_bytes(frames[0]))
    try:
        specs = header.get("tensors", [])
        if not isinstance(specs, list) or len(specs) > MAX_TENSORS:
            raise WireError(f"'tensors' must be a list of at most {MAX_TENSORS} {{dtype, shape}} objects")
        if len(frames) - 1 != len(specs):
            raise WireError(f"the header names {len(specs)} tensor(s) but {len(frames) - 1} data frame(s) followed")
        return header, [_tensor(spec, frame, i) for i, (spec, frame) in enumerate(zip(specs, frames[1:], strict=True))]
    except WireError as e:
        e.header = header  # readable: the error reply can name the request's id
        raise


def decode_header(raw: bytes) -> dict:
    if len(raw) > MAX_HEADER_BYTES:
        raise WireError(f"header is {len(raw)} bytes; the limit is {MAX_HEADER_BYTES}")
    try:
        header = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise WireError(f"header frame is not UTF-8 JSON ({type(e).__name__})") from None
    if not isinstance(header, dict):
        raise WireError(f"header must be a JSON object, not {type(header).__name__}")
    if type(header.get("v")) is not int or header["v"] != PROTOCOL:
        raise WireError(f"protocol version {header.get('v')!r} is not {PROTOCOL}, the one this kit speaks")
    return header


def _no_constant(name):
    raise json.JSONDecodeError(f"{name} is not JSON", name, 0)


def _tensor(spec, frame, i: int) -> torch.Tensor:
    if not isinstance(spec, dict) or spec.get("dtype") not in WIRE_DTYPES:
        raise WireError(f"tensor {i}: dtype must be one of {', '.join(WIRE_DTYPES)}")
    shape = spec.get("shape")
    if (not isinstance(shape, list) or not 1 <= len(shape) <= MAX_RANK
            or not all(type(s) is int and 0 < s < 2**31 for s in shape)):
        raise WireError(f"tensor {i}: shape must be a list of 1 to {MAX_RANK} positive integers")
    buf = _buffer(frame)
    if spec["dtype"] == BLOCKWISE8:
        return _dequantize(buf, shape, i)
    dtype = DTYPES[spec["dtype"]]
    expected = math.prod(shape) * dtype.itemsize
    if buf.nbytes != expected:
        raise WireError(f"tensor {i}: shape {shape} of {spec['dtype']} needs {expected} bytes, "
                        f"the frame has {buf.nbytes}")
    if buf.readonly or np.frombuffer(buf, np.uint8).ctypes.data % dtype.itemsize:
        buf = bytearray(buf)  # bytes, or a misaligned frame: one plain copy the tensor owns
    return torch.frombuffer(buf, dtype=dtype).reshape(shape)  # else zero-copy over the received frame


def quantize_blockwise(t: torch.Tensor) -> torch.Tensor:
    """The bytes of `t` in blockwise8: float32 scales (absmax / 127 of each block of BLOCK), then int8 values."""
    flat = t.detach().reshape(-1).float().cpu()
    n, blocks = flat.numel(), -(-flat.numel() // BLOCK)
    padded = torch.nn.functional.pad(flat, (0, blocks * BLOCK - n)).view(blocks, BLOCK)  # (blocks, BLOCK)
    scales = padded.abs().amax(dim=1) / 127  # (blocks,)
    codes = torch.round(padded / torch.where(scales > 0, scales, 1)[:, None]).to(torch.int8)  # in [-127, 127]
    return torch.cat([scales.view(torch.uint8), codes.reshape(-1)[:n].view(torch.uint8)])


def _dequantize(buf: memoryview, shape: list, i: int) -> torch.Tensor:
    n = math.prod(shape)
    blocks = -(-n // BLOCK)
    if buf.nbytes != blocks * 4 + n:
        raise WireError(f"tensor {i}: shape {shape} in {BLOCKWISE8} needs {blocks * 4 + n} bytes "
                        f"({blocks} float32 scales, {n} int8 values), the frame has {buf.nbytes}")
    raw = torch.frombuffer(bytearray(buf), dtype=torch.uint8)  # one copy: the scales must be aligned
    scales, codes = raw[:blocks * 4].view(torch.float32), raw[blocks * 4:].view(torch.int8)
    if not all_finite(scales) or bool((scales < 0).any()):
        raise WireError(f"tensor {i}: a {BLOCKWISE8} scale is negative, NaN or infinite")
    padded = torch.nn.functional.pad(codes.float(), (0, blocks * BLOCK - n)).view(blocks, BLOCK)
    return (padded * scales[:, None]).reshape(-1)[:n].reshape(shape)  # float32


def all_finite(t: torch.Tensor) -> bool:
    """No NaN and no infinity in a CPU tensor of a wire dtype (numpy: one thread, no temporary tensors)."""
    if t.dtype == torch.float32:
        return bool(np.isfinite(t.detach().numpy()).all())
    bits, mask = _EXPONENT[t.dtype]
    exponent = np.bitwise_and(t.detach().reshape(-1).view(bits).numpy(), mask)
    return not np.any(exponent == mask)  # all ones: inf or NaN


def _buffer(frame) -> memoryview:
    return memoryview(frame.buffer if hasattr(frame, "buffer") else frame)


def _bytes(frame) -> bytes:
    return frame.bytes if hasattr(frame, "bytes") else bytes(frame)


def nbytes(frames) -> int:
    """Bytes a list of frames puts on the wire (payload, without ZeroMQ's few bytes of framing)."""
    return sum(_buffer(f).nbytes for f in frames)
