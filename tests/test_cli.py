"""The command line: `python -m dualsparse demo` (the README's main job, on a
small shape here) runs and prints its table; bad arguments fail cleanly."""
import subprocess
import sys

import pytest
from hang import HANG_S


def _run(*args):
    return subprocess.run([sys.executable, "-m", "dualsparse", *args], capture_output=True, text=True, timeout=HANG_S)


def test_demo_small_shape_runs():
    pytest.importorskip("torch")
    res = _run("demo", "--shape", "small", "--tokens", "1", "64", "--repeats", "1", "--threads", "1")
    assert res.returncode == 0, res.stderr[-2000:]
    out = res.stdout
    assert "T = 1 token per call" in out and "T = 64 tokens per call" in out
    assert sum(line.startswith("no drop") for line in out.splitlines()) == 2
    assert "2T" in out and "rel. error" in out


def test_demo_rejects_bad_tokens():
    pytest.importorskip("torch")
    res = _run("demo", "--shape", "small", "--tokens", "0")
    assert res.returncode == 2 and "--tokens must be >= 1" in res.stdout


def test_unknown_command_fails():
    res = _run("frobnicate")
    assert res.returncode != 0 and "invalid choice" in res.stderr
