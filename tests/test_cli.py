"""The command-line main job and the trunk server's command line."""

import contextlib
import os
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

import pytest
import torch

from splitkit import TrunkClient, TrunkUnavailable
from splitkit.training.testing import free_port
from splitkit.trunk.sessions import Limits
from splitkit.wire import protocol as P

ROOT = Path(__file__).resolve().parents[1]


def train(tmp_path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "splitkit", "train", "--model", "tiny-llama", "--cuts", "2", "4",
                           "--steps", "3", "--batch-size", "4", "--out", str(tmp_path / "out"), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def assert_wrote_plots_and_adapter(out: Path):
    for name in ("loss.png", "lora_change.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (out / "adapter").iterdir()}


def test_train_command_on_the_kit_task_prints_evaluation_and_writes_plots_and_adapter(tmp_path):
    out = train(tmp_path, "--mode", "full")
    assert out.returncode == 0, out.stderr
    assert "before: {'train': 'exact match 0%'}" in out.stdout and "after 3 steps (full)" in out.stdout
    assert_wrote_plots_and_adapter(tmp_path / "out")
    losses = (tmp_path / "out" / "losses.csv").read_text().splitlines()
    assert losses[0] == "step,loss" and [row.split(",")[0] for row in losses[1:]] == ["1", "2", "3"]
    assert f"loss {float(losses[1].split(',')[1]):.2f} -> {float(losses[-1].split(',')[1]):.2f}" in out.stdout
    # the same run again, in another process: every file it writes is the same, byte for byte (diff -r is empty)
    again = train(tmp_path / "again", "--mode", "full+trunk", "--seed", "5")
    first = train(tmp_path / "first", "--mode", "full+trunk", "--seed", "5")
    assert again.returncode == first.returncode == 0, again.stderr + first.stderr
    files = {p.relative_to(tmp_path / "first" / "out") for p in (tmp_path / "first" / "out").rglob("*") if p.is_file()}
    assert files == {p.relative_to(tmp_path / "again" / "out") for p in (tmp_path / "again" / "out").rglob("*")
                     if p.is_file()} and Path("losses.csv") in files
    differ = [f for f in files if (tmp_path / "first" / "out" / f).read_bytes() != (tmp_path / "again" / "out" / f)
              .read_bytes()]
    assert not differ, f"two identical runs wrote different {differ}"


@pytest.mark.parametrize("name, text", [
    ("qa.jsonl", "".join(f'{{"prompt": "Q{i}?", "answer": "A{i}"}}\n' for i in range(10))),
    ("qa.csv", "prompt,answer\n" + "".join(f"Q{i}?,A{i}\n" for i in range(10))),
])
def test_train_command_on_prompt_answer_files(tmp_path, name, text):
    (tmp_path / name).write_text(text)
    out = train(tmp_path, "--data", str(tmp_path / name), "--mode", "full+trunk")
    assert out.returncode == 0, out.stderr
    assert "8 training and 2 held-out examples (pairs)" in out.stdout
    assert "'held_out': 'exact match" in out.stdout.split("after 3 steps")[1]
    assert_wrote_plots_and_adapter(tmp_path / "out")


def test_train_command_on_plain_text(tmp_path):
    (tmp_path / "notes.txt").write_text("Split learning keeps the labels on the client. " * 30)
    out = train(tmp_path, "--data", str(tmp_path / "notes.txt"), "--chunk", "32", "--mode", "detach")
    assert out.returncode == 0, out.stderr
    assert "(text)" in out.stdout and "'held_out': 'loss " in out.stdout and "perplexity" in out.stdout
    assert_wrote_plots_and_adapter(tmp_path / "out")


def test_train_command_names_the_bad_line_of_a_data_file(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "answer": "b"}\n{"prompt": "a"}\n')
    out = train(tmp_path, "--data", str(tmp_path / "bad.jsonl"))
    assert out.returncode == 2 and "bad.jsonl:2: needs non-empty strings" in out.stderr


def test_train_command_without_a_server_stops_within_its_timeout_naming_the_address(tmp_path, capsys):
    from splitkit.__main__ import main
    from splitkit.training.testing import free_port

    address = f"tcp://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.perf_counter()
    assert main(["train", "--model", "tiny-llama", "--cuts", "2", "4", "--address", address, "--timeout", "0.3",
                 "--retries", "1", "--out", str(tmp_path / "out")]) == 2
    assert time.perf_counter() - started < 10
    err = capsys.readouterr().err
    assert err.startswith("error: no answer from the trunk server at " + address) and "within 0.3 s, 2 tries" in err
    assert "answers no client without a key" in err  # the likeliest cause against a class server, and its fix


def test_a_relative_key_folder_that_is_not_there_says_where_it_was_looked_for(tmp_path, monkeypatch):
    from splitkit.wire.client import TrunkClient

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=f"classkeys is not a folder of keys.*read from .*{tmp_path.name}.*absolute"):
        TrunkClient("tcp://10.0.0.1:5555", curve_dir="classkeys")


def test_train_help_shows_an_example_for_each_input_kind():
    out = subprocess.run([sys.executable, "-m", "splitkit", "train", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert all(kind in out.stdout for kind in ("--data qa.jsonl", "--data qa.csv", "--data notes.txt"))


def test_keys_command(tmp_path):
    out = subprocess.run([sys.executable, "-m", "splitkit", "keys", str(tmp_path / "k")], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    made = {p.name for p in (tmp_path / "k").iterdir()}
    assert made >= {"server.key", "server.key_secret", "client.key_secret", "authorized"}
    assert (tmp_path / "k" / "authorized" / "client.key").exists()


def test_trunk_server_help():
    out = subprocess.run([sys.executable, "trunk_server.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and "--cuts" in out.stdout and "--curve-dir" in out.stdout


def test_the_installed_kit_serves_a_trunk_with_the_same_command_line(tmp_path):
    """`python -m splitkit serve` is trunk_server.py's command line, from any folder: the same help, and a server
    that answers, in a process whose OpenMP threads wait passively (set before torch loaded)."""
    script = subprocess.run([sys.executable, "trunk_server.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                            timeout=60).stdout
    served = subprocess.run([sys.executable, "-m", "splitkit", "serve", "--help"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=60).stdout
    assert served.split("options:")[1] == script.split("options:")[1] and "python -m splitkit serve" in served
    address = f"tcp://127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    with subprocess.Popen([sys.executable, "-m", "splitkit", "serve", "--model", "tiny-llama", "--cuts", "2", "4",
                           "--bind", address], cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True) as proc:
        try:
            with TrunkClient(address, timeout=60, retries=0) as probe:
                assert probe.stats()["cuts"] == [2, 4]
            environ = Path(f"/proc/{proc.pid}/environ").read_bytes().split(b"\0")
            assert b"OMP_WAIT_POLICY=PASSIVE" in environ
        finally:
            proc.terminate()
            proc.wait(30)


def test_trunk_server_has_a_flag_for_every_limit_with_its_default_in_the_help(capsys):
    from trunk_server import LIMIT_FLAGS, limits_from, parse_args
    limits = fields(Limits)
    assert set(LIMIT_FLAGS) == {f.name for f in limits}
    assert {f.name for f in limits} <= set(vars(parse_args([])))  # each field is filled by a flag of its own
    assert limits_from(parse_args([])) == Limits()
    assert parse_args(["--keep-states", "0", "--max-sessions", "3"]).max_sessions == 3  # the old names still work
    # every flag at once, each to its own value: each lands on its own field
    want = {f.name: type(f.default)(2 * f.default + i + 1) for i, f in enumerate(limits)}
    argv = [arg for f in limits for arg in (LIMIT_FLAGS[f.name][0], str(want[f.name]))]
    assert limits_from(parse_args(argv)) == Limits(**want)
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = capsys.readouterr().out
    for f in limits:  # the help of each flag names the default Limits has
        flag = LIMIT_FLAGS[f.name][0]
        own = " ".join(text.split(f"  {flag} ", 1)[1].split("\n  --", 1)[0].split())
        assert f"(default: {f.default})" in own, (flag, own)


def test_trunk_server_refuses_a_negative_limit(caplog):
    from trunk_server import main
    assert main(["--model", "tiny-llama", "--cuts", "2", "4", "--states-total", "-1", "--session-idle", "-5"]) == 2
    assert "limits cannot be negative: states_total, session_idle_s" in caplog.text


def keys(capsys, folder, *args) -> str:
    """python -m splitkit keys FOLDER ARGS, in this process; what it printed."""
    from splitkit.__main__ import main
    assert main(["keys", str(folder), *args]) == 0, capsys.readouterr().err
    return capsys.readouterr().out


def served_until_refused(c, h1, within_s: float = 15.0):
    """Forward h1 until the server stops answering this client (each try waits its timeout); the error."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            c.forward(h1)
        except TrunkUnavailable as e:
            return e
        assert time.monotonic() < deadline, "the withdrawn key was still served"
        time.sleep(0.2)


def test_keys_command_issues_and_withdraws_a_students_key_on_a_running_server(tmp_path, capsys, llama, serve,
                                                                               client, caplog):
    folder, cuts, h1 = tmp_path / "class", (2, 4), torch.zeros(1, 2, llama.config.hidden_size)
    keys(capsys, folder)
    out = keys(capsys, folder, "--add", "alice", "--add", "bob")
    assert f"key pair in {folder / 'students' / 'alice'}/" in out and f"{folder / 'authorized' / 'bob.key'}" in out
    assert {p.name for p in (folder / "students" / "alice").iterdir()} == {"client.key_secret", "server.key"}
    assert "authorized in" in (listed := keys(capsys, folder, "--list")) and "alice, bob, client" in listed
    address = serve(llama, cuts, curve_dir=folder)
    alice, bob = (client(address, timeout=2, retries=0, curve_dir=folder / "students" / name)
                  for name in ("alice", "bob"))
    for c in (alice, bob):
        c.hello(llama, cuts, mode=P.FULL)
        assert c.forward(h1).shape == h1.shape
    out = keys(capsys, folder, "--remove", "alice")
    assert "alice: withdrawn" in out and "no restart needed" in out
    assert not (folder / "authorized" / "alice.key").exists() and "alice" not in keys(capsys, folder, "--list")
    # no restart: alice is refused on the connection she has open, then on a new one; bob goes on
    assert "and keys" in str(served_until_refused(alice, h1))
    with pytest.raises(TrunkUnavailable):
        alice.stats()
    assert bob.forward(h1).shape == h1.shape
    seen = client(address, timeout=2, retries=0, curve_dir=folder / "students" / "bob").stats()
    assert seen["sessions"] >= 1
    # the server counted both refusals, and its log names alice for each
    assert seen["requests_from_withdrawn_keys"] >= 1 and seen["handshakes_refused"] >= 1
    said = [r.getMessage() for r in caplog.records if "alice's key, withdrawn" in r.getMessage()]
    assert [m.split(" from ")[0] for m in said] == ["dropped a request", "refused a CURVE handshake"]
    # a student added while the server runs gets in, within a few of its handshakes' retries
    keys(capsys, folder, "--add", "carol")
    carol = client(address, timeout=2, retries=3, curve_dir=folder / "students" / "carol")
    assert carol.hello(llama, cuts, mode=P.FULL)["ok"] and carol.forward(h1).shape == h1.shape


def test_keys_command_says_what_is_wrong(tmp_path, capsys):
    from splitkit.__main__ import main
    folder = tmp_path / "class"
    steps = [(["--add", "alice"], "no server key"), (None, None), (["--add", "alice"], None),
             (["--add", "alice"], "alice has a key already"), (["--remove", "dave"], "dave is not authorized"),
             (["--add", "../x"], "a student's name is"), ([], "has a server key already"),
             (["--remove", "alice"], None)]
    for args, message in steps:
        if args is None:
            keys(capsys, folder)
        elif message is None:
            keys(capsys, folder, *args)
        else:
            assert main(["keys", str(folder), *args]) == 2
            assert message in capsys.readouterr().err
    assert keys(capsys, folder, "--list").strip().endswith(": client")
    assert main(["keys", str(folder)]) == 2  # alice's key is withdrawn: nobody's key is at stake
    assert "(students: none issued)" in capsys.readouterr().err
    assert not (tmp_path / "x.key").exists() and not (folder / "x.key").exists()
    # a new server key only when asked for by name: the old one is replaced, and the command says what it breaks
    old = (folder / "server.key").read_bytes()
    assert "every student needs the new" in keys(capsys, folder, "--new-server-key")
    assert (folder / "server.key").read_bytes() != old


def test_importing_the_server_script_leaves_the_environment_as_it_was():
    """trunk_server.py sets OMP_WAIT_POLICY for its own process only: a test that imports it must not hand passive
    OpenMP waiting to every process started after it (notebook kernels among them)."""
    code = "import os, trunk_server; print(os.environ.get('OMP_WAIT_POLICY'))"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "None", out


def tls_handshake(folder, ca_file) -> str:
    """A TLS handshake on loopback between a server with DIR/flower's SuperLink certificate and a client that
    trusts `ca_file`; the server's name as the client verified it."""
    import socket
    import ssl
    import threading

    server_side = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_side.load_cert_chain(folder / "flower" / "superlink.crt", folder / "flower" / "superlink.key")
    listener = socket.create_server(("127.0.0.1", 0))

    def serve():
        conn, _ = listener.accept()
        with contextlib.suppress(ssl.SSLError, OSError), server_side.wrap_socket(conn, server_side=True) as tls:
            tls.sendall(b"ok")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        client_side = ssl.create_default_context(cafile=str(ca_file))
        with socket.create_connection(listener.getsockname(), timeout=5) as raw, \
                client_side.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            assert tls.recv(2) == b"ok"
            return tls.getpeercert()["subjectAltName"][0][1]
    finally:
        thread.join(5)
        listener.close()


def test_keys_command_makes_flowers_tls_and_a_supernode_key_pair_per_student(tmp_path, capsys):
    import ssl

    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

    from splitkit.__main__ import main

    folder, other = tmp_path / "class", tmp_path / "other"
    out = keys(capsys, folder, "--flower-host", "127.0.0.1")
    assert "--ssl-certfile" in out and (folder / "server.key").is_file()
    assert "alice: a SuperNode key pair" in keys(capsys, folder, "--add", "alice")
    own = folder / "students" / "alice"
    assert {p.name for p in own.iterdir()} == {"client.key_secret", "server.key", "flower.key", "flower.pub",
                                               "flower-ca.crt"}
    assert all(p.stat().st_mode & 0o077 == 0 for p in (own / "flower.key", folder / "flower" / "superlink.key",
                                                       folder / "flower" / "ca.key"))
    # the SuperLink's certificate passes a real TLS handshake for its host with the student's copy of the CA
    assert tls_handshake(folder, own / "flower-ca.crt") == "127.0.0.1"
    keys(capsys, other, "--flower-host", "127.0.0.1")  # another class's authority: not trusted
    with pytest.raises(ssl.SSLCertVerificationError):
        tls_handshake(folder, other / "flower" / "ca.crt")
    # the SuperNode key loads as Flower's SuperNode loads it, and flower.pub is its public half
    private = load_ssh_private_key((own / "flower.key").read_bytes(), None)
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
    assert load_ssh_public_key((own / "flower.pub").read_bytes()).public_numbers() == \
        private.public_key().public_numbers()
    assert main(["keys", str(folder), "--flower-host", "127.0.0.1"]) == 2
    assert "has Flower's certificates already" in capsys.readouterr().err
