"""The "torch" backend of moe_experts (dualsparse/_torch_moe.py) and the
backend choice: the shared case table against the float64 reference and the
C engine, the work it does (only live pairs, only prefixes, on views of the
weights), its errors, the "auto" choice for CUDA tensors (with the CUDA
module's self-test simulated through the host emulation), and patched models
of every family forced onto the torch backend."""
from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch

from dualsparse import _torch_moe, ops
from dualsparse import cuda as dcuda

import reference as R
from cases import (CASE_IDS, CASES_BY_ID, SMALL_CASE_IDS, assert_moe_close, assert_same_bits, assert_same_error,
                   build, reference)

DTYPES = ["float32", "bfloat16", "float16"]


def run_torch(inp, **kw):
    return ops.moe_experts(inp.x, inp.ids, inp.tw, inp.gate_up, inp.down, backend="torch", **inp.kwargs(), **kw)


def run_engine(inp, **kw):
    return ops.moe_experts(inp.x, inp.ids, inp.tw, inp.gate_up, inp.down, backend="engine", **inp.kwargs(), **kw)


@pytest.fixture(params=["grouped_mm", "loop"])
def gemm_path(request, monkeypatch):
    """Runs a test once with torch's grouped GEMM where the operands allow it
    and once with the per-group matmul loop only."""
    if request.param == "loop":
        real = _torch_moe.capabilities

        def no_grouped(device, dtype):
            return dict(real(device, dtype), grouped_mm=False, grouped_mm_f32=False)

        monkeypatch.setattr(_torch_moe, "capabilities", no_grouped)
    elif not _torch_moe.capabilities("cpu", torch.float32)["grouped_mm"]:
        pytest.skip("this torch has no CPU grouped_mm")
    return request.param


# ------------------------------------------------------------ case table

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case_id", CASE_IDS)
def test_case_table_against_reference_and_engine(case_id, dtype, gemm_path):
    """Within the dtype's tolerance of the float64 reference (see
    reference.moe_tolerance), and within twice that of the engine."""
    inp = build(CASES_BY_ID[case_id], dtype)
    out = run_torch(inp)
    assert out.dtype == inp.x.dtype and out.shape == inp.x.shape
    assert_moe_close(out, inp, f"torch backend ({gemm_path})")
    r, scale = reference(inp)
    if r.size:
        tol = R.moe_tolerance(dtype, r, scale)
        diff = np.abs(R.to_f64(out) - R.to_f64(run_engine(inp)))
        assert (diff <= 2 * tol).all(), f"torch vs engine: max |diff| {diff.max():.3g}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case_id", CASE_IDS)
def test_case_table_on_cuda(case_id, dtype):
    """The same comparison on a GPU (where grouped_mm and mm return float32
    for 16-bit inputs, so the engine's rounding points hold exactly)."""
    inp = build(CASES_BY_ID[case_id], dtype)
    dev = torch.device("cuda")
    x, ids, tw, gu, dn = (t.to(dev) for t in (inp.x, inp.ids, inp.tw, inp.gate_up, inp.down))
    lv = None if inp.levels is None else inp.levels.to(dev)
    out = ops.moe_experts(x, ids, tw, gu, dn, levels=lv, num_partitions=inp.P, backend="torch")
    assert out.device == x.device
    assert_moe_close(out.cpu(), inp, "torch backend on CUDA")
    assert_same_bits(out.cpu(), ops.moe_experts(x, ids, tw, gu, dn, levels=lv, num_partitions=inp.P,
                                                backend="torch").cpu(), "deterministic on CUDA")


