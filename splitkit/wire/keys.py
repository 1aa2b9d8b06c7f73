"""Who may talk to a trunk server: loopback is open, anything else needs CURVE keys (or --insecure).

CURVE, ZeroMQ's encryption and authentication: the server has a key pair, each client has one,
and the server lets in only the clients whose public keys are in its `authorized` folder. A teacher
issues each student a key pair of their own (add_student) and withdraws it (remove_student); a running
server reads the folder again when it changes, and refuses a withdrawn key even on an open connection.
"""

import logging
import os
import re
import shutil
import time
from ipaddress import ip_address
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

log = logging.getLogger("splitkit.trunk.server")
SAY_EVERY_S = 60.0  # a refused key is logged at most this often
SAY_KEYS = 1024  # refused keys remembered for that, at most
STUDENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")

def is_loopback(address: str) -> bool:
    """True for ipc://, inproc:// and TCP addresses on 127.0.0.0/8, ::1 or localhost."""
    if address.startswith(("ipc://", "inproc://")):
        return True
    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(bind: str, curve_dir, insecure: bool) -> bool:
    """May a server bind here? Raises a ValueError that says how to allow it; True if it will run open."""
    if is_loopback(bind) or curve_dir is not None:
        return False
    if not insecure:
        raise ValueError(f"refusing to bind {bind}: anyone who can reach it could use the server. "
                         f"Give CURVE keys (--curve-dir, made by `python -m splitkit keys DIR`) "
                         f"or say --insecure if this network is trusted.")
    return True


def make_keys(folder, replace: bool = False) -> Path:
    """Server and client CURVE key pairs in `folder`; the client's public key is authorized. A folder that has a
    server key already is refused unless `replace`: a new server key breaks every copy of server.key given out."""
    folder = Path(folder)
    if (folder / "server.key").exists() and not replace:
        issued = [name for name in authorized(folder) if name != "client"]  # withdrawn keys are no one's to lose
        raise ValueError(f"{folder} has a server key already; a new one would lock out every client that holds a "
                         f"copy of the old server.key (students: {', '.join(issued) or 'none issued'}), and each "
                         f"would need the new one. To issue a student a key: --add NAME. To make a new server key "
                         f"anyway: --new-server-key")
    (folder / "authorized").mkdir(parents=True, exist_ok=True)
    zmq.auth.create_certificates(folder, "server")
    public, _ = zmq.auth.create_certificates(folder, "client")
    os.replace(public, folder / "authorized" / "client.key")
    return folder


def add_student(folder, name: str) -> Path:
    """Issue student `name` a key pair of their own, in DIR/students/NAME/: client.key_secret (theirs alone) and
    a copy of server.key, a curve_dir for that student; their public key is authorized as DIR/authorized/NAME.key."""
    folder, public = Path(folder), _public_key(folder, name)
    if not (folder / "server.key").is_file():
        raise ValueError(f"no server key in {folder}: make the keys first, with `python -m splitkit keys {folder}`")
    if public.exists():
        raise ValueError(f"{name} has a key already ({public}); remove it first to issue a new one")
    own = folder / "students" / name
    own.mkdir(parents=True, exist_ok=True)
    made, secret = zmq.auth.create_certificates(own, "client")
    os.chmod(secret, 0o600)
    shutil.copyfile(folder / "server.key", own / "server.key")
    public.parent.mkdir(exist_ok=True)
    os.replace(made, public)  # in one step: a server reading the folder never sees half a key
    return own


def remove_student(folder, name: str) -> Path:
    """Withdraw student `name`'s key: DIR/authorized/NAME.key is deleted (returned); a running server refuses it."""
    public = _public_key(folder, name)
    if not public.is_file():
        raise ValueError(f"{name} is not authorized in {public.parent} "
                         f"(authorized: {', '.join(authorized(folder)) or 'nobody'})")
    public.unlink()
    return public


def authorized(folder) -> list[str]:
    """The names whose public keys are in DIR/authorized: the clients a server with these keys lets in."""
    return sorted(p.stem for p in (Path(folder) / "authorized").glob("*.key"))


def _public_key(folder, name: str) -> Path:
    if not STUDENT_NAME.fullmatch(name):
        raise ValueError(f"a student's name is 1 to 64 letters, digits, '_', '.' or '-' (not first), got {name!r}")
    return Path(folder) / "authorized" / f"{name}.key"


