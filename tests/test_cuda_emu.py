"""The CUDA path's kernels and host code, run on the CPU through the host
emulation (tests/cuda_emu.py, csrc/cuda/emu): the very sources of
dualsparse._C_cuda, compiled by the C++ compiler, against the float64
reference and the CPU engine.  This runs on every machine with a compiler;
test_cuda.py runs the same comparisons on a real GPU where there is one."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dualsparse import cuda as dcuda
from dualsparse import ops

import cuda_emu
from hang import HANG_S
import reference as R
from cases import (CASE_IDS, CASES_BY_ID, SMALL_CASE_IDS, assert_moe_close, assert_same_bits,
                   ROUTE_THRESHOLDS, assert_same_error, build, route_weights)

HERE = Path(__file__).resolve().parent

pytestmark = pytest.mark.skipif(cuda_emu.compilers() is None, reason="no C/C++ compiler for the CUDA emulation")


@pytest.fixture(scope="session")
def emu(tmp_path_factory):
    return cuda_emu.load(cuda_emu.build(tmp_path_factory.mktemp("cuda_emu")))


@pytest.fixture
def env(monkeypatch):
    """Sets the emulation's switches for one test (read at every call)."""
    def set_(**kv):
        for k, v in kv.items():
            if v is None:
                monkeypatch.delenv(k, raising=False)
            else:
                monkeypatch.setenv(k, str(v))
    set_(DS_CUDA_EMU_SEED=None, DS_CUDA_EMU_GROUPED=None, DUALSPARSE_CUDA_GEMM=None, DS_CUDA_EMU_DRIVER=None)
    return set_


def run(emu, inp, out=None):
    return dcuda.moe_experts(inp.x, inp.ids, inp.tw, inp.gate_up, inp.down, inp.levels, inp.P, out, _module=emu)


def cpu(inp):
    return ops.moe_experts(inp.x, inp.ids, inp.tw, inp.gate_up, inp.down, levels=inp.levels, num_partitions=inp.P)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("case_id", CASE_IDS)
def test_emu_moe_experts_case_table(emu, env, case_id, dtype):
    """Every case of the shared table: within the float64 reference's
    tolerance, within twice it of the CPU engine, and the same bits whatever
    the order in which blocks and threads run."""
    inp = build(CASES_BY_ID[case_id], dtype, "torch")
    faults = emu.emu_faults()
    got = run(emu, inp)
    assert emu.emu_faults() == faults, "a grouped call was given a misaligned matrix"
    assert got.dtype == inp.x.dtype and tuple(got.shape) == tuple(inp.x.shape)
    assert_moe_close(got, inp, "cuda emulation")
    r, scale = R.ref_moe(inp.x, inp.ids, inp.tw, inp.gate_up, inp.down, inp.levels, inp.P,
                         act_dtype=inp.act_dtype, return_scale=True)
    diff = np.abs(R.to_f64(got) - R.to_f64(cpu(inp)))
    assert (diff <= 2 * R.moe_tolerance(dtype, r, scale)).all(), f"max |cuda - cpu| {diff.max():.3g}"
    env(DS_CUDA_EMU_SEED=977)
    assert_same_bits(run(emu, inp), got, "shuffled block and thread order")


def _gemm_counts(emu):
    c = emu.last_gemm_counts()
    return c["grouped"], c["loop"]


