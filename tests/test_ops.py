"""dualsparse.ops against the float64 reference over the shared case table.

Tolerances (reference.moe_tolerance): float32 within 1e-5 of the output
scale (float32 accumulation over H and I terms); bfloat16/float16 compared
with a reference that rounds the activation like the engine, within one ulp
of the dtype on the summed magnitudes plus half an ulp for the final
rounding.  Properties that hold by construction (levels=None vs full levels,
P equivalences, layouts, stacking, inverse permutation) are checked bitwise.
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from dualsparse import _C, ops

import reference as R
from cases import (CASE_IDS, CASES_BY_ID, KIND_IDS, KINDS, SMALL_CASE_IDS, TORCH_DTYPES, Case,
                   assert_moe_close, assert_same_bits, bits, build)
from conftest import usable_simd_levels
from hang import HANG_S

TORCH_DT_IDS = ["float32", "bfloat16", "float16"]


def same_kind(out, like, dtype=None):
    """torch in -> torch out, NumPy in -> NumPy out, of the given dtype."""
    if isinstance(like, torch.Tensor):
        assert isinstance(out, torch.Tensor), type(out)
        if dtype is not None:
            assert out.dtype == dtype, out.dtype
    else:
        assert isinstance(out, np.ndarray), type(out)
        if dtype is not None:
            assert out.dtype == np.dtype(dtype), out.dtype


def run_moe(inp, **kw):
    args = dict(levels=inp.levels, num_partitions=inp.P)
    args.update(kw)
    return ops.moe_experts(inp.x, inp.ids, inp.tw, inp.gate_up, inp.down, **args)


# =============================================================== route_levels

def _route_weights(kind, dtype, gen):
    T, K = 37, 4
    w = torch.rand(T, K, generator=gen) + 1e-3
    # exact boundaries: rows that normalise to exactly 0.25 / 0.5 / 0.125
    w[0] = torch.tensor([1.0, 1.0, 1.0, 1.0])
    w[1] = torch.tensor([2.0, 1.0, 0.5, 0.5])
    w[2] = torch.tensor([0.5, 0.25, 0.125, 0.125])
    w = w.to(TORCH_DTYPES[dtype])
    return w.numpy() if kind == "numpy" else w


THRESHOLD_SETS = [[0.25], [0.2, 0.3], [0.125, 0.125], [0.05, 0.1, 0.25, 0.5], [0.5], [1e-9, 0.999]]


@pytest.mark.parametrize("out_dtype", ["int8", "int32"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("thr", THRESHOLD_SETS, ids=lambda t: "thr" + "_".join(map(str, t)))
@pytest.mark.parametrize("kind,dtype", KINDS, ids=KIND_IDS)
def test_route_levels_matches_reference(kind, dtype, thr, normalize, out_dtype, gen):
    w = _route_weights(kind, dtype, gen)
    lv = ops.route_levels(w, thr, normalize=normalize, dtype=out_dtype)
    if kind == "torch":
        assert isinstance(lv, torch.Tensor) and lv.dtype == getattr(torch, out_dtype)
        got = lv.numpy()
    else:
        assert isinstance(lv, np.ndarray) and lv.dtype == np.dtype(out_dtype)
        got = lv
    assert got.shape == tuple(w.shape)
    np.testing.assert_array_equal(got.astype(np.int64), R.ref_route_levels(w, thr, normalize))


def test_route_levels_boundaries_are_inclusive():
    # s >= t_j counts: a score exactly on a threshold reaches it
    w = torch.tensor([[1.0, 1.0, 1.0, 1.0], [3.0, 1.0, 0.0, 0.0]])
    lv = ops.route_levels(w, [0.25, 0.75])
    assert lv.tolist() == [[1, 1, 1, 1], [2, 1, 0, 0]]
    lv = ops.route_levels(w, [0.25], normalize=False)
    assert lv.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]


def test_route_levels_threshold_forms(gen):
    w = _route_weights("torch", "float32", gen)
    want = ops.route_levels(w, [0.25])
    for thr in (0.25, np.float64(0.25), np.array([0.25]), torch.tensor([0.25]), (0.25,), [np.float32(0.25)]):
        assert torch.equal(ops.route_levels(w, thr), want), thr


@pytest.mark.parametrize("kind", ["torch", "numpy"])
def test_route_levels_empty(kind):
    w = torch.rand(0, 3) if kind == "torch" else np.zeros((0, 3), np.float32)
    lv = ops.route_levels(w, [0.1, 0.2])
    assert tuple(lv.shape) == (0, 3)
    same_kind(lv, w)


def test_route_levels_default_dtype_int8():
    lv = ops.route_levels(np.ones((2, 2), np.float32), [0.5])
    assert lv.dtype == np.int8
    lv = ops.route_levels(torch.ones(2, 2), [0.5])
    assert lv.dtype == torch.int8


def test_route_levels_many_partitions():
    # 127 thresholds is the maximum; levels up to 127 fit int8
    thr = list(np.linspace(0.0, 1.0, 127))
    w = torch.rand(20, 3, generator=torch.Generator().manual_seed(1))
    lv = ops.route_levels(w, thr, normalize=False)
    np.testing.assert_array_equal(lv.numpy().astype(np.int64), R.ref_route_levels(w, thr, False))
    assert int(lv.max()) <= 127


# ================================================================ moe_experts

@pytest.mark.parametrize("kind,dtype", KINDS, ids=KIND_IDS)
@pytest.mark.parametrize("case_id", CASE_IDS)
def test_moe_experts_matches_reference(case_id, kind, dtype):
    inp = build(CASES_BY_ID[case_id], dtype, kind)
    out = run_moe(inp)
    same_kind(out, inp.x, TORCH_DTYPES[dtype] if kind == "torch" else dtype)
    assert tuple(out.shape) == (inp.case.T, inp.case.H)
    assert_moe_close(out, inp)
    if inp.case.levels == "zero":
        assert not np.any(R.to_f64(out)), "all pairs dropped: output must be exactly zero"


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("case_id", ["K_eq_E", "odd_H67_I77_P2", "many_rows", "H1100"])
def test_moe_experts_16bit_topk_weights(case_id, dtype):
    # topk_weights in x's dtype (the model's own router output) are accepted
    inp = build(CASES_BY_ID[case_id], dtype, "torch", tw_dtype=dtype)
    assert_moe_close(run_moe(inp), inp)


@pytest.mark.parametrize("ids_dtype", ["int32", "int64"])
@pytest.mark.parametrize("levels_dtype", ["int8", "uint8", "int16", "int32", "int64"])
def test_moe_experts_index_dtypes(ids_dtype, levels_dtype):
    case = CASES_BY_ID["odd_H67_I77_P2"]
    base = build(case, "float32")
    inp = build(case, "float32", ids_dtype=ids_dtype, levels_dtype=levels_dtype)
    assert bits(run_moe(inp)) == bits(run_moe(base))


@pytest.mark.parametrize("kind,dtype", KINDS, ids=KIND_IDS)
@pytest.mark.parametrize("case_id", ["T0", "T1", "odd_I77_P4", "few_experts"])
def test_moe_experts_out_argument(case_id, kind, dtype):
    inp = build(CASES_BY_ID[case_id], dtype, kind)
    ref = run_moe(inp)
    if kind == "torch":
        out = torch.full(tuple(ref.shape), float("nan"), dtype=ref.dtype)
    else:
        out = np.full(ref.shape, np.nan, dtype=ref.dtype)
    got = run_moe(inp, out=out)
    assert got is out
    assert bits(out) == bits(ref)


@pytest.mark.parametrize("case_id", ["odd_H67_I77_P2", "T1"])
def test_moe_experts_out_with_padded_rows(case_id):
    # out may be a row-strided view (row stride > H) and x too
    inp = build(CASES_BY_ID[case_id], "float32")
    T, H = inp.case.T, inp.case.H
    ref = run_moe(inp)
    big = torch.full((T, H + 5), 7.0)
    xbig = torch.zeros(T, H + 3)
    xbig[:, :H] = inp.x
    got = ops.moe_experts(xbig[:, :H], inp.ids, inp.tw, inp.gate_up, inp.down, levels=inp.levels,
                          num_partitions=inp.P, out=big[:, :H])
    assert bits(got) == bits(ref)
    assert torch.all(big[:, H:] == 7.0), "padding columns of out were written"


@pytest.mark.parametrize("dtype", TORCH_DT_IDS)
@pytest.mark.parametrize("case_id", SMALL_CASE_IDS + ["H1100"])
def test_moe_experts_every_simd_level(case_id, dtype, simd_level):
    inp = build(CASES_BY_ID[case_id], dtype)
    assert_moe_close(run_moe(inp), inp, what=f"simd={simd_level}")


def run_switched(inp, simd, switch, state, values, restore):
    """run_moe at level simd once per value of a process-wide switch
    (switch(v), checked with state() is v); the switch is set back to
    restore and the level to the one before, whatever happens."""
    before = ops.simd_level()
    outs = []
    try:
        ops.set_simd_level(simd)
        for v in values:
            switch(v)
            assert state() is v
            outs.append(run_moe(inp))
    finally:
        switch(restore)
        ops.set_simd_level(before)
    return outs


def moe_gemm_on_off(inp, simd):
    """run_moe at level simd with the block GEMM on, then off (both restored)."""
    assert ops.block_gemm() is True
    return run_switched(inp, simd, ops.set_block_gemm, ops.block_gemm, (True, False), True)


@pytest.mark.parametrize("dtype", TORCH_DT_IDS)
@pytest.mark.parametrize("case_id", ["few_experts", "rows70_H600_I300"])
def test_block_gemm_switch(case_id, dtype):
    """AVX2 sends blocks of 32 rows and more through its block GEMM; switched
    off, the dot tiles take them.  Both match the float64 reference, and the
    switch really changes the path (the summation order, hence some bits of
    the long sums of rows70_H600_I300; few_experts has 200 rows per expert,
    two blocks of 100 in the GEMM)."""
    if not ops.simd_levels()["avx2"]:
        pytest.skip("the block GEMM is an AVX2 kernel; this CPU/build has no AVX2 level")
    inp = build(CASES_BY_ID[case_id], dtype)
    on, off = moe_gemm_on_off(inp, "avx2")
    assert_moe_close(on, inp, what="block GEMM")
    assert_moe_close(off, inp, what="dot tiles")
    if case_id == "rows70_H600_I300":   # long sums: some outputs differ in their last bits
        assert not torch.equal(on, off), "switching the block GEMM off did not change the path"
    with pytest.raises(TypeError, match="enabled must be True or False; got int"):
        ops.set_block_gemm(1)
    assert ops.block_gemm() is True


@pytest.mark.parametrize("simd,dtype", [("avx512", "float32"), ("avx512_bf16", "float32"), ("amx_bf16", "float32"),
                                         ("avx512", "bfloat16"), ("avx512", "float16"), ("amx_bf16", "float16")])
def test_avx512_block_gemm_switch(simd, dtype):
    """AVX-512 sends blocks of 96 rows and more (float32) or 32 and more
    (bfloat16, float16) through its block GEMM; every AVX-512 level has the
    same float32 and float16 kernels, bfloat16 only the plain avx512 level.
    140 rows per expert make, in float32, one block of 128 rows on the GEMM
    and one of 12 on the dot tiles (16-bit: two of 70 on the GEMM); H = 1100
    makes two K blocks.  On and off both match the float64 reference, and the
    switch changes the path (long sums: some bits)."""
    if not ops.simd_levels().get(simd):
        pytest.skip(f"level {simd} not on this CPU/build")
    case = Case("rows140_H1100_I300", T=280, H=1100, I=300, E=2, K=1, P=1, levels="full")
    inp = build(case, dtype)
    on, off = moe_gemm_on_off(inp, simd)
    assert_moe_close(on, inp, what="AVX-512 block GEMM")
    assert_moe_close(off, inp, what="AVX-512 dot tiles")
    assert not torch.equal(on, off), "switching the block GEMM off did not change the path"


@pytest.mark.parametrize("dtype", TORCH_DT_IDS)
@pytest.mark.parametrize("case_id", ["T1", "H1100"])
def test_rows_four_switch(case_id, dtype):
    """Experts of 1-3 rows go through the GEMV-shaped kernel, which reads
    weight rows one at a time or four at a time (the CPU's vendor picks).
    Both match the float64 reference, the switch changes the path (H1100's
    rows of 1100 are long sums: some bits differ), and None restores the
    CPU's rule.  At the AVX2 level, whose rows kernel every dtype uses."""
    if not ops.simd_levels()["avx2"]:
        pytest.skip("the rows rule is in the x86 kernels; this CPU/build has no AVX2 level")
    inp = build(CASES_BY_ID[case_id], dtype)
    rule = ops.rows_four()
    four, one = run_switched(inp, "avx2", ops.set_rows_four, ops.rows_four, (True, False), None)
    assert ops.rows_four() is rule
    assert_moe_close(four, inp, what="rows four at a time")
    assert_moe_close(one, inp, what="rows one at a time")
    if case_id == "H1100" and dtype == "float32":
        assert not torch.equal(four, one), "switching the rows rule did not change the path"
    with pytest.raises(TypeError, match="four must be True, False or None; got int"):
        ops.set_rows_four(1)
    assert ops.rows_four() is rule


@pytest.mark.parametrize("value", ["generic", "avx2", "sse9", "avx512_bf16", "amx_bf16"])
def test_simd_level_from_the_environment(value):
    env = dict(os.environ, DUALSPARSE_SIMD=value)
    p = subprocess.run([sys.executable, "-c", "import dualsparse.ops as o; print(o.simd_level())"],
                       capture_output=True, text=True, env=env, timeout=HANG_S)
    if ops.simd_levels().get(value, False):
        assert p.returncode == 0 and p.stdout.strip() == value, p.stderr
    else:   # unknown, or not on this CPU: an error that names the variable, not a silent other level
        assert p.returncode != 0 and "DUALSPARSE_SIMD='%s'" % value in p.stderr, p.stderr


def test_simd_levels_api():
    levels = ops.simd_levels()
    assert list(levels) == ["generic", "avx2", "avx512", "avx512_bf16", "amx_bf16"]
    assert levels["generic"] is True
    assert ops.simd_level() in [k for k, v in levels.items() if v]
    usable = usable_simd_levels()
    # the level at import is the best usable one, or the one DUALSPARSE_SIMD names
    assert ops.simd_level() == (os.environ.get("DUALSPARSE_SIMD", "").strip() or usable[-1])
    for name in usable:
        ops.set_simd_level(name)
        assert ops.simd_level() == name
    for name in [k for k, v in levels.items() if not v]:
        with pytest.raises(NotImplementedError, match=name):
            ops.set_simd_level(name)
    with pytest.raises(ValueError, match="sse9"):
        ops.set_simd_level("sse9")


@pytest.mark.parametrize("dtype", TORCH_DT_IDS)
@pytest.mark.parametrize("case_id", CASE_IDS)
def test_levels_none_equals_all_full(case_id, dtype):
    inp = build(CASES_BY_ID[case_id], dtype)
    T, K = inp.case.T, inp.case.K
    full = torch.full((T, K), inp.P, dtype=torch.int8)
    a = run_moe(inp, levels=None)
    b = run_moe(inp, levels=full)
    assert bits(a) == bits(b)


@pytest.mark.parametrize("dtype", TORCH_DT_IDS)
@pytest.mark.parametrize("P", [2, 3, 4, 7])
@pytest.mark.parametrize("case_id", ["odd_H67_I77_P2", "odd_I131_P4", "many_rows", "H1100", "T1"])
def test_all_levels_P_equals_P1(case_id, P, dtype):
    """Every pair at level P computes all I neurons: the same function as P=1.
    (Bitwise equality is required of the 2T == 1T case below; here the
    results must agree within the dtype's tolerance.)"""
    inp = build(CASES_BY_ID[case_id], dtype, levels_dtype="int8")
    if P > inp.case.I:
        pytest.skip("P > I")
    T, K = inp.case.T, inp.case.K
    one = run_moe(inp, levels=None, num_partitions=1)
    allP = run_moe(inp, levels=torch.full((T, K), P, dtype=torch.int8), num_partitions=P)
    ref = R.ref_moe(inp.x, inp.ids, inp.tw, inp.gate_up, inp.down, None, 1, act_dtype=inp.act_dtype,
                    return_scale=True)
    assert_moe_close(one, inp, "P=1", ref=ref)
    assert_moe_close(allP, inp, f"all levels {P} of P={P}", ref=ref)


# ====================================================== partition-major down

def _divisors(I, limit=8):
    return [d for d in range(1, min(I, limit) + 1) if I % d == 0]


@pytest.mark.parametrize("kind,dtype", KINDS, ids=KIND_IDS)
@pytest.mark.parametrize("case_id", CASE_IDS)
def test_partition_down_layout_matches_reference(case_id, kind, dtype):
    """The (E, D, H, I/D) down layout against the float64 reference of the
    (E, H, I) weights, for D equal to the call's P (each level reads whole
    blocks) and for other divisors of I (prefixes that end inside a block)."""
    inp = build(CASES_BY_ID[case_id], dtype, kind)
    ds = sorted({d for d in (inp.P, 2, 3, 4) if inp.case.I % d == 0} | {1})
    for D in ds:
        parts = ops.partition_down(inp.down, D)
        assert tuple(parts.shape) == (inp.case.E, D, inp.case.H, inp.case.I // D)
        same_kind(parts, inp.down)
        out = ops.moe_experts(inp.x, inp.ids, inp.tw, inp.gate_up, parts, levels=inp.levels,
                              num_partitions=inp.P)
        assert_moe_close(out, inp, f"down in {D} blocks")


@pytest.mark.parametrize("dtype", TORCH_DT_IDS)
@pytest.mark.parametrize("case_id", ["odd_I131_P4", "many_rows", "H1100", "rows70_H600_I300", "few_experts"])
def test_partition_down_every_simd_level(case_id, dtype, simd_level):
    inp = build(CASES_BY_ID[case_id], dtype)
    for D in _divisors(inp.case.I, 4)[1:]:
        out = ops.moe_experts(inp.x, inp.ids, inp.tw, inp.gate_up, ops.partition_down(inp.down, D),
                              levels=inp.levels, num_partitions=inp.P)
        assert_moe_close(out, inp, f"down in {D} blocks, simd={simd_level}")


@pytest.mark.parametrize("dtype", TORCH_DT_IDS)
@pytest.mark.parametrize("case_id", ["K_eq_E", "odd_H67_I77_P2", "many_rows", "T1"])
def test_partition_down_bitwise_properties(case_id, dtype):
    """One block is the row layout (same memory, same bits); and with the
    blocks, 2T-Drop with equal thresholds is still bitwise 1T-Drop (a full
    row sums the same blocks whatever P the call has)."""
    inp = build(CASES_BY_ID[case_id], dtype)
    assert_same_bits(ops.moe_experts(inp.x, inp.ids, inp.tw, inp.gate_up, ops.partition_down(inp.down, 1),
                                     levels=inp.levels, num_partitions=inp.P), run_moe(inp), "D = 1")
    D = 2 if inp.case.I % 2 == 0 else 1
    parts = ops.partition_down(inp.down, D)
    lv2 = ops.route_levels(inp.tw, [0.3, 0.3])
    lv1 = ops.route_levels(inp.tw, [0.3])
    out2 = ops.moe_experts(inp.x, inp.ids, inp.tw, inp.gate_up, parts, levels=lv2, num_partitions=2)
    out1 = ops.moe_experts(inp.x, inp.ids, inp.tw, inp.gate_up, parts, levels=lv1, num_partitions=1)
    assert_same_bits(out2, out1, f"2T with equal thresholds vs 1T, down in {D} blocks")


@pytest.mark.parametrize("kind", ["torch", "numpy"])
def test_partition_down_round_trip(kind):
    g = torch.Generator().manual_seed(3)
    dn = torch.randn(3, 5, 12, generator=g)
    if kind == "numpy":
        dn = dn.numpy()
    for D in (1, 2, 3, 4, 6, 12):
        parts = ops.partition_down(dn, D)
        same_kind(parts, dn)
        for b in range(D):  # block b holds columns [b*I/D, (b+1)*I/D)
            want = dn[:, :, b * 12 // D:(b + 1) * 12 // D]
            assert bits(parts[:, b]) == bits(np.ascontiguousarray(want) if kind == "numpy" else want.contiguous())
        back = ops.unpartition_down(parts)
        assert bits(back) == bits(dn)


def test_partition_down_errors():
    inp = build(CASES_BY_ID["many_rows"], "float32")  # I = 160, H = 136, E = 4
    E, H, I = inp.case.E, inp.case.H, inp.case.I
    with pytest.raises(ValueError, match="num_parts must be in \\[1, 127\\] and divide I = 160; got 3"):
        ops.partition_down(inp.down, 3)
    with pytest.raises(ValueError, match="num_parts"):
        ops.partition_down(inp.down, 0)
    with pytest.raises(TypeError, match="num_parts must be an int; got bool"):
        ops.partition_down(inp.down, True)
    with pytest.raises(ValueError, match="down_proj must be a 3-D"):
        ops.partition_down(inp.down[0], 2)
    with pytest.raises(ValueError, match="down_parts must be a 4-D"):
        ops.unpartition_down(inp.down)

    def call(dn, **kw):
        return ops.moe_experts(inp.x, inp.ids, inp.tw, inp.gate_up, dn, levels=inp.levels,
                               num_partitions=inp.P, **kw)

    parts = ops.partition_down(inp.down, 2)
    for bad in (parts[:, :, :-1].contiguous(),                       # H off
                parts[:-1].contiguous(),                             # E off
                torch.zeros(E, 3, H, 53),                            # 3 * 53 != I
                torch.zeros(E, 2, H, 81)):                           # 2 * 81 != I
        with pytest.raises(ValueError, match="partition-major layout \\(E, D, H, I / D\\)"):
            call(bad)
    with pytest.raises(ValueError, match="down_proj must be contiguous"):
        call(ops.partition_down(inp.down, 2).transpose(2, 3).contiguous().transpose(2, 3))
    with pytest.raises(ValueError, match="must be 3-D \\(E, H, I\\) or 4-D"):
        call(parts[..., None])
    with pytest.raises(TypeError, match="down_proj is bfloat16 but gate_up_proj is float32"):
        call(parts.to(torch.bfloat16))
    with pytest.raises(ValueError, match="read by the C engine only.*unpartition_down"):
        call(parts, backend="torch")
    # permuting neurons needs the row layout, and refuses before writing anything
    gu0 = inp.gate_up.clone()
    perm = _random_perms(E, I, 1)
    with pytest.raises(NotImplementedError, match="column blocks"):
        ops.permute_neurons(inp.gate_up, parts, perm)
    assert bits(inp.gate_up) == bits(gu0)


@pytest.mark.parametrize("t", [0.2, 0.3, 0.45])
@pytest.mark.parametrize("dtype", TORCH_DT_IDS)
@pytest.mark.parametrize("case_id", ["K_eq_E", "odd_H67_I77_P2", "odd_I131_P4", "many_rows", "H1100"])
def test_two_equal_thresholds_are_one_threshold(case_id, dtype, t, simd_level):
    """2T-Drop with T_major == T_minor is exactly (bitwise) 1T-Drop, on every
    SIMD level."""
    inp = build(CASES_BY_ID[case_id], dtype)
    lv2 = ops.route_levels(inp.tw, [t, t])
    lv1 = ops.route_levels(inp.tw, [t])
    assert not torch.any(lv2 == 1), "level 1 cannot occur with equal thresholds"
    mapped = torch.where(lv2 == 2, 1, 0).to(torch.int8)
    assert torch.equal(mapped, lv1)
    out2 = run_moe(inp, levels=lv2, num_partitions=2)
    out1 = run_moe(inp, levels=lv1, num_partitions=1)
    assert_same_bits(out2, out1, f"P=2 levels [{t}, {t}] vs P=1 levels [{t}] ({simd_level})")
    # and both match the reference of the 1-threshold levels
    inp.levels, inp.P = lv1, 1
    ref = R.ref_moe(inp.x, inp.ids, inp.tw, inp.gate_up, inp.down, lv1, 1, act_dtype=inp.act_dtype,
                    return_scale=True)
    assert_moe_close(out1, inp, ref=ref)


@pytest.mark.parametrize("dtype", TORCH_DT_IDS)
def test_route_then_moe_two_thresholds(dtype):
    """route_levels output feeds moe_experts directly (2T-Drop, P=2)."""
    inp = build(CASES_BY_ID["odd_H67_I77_P2"], dtype)
    lv = ops.route_levels(inp.tw, [0.2, 0.4])
    assert set(lv.unique().tolist()) <= {0, 1, 2}
    out = run_moe(inp, levels=lv, num_partitions=2)
    ref = R.ref_moe(inp.x, inp.ids, inp.tw, inp.gate_up, inp.down, lv, 2, act_dtype=inp.act_dtype,
                    return_scale=True)
    assert_moe_close(out, inp, ref=ref)


# ============================================================ split layout

def _split_lists(inp):
    I = inp.case.I
    gates = [g[:I] for g in inp.gate_up]
    ups = [g[I:] for g in inp.gate_up]
    downs = [d for d in inp.down]
    return gates, ups, downs


@pytest.mark.parametrize("kind,dtype", KINDS, ids=KIND_IDS)
@pytest.mark.parametrize("case_id", SMALL_CASE_IDS)
def test_moe_experts_split_equals_fused(case_id, kind, dtype):
    inp = build(CASES_BY_ID[case_id], dtype, kind)
    fused = run_moe(inp)
    gates, ups, downs = _split_lists(inp)
    for form in (list, tuple):
        out = ops.moe_experts_split(inp.x, inp.ids, inp.tw, form(gates), form(ups), form(downs),
                                    levels=inp.levels, num_partitions=inp.P)
        same_kind(out, inp.x)
        assert bits(out) == bits(fused)


def _linear_modules(E, I, H, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda i, o: torch.nn.Linear(i, o, bias=False, dtype=dtype)  # noqa: E731
    gates = [mk(H, I) for _ in range(E)]
    ups = [mk(H, I) for _ in range(E)]
    downs = [mk(I, H) for _ in range(E)]
    with torch.no_grad():
        for m in list(gates) + list(ups) + list(downs):
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) / m.weight.shape[1] ** 0.5)
    return gates, ups, downs


@pytest.mark.parametrize("dtype", TORCH_DT_IDS)
def test_moe_experts_split_accepts_linear_modules(dtype):
    case = CASES_BY_ID["odd_H67_I77_P2"]
    inp = build(case, dtype)
    gates, ups, downs = _linear_modules(case.E, case.I, case.H, TORCH_DTYPES[dtype])
    with torch.no_grad():
        out_mod = ops.moe_experts_split(inp.x, inp.ids, inp.tw, gates, ups, downs, levels=inp.levels,
                                        num_partitions=inp.P)
    out_t = ops.moe_experts_split(inp.x, inp.ids, inp.tw, [m.weight.detach() for m in gates],
                                  [m.weight.detach() for m in ups], [m.weight.detach() for m in downs],
                                  levels=inp.levels, num_partitions=inp.P)
    assert bits(out_mod) == bits(out_t)
    gu = torch.stack([torch.cat([g.weight, u.weight]) for g, u in zip(gates, ups)]).detach()
    dn = torch.stack([d.weight for d in downs]).detach()
    ref = R.ref_moe(inp.x, inp.ids, inp.tw, gu, dn, inp.levels, inp.P, act_dtype=inp.act_dtype,
                    return_scale=True)
    assert_moe_close(out_mod, inp, ref=ref)


def test_split_layout_accepts_module_lists():
    """The docstrings promise *sequences* of weights or nn.Linear modules; a
    model holds them in an nn.ModuleList (stack_linear_experts accepts one)."""
    case = CASES_BY_ID["K_eq_E"]
    inp = build(case, "float32")
    gates, ups, downs = _linear_modules(case.E, case.I, case.H, torch.float32)
    with torch.no_grad():
        want = ops.moe_experts_split(inp.x, inp.ids, inp.tw, gates, ups, downs)
        ml = [torch.nn.ModuleList(m) for m in (gates, ups, downs)]
        got = ops.moe_experts_split(inp.x, inp.ids, inp.tw, *ml)
    assert bits(got) == bits(want)
    perm = _random_perms(case.E, case.I, 1)
    ops.permute_neurons_split(*ml, perm)


@pytest.mark.parametrize("dtype", TORCH_DT_IDS)
def test_moe_experts_split_accepts_3d_tensors(dtype):
    inp = build(CASES_BY_ID["K_eq_E"], dtype)
    I = inp.case.I
    out = ops.moe_experts_split(inp.x, inp.ids, inp.tw, inp.gate_up[:, :I], inp.gate_up[:, I:], inp.down,
                                levels=inp.levels, num_partitions=inp.P)
    assert bits(out) == bits(run_moe(inp))


# ======================================================= stack_linear_experts

@pytest.mark.parametrize("dtype", TORCH_DT_IDS)
def test_stack_linear_experts(dtype):
    case = CASES_BY_ID["odd_H67_I77_P2"]
    E, I, H = case.E, case.I, case.H
    tdt = TORCH_DTYPES[dtype]
    gates, ups, downs = _linear_modules(E, I, H, tdt, seed=3)
    owner = torch.nn.ModuleDict({"gate": torch.nn.ModuleList(gates), "up": torch.nn.ModuleList(ups),
                                 "down": torch.nn.ModuleList(downs)})
    before = {k: v.clone() for k, v in owner.state_dict().items()}
    inp = build(case, dtype)
    with torch.no_grad():
        split_out = ops.moe_experts_split(inp.x, inp.ids, inp.tw, gates, ups, downs,
                                          levels=inp.levels, num_partitions=inp.P)

    gu, dn = ops.stack_linear_experts(gates, ups, downs)

    assert gu.shape == (E, 2 * I, H) and dn.shape == (E, H, I)
    assert gu.dtype == tdt and dn.dtype == tdt
    assert gu.is_contiguous() and dn.is_contiguous()
    esz = gu.element_size()
    for e in range(E):
        # every module's weight is now a view of the stacked storage
        assert gates[e].weight.data_ptr() == gu.data_ptr() + e * 2 * I * H * esz
        assert ups[e].weight.data_ptr() == gu.data_ptr() + (e * 2 * I + I) * H * esz
        assert downs[e].weight.data_ptr() == dn.data_ptr() + e * H * I * esz
        assert gates[e].weight.untyped_storage().data_ptr() == gu.untyped_storage().data_ptr()
        assert downs[e].weight.untyped_storage().data_ptr() == dn.untyped_storage().data_ptr()
        assert isinstance(gates[e].weight, torch.nn.Parameter)
    after = owner.state_dict()
    assert list(after) == list(before)
    for k in before:
        assert after[k].shape == before[k].shape and after[k].dtype == before[k].dtype, k
        assert bits(after[k]) == bits(before[k]), f"{k} changed value"
    # writing through the stacked tensor is seen by the module (a true view)
    with torch.no_grad():
        old = gu[1, 0, 0].clone()
        gu[1, 0, 0] = 1.5
        assert gates[1].weight[0, 0].item() == 1.5
        gu[1, 0, 0] = old
    fused_out = ops.moe_experts(inp.x, inp.ids, inp.tw, gu, dn, levels=inp.levels, num_partitions=inp.P)
    assert bits(fused_out) == bits(split_out)
    with torch.no_grad():
        split_after = ops.moe_experts_split(inp.x, inp.ids, inp.tw, gates, ups, downs,
                                            levels=inp.levels, num_partitions=inp.P)
    assert bits(split_after) == bits(split_out)


def test_stack_linear_experts_rejects():
    gates, ups, downs = _linear_modules(3, 4, 6, torch.float32)
    with pytest.raises(ValueError, match="same number"):
        ops.stack_linear_experts(list(gates)[:2], ups, downs)
    with pytest.raises(ValueError, match="same number"):
        ops.stack_linear_experts([], [], [])
    biased = [torch.nn.Linear(6, 4) for _ in range(3)]
    with pytest.raises(ValueError, match=r"gate_proj\[0\] has a bias"):
        ops.stack_linear_experts(biased, ups, downs)
    wrong = list(downs)
    wrong[2] = torch.nn.Linear(4, 7, bias=False)
    with pytest.raises(ValueError, match=r"down_proj\[2\]\.weight is \(7, 4\)"):
        ops.stack_linear_experts(gates, ups, wrong)
    wrong = list(ups)
    wrong[1] = torch.nn.Linear(6, 4, bias=False, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"up_proj\[1\]"):
        ops.stack_linear_experts(gates, wrong, downs)
    with pytest.raises(TypeError, match=r"gate_proj\[0\] has no tensor \.weight"):
        ops.stack_linear_experts([object()] * 3, ups, downs)


# ================================================================ importance

def _assert_importance_close(acc, cnt, ref_acc, ref_cnt, what=""):
    """Metrics 0/2 (signed) are compared against the magnitude of metrics 1/3
    (the sums of the absolute terms): the engine computes a, b in float32 over
    H terms (relative error ~ sqrt(H) 2^-24) and sums in float64, so 1e-5 of
    the absolute sums (plus 1e-6 of the largest for near-zero neurons)."""
    assert acc.shape == ref_acc.shape
    mag = np.stack([ref_acc[1], ref_acc[1], ref_acc[3], ref_acc[3]])
    tol = 1e-5 * mag + 1e-6 * max(float(mag.max(initial=0.0)), 1e-30)
    err = np.abs(acc - ref_acc)
    if (err > tol).any():
        i = np.unravel_index(np.argmax(err - tol), err.shape)
        raise AssertionError(f"{what}: importance at {i}: got {acc[i]!r} expected {ref_acc[i]!r} "
                             f"(tol {tol[i]:.3g})")
    np.testing.assert_allclose(cnt, ref_cnt, rtol=1e-12, atol=0, err_msg=f"{what}: counts")


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("kind,dtype", KINDS, ids=KIND_IDS)
@pytest.mark.parametrize("case_id", CASE_IDS)
def test_neuron_importance_matches_reference(case_id, kind, dtype, weighted):
    inp = build(CASES_BY_ID[case_id], dtype, kind)
    E, I = inp.case.E, inp.case.I
    acc = np.zeros((4, E, I))
    cnt = np.zeros(E)
    r = ops.neuron_importance(inp.x, inp.ids, inp.gate_up, acc, counts=cnt,
                              topk_weights=inp.tw if weighted else None)
    assert r is acc
    ref_acc, ref_cnt = R.ref_importance(inp.x, inp.ids, inp.tw if weighted else None, inp.gate_up)
    _assert_importance_close(acc, cnt, ref_acc, ref_cnt, f"{case_id} {kind}-{dtype}")
    if not weighted:
        np.testing.assert_array_equal(cnt, np.bincount(R.to_i64(inp.ids).ravel(), minlength=E))


@pytest.mark.parametrize("dtype", TORCH_DT_IDS)
@pytest.mark.parametrize("case_id", ["odd_H67_I77_P2", "many_rows", "H1100", "empty_experts"])
def test_importance_every_simd_level(case_id, dtype, simd_level):
    inp = build(CASES_BY_ID[case_id], dtype)
    E, I = inp.case.E, inp.case.I
    acc, cnt = np.zeros((4, E, I)), np.zeros(E)
    ops.neuron_importance(inp.x, inp.ids, inp.gate_up, acc, counts=cnt, topk_weights=inp.tw)
    ref_acc, ref_cnt = R.ref_importance(inp.x, inp.ids, inp.tw, inp.gate_up)
    _assert_importance_close(acc, cnt, ref_acc, ref_cnt, f"{case_id} {dtype} {simd_level}")


def test_importance_torch_accumulators():
    inp = build(CASES_BY_ID["odd_H67_I77_P2"], "float32")
    E, I = inp.case.E, inp.case.I
    acc_np, cnt_np = np.zeros((4, E, I)), np.zeros(E)
    ops.neuron_importance(inp.x, inp.ids, inp.gate_up, acc_np, counts=cnt_np)
    acc_t = torch.zeros(4, E, I, dtype=torch.float64)
    cnt_t = torch.zeros(E, dtype=torch.float64)
    ops.neuron_importance(inp.x, inp.ids, inp.gate_up, acc_t, counts=cnt_t)
    assert bits(acc_t) == bits(acc_np) and bits(cnt_t) == bits(cnt_np)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dtype", TORCH_DT_IDS)
def test_importance_accumulator_streams(dtype, weighted):
    inp = build(CASES_BY_ID["many_rows"], dtype)
    E, I = inp.case.E, inp.case.I
    whole = ops.ImportanceAccumulator(E, I, weighted=weighted)
    whole.update(inp.x, inp.ids, inp.gate_up, topk_weights=inp.tw)
    parts = ops.ImportanceAccumulator(num_experts=E, intermediate_size=I, weighted=weighted)
    for a, b in [(0, 1), (1, 64), (64, 64), (64, 150)]:
        r = parts.update(inp.x[a:b], inp.ids[a:b], inp.gate_up, topk_weights=inp.tw[a:b])
        assert r is parts
    assert parts.tokens == whole.tokens == inp.case.T
    # the same sums, in float64, whatever the batching (the float32 dot
    # products may be tiled differently for different batch sizes)
    ref_acc, ref_cnt = R.ref_importance(inp.x, inp.ids, inp.tw if weighted else None, inp.gate_up)
    _assert_importance_close(parts.sums, parts.counts, ref_acc, ref_cnt, "streamed")
    np.testing.assert_array_equal(parts.counts, whole.counts)
    ref_acc, ref_cnt = R.ref_importance(inp.x, inp.ids, inp.tw if weighted else None, inp.gate_up)
    _assert_importance_close(whole.sums, whole.counts, ref_acc, ref_cnt)
    for i, name in enumerate(ops.METRICS):
        m = whole.metric(name)
        assert m.shape == (E, I) and m.dtype == np.float64
        assert bits(m) == bits(whole.sums[i])
        m[:] = 0  # a copy
        assert whole.sums[i].any()
    assert bits(whole.metric()) == bits(whole.sums[1]), "default metric is abs_gate"
    with pytest.raises(ValueError, match="metric must be one of"):
        whole.metric("bogus")


def test_importance_accumulator_checks():
    with pytest.raises(ValueError, match="num_experts must be >= 1; got 0"):
        ops.ImportanceAccumulator(0, 4)
    with pytest.raises(ValueError, match="intermediate_size must be >= 1; got 0"):
        ops.ImportanceAccumulator(4, 0)
    # a string or a float is refused by name, never converted (2.7 is not 2)
    with pytest.raises(TypeError, match=r"ImportanceAccumulator: num_experts must be an int; got str 'a'"):
        ops.ImportanceAccumulator("a", 5)
    with pytest.raises(TypeError, match=r"num_experts must be an int; got float 2.7"):
        ops.ImportanceAccumulator(2.7, 5)
    with pytest.raises(TypeError, match=r"intermediate_size must be an int; got bool"):
        ops.ImportanceAccumulator(2, True)
    assert ops.ImportanceAccumulator(np.int64(2), 5).num_experts == 2
    inp = build(CASES_BY_ID["K1"], "float32")
    acc = ops.ImportanceAccumulator(inp.case.E, inp.case.I, weighted=True)
    with pytest.raises(ValueError, match="needs topk_weights"):
        acc.update(inp.x, inp.ids, inp.gate_up)
    # unweighted ignores topk_weights
    a = ops.ImportanceAccumulator(inp.case.E, inp.case.I)
    b = ops.ImportanceAccumulator(inp.case.E, inp.case.I)
    a.update(inp.x, inp.ids, inp.gate_up)
    b.update(inp.x, inp.ids, inp.gate_up, topk_weights=inp.tw)
    assert bits(a.sums) == bits(b.sums) and bits(a.counts) == bits(b.counts)


@pytest.mark.parametrize("kind,dtype", KINDS, ids=KIND_IDS)
def test_importance_split_layout_equals_fused(kind, dtype):
    inp = build(CASES_BY_ID["odd_I131_P4"], dtype, kind)
    E, I = inp.case.E, inp.case.I
    acc1, cnt1 = np.zeros((4, E, I)), np.zeros(E)
    ops.neuron_importance(inp.x, inp.ids, inp.gate_up, acc1, counts=cnt1, topk_weights=inp.tw)
    gates, ups, _ = _split_lists(inp)
    acc2, cnt2 = np.zeros((4, E, I)), np.zeros(E)
    ops.neuron_importance(inp.x, inp.ids, gates, acc2, counts=cnt2, topk_weights=inp.tw, up_proj=ups)
    assert bits(acc1) == bits(acc2) and bits(cnt1) == bits(cnt2)
    acc3 = ops.ImportanceAccumulator(E, I, weighted=True)
    acc3.update(inp.x, inp.ids, gates, up_proj=ups, topk_weights=inp.tw)
    assert bits(acc3.sums) == bits(acc1)


# ======================================================= importance_order

def test_importance_order_stable_descending(rng):
    imp = rng.integers(0, 5, size=(6, 41)).astype(np.float64)  # many ties
    imp[0] = 1.0  # all equal: identity
    imp[1, ::2] = -0.0
    imp[1, 1::2] = 0.0  # -0.0 == 0.0: a tie too
    imp[2] = np.arange(41)  # ascending: reversed
    perm = ops.importance_order(imp)
    assert perm.dtype == np.int64 and perm.shape == imp.shape
    np.testing.assert_array_equal(perm, R.ref_importance_order(imp))
    np.testing.assert_array_equal(perm[0], np.arange(41))
    np.testing.assert_array_equal(perm[1], np.arange(41))
    np.testing.assert_array_equal(perm[2], np.arange(41)[::-1])
    for e in range(imp.shape[0]):
        v = imp[e, perm[e]]
        assert np.all(v[:-1] >= v[1:])
        for j in range(40):  # ties keep their original order
            if v[j] == v[j + 1]:
                assert perm[e, j] < perm[e, j + 1]


def test_importance_order_inputs(rng):
    imp = rng.standard_normal((3, 17))
    want = R.ref_importance_order(imp)
    np.testing.assert_array_equal(ops.importance_order(imp), want)
    np.testing.assert_array_equal(ops.importance_order(torch.from_numpy(imp)), want)
    np.testing.assert_array_equal(ops.importance_order(imp.tolist()), want)
    np.testing.assert_array_equal(ops.importance_order(np.asfortranarray(imp)), want)
    imp32 = imp.astype(np.float32)
    np.testing.assert_array_equal(ops.importance_order(imp32), R.ref_importance_order(imp32))
    np.testing.assert_array_equal(ops.importance_order(np.zeros((1, 1))), [[0]])
    # an accumulator's metric goes straight in
    acc = ops.ImportanceAccumulator(3, 17)
    acc.sums[1] = imp
    np.testing.assert_array_equal(ops.importance_order(acc.metric("abs_gate")), want)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_importance_order_rejects_non_finite(bad):
    imp = np.ones((2, 5))
    imp[1, 3] = bad
    with pytest.raises(ValueError, match=r"importance\[1, 3\]"):
        ops.importance_order(imp)


def test_importance_order_rejects_shapes():
    with pytest.raises(ValueError, match="2-D"):
        ops.importance_order(np.ones(5))
    with pytest.raises(ValueError, match="importance"):
        ops.importance_order(np.ones((0, 5)))
    with pytest.raises(ValueError, match="importance"):
        ops.importance_order(np.ones((2, 0)))


def test_inverse_permutation(rng):
    perm = np.stack([rng.permutation(23) for _ in range(5)])
    inv = ops.inverse_permutation(perm)
    assert inv.dtype == np.int64
    np.testing.assert_array_equal(inv, R.ref_inverse_permutation(perm))
    rows = np.arange(5)[:, None]
    np.testing.assert_array_equal(inv[rows, perm], np.broadcast_to(np.arange(23), (5, 23)))
    np.testing.assert_array_equal(perm[rows, inv], np.broadcast_to(np.arange(23), (5, 23)))
    np.testing.assert_array_equal(ops.inverse_permutation(torch.from_numpy(perm)), inv)
    np.testing.assert_array_equal(ops.inverse_permutation(inv), perm)
    with pytest.raises(ValueError, match="2-D"):
        ops.inverse_permutation(np.arange(4))


# ========================================================== permute_neurons

def _clone(a):
    return a.clone() if isinstance(a, torch.Tensor) else a.copy()


def _random_perms(E, I, seed):
    g = np.random.default_rng(seed)
    perms = np.stack([g.permutation(I) for _ in range(E)])
    perms[0] = np.arange(I)  # identity for one expert
    if E > 1 and I > 1:
        perms[1] = np.arange(I)[::-1]  # reversal for another
    return perms


@pytest.mark.parametrize("kind,dtype", KINDS, ids=KIND_IDS)
@pytest.mark.parametrize("case_id", ["odd_H67_I77_P2", "odd_I131_P4", "I1", "H1", "T0", "many_rows"])
def test_permute_neurons(case_id, kind, dtype):
    inp = build(CASES_BY_ID[case_id], dtype, kind)
    E, I = inp.case.E, inp.case.I
    perm = _random_perms(E, I, 5)
    gu0, dn0 = _clone(inp.gate_up), _clone(inp.down)
    # full levels: the permutation changes no function value
    out0 = run_moe(inp, levels=None, num_partitions=1)
    assert ops.permute_neurons(inp.gate_up, inp.down, perm) is None
    want_gu, want_dn = R.ref_permute(gu0, dn0, perm)
    assert bits(inp.gate_up) == bits(want_gu)
    assert bits(inp.down) == bits(want_dn)
    out1 = run_moe(inp, levels=None, num_partitions=1)
    ref = R.ref_moe(inp.x, inp.ids, inp.tw, gu0, dn0, None, 1, act_dtype=inp.act_dtype, return_scale=True)
    assert_moe_close(out0, inp, "before permutation", ref=ref)
    assert_moe_close(out1, inp, "after permutation", ref=ref)
    ops.permute_neurons(inp.gate_up, inp.down, perm, inverse=True)
    assert bits(inp.gate_up) == bits(gu0), "inverse did not restore gate_up bitwise"
    assert bits(inp.down) == bits(dn0), "inverse did not restore down_proj bitwise"
    # permuting by the inverse permutation is the same as inverse=True
    ops.permute_neurons(inp.gate_up, inp.down, perm)
    ops.permute_neurons(inp.gate_up, inp.down, ops.inverse_permutation(perm))
    assert bits(inp.gate_up) == bits(gu0) and bits(inp.down) == bits(dn0)
    # torch perm accepted
    ops.permute_neurons(inp.gate_up, inp.down, torch.from_numpy(perm))
    assert bits(inp.gate_up) == bits(want_gu)


def test_permute_neurons_by_importance_keeps_output():
    """The reconstruction flow: importance -> order -> permute; outputs unchanged."""
    inp = build(CASES_BY_ID["odd_I131_P4"], "float32")
    E, I = inp.case.E, inp.case.I
    acc = ops.ImportanceAccumulator(E, I)
    acc.update(inp.x, inp.ids, inp.gate_up)
    perm = ops.importance_order(acc.metric("abs_gate"))
    imp_before = acc.metric("abs_gate")
    out0 = run_moe(inp, levels=None)
    ops.permute_neurons(inp.gate_up, inp.down, perm)
    out1 = run_moe(inp, levels=None)
    np.testing.assert_allclose(out1.numpy(), out0.numpy(), rtol=0, atol=2e-5 * float(out0.abs().max()))
    # the permuted experts have their neurons in descending importance
    acc2 = ops.ImportanceAccumulator(E, I)
    acc2.update(inp.x, inp.ids, inp.gate_up)
    m = acc2.metric("abs_gate")
    np.testing.assert_allclose(m, np.take_along_axis(imp_before, perm, 1), rtol=1e-5, atol=1e-9)
    assert np.all(np.diff(np.take_along_axis(imp_before, perm, 1), axis=1) <= 0)


@pytest.mark.parametrize("modules", [False, True])
@pytest.mark.parametrize("dtype", TORCH_DT_IDS)
def test_permute_neurons_split(dtype, modules):
    case = CASES_BY_ID["odd_H67_I77_P2"]
    E, I, H = case.E, case.I, case.H
    gates, ups, downs = _linear_modules(E, I, H, TORCH_DTYPES[dtype], seed=9)
    g0 = [m.weight.detach().clone() for m in gates]
    u0 = [m.weight.detach().clone() for m in ups]
    d0 = [m.weight.detach().clone() for m in downs]
    perm = _random_perms(E, I, 11)
    if modules:
        ops.permute_neurons_split(gates, ups, downs, perm)
    else:
        ops.permute_neurons_split([m.weight for m in gates], [m.weight for m in ups],
                                  [m.weight for m in downs], perm)
    for e in range(E):
        assert bits(gates[e].weight) == bits(g0[e][perm[e]])
        assert bits(ups[e].weight) == bits(u0[e][perm[e]])
        assert bits(downs[e].weight) == bits(d0[e][:, perm[e]])
    ops.permute_neurons_split(gates, ups, downs, perm, inverse=True)
    for e in range(E):
        assert bits(gates[e].weight) == bits(g0[e])
        assert bits(ups[e].weight) == bits(u0[e])
        assert bits(downs[e].weight) == bits(d0[e])


def test_permute_neurons_split_equals_fused():
    inp = build(CASES_BY_ID["odd_I77_P4"], "bfloat16")
    perm = _random_perms(inp.case.E, inp.case.I, 2)
    gates, ups, downs = (list(map(torch.clone, l)) for l in _split_lists(inp))
    ops.permute_neurons_split(gates, ups, downs, perm)
    ops.permute_neurons(inp.gate_up, inp.down, perm)
    I = inp.case.I
    assert bits(torch.stack(gates)) == bits(inp.gate_up[:, :I])
    assert bits(torch.stack(ups)) == bits(inp.gate_up[:, I:])
    assert bits(torch.stack(downs)) == bits(inp.down)


def test_permute_neurons_parameters_with_grad():
    # permutation works on nn.Parameters that require grad (no autograd involved)
    gates, ups, downs = _linear_modules(2, 5, 4, torch.float32)
    assert gates[0].weight.requires_grad
    g0 = gates[0].weight.detach().clone()
    perm = np.stack([np.arange(5)[::-1], np.arange(5)])
    ops.permute_neurons_split(gates, ups, downs, perm)
    assert bits(gates[0].weight) == bits(g0.flip(0))
    assert gates[0].weight.requires_grad


# ================================================================= autograd

def _grad_inputs():
    inp = build(CASES_BY_ID["K_eq_E"], "float32")
    return inp


@pytest.mark.parametrize("which", ["x", "gate_up", "down", "tw"])
def test_requires_grad_rejected_under_autograd(which):
    inp = _grad_inputs()
    want = run_moe(inp)
    setattr(inp, which, getattr(inp, which).clone().requires_grad_(True))
    name = {"x": "x", "gate_up": "gate_up_proj", "down": "down_proj", "tw": "topk_weights"}[which]
    assert torch.is_grad_enabled()
    with pytest.raises(ValueError, match=f"{name} requires grad"):
        run_moe(inp)
    with torch.no_grad():
        got = run_moe(inp)
    assert not got.requires_grad
    assert bits(got) == bits(want)
    with torch.inference_mode():
        assert bits(run_moe(inp)) == bits(want)


def test_requires_grad_split_and_importance():
    case = CASES_BY_ID["K_eq_E"]
    inp = build(case, "float32")
    gates, ups, downs = _linear_modules(case.E, case.I, case.H, torch.float32)
    with pytest.raises(ValueError, match=r"gate_proj\[0\] requires grad"):
        ops.moe_experts_split(inp.x, inp.ids, inp.tw, gates, ups, downs)
    with torch.no_grad():
        ops.moe_experts_split(inp.x, inp.ids, inp.tw, gates, ups, downs)
    gu = inp.gate_up.clone().requires_grad_(True)
    acc = np.zeros((4, case.E, case.I))
    with pytest.raises(ValueError, match="gate_up_proj requires grad"):
        ops.neuron_importance(inp.x, inp.ids, gu, acc)
    assert not acc.any()
    with torch.no_grad():
        ops.neuron_importance(inp.x, inp.ids, gu, acc)
    assert acc.any()
    with pytest.raises(ValueError, match="topk_weights requires grad"):
        ops.route_levels(inp.tw.clone().requires_grad_(True), [0.2])
    with torch.no_grad():
        ops.route_levels(inp.tw.clone().requires_grad_(True), [0.2])


def test_out_requiring_grad_rejected():
    inp = _grad_inputs()
    out = torch.zeros(inp.case.T, inp.case.H, requires_grad=True)
    with pytest.raises(ValueError, match="out must not require grad"):
        run_moe(inp, out=out)


# ----------------------------------------------------- hostile arguments

def test_inverse_permutation_validates():
    """Duplicates, negatives, out-of-range values, non-integers and wrong
    shapes are refused with the function's name (NumPy would return
    uninitialised memory for a duplicate and wrap a negative index)."""
    good = np.array([[2, 0, 1], [0, 1, 2]])
    np.testing.assert_array_equal(ops.inverse_permutation(good), R.ref_inverse_permutation(good))
    np.testing.assert_array_equal(ops.inverse_permutation(torch.from_numpy(good)),
                                  R.ref_inverse_permutation(good))
    cases = [
        ([[0, 0, 1]], ValueError, r"inverse_permutation: perm\[0\] is not a permutation: 0 appears twice"),
        ([[0, -1, 1]], ValueError, r"inverse_permutation: perm\[0, 1\] = -1 is outside \[0, I=3\)"),
        ([[0, 3, 1]], ValueError, r"inverse_permutation: perm\[0, 1\] = 3 is outside \[0, I=3\)"),
        ([[0.0, 1.0]], TypeError, r"inverse_permutation: perm must hold integers.*float64"),
        ([[True, False]], TypeError, r"inverse_permutation: perm must hold integers.*bool"),
        ([0, 1, 2], ValueError, r"inverse_permutation: perm must be 2-D"),
        (np.array([[2 ** 64 - 1, 0]], dtype=np.uint64), ValueError, r"inverse_permutation: perm holds 18446744073709551615"),
    ]
    for perm, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            ops.inverse_permutation(perm)


def test_perm_errors_name_the_function_and_perm():
    E, I, H = 2, 4, 3
    gu = torch.randn(E, 2 * I, H)
    dn = torch.randn(E, H, I)
    gu0, dn0 = gu.clone(), dn.clone()
    with pytest.raises(ValueError, match=r"^permute_neurons: perm\[0, 1\] = 7 is outside \[0, I=4\)"):
        ops.permute_neurons(gu, dn, np.array([[0, 7, 1, 2], [0, 1, 2, 3]]))
    with pytest.raises(ValueError, match=r"^permute_neurons: perm\[1\] is not a permutation: 1 appears twice"):
        ops.permute_neurons(gu, dn, np.array([[0, 1, 2, 3], [1, 1, 2, 3]]))
    with pytest.raises(ValueError, match=r"^permute_neurons: perm holds 18446744073709551615"):
        ops.permute_neurons(gu, dn, np.full((E, I), 2 ** 64 - 1, dtype=np.uint64))
    with pytest.raises(TypeError, match=r"^permute_neurons_split: perm must hold integers"):
        ops.permute_neurons_split(list(gu[:, :I]), list(gu[:, I:]), list(dn), np.zeros((E, I)))
    assert torch.equal(gu, gu0) and torch.equal(dn, dn0)


def test_route_levels_row_sum_overflow():
    """A float64 row whose sum overflows: the scores are still w / sum
    (0.5, 0.5 here), not 0 (w / inf)."""
    w = np.array([[1e308, 1e308], [1.5e308, 0.5e308], [1.0, 3.0]])
    got = ops.route_levels(w, [0.25, 0.5, 0.7])
    # scores: (0.5, 0.5), (0.75, 0.25), (0.25, 0.75)
    assert got.tolist() == [[2, 2], [3, 1], [1, 3]]
    t = torch.from_numpy(w)
    assert ops.route_levels(t, [0.25, 0.5, 0.7]).tolist() == [[2, 2], [3, 1], [1, 3]]
    # the torch path (devices the engine cannot read) follows the same rule
    lv = torch.empty((3, 2), dtype=torch.int8)
    ops._route_levels_torch(t, [0.25, 0.5, 0.7], True, lv)
    assert lv.tolist() == [[2, 2], [3, 1], [1, 3]]


@pytest.mark.parametrize("bad,exc,msg", [
    (True, TypeError, "a bool"),
    (False, TypeError, "a bool"),
    ([0.1, True], TypeError, r"thresholds\[1\] is True, a bool"),
    (np.array([True]), TypeError, "boolean"),
    ({0.1: 1, 0.2: 2}, TypeError, "got dict"),
    ({0.1, 0.2}, TypeError, "got set"),
    ("0.1", TypeError, "got str"),
    ([10 ** 400], ValueError, r"thresholds\[0\] = 1000.* is too large for a float"),
    ([0.1, "a"], TypeError, r"thresholds\[1\] must be a real number"),
])
def test_route_levels_refuses_non_number_thresholds(bad, exc, msg):
    w = np.array([[0.2, 0.8]], dtype=np.float32)
    with pytest.raises(exc, match=msg):
        ops.route_levels(w, bad)


@pytest.mark.parametrize("bad,exc,msg", [
    (True, TypeError, "bool"),
    ([0.1, False], TypeError, r"thresholds\[1\] is False, a bool"),
    ({0.1: 1}, TypeError, "list or tuple"),
    ({0.1}, TypeError, "list or tuple"),
    ([10 ** 400], ValueError, r"thresholds\[0\] = 1000.* is too large for a float"),
])
def test_raw_route_levels_refuses_non_number_thresholds(bad, exc, msg):
    w = np.array([[0.2, 0.8]], dtype=np.float32)
    lv = np.empty((1, 2), dtype=np.int8)
    with pytest.raises(exc, match=msg):
        _C.route_levels(w, bad, True, lv)


def test_patch_refuses_meta_weights():
    """A model whose expert weights are on the meta device (no data) is
    refused at patch time, with what to do, instead of failing later."""
    import dualsparse as ds
    from hf_models import build as build_model

    model = build_model("olmoe").to("meta")
    with pytest.raises(ValueError, match=r"dualsparse.patch: .* is on the 'meta' device.*load the real weights"):
        ds.patch(model, ds.NoDrop())
    assert getattr(model, "_dualsparse_handle", None) is None


def test_policy_threshold_range_and_types():
    """Normalised scores lie in [0, 1]: a threshold outside is accepted (it
    saturates) with a ThresholdRangeWarning naming what it means; bools,
    dicts, sets and huge integers are refused by name."""
    import warnings

    import dualsparse as ds
    from dualsparse.policies import ThresholdRangeWarning

    with pytest.warns(ThresholdRangeWarning, match=r"OneThreshold: threshold 1.5 is above 1.*every pair is dropped"):
        ds.OneThreshold(1.5)
    with pytest.warns(ThresholdRangeWarning, match=r"OneThreshold: threshold -0.1 is below 0.*nothing is dropped"):
        ds.OneThreshold(-0.1)
    with pytest.warns(ThresholdRangeWarning, match="TwoThreshold: threshold 1.2 is above 1"):
        ds.TwoThreshold(0.5, 1.2)
    with pytest.warns(ThresholdRangeWarning, match="Thresholds: threshold -0.5 is below 0"):
        ds.Thresholds([-0.5, 0.5])
    with pytest.warns(ThresholdRangeWarning, match="DynamicSkip: beta 1.5 is above 1"):
        ds.DynamicSkip([[1.5]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds.OneThreshold(0.0), ds.OneThreshold(1.0), ds.TwoThreshold(0.1, 0.3), ds.Thresholds([0.2, 0.9])
        ds.Thresholds([5.0], normalize=False)  # raw weights: any finite value
    # the saturated values keep their meaning: 1.01 drops every pair, -0.1 none
    w = torch.tensor([[0.3, 0.7], [1.0, 0.0]])
    with pytest.warns(ThresholdRangeWarning):
        assert ds.OneThreshold(1.01).route(w, None, 0)[0].tolist() == [[0, 0], [0, 0]]
    with pytest.warns(ThresholdRangeWarning):
        assert ds.OneThreshold(-0.1).route(w, None, 0)[0].tolist() == [[1, 1], [1, 1]]
    for bad, msg in [(True, "a bool"), ([0.1, True], "a bool"), ({0.1: 1}, "got dict"), ({0.2}, "got set"),
                     ("0.1", "got str"), (10 ** 400, "too large for a float"), (np.array([True]), "boolean")]:
        with pytest.raises((TypeError, ValueError), match=msg):
            ds.OneThreshold(bad)
    with pytest.raises(TypeError, match="t_minor must be numbers"):
        ds.TwoThreshold(0.1, False)
    with pytest.raises(TypeError, match="a bool"):
        ds.Thresholds([[0.1, True]])
    with pytest.raises(TypeError, match="RandomDrop: rate must be a number"):
        ds.RandomDrop(True)
    with pytest.raises(TypeError, match="DynamicSkip: betas must be numbers"):
        ds.DynamicSkip([[True]])
