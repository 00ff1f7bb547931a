"""The C unit tests of csrc/core (no Python), optimised and under
AddressSanitizer + UndefinedBehaviorSanitizer, built into a pytest tmp dir.
The build has no timeout (it is only slower on a loaded machine); running
the tests has the suite's hang bound (tests/hang.py)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from hang import HANG_S

CSRC = Path(__file__).resolve().parent.parent / "csrc"


def _need_toolchain():
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc.split()[0]) is None:
        pytest.skip(f"no C compiler ({cc!r} not found)")
    if not (CSRC / "Makefile").exists():
        pytest.skip("csrc/Makefile not found (not a source checkout)")


BINARY = {"test": "test_core", "test-sanitize": "test_core_san"}


def _make(target, build_dir):
    """Builds the target's binary (no timeout), then runs it (hang bound)."""
    env = dict(os.environ)
    env.pop("MAKEFLAGS", None)
    cmd = ["make", "--no-print-directory", "-C", str(CSRC)]
    build = subprocess.run(cmd + [f"{build_dir}/{BINARY[target]}", f"BUILD={build_dir}"], capture_output=True,
                           text=True, env=env)
    if build.returncode != 0:
        return build
    return subprocess.run(cmd + [target, f"BUILD={build_dir}"], capture_output=True, text=True, timeout=HANG_S,
                          env=env)


def _check(proc, build_dir):
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"make exited {proc.returncode}:\n{out[-6000:]}"
    m = re.search(r"(\d+) passed, (\d+) failed\s*$", proc.stdout)
    assert m, f"output does not end with 'N passed, 0 failed':\n{proc.stdout[-3000:]}"
    assert int(m.group(2)) == 0 and int(m.group(1)) > 0, m.group(0)


@pytest.mark.parametrize("target", ["test", "test-sanitize"])
def test_c_unit_tests(target, tmp_path):
    _need_toolchain()
    if target == "test-sanitize":
        probe = subprocess.run([os.environ.get("CC", "cc"), "-fsanitize=address,undefined", "-x", "c", "-",
                                "-o", str(tmp_path / "probe")], input="int main(void){return 0;}",
                               capture_output=True, text=True)
        if probe.returncode != 0:
            pytest.skip(f"the compiler cannot build with sanitizers: {probe.stderr.strip()[:200]}")
    if target == "test":
        # BUILD may be an absolute directory (make -C csrc test BUILD=/abs/dir) ...
        build = str(tmp_path / "build")
    else:
        # ... or one relative to csrc/ (the Makefile runs ./$(BUILD)/test_core_san from there); one build
        # of each kind, since a build is the slow part
        build = os.path.relpath(tmp_path / "build", CSRC)
    _check(_make(target, build), build)
    assert (tmp_path / "build" / BINARY[target]).exists()


@pytest.mark.parametrize("source", ["gemm_stream.c"])
def test_benchmark_c_sources_compile(source):
    """The C benchmarks that use the core's internal header still compile
    against it (syntax and types only; they are run by hand)."""
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc.split()[0]) is None:
        pytest.skip(f"no C compiler ({cc!r} not found)")
    src = CSRC.parent / "benchmarks" / source
    if not src.exists():
        pytest.skip(f"{src} not found (not a source checkout)")
    flags = ["-std=c11", "-Wall", "-Wextra", "-Werror=implicit-function-declaration", "-fsyntax-only"]
    proc = subprocess.run(cc.split() + flags + [f"-I{CSRC / 'core'}", str(src)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
