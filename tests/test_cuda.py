"""The CUDA module: built when nvcc is found, importable without a GPU, and
honest about devices.  GPU checks run only where a device exists."""
from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import dualsparse
from dualsparse import _C

ROOT = Path(__file__).resolve().parent.parent
CUDA_BUILD = _C.build_info()["cuda"]
CUDA_BUILT = CUDA_BUILD.startswith("built")


def test_build_info_reports_cuda():
    assert isinstance(CUDA_BUILD, str) and CUDA_BUILD
    assert CUDA_BUILD.startswith(("built", "not built")), CUDA_BUILD


@pytest.fixture(scope="module")
def cuda_module():
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not on PATH: the CUDA module is not expected")
    if not CUDA_BUILT:
        pytest.skip(f"the build disabled CUDA: {CUDA_BUILD}")
    import dualsparse._C_cuda as m  # must import with or without a GPU

    return m


def test_cuda_module_status(cuda_module):
    st = cuda_module.status()
    assert isinstance(st, dict)
    assert set(st) >= {"device_count", "runtime_version", "driver_version", "archs", "reason"}
    assert isinstance(st["device_count"], int) and st["device_count"] >= 0
    assert isinstance(st["runtime_version"], int) and st["runtime_version"] > 0
    assert isinstance(st["driver_version"], int)
    archs = st["archs"].split()
    assert "sm_80" in archs and "sm_90" in archs, st["archs"]
    if st["device_count"] == 0:
        assert st["reason"], "no device, but no reason given"
    else:
        assert st["reason"] == ""
    assert cuda_module.device_count() == st["device_count"]


@pytest.fixture(scope="module")
def cuda_device(cuda_module):
    st = cuda_module.status()
    if st["device_count"] == 0:
        pytest.skip(f"no usable CUDA device: {st['reason']}")
    return cuda_module


def test_cuda_selftest(cuda_device):
    assert cuda_device.selftest() is True
    assert cuda_device.selftest(0) is True


def test_cuda_selftest_bad_device(cuda_device):
    n = cuda_device.device_count()
    with pytest.raises(RuntimeError, match=f"device {n}"):
        cuda_device.selftest(n)


def test_cuda_selftest_without_device(cuda_module):
    if cuda_module.status()["device_count"] > 0:
        pytest.skip("a device exists")
    with pytest.raises(RuntimeError, match="device 0"):
        cuda_module.selftest()


def test_info_cli():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.run([sys.executable, "-m", "dualsparse", "info"], capture_output=True, text=True,
                       timeout=120, cwd=str(ROOT), env=env)
    assert p.returncode == 0, p.stderr
    out = p.stdout
    level = _C.simd_level()
    simd_line = [ln for ln in out.splitlines() if ln.startswith("SIMD level")]
    assert simd_line and level in simd_line[0], out
    cuda_line = [ln for ln in out.splitlines() if ln.startswith("CUDA")]
    assert cuda_line, out
    if CUDA_BUILT:
        assert "built" in cuda_line[0]
        try:
            import dualsparse._C_cuda as m
        except ImportError:
            m = None
        if m is not None:
            st = m.status()
            assert f"{st['device_count']} device(s)" in cuda_line[0], cuda_line[0]
            assert "sm_80" in cuda_line[0] and "sm_90" in cuda_line[0]
    else:
        assert "not built" in cuda_line[0]


def test_info_cli_json():
    import json

    p = subprocess.run([sys.executable, "-m", "dualsparse", "info", "--json"], capture_output=True, text=True,
                       timeout=120, cwd=str(ROOT))
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    assert d["simd_level"] == _C.simd_level()
    assert d["version"] == dualsparse.__version__
    assert "cuda" in d and "built" in d["cuda"]


def test_info_function():
    d = dualsparse.info()
    assert d["simd_level"] == _C.simd_level()
    try:
        importlib.import_module("dualsparse._C_cuda")
        importable = True
    except ImportError:
        importable = False
    assert d["cuda"]["built"] is (CUDA_BUILT and importable)
    if not d["cuda"]["built"]:
        assert d["cuda"]["reason"]