class AuthorizedKeys:
    """The public keys in a server's `authorized` folder, read again when a key file there comes, goes or
    changes. The authenticator asks it at each handshake (callback, in its own thread); the server asks it
    about each request (allows), so that a key withdrawn while its client is connected is refused too."""

    def __init__(self, folder, every_s: float = 1.0):
        self.folder, self.every_s = Path(folder), every_s
        self.keys = frozenset()  # Z85 public keys; replaced whole, never changed in place
        self._seen, self._checked, self._trouble = None, float("-inf"), None
        self.handshakes_refused = 0  # counted by the authenticator's thread alone
        self.requests_from_withdrawn = 0  # counted by the serving thread alone
        self.handshakes_without_key = 0  # counted by the serving thread, from the socket's monitor (Endpoint)
        self._refused_keys = set()  # the distinct keys refused at a handshake, up to SAY_KEYS of them
        self._said = {}  # (what, key) -> when it was last logged
        self.refresh()

    def refresh(self):
        """Read the folder again if it changed since the last read; look at most once every `every_s`."""
        now = time.monotonic()
        if now - self._checked < self.every_s:
            return
        self._checked = now
        try:
            seen = sorted((p.name, st.st_mtime_ns, st.st_size) for p in self.folder.glob("*.key") for st in [p.stat()])
            if seen == self._seen:
                return
            keys = frozenset(zmq.auth.load_certificates(self.folder))
        except (OSError, ValueError) as e:  # no folder, or a bad key file: keep the keys as they were, look again
            if str(e) != self._trouble:  # said once, not every second
                log.warning("cannot read the authorized keys in %s: %s", self.folder, e)
            self._trouble = str(e)
            return
        self._trouble = None
        if self._seen is not None:
            log.info("authorized keys in %s read again: %d, was %d", self.folder, len(keys), len(self.keys))
        self.keys, self._seen = keys, seen

    def callback(self, domain: str, key: bytes) -> bool:
        """ZAP's question at a CURVE handshake: may this client key (Z85) in? A refusal is counted and logged."""
        if key in self.keys:
            return True
        self.handshakes_refused += 1
        if len(self._refused_keys) < SAY_KEYS:
            self._refused_keys.add(key)
        self._say("refused a CURVE handshake", key)
        return False

    def allows(self, frame: zmq.Frame) -> bool:
        """Whether a received message part came from a key still authorized (its User-Id, set at the handshake);
        a request from one that is not is counted and logged."""
        try:
            key = frame.get("User-Id").encode()
        except zmq.ZMQError:  # no User-Id: not a CURVE connection
            key = None
        if key is not None and key in self.keys:
            return True
        self.requests_from_withdrawn += 1
        self._say("dropped a request", key or b"?")
        return False

    def counts(self) -> dict:
        """What the server's stats report of the keys it turned away."""
        return {"handshakes_refused": self.handshakes_refused, "keys_refused": len(self._refused_keys),
                "handshakes_without_key": self.handshakes_without_key,
                "requests_from_withdrawn_keys": self.requests_from_withdrawn}

    def without_key(self, failed: int):
        """`failed` connections so far whose handshake failed before any key was checked: a client that came with no
        key at all. Logged once a minute at most when the count grows; ZeroMQ tells neither a key nor an address."""
        grew, self.handshakes_without_key = failed > self.handshakes_without_key, max(failed, 0)
        now = time.monotonic()
        if grew and now - self._said.get(("no key", b""), float("-inf")) >= SAY_EVERY_S:
            self._said["no key", b""] = now
            log.warning("refused a client that came without a CURVE key (%d so far): give each student the folder "
                        "`python -m splitkit keys %s --add NAME` makes", failed, self.folder.parent)

    def _say(self, what: str, key: bytes):
        """Log what was refused and whose key it was, once a minute at most for each kind and key: each try of
        a refused client, and each cell a student runs again, knocks again."""
        now = time.monotonic()
        if now - self._said.get((what, key), float("-inf")) < SAY_EVERY_S:
            return
        if len(self._said) >= SAY_KEYS:  # many keys knocking: forget when the older ones were said
            self._said.clear()
        self._said[what, key] = now
        log.warning("%s from key %s…: %s, not authorized in %s", what, key[:8].decode(errors="replace"),
                    self.whose(key), self.folder)

    def whose(self, key: bytes) -> str:
        """Whose key this is, by the students' folders beside the authorized one (DIR/students/NAME)."""
        for secret in sorted(self.folder.parent.glob("students/*/client.key_secret")):
            try:
                if zmq.auth.load_certificate(secret)[0] == key:
                    return f"{secret.parent.name}'s key, withdrawn"
            except (OSError, ValueError):
                continue
        return f"no student's key in {self.folder.parent / 'students'}"


def serve_curve(ctx: zmq.Context, sock: zmq.Socket, curve_dir) -> tuple[ThreadAuthenticator, AuthorizedKeys]:
    """Make `sock` a CURVE server that lets in only the keys in curve_dir/authorized, as they are now and as they
    change; returns the authenticator (stop it after the socket closes) and the keys (refresh them now and then)."""
    keys = AuthorizedKeys(Path(curve_dir) / "authorized")
    auth = ThreadAuthenticator(ctx)
    auth.start()
    try:
        auth.configure_curve_callback(domain="*", credentials_provider=keys)
        sock.curve_publickey, sock.curve_secretkey = zmq.auth.load_certificate(Path(curve_dir) / "server.key_secret")
        sock.curve_server = True
    except Exception:
        auth.stop()
        raise
    return auth, keys


def connect_curve(sock: zmq.Socket, curve_dir):
    """Make `sock` a CURVE client with the key pair and the server's public key in `curve_dir`."""
    sock.curve_publickey, sock.curve_secretkey = zmq.auth.load_certificate(Path(curve_dir) / "client.key_secret")
    sock.curve_serverkey, _ = zmq.auth.load_certificate(Path(curve_dir) / "server.key")


TRUNK_ENV = "SPLITKIT_TRUNK"       # the class server's address, set before starting JupyterLab
CURVE_ENV = "SPLITKIT_CURVE_DIR"   # the folder of keys the teacher gave, if the class server has keys


NO_KEY_ADVICE = (f"give the folder of keys your teacher gave you: --curve-dir FOLDER on the command line, "
                 f"curve_dir=FOLDER in Python (TrunkClient, Learner), or set ${CURVE_ENV}=FOLDER, which the command "
                 f"line always reads and Python reads for the class server's address, ${TRUNK_ENV}.")
KEY_FILES = ("client.key_secret", "server.key")  # what a client's curve_dir holds: its key pair, the server's key


def class_keys(address: str) -> Path | None:
    """$SPLITKIT_CURVE_DIR when `address` is the class server's ($SPLITKIT_TRUNK): the keys a client of that server
    uses unless it is given others. None for any other address."""
    folder = os.environ.get(CURVE_ENV)
    return Path(folder) if folder and address == os.environ.get(TRUNK_ENV) else None
