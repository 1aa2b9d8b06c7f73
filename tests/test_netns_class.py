"""A class across machines, the machines being network namespaces: a teacher and three students on a bridge.

The trunk server runs in the teacher's namespace as `trunk_server.py`, with a key per student made by
`python -m splitkit keys`; each student is a process in a namespace of its own (tests/netns_student.py, which
trains with Learner, or `python -m splitkit train`). The commands a teacher or a student types are those of
docs/classroom.md, verbatim: the test asserts that each one is there before it runs it.

Needs root, `ip` and `tc` (skipped without). All traffic stays in the namespaces made here (10.231.9.0/24 on a
bridge in the teacher's namespace), which are deleted at the end with every process started in them.
"""

import contextlib
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from splitkit.training.testing import ROOT
from splitkit.trunk.teacher import rates

DOC = (ROOT / "docs" / "classroom.md").read_text()
STUDENT = ROOT / "tests" / "netns_student.py"
PREFIX = "skc-"  # every namespace made here
TEACHER_IP = "10.231.9.1"
STUDENTS = {"alice": "10.231.9.11", "bob": "10.231.9.12", "carol": "10.231.9.13"}
ADDRESS = f"tcp://{TEACHER_IP}:5555"
SESSION_IDLE, STATE_MAX_AGE = 6, 3  # the server's --session-idle and --state-max-age, in seconds
STEPS = 40  # each Learner student's steps
SLOW_MBIT = 1  # carol's link in the slow-link scenario

# what the runbook says, run here as it is written there
KEYS = "python -m splitkit keys classkeys --flower-host 10.231.9.1"
ADD = "python -m splitkit keys classkeys --add alice --add bob --add carol --add erin"
REMOVE = "python -m splitkit keys classkeys --remove erin"
LIST = "python -m splitkit keys classkeys --list"
SERVER = ("python trunk_server.py --model tiny-llama --cuts 2 4 --bind tcp://10.231.9.1:5555 --curve-dir classkeys "
          "--session-idle 6 --state-max-age 3")
CLI_TRAIN = ("python -m splitkit train --model tiny-llama --cuts 2 4 --address tcp://10.231.9.1:5555 "
             "--curve-dir carol --steps 20 --out carol-run")
NO_KEY = ("python -m splitkit train --model tiny-llama --cuts 2 4 --address tcp://10.231.9.1:5555 "
          "--timeout 2 --retries 1")


def doc_argv(command: str) -> list[str]:
    """The argv of a command of docs/classroom.md: `python` is this interpreter, trunk_server.py the checkout's."""
    assert command in DOC, f"docs/classroom.md lacks the command the test runs: {command}"
    argv = shlex.split(command)
    if argv[0] != "python":  # flower-superlink, flower-supernode, flwr: the environment's
        argv[0] = str(Path(sys.executable).parent / argv[0])
    return [sys.executable if a == "python" else str(ROOT / a) if a == "trunk_server.py" else a for a in argv]


def sh(*command: str):
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=30)


def ns(name: str) -> str:
    return PREFIX + name


def delete_namespaces():
    for name in ("teacher", *STUDENTS):
        subprocess.run(["ip", "netns", "del", ns(name)], capture_output=True, timeout=30)