@pytest.mark.parametrize("case_id", [c for c in SMALL_CASE_IDS if CASES_BY_ID[c].T > 0])
def test_emu_gemm_paths_agree(emu, env, case_id):
    """The grouped cuBLAS call, the cublasGemmEx loop (forced, for a cuBLAS
    without grouped GEMMs, and after a refusal) give the same bits; the
    module says how many problems ran on which path, and the grouped call is
    never refused for the types the module asks of it."""
    inp = build(CASES_BY_ID[case_id], "bfloat16", "torch")
    emu.blas_forget_refusals()
    faults = emu.emu_faults()
    want = run(emu, inp)
    gemms = inp.levels is None or bool((inp.levels > 0).any())
    grouped, loop = _gemm_counts(emu)
    assert (grouped + loop > 0) is gemms
    assert emu.blas_info()["grouped_refused"]["bfloat16"] == 0, "the module asked for an undocumented combination"
    assert emu.emu_faults() == faults, "a grouped call was given a misaligned matrix"
    assert emu.last_gemm_grouped() is (gemms and loop == 0)
    for kv in (dict(DUALSPARSE_CUDA_GEMM="loop"), dict(DS_CUDA_EMU_GROUPED=0), dict(DS_CUDA_EMU_GROUPED="refuse")):
        env(**kv)
        assert_same_bits(run(emu, inp), want, str(kv))
        assert emu.last_gemm_grouped() is False
        assert _gemm_counts(emu) == (0, grouped + loop), kv
        env(DUALSPARSE_CUDA_GEMM=None, DS_CUDA_EMU_GROUPED=None)
    if not grouped:
        return
    # a refusal is remembered per dtype: no second try until forgotten
    assert emu.blas_info()["grouped_refused"] == {"float32": 0, "bfloat16": 15, "float16": 0}
    assert_same_bits(run(emu, inp), want, "after a refusal")
    assert emu.last_gemm_grouped() is False
    emu.blas_forget_refusals()
    assert emu.blas_info()["grouped_refused"]["bfloat16"] == 0
    run(emu, inp)
    assert _gemm_counts(emu) == (grouped, loop)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_emu_16bit_models_run_grouped(emu, env, dtype):
    """Expert shapes of real models (multiples of 8): every GEMM runs in the
    grouped call, for 16-bit weights too (the module once asked the grouped
    call for 16-bit inputs with float32 outputs, which cuBLAS refuses, so
    bfloat16 and float16 always fell back to the loop)."""
    from cases import Case

    case = Case("aligned", T=24, H=32, I=64, E=4, K=2, P=2, levels="random")
    inp = build(case, dtype, "torch")
    emu.blas_forget_refusals()
    got = run(emu, inp)
    assert_moe_close(got, inp, "aligned shapes")
    grouped, loop = _gemm_counts(emu)
    assert grouped > 0 and loop == 0, (grouped, loop)
    assert emu.last_gemm_grouped() is True
    assert emu.blas_info()["grouped_refused"][dtype] == 0


def test_emu_16bit_gemms_reduce_in_float32(emu):
    """By default cuBLAS may reduce split-K partial sums in a 16-bit output
    type (the emulation then rounds each half's sum): the module's GEMMs run
    with CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION, and the caller's
    (torch's) math mode is given back after the op."""
    from cases import Case

    inp = build(Case("k64", T=24, H=64, I=64, E=4, K=2, P=2), "bfloat16", "torch")
    h = emu.emu_blas_handle(0)
    emu.emu_blas_state(h, 3)  # CUBLAS_TF32_TENSOR_OP_MATH, as torch sets it with allow_tf32
    before = emu.emu_blas_state(h)["reduced_calls"]
    try:
        assert_moe_close(run(emu, inp), inp, "k = 64")
        st = emu.emu_blas_state(h)
        assert st["math_mode"] == 3, st
        assert st["reduced_calls"] == before, "a 16-bit GEMM ran with reduced-precision reductions"
    finally:
        emu.emu_blas_state(h, 0)


def test_emu_misaligned_problems_run_in_the_loop(emu):
    """Odd sizes put 16-bit matrices at addresses that are not 16-byte
    aligned: those problems run in the cublasGemmEx loop, the rest grouped,
    and the emulated device never faults."""
    inp = build(CASES_BY_ID["odd_I131_P4"], "float16", "torch")
    faults = emu.emu_faults()
    got = run(emu, inp)
    assert_moe_close(got, inp, "odd sizes")
    grouped, loop = _gemm_counts(emu)
    assert loop > 0 and grouped > 0, (grouped, loop)
    assert emu.emu_faults() == faults


