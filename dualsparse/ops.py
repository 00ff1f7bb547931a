"""The engine's operations: routing levels, expert computation with prefix
partitions, neuron importance and reconstruction.

Every function accepts torch tensors (CPU) and NumPy arrays where the dtype
allows (NumPy has no bfloat16), and returns the same kind it was given.  No
weight is ever copied or converted per call: the engine reads the model's own
parameters where they lie.  Compute releases the GIL, runs on ``num_threads``
threads (default ``torch.get_num_threads()``), and gives bitwise identical
results for any thread count.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Optional, Sequence

import numpy as np

from . import _C

__all__ = [
    "METRICS",
    "route_levels",
    "moe_experts",
    "moe_experts_split",
    "BACKENDS",
    "resolve_backend",
    "stack_linear_experts",
    "partition_down",
    "unpartition_down",
    "ImportanceAccumulator",
    "neuron_importance",
    "importance_order",
    "inverse_permutation",
    "permute_neurons",
    "permute_neurons_split",
    "default_num_threads",
    "simd_level",
    "set_simd_level",
    "simd_levels",
    "block_gemm",
    "set_block_gemm",
    "rows_four",
    "set_rows_four",
]

#: The four neuron-importance metrics, in the order of the accumulator's first axis.
METRICS = ("gate", "abs_gate", "gate_up", "abs_gate_up")


# ----------------------------------------------------------------- helpers

def _torch():
    return sys.modules.get("torch")


def _is_torch(obj) -> bool:
    torch = _torch()
    return torch is not None and isinstance(obj, torch.Tensor)


def default_num_threads() -> int:
    """``torch.get_num_threads()`` when torch is loaded, else the CPUs this
    process may run on."""
    torch = _torch()
    if torch is not None:
        return max(1, int(torch.get_num_threads()))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def _threads(num_threads: Optional[int]) -> int:
    if num_threads is None:
        return min(default_num_threads(), _C.build_info()["max_threads"])
    if isinstance(num_threads, bool) or not isinstance(num_threads, (int, np.integer)):
        raise TypeError(f"num_threads must be an int or None; got {type(num_threads).__name__}")
    hi = _C.build_info()["max_threads"]
    if not 1 <= int(num_threads) <= hi:
        raise ValueError(f"num_threads must be in [1, {hi}]; got {int(num_threads)}")
    return int(num_threads)


def _plain(t, name: str):
    """A tensor the engine may read: detached from autograd (refusing when a
    gradient is being recorded for it, since the engine computes none)."""
    if _is_torch(t) and t.is_neg():
        # a lazy negation: the memory holds the un-negated values, and the
        # engines read memory.  Activations and routing weights are small:
        # resolve them; weights are read in place on every call: refuse.
        if "proj" in name:
            raise ValueError(f"{name} is a lazy negative view (its memory holds the values before "
                             "negation); resolve it once first, e.g. w = w.resolve_neg()")
        t = t.resolve_neg()
    if _is_torch(t) and t.requires_grad:
        if _torch().is_grad_enabled():
            raise ValueError(
                f"{name} requires grad and autograd is enabled; the engine computes no gradients. "
                "Run under torch.no_grad() / torch.inference_mode(), or detach it."
            )
        return t.detach()
    return t


def _rowmajor_x(x, name: str):
    """x may come from any view; the engine needs unit stride along H and
    rows that follow each other (activations are small: copying is fine)."""
    if _is_torch(x):
        if x.dim() == 2 and x.numel() and ((x.shape[1] > 1 and x.stride(1) != 1)
                                           or (x.shape[0] > 1 and x.stride(0) < x.shape[1])):
            return x.contiguous()
        return x
    if isinstance(x, np.ndarray):
        if x.ndim == 2 and x.size and ((x.shape[1] > 1 and x.strides[1] != x.itemsize)
                                       or (x.shape[0] > 1 and x.strides[0] < x.shape[1] * x.itemsize)):
            return np.ascontiguousarray(x)
        return x
    raise TypeError(f"{name} must be a torch tensor or a NumPy array; got {type(x).__name__}")


def _is_cuda(t) -> bool:
    """A torch tensor on a CUDA device: such calls run in dualsparse._C_cuda."""
    return _is_torch(t) and t.device.type == "cuda"


def _empty_like_rows(x, rows: int, cols: int):
    if _is_torch(x):
        return _torch().empty((rows, cols), dtype=x.dtype, device=x.device)
    return np.empty((rows, cols), dtype=x.dtype)


# ------------------------------------------------------------ routing levels

def route_levels(topk_weights, thresholds, *, normalize: bool = True, dtype: str = "int8"):
    """Routing level of every (token, selected expert) pair.

    ``levels[t, k]`` is the number of thresholds ``t_j`` with
    ``s[t, k] >= t_j``, where ``s = topk_weights / topk_weights.sum(-1)``
    (computed in float64, summed over k in order; a row whose sum overflows
    float64 is first scaled by a power of two, which leaves the scores
    unchanged) when ``normalize``, else ``topk_weights``.  One threshold gives
    1T-Drop (0 = dropped, 1 = full); two give 2T-Drop (0 dropped, 1 major
    half, 2 full); P thresholds give P importance partitions.  Normalised
    scores lie in [0, 1]: a threshold above 1 is reached by no pair, one at
    or below 0 by every pair.

    Args:
        topk_weights: (T, K) float32 / bfloat16 / float16 / float64 combine
            weights.
        thresholds: ascending finite values: one number, or a list / tuple /
            1-D array of numbers (bools, dicts and sets are refused).
        normalize: decide on top-K-normalised scores (the method's default).
        dtype: "int8" (default) or "int32" for the result.

    Returns:
        (T, K) levels in [0, P], a torch tensor for torch input, else NumPy.
    """
    thr = _threshold_list(thresholds, "route_levels")
    if dtype not in ("int8", "int32"):
        raise ValueError(f"route_levels: dtype must be 'int8' or 'int32'; got {dtype!r}")
    topk_weights = _plain(topk_weights, "topk_weights")
    if _is_torch(topk_weights):
        torch = _torch()
        if topk_weights.dim() != 2:
            raise ValueError(f"route_levels: topk_weights must be 2-D (tokens, top_k); got shape {tuple(topk_weights.shape)}")
        levels = torch.empty(topk_weights.shape, dtype=getattr(torch, dtype), device=topk_weights.device)
    elif isinstance(topk_weights, np.ndarray):
        if topk_weights.ndim != 2:
            raise ValueError(f"route_levels: topk_weights must be 2-D (tokens, top_k); got shape {topk_weights.shape}")
        levels = np.empty(topk_weights.shape, dtype=dtype)
    else:
        raise TypeError(f"route_levels: topk_weights must be a torch tensor or a NumPy array; got {type(topk_weights).__name__}")
    if _is_torch(topk_weights) and topk_weights.device.type not in ("cpu", "meta"):  # meta: the binding's error
        from . import cuda

        if _is_cuda(topk_weights) and cuda.available()[0]:
            cuda.route_levels(topk_weights, thr, bool(normalize), levels)
        else:  # another device, or CUDA without a usable module: same result in torch
            _route_levels_torch(topk_weights, thr, bool(normalize), levels)
        return levels
    _C.route_levels(topk_weights, thr, bool(normalize), levels)
    return levels


def _is_bool(v) -> bool:
    return isinstance(v, (bool, np.bool_))


def _threshold_list(thresholds, fn: str) -> list:
    """Thresholds as a list of Python floats: one number, or a list / tuple /
    1-D array or tensor of numbers.  Bools, mappings, sets and strings are
    refused (a dict would give its keys, a set no order); integers too large
    for a float are named."""
    if _is_torch(thresholds) or isinstance(thresholds, np.ndarray):
        if thresholds.dtype == np.bool_ or (_is_torch(thresholds) and thresholds.dtype == _torch().bool):
            raise TypeError(f"{fn}: thresholds must be numbers; got a boolean array")
        if thresholds.ndim > 1:
            raise ValueError(f"{fn}: thresholds must be one number or a 1-D sequence; got shape "
                             f"{tuple(thresholds.shape)}")
        thresholds = thresholds.tolist()
    if _is_bool(thresholds):
        raise TypeError(f"{fn}: thresholds must be numbers; got {thresholds!r} (a bool)")
    if isinstance(thresholds, (int, float, np.floating, np.integer)):
        thresholds = [thresholds]
    if not isinstance(thresholds, (list, tuple)):
        raise TypeError(f"{fn}: thresholds must be a number or a list / tuple of numbers in ascending "
                        f"order; got {type(thresholds).__name__}")
    thr = []
    for j, t in enumerate(thresholds):
        if _is_bool(t):
            raise TypeError(f"{fn}: thresholds[{j}] is {t!r}, a bool; thresholds are numbers")
        if not isinstance(t, (int, float, np.floating, np.integer)):
            raise TypeError(f"{fn}: thresholds[{j}] must be a real number; got {type(t).__name__} {t!r}")
        try:
            thr.append(float(t))
        except OverflowError:
            raise ValueError(f"{fn}: thresholds[{j}] = {t!r} is too large for a float (thresholds must be "
                             "finite)") from None
    return thr


def _route_levels_torch(w, thr, normalize: bool, levels):
    """route_levels in torch on w's device, with the engine's arithmetic
    (float64, the row sum taken over k in order, so every level equals the
    engine's) and its checks and messages.  Used where the C engine cannot
    read the tensor."""
    fn = "route_levels"
    if not 1 <= len(thr) <= 127:
        raise ValueError(f"{fn}: thresholds must hold 1 to 127 values; got {len(thr)}")
    for j, t in enumerate(thr):
        if not np.isfinite(t):
            raise ValueError(f"{fn}: thresholds[{j}] = {t:g} is not finite")
        if j and t < thr[j - 1]:
            raise ValueError(f"{fn}: thresholds must be ascending; thresholds[{j}] = {t:.17g} < "
                             f"thresholds[{j - 1}] = {thr[j - 1]:.17g}")
    if w.dtype not in (_torch().float32, _torch().bfloat16, _torch().float16, _torch().float64):
        raise TypeError(f"{fn}: topk_weights must be float32, bfloat16, float16 or float64; got "
                        f"{str(w.dtype).replace('torch.', '')}")
    T, K = w.shape
    if K < 1:
        raise ValueError(f"{fn}: topk_weights needs at least one column (K >= 1)")
    if T == 0:
        return levels
    s = w.double()
    bad_pair = (~_torch().isfinite(s)).reshape(-1).nonzero()
    first_bad = int(bad_pair[0]) if bad_pair.numel() else None
    if normalize:
        def row_sums(v):
            tot = v[:, 0].clone()
            for k in range(1, K):
                tot = tot + v[:, k]
            return tot

        tot = row_sums(s)
        over = ~_torch().isfinite(tot) & _torch().isfinite(s).all(1)
        if bool(over.any()):
            # the engine's rule: a row whose float64 sum overflows is scaled
            # by a power of two (exact) bringing its largest value near 1
            _, e = _torch().frexp(s.abs().amax(1))
            scale = _torch().where(over, _torch().ldexp(_torch().ones_like(tot), -e), _torch().ones_like(tot))
            s = s * scale[:, None]
            tot = row_sums(s)
        zero = (tot == 0).nonzero()
        first_zero = int(zero[0]) if zero.numel() else None
    else:
        first_zero = None
    if first_bad is not None and (first_zero is None or first_bad // K <= first_zero):
        t, k = divmod(first_bad, K)
        raise ValueError(f"{fn}: topk_weights[{t}, {k}] = {float(s[t, k]):g} is not finite")
    if first_zero is not None:
        raise ValueError(f"{fn}: topk_weights row {first_zero} sums to 0 and cannot be normalised "
                         "(pass normalize=False to use the raw weights)")
    if normalize:
        s = s / tot[:, None]
    lv = _torch().zeros(s.shape, dtype=_torch().int32, device=s.device)
    for t in thr:
        lv += (s >= t).to(_torch().int32)
    levels.copy_(lv)
    return levels


# ------------------------------------------------------- expert computation

#: The backends of :func:`moe_experts` / :func:`moe_experts_split`.
BACKENDS = ("auto", "engine", "cuda", "torch")


def _check_backend(backend, fn: str) -> str:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"{fn}: backend must be one of {', '.join(repr(b) for b in BACKENDS)}; got {backend!r}")
    return backend


def resolve_backend(backend: str, x, fn: str = "moe_experts") -> str:
    """The backend that runs a call whose activations are ``x``: ``"auto"``
    is the engine for CPU tensors and NumPy arrays, for CUDA tensors
    ``dualsparse._C_cuda`` when it is usable and passed its self-test on the
    device (see :func:`dualsparse.cuda.status`), else ``"torch"``; other
    devices ``"torch"``.  A forced backend that cannot serve ``x`` raises."""
    backend = _check_backend(backend, fn)
    dev = x.device.type if _is_torch(x) else "cpu"
    if backend == "auto":
        if dev in ("cpu", "meta"):  # meta: the engine's binding reports the device
            return "engine"
        if dev == "cuda":
            from . import cuda

            return cuda.path(x.device)[0]
        return "torch"
    if backend == "engine" and dev != "cpu":
        raise ValueError(f"{fn}: backend='engine' (the C engine) reads CPU tensors and NumPy arrays; x is on "
                         f"{x.device}. Use backend='auto' or 'torch'")
    if backend == "cuda":
        if dev != "cuda":
            raise ValueError(f"{fn}: backend='cuda' needs CUDA tensors; x is "
                             f"{'on ' + str(x.device) if _is_torch(x) else 'a ' + type(x).__name__}")
        from . import cuda

        ok, reason = cuda.available()
        if not ok:
            raise RuntimeError(f"{fn}: backend='cuda': dualsparse._C_cuda is not usable: {reason}")
    if backend == "torch" and not _is_torch(x):
        raise TypeError(f"{fn}: backend='torch' needs torch tensors; x is a {type(x).__name__}")
    return backend


def _moe_call(x, topk_ids, topk_weights, gu, up, down, levels, num_partitions, out, num_threads, fn,
              timings=None, backend="auto"):
    nt = _threads(num_threads)
    if isinstance(num_partitions, bool) or not isinstance(num_partitions, (int, np.integer)):
        raise TypeError(f"{fn}: num_partitions must be an int; got {type(num_partitions).__name__}")
    x = _rowmajor_x(_plain(x, "x"), "x")
    topk_weights = _plain(topk_weights, "topk_weights")
    backend = resolve_backend(backend, x, fn)
    if backend != "engine" and getattr(down, "ndim", 3) == 4:
        raise ValueError(f"{fn}: a 4-D (partition-major) down_proj is read by the C engine only; the "
                         f"'{backend}' backend takes the (E, H, I) layout: unpartition_down(down_proj)")
    if out is None:
        if x.ndim != 2:
            raise ValueError(f"{fn}: x must be 2-D (tokens, hidden); got shape {tuple(x.shape)}")
        out = _empty_like_rows(x, x.shape[0], x.shape[1])
    elif _is_torch(out) and out.requires_grad:
        raise ValueError(f"{fn}: out must not require grad")
    if backend == "torch":
        if timings is not None:
            raise NotImplementedError(f"{fn}: timings are measured by the C engine only (backend='engine')")
        return _moe_torch(x, topk_ids, topk_weights, gu, up, down, levels, int(num_partitions), out, fn)
    if backend == "cuda":
        from . import cuda

        if up is not None or not _is_torch(gu):
            raise NotImplementedError(f"{fn}: the CUDA path takes the fused layout only; stack per-expert "
                                      "weights once with stack_linear_experts() and call moe_experts")
        if timings is not None:
            raise NotImplementedError(f"{fn}: timings are not measured on the CUDA path (use CUDA events)")
        return cuda.moe_experts(x, topk_ids, _plain(topk_weights, "topk_weights"), gu, down, levels,
                                int(num_partitions), out)
    _C.moe_experts(x, topk_ids, topk_weights, gu, up, down, levels, int(num_partitions), out, nt, timings)
    return out


def _moe_torch(x, ids, tw, gu, up, down, levels, P, out, fn):
    """The "torch" backend: checks as the engine's binding does, then
    dualsparse._torch_moe."""
    from . import _torch_moe, cuda

    for name, t in (("topk_ids", ids), ("topk_weights", tw), ("levels", levels), ("out", out)):
        if (t is not None or name in ("topk_ids", "topk_weights")) and not _is_torch(t):
            raise TypeError(f"{fn}: {name} must be a torch tensor (backend='torch'); got {type(t).__name__}")
    if up is None:
        cuda.moe_args(x, ids, tw, gu, down, levels, P, out, fn)  # shapes, dtypes, devices, overlap
        w = _torch_moe._Weights(gu=gu, dn=down)
    else:
        w = _split_weights_torch(x, gu, up, down, fn)
        E = w.E
        # the fused checks on stand-in (meta) weights of the same shapes
        meta_gu = _torch().empty((E, 2 * w.I, w.H), dtype=w.dtype, device="meta")
        meta_dn = _torch().empty((E, w.H, w.I), dtype=w.dtype, device="meta")
        cuda.moe_args(x.to("meta"), ids.to("meta"), tw.to("meta"), meta_gu, meta_dn,
                      None if levels is None else levels.to("meta"), P, None if out is None else out.to("meta"), fn)
        for t in (x, ids, tw, levels, out):
            if t is not None and t.device != x.device:
                raise ValueError(f"{fn}: all tensors must be on one device; got {t.device} and {x.device}")
        if out.numel() and any(cuda._overlap(out, t) for t in [x, ids, tw] + ([] if levels is None else [levels])):
            raise ValueError(f"{fn}: out shares memory with an input (x, topk_ids, topk_weights or levels); "
                             "pass a separate output tensor")
    return _torch_moe.moe(x, ids, tw, w, levels, P, out, fn)


def _split_weights_torch(x, gates, ups, downs, fn):
    from . import _torch_moe

    E = len(gates)
    if E < 1 or len(ups) != E or len(downs) != E:
        raise ValueError(f"{fn}: need the same number (>= 1) of gate, up and down weights; got "
                         f"{[len(gates), len(ups), len(downs)]}")
    g0 = gates[0]
    if not _is_torch(g0) or g0.dim() != 2:
        raise ValueError(f"{fn}: gate_proj[0] must be a 2-D torch tensor (I, H)")
    I, H = g0.shape
    for name, ws, shape in (("gate_proj", gates, (I, H)), ("up_proj", ups, (I, H)), ("down_proj", downs, (H, I))):
        for i, t in enumerate(ws):
            if not _is_torch(t) or tuple(t.shape) != shape or t.dtype != g0.dtype or t.device != x.device:
                raise ValueError(f"{fn}: {name}[{i}] must be a {shape} {g0.dtype} tensor on {x.device}; got "
                                 f"{tuple(getattr(t, 'shape', ()))} {getattr(t, 'dtype', type(t).__name__)} "
                                 f"on {getattr(t, 'device', '?')}")
            if t.stride(-1) != 1:
                raise ValueError(f"{fn}: {name}[{i}] must have unit stride along its last dimension")
    return _torch_moe._Weights(gates=gates, ups=ups, downs=downs)


def moe_experts(x, topk_ids, topk_weights, gate_up_proj, down_proj, *, levels=None,
                num_partitions: int = 1, out=None, num_threads: Optional[int] = None,
                timings=None, backend: str = "auto"):
    """Routed expert FFNs with per-pair prefix partitions (transformers 5.x layout).

    ``out[t] = sum_k topk_weights[t,k] * down[e][:, :n] @ (silu(gate[e][:n] @ x[t]) * up[e][:n] @ x[t])``
    with ``e = topk_ids[t,k]`` and ``n = (levels[t,k] * I) // num_partitions``;
    a pair at level 0 costs nothing.

    Args:
        x: (T, H) activations, float32 / bfloat16 / float16.
        topk_ids: (T, K) int32 / int64 selected experts.
        topk_weights: (T, K) combine weights (float32 or x's dtype).
        gate_up_proj: (E, 2I, H), rows [0, I) gate, [I, 2I) up; contiguous.
        down_proj: (E, H, I); contiguous; same dtype as x.  The C engine
            also takes the partition-major layout (E, D, H, I / D) made by
            :func:`partition_down`: with D = num_partitions a pair below the
            full level reads whole rows of its blocks instead of a prefix of
            every row, which at small batches costs close to the whole row
            (benchmarks/README.md).  The prefix is then summed block by
            block, so the last bits differ from the (E, H, I) layout.
        levels: (T, K) integers in [0, num_partitions]; default all full.
        num_partitions: P, the number of prefix partitions of each expert.
        out: optional (T, H) output (same dtype as x, sharing no memory with
            any input); overwritten.
        num_threads: default ``torch.get_num_threads()``.
        timings: optional float64 NumPy array of 4 that receives the seconds
            spent in the routing plan, gate/up, down projection and combine
            (C engine only).
        backend: ``"auto"`` (default), ``"engine"`` (the C engine: CPU
            tensors and NumPy arrays), ``"cuda"`` (``dualsparse._C_cuda``:
            CUDA tensors) or ``"torch"`` (torch operations on the tensors'
            device: grouped GEMMs over prefix views of the weights, see
            ``dualsparse/_torch_moe.py``).  ``"auto"``: the engine on the CPU;
            on CUDA ``_C_cuda`` when it is built, loads and passed its
            one-time self-test on the device, else ``"torch"``
            (:func:`dualsparse.cuda.status` says which and why); ``"torch"``
            on other devices.

    Float32 accumulation throughout; for 16-bit dtypes the SwiGLU activation is
    rounded to the dtype before the down projection, as the model itself does.
    """
    return _moe_call(x, topk_ids, topk_weights, _plain(gate_up_proj, "gate_up_proj"), None,
                     _plain(down_proj, "down_proj"), levels, num_partitions, out, num_threads,
                     "moe_experts", timings, backend)


def _as_expert_sequence(ws, name):
    """A list of per-expert weights from a list, tuple, nn.ModuleList or a
    stacked 3-D tensor (unbound into views)."""
    if _is_torch(ws) or isinstance(ws, np.ndarray):
        if ws.ndim != 3:
            raise ValueError(f"{name} must be a list of 2-D per-expert weights or one 3-D tensor; got shape {tuple(ws.shape)}")
        return list(ws)
    if isinstance(ws, (str, bytes, dict)) or not hasattr(ws, "__len__") or not hasattr(ws, "__iter__"):
        raise TypeError(f"{name} must be a sequence of per-expert weights (list, tuple, nn.ModuleList); "
                        f"got {type(ws).__name__}")
    return [getattr(w, "weight", w) for w in ws]


def _expert_list(ws, name):
    return [_plain(w, f"{name}[{i}]") for i, w in enumerate(_as_expert_sequence(ws, name))]


def moe_experts_split(x, topk_ids, topk_weights, gate_proj, up_proj, down_proj, *, levels=None,
                      num_partitions: int = 1, out=None, num_threads: Optional[int] = None,
                      timings=None, backend: str = "auto"):
    """:func:`moe_experts` for the per-expert layout of transformers 4.x.

    ``gate_proj``, ``up_proj``: sequences of E (I, H) weights (tensors or
    ``nn.Linear`` modules, e.g. Mixtral's ``w1``/``w3``); ``down_proj``: E
    (H, I) weights (``w2``).  The weights are read in place.  ``backend``:
    as for :func:`moe_experts` (``"torch"`` runs one matmul per expert and
    level on views of the per-expert weights; ``"cuda"`` needs the fused
    layout).
    """
    return _moe_call(x, topk_ids, topk_weights, _expert_list(gate_proj, "gate_proj"),
                     _expert_list(up_proj, "up_proj"), _expert_list(down_proj, "down_proj"),
                     levels, num_partitions, out, num_threads, "moe_experts_split", timings, backend)


def stack_linear_experts(gate_proj: Sequence[Any], up_proj: Sequence[Any], down_proj: Sequence[Any]):
    """One-time stacking of per-expert ``nn.Linear`` weights into the fused
    layout, re-pointing every module's parameter at a view of the new storage.

    After the call ``gate_proj[e].weight`` is ``gate_up_proj[e, :I]``,
    ``up_proj[e].weight`` is ``gate_up_proj[e, I:]`` and ``down_proj[e].weight``
    is ``down_proj_stacked[e]``: the modules keep their names, shapes and
    values (so ``state_dict`` is unchanged), the old storage is released, and
    :func:`moe_experts` can run on the stacked tensors with no per-call work.

    Returns:
        (gate_up_proj (E, 2I, H), down_proj (E, H, I)).
    """
    torch = _torch()
    if torch is None:
        import torch  # noqa: F811
    mods = [list(gate_proj), list(up_proj), list(down_proj)]
    names = ("gate_proj", "up_proj", "down_proj")
    E = len(mods[0])
    if E < 1 or any(len(m) != E for m in mods):
        raise ValueError(f"stack_linear_experts: need the same number (>= 1) of gate, up and down modules; got {[len(m) for m in mods]}")
    for name, ms in zip(names, mods):
        for i, m in enumerate(ms):
            if not isinstance(getattr(m, "weight", None), torch.Tensor):
                raise TypeError(f"stack_linear_experts: {name}[{i}] has no tensor .weight (got {type(m).__name__})")
            if getattr(m, "bias", None) is not None:
                raise ValueError(f"stack_linear_experts: {name}[{i}] has a bias; the engine's experts are bias-free")
    w0 = mods[0][0].weight
    I, H = w0.shape
    dtype, device = w0.dtype, w0.device
    for name, ms, shape in zip(names, mods, ((I, H), (I, H), (H, I))):
        for i, m in enumerate(ms):
            if tuple(m.weight.shape) != shape or m.weight.dtype != dtype or m.weight.device != device:
                raise ValueError(
                    f"stack_linear_experts: {name}[{i}].weight is {tuple(m.weight.shape)} {m.weight.dtype} on "
                    f"{m.weight.device}; expected {shape} {dtype} on {device}")
    with torch.no_grad():
        gu = torch.empty((E, 2 * I, H), dtype=dtype, device=device)
        dn = torch.empty((E, H, I), dtype=dtype, device=device)
        for e in range(E):
            gu[e, :I].copy_(mods[0][e].weight)
            gu[e, I:].copy_(mods[1][e].weight)
            dn[e].copy_(mods[2][e].weight)
        for e in range(E):
            mods[0][e].weight.data = gu[e, :I]
            mods[1][e].weight.data = gu[e, I:]
            mods[2][e].weight.data = dn[e]
    return gu, dn


def partition_down(down_proj, num_parts: int):
    """A contiguous copy of ``down_proj`` (E, H, I) in the partition-major
    layout (E, D, H, I / D): block ``b`` holds columns ``[b*I/D, (b+1)*I/D)``,
    the neurons of partition ``b + 1``.  :func:`moe_experts` (C engine) reads
    either layout; with ``D == num_partitions`` a pair below the full level
    reads its blocks' whole rows, not a prefix of each row.  Reorder neurons
    (:func:`permute_neurons`) before partitioning; :func:`unpartition_down`
    inverts it."""
    fn = "partition_down"
    if isinstance(num_parts, bool) or not isinstance(num_parts, (int, np.integer)):
        raise TypeError(f"{fn}: num_parts must be an int; got {type(num_parts).__name__}")
    d = _plain(down_proj, "down_proj")
    if not (_is_torch(d) or isinstance(d, np.ndarray)) or d.ndim != 3:
        raise ValueError(f"{fn}: down_proj must be a 3-D (E, H, I) tensor or array; got "
                         f"{tuple(getattr(d, 'shape', ())) or type(d).__name__}")
    E, H, I = d.shape
    D = int(num_parts)
    if not 1 <= D <= 127 or I % D:
        raise ValueError(f"{fn}: num_parts must be in [1, 127] and divide I = {I}; got {D}")
    if _is_torch(d):
        return d.reshape(E, H, D, I // D).permute(0, 2, 1, 3).contiguous()
    return np.ascontiguousarray(d.reshape(E, H, D, I // D).transpose(0, 2, 1, 3))


def unpartition_down(down_parts):
    """The (E, H, I) layout of a partition-major (E, D, H, I / D) down_proj
    (a contiguous copy): the inverse of :func:`partition_down`."""
    fn = "unpartition_down"
    d = _plain(down_parts, "down_parts")
    if not (_is_torch(d) or isinstance(d, np.ndarray)) or d.ndim != 4:
        raise ValueError(f"{fn}: down_parts must be a 4-D (E, D, H, I / D) tensor or array; got "
                         f"{tuple(getattr(d, 'shape', ())) or type(d).__name__}")
    E, D, H, J = d.shape
    if _is_torch(d):
        return d.permute(0, 2, 1, 3).reshape(E, H, D * J).contiguous()
    return np.ascontiguousarray(d.transpose(0, 2, 1, 3).reshape(E, H, D * J))


# ------------------------------------------------------------- importance

def neuron_importance(x, topk_ids, gate_up_proj, accum, *, topk_weights=None, counts=None,
                      num_threads: Optional[int] = None, up_proj=None):
    """Adds the four importance metrics of the tokens in this batch to ``accum``.

    For every expert e and neuron n, over the (t, k) pairs with
    ``topk_ids[t, k] == e`` (``a = gate[e][n] @ x[t]``, ``b = up[e][n] @ x[t]``,
    ``c = topk_weights[t, k]`` if given, else 1):
    ``accum[0] += c*silu(a)``, ``accum[1] += c*|silu(a)|``,
    ``accum[2] += c*silu(a)*b``, ``accum[3] += c*|silu(a)*b|``.
    ``counts[e]`` (optional) gets the number (or weight sum) of pairs.

    ``gate_up_proj`` is the fused (E, 2I, H) tensor; for the per-expert layout
    pass the gate weights there and the up weights as ``up_proj``.
    ``accum``/``counts`` are float64 arrays (NumPy or torch CPU), shape
    (4, E, I) and (E,), updated in place: stream batches through one pair.
    """
    nt = _threads(num_threads)
    x = _rowmajor_x(_plain(x, "x"), "x")
    if up_proj is None:
        gu, up = _plain(gate_up_proj, "gate_up_proj"), None
    else:
        gu, up = _expert_list(gate_up_proj, "gate_proj"), _expert_list(up_proj, "up_proj")
    tw = None if topk_weights is None else _plain(topk_weights, "topk_weights")
    if _is_cuda(x):
        from . import cuda

        if up is not None:
            raise NotImplementedError("neuron_importance: the CUDA path takes the fused gate_up_proj only")
        return cuda.neuron_importance(x, topk_ids, gu, accum, tw, counts)
    _C.importance(x, topk_ids, tw, gu, up, accum, counts, nt)
    return accum


class ImportanceAccumulator:
    """Streams calibration batches into float64 neuron-importance sums.

    >>> acc = ImportanceAccumulator(num_experts=E, intermediate_size=I)
    >>> for x, ids in batches:           # x: (T, H), ids: (T, K) for one layer
    ...     acc.update(x, ids, gate_up_proj)
    >>> imp = acc.metric("abs_gate")     # (E, I) float64
    >>> perm = importance_order(imp)

    ``weighted=True`` multiplies each token's contribution by its routing
    weight (pass ``topk_weights`` to :meth:`update`).
    """

    def __init__(self, num_experts: int, intermediate_size: int, *, weighted: bool = False):
        for name, v in (("num_experts", num_experts), ("intermediate_size", intermediate_size)):
            if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
                raise TypeError(f"ImportanceAccumulator: {name} must be an int; got {type(v).__name__} {v!r}")
            if v < 1:
                raise ValueError(f"ImportanceAccumulator: {name} must be >= 1; got {v}")
        self.num_experts = int(num_experts)
        self.intermediate_size = int(intermediate_size)
        self.weighted = bool(weighted)
        self.sums = np.zeros((4, self.num_experts, self.intermediate_size), dtype=np.float64)
        self.counts = np.zeros(self.num_experts, dtype=np.float64)
        self.tokens = 0

    def update(self, x, topk_ids, gate_up_proj, *, topk_weights=None, up_proj=None,
               num_threads: Optional[int] = None):
        if self.weighted and topk_weights is None:
            raise ValueError("ImportanceAccumulator(weighted=True).update needs topk_weights")
        neuron_importance(x, topk_ids, gate_up_proj, self.sums,
                          topk_weights=topk_weights if self.weighted else None,
                          counts=self.counts, num_threads=num_threads, up_proj=up_proj)
        self.tokens += int(x.shape[0])
        return self

    def metric(self, name: str = "abs_gate") -> np.ndarray:
        """(E, I) float64 sums of one metric."""
        if name not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}; got {name!r}")
        return self.sums[METRICS.index(name)].copy()


# ---------------------------------------------------------- reconstruction

def importance_order(importance) -> np.ndarray:
    """Per-expert neuron order by descending importance (stable: ties keep
    their original order).  ``importance``: (E, I); returns (E, I) int64
    ``perm`` with ``perm[e, j]`` = the neuron that moves to position j."""
    if _is_torch(importance):
        importance = importance.detach().cpu().double().numpy()
    imp = np.ascontiguousarray(np.asarray(importance, dtype=np.float64))
    if imp.ndim != 2:
        raise ValueError(f"importance must be 2-D (experts, neurons); got shape {imp.shape}")
    perm = np.empty(imp.shape, dtype=np.int64)
    _C.importance_order(imp, perm)
    return perm


def inverse_permutation(perm) -> np.ndarray:
    """``inv`` with ``inv[e, perm[e, j]] = j``.  ``perm`` (E, I) integers,
    every row a permutation of ``range(I)`` (checked)."""
    p = _perm_array(perm, "inverse_permutation")
    if p.ndim != 2:
        raise ValueError(f"inverse_permutation: perm must be 2-D (experts, neurons); got shape {p.shape}")
    _check_permutation(p, "inverse_permutation")
    inv = np.empty_like(p)
    rows = np.arange(p.shape[0])[:, None]
    inv[rows, p] = np.arange(p.shape[1])[None, :]
    return inv


def _inplace(t):
    """The storage of a weight that is permuted in place (autograd is not
    involved: reconstruction changes no function value)."""
    return t.detach() if _is_torch(t) else t


def _perm_array(perm, fn: str = "permute_neurons"):
    """perm as a contiguous int64 NumPy array (a copy when it must convert),
    with every problem named as ``fn: perm ...``."""
    if _is_torch(perm):
        if perm.is_neg():
            perm = perm.resolve_neg()
        perm = perm.detach().cpu().numpy()
    try:
        p = np.asarray(perm)
    except (OverflowError, ValueError, TypeError) as exc:
        raise ValueError(f"{fn}: perm cannot be read as an integer array ({exc})") from None
    if p.dtype == object:
        raise TypeError(f"{fn}: perm must hold integers (neuron indices); got Python objects "
                        "(a ragged list, or values beyond the int64 range?)")
    if p.dtype == np.bool_ or not np.issubdtype(p.dtype, np.integer):
        raise TypeError(f"{fn}: perm must hold integers (neuron indices); got dtype {p.dtype}")
    if p.dtype == np.uint64 and p.size and int(p.max()) > np.iinfo(np.int64).max:
        raise ValueError(f"{fn}: perm holds {int(p.max())}, beyond the int64 range of neuron indices")
    return np.ascontiguousarray(p, dtype=np.int64)


def _check_permutation(p: np.ndarray, fn: str) -> None:
    """Every row of the (E, I) int64 array p is a permutation of range(I)."""
    E, I = p.shape
    bad = (p < 0) | (p >= I)
    if bad.any():
        e, j = map(int, np.argwhere(bad)[0])
        raise ValueError(f"{fn}: perm[{e}, {j}] = {int(p[e, j])} is outside [0, I={I})")
    srt = np.sort(p, axis=1)
    dup = srt[:, 1:] == srt[:, :-1]
    if dup.any():
        e, j = map(int, np.argwhere(dup)[0])
        raise ValueError(f"{fn}: perm[{e}] is not a permutation: {int(srt[e, j])} appears twice")


def permute_neurons(gate_up_proj, down_proj, perm, *, inverse: bool = False,
                    num_threads: Optional[int] = None) -> None:
    """Reorders every expert's neurons in place (fused 5.x layout): new neuron
    j = old neuron ``perm[e, j]`` (rows j and I+j of ``gate_up_proj``, column
    j of ``down_proj``).  ``inverse=True`` undoes it.  The permutation is
    checked fully before any weight is touched; outputs are unchanged."""
    nt = _threads(num_threads)
    _C.permute_neurons(_inplace(gate_up_proj), None, _inplace(down_proj),
                       _perm_array(perm, "permute_neurons"), bool(inverse), nt)


def permute_neurons_split(gate_proj, up_proj, down_proj, perm, *, inverse: bool = False,
                          num_threads: Optional[int] = None) -> None:
    """:func:`permute_neurons` for per-expert weights (lists of tensors or
    ``nn.Linear`` modules: gate/up (I, H), down (H, I))."""
    nt = _threads(num_threads)

    def raw(ws, name):
        return [_inplace(w) for w in _as_expert_sequence(ws, name)]

    _C.permute_neurons(raw(gate_proj, "gate_proj"), raw(up_proj, "up_proj"), raw(down_proj, "down_proj"),
                       _perm_array(perm, "permute_neurons_split"), bool(inverse), nt)


# ------------------------------------------------------------ SIMD control

def simd_level() -> str:
    """The SIMD kernel level in use ("amx_bf16", "avx512_bf16", "avx512", "avx2" or "generic";
    "amx_bf16" adds the AMX tile unit for blocks of bfloat16 rows, "avx512_bf16" the
    BF16 dot product; both fall back to "avx512" for other dtypes)."""
    return _C.simd_level()


def simd_levels() -> dict:
    """{level: usable on this CPU with this build}."""
    return _C.simd_levels()


def set_simd_level(level: str) -> None:
    """Force a kernel level at or below the detected one (tests, benchmarks)."""
    _C.set_simd_level(level)


def block_gemm() -> bool:
    """Whether levels that have a block GEMM for blocks of many rows (AVX2:
    32 rows and more; AVX-512: 96 and more in float32, 32 and more in
    bfloat16 and float16; AMX bfloat16: every block) use it; True unless
    switched off."""
    return _C.block_gemm()


def set_block_gemm(enabled: bool) -> None:
    """Use (True, the default) or bypass (False) the block GEMM: bypassed,
    every block goes through the dot tiles.  Process-wide, from the next
    call on; for benchmarks that compare the two paths (results differ in
    the last bits: the summation order changes)."""
    _C.set_block_gemm(enabled)


def rows_four() -> bool:
    """Whether the GEMV-shaped kernel (experts with 1-3 rows: decode) reads
    weight rows four at a time, four streams side by side (True), or one at a
    time except short rows (False).  The default comes from the CPU: True on
    Intel, whose prefetchers read several streams faster than one, False
    elsewhere (benchmarks/README.md)."""
    return _C.rows_four()


def set_rows_four(four: Optional[bool]) -> None:
    """Weight rows of the GEMV-shaped kernel four at a time (True), one at a
    time (False), or the CPU's rule (None).  Process-wide, from the next call
    on; for benchmarks.  The two sum in different orders: results differ in
    the last bits between them (never between thread counts)."""
    _C.set_rows_four(four)


def _simd_from_environment() -> None:
    """``DUALSPARSE_SIMD=avx2`` (or another level) holds the engine to that
    level from import on, e.g. to measure or test the AVX2 kernels on an
    AVX-512 machine; a level the CPU lacks or an unknown name is an error
    that names the variable."""
    want = os.environ.get("DUALSPARSE_SIMD", "").strip()
    if not want:
        return
    try:
        set_simd_level(want)
    except (ValueError, NotImplementedError) as exc:   # unknown name / not on this CPU
        raise type(exc)(f"environment variable DUALSPARSE_SIMD={want!r}: {exc}") from None


_simd_from_environment()
