"""The shared case table of the ops tests (CPU now, CUDA later).

Each Case names a problem shape and a routing pattern; `build(case, dtype,
kind)` turns it into deterministic tensors (torch.Generator seeded from the
case id, so every dtype and every run sees the same numbers before rounding).
Block sizes of the CPU engine this table is meant to cross: 128 neurons per
gate/up item, 128 hidden rows per down item, 64 rows per block, 8 tokens per
combine item, K blocks of 512 / 1024 / 4096 depending on the SIMD level.
"""
from __future__ import annotations

import dataclasses
import zlib
from typing import Optional

import numpy as np
import torch


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    T: int
    H: int
    I: int
    E: int
    K: int
    P: int = 1
    # routing pattern: "random" (K distinct experts per token, any expert),
    # "one" (every token on expert E // 2; K must be 1), "skip" (experts 0
    # and E-1 never selected), "few" (only experts 0 and 1; K <= 2)
    ids: str = "random"
    # levels: "random" in [0, P], "zero" (everything dropped), "none" (no
    # levels argument: all full), "full" (explicit all P)
    levels: str = "random"
    note: str = ""


CASES = [
    Case("T0", T=0, H=16, I=8, E=4, K=2, P=1, note="no tokens: empty result, not an error"),
    Case("T0_P2_none", T=0, H=9, I=6, E=3, K=3, P=2, levels="none"),
    Case("T1", T=1, H=64, I=48, E=8, K=2, P=1, levels="none", note="one token"),
    Case("T1_K1_P2", T=1, H=5, I=6, E=3, K=1, P=2, levels="full"),
    Case("K1", T=9, H=40, I=24, E=5, K=1, P=1),
    Case("K_eq_E", T=7, H=33, I=20, E=4, K=4, P=2),
    Case("one_expert", T=13, H=48, I=32, E=6, K=1, P=2, ids="one", note="all tokens on one expert"),
    Case("empty_experts", T=21, H=37, I=29, E=6, K=3, P=2, ids="skip",
         note="experts 0 and E-1 get no token"),
    Case("odd_H67_I77_P2", T=17, H=67, I=77, E=7, K=3, P=2, note="odd I, two partitions"),
    Case("odd_I77_P4", T=11, H=29, I=77, E=3, K=2, P=4, note="odd I, four partitions"),
    Case("odd_I131_P4", T=19, H=53, I=131, E=5, K=2, P=4, note="I crosses the 128-neuron item"),
    Case("H1100", T=5, H=1100, I=40, E=3, K=2, P=3, note="H crosses the 512 and 1024 K blocks"),
    Case("many_rows", T=150, H=136, I=160, E=4, K=2, P=2,
         note=">64 rows per expert, H > 128, I > 128"),
    Case("few_experts", T=200, H=24, I=16, E=8, K=2, P=1, ids="few", levels="full",
         note="200 rows on each of two experts (two blocks of 100 rows in the AVX2 block GEMM)"),
    Case("rows70_H600_I300", T=140, H=600, I=300, E=2, K=1, P=1, levels="full",
         note="70 rows per expert, K blocks with a remainder: the AVX2 block GEMM"),
    Case("narrow_P2_rows64", T=256, H=192, I=40, E=8, K=2, P=2,
         note="partitions of 20 neurons (under 64: one gate/up range, down per level), 64 rows per expert"),
    Case("wide_P4_rows48", T=96, H=72, I=256, E=4, K=2, P=4,
         note="partitions of 64 neurons (down in segments), four levels, 48 rows per expert"),
    Case("rows390_kept_weights", T=390, H=200, I=72, E=3, K=1, P=2, ids="one", levels="full",
         note="390 rows on one expert: GEMM blocks of 98, 98, 98 and 96 rows on one copy of the weights (two K blocks: the C case)"),
    Case("all_dropped", T=12, H=20, I=12, E=4, K=2, P=2, levels="zero",
         note="every pair at level 0: output is zero"),
    Case("I1", T=6, H=3, I=1, E=2, K=1, P=1),
    Case("H1", T=5, H=1, I=3, E=3, K=2, P=1),
    Case("P_eq_I", T=8, H=12, I=5, E=3, K=2, P=5, note="one neuron per partition"),
    Case("full_P3", T=10, H=20, I=9, E=4, K=2, P=3, levels="full"),
    Case("T9_none_P1", T=9, H=31, I=18, E=5, K=3, P=1, levels="none",
         note="T just above the 8-token combine block"),
]