class Proc:
    """A process in a namespace; its stdout's JSON lines collected by a thread as they come, stderr in a file."""

    def __init__(self, where: str, argv: list, cwd: Path, log: Path, env: dict | None = None):
        self.argv, self.log, self.lines, self.text = argv, log, [], []
        self.started = time.monotonic()
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
        self.process = subprocess.Popen(["ip", "netns", "exec", ns(where), *argv], cwd=cwd, env=env,
                                        stdout=subprocess.PIPE, stderr=log.open("w"), text=True,
                                        start_new_session=True)  # a group of its own: its children die with it
        self.ended = None
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.process.stdout:
            self.text.append(line)
            if line.startswith("{"):
                self.lines.append(json.loads(line))
        self.ended = time.monotonic()

    def said(self, key: str) -> list:
        return [line for line in self.lines if key in line]

    def wait_for(self, key: str, timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if found := self.said(key):
                return found[0]
            if self.process.poll() is not None and not self._reader.is_alive() and not self.said(key):
                break
            time.sleep(0.02)
        raise AssertionError(f"{self.argv} did not say {key!r} (rc {self.process.poll()}): {self.stderr()[-3000:]}")

    def finish(self, timeout: float = 120) -> int:
        rc = self.process.wait(timeout)
        self._reader.join(10)
        return rc

    def stderr(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def kill(self):
        """SIGKILL to the process and to what it started (Flower's processes start others)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)


class Classroom:
    def __init__(self, tmp: Path):
        self.tmp, self.procs = tmp, []

    def start(self, where: str, argv: list, cwd: Path | None = None, name: str = "proc", env=None) -> Proc:
        proc = Proc(where, argv, cwd or self.tmp, self.tmp / f"{name}-{len(self.procs)}.log", env)
        self.procs.append(proc)
        return proc

    def student(self, where: str, *args: str, name: str) -> Proc:
        return self.start(where, [sys.executable, str(STUDENT), ADDRESS, *args], name=name)

    def rate(self, student: str, mbit: int):
        """HTB on both ends of the student's link: its eth0, and its port on the teacher's bridge."""
        for where, dev in ((student, "eth0"), ("teacher", f"v-{student}")):
            run = ("ip", "netns", "exec", ns(where), "tc")
            sh(*run, "qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "10")
            sh(*run, "class", "add", "dev", dev, "parent", "1:", "classid", "1:10", "htb", "rate", f"{mbit}mbit",
               "ceil", f"{mbit}mbit")

    def unrate(self, student: str):
        for where, dev in ((student, "eth0"), ("teacher", f"v-{student}")):
            sh("ip", "netns", "exec", ns(where), "tc", "qdisc", "del", "dev", dev, "root")

    def close(self):
        for proc in reversed(self.procs):
            proc.kill()
        delete_namespaces()


@pytest.fixture(scope="module")
def classroom(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    if not all(shutil.which(tool) for tool in ("ip", "tc")):
        pytest.skip("`ip` or `tc` is not installed")
    delete_namespaces()  # what a run that was killed may have left
    room = Classroom(tmp_path_factory.mktemp("class"))
    try:
        sh("ip", "netns", "add", ns("teacher"))
    except subprocess.CalledProcessError as e:
        delete_namespaces()
        pytest.skip(f"cannot make a network namespace: {e.stderr.strip()}")
    try:
        t = ("ip", "-n", ns("teacher"))
        sh(*t, "link", "set", "lo", "up")
        sh(*t, "link", "add", "skcbr", "type", "bridge")
        sh(*t, "addr", "add", f"{TEACHER_IP}/24", "dev", "skcbr")
        sh(*t, "link", "set", "skcbr", "up")
        for name, ip in STUDENTS.items():
            sh("ip", "netns", "add", ns(name))
            sh(*t, "link", "add", f"v-{name}", "type", "veth", "peer", "name", "eth0", "netns", ns(name))
            sh(*t, "link", "set", f"v-{name}", "master", "skcbr")
            sh(*t, "link", "set", f"v-{name}", "up")
            s = ("ip", "-n", ns(name))
            sh(*s, "addr", "add", f"{ip}/24", "dev", "eth0")
            sh(*s, "link", "set", "eth0", "up")
            sh(*s, "link", "set", "lo", "up")
    except subprocess.CalledProcessError as e:
        room.close()
        pytest.skip(f"cannot build the class's network: `{' '.join(e.cmd)}`: {e.stderr.strip()}")
    try:
        yield room
    finally:
        room.close()


def medians(proc: Proc, run: int, before: float = float("inf")) -> float:
    return statistics.median(line["s"] for line in proc.said("step") if line["run"] == run and line["t"] < before)


def trained(proc: Proc, run: int, out: Path) -> tuple[list, dict]:
    """A Learner student's losses and saved LoRA of one run, once it is done."""
    deadline = time.monotonic() + 120
    while not [line for line in proc.said("done") if line["done"] == run]:
        assert proc.process.poll() is None and time.monotonic() < deadline, proc.stderr()[-3000:]
        time.sleep(0.02)
    return [line["loss"] for line in proc.said("step") if line["run"] == run], torch.load(out / str(run) / "lora.pt")


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def keys_command(command: str, capsys) -> str:
    """A `python -m splitkit keys` command of the runbook, run in this process (the same code, no start-up)."""
    from splitkit.__main__ import main

    argv = doc_argv(command)
    assert argv[1:3] == ["-m", "splitkit"]
    assert main(argv[3:]) == 0, capsys.readouterr().err
    return capsys.readouterr().out


def start_class(room: Classroom, capsys, monkeypatch) -> tuple[Path, Path, Proc]:
    """The teacher's keys (a key for alice, bob and carol; erin's issued and withdrawn) and the trunk server, once
    per module: (the teacher's folder, classkeys, the server)."""
    if not hasattr(room, "server"):
        room.teacher = room.tmp / "teacher"
        room.teacher.mkdir()
        monkeypatch.chdir(room.teacher)
        for command in (KEYS, ADD, REMOVE):
            keys_command(command, capsys)
        listed = keys_command(LIST, capsys)
        assert "alice, bob, carol, client" in listed and "erin" not in listed
        room.server = room.start("teacher", doc_argv(SERVER), cwd=room.teacher, name="server")
    return room.teacher, room.teacher / "classkeys", room.server


def test_a_class_across_machines_keys_a_slow_link_a_killed_student_and_the_teachers_view(classroom, capsys,
                                                                                         monkeypatch):
    room, tmp = classroom, classroom.tmp
    teacher, keys, server = start_class(room, capsys, monkeypatch)
    go = {phase: tmp / f"go-{phase}" for phase in ("solo-alice", "solo-bob", "together", "slow")}
    hang, stop = tmp / "carol-hangs", tmp / "stop-watching"

    def student(who: str, seed: int, phases: tuple, *args: str, where: str | None = None) -> Proc:
        return room.student(where or who, "--curve-dir", str(keys / "students" / who), "--steps", str(STEPS),
                            "--seed", str(seed), "--out", str(tmp / who), *args, "--go",
                            *[str(go[phase]) for phase in phases], name=who)

    # every process starts at once (each loads torch and the model); the runs wait for the test's go-files
    view = room.student("alice", "--curve-dir", str(keys), "--watch", str(stop), name="view")  # the teacher's key
    alice = student("alice", 1, ("solo-alice", "together", "slow"))
    bob = student("bob", 2, ("solo-bob", "together", "slow"))
    carol = student("carol", 3, ("together", "slow"), "--hang", str(hang))
    # erin's key was withdrawn before the server started; she runs on alice's machine
    erin = student("erin", 4, ("together",), "--timeout", "2", "--retries", "1", where="alice")
    view.wait_for("sessions", timeout=180)
    print(f"\ntrunk server in the teacher's namespace answering after {time.monotonic() - server.started:.1f} s")
    for proc in (alice, bob, carol, erin):
        proc.wait_for("ready", timeout=180)

    # --- solo: alice, then bob, each alone on the server
    solo = {}
    for who, proc in (("alice", alice), ("bob", bob)):
        go[f"solo-{who}"].touch()
        solo[who] = trained(proc, 0, tmp / who)
    print("solo, median step s:", {"alice": round(medians(alice, 0), 4), "bob": round(medians(bob, 0), 4)})

    # --- together, every link fast; erin, whose key was withdrawn, knocks meanwhile
    go["together"].touch()
    for who, proc in (("alice", alice), ("bob", bob)):
        losses, lora = trained(proc, 1, tmp / who)
        assert losses == solo[who][0] and same(lora, solo[who][1]), f"{who} with the class differs from {who} alone"
    trained(carol, 0, tmp / "carol")
    assert erin.finish() == 3
    refused = erin.said("unavailable")[0]
    assert ADDRESS in refused["unavailable"] and "refused this client's key" in refused["unavailable"]
    assert 2 * 2 - 0.5 < refused["seconds"] < 2 * 2 + 3  # two tries of 2 s, then the error
    fast = {"alice": medians(alice, 1), "bob": medians(bob, 1), "carol": medians(carol, 0)}
    print(f"withdrawn key (erin, Learner): TrunkUnavailable after {refused['seconds']:.2f} s (timeout 2 s, 2 tries)")
    # the teacher sees her: counted in the stats, and named in the server's log once
    knocked = view.said("sessions")[-1]["handshakes_refused"]
    named = [line for line in server.stderr().splitlines() if "refused a CURVE handshake" in line]
    print(f"the server refused {knocked} handshakes by then; its log: {named}")
    assert knocked >= 1 and len(named) == 1 and view.said("sessions")[-1]["keys_refused"] == 1  # erin's alone
    assert "erin's key, withdrawn, not authorized in classkeys/authorized" in named[0]
    print("together, every link fast: median step s", {w: round(t, 4) for w, t in fast.items()})
    assert server.process.poll() is None

    # --- carol's link slowed to SLOW_MBIT, then carol killed mid-step while alice and bob train on
    room.rate("carol", SLOW_MBIT)
    go["slow"].touch()
    while len([line for line in alice.said("step") if line["run"] == 2]) < STEPS // 2:
        assert alice.process.poll() is None
        time.sleep(0.01)
    hang.touch()
    hung = carol.wait_for("hanging", timeout=60)["t"]
    carol.process.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    for who, proc in (("alice", alice), ("bob", bob)):
        losses, lora = trained(proc, 2, tmp / who)
        assert losses == solo[who][0] and same(lora, solo[who][1]), f"{who} differs from {who} alone after the kill"
    slowed = {who: medians(proc, 2, before=killed) for who, proc in (("alice", alice), ("bob", bob))}
    carol_steps = [line["s"] for line in carol.said("step") if line["run"] == 1]
    print(f"carol at {SLOW_MBIT} Mbit/s: {len(carol_steps)} steps, median {statistics.median(carol_steps):.3f} s; "
          "alice and bob meanwhile, median step s", {w: round(t, 4) for w, t in slowed.items()})
    for who in slowed:  # the server serves one request at a time and never waits on a link: no slower than 2x
        assert slowed[who] <= 2 * fast[who] + 0.05, (who, slowed[who], fast[who])
    assert statistics.median(carol_steps) > 2 * fast["carol"]  # the limit did slow carol

    # --- a student with no key at all knocks (the command line) while carol trains with the command line
    carol_machine = tmp / "carol-machine"
    shutil.copytree(keys / "students" / "carol", carol_machine / "carol")  # the folder the teacher hands carol
    room.unrate("carol")
    cli = room.start("carol", doc_argv(CLI_TRAIN), cwd=carol_machine, name="carol-cli")
    dave = room.start("bob", doc_argv(NO_KEY), cwd=tmp, name="dave")

    # --- meanwhile the killed student's forward state and session are swept by the limits
    mine = [line["session"] for line in carol.said("session") if line["run"] == 1][0][:6]
    state_gone = session_gone = None
    while time.monotonic() < killed + SESSION_IDLE + 15 and session_gone is None:
        for sample in [s for s in view.said("sessions") if s["t"] > killed]:
            line = [line for line in sample["session_list"] if line["id"] == mine]
            if state_gone is None and (not line or line[0]["states"] == 0):
                state_gone = sample["t"] - hung
            if not line:
                session_gone = sample["t"] - hung
                break
        time.sleep(0.2)
    held = [line["states"] for s in view.said("sessions") if hung < s["t"] < killed + 0.5
            for line in s["session_list"] if line["id"] == mine]
    assert session_gone is not None and state_gone is not None, "carol's session was never swept"
    print(f"carol killed holding {max(held, default='?')} forward state(s): her state swept {state_gone:.1f} s and "
          f"her session {session_gone:.1f} s after her hanging forward was answered (limits {STATE_MAX_AGE} s, "
          f"{SESSION_IDLE} s)")
    assert session_gone <= SESSION_IDLE + 5 and state_gone <= STATE_MAX_AGE + 3
    assert dave.finish() == 2
    dave_s = dave.ended - dave.started
    assert f"error: no answer from the trunk server at {ADDRESS} to 'hello' within 2 s, 2 tries" in dave.stderr()
    assert cli.finish() == 0, cli.stderr()[-3000:]
    assert "after 20 steps (full)" in "".join(cli.text) and (carol_machine / "carol-run" / "adapter").is_dir()
    print(f"no key (dave, command line): exit 2 after {dave_s:.1f} s of process, model load included; "
          "carol's command line trained meanwhile:", [t.strip() for t in cli.text if t.startswith("after")][0])
    assert server.process.poll() is None
    deadline = time.monotonic() + 10
    while (last := view.said("sessions")[-1])["sessions"] or last["states"] or not last["handshakes_without_key"]:
        assert time.monotonic() < deadline, last
        time.sleep(0.2)
    print(f"the teacher's view counted {last['handshakes_without_key']} tries without a key (dave's)")

    # --- the teacher's view, read from alice's namespace all along
    stop.touch()
    assert view.finish() == 0
    samples = view.said("sessions")
    most = max(s["modes"].get("full", 0) for s in samples)
    busiest = max((rates(a, b) for a, b in zip(samples, samples[1:], strict=False)), key=lambda r: r["requests"])
    print(f"teacher's view: {len(samples)} samples, up to {most} full sessions at once, {samples[-1]['requests']} "
          f"requests in all, at most {busiest['requests']:.0f} requests/s and {busiest['steps']:.0f} steps/s; "
          f"at the end {last['sessions']} sessions and {last['states']} forward states")
    assert most >= 3 and samples[-1]["requests"] > 6 * 2 * STEPS
    assert not any("error" in s for s in view.lines)


# Flower across the machines: the SuperLink on the teacher's, with TLS and SuperNode authentication; a SuperNode on
# alice's and on bob's, each with her keys (CURVE for the trunk, a registered key for Flower); carol's without a key
SUPERLINK = ("flower-superlink --ssl-ca-certfile classkeys/flower/ca.crt --ssl-certfile classkeys/flower/superlink.crt "
             "--ssl-keyfile classkeys/flower/superlink.key --enable-supernode-auth "
             "--disable-runtime-dependency-installation --host 10.231.9.1")
REGISTER = {who: f"flwr supernode register classkeys/students/{who}/flower.pub class" for who in ("alice", "bob")}
SUPERNODES = {who: (f"flower-supernode --root-certificates {who}/flower-ca.crt --auth-supernode-private-key "
                    f"{who}/flower.key --superlink 10.231.9.1:8000 --node-config "
                    f"\"partition-id={i} num-partitions=2 curve-dir='{who}'\"")
              for i, who in enumerate(("alice", "bob"))}
NO_NODE_KEY = "flower-supernode --root-certificates carol/flower-ca.crt --superlink 10.231.9.1:8000"
FLWR_RUN = "flwr run flower class --stream"
TEACHER_HOME = "/home/teacher"  # where the runbook's config.toml has the teacher's folder
FLOWER_CONFIG = {"address": '"tcp://10.231.9.1:5555"', "model": '"tiny-llama"', "cuts": '"2,4"', "clients": "2",
                 "rounds": "2", "local-steps": "2", "facts": "8"}


def test_flower_rounds_across_machines_average_as_the_simulation_does(classroom, capsys, monkeypatch, serve, llama):
    from splitkit import federated as F
    from splitkit.training.testing import max_rel_diff

    room, tmp = classroom, classroom.tmp
    teacher, keys, server = start_class(room, capsys, monkeypatch)
    home = tmp / "flwr-home"  # the teacher's ~/.flwr: where `flwr run` finds the SuperLink by name
    home.mkdir()
    toml = DOC[DOC.index("[superlink]"):]
    assert f'root-certificates = "{TEACHER_HOME}/classkeys/flower/ca.crt"' in toml  # an absolute path: Flower's rule
    (home / "config.toml").write_text(toml[:toml.index("```")].replace(TEACHER_HOME, str(teacher)))
    app = (ROOT / "flower" / "pyproject.toml").read_text()
    lines = []
    for line in app.splitlines():
        key = line.split("=")[0].strip()
        lines.append(f"{key} = {FLOWER_CONFIG[key]}" if key in FLOWER_CONFIG and "=" in line else line)
    saved = tmp / "flower-rounds.pt"
    lines = [f'save-rounds = "{saved}"' if line.startswith("save-rounds") else line for line in lines]
    (teacher / "flower").mkdir()
    (teacher / "flower" / "pyproject.toml").write_text("\n".join(lines + [""]))
    env = {"FLWR_HOME": str(home), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    started = time.monotonic()
    link = room.start("teacher", doc_argv(SUPERLINK), cwd=teacher, name="superlink", env=env)
    for who, command in REGISTER.items():  # once the SuperLink answers
        deadline = time.monotonic() + 120
        while (register := room.start("teacher", doc_argv(command), cwd=teacher, name=f"register-{who}", env=env)
               ).finish(60) != 0:
            assert time.monotonic() < deadline, "".join(register.text)[-2000:] + register.stderr()[-2000:]
            time.sleep(2)
    for who, command in SUPERNODES.items():
        machine = tmp / f"{who}-flower"
        shutil.copytree(keys / "students" / who, machine / who)
        room.start(who, doc_argv(command), cwd=machine, name=f"supernode-{who}", env=env)
    # carol's SuperNode, given no Flower key: the SuperLink turns it away, and it stops
    shutil.copytree(keys / "students" / "carol", tmp / "carol-flower" / "carol")
    intruder = room.start("carol", doc_argv(NO_NODE_KEY), cwd=tmp / "carol-flower", name="supernode-carol", env=env)
    assert intruder.finish(120) != 0
    said = intruder.stderr() + "".join(intruder.text)
    assert "must be registered" in said, said[-2000:]
    deadline = time.monotonic() + 120
    while True:  # the SuperLink answers `flwr run` once it is up
        run = room.start("teacher", doc_argv(FLWR_RUN), cwd=teacher, name="flwr-run", env=env)
        assert run.finish(400) == 0 or time.monotonic() < deadline, run.stderr()[-3000:]
        if saved.exists() or "Connection refused" not in "".join(run.text) + run.stderr():
            break
        time.sleep(2)
    assert saved.exists(), "".join(run.text)[-3000:] + link.stderr()[-3000:]
    flower = torch.load(saved)
    flower_s = time.monotonic() - started
    assert [r["number"] for r in flower] == [1, 2] and all(sorted(r["metrics"]) == [0, 1] for r in flower)

    # the same run under Flower's simulation engine, in this process, against a trunk server on loopback
    config = {k: v.strip('"') for k, v in FLOWER_CONFIG.items()}
    config = {**config, "address": serve(llama, [2, 4]), "cuts": [2, 4], "clients": 2, "rounds": 2,
              "local-steps": 2, "facts": 8}
    started = time.monotonic()
    simulated = F.run(config, clients=2)
    sim_s = time.monotonic() - started
    gaps = [max_rel_diff(r["average"], s.average) for r, s in zip(flower, simulated, strict=True)]
    losses = [[(r["metrics"][k]["loss-first"], r["metrics"][k]["loss-last"]) for k in (0, 1)] for r in flower]
    print(f"\nflwr run across the namespaces: {len(flower)} rounds in {flower_s:.0f} s (start-up included); the "
          f"simulation: {sim_s:.0f} s; largest relative gap of each round's average, Flower against the simulation: "
          f"{gaps}; clients' (first, last) losses per round: {losses}")
    assert all(r["average"].keys() == s.average.keys() for r, s in zip(flower, simulated, strict=True))
    assert max(gaps) < 1e-6  # (0.0 when measured: the same LoRA bit for bit)
    assert server.process.poll() is None


def test_every_command_of_the_runbook_is_one_this_test_runs():
    """docs/classroom.md's shell blocks hold the commands above and nothing else, so none goes untested."""
    blocks = [block.split("```", 1)[0] for block in DOC.split("```bash\n")[1:]]
    written = [line.strip() for block in blocks for line in block.splitlines() if line.strip()]
    run = [KEYS, ADD, REMOVE, LIST, SERVER, CLI_TRAIN, NO_KEY, SUPERLINK, *REGISTER.values(), *SUPERNODES.values(),
           NO_NODE_KEY, FLWR_RUN]
    assert sorted(written) == sorted(run)
