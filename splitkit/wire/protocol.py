"""The words of the trunk protocol (as the zguide's MDP.py is for its Majordomo broker), and the checks.

Client and server both use these names; docs/protocol.md says what each one means on the wire.
The checks are pure: a header (a dict) or tensors in, a value out, or `Refused` with the reason.
"""


from ..core.lora import LoraSpec
from . import codec as wire

VERSION = wire.PROTOCOL

# ops: what a request asks for
HELLO, FORWARD, BACKWARD, STEP = "hello", "forward", "backward", "step"
LORA_STATE, LOAD_LORA, STATS, BYE = "lora_state", "load_lora", "stats", "bye"
INFER, RELEASE = "infer", "release"  # generation: the Trunk with a KV cache kept per generation, and its end
OPS = (HELLO, FORWARD, BACKWARD, STEP, LORA_STATE, LOAD_LORA, STATS, BYE, INFER, RELEASE)

# modes: what a session trains. "local" is the unsplit model and needs no server.
DETACH = "detach"          # the simplified version: h1.detach() goes out, no backward crosses the wire
FULL = "full"              # the complete protocol: dL/dh2 goes out, dL/dh1 comes back; the Trunk is frozen
FULL_TRUNK = "full+trunk"  # the same, and the server trains a LoRA on the Trunk for this session
LOCAL = "local"            # the unsplit model, LoRA on every block: the reference
SERVER_MODES = (DETACH, FULL, FULL_TRUNK)
MODES = (*SERVER_MODES, LOCAL)

# error codes: what an error reply's "code" tells the client to do
BAD_REQUEST = "bad_request"          # the request is wrong; fix it (its id may be used again)
UNKNOWN_SESSION = "unknown_session"  # the server restarted or closed the session: say hello again
MISMATCH = "mismatch"                # the client's Bottom/Top do not fit this server's Trunk
STALE = "stale"                      # an id older than the newest answered one: never run
STATE_MISSING = "state_missing"      # no forward state for this backward: send h1 with it
CACHE_MISSING = "cache_missing"      # no KV cache for this generation at this length: send the whole prefix again
BUSY = "busy"                        # the server is at its session limit: try again later
INTERNAL = "internal"                # a bug in the server; the server goes on
UNAVAILABLE = "unavailable"          # (client side) no answer within the timeout, after every retry
BAD_REPLY = "bad_reply"              # (client side) the server's reply breaks the format or does not fit the request
CODES = (BAD_REQUEST, UNKNOWN_SESSION, MISMATCH, STALE, STATE_MISSING, CACHE_MISSING, BUSY, INTERNAL)


class Refused(Exception):
    """A request the server answers with an error reply; `code` tells the client what to do."""

    def __init__(self, message: str, code: str = BAD_REQUEST):
        super().__init__(message)
        self.code = code


def session_id(header: dict) -> str:
    sid = header.get("session")
    if not (isinstance(sid, str) and 16 <= len(sid) <= 64 and sid.isascii() and sid.isalnum()):
        raise Refused("'session' must be a string of 16 to 64 ASCII letters and digits")
    return sid


def request_id(header: dict) -> int:
    rid = header.get("id")
    if type(rid) is not int or rid < 0:
        raise Refused("'id' must be a non-negative integer")
    return rid


def state_key(header: dict) -> int:
    key = header.get("key")
    if type(key) is not int or key < 0:
        raise Refused("'key' (the step's state key) must be a non-negative integer")
    return key


def generation(header: dict) -> int:
    gen = header.get("gen")
    if type(gen) is not int or not 0 <= gen < 2**53:
        raise Refused("'gen' (the generation's id) must be a non-negative integer")
    return gen


def start(header: dict) -> int:
    at = header.get("start")
    if type(at) is not int or at < 0:
        raise Refused("'start' (how many positions the generation's cache already holds) must be an integer >= 0")
    return at


def padding(header: dict, batch: int, length: int) -> list[int] | None:
    """The left padding of each row ('pad'), or None if not sent: each row keeps at least one token of `length`."""
    pad = header.get("pad")
    if pad is None:
        return None
    if (not isinstance(pad, list) or len(pad) != batch
            or not all(type(p) is int and 0 <= p < length for p in pad)):
        raise Refused(f"'pad' must be a list of {batch} integers, each row's left padding, in [0, {length})")
    return pad