# cudaDataType and cublasComputeType_t values (library_types.h, cublas_api.h)
R32F, R16F, R16BF = 0, 2, 14
C32F, C32F_FAST_TF32, C64F = 68, 77, 70
# cuBLAS documentation: cublasGemmGroupedBatchedEx supports (A = B type, C type, compute type)
GROUPED_DOCUMENTED = {(R16BF, R16BF, C32F), (R16F, R16F, C32F), (R32F, R32F, C32F), (R32F, R32F, C32F_FAST_TF32)}
# cublasGemmEx, among these types
GEMM_EX_DOCUMENTED = {(R16BF, R16BF, C32F), (R16BF, R32F, C32F), (R16F, R16F, C32F), (R16F, R32F, C32F),
                      (R32F, R32F, C32F), (R32F, R32F, C32F_FAST_TF32)}


@pytest.mark.parametrize("compute", [C32F, C32F_FAST_TF32, C64F])
def test_emu_blas_type_combinations_are_the_documented_ones(emu, compute):
    """The emulated cuBLAS accepts exactly the documented type combinations
    and refuses the others with CUBLAS_STATUS_NOT_SUPPORTED (15), so a module
    that asks for anything else fails the emulation's tests as it would fail
    on a GPU."""
    types = (R32F, R16F, R16BF)
    for a in types:
        for b in types:
            for c in types:
                want = 0 if a == b and (a, c, compute) in GROUPED_DOCUMENTED else 15
                st, faulted = emu.emu_grouped_probe(a, b, c, compute, 64, 0)
                assert (st, faulted) == (want, False), ("grouped", a, b, c, compute, st)
                want = 0 if a == b and (a, c, compute) in GEMM_EX_DOCUMENTED else 15
                assert emu.emu_gemm_ex_probe(a, b, c, compute) == want, ("gemm_ex", a, b, c, compute)


@pytest.mark.parametrize("atype,compute,k,offset,faults", [
    (R16BF, C32F, 64, 16, False), (R16BF, C32F, 64, 8, True), (R16BF, C32F, 64, 4, True),
    (R16F, C32F, 6, 4, False), (R16F, C32F, 6, 2, True), (R16F, C32F, 7, 2, False),
    (R32F, C32F, 64, 4, False), (R32F, C32F_FAST_TF32, 64, 4, True), (R32F, C32F_FAST_TF32, 64, 16, False),
])
def test_emu_grouped_alignment_rule(emu, atype, compute, k, offset, faults):
    """The documented pointer rule of the grouped call for 16-bit types and
    FAST compute types (16-byte aligned matrices when k % 8 == 0, 4-byte when
    k % 2 == 0): a violation returns success and faults on the device
    (misaligned address), as on a GPU."""
    st, faulted = emu.emu_grouped_probe(atype, atype, atype, compute, k, offset)
    assert st == 0 and faulted is faults


