"""The core builds and passes its C unit tests with other toolchains: clang
(x86-64) and gcc for aarch64 run under qemu-user.  Each test skips when its
toolchain is not installed (.ci/run installs them on Debian)."""
import pathlib
import shutil
import subprocess

import pytest
from hang import HANG_S

CSRC = pathlib.Path(__file__).resolve().parent.parent / "csrc"


def _run_make(tmp_path, target, **env_vars):
    """Builds the test binary (no timeout: a cross build or a busy machine is
    only slow), then runs the target (the suite's hang bound)."""
    variables = [f"BUILD={tmp_path}"] + [f"{k}={v}" for k, v in env_vars.items()]
    cmd = ["make", "--no-print-directory", "-C", str(CSRC)]
    build = subprocess.run(cmd + [f"{tmp_path}/test_core"] + variables, capture_output=True, text=True)
    if build.returncode != 0:
        return build
    return subprocess.run(cmd + [target] + variables, capture_output=True, text=True, timeout=HANG_S)


@pytest.mark.skipif(shutil.which("clang") is None or shutil.which("make") is None,
                    reason="clang or make not installed")
def test_core_with_clang(tmp_path):
    res = _run_make(tmp_path, "test", CC="clang")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert res.stdout.strip().splitlines()[-1].endswith(" passed, 0 failed"), res.stdout[-2000:]


@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-gcc") is None or shutil.which("qemu-aarch64") is None
                    or shutil.which("make") is None,
                    reason="aarch64 cross compiler or qemu-aarch64 not installed")
def test_core_on_aarch64(tmp_path):
    res = _run_make(tmp_path, "test", CC="aarch64-linux-gnu-gcc", CFLAGS="-O2 -g -static",
                    RUN="qemu-aarch64")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    lines = res.stdout.strip().splitlines()
    assert any("simd level detected: generic" in ln for ln in lines), res.stdout[-2000:]
    assert lines[-1].endswith(" passed, 0 failed"), res.stdout[-2000:]