CASE_IDS = [c.id for c in CASES]
CASES_BY_ID = {c.id: c for c in CASES}

#: A handful of cases that together cover the structure, for tests that
#: repeat the comparison many times (thread counts, SIMD levels, fuzz seeds).
SMALL_CASE_IDS = ["T0", "T1", "K_eq_E", "empty_experts", "odd_H67_I77_P2", "odd_I131_P4",
                  "many_rows", "few_experts", "rows70_H600_I300", "all_dropped", "H1"]

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16}

# (kind, dtype) combinations every op is checked with: NumPy has no bfloat16.
KINDS = [("torch", "float32"), ("torch", "bfloat16"), ("torch", "float16"),
         ("numpy", "float32"), ("numpy", "float16")]
KIND_IDS = [f"{k}-{d}" for k, d in KINDS]


def case_seed(case_id: str, salt: int = 0) -> int:
    return (zlib.crc32(case_id.encode()) + 7919 * salt) & 0x7FFFFFFF


@dataclasses.dataclass
class Inputs:
    case: Case
    dtype: str
    kind: str
    x: object
    ids: object
    tw: object
    gate_up: object
    down: object
    levels: Optional[object]
    P: int
    tw_dtype: str = "float32"
    salt: int = 0

    @property
    def act_dtype(self) -> Optional[str]:
        """The dtype the engine stores the activation in (None for float32)."""
        return None if self.dtype == "float32" else self.dtype

    def kwargs(self) -> dict:
        return dict(levels=self.levels, num_partitions=self.P)