def test_emu_runs_on_the_callers_blas_handle(emu):
    """The expert ops use the handle they are given (torch's), bound to their
    stream; a NULL handle or one bound to another stream is an error naming
    it, before anything runs."""
    inp = build(CASES_BY_ID["K_eq_E"], "float32", "torch")
    out = torch.full_like(inp.x, 3.0)
    args = dcuda.moe_args(inp.x, inp.ids, inp.tw, inp.gate_up, inp.down, inp.levels, inp.P, out)
    need = emu.moe_check(args)
    ws, wsp = dcuda._workspace(need, inp.x)
    with pytest.raises(ValueError, match=r"moe_experts: the cuBLAS handle is NULL \(pass torch.cuda.current_blas_handle"):
        emu.moe_experts(0, 0, 0, args, wsp, need)
    # (the stand-in, like torch's handle, is rebound by each request for it)
    other = emu.emu_blas_handle(0x1234)  # bound to another stream
    with pytest.raises(ValueError, match="moe_experts: the cuBLAS handle is bound to stream 0x1234, not to the op's"):
        emu.moe_experts(0, 0, other, args, wsp, need)
    assert (out == 3.0).all()
    h = emu.emu_blas_handle(0)
    before = emu.emu_blas_handle_calls(h)
    emu.moe_experts(0, 0, h, args, wsp, need)
    assert emu.emu_blas_handle_calls(h) > before
    assert_moe_close(out, inp, "on the caller's handle")
    acc = torch.zeros((4, inp.case.E, inp.case.I), dtype=torch.float64)
    pack = (inp.case.T, inp.case.K, inp.case.E, inp.case.I, inp.case.H, 1, 0, inp.x.data_ptr(), inp.case.H,
            *dcuda._mat(inp.ids), *dcuda._mat(None), *dcuda._mat(None), inp.gate_up.data_ptr(),
            inp.gate_up.data_ptr(), 0, inp.case.H)
    need = emu.importance_check(0, 0, pack, False, acc.data_ptr(), 0, 0, 0)
    ws, wsp = dcuda._workspace(need, inp.x)
    other = emu.emu_blas_handle(0x1234)
    with pytest.raises(ValueError, match="importance: the cuBLAS handle is bound to stream"):
        emu.importance(0, 0, other, pack, False, acc.data_ptr(), 0, wsp, need)
    assert (acc == 0).all()
    h = emu.emu_blas_handle(0)
    emu.importance(0, 0, h, pack, False, acc.data_ptr(), 0, wsp, need)
    ref_acc, _ = R.ref_importance(inp.x, inp.ids, None, inp.gate_up)
    np.testing.assert_allclose(acc.numpy(), ref_acc, rtol=1e-4, atol=1e-4 * np.abs(ref_acc).max())


@pytest.mark.parametrize("driver,words", [
    ("none", ["no NVIDIA driver", "libcuda.so.1 cannot be loaded"]),
    ("old:12040", ["the NVIDIA driver supports CUDA up to 12.4", "the CUDA 13.0 runtime"]),
    ("nodevice", ["no CUDA device", "sees no GPU"]),
])
def test_emu_no_device_reasons(emu, env, driver, words):
    """cudart answers cudaErrorInsufficientDriver both without a driver and
    with an old one: the module tells them apart (and says "no CUDA device"
    when the driver sees none)."""
    env(DS_CUDA_EMU_DRIVER=driver)
    st = emu.status()
    assert st["device_count"] == 0
    for w in words:
        assert w in st["reason"], st["reason"]
    if driver == "none":
        assert "insufficient" not in st["reason"].lower()
    env(DS_CUDA_EMU_DRIVER=None)
    st = emu.status()
    assert st["device_count"] == 1 and st["reason"] == ""


def test_emu_failed_call_does_not_fail_the_next(emu):
    """A call that fails in the runtime (here: a device that does not exist)
    leaves nothing behind in the thread's last-error slot for the next op."""
    inp = build(CASES_BY_ID["K_eq_E"], "float32", "torch")
    out = torch.empty_like(inp.x)
    args = dcuda.moe_args(inp.x, inp.ids, inp.tw, inp.gate_up, inp.down, inp.levels, inp.P, out)
    ws, wsp = dcuda._workspace(emu.moe_check(args), inp.x)
    h = emu.emu_blas_handle(0)
    with pytest.raises(RuntimeError, match="invalid device ordinal"):
        emu.moe_experts(1, 0, h, args, wsp, emu.moe_check(args))
    emu.moe_experts(0, 0, h, args, wsp, emu.moe_check(args))
    assert_moe_close(out, inp, "after a failed call")
    lv = torch.empty(inp.tw.shape, dtype=torch.int8)
    with pytest.raises(RuntimeError, match="invalid device ordinal"):
        emu.route_levels(1, 0, inp.tw.data_ptr(), 0, inp.case.T, inp.case.K, inp.case.K, 1, [0.3], True,
                         lv.data_ptr(), 4, inp.case.K, 1, wsp, 16)
    assert torch.equal(_route(emu, inp.tw, [0.3]), ops.route_levels(inp.tw, [0.3]))


