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
from hang import HANG_S

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
        if not _driver_present():
            # cudart says "driver version is insufficient" here: the module must not
            assert st["reason"].startswith("no NVIDIA driver"), st["reason"]
            assert "insufficient" not in st["reason"].lower(), st["reason"]
    else:
        assert st["reason"] == ""
    assert cuda_module.device_count() == st["device_count"]


def _driver_present() -> bool:
    import ctypes

    if os.path.exists("/proc/driver/nvidia/version"):
        return True
    try:
        ctypes.CDLL("libcuda.so.1")
        return True
    except OSError:
        return False


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
                       timeout=HANG_S, cwd=str(ROOT), env=env)
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
                       timeout=HANG_S, cwd=str(ROOT))
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


# =================================================== the CUDA ops: no device

import numpy as np  # noqa: E402
import torch  # noqa: E402

from dualsparse import cuda as dcuda  # noqa: E402
from dualsparse import ops  # noqa: E402

import reference as R  # noqa: E402
from cases import (CASE_IDS, CASES_BY_ID, SMALL_CASE_IDS, assert_moe_close, assert_same_bits,  # noqa: E402
                   ROUTE_THRESHOLDS, assert_same_error, build, route_weights)  # noqa: E402


def test_cuda_module_uses_one_shared_runtime(cuda_module):
    """The module links the shared CUDA runtime of its toolkit (no static
    copy, no cuBLAS: that is found at run time), and the process has one
    CUDA runtime loaded: torch's where torch has CUDA."""
    import re

    so = cuda_module.__file__
    major = dcuda.runtime_major(so)
    assert major is not None, "the module does not name libcudart.so.<N>: a static runtime?"
    needed = subprocess.run(["objdump", "-p", so], capture_output=True, text=True).stdout if shutil.which("objdump") else ""
    if needed:
        libs = re.findall(r"NEEDED\s+(\S+)", needed)
        assert f"libcudart.so.{major}" in libs and not any("cublas" in n for n in libs), libs
    st = cuda_module.status()
    assert st["runtime_version"] // 1000 == major
    with open("/proc/self/maps") as f:
        runtimes = {os.path.realpath(ln.split()[-1]) for ln in f if "libcudart" in ln.split()[-1]}
    assert len(runtimes) == 1, runtimes
    if torch.version.cuda:
        assert int(torch.version.cuda.split(".")[0]) == major


def test_cuda_workspace_size_is_arithmetic(cuda_module):
    small = dcuda.moe_workspace_size(16, 8, 64, 1024, 2048, 2)
    big = dcuda.moe_workspace_size(4096, 8, 64, 1024, 2048, 2)
    assert 0 < small < big
    R_ = 4096 * 8
    # gathered rows, gate/up outputs, activations, down outputs: all bf16
    rows = R_ * (2048 * 2 + 2 * 1024 * 2 + 1024 * 2 + 2048 * 2)
    assert rows <= big < rows + (4 << 20)
    # no cuBLAS workspace of its own (it uses the one torch gave its handle)
    assert small < (4 << 20), small
    assert dcuda.moe_workspace_size(16, 8, 64, 1024, 2048, 2, "float32") > small


def test_cuda_blas_load_reports_what_it_searched(cuda_module):
    if cuda_module.blas_info()["path"]:
        pytest.skip("cuBLAS is already loaded in this process")
    bogus = ["/nonexistent/dualsparse-test/libcublas.so.99"]
    with pytest.raises(RuntimeError, match="cuBLAS not found: searched .*libcublas.so.99"):
        cuda_module.blas_load(bogus, False)


def test_cuda_blas_candidates_are_paths():
    cands = dcuda.blas_candidates()
    assert isinstance(cands, list) and all(isinstance(c, str) for c in cands)


class _FakeModule:
    """Stands in for dualsparse._C_cuda in the available() tests."""

    def __init__(self, archs="sm_80 sm_90 compute_90"):
        self.archs = archs

    def status(self):
        return {"device_count": 1, "runtime_version": 12040, "driver_version": 12040, "archs": self.archs,
                "reason": ""}

    def blas_load(self, paths, system=True):
        return "libcublas.so.12"


