"""The command-line main job and the trunk server's command line."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_train_command_prints_evaluation_and_writes_plots(tmp_path):
    out = subprocess.run([sys.executable, "-m", "splitkit", "train", "--model", "tiny-llama", "--cuts", "2", "4",
                          "--mode", "full", "--steps", "3", "--batch-size", "4", "--out", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "exact match before" in out.stdout and "exact match after 3 steps (full)" in out.stdout
    for name in ("loss.png", "lora_change.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


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