def test_emu_workspace_errors(emu):
    """A missing, short or misaligned workspace is an error naming it, before
    anything runs."""
    inp = build(CASES_BY_ID["K_eq_E"], "float32", "torch")
    out = torch.full_like(inp.x, 3.0)
    args = dcuda.moe_args(inp.x, inp.ids, inp.tw, inp.gate_up, inp.down, inp.levels, inp.P, out)
    need = emu.moe_check(args)
    ws, wsp = dcuda._workspace(need, inp.x)
    for ptr, size in ((0, need), (wsp, need - 1), (wsp + 8, need)):
        with pytest.raises(ValueError, match=f"moe_experts: workspace must be {need} bytes of 256-byte aligned"):
            emu.moe_experts(0, 0, emu.emu_blas_handle(0), args, ptr, size)
    assert (out == 3.0).all()
    lv = torch.full(inp.tw.shape, 9, dtype=torch.int8)
    with pytest.raises(ValueError, match="route_levels: workspace must be 16 bytes"):
        emu.route_levels(0, 0, inp.tw.data_ptr(), 0, inp.case.T, inp.case.K, inp.case.K, 1, [0.3], True,
                         lv.data_ptr(), 4, inp.case.K, 1)
    assert (lv == 9).all()


def test_emu_long_inputs_run_in_chunks(emu, monkeypatch):
    """Past max_workspace_bytes the tokens run in chunks: the same bits (rows
    are independent) and the same importance sums."""
    inp = build(CASES_BY_ID["many_rows"], "bfloat16", "torch")
    want = run(emu, inp)
    acc = torch.zeros((4, inp.case.E, inp.case.I), dtype=torch.float64)
    cnt = torch.zeros(inp.case.E, dtype=torch.float64)
    dcuda.neuron_importance(inp.x, inp.ids, inp.gate_up, acc, inp.tw, cnt, _module=emu)
    args = dcuda.moe_args(inp.x, inp.ids, inp.tw, inp.gate_up, inp.down, inp.levels, inp.P, want)
    cap = emu.moe_check((41, *args[1:]))
    monkeypatch.setattr(dcuda, "max_workspace_bytes", cap)
    calls = []
    real = emu.moe_experts

    class Counting:
        def __getattr__(self, name):
            return getattr(emu, name)

        def moe_experts(self, *a):
            calls.append(a[3][0])
            return real(*a)

    got = dcuda.moe_experts(inp.x, inp.ids, inp.tw, inp.gate_up, inp.down, inp.levels, inp.P, None,
                            _module=Counting())
    assert calls == [41, 41, 41, 27], calls
    assert_same_bits(got, want, "chunked")
    acc2 = torch.zeros_like(acc)
    cnt2 = torch.zeros_like(cnt)
    dcuda.neuron_importance(inp.x, inp.ids, inp.gate_up, acc2, inp.tw, cnt2, _module=emu)
    np.testing.assert_allclose(acc2.numpy(), acc.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(cnt2.numpy(), cnt.numpy(), rtol=1e-12)


def test_emu_importance_needs_contiguous_gate_up(emu):
    inp = build(CASES_BY_ID["K_eq_E"], "float32", "torch")
    gu = inp.gate_up.transpose(1, 2).contiguous().transpose(1, 2)
    acc = torch.zeros((4, inp.case.E, inp.case.I), dtype=torch.float64)
    with pytest.raises(ValueError, match="importance: gate_up_proj must be contiguous"):
        dcuda.neuron_importance(inp.x, inp.ids, gu, acc, None, None, _module=emu)


def test_emu_blas_info_follows_the_library(emu, env):
    assert emu.blas_info()["grouped_gemm"] is True
    env(DS_CUDA_EMU_GROUPED=0)
    assert emu.blas_info()["grouped_gemm"] is False


@pytest.mark.parametrize("ids_dtype", ["int32", "int64"])
@pytest.mark.parametrize("levels_dtype", ["int8", "uint8", "int16", "int32", "int64"])
def test_emu_index_dtypes(emu, ids_dtype, levels_dtype):
    inp = build(CASES_BY_ID["odd_I131_P4"], "float32", "torch", ids_dtype=ids_dtype, levels_dtype=levels_dtype)
    assert_moe_close(run(emu, inp), inp, f"ids {ids_dtype}, levels {levels_dtype}")


@pytest.mark.parametrize("tw_dtype", ["bfloat16", "float16", "float64"])
def test_emu_weight_dtypes(emu, tw_dtype):
    inp = build(CASES_BY_ID["many_rows"], "float32", "torch")
    inp.tw = inp.tw.to(getattr(torch, tw_dtype))  # the reference reads the rounded weights too
    assert_moe_close(run(emu, inp), inp, f"topk_weights {tw_dtype}", ref=R.ref_moe(
        inp.x, inp.ids, inp.tw, inp.gate_up, inp.down, inp.levels, inp.P, return_scale=True))


@pytest.mark.parametrize("case_id", SMALL_CASE_IDS)
def test_emu_strided_inputs_padded_out_and_workspace_bounds(emu, monkeypatch, case_id):
    """x, ids, weights and levels as strided views, out a view into a wider
    buffer: the padding and the bytes past the workspace stay untouched."""
    inp = build(CASES_BY_ID[case_id], "bfloat16", "torch")
    want = run(emu, inp)
    T, H = inp.x.shape
    K = inp.case.K
    xb = torch.full((T, H + 3), 5.0, dtype=inp.x.dtype)
    xb[:, :H] = inp.x
    idb = torch.full((K, T), -7, dtype=inp.ids.dtype)
    idb.copy_(inp.ids.t())
    twb = torch.full((K, T), float("nan"))
    twb.copy_(inp.tw.t())
    lvb = None
    if inp.levels is not None:
        lvb = torch.full((K, T), 99, dtype=inp.levels.dtype)
        lvb.copy_(inp.levels.t())
    strided = build(inp.case, "bfloat16", "torch")
    strided.x, strided.ids, strided.tw = xb[:, :H], idb.t(), twb.t()
    strided.levels = None if lvb is None else lvb.t()
    big = torch.full((T, H + 5), 7.0, dtype=torch.bfloat16)

    real_workspace = dcuda._workspace
    spare = {}

    def guarded(nbytes, like):  # canary bytes after the region the op may use
        buf = torch.full((int(nbytes) + 256 + 64,), 0xA5, dtype=torch.uint8)
        ptr = (buf.data_ptr() + 255) // 256 * 256
        spare["tail"] = buf[ptr - buf.data_ptr() + int(nbytes):]
        return buf[:ptr - buf.data_ptr() + int(nbytes)], ptr

    monkeypatch.setattr(dcuda, "_workspace", guarded)
    r = run(emu, strided, out=big[:, :H])
    monkeypatch.setattr(dcuda, "_workspace", real_workspace)
    assert r.data_ptr() == big.data_ptr()
    assert_same_bits(big[:, :H].contiguous(), want, "strided inputs, padded out")
    assert (big[:, H:] == 7.0).all()
    if T:
        assert (spare["tail"] == 0xA5).all(), "the op wrote past its workspace"


def test_emu_value_errors_match_cpu(emu):
    """Bad ids, levels and weights are found on the device and reported after
    the one synchronisation with the CPU engine's messages (the first bad
    pair in (t, k) order)."""
    inp = build(CASES_BY_ID["odd_H67_I77_P2"], "float32", "torch")
    ids = inp.ids.clone()
    ids[5, 1] = inp.case.E
    ids[9, 0] = -1
    bad = build(inp.case, "float32", "torch")
    bad.ids = ids
    assert_same_error(lambda: cpu(bad), lambda: run(emu, bad))
    lv = inp.levels.clone()
    lv[3, 2] = 3
    lv[8, 0] = -1
    bad = build(inp.case, "float32", "torch")
    bad.levels = lv
    assert_same_error(lambda: cpu(bad), lambda: run(emu, bad))
    w = torch.rand(6, 3)
    w[4, 1] = float("nan")
    w[5] = 0
    assert_same_error(lambda: ops.route_levels(w, [0.2]), lambda: _route(emu, w, [0.2]))
    w[4, 1] = 0.5
    assert_same_error(lambda: ops.route_levels(w, [0.2]), lambda: _route(emu, w, [0.2]))
    w[2, 0] = float("-inf")
    assert_same_error(lambda: ops.route_levels(w, [0.2], normalize=False), lambda: _route(emu, w, [0.2], normalize=False))


def _route(emu, w, thr, normalize=True, dtype="int8"):
    levels = torch.full(w.shape, -5, dtype=getattr(torch, dtype))
    dcuda.route_levels(w, thr, normalize, levels, _module=emu)
    return levels


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", "float64"])
@pytest.mark.parametrize("out_dtype", ["int8", "int32"])
def test_emu_route_levels_equal_cpu(emu, normalize, dtype, out_dtype):
    w = route_weights(dtype)
    for thr in ROUTE_THRESHOLDS:
        want = ops.route_levels(w, thr, normalize=normalize, dtype=out_dtype)
        assert torch.equal(_route(emu, w, thr, normalize, out_dtype), want), thr
    assert torch.equal(_route(emu, w.t(), [0.1]), ops.route_levels(w.t(), [0.1]))


def test_emu_route_levels_row_sum_overflow(emu):
    """A float64 row whose sum overflows is normalised by w / sum on the
    device as on the CPU (scores 0.5, 0.5), not to 0 (w / inf)."""
    w = torch.tensor([[1e308, 1e308], [1.5e308, 0.5e308], [1.0, 3.0], [-1e308, -1e308]],
                     dtype=torch.float64)
    want = [[2, 2], [3, 1], [1, 3], [2, 2]]
    assert ops.route_levels(w, [0.25, 0.5, 0.7]).tolist() == want
    assert _route(emu, w, [0.25, 0.5, 0.7]).tolist() == want


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("case_id", CASE_IDS)
def test_emu_importance_case_table(emu, env, case_id, dtype, weighted):
    from test_ops import _assert_importance_close

    inp = build(CASES_BY_ID[case_id], dtype, "torch")
    E, I = inp.case.E, inp.case.I
    tw = inp.tw if weighted else None
    acc = torch.full((4, E, I), 0.25, dtype=torch.float64)  # accumulates onto what is there
    cnt = torch.full((E,), 0.5, dtype=torch.float64)
    dcuda.neuron_importance(inp.x, inp.ids, inp.gate_up, acc, tw, cnt, _module=emu)
    ref_acc, ref_cnt = R.ref_importance(inp.x, inp.ids, tw, inp.gate_up)
    _assert_importance_close(acc.numpy() - 0.25, cnt.numpy() - 0.5, ref_acc, ref_cnt, f"emu {case_id} {dtype}")
    env(DS_CUDA_EMU_SEED=31)
    again = torch.full((4, E, I), 0.25, dtype=torch.float64)
    dcuda.neuron_importance(inp.x, inp.ids, inp.gate_up, again, tw, None, _module=emu)
    assert torch.equal(again, acc), "importance depends on the order threads run in"


def test_emu_sanitized_run(tmp_path):
    """The case table under AddressSanitizer and UBSan: no kernel or host
    step reads or writes outside its buffers (torch's CPU tensors, on which
    the sanitizer puts red zones, stand in for device memory)."""
    try:
        so = cuda_emu.build(tmp_path / "asan", sanitize=True)
        preload = cuda_emu.sanitizer_preload()
    except RuntimeError as exc:
        if "has no lib" in str(exc):
            pytest.skip(str(exc))
        raise
    envv = dict(os.environ, LD_PRELOAD=preload, ASAN_OPTIONS="detect_leaks=0:abort_on_error=1",
                DS_CUDA_EMU_SEED="5", PYTHONPATH=os.pathsep.join([str(HERE), str(HERE.parent)]))
    p = subprocess.run([sys.executable, str(HERE / "cuda_emu.py"), "--run-cases", str(so)], env=envv,
                       capture_output=True, text=True, timeout=HANG_S)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
    assert "cases ok" in p.stdout, p.stdout
