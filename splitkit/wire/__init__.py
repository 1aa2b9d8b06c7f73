"""The wire: what crosses between client and trunk server, and the client's side of it.

`codec` is the message format (a JSON header and raw tensor frames, never pickle); `protocol` names the ops,
modes and error codes and checks requests and replies; `client` is TrunkClient, the Lazy Pirate client that
bounds every call; `remote` makes the server's Trunk a differentiable module (RemoteTrunk) and asks the class
server whether it fits; `keys` makes, issues and checks CURVE keys. It imports only the core.

`splitkit.wire` itself is the codec: `wire.encode`, `wire.decode` and their limits, as the server and tests use it.
"""

from .codec import (
                    BLOCK,
                    BLOCKWISE8,
                    DTYPE_NAMES,
                    DTYPES,
                    MAX_HEADER_BYTES,
                    MAX_RANK,
                    MAX_TENSORS,
                    PROTOCOL,
                    WIRE_DTYPES,
                    WireError,
                    all_finite,
                    decode,
                    decode_header,
                    encode,
                    nbytes,
                    quantize_blockwise,
)

__all__ = ["BLOCK", "BLOCKWISE8", "DTYPES", "DTYPE_NAMES", "MAX_HEADER_BYTES", "MAX_RANK", "MAX_TENSORS", "PROTOCOL",
           "WIRE_DTYPES", "WireError", "all_finite", "decode", "decode_header", "encode", "nbytes",
           "quantize_blockwise"]