def wire_dtype(header: dict) -> str:
    """The wire dtype a client asks for in its hello (float32 if it names none)."""
    name = header.get("wire_dtype", "float32")
    if name not in wire.WIRE_DTYPES:
        raise Refused(f"wire dtype {name!r} is not one of this server's: {', '.join(wire.WIRE_DTYPES)}")
    return name


def mode(header: dict) -> str:
    m = header.get("mode")
    if m not in SERVER_MODES:
        raise Refused(f"mode must be one of {', '.join(SERVER_MODES)}, got {m!r}")
    return m


def session_options(header: dict) -> tuple:
    """What a hello opens: (mode, lora, lr), a LoRA and a learning rate in full+trunk only; its wire dtype checked."""
    m = mode(header)
    wire_dtype(header)
    if m != FULL_TRUNK:
        return m, None, 0.0
    return m, lora_spec(header.get("lora")), learning_rate(header)


def learning_rate(header: dict) -> float:
    lr = header.get("lr")
    if type(lr) not in (int, float) or not 0 < lr < 1:
        raise Refused("full+trunk needs a learning rate 'lr' between 0 and 1")
    return float(lr)


def check_fit(header: dict, model: str, cuts, hidden_size: int, fingerprint: dict):
    """The handshake: refuse a client whose Bottom/Top do not belong to this Trunk, and say what differs."""
    theirs = header.get("fingerprint")
    if header.get("cuts") != list(cuts) or header.get("hidden_size") != hidden_size:
        differs = (f"this server runs blocks [{cuts[0]}, {cuts[1]}) with hidden size {hidden_size}; the client "
                   f"has cuts={header.get('cuts')!r}, hidden_size={header.get('hidden_size')!r}. Split the "
                   f"client's model at cuts={tuple(cuts)} or start a server that matches")
    elif not isinstance(theirs, dict) or theirs.get("config") != fingerprint["config"]:
        differs = (f"the client's model ({header.get('model')!r}) is not this server's ({model!r}): their configs "
                   f"differ (config fingerprint {_short(theirs, 'config')} here {fingerprint['config']})")
    elif theirs.get("trunk") != fingerprint["trunk"]:
        differs = (f"the client's model has this server's config but other weights in blocks [{cuts[0]}, "
                   f"{cuts[1]}) (another checkpoint or a fine-tune?): trunk fingerprint {_short(theirs, 'trunk')}, "
                   f"here {fingerprint['trunk']}")
    else:
        return
    raise Refused(differs, MISMATCH)


def _short(fingerprint, part: str) -> str:
    value = fingerprint.get(part) if isinstance(fingerprint, dict) else None
    return repr(value)[:40]


def hidden_states(tensors: list, counts: tuple[int, ...], hidden_size: int, max_tokens: int) -> list:
    """Check hidden-state tensors: `counts` says how many may come, each (B, T, d), within limits, finite."""
    if len(tensors) not in counts:
        raise Refused(f"expected {' or '.join(map(str, counts))} tensor(s), got {len(tensors)}")
    for t in tensors:
        if t.dim() != 3 or t.shape[-1] != hidden_size:
            raise Refused(f"hidden states must be (B, T, {hidden_size}), got {list(t.shape)}")
        if t.shape[0] * t.shape[1] > max_tokens:
            raise Refused(f"{t.shape[0]} x {t.shape[1]} tokens is over this server's limit of {max_tokens}")
        if not wire.all_finite(t):
            raise Refused("hidden states contain NaN or infinity")
    if len(tensors) == 2 and tensors[0].shape != tensors[1].shape:
        raise Refused(f"dL/dh2 {list(tensors[0].shape)} and h1 {list(tensors[1].shape)} differ in shape")
    return tensors


