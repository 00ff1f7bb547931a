"""Independent float64 NumPy reference of the dualsparse operations.

Nothing here imports dualsparse: every function restates the documented
semantics (dualsparse/ops.py, csrc/core/ds_core.h) on float64 copies of the
values the engine reads (bfloat16/float16 tensors are widened exactly).  torch
is used only to read and round 16-bit values.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

try:  # torch is optional for the reference itself (needed for bfloat16 only)
    import torch
except ImportError:  # pragma: no cover
    torch = None


# ----------------------------------------------------------------- helpers

def to_f64(a) -> np.ndarray:
    """float64 NumPy copy of the stored values of a tensor / array / list."""
    if torch is not None and isinstance(a, torch.Tensor):
        return a.detach().cpu().double().numpy()
    return np.asarray(a, dtype=np.float64)


def to_i64(a) -> np.ndarray:
    if torch is not None and isinstance(a, torch.Tensor):
        return a.detach().cpu().long().numpy()
    return np.asarray(a).astype(np.int64)


def dtype_name(a) -> str:
    """'float32' / 'bfloat16' / 'float16' / ... of a tensor or array."""
    if torch is not None and isinstance(a, torch.Tensor):
        return str(a.dtype).replace("torch.", "")
    return np.dtype(a.dtype).name


def round_to(v: np.ndarray, name: Optional[str]) -> np.ndarray:
    """Round float64 values to the 16-bit dtype `name` (via float32, as the
    engine computes in float32 and stores the result in the weight dtype) and
    return them widened back to float64.  None / 'float32' -> float32 rounding
    is NOT applied (the reference keeps float64)."""
    if name is None or name in ("float32", "float64"):
        return v
    if name == "float16":
        return v.astype(np.float32).astype(np.float16).astype(np.float64)
    if name == "bfloat16":
        if torch is None:  # pragma: no cover
            raise RuntimeError("bfloat16 rounding needs torch")
        t = torch.from_numpy(np.ascontiguousarray(v.astype(np.float32)))
        return t.to(torch.bfloat16).double().numpy()
    raise ValueError(f"unknown dtype {name!r}")


#: spacing of the dtype's numbers in [1, 2): one ulp relative to the value.
ULP = {"float32": 2.0 ** -23, "bfloat16": 2.0 ** -7, "float16": 2.0 ** -10}


def silu(a: np.ndarray) -> np.ndarray:
    # a / (1 + exp(-a)) without overflow warnings for very negative a
    with np.errstate(over="ignore"):
        return a / (1.0 + np.exp(-a))


# ---------------------------------------------------------- route levels

def ref_route_levels(w, thresholds: Sequence[float], normalize: bool = True) -> np.ndarray:
    """levels[t, k] = #{j : thresholds[j] <= s[t, k]} with s = w / sum_k w
    (float64, summed over k in order) when normalize, else s = w."""
    w = to_f64(w)
    thr = np.asarray([float(t) for t in np.atleast_1d(thresholds)], dtype=np.float64)
    if w.shape[0] == 0:
        return np.zeros(w.shape, dtype=np.int64)
    if normalize:
        s = w / np.cumsum(w, axis=1)[:, -1:]  # sequential sum over k, like the engine
    else:
        s = w
    return (thr[None, None, :] <= s[:, :, None]).sum(axis=2).astype(np.int64)


# ---------------------------------------------------------- expert compute

def _split_weights(gate_up, down):
    """(E, 2I, H) fused or per-expert lists -> float64 (E, I, H) gate, up and
    (E, H, I) down."""
    if isinstance(gate_up, tuple) and len(gate_up) == 2:  # (gates, ups) lists
        gates, ups = gate_up
        g = np.stack([to_f64(getattr(w, "weight", w)) for w in gates])
        u = np.stack([to_f64(getattr(w, "weight", w)) for w in ups])
    else:
        gu = to_f64(gate_up)
        I = gu.shape[1] // 2
        g, u = gu[:, :I], gu[:, I:]
    if isinstance(down, (list, tuple)):
        d = np.stack([to_f64(getattr(w, "weight", w)) for w in down])
    else:
        d = to_f64(down)
    return g, u, d


def ref_moe(x, ids, w, gate_up, down, levels=None, P: int = 1, act_dtype: Optional[str] = None,
            return_scale: bool = False):
    """Routed expert FFNs with prefix partitions, in float64.

    out[t] = sum_k w[t,k] * down[e][:, :n] @ (silu(gate[e][:n] @ x[t]) * (up[e][:n] @ x[t]))
    with e = ids[t,k], n = (levels[t,k] * I) // P (levels None: all P).

    act_dtype: round the activation silu(g)*u to this dtype before the down
    projection (the engine stores it in the weight dtype).
    return_scale: also return the (T, H) magnitude
    sum_k |w[t,k]| * |down[e][:, :n]| @ |act|, the size of the terms summed
    into each output element, used to scale tolerances.
    """
    X = to_f64(x)
    ids = to_i64(ids)
    W = to_f64(w)
    g, u, d = _split_weights(gate_up, down)
    E, I, H = g.shape
    T = X.shape[0]
    K = ids.shape[1] if ids.ndim == 2 else 0
    lv = np.full((T, K), P, dtype=np.int64) if levels is None else to_i64(levels)
    out = np.zeros((T, H), dtype=np.float64)
    scale = np.zeros((T, H), dtype=np.float64)
    if T == 0:
        return (out, scale) if return_scale else out
    # group the (t, k) pairs by (expert, level) and compute each group at once
    ns = (lv * I) // P
    for e in range(E):
        for n in np.unique(ns[ids == e]):
            if n == 0:
                continue
            tt, kk = np.nonzero((ids == e) & (ns == n))
            xs = X[tt]                                    # (m, H)
            a = xs @ g[e, :n].T                           # (m, n)
            b = xs @ u[e, :n].T
            act = round_to(silu(a) * b, act_dtype)
            y = act @ d[e, :, :n].T                       # (m, H)
            ya = np.abs(act) @ np.abs(d[e, :, :n]).T
            wk = W[tt, kk][:, None]
            # pairs of one token are added in any order here: float64 makes
            # the order irrelevant at the tolerances used
            np.add.at(out, tt, wk * y)
            np.add.at(scale, tt, np.abs(wk) * ya)
    return (out, scale) if return_scale else out


# ------------------------------------------------------------- importance

def ref_importance(x, ids, w_or_none, gate_up, up_list=None):
    """(accum (4, E, I), counts (E,)) float64 sums over the (t, k) pairs routed
    to each expert of c*silu(a), c*|silu(a)|, c*silu(a)*b, c*|silu(a)*b|, with
    a = gate[e] @ x[t], b = up[e] @ x[t] and c = w[t,k] (or 1 unweighted);
    counts[e] = sum of c over those pairs.

    gate_up: fused (E, 2I, H), or the list of gate weights with up_list the
    list of up weights."""
    X = to_f64(x)
    ids = to_i64(ids)
    if up_list is not None:
        g, u, _ = _split_weights((gate_up, up_list), [np.zeros((1, 1))])
    else:
        g, u, _ = _split_weights(gate_up, [np.zeros((1, 1))])
    E, I, H = g.shape
    acc = np.zeros((4, E, I), dtype=np.float64)
    counts = np.zeros(E, dtype=np.float64)
    if X.shape[0] == 0:
        return acc, counts
    C = np.ones(ids.shape) if w_or_none is None else to_f64(w_or_none)
    for e in range(E):
        tt, kk = np.nonzero(ids == e)
        if tt.size == 0:
            continue
        xs = X[tt]
        a = xs @ g[e].T
        b = xs @ u[e].T
        s = silu(a)
        c = C[tt, kk][:, None]
        acc[0, e] = (c * s).sum(0)
        acc[1, e] = (c * np.abs(s)).sum(0)
        acc[2, e] = (c * s * b).sum(0)
        acc[3, e] = (c * np.abs(s * b)).sum(0)
        counts[e] = C[tt, kk].sum()
    return acc, counts


# --------------------------------------------------------- reconstruction

def ref_importance_order(imp) -> np.ndarray:
    """Descending, stable (ties keep their original order)."""
    imp = to_f64(imp)
    return np.argsort(-imp, axis=1, kind="stable").astype(np.int64)


def ref_inverse_permutation(perm) -> np.ndarray:
    perm = np.asarray(perm, dtype=np.int64)
    inv = np.empty_like(perm)
    for e in range(perm.shape[0]):
        for j in range(perm.shape[1]):
            inv[e, perm[e, j]] = j
    return inv


def ref_permute(gate_up: np.ndarray, down: np.ndarray, perm: np.ndarray):
    """New neuron j = old neuron perm[e, j] (rows j and I+j of gate_up,
    column j of down); works on any array type supporting fancy indexing."""
    E, I2, H = gate_up.shape
    I = I2 // 2
    gu = gate_up.copy() if hasattr(gate_up, "copy") else gate_up.clone()
    dn = down.copy() if hasattr(down, "copy") else down.clone()
    for e in range(E):
        p = perm[e]
        gu[e, :I] = gate_up[e, :I][p]
        gu[e, I:] = gate_up[e, I:][p]
        dn[e] = down[e][:, p]
    return gu, dn


# -------------------------------------------------------------- tolerance

def moe_tolerance(dtype: str, ref: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Allowed |engine - reference| per output element.

    float32: the engine accumulates H (gate/up) and I (down) products in
    float32; the rounding error grows like sqrt(n) * 2^-24 of the magnitude
    of the summed terms, far below 1e-5 of the output scale S = max of
    `scale` (sum_k |w| |down| @ |act|) for H, I <= ~1e3.  So 1e-5 * S.

    bfloat16 / float16: the reference rounds the activation to the dtype like
    the engine; the two can still differ by one ulp on an activation whose
    float32 and float64 values straddle a rounding boundary, which adds at most
    ulp * scale[t, h] (ulp = 2^-7 / 2^-10, relative spacing of the dtype); the
    engine then rounds the float32 sum to the dtype (half an ulp of |out|).
    The float32 part (and float16 subnormal activations) stays inside
    1e-5 * S.  An output in the dtype's subnormal range is rounded with an
    absolute error of up to half the subnormal spacing (2^-25 for float16,
    2^-134 for bfloat16), which the relative half ulp does not cover.
    """
    S = max(float(scale.max(initial=0.0)), 1e-30)
    if dtype == "float32":
        return np.full(ref.shape, 1e-5 * S)
    u = ULP[dtype]
    sub = {"float16": 2.0 ** -25, "bfloat16": 2.0 ** -134}.get(dtype, 0.0)
    return u * scale + 0.5 * u * np.abs(ref) + 1e-5 * S + sub