def routing(case: Case, gen: torch.Generator):
    """(ids int64 (T, K), tw float32 (T, K), levels int64 (T, K) or None)."""
    T, E, K, P = case.T, case.E, case.K, case.P
    if case.ids == "random":
        allowed = torch.arange(E)
    elif case.ids == "one":
        assert K == 1
        allowed = torch.tensor([E // 2])
    elif case.ids == "skip":
        allowed = torch.arange(1, E - 1)
    elif case.ids == "few":
        allowed = torch.tensor([0, 1])
    else:  # pragma: no cover
        raise ValueError(case.ids)
    assert K <= len(allowed)
    order = torch.rand(T, len(allowed), generator=gen).argsort(dim=1)[:, :K]
    ids = allowed[order]
    tw = torch.rand(T, K, generator=gen) + 0.05
    if case.levels == "random":
        levels = torch.randint(0, P + 1, (T, K), generator=gen)
    elif case.levels == "zero":
        levels = torch.zeros(T, K, dtype=torch.int64)
    elif case.levels == "full":
        levels = torch.full((T, K), P, dtype=torch.int64)
    elif case.levels == "none":
        levels = None
    else:  # pragma: no cover
        raise ValueError(case.levels)
    return ids, tw, levels


def build(case: Case, dtype: str = "float32", kind: str = "torch", *, tw_dtype: Optional[str] = None,
          ids_dtype: str = "int64", levels_dtype: str = "int8", salt: int = 0) -> Inputs:
    """Deterministic inputs of `case` in `dtype` as torch tensors (kind
    "torch") or NumPy arrays (kind "numpy").  Weights are N(0,1)/sqrt(fan_in)
    so activations and outputs are O(1) in every dtype; topk_weights are
    float32 unless tw_dtype says otherwise."""
    if kind == "numpy" and dtype not in NUMPY_DTYPES:
        raise ValueError(f"NumPy has no {dtype}")
    gen = torch.Generator().manual_seed(case_seed(case.id, salt))
    T, H, I, E = case.T, case.H, case.I, case.E
    x = torch.randn(T, H, generator=gen)
    gu = torch.randn(E, 2 * I, H, generator=gen) / H ** 0.5
    dn = torch.randn(E, H, I, generator=gen) / I ** 0.5
    ids, tw, levels = routing(case, gen)
    tdt = TORCH_DTYPES[dtype]
    x, gu, dn = x.to(tdt), gu.to(tdt), dn.to(tdt)
    tw = tw.to(TORCH_DTYPES[tw_dtype or "float32"])
    ids = ids.to(getattr(torch, ids_dtype))
    if levels is not None:
        levels = levels.to(getattr(torch, levels_dtype))
    if kind == "numpy":
        x, gu, dn, tw, ids = (t.numpy() for t in (x, gu, dn, tw, ids))
        levels = None if levels is None else levels.numpy()
    return Inputs(case, dtype, kind, x, ids, tw, gu, dn, levels, case.P, tw_dtype or "float32", salt)


_REF_CACHE: dict = {}


def reference(inp: Inputs):
    """(ref (T, H), scale (T, H)) float64 of moe_experts on `inp`, rounding the
    activation like the engine; cached (the values do not depend on the kind
    of container or on the SIMD level)."""
    from reference import ref_moe

    key = (inp.case.id, inp.dtype, inp.tw_dtype, inp.salt)
    if key not in _REF_CACHE:
        _REF_CACHE[key] = ref_moe(inp.x, inp.ids, inp.tw, inp.gate_up, inp.down, inp.levels, inp.P,
                                  act_dtype=inp.act_dtype, return_scale=True)
    return _REF_CACHE[key]


def assert_moe_close(out, inp: Inputs, what: str = "", ref=None):
    """out matches the float64 reference within the dtype's tolerance (see
    reference.moe_tolerance)."""
    from reference import moe_tolerance, to_f64

    r, scale = reference(inp) if ref is None else ref
    got = to_f64(out)
    assert got.shape == r.shape, f"{what}: shape {got.shape} != {r.shape}"
    assert np.isfinite(got).all(), f"{what}: non-finite output"
    tol = moe_tolerance(inp.dtype, r, scale)
    err = np.abs(got - r)
    bad = err > tol
    if bad.any():
        i = np.unravel_index(np.argmax(err - tol), err.shape)
        raise AssertionError(
            f"{inp.case.id} {inp.kind}-{inp.dtype} {what}: {int(bad.sum())} of {bad.size} elements "
            f"outside tolerance; worst at {tuple(int(v) for v in i)}: got {got[i]!r}, "
            f"expected {r[i]!r}, |err| {err[i]:.3g} > tol {tol[i]:.3g} (max scale {scale.max():.3g})")


def to_numpy(a) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy() if a.dtype != torch.bfloat16 else a.view(torch.int16).numpy()
    return np.asarray(a)


def bits(a) -> bytes:
    """The raw bytes of a tensor/array (for bitwise comparisons, -0.0 and NaN
    payloads included)."""
    if isinstance(a, torch.Tensor):
        a = a.detach().contiguous()
        if a.dtype in (torch.bfloat16, torch.float16):
            return a.view(torch.int16).numpy().tobytes()
        return a.numpy().tobytes()
    return np.ascontiguousarray(a).tobytes()


def assert_same_bits(a, b, what: str = ""):
    """a and b are bitwise identical; otherwise report how many elements
    differ and by how much."""
    if bits(a) == bits(b) and tuple(a.shape) == tuple(b.shape):
        return
    from reference import to_f64

    x, y = to_f64(a), to_f64(b)
    assert x.shape == y.shape, f"{what}: shapes {x.shape} != {y.shape}"
    diff = np.abs(x - y)
    n = int((diff != 0).sum()) if diff.size else 0
    i = np.unravel_index(np.argmax(diff), diff.shape) if diff.size else ()
    raise AssertionError(f"{what}: not bitwise equal: {n} of {x.size} elements differ, max |diff| "
                         f"{diff.max() if diff.size else 0:.3g} at {tuple(int(v) for v in i)} "
                         f"({x[i]!r} vs {y[i]!r})")


def assert_same_error(fn_a, fn_b):
    """fn_a and fn_b both raise, the same exception type with the same
    message (e.g. the CPU engine and the CUDA path on the same bad input)."""
    import pytest

    with pytest.raises(Exception) as a:
        fn_a()
    with pytest.raises(Exception) as b:
        fn_b()
    assert type(b.value) is type(a.value) and str(b.value) == str(a.value), (str(a.value), str(b.value))


#: Threshold sets of the route_levels comparisons (1T, 2T, 127 partitions).
ROUTE_THRESHOLDS = ([0.125], [0.1, 0.125], list(np.linspace(0, 1, 127)))


def route_weights(dtype: str, seed: int = 3) -> torch.Tensor:
    """(301, 8) positive routing weights in `dtype`; row 0 all ones, so that
    normalised scores fall exactly on the 0.125 threshold."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.rand(301, 8, generator=g) + 1e-3).to(getattr(torch, dtype))
    w[0] = 1.0
    return w