def lora_spec(obj) -> LoraSpec:
    """The 'lora' object of a full+trunk hello as a LoraSpec."""
    if not isinstance(obj, dict):
        raise Refused("full+trunk needs a 'lora' object {r, lora_alpha, target_modules, init_b}")
    if "seed" in obj:
        raise Refused("lora: send no seed; the server draws the Trunk LoRA from a seed of its own "
                      "(read it with lora_state, or send a start of yours with names and tensors)")
    r, alpha, init_b = obj.get("r"), obj.get("lora_alpha"), obj.get("init_b", 0.0)
    targets = obj.get("target_modules")
    if type(r) is not int or not 1 <= r <= 256 or type(alpha) not in (int, float) or not 0 < alpha <= 4096:
        raise Refused("lora: r must be an integer in [1, 256] and lora_alpha a number in (0, 4096]")
    if type(init_b) not in (int, float) or not 0 <= init_b < 10:
        raise Refused("lora: init_b must be a number in [0, 10)")
    if targets is not None and (not isinstance(targets, list) or not 0 < len(targets) <= 16
                                or not all(isinstance(t, str) and t.isidentifier() for t in targets)):
        raise Refused("lora: target_modules must be a list of up to 16 module names")
    return LoraSpec(r=r, lora_alpha=alpha, seed=None, init_b=float(init_b),  # seed None: the server's secret
                    target_modules=None if targets is None else tuple(targets))


def lora_state(names, tensors: list, params: dict) -> list:
    """[(parameter, tensor)] for a LoRA state sent with hello or load_lora: the same names as `params`, shapes,
    finite."""
    if not isinstance(names, list) or sorted(map(str, names)) != sorted(params) or len(names) != len(tensors):
        raise Refused("the LoRA state sent does not match this trunk's LoRA layers")
    for n, t in zip(names, tensors, strict=True):
        if t.shape != params[n].shape:
            raise Refused(f"LoRA tensor {n} has shape {list(t.shape)}, expected {list(params[n].shape)}")
        if not wire.all_finite(t):
            raise Refused(f"LoRA tensor {n} contains NaN or infinity")
    return [(params[n], t) for n, t in zip(names, tensors, strict=True)]


def ok(header: dict, **fields) -> dict:
    """The header of a success reply to `header`."""
    return {"ok": True, "id": _id(header), **fields}


def error(header: dict, code: str, message: str) -> dict:
    """The header of an error reply; `id` is the request's if it was an integer."""
    return {"ok": False, "id": _id(header), "code": code, "error": message}


def _id(header) -> int | None:
    rid = header.get("id") if isinstance(header, dict) else None
    return rid if type(rid) is int else None



# ------------------------------------------------------------------ the client's checks of a reply

_ONE_TENSOR_LIKE_THE_FIRST_SENT = (FORWARD, BACKWARD, INFER)  # h2 or dL/dh1: the shape of h1 or dL/dh2


def check_reply(op: str, header: dict, tensors: list, sent: list) -> str | None:
    """What is wrong with a success reply to `op`, whose request carried tensors of the shapes `sent`; None if
    nothing. The client runs this on every reply, so that a bad server gives it an error, never a crash."""
    if op in _ONE_TENSOR_LIKE_THE_FIRST_SENT:
        if len(tensors) != 1:
            return f"expected 1 tensor, got {len(tensors)}"
        if list(tensors[0].shape) != list(sent[0]):
            return f"expected shape {list(sent[0])}, got {list(tensors[0].shape)}"
        if not wire.all_finite(tensors[0]):
            return "the tensor contains NaN or infinity"
        return None
    if op in (STEP, LORA_STATE):
        names = header.get("names")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
            return "'names' must be a list of distinct parameter names"
        if len(names) != len(tensors):
            return f"{len(names)} names for {len(tensors)} tensors"
        return None
    if tensors:
        return f"expected no tensors, got {len(tensors)}"
    if op == RELEASE and not isinstance(header.get("released"), bool):
        return "'released' must be true or false"
    if op == STATS:
        cuts, fp = header.get("cuts"), header.get("fingerprint")
        if not (isinstance(cuts, list) and len(cuts) == 2 and all(type(c) is int for c in cuts)):
            return "'cuts' must be a list of two integers"
        if type(header.get("hidden_size")) is not int or not isinstance(header.get("model"), str):
            return "'hidden_size' must be an integer and 'model' a string"
        if not (isinstance(fp, dict) and all(isinstance(fp.get(k), str) for k in ("config", "trunk"))):
            return "'fingerprint' must be an object with 'config' and 'trunk' strings"
    return None
