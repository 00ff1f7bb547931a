"""Smoke tests of benchmark scripts that have no other test: they run on a
tiny shape and refuse bad arguments with a message naming the argument
(their figures are measured by hand, never asserted here)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_partitions.py"


def _run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True)


def test_bench_partitions_runs_on_a_tiny_shape():
    proc = _run("--shape", "4,16,8,32,2", "--partitions", "4", "--rounds", "3", "--threads", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.count("|") == 6]
    # the header and one row per block-GEMM setting at the CPU's level
    assert len(rows) == 3, proc.stdout
    for row in rows[1:]:
        ratios = [float(v) for v in row.split("|")[-2:]]
        assert all(r > 0 for r in ratios), row


@pytest.mark.parametrize("args, word", [
    (["--shape", "4,16,8"], "--shape"),
    (["--shape", "4,16,8,32,5"], "--shape"),
    (["--partitions", "1"], "--partitions"),
    (["--rate", "0.9"], "--rate"),
    (["--rounds", "1"], "--rounds"),
])
def test_bench_partitions_refuses_bad_arguments(args, word):
    proc = _run(*args)
    assert proc.returncode == 2 and word in proc.stderr, proc.stderr