@pytest.mark.parametrize("cap,ok", [((7, 5), False), ((8, 0), True), ((8, 6), True), ((8, 9), True),
                                    ((9, 0), True), ((10, 0), True), ((12, 0), True), ((6, 1), False)])
def test_available_checks_the_compute_capability(monkeypatch, cap, ok):
    """available() compares the GPU's compute capability with the module's
    code (cubins sm_80, sm_90 and PTX compute_90 by default): an older GPU
    falls back with the reason instead of failing every op with "no kernel
    image"; newer GPUs run the cubin of their major version or JIT the PTX."""
    monkeypatch.setattr(dcuda, "_state", {})
    monkeypatch.setattr(dcuda, "module", lambda: _FakeModule())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "current_blas_handle", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: cap)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: "Fake GPU")
    got, reason = dcuda.available(0)
    assert got is ok, reason
    if not ok:
        assert f"compute capability {cap[0]}.{cap[1]}" in reason and "Fake GPU" in reason, reason
        assert f'DUALSPARSE_CUDA_ARCHS="{cap[0]}{cap[1]}"' in reason, reason
        with pytest.raises(RuntimeError, match="not usable: cuda:0 .*compute capability"):
            dcuda.require("moe_experts", torch.device("cuda", 0))


def test_arch_supported_rules():
    assert dcuda.arch_supported("sm_80", (8, 6))[0]
    assert not dcuda.arch_supported("sm_86", (8, 0))[0]  # a cubin does not run on an older minor
    assert not dcuda.arch_supported("sm_80 sm_90", (10, 0))[0]  # nor on another major
    assert dcuda.arch_supported("compute_80", (12, 0))[0]  # PTX: any newer GPU
    assert not dcuda.arch_supported("sm_90a compute_90a", (10, 0))[0]  # arch-specific: that GPU only
    assert dcuda.arch_supported("sm_90a", (9, 0))[0]
    assert dcuda.arch_supported("emulated", (5, 0))[0]  # not CUDA archs: not checked


def test_module_for_another_cuda_major_is_refused(monkeypatch, tmp_path):
    """A module built with CUDA 13 is not imported next to a CUDA 12 torch
    (two runtimes in one process, and a driver that may be too old for 13):
    available() says to rebuild with torch's toolkit."""
    fake = tmp_path / "_C_cuda.so"
    fake.write_bytes(b"\x7fELF....libcudart.so.13\x00....")
    assert dcuda.runtime_major(str(fake)) == 13
    monkeypatch.setattr(dcuda, "_module_file", lambda: str(fake))
    monkeypatch.setattr(dcuda, "_torch_cuda_major", lambda: 12)
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    m, why = dcuda._import_module()
    assert m is None
    assert "built with CUDA 13 but torch uses CUDA 12.4" in why and "CUDA 12 toolkit" in why, why
    monkeypatch.setattr(dcuda, "_module_state", {})
    monkeypatch.setattr(dcuda, "_state", {})
    ok, reason = dcuda.available()
    assert not ok and "built with CUDA 13 but torch uses CUDA 12.4" in reason, reason


def test_runtime_candidates_prefer_the_loaded_copy():
    cands = dcuda.runtime_candidates(13)
    assert cands[-1] == "libcudart.so.13"  # the system loader last
    with open("/proc/self/maps") as f:
        loaded = [ln.split()[-1] for ln in f if ln.strip().endswith("/libcudart.so.13")]
    if loaded:
        assert cands[0] == loaded[0]


def test_cuda_available_says_why(cuda_module):
    ok, reason = dcuda.available()
    if cuda_module.status()["device_count"] == 0:
        assert not ok and "no usable CUDA device" in reason
    if not ok:
        assert reason


