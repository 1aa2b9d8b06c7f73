"""Who may talk to a trunk server: loopback is open, anything else needs CURVE keys (or --insecure).

CURVE, ZeroMQ's encryption and authentication: the server has a key pair, each client has one,
and the server lets in only the clients whose public keys are in its `authorized` folder.
"""

import os
from ipaddress import ip_address
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator


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


def make_keys(folder) -> Path:
    """Server and client CURVE key pairs in `folder`; the client's public key is authorized."""
    folder = Path(folder)
    (folder / "authorized").mkdir(parents=True, exist_ok=True)
    zmq.auth.create_certificates(folder, "server")
    public, _ = zmq.auth.create_certificates(folder, "client")
    os.replace(public, folder / "authorized" / "client.key")
    return folder


def serve_curve(ctx: zmq.Context, sock: zmq.Socket, curve_dir) -> ThreadAuthenticator:
    """Make `sock` a CURVE server that lets in only the keys in curve_dir/authorized; returns the authenticator."""
    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve(domain="*", location=str(Path(curve_dir) / "authorized"))
    sock.curve_publickey, sock.curve_secretkey = zmq.auth.load_certificate(Path(curve_dir) / "server.key_secret")
    sock.curve_server = True
    return auth


def connect_curve(sock: zmq.Socket, curve_dir):
    """Make `sock` a CURVE client with the key pair and the server's public key in `curve_dir`."""
    sock.curve_publickey, sock.curve_secretkey = zmq.auth.load_certificate(Path(curve_dir) / "client.key_secret")
    sock.curve_serverkey, _ = zmq.auth.load_certificate(Path(curve_dir) / "server.key")
