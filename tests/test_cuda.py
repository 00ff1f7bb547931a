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


def test_cuda_import_needs_no_cuda_libraries(cuda_module):
    """The module links neither cuBLAS nor the shared cudart: import works on
    any machine, and cuBLAS is found at run time."""
    so = cuda_module.__file__
    out = subprocess.run(["ldd", so], capture_output=True, text=True).stdout
    assert "libcublas" not in out and "libcudart.so" not in out, out


def test_cuda_workspace_size_is_arithmetic(cuda_module):
    small = dcuda.moe_workspace_size(16, 8, 64, 1024, 2048, 2)
    big = dcuda.moe_workspace_size(4096, 8, 64, 1024, 2048, 2)
    assert 0 < small < big
    R_ = 4096 * 8
    # gathered rows (bf16), gate/up (float32), activations (bf16), down output (float32)
    assert big >= R_ * (2048 * 2 + 2 * 1024 * 4 + 1024 * 2 + 2048 * 4)
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