def _bad_moe_inputs():
    """(name, kwargs-builder) pairs: inputs the CPU binding rejects before
    computing anything."""
    base = build(CASES_BY_ID["odd_H67_I77_P2"], "float32", "torch")

    def mk(**over):
        d = dict(x=base.x, ids=base.ids, tw=base.tw, gu=base.gate_up, dn=base.down, levels=base.levels,
                 P=base.P, out=None)
        d.update(over)
        return d

    T, H = base.x.shape
    E, I2, _ = base.gate_up.shape
    return [
        ("x dtype", mk(x=base.x.double())),
        ("x hidden", mk(x=base.x[:, :-1].contiguous())),
        ("x 1-D", mk(x=base.x[0])),
        ("ids float", mk(ids=base.ids.float())),
        ("ids rows", mk(ids=base.ids[:-1])),
        ("ids K > E", mk(ids=torch.zeros(T, E + 1, dtype=torch.int64), tw=torch.ones(T, E + 1),
                         levels=None)),
        ("tw shape", mk(tw=base.tw[:, :-1])),
        ("tw dtype", mk(tw=base.tw.to(torch.int32))),
        ("levels shape", mk(levels=base.levels[:-1])),
        ("levels float", mk(levels=base.levels.float())),
        ("P zero", mk(P=0)),
        ("P > I", mk(P=I2 // 2 + 1)),
        ("out shape", mk(out=torch.empty(T, H + 1))),
        ("out dtype", mk(out=torch.empty(T, H, dtype=torch.float16))),
        ("gu odd", mk(gu=base.gate_up[:, :-1].contiguous())),
        ("down shape", mk(dn=base.down[:, :, :-1].contiguous())),
        ("down dtype", mk(dn=base.down.half())),
        ("gu not contiguous", mk(gu=base.gate_up.transpose(1, 2).contiguous().transpose(1, 2))),
        ("out is x", mk(out=base.x)),
        ("out in gate_up", mk(out=base.gate_up.view(-1)[:T * H].view(T, H))),
    ]


@pytest.mark.parametrize("name,kw", _bad_moe_inputs(), ids=[n for n, _ in _bad_moe_inputs()])
def test_cuda_checks_match_cpu(cuda_module, name, kw):
    """The CUDA path's host-side checks (run here on CPU tensors: they read
    no data) raise what the CPU engine raises."""
    with pytest.raises((TypeError, ValueError)) as cpu:
        ops.moe_experts(kw["x"], kw["ids"], kw["tw"], kw["gu"], kw["dn"], levels=kw["levels"],
                        num_partitions=kw["P"], out=kw["out"])
    with pytest.raises((TypeError, ValueError)) as gpu:
        args = dcuda.moe_args(kw["x"], kw["ids"], kw["tw"], kw["gu"], kw["dn"], kw["levels"], kw["P"],
                              kw["out"])
        cuda_module.moe_check(args)
    assert type(gpu.value) is type(cpu.value), (str(cpu.value), str(gpu.value))
    assert str(gpu.value) == str(cpu.value)


def test_cuda_c_check_rejects_without_device(cuda_module):
    p = 4096
    good = (4, 2, 8, 16, 32, 1, 1, p, 32, p, 8, 2, 1, p, 0, 2, 1, 0, 4, 0, 0, p, p, p, 32)
    assert cuda_module.moe_check(good) > 0
    bad = list(good)
    bad[5] = 17  # P > I
    with pytest.raises(ValueError, match=r"num_partitions must be in \[1, min\(127, I=16\)\]; got 17"):
        cuda_module.moe_check(tuple(bad))
    bad = list(good)
    bad[10] = 0  # float ids
    with pytest.raises(TypeError, match="topk_ids must be int32 or int64; got float32"):
        cuda_module.moe_check(tuple(bad))
    bad = list(good)
    bad[24] = 31  # ldo < H
    with pytest.raises(ValueError, match=r"row strides of x \(32\) and out \(31\) must be >= H=32"):
        cuda_module.moe_check(tuple(bad))


@pytest.mark.parametrize("thr", [[float("nan")], [0.2, 0.1], [0.1, float("inf")], list(range(128))],
                         ids=["nan", "descending", "inf", "128"])
def test_cuda_route_levels_threshold_errors_match_cpu(cuda_module, thr):
    """Threshold checks run before the device is touched: same errors here."""
    w = torch.rand(4, 3)
    with pytest.raises(ValueError) as cpu:
        ops.route_levels(w, thr)
    with pytest.raises(ValueError) as dev:
        # T = 0: nothing on the device would be read even if the checks passed
        cuda_module.route_levels(0, 0, 0, 0, 0, 3, 3, 1, [float(t) for t in thr], True, 0, 4, 3, 1)
    assert str(dev.value) == str(cpu.value)


# ================================================== the CUDA ops on a device

@pytest.fixture(scope="module")
def gpu(cuda_module):
    """The first CUDA device, where torch sees one.  When torch sees a device
    but the module cannot use it (e.g. a driver older than the module's CUDA
    runtime, or no cuBLAS), that is a failure with the reason, not a skip."""
    if not torch.cuda.is_available():
        pytest.skip("torch sees no CUDA device (CPU build of torch, or no GPU)")
    ok, reason = dcuda.available()
    if not ok:
        pytest.fail(f"torch sees a CUDA device but dualsparse's CUDA path is not usable: {reason}")
    return torch.device("cuda", 0)


def _to(inp, dev):
    mv = (lambda t: None if t is None else t.to(dev))
    out = build(inp.case, inp.dtype, "torch")
    out.x, out.ids, out.tw, out.gate_up, out.down, out.levels = (
        mv(inp.x), mv(inp.ids), mv(inp.tw), mv(inp.gate_up), mv(inp.down), mv(inp.levels))
    return out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("case_id", CASE_IDS)
def test_cuda_moe_experts_case_table(gpu, case_id, dtype):
    inp = build(CASES_BY_ID[case_id], dtype, "torch")
    cpu = ops.moe_experts(inp.x, inp.ids, inp.tw, inp.gate_up, inp.down, levels=inp.levels,
                          num_partitions=inp.P)
    d = _to(inp, gpu)
    out = ops.moe_experts(d.x, d.ids, d.tw, d.gate_up, d.down, levels=d.levels, num_partitions=d.P)
    assert out.device == gpu and out.dtype == inp.x.dtype and out.shape == inp.x.shape
    got = out.cpu()
    assert_moe_close(got, inp, "cuda")
    # against the CPU engine: both within the reference's tolerance, so within twice it
    r, scale = R.ref_moe(inp.x, inp.ids, inp.tw, inp.gate_up, inp.down, inp.levels, inp.P,
                         act_dtype=inp.act_dtype, return_scale=True)
    tol = R.moe_tolerance(dtype, r, scale)
    diff = np.abs(R.to_f64(got) - R.to_f64(cpu))
    assert (diff <= 2 * tol).all(), f"max |cuda - cpu| {diff.max():.3g}"
    # deterministic: a second run gives the same bits
    again = ops.moe_experts(d.x, d.ids, d.tw, d.gate_up, d.down, levels=d.levels, num_partitions=d.P)
    assert_same_bits(again.cpu(), got, "cuda rerun")


@pytest.mark.parametrize("case_id", SMALL_CASE_IDS)
def test_cuda_moe_experts_side_stream_and_out(gpu, case_id):
    inp = build(CASES_BY_ID[case_id], "bfloat16", "torch")
    d = _to(inp, gpu)
    want = ops.moe_experts(d.x, d.ids, d.tw, d.gate_up, d.down, levels=d.levels, num_partitions=d.P)
    T, H = inp.x.shape
    big = torch.full((T, H + 5), 7.0, dtype=torch.bfloat16, device=gpu)
    s = torch.cuda.Stream(gpu)
    s.wait_stream(torch.cuda.current_stream(gpu))
    with torch.cuda.stream(s):
        r = ops.moe_experts(d.x, d.ids, d.tw, d.gate_up, d.down, levels=d.levels, num_partitions=d.P,
                            out=big[:, :H])
    torch.cuda.current_stream(gpu).wait_stream(s)
    assert r.data_ptr() == big.data_ptr()
    assert_same_bits(big[:, :H].cpu(), want.cpu(), "side stream, padded out")
    assert (big[:, H:] == 7.0).all()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_cuda_grouped_gemm_is_accepted(gpu, dtype):
    """With a cuBLAS that has cublasGemmGroupedBatchedEx (>= 12.5), expert
    shapes that are multiples of 8 run every GEMM grouped, in every dtype:
    cuBLAS accepts the module's type combinations (no refusal recorded)."""
    from cases import Case

    m = dcuda.module()
    m.blas_forget_refusals()
    inp = build(Case("aligned", T=64, H=256, I=128, E=8, K=2, P=2), dtype, "torch")
    d = _to(inp, gpu)
    out = ops.moe_experts(d.x, d.ids, d.tw, d.gate_up, d.down, levels=d.levels, num_partitions=d.P)
    torch.cuda.synchronize()
    assert_moe_close(out.cpu(), inp, "aligned shapes on the GPU")
    if not m.blas_info()["grouped_gemm"]:
        pytest.skip(f"cuBLAS {m.blas_info()['version']} has no grouped GEMM")
    assert m.blas_info()["grouped_refused"][dtype] == 0, m.blas_info()
    assert m.last_gemm_counts()["loop"] == 0, m.last_gemm_counts()


def test_cuda_ops_from_threads_and_streams(gpu):
    """Several Python threads, each on its own stream (each with torch's
    cuBLAS handle for that thread): the same bits as one thread, and the
    device memory torch holds does not grow with repeated calls."""
    import threading

    inp = build(CASES_BY_ID["many_rows"], "bfloat16", "torch")
    d = _to(inp, gpu)
    want = ops.moe_experts(d.x, d.ids, d.tw, d.gate_up, d.down, levels=d.levels, num_partitions=d.P).cpu()
    results, errors = [], []

    def work():
        try:
            s = torch.cuda.Stream(gpu)
            s.wait_stream(torch.cuda.default_stream(gpu))
            with torch.cuda.stream(s):
                for _ in range(5):
                    r = ops.moe_experts(d.x, d.ids, d.tw, d.gate_up, d.down, levels=d.levels, num_partitions=d.P)
                s.synchronize()
                results.append(r.cpu())
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for r in results:
        assert_same_bits(r, want, "threads and streams")
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated(gpu)
    for _ in range(20):
        ops.moe_experts(d.x, d.ids, d.tw, d.gate_up, d.down, levels=d.levels, num_partitions=d.P)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated(gpu) <= before + want.numel() * 2 + (1 << 20)


@pytest.mark.parametrize("ids_dtype", ["int32", "int64"])
@pytest.mark.parametrize("levels_dtype", ["int8", "int32", "int64"])
def test_cuda_index_dtypes(gpu, ids_dtype, levels_dtype):
    inp = build(CASES_BY_ID["odd_I131_P4"], "float32", "torch", ids_dtype=ids_dtype, levels_dtype=levels_dtype)
    d = _to(inp, gpu)
    out = ops.moe_experts(d.x, d.ids, d.tw, d.gate_up, d.down, levels=d.levels, num_partitions=d.P)
    assert_moe_close(out.cpu(), inp, "cuda index dtypes")


def test_cuda_value_errors_match_cpu(gpu):
    inp = build(CASES_BY_ID["odd_H67_I77_P2"], "float32", "torch")
    d = _to(inp, gpu)
    ids = inp.ids.clone()
    ids[5, 1] = inp.case.E
    ids[9, 0] = -1
    assert_same_error(lambda: ops.moe_experts(inp.x, ids, inp.tw, inp.gate_up, inp.down, levels=inp.levels, num_partitions=2),
            lambda: ops.moe_experts(d.x, ids.to(gpu), d.tw, d.gate_up, d.down, levels=d.levels, num_partitions=2))
    lv = inp.levels.clone()
    lv[3, 2] = 3
    assert_same_error(lambda: ops.moe_experts(inp.x, inp.ids, inp.tw, inp.gate_up, inp.down, levels=lv, num_partitions=2),
            lambda: ops.moe_experts(d.x, d.ids, d.tw, d.gate_up, d.down, levels=lv.to(gpu), num_partitions=2))
    w = torch.rand(6, 3)
    w[4, 1] = float("nan")
    w[5] = 0
    assert_same_error(lambda: ops.route_levels(w, [0.2]), lambda: ops.route_levels(w.to(gpu), [0.2]))
    w[4, 1] = 0.5
    assert_same_error(lambda: ops.route_levels(w, [0.2]), lambda: ops.route_levels(w.to(gpu), [0.2]))


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", "float64"])
@pytest.mark.parametrize("out_dtype", ["int8", "int32"])
def test_cuda_route_levels_equal_cpu(gpu, normalize, dtype, out_dtype):
    w = route_weights(dtype)
    for thr in ROUTE_THRESHOLDS:
        cpu = ops.route_levels(w, thr, normalize=normalize, dtype=out_dtype)
        dev = ops.route_levels(w.to(gpu), thr, normalize=normalize, dtype=out_dtype)
        assert dev.device == gpu
        assert torch.equal(dev.cpu(), cpu), thr
    wt = w.to(gpu).t()  # strided view
    assert torch.equal(ops.route_levels(wt, [0.1]).cpu(), ops.route_levels(w.t(), [0.1]))


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("case_id", CASE_IDS)
def test_cuda_importance_case_table(gpu, case_id, dtype, weighted):
    from test_ops import _assert_importance_close

    inp = build(CASES_BY_ID[case_id], dtype, "torch")
    d = _to(inp, gpu)
    E, I = inp.case.E, inp.case.I
    acc = torch.zeros((4, E, I), dtype=torch.float64, device=gpu)
    cnt = torch.zeros(E, dtype=torch.float64, device=gpu)
    ops.neuron_importance(d.x, d.ids, d.gate_up, acc, counts=cnt, topk_weights=d.tw if weighted else None)
    ref_acc, ref_cnt = R.ref_importance(inp.x, inp.ids, inp.tw if weighted else None, inp.gate_up)
    _assert_importance_close(acc.cpu().numpy(), cnt.cpu().numpy(), ref_acc, ref_cnt, f"cuda {case_id} {dtype}")


@pytest.mark.parametrize("family", ["olmoe", "mixtral"])
def test_cuda_patched_model_uses_cuda_ops(gpu, monkeypatch, family):
    """A patched tiny HF model on the GPU runs its experts through the CUDA
    ops (the torch fallback is never called) and gives the CPU engine's
    logits (float32, 2T-Drop so that partial prefixes are exercised)."""
    import dualsparse as ds
    from dualsparse.hf import torch_experts
    from hf_models import build as build_model, input_ids

    ids = input_ids()
    cpu_model = build_model(family, dtype=torch.float32)
    ds.patch(cpu_model, ds.TwoThreshold(0.3, 0.6))
    with torch.no_grad():
        want = cpu_model(ids).logits
    st_cpu = ds.drop_stats(cpu_model)
    gpu_model = build_model(family, dtype=torch.float32).to(gpu)
    ds.patch(gpu_model, ds.TwoThreshold(0.3, 0.6))

    def no_fallback(*a, **k):
        raise AssertionError("torch fallback called for CUDA tensors")

    monkeypatch.setattr(torch_experts, "swiglu_experts", no_fallback)
    with torch.no_grad():
        got = gpu_model(ids.to(gpu)).logits.cpu()
    scale = float(want.abs().max())
    assert float((got - want).abs().max()) <= 1e-4 * scale
    assert ds.drop_stats(gpu_model).overall == pytest.approx(st_cpu.overall)


# ============ route_levels in torch (other devices, CUDA without the module)

@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", "float64"])
def test_route_levels_torch_fallback_equals_engine(normalize, dtype):
    """The torch implementation that runs where the C engine cannot read the
    tensor gives the engine's levels bit for bit (run here on CPU tensors)."""
    w = route_weights(dtype, seed=11)
    w[1, :4] = 0.25
    for thr in (*ROUTE_THRESHOLDS, [0.25, 0.25]):
        for out_dtype in ("int8", "int32"):
            want = ops.route_levels(w, thr, normalize=normalize, dtype=out_dtype)
            got = torch.full(w.shape, -3, dtype=getattr(torch, out_dtype))
            ops._route_levels_torch(w, [float(t) for t in thr], normalize, got)
            assert torch.equal(got, want), (thr, out_dtype)


@pytest.mark.parametrize("case", ["nan", "inf_after_zero_row", "zero_row", "zero_row_raw", "thr_nan",
                                  "thr_descending", "thr_many", "int_weights"])
def test_route_levels_torch_fallback_errors_match_engine(case):
    w = torch.rand(6, 3)
    thr = [0.2]
    normalize = True
    if case == "nan":
        w[4, 1] = float("nan")
        w[5] = 0
    elif case == "inf_after_zero_row":
        w[2] = 0
        w[3, 2] = float("-inf")
    elif case == "zero_row":
        w[5] = 0
    elif case == "zero_row_raw":
        w[5] = 0
        w[5, 1] = float("inf")
        normalize = False
    elif case == "thr_nan":
        thr = [0.1, float("nan")]
    elif case == "thr_descending":
        thr = [0.3, 0.1]
    elif case == "thr_many":
        thr = list(np.linspace(0, 1, 128))
    elif case == "int_weights":
        w = torch.ones(6, 3, dtype=torch.int32)
    with pytest.raises((ValueError, TypeError)) as engine:
        ops.route_levels(w, thr, normalize=normalize)
    with pytest.raises((ValueError, TypeError)) as fallback:
        ops._route_levels_torch(w, [float(t) for t in thr], normalize, torch.empty(w.shape, dtype=torch.int8))
    assert type(fallback.value) is type(engine.value)
    assert str(fallback.value) == str(engine.value)


# ============================ the build's decision (setup.py), no compiler run

def _setup_decision(monkeypatch, mode, driver, nvcc_version=(12, 4), torch_cuda="12.4"):
    """Runs setup.py's BuildExt.build_extensions with the compilers stubbed
    out: (extensions it would build, the CUDA status recorded in _C)."""
    import runpy

    import setuptools
    from setuptools import Distribution

    monkeypatch.setattr(setuptools, "setup", lambda **kw: None)
    monkeypatch.chdir(ROOT)
    g = runpy.run_path(str(ROOT / "setup.py"))
    g = g["BuildExt"].build_extensions.__globals__  # run_path returns a copy of the module's globals
    g["_find_nvcc"] = lambda: "/opt/fake-cuda/bin/nvcc"
    g["_nvidia_driver"] = lambda: driver
    g["_nvcc_version"] = lambda nvcc: nvcc_version
    g["_torch_cuda"] = lambda: torch_cuda
    monkeypatch.setenv("DUALSPARSE_CUDA", mode)
    cmd = g["BuildExt"](Distribution({"ext_modules": g["_extensions"]()}))
    built = []
    cmd.build_extension = lambda ext: built.append(ext.name)
    cmd._build_cuda = lambda ext, nvcc: built.append(ext.name)

    class _Compiler:
        compiler_so = ["cc"]

    cmd.compiler = _Compiler()
    cmd.extensions = g["_extensions"]()
    cmd.build_extensions()
    status = dict(cmd.extensions[0].define_macros)["DS_CUDA_BUILD_STATUS"]
    return built, status


def test_setup_auto_builds_cuda_only_with_a_driver(monkeypatch):
    """DUALSPARSE_CUDA=auto with nvcc but no NVIDIA driver does not compile
    the CUDA module (minutes per install for a module that cannot run);
    DUALSPARSE_CUDA=1 compiles it anyway (CI); with a driver, auto builds it."""
    built, status = _setup_decision(monkeypatch, "auto", driver="")
    assert built == ["dualsparse._C"] and "no NVIDIA driver" in status, (built, status)
    built, status = _setup_decision(monkeypatch, "1", driver="")
    assert "dualsparse._C_cuda" in built and "built with" in status and "libcudart.so.12" in status, status
    built, status = _setup_decision(monkeypatch, "auto", driver="libcuda.so.1")
    assert "dualsparse._C_cuda" in built, status


def test_setup_requires_torchs_cuda_major(monkeypatch):
    """nvcc of another CUDA major version than torch's: auto skips with the
    reason, DUALSPARSE_CUDA=1 fails; a CPU torch (no torch.version.cuda)
    constrains nothing."""
    built, status = _setup_decision(monkeypatch, "auto", driver="libcuda.so.1", nvcc_version=(13, 0))
    assert built == ["dualsparse._C"], built
    assert "is CUDA 13.0 but torch uses CUDA 12.4" in status and "CUDA 12 toolkit" in status, status
    with pytest.raises(SystemExit, match="torch uses CUDA 12.4"):
        _setup_decision(monkeypatch, "1", driver="", nvcc_version=(13, 0))
    built, status = _setup_decision(monkeypatch, "1", driver="", nvcc_version=(13, 0), torch_cuda=None)
    assert "dualsparse._C_cuda" in built and "libcudart.so.13" in status, status