def test_grouped_mm_is_used_where_the_layout_allows():
    """Aligned shapes (H and every prefix a multiple of 16 bytes) run on
    grouped_mm, odd ones fall back per call to the loop; both are right."""
    if not _torch_moe.capabilities("cpu", torch.float32)["grouped_mm"]:
        pytest.skip("this torch has no CPU grouped_mm")
    before = dict(_torch_moe.path_counts)
    inp = build(CASES_BY_ID["many_rows"], "float32")   # H 136, I 160, P 2: aligned
    assert_moe_close(run_torch(inp), inp, "grouped")
    assert _torch_moe.path_counts["grouped_mm"] > before["grouped_mm"]
    assert _torch_moe.path_counts["loop"] == before["loop"]
    inp = build(CASES_BY_ID["odd_H67_I77_P2"], "float32")  # H 67: rows of x not 16-byte strided
    assert_moe_close(run_torch(inp), inp, "odd")
    assert _torch_moe.path_counts["loop"] > before["loop"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case_id", SMALL_CASE_IDS)
def test_deterministic(case_id, dtype):
    inp = build(CASES_BY_ID[case_id], dtype)
    a = run_torch(inp)
    b = run_torch(inp)
    assert_same_bits(a, b, f"{case_id} {dtype}")


@pytest.mark.parametrize("case_id", ["K_eq_E", "odd_I131_P4", "T1_K1_P2"])
def test_out_argument_and_strided_x(case_id):
    inp = build(CASES_BY_ID[case_id], "float32")
    T, H = inp.x.shape
    big = torch.full((T, H + 5), 7.0)
    out = big[:, 2:2 + H]
    got = run_torch(inp, out=out)
    assert got is out
    assert_moe_close(out, inp, "out=")
    assert torch.all(big[:, :2] == 7.0) and torch.all(big[:, 2 + H:] == 7.0)
    xs = torch.zeros(T, 2 * H)
    xs[:, ::2] = inp.x
    inp2 = build(CASES_BY_ID[case_id], "float32")
    inp2.x = xs[:, ::2]
    assert_moe_close(run_torch(inp2), inp, "strided x")


def test_levels_none_equals_full_levels():
    inp = build(CASES_BY_ID["full_P3"], "bfloat16")
    a = run_torch(inp)
    b = ops.moe_experts(inp.x, inp.ids, inp.tw, inp.gate_up, inp.down, num_partitions=inp.P, backend="torch")
    assert_same_bits(a, b, "levels=None")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case_id", ["K_eq_E", "odd_I77_P4", "many_rows", "all_dropped"])
def test_split_layout(case_id, dtype):
    inp = build(CASES_BY_ID[case_id], dtype)
    I = inp.gate_up.shape[1] // 2
    gates = [g[:I] for g in inp.gate_up]
    ups = [g[I:] for g in inp.gate_up]
    downs = list(inp.down)
    got = ops.moe_experts_split(inp.x, inp.ids, inp.tw, gates, ups, downs, backend="torch", **inp.kwargs())
    assert_moe_close(got, inp, "split torch")


# ------------------------------------------------------------ the work done

class _Recorder:
    """Wraps the GEMM helpers of the torch backend and records, per call,
    the operand shapes and whether the weight operand is a view of the
    model's storage."""

    def __init__(self, monkeypatch, storages):
        self.calls = []
        self.storages = storages
        for name in ("_gmm_f32", "_mm_f32"):
            real = getattr(_torch_moe, name)
            monkeypatch.setattr(_torch_moe, name, self._wrap(real, name))

    def _wrap(self, real, name):
        def f(a, b, *args):
            self.calls.append((name, tuple(a.shape), tuple(b.shape), b.untyped_storage().data_ptr() in self.storages,
                               b.data_ptr()))
            return real(a, b, *args)
        return f


@pytest.mark.parametrize("path", ["grouped_mm", "loop"])
def test_weights_are_views_and_only_live_prefixes_are_computed(monkeypatch, path):
    """Every weight operand is a view of gate_up_proj / down_proj (same
    storage: nothing copied), and the gate products cover exactly the live
    pairs' prefixes: sum over calls of rows x width == sum over live pairs
    of (level * I) // P."""
    if path == "loop":
        real = _torch_moe.capabilities
        monkeypatch.setattr(_torch_moe, "capabilities",
                            lambda d, t: dict(real(d, t), grouped_mm=False, grouped_mm_f32=False))
    elif not _torch_moe.capabilities("cpu", torch.float32)["grouped_mm"]:
        pytest.skip("this torch has no CPU grouped_mm")
    inp = build(CASES_BY_ID["many_rows"], "float32")   # P = 2, random levels 0..2
    gu, dn = inp.gate_up, inp.down
    rec = _Recorder(monkeypatch, {gu.untyped_storage().data_ptr(), dn.untyped_storage().data_ptr()})
    out = run_torch(inp)
    assert_moe_close(out, inp, path)
    assert rec.calls and all(c[3] for c in rec.calls), "a weight operand is not a view of the model's weights"
    I, H = gu.shape[1] // 2, gu.shape[2]
    lv = inp.levels.long()
    live = int((lv > 0).sum())
    width = int(((lv * I) // inp.P).sum())

    def is_gate(c):  # the weight operand starts in an expert's gate rows [0, I) of gate_up_proj
        off = (c[4] - gu.data_ptr()) // gu.element_size()
        return 0 <= off < gu.numel() and off % (2 * I * H) < I * H

    gate_calls = [c for c in rec.calls if is_gate(c)]
    assert gate_calls
    # grouped: (E, H, n) views, or (E, H, 2I) (gate and up at once) when a range is every neuron;
    # loop: (H, n) views
    n_of = (lambda c: c[2][-1] if c[2][-1] <= I else c[2][-1] - I) if path == "grouped_mm" else (lambda c: c[2][1])
    assert max(c[1][0] for c in gate_calls) <= live
    assert sum(c[1][0] * n_of(c) for c in gate_calls) == width, "gate products beyond the live prefixes"
    if path == "grouped_mm":
        # one grouped GEMM per neuron range: each weight byte read once per call
        assert len(gate_calls) == len({c[4] for c in gate_calls}) <= inp.P


def test_partition_ranges_merge_partitions_with_the_same_rows():
    """Consecutive partitions needed by the same rows run as one range (as
    the engine's items do): an expert set with no partial rows runs as with
    one partition."""
    E, P, I = 2, 2, 10
    # cnt[e * P + (P - l)]: rows of e at level l
    assert _torch_moe.partition_ranges([3, 0, 1, 0], E, P, I) == [(1, 2, 0, 10, [3, 1])]
    assert _torch_moe.partition_ranges([3, 2, 0, 4], E, P, I) == [(1, 1, 0, 5, [5, 4]), (2, 2, 5, 10, [3, 0])]
    assert _torch_moe.partition_ranges([0, 2, 0, 0], E, P, I) == [(1, 1, 0, 5, [2, 0])]
    assert _torch_moe.partition_ranges([0, 0, 0, 0], E, P, I) == []


def test_two_thresholds_equal_is_one_threshold_bitwise():
    inp = build(CASES_BY_ID["many_rows"], "bfloat16")
    lv = (inp.levels > 0).to(torch.int8)
    one = ops.moe_experts(inp.x, inp.ids, inp.tw, inp.gate_up, inp.down, levels=lv, num_partitions=1,
                          backend="torch")
    two = ops.moe_experts(inp.x, inp.ids, inp.tw, inp.gate_up, inp.down, levels=2 * lv, num_partitions=2,
                          backend="torch")
    assert_same_bits(one, two, "2T(t, t) == 1T(t)")


def test_dropped_pairs_are_never_gathered():
    """Tokens whose pairs are all dropped may hold NaN (in x and in their
    combine weights): they are never read, their output is 0 and no other
    row is touched, as in the engine."""
    inp = build(CASES_BY_ID["many_rows"], "float32")
    lv = inp.levels.clone()
    lv[::3] = 0
    inp.levels = lv
    x = inp.x.clone()
    x[::3] = float("nan")
    tw = inp.tw.clone()
    tw[::3] = float("nan")
    got = ops.moe_experts(x, inp.ids, tw, inp.gate_up, inp.down, levels=lv, num_partitions=inp.P, backend="torch")
    assert torch.all(got[::3] == 0)
    assert torch.isfinite(got).all()
    want = ops.moe_experts(x, inp.ids, tw, inp.gate_up, inp.down, levels=lv, num_partitions=inp.P,
                           backend="engine")
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------ errors

def test_unknown_backend_is_named():
    inp = build(CASES_BY_ID["T1"], "float32")
    for bad in ("gpu", "", None, 3):
        with pytest.raises(ValueError, match=r"backend must be one of 'auto', 'engine', 'cuda', 'torch'; got "
                                             + repr(bad).replace("(", r"\(")):
            ops.moe_experts(inp.x, inp.ids, inp.tw, inp.gate_up, inp.down, backend=bad)


def test_forced_backends_that_cannot_serve_the_tensors():
    inp = build(CASES_BY_ID["T1"], "float32")
    args = (inp.x, inp.ids, inp.tw, inp.gate_up, inp.down)
    with pytest.raises(ValueError, match=r"backend='cuda' needs CUDA tensors; x is on cpu"):
        ops.moe_experts(*args, backend="cuda")
    meta = [t.to("meta") for t in args]
    with pytest.raises(ValueError, match=r"backend='engine' \(the C engine\) reads CPU tensors .* x is on meta"):
        ops.moe_experts(*meta, backend="engine")
    npy = build(CASES_BY_ID["T1"], "float32", kind="numpy")
    with pytest.raises(TypeError, match=r"backend='torch' needs torch tensors; x is a ndarray"):
        ops.moe_experts(npy.x, npy.ids, npy.tw, npy.gate_up, npy.down, backend="torch")
    with pytest.raises(NotImplementedError, match="timings"):
        ops.moe_experts(*args, backend="torch", timings=np.zeros(4))


def test_forced_cuda_backend_reports_why_the_module_is_unusable(monkeypatch):
    monkeypatch.setattr(dcuda, "available", lambda device=None: (False, "dualsparse._C_cuda is not available (x)"))

    class FakeCudaTensor:  # only what resolve_backend reads
        device = torch.device("cuda", 0)

    monkeypatch.setattr(ops, "_is_torch", lambda t: True)
    with pytest.raises(RuntimeError, match=r"backend='cuda': dualsparse._C_cuda is not usable: .*not available"):
        ops.resolve_backend("cuda", FakeCudaTensor())


BAD_INPUTS = {
    "ids_range": lambda i: dict(ids=_with(i.ids, (2, 1), 99)),
    "ids_negative": lambda i: dict(ids=_with(i.ids, (0, 0), -1)),
    "levels_range": lambda i: dict(levels=_with(i.levels, (3, 0), i.P + 1)),
    "ids_dtype": lambda i: dict(ids=i.ids.float()),
    "x_dtype": lambda i: dict(x=i.x.double()),
    "ids_shape": lambda i: dict(ids=i.ids[:-1]),
    "partitions": lambda i: dict(P=0),
    "weights_shape": lambda i: dict(down=i.down[:, :-1]),
    "out_overlap": lambda i: dict(out=i.x),
}


def _with(t, idx, v):
    t = t.clone()
    t[idx] = v
    return t


@pytest.mark.parametrize("what", sorted(BAD_INPUTS))
def test_errors_match_the_engine(what):
    inp = build(CASES_BY_ID["K_eq_E"], "float32")
    kw = dict(x=inp.x, ids=inp.ids, tw=inp.tw, gu=inp.gate_up, down=inp.down, levels=inp.levels, P=inp.P, out=None)
    kw.update(BAD_INPUTS[what](inp))

    def call(backend):
        return lambda: ops.moe_experts(kw["x"], kw["ids"], kw["tw"], kw["gu"], kw["down"], levels=kw["levels"],
                                       num_partitions=kw["P"], out=kw["out"], backend=backend)

    assert_same_error(call("engine"), call("torch"))


# ------------------------------------------------------------ auto and the CUDA self-test

def test_auto_is_the_engine_on_cpu(monkeypatch):
    inp = build(CASES_BY_ID["K_eq_E"], "bfloat16")
    assert ops.resolve_backend("auto", inp.x) == "engine"
    npy = build(CASES_BY_ID["K_eq_E"], "float32", kind="numpy")
    assert ops.resolve_backend("auto", npy.x) == "engine"
    monkeypatch.setattr(_torch_moe, "moe", lambda *a, **k: pytest.fail("torch backend called for CPU tensors"))
    assert_same_bits(ops.moe_experts(inp.x, inp.ids, inp.tw, inp.gate_up, inp.down, **inp.kwargs()),
                     run_engine(inp), "auto == engine")


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    import cuda_emu

    if cuda_emu.compilers() is None:
        pytest.skip("no C/C++ compiler for the CUDA emulation")
    return cuda_emu.load(cuda_emu.build(tmp_path_factory.mktemp("cuda_emu")))


class _Broken:
    """The emulated CUDA module with one defect: its moe_experts leaves the
    last output row unwritten (as a kernel that misses a block would)."""

    def __init__(self, m):
        self._m = m

    def __getattr__(self, name):
        return getattr(self._m, name)

    def moe_experts(self, *call):
        self._m.moe_experts(*call)
        args = next(a for a in call if isinstance(a, tuple))
        T, H, out_ptr, ldo, esz = args[0], args[4], args[-2], args[-1], {0: 4, 1: 2, 2: 2}[args[6]]
        ctypes.memset(out_ptr + (T - 1) * ldo * esz, 0x7F, H * esz)
        return None


@pytest.fixture
def fresh_selftests(monkeypatch):
    monkeypatch.setattr(dcuda, "_selftests", {})


def test_self_test_passes_on_a_correct_module(emu, fresh_selftests):
    """The self-test compares the module (here its host emulation, on CPU
    tensors) with the torch backend in three dtypes; a correct module passes
    and the result is cached per device."""
    ok, detail = dcuda.self_test("cpu", _module=emu)
    assert ok, detail
    assert dcuda._selftests["cpu"] == (True, "")


def test_self_test_fails_on_a_wrong_module(emu, fresh_selftests):
    ok, detail = dcuda.self_test("cpu", _module=_Broken(emu))
    assert not ok and "differ from the torch backend" in detail, detail


def test_self_test_failure_by_exception(fresh_selftests):
    class Raising:
        def moe_check(self, args):
            raise RuntimeError("cublas: CUBLAS_STATUS_NOT_SUPPORTED")

    ok, detail = dcuda.self_test("cpu", _module=Raising())
    assert not ok and "CUBLAS_STATUS_NOT_SUPPORTED" in detail


def test_auto_falls_back_to_torch_with_the_reason(monkeypatch, emu, fresh_selftests):
    """With a GPU present and a module that loads but computes wrong values,
    backend="auto" gives CUDA tensors to the torch backend, and status() and
    `info` say why.  (No GPU here: the device checks are simulated and the
    self-test runs the broken emulated module on CPU tensors.)"""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(dcuda, "available", lambda device=None: (True, ""))
    monkeypatch.setattr(dcuda, "_device_key", lambda device: "cpu")
    broken = _Broken(emu)
    real_self_test = dcuda.self_test
    monkeypatch.setattr(dcuda, "self_test", lambda key, **kw: real_self_test(key, _module=broken))
    backend, why = dcuda.path("cuda:0")
    assert backend == "torch"
    assert "failed its self-test" in why and "differ from the torch backend" in why
    st = dcuda.status()
    assert st["path"] == "torch" and st["reason"] == why and st["self_test"]["cpu"][0] is False

    class FakeCudaTensor:
        device = torch.device("cuda", 0)

    monkeypatch.setattr(ops, "_is_torch", lambda t: True)
    assert ops.resolve_backend("auto", FakeCudaTensor()) == "torch"
    # a correct module is chosen
    monkeypatch.setattr(dcuda, "_selftests", {})
    monkeypatch.setattr(dcuda, "self_test", lambda key, **kw: real_self_test(key, _module=emu))
    assert dcuda.path("cuda:0")[0] == "cuda"
    assert ops.resolve_backend("auto", FakeCudaTensor()) == "cuda"


def test_status_without_a_gpu():
    st = dcuda.status()
    assert st["path"] == "torch" and isinstance(st["reason"], str) and st["reason"]
    if not torch.cuda.is_available():
        assert "no CUDA device" in st["reason"]


def test_info_prints_the_cuda_path():
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "dualsparse", "info"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    line = [l for l in res.stdout.splitlines() if l.startswith("CUDA tensors")]
    assert line and ("backend 'torch'" in line[0] or "backend 'cuda'" in line[0]), res.stdout


# ------------------------------------------------------------ patched models

def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.double()


@pytest.fixture(scope="module")
def hf():
    pytest.importorskip("transformers")
    import hf_models

    return hf_models


FAMILY_LIST = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "phimoe", "gpt_oss"]


def _count_torch_calls(monkeypatch):
    calls = []
    real = _torch_moe.moe
    monkeypatch.setattr(_torch_moe, "moe", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize("family", FAMILY_LIST)
def test_patched_model_forced_torch_backend_fp32(hf, family, monkeypatch):
    """Every family in float32, with backend="torch" forced through
    patch(): 2T-Drop (dropped, half and full pairs) and no drop give the
    engine's logits, and without drops the unpatched model's; the torch
    backend really ran (GPT-OSS keeps its own implementation)."""
    import dualsparse as ds

    assert family in hf.FAMILIES
    ids = hf.input_ids()
    model = hf.build(family, dtype=torch.float32)
    unpatched = _logits(model, ids)
    calls = _count_torch_calls(monkeypatch)
    h = ds.patch(model, ds.NoDrop(), backend="torch")
    assert h.backend == "torch" and h.current_backend() == "torch"
    nodrop_torch = _logits(model, ids)
    ds.set_policy(model, ds.TwoThreshold(0.3, 0.6))
    ds.reset_stats(model)
    drop_torch = _logits(model, ids)
    assert bool(calls) == (family != "gpt_oss")
    st_torch = ds.drop_stats(model).overall
    h.backend = "engine"
    ds.reset_stats(model)
    drop_engine = _logits(model, ids)
    assert ds.drop_stats(model).overall == st_torch
    ds.set_policy(model, ds.NoDrop())
    nodrop_engine = _logits(model, ids)
    # reordered float32 sums: 16 ulps of the largest logit, as test_hf's no-drop test
    slack = 16 * torch.finfo(torch.float32).eps * float(unpatched.abs().max())
    assert float((nodrop_torch - nodrop_engine).abs().max()) <= slack
    assert float((drop_torch - drop_engine).abs().max()) <= slack
    assert float((nodrop_torch - unpatched).abs().max()) <= slack
    assert float((drop_torch - nodrop_torch).abs().max()) > 100 * slack, "the drop policy must change the output"
    assert 0 < st_torch < 1


@pytest.mark.parametrize("family", FAMILY_LIST)
def test_patched_model_forced_torch_backend_bf16(hf, family, monkeypatch):
    """bfloat16, no drop, backend="torch": as close to the float64 model as
    the unpatched bfloat16 model is (test_hf's criterion for the engine:
    1.5x its error plus 2 ulps of the largest logit), on every position
    before a routing tie.  The experts' outputs are rounded differently, so
    where a later layer's router logits tie at the top-K boundary (to within
    such roundings) the two models may choose different experts, which
    changes that token and, through attention, the later ones (seen on
    qwen3_moe with torch's AVX2 kernels): such divergences are checked to
    be ties (test_hf's complete_partition test does the same).  With drops,
    bf16 logits of two implementations cannot be compared: a hidden state
    one ulp apart can cross a threshold; the float32 test covers drops."""
    import dualsparse as ds
    import hf_reference as R

    ids = hf.input_ids()
    model = hf.build(family, dtype=torch.bfloat16)
    with R.RouterRecord(model) as ro:
        unpatched = _logits(model, ids)
    f64 = torch.float32 if (family == "deepseek_v3" and not hasattr(model, "set_experts_implementation")) \
        else torch.float64
    ref = _logits(hf.build(family, dtype=f64), ids)
    calls = _count_torch_calls(monkeypatch)
    ds.patch(model, ds.NoDrop(), backend="torch")
    with R.RouterRecord(model) as rp:
        patched = _logits(model, ids)
    assert bool(calls) == (family != "gpt_oss")
    assert sorted(rp.idx) == sorted(ro.idx) and ro.idx, "the routers' hooks must see every MoE layer"
    eps = torch.finfo(torch.bfloat16).eps
    keep = R.partition_divergence(ro, rp, 1, getattr(model.config, "num_experts_per_tok", 0), ids.shape,
                                  tol_eps=4 * eps)
    assert keep.float().mean() >= 0.5, f"routing diverged at too many positions ({keep})"
    err_u = float((unpatched - ref).abs()[keep].max())
    err_p = float((patched - ref).abs()[keep].max())
    slack = 2 * eps * float(ref.abs().max())
    assert err_p <= 1.5 * err_u + slack, (err_p, err_u, slack)
    ds.set_policy(model, ds.TwoThreshold(0.3, 0.6))
    assert torch.isfinite(_logits(model, ids)).all() and ds.drop_stats(model).overall > 0


def test_backend_from_the_environment(hf, monkeypatch):
    import dualsparse as ds

    ids = hf.input_ids()
    model = hf.build("olmoe")
    monkeypatch.setenv("DUALSPARSE_BACKEND", "torch")
    calls = []
    real = _torch_moe.moe
    monkeypatch.setattr(_torch_moe, "moe", lambda *a, **k: calls.append(1) or real(*a, **k))
    h = ds.patch(model, ds.OneThreshold(0.4))
    assert h.backend is None and h.current_backend() == "torch"
    a = _logits(model, ids)
    assert calls
    monkeypatch.setenv("DUALSPARSE_BACKEND", "engine")
    n = len(calls)
    b = _logits(model, ids)
    assert len(calls) == n
    assert float((a - b).abs().max()) <= 16 * torch.finfo(torch.float32).eps * float(b.abs().max())
    h.revert()
    monkeypatch.setenv("DUALSPARSE_BACKEND", "gpu")
    with pytest.raises(ValueError, match=r"DUALSPARSE_BACKEND must be one of .*; got 'gpu'"):
        ds.patch(model)
    monkeypatch.delenv("DUALSPARSE_BACKEND")
    with pytest.raises(ValueError, match=r"patch: backend must be one of .*; got 'fast'"):
        ds.patch(model, backend="fast")


def test_swiglu_fallback_drops_expert_parallel_sentinels():
    """torch_experts.swiglu_experts hands SiLU experts to moe_experts; ids
    >= E (the expert-parallel sentinel) are dropped pairs."""
    from dualsparse.hf import torch_experts

    inp = build(CASES_BY_ID["many_rows"], "float32")
    E = inp.gate_up.shape[0]
    ids = inp.ids.clone()
    ids[::4, 0] = E
    got = torch_experts.swiglu_experts(inp.x, ids, inp.tw, inp.gate_up, inp.down, inp.levels, inp.P,
                                       backend="torch")
    lv = inp.levels.clone()
    lv[::4, 0] = 0
    want = ops.moe_experts(inp.x, torch.where(ids >= E, 0, ids), inp.tw, inp.gate_up, inp.down, levels=lv,
                           num_partitions=inp.P, backend="engine")
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    # the masked computation (another activation) agrees on the same pairs
    masked = torch_experts.swiglu_experts(inp.x, ids, inp.tw, inp.gate_up, inp.down, inp.levels, inp.P,
                                          act=lambda t: torch.nn.functional.silu(t))
    assert torch.allclose(masked, want, rtol=1e-4, atol=1e-5)
