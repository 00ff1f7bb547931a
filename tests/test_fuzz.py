"""Fuzzing the binding: random shapes (zeros where legal), dtypes, strides and
valid / invalid values.  Every call either returns numbers matching the
float64 reference or raises TypeError / ValueError; a call built only from
valid arguments must succeed and one with an injected fault must fail.

Each example is generated from one integer seed (numpy Generator), so a
failure message's seed reproduces it: `python -c "import test_fuzz as f;
f.moe_example(SEED)"` from tests/.  Plain seeded loops always run; when
hypothesis is installed it drives extra seeds (derandomized, bounded).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dualsparse import ops

import reference as R
from conftest import usable_simd_levels

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    HAVE_HYPOTHESIS = True
except ImportError:  # pragma: no cover
    HAVE_HYPOTHESIS = False

TORCH_DT = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
INT_DT = ["int8", "uint8", "int16", "int32", "int64"]


# ---------------------------------------------------------------- builders

def _tensor(kind, a: np.ndarray, dtype: str):
    """A float64/int64 NumPy array as a `kind` container of `dtype`."""
    if kind == "torch":
        if dtype in TORCH_DT:
            return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(TORCH_DT[dtype])
        return torch.from_numpy(np.ascontiguousarray(a).astype(dtype))
    return np.ascontiguousarray(a).astype(dtype)


def _strided(rng, kind, a, allow_negative=True):
    """The same values, in a random memory layout: contiguous, transposed,
    every other row / column of a larger buffer, or reversed (NumPy)."""
    mode = rng.integers(0, 5)
    if a.ndim != 2 or mode == 0:
        return a
    T, K = a.shape
    if mode == 1:  # column-major
        return a.T.contiguous().T if kind == "torch" else np.asfortranarray(a)
    if mode == 2:  # step-2 columns
        big = (torch.zeros if kind == "torch" else np.zeros)((T, 2 * K), dtype=a.dtype)
        big[:, ::2] = a
        return big[:, ::2]
    if mode == 3:  # step-2 rows
        big = (torch.zeros if kind == "torch" else np.zeros)((2 * T, K), dtype=a.dtype)
        big[::2] = a
        return big[::2]
    if kind == "numpy" and allow_negative:  # negative strides
        return np.ascontiguousarray(a[::-1, ::-1])[::-1, ::-1]
    return a


def _weights(rng, kind, dtype, E, I, H):
    gu = rng.standard_normal((E, 2 * I, H)) / np.sqrt(H)
    dn = rng.standard_normal((E, H, I)) / np.sqrt(I)
    return _tensor(kind, gu, dtype), _tensor(kind, dn, dtype)


def _ids(rng, T, K, E, dup=False):
    if T == 0:
        return np.zeros((0, K), np.int64)
    if dup:  # repeated experts inside a row are not rejected: each pair counts
        return rng.integers(0, E, size=(T, K))
    return np.stack([rng.permutation(E)[:K] for _ in range(T)]).reshape(T, K)


def _x(rng, kind, dtype, T, H):
    x = rng.standard_normal((T, H))
    mode = rng.integers(0, 3)
    if mode == 0 or T == 0:
        return _tensor(kind, x, dtype)
    if mode == 1:  # rows with a stride > H
        pad = int(rng.integers(1, 9))
        big = _tensor(kind, np.zeros((T, H + pad)), dtype)
        big[:, :H] = _tensor(kind, x, dtype)
        return big[:, :H]
    # fully transposed: the Python layer makes it row-major once
    xt = _tensor(kind, x.T.copy(), dtype)
    return xt.T


def _check_outcome(seed, fault, fn, on_success):
    try:
        result = fn()
    except (TypeError, ValueError) as exc:
        assert fault is not None, f"seed {seed}: valid example rejected: {type(exc).__name__}: {exc}"
        return exc
    except Exception as exc:  # pragma: no cover - reported
        raise AssertionError(f"seed {seed}: {type(exc).__name__} is neither TypeError nor ValueError: {exc}")
    assert fault is None, f"seed {seed}: invalid example accepted (injected fault: {fault})"
    on_success(result)
    return None


# ------------------------------------------------------------ moe_experts

def moe_example(seed: int):
    rng = np.random.default_rng(seed)
    levels_avail = usable_simd_levels()
    ops.set_simd_level(levels_avail[int(rng.integers(0, len(levels_avail)))])
    kind = "torch" if rng.random() < 0.6 else "numpy"
    dtype = rng.choice(["float32", "bfloat16", "float16"] if kind == "torch" else ["float32", "float16"])
    big = rng.random() < 0.1
    E = int(rng.integers(1, 7))
    I = int(rng.integers(1, 140 if big else 24))
    H = int(rng.integers(1, 1100 if big and rng.random() < 0.3 else 48))
    T = int(rng.integers(0, 3)) if rng.random() < 0.2 else int(rng.integers(1, 90 if big else 24))
    K = int(rng.integers(1, E + 1))
    P = int(rng.integers(1, min(I, 6) + 1))
    faults = []

    gu, dn = _weights(rng, kind, dtype, E, I, H)
    x = _x(rng, kind, dtype, T, H)
    ids_np = _ids(rng, T, K, E, dup=rng.random() < 0.15)
    tw_np = rng.random((T, K)) + 0.05
    if rng.random() < 0.1:
        tw_np[rng.random((T, K)) < 0.3] = 0.0  # zero weights are legal here (no normalisation)
    lv_np = rng.integers(0, P + 1, size=(T, K))
    ids_dt = str(rng.choice(["int32", "int64"]))
    tw_dt = "float32" if rng.random() < 0.6 else dtype
    lv_dt = str(rng.choice(INT_DT))
    use_levels = rng.random() < 0.8

    # -- inject at most one fault (sometimes none) --------------------------
    f = int(rng.integers(0, 20)) if rng.random() < 0.45 else -1
    if f == 0 and T > 0:
        ids_np = ids_np.copy()
        ids_np[rng.integers(0, T), rng.integers(0, K)] = rng.choice([-1, E, E + 5])
        faults.append("id out of range")
    elif f == 1 and T > 0 and use_levels:
        lv_np = lv_np.copy()
        lv_np[rng.integers(0, T), rng.integers(0, K)] = P + 1 if lv_dt == "uint8" else rng.choice([-1, P + 1])
        faults.append("level out of range")
    elif f == 2:
        P = int(rng.choice([0, I + 1, 128]))
        lv_np = np.minimum(lv_np, max(P, 0))
        faults.append("num_partitions")
    elif f == 3:
        K2 = E + 1
        ids_np = np.concatenate([ids_np, np.zeros((T, K2 - K), np.int64)], 1)
        tw_np = np.concatenate([tw_np, np.ones((T, K2 - K))], 1)
        lv_np = np.concatenate([lv_np, np.zeros((T, K2 - K), np.int64)], 1)
        K = K2
        faults.append("K > E")
    elif f == 4:
        ids_dt = str(rng.choice(["int16", "uint8", "float32"]))
        faults.append("ids dtype")
    elif f == 5:
        tw_dt = "int32"
        faults.append("topk_weights dtype")
    elif f == 6 and use_levels:
        lv_dt = "float32"
        faults.append("levels dtype")
    elif f == 7:
        other = "float16" if dtype != "float16" else "float32"
        x = _tensor(kind, R.to_f64(x), other)
        faults.append("x dtype")
    elif f == 8:
        x = _tensor(kind, rng.standard_normal((T, H + 1)), dtype)
        faults.append("x hidden size")
    elif f == 9 and (2 * I > 1 and H > 1):
        gu = gu.transpose(1, 2) if kind == "torch" else gu.transpose(0, 2, 1)
        faults.append("non-contiguous gate_up_proj")
    elif f == 10:
        dn = _tensor(kind, rng.standard_normal((E, H, I + 1)), dtype)
        faults.append("down_proj shape")
    elif f == 11:
        ids_np = np.concatenate([ids_np, ids_np[:1] if T else np.zeros((1, K), np.int64)], 0)
        faults.append("ids rows")
    elif f == 12 and use_levels:
        lv_np = np.concatenate([lv_np, np.zeros((T, 1), np.int64)], 1)
        faults.append("levels shape")
    elif f == 13:
        faults.append("num_threads")
    elif f == 14:
        faults.append("out shape")
    elif f == 15:
        faults.append("out dtype")
    elif f == 16 and T > 0:
        faults.append("out aliases x")
    elif f == 17:
        gu = _tensor(kind, rng.standard_normal((E, 2 * I + 1, H)), dtype)
        faults.append("odd gate_up middle dim")
    elif f == 18 and kind == "numpy":
        faults.append("read-only out")

    ids = _strided(rng, kind, _tensor(kind, ids_np, ids_dt))
    tw = _strided(rng, kind, _tensor(kind, tw_np, tw_dt))
    levels = _strided(rng, kind, _tensor(kind, lv_np, lv_dt)) if use_levels else None
    if kind == "torch" and rng.random() < 0.1:  # lazily negated views with the same values
        x = (-x)._neg_view()
    if kind == "torch" and tw_dt != "int32" and rng.random() < 0.1:
        tw = (-tw)._neg_view()
    nt = int(rng.integers(1, 5))
    out = None
    if "num_threads" in faults:
        nt = int(rng.choice([0, 257, 1000]))
    if "out shape" in faults:
        out = _tensor(kind, np.zeros((T + 1, H)), dtype)
    elif "out dtype" in faults:
        out = _tensor(kind, np.zeros((T, H)), "float16" if dtype == "float32" else "float32")
    elif "out aliases x" in faults:
        out = x
    elif "read-only out" in faults:
        out = np.zeros((T, H), dtype=dtype)
        out.flags.writeable = False
    elif rng.random() < 0.3:
        pad = int(rng.integers(0, 3))
        full = _tensor(kind, np.full((T, H + pad), 3.0), dtype)
        out = full[:, :H]

    def call():
        return ops.moe_experts(x, ids, tw, gu, dn, levels=levels, num_partitions=P, out=out, num_threads=nt)

    def check(res):
        if out is not None:
            assert res is out
        assert (isinstance(res, torch.Tensor) if kind == "torch" else isinstance(res, np.ndarray))
        assert tuple(res.shape) == (T, H)
        ref, scale = R.ref_moe(x, ids, tw, gu, dn, levels, P, act_dtype=None if dtype == "float32" else dtype,
                               return_scale=True)
        got = R.to_f64(res)
        tol = R.moe_tolerance(dtype, ref, scale)
        err = np.abs(got - ref)
        assert np.all(err <= tol), (f"seed {seed}: max err {err.max():.3g} (tol {tol.max():.3g}) "
                                    f"{kind}-{dtype} T={T} H={H} I={I} E={E} K={K} P={P} nt={nt}")
        if use_levels and T > 0 and not np.asarray(R.to_i64(levels)).any():
            assert not got.any()

    fault = faults[0] if faults else None
    return _check_outcome(seed, fault, call, check)


# ----------------------------------------------------------- route_levels

def route_example(seed: int):
    rng = np.random.default_rng(seed)
    kind = "torch" if rng.random() < 0.6 else "numpy"
    dtype = str(rng.choice(["float32", "bfloat16", "float16"] if kind == "torch" else ["float32", "float16"]))
    T = int(rng.integers(0, 30))
    K = int(rng.integers(1, 9))
    w = rng.random((T, K)) + (0.0 if rng.random() < 0.3 else 0.01)
    # values on a coarse grid make exact threshold hits likely
    if rng.random() < 0.5:
        w = np.round(w * 8) / 8
        w[w.sum(1) == 0, 0] = 1.0
    nthr = int(rng.integers(1, 6))
    thr = sorted(rng.choice([0.0, 0.125, 0.25, 0.375, 0.5, 0.75, 1.0], size=nthr).tolist()) \
        if rng.random() < 0.5 else sorted(rng.random(nthr).tolist())
    normalize = bool(rng.random() < 0.7)
    out_dt = str(rng.choice(["int8", "int32"]))
    fault = None
    f = int(rng.integers(0, 8)) if rng.random() < 0.35 else -1
    if f == 0 and nthr > 1:
        thr = thr[::-1]
        thr[0] += 1.0
        fault = "descending thresholds"
    elif f == 1:
        thr = thr + [float(rng.choice([np.nan, np.inf, -np.inf]))]
        fault = "non-finite threshold"
    elif f == 2:
        thr = []
        fault = "no thresholds"
    elif f == 3 and T > 0 and normalize:
        w[rng.integers(0, T)] = 0.0
        fault = "row sums to 0"
    elif f == 4 and T > 0:
        w[rng.integers(0, T), rng.integers(0, K)] = np.nan
        fault = "NaN weight"
    elif f == 5:
        fault = "dtype"
        out_dt = "int16"
    elif f == 6:
        thr = ["x"] + thr
        fault = "not a number"
    tw = _strided(rng, kind, _tensor(kind, w, dtype))

    def check(lv):
        assert tuple(lv.shape) == (T, K)
        np.testing.assert_array_equal(R.to_i64(lv), R.ref_route_levels(tw, thr, normalize),
                                      err_msg=f"seed {seed}")

    return _check_outcome(seed, fault, lambda: ops.route_levels(tw, thr, normalize=normalize, dtype=out_dt),
                          check)


# ------------------------------------------------------------- importance

def importance_example(seed: int):
    rng = np.random.default_rng(seed)
    kind = "torch" if rng.random() < 0.6 else "numpy"
    dtype = str(rng.choice(["float32", "bfloat16", "float16"] if kind == "torch" else ["float32", "float16"]))
    E = int(rng.integers(1, 6))
    I = int(rng.integers(1, 40))
    H = int(rng.integers(1, 40))
    T = int(rng.integers(0, 40))
    K = int(rng.integers(1, E + 1))
    gu, _ = _weights(rng, kind, dtype, E, I, H)
    x = _x(rng, kind, dtype, T, H)
    ids_np = _ids(rng, T, K, E, dup=rng.random() < 0.2)
    weighted = bool(rng.random() < 0.5)
    tw = _strided(rng, kind, _tensor(kind, rng.random((T, K)) + 0.05, "float32")) if weighted else None
    acc = np.zeros((4, E, I))
    cnt = np.zeros(E) if rng.random() < 0.7 else None
    fault = None
    f = int(rng.integers(0, 6)) if rng.random() < 0.35 else -1
    if f == 0 and T > 0:
        ids_np[rng.integers(0, T), rng.integers(0, K)] = E
        fault = "id out of range"
    elif f == 1:
        acc = np.zeros((4, E, I + 1))
        fault = "accum shape"
    elif f == 2:
        acc = np.zeros((4, E, I), np.float32)
        fault = "accum dtype"
    elif f == 3:
        cnt = np.zeros(E + 1)
        fault = "counts shape"
    elif f == 4:
        x = _tensor(kind, rng.standard_normal((T, H + 2)), dtype)
        fault = "x hidden size"
    elif f == 5:
        ids_np = np.zeros((T, E + 1), np.int64)
        fault = "K > E"
    ids = _strided(rng, kind, _tensor(kind, ids_np, str(rng.choice(["int32", "int64"]))))
    nt = int(rng.integers(1, 5))

    def check(res):
        ref_acc, ref_cnt = R.ref_importance(x, ids, tw, gu)
        mag = np.stack([ref_acc[1], ref_acc[1], ref_acc[3], ref_acc[3]])
        tol = 1e-5 * mag + 1e-6 * max(float(mag.max(initial=0.0)), 1e-30)
        assert np.all(np.abs(acc - ref_acc) <= tol), f"seed {seed}: importance differs"
        if cnt is not None:
            np.testing.assert_allclose(cnt, ref_cnt, rtol=1e-12, err_msg=f"seed {seed}")

    return _check_outcome(seed, fault, lambda: ops.neuron_importance(x, ids, gu, acc, counts=cnt, topk_weights=tw,
                                                                     num_threads=nt), check)


# ------------------------------------------------------------------ tests

N_MOE, N_ROUTE, N_IMP = 1500, 600, 600
CHUNK = 100


@pytest.mark.parametrize("start", range(0, N_MOE, CHUNK))
def test_fuzz_moe_experts(start):
    for seed in range(start, start + CHUNK):
        moe_example(seed)


@pytest.mark.parametrize("start", range(0, N_ROUTE, CHUNK))
def test_fuzz_route_levels(start):
    for seed in range(10_000 + start, 10_000 + start + CHUNK):
        route_example(seed)


@pytest.mark.parametrize("start", range(0, N_IMP, CHUNK))
def test_fuzz_importance(start):
    for seed in range(20_000 + start, 20_000 + start + CHUNK):
        importance_example(seed)


def test_fuzz_injects_faults_and_valid_cases():
    """The generator really produces both kinds of example."""
    outcomes = [moe_example(s) for s in range(200)]
    n_err = sum(o is not None for o in outcomes)
    assert 40 < n_err < 160, n_err


if HAVE_HYPOTHESIS:
    _hyp = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])

    @_hyp
    @given(st.integers(min_value=100_000, max_value=2 ** 32 - 1))
    def test_hypothesis_moe_experts(seed):
        moe_example(seed)

    @_hyp
    @given(st.integers(min_value=100_000, max_value=2 ** 32 - 1))
    def test_hypothesis_route_levels(seed):
        route_example(seed)

    @_hyp
    @given(st.integers(min_value=100_000, max_value=2 ** 32 - 1))
    def test_hypothesis_importance(seed):
        importance_example(seed)


# ------------------------------------------- every output over every input

from dualsparse import _C  # noqa: E402


class _Arena:
    """Arrays placed in one shared byte buffer, so that an output can be made
    to overlap any input at a chosen byte offset."""

    def __init__(self, nbytes):
        raw = np.zeros(nbytes + 128, dtype=np.uint8)
        skip = -raw.__array_interface__["data"][0] % 64
        self.buf = raw[skip:skip + nbytes + 64]  # 64-byte aligned start

    def place(self, offset, shape, dtype, values=None):
        dtype = np.dtype(dtype)
        n = int(np.prod(shape)) * dtype.itemsize
        a = self.buf[offset:offset + n].view(dtype).reshape(shape)
        if values is not None:
            a[...] = values
        return a


def _overlap_call(op, out_name, in_name, rng):
    """Builds the call `op` with output `out_name` overlapping input `in_name`
    (a random byte offset, aligned to the output's elements); every other
    argument has its own memory."""
    T, K, E, I, H = 5, 2, 3, 4, 6
    specs = {  # name: (shape, dtype, values)
        "x": ((T, H), np.float32, rng.standard_normal((T, H))),
        "topk_ids": ((T, K), np.int64, np.stack([rng.permutation(E)[:K] for _ in range(T)])),
        "topk_weights": ((T, K), np.float32, rng.random((T, K)) + 0.1),
        "levels_in": ((T, K), np.int64, rng.integers(0, 3, (T, K))),
        "gate_up": ((E, 2 * I, H), np.float32, rng.standard_normal((E, 2 * I, H))),
        "down": ((E, H, I), np.float32, rng.standard_normal((E, H, I))),
        "importance": ((E, I), np.float64, rng.standard_normal((E, I))),
        "perm_in": ((E, I), np.int64, np.stack([rng.permutation(I) for _ in range(E)])),
        # outputs
        "out": ((T, H), np.float32, None),
        "timings": ((4,), np.float64, None),
        "levels": ((T, K), np.int8, None),
        "accum": ((4, E, I), np.float64, 0.0),
        "counts": ((E,), np.float64, 0.0),
        "perm": ((E, I), np.int64, None),
    }
    nbytes = sum(int(np.prod(s)) * np.dtype(d).itemsize + 64 for s, d, _ in specs.values())
    ar = _Arena(2 * nbytes)
    arrays, pos = {}, 0
    for name, (shape, dt, vals) in specs.items():
        if name == out_name:
            continue
        arrays[name] = ar.place(pos, shape, dt, vals)
        pos += (int(np.prod(shape)) * np.dtype(dt).itemsize + 127) // 64 * 64
    ishape, idt, _ = specs[in_name]
    oshape, odt, ovals = specs[out_name]
    in_off = arrays[in_name].__array_interface__["data"][0] - ar.buf.__array_interface__["data"][0]
    in_bytes = int(np.prod(ishape)) * np.dtype(idt).itemsize
    out_bytes = int(np.prod(oshape)) * np.dtype(odt).itemsize
    osz = np.dtype(odt).itemsize
    lo = max(0, in_off - out_bytes + osz)
    off = int(rng.integers(lo, in_off + in_bytes)) // osz * osz
    off = max(off, lo + (-lo) % osz)
    arrays[out_name] = ar.place(off, oshape, odt, None)
    a = arrays
    calls = {
        "moe": lambda: _C.moe_experts(a["x"], a["topk_ids"], a["topk_weights"], a["gate_up"], None, a["down"],
                                      a["levels_in"], 2, a["out"], 2, a["timings"]),
        "importance": lambda: _C.importance(a["x"], a["topk_ids"], a["topk_weights"], a["gate_up"], None,
                                            a["accum"], a["counts"], 2),
        "route": lambda: _C.route_levels(a["topk_weights"], [0.3, 0.6], True, a["levels"]),
        "order": lambda: _C.importance_order(a["importance"], a["perm"]),
        "permute": lambda: _C.permute_neurons(a["gate_up"], None, a["down"], a["perm_in"], False, 2),
    }
    return calls[op], arrays


OVERLAP_CASES = [(op, o, i) for op, outs, ins in [
    ("moe", ["out", "timings"], ["x", "topk_ids", "topk_weights", "levels_in", "gate_up", "down"]),
    ("importance", ["accum", "counts"], ["x", "topk_ids", "topk_weights", "gate_up"]),
    ("route", ["levels"], ["topk_weights"]),
    ("order", ["perm"], ["importance"]),
    ("permute", ["gate_up", "down"], ["perm_in"]),  # weights are written in place
] for o in outs for i in ins] + [("moe", "timings", "out"), ("importance", "counts", "accum")]


@pytest.mark.parametrize("op,out_name,in_name", OVERLAP_CASES)
def test_fuzz_every_output_overlapping_every_input(op, out_name, in_name):
    """An output placed over any input (random byte offsets) is refused with
    a ValueError before anything is written: the input's bytes stay as they
    were."""
    for seed in range(12):
        rng = np.random.default_rng(seed)
        fn, arrays = _overlap_call(op, out_name, in_name, rng)
        before = arrays[in_name].tobytes()
        with pytest.raises(ValueError) as exc:
            fn()
        msg = str(exc.value)
        assert "memory" in msg or "separate" in msg or "share" in msg, msg
        assert arrays[in_name].tobytes() == before, f"seed {seed}: {in_name} was written"
