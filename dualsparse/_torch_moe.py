"""The ``"torch"`` backend of :func:`dualsparse.ops.moe_experts`: the
engine's semantics from torch operations on the tensors' own device.

Work is done only for live pairs.  Pairs at level 0 are never gathered; the
live pairs become rows ordered as in the engine (by expert, levels
descending inside an expert, then (t, k)), so the rows of an expert that
need partition q (level >= q) are a prefix of its rows.  Per neuron range
[lo, hi) of consecutive partitions (merged when the same rows need them, so
an expert set without partial rows runs as with one partition), the rows
that need it run one grouped GEMM per projection over *views* of the
model's weights, never copies:

* gate: ``gate_up_proj[:, lo:hi, :]``, up: ``gate_up_proj[:, I + lo:I + hi, :]``
  (transposed views; one GEMM over ``gate_up_proj`` itself for [0, I)),
* down: ``down_proj[:, :, lo:hi]``, added into each row's float32 output.

So every row computes exactly its prefix ``(level * I) // P`` and every
weight byte is read once per call, as in the engine.
``torch.nn.functional.grouped_mm`` (or ``torch._grouped_mm``) runs them
where the installed torch has it for the device and dtype (a one-time probe
per device and dtype; its layout rules, e.g. 16-byte strides, are checked per
call); otherwise, per call, one matmul per expert on the same views.  One
host synchronisation per call (the row counts and the validation flag).

Rounding points are the engine's: gate/up products are accumulated in
float32 and kept in float32, the SwiGLU activation ``silu(g) * u`` is
computed in float32 and rounded to the weight dtype, the down projection is
accumulated and kept in float32 (a row's neuron ranges are added in order),
and the combine adds ``w[t,k] * y`` over k
in order in float32 and rounds once to the output dtype.  Where the device's
16-bit matmuls cannot return float32 (torch's CPU kernels: grouped_mm and mm
take no ``out_dtype`` there), the gate/up and down products are rounded to
the dtype at the matmul's output, as transformers' own experts do: that
adds one rounding of the dtype to the pre-activations and to each pair's
down output (see :func:`capabilities`).
"""
from __future__ import annotations

import threading
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F

_GROUPED_MM: Optional[Callable] = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)

_CAPS: Dict[tuple, dict] = {}
_CAPS_LOCK = threading.Lock()

#: Counters of the GEMM paths taken (tests and benchmarks read them).
path_counts = {"grouped_mm": 0, "loop": 0}


def _probe(fn) -> bool:
    try:
        return bool(fn())
    except Exception:  # noqa: BLE001 - any refusal means "not supported here"
        return False


def capabilities(device, dtype) -> dict:
    """What torch's matmuls offer on ``device`` for ``dtype`` (probed once,
    on tiny exact problems): ``grouped_mm`` (the grouped GEMM runs),
    ``grouped_mm_f32`` (it returns float32 for this dtype), ``mm_f32``
    (``torch.mm`` returns float32 for this dtype).  float32 always has
    float32 outputs."""
    device = torch.device(device)
    key = (device.type, device.index, dtype)
    with _CAPS_LOCK:
        caps = _CAPS.get(key)
        if caps is not None:
            return caps
    f32 = dtype == torch.float32
    # small integers: every product and sum is exact in every dtype
    a = (torch.arange(8 * 16, device=device) % 5 - 2).to(dtype).reshape(8, 16)
    b = (torch.arange(2 * 8 * 16, device=device) % 3 - 1).to(dtype).reshape(2, 8, 16)
    offs = torch.tensor([3, 8], dtype=torch.int32, device=device)
    want = torch.cat([a[:3].double() @ b[0].double().t(), a[3:].double() @ b[1].double().t()])

    def gmm(out_dtype):
        if _GROUPED_MM is None:
            return False
        y = _GROUPED_MM(a, b.transpose(-2, -1), offs=offs, out_dtype=out_dtype)
        return y.dtype == (out_dtype or dtype) and torch.equal(y.double(), want)

    def mm_f32():
        if f32:
            return True
        y = torch.mm(a, b[0].t(), out_dtype=torch.float32)
        return y.dtype == torch.float32 and torch.equal(y.double(), a.double() @ b[0].double().t())

    native = _probe(lambda: gmm(None))
    caps = {
        "grouped_mm": native,
        "grouped_mm_f32": native and (f32 or _probe(lambda: gmm(torch.float32))),
        "mm_f32": _probe(mm_f32),
    }
    with _CAPS_LOCK:
        _CAPS[key] = caps
    return caps


def _gmm_operand_ok(t: torch.Tensor) -> bool:
    """grouped_mm's layout rule for one operand (last two dims): one unit
    stride, the other at least the extent and a multiple of 16 bytes; the
    data 16-byte aligned (required off the CPU, and by older CPU kernels)."""
    align = 16 // t.element_size()
    s0, s1 = t.stride(-2), t.stride(-1)
    n0, n1 = t.shape[-2], t.shape[-1]
    if t.data_ptr() % 16:
        return False
    if s0 == 1 and s1 >= max(1, n0):
        return s1 % align == 0
    if s1 == 1 and s0 >= max(1, n1):
        return s0 % align == 0
    return False


def _padded_rows(rows: int, n: int, dtype, device) -> torch.Tensor:
    """(rows, n) view of a buffer whose row stride is a multiple of 16 bytes."""
    esz = torch.empty((), dtype=dtype).element_size()
    align = 16 // esz
    ld = (n + align - 1) // align * align
    return torch.empty((rows, ld), dtype=dtype, device=device)[:, :n]


class _Weights:
    """Prefix views of one expert set: fused (E, 2I, H) / (E, H, I) tensors,
    or per-expert lists (split layout)."""

    def __init__(self, gu=None, dn=None, gates=None, ups=None, downs=None):
        self.fused = gu is not None
        self.gu, self.dn = gu, dn
        self.gates, self.ups, self.downs = gates, ups, downs
        if self.fused:
            self.E, I2, self.H = gu.shape
            self.I = I2 // 2
            self.dtype = gu.dtype
        else:
            self.E = len(gates)
            self.I, self.H = gates[0].shape
            self.dtype = gates[0].dtype

    # per expert, neurons [lo, hi): (n, H) / (H, n) views
    def gate(self, e, lo, hi):
        return self.gu[e, lo:hi] if self.fused else self.gates[e][lo:hi]

    def up(self, e, lo, hi):
        return self.gu[e, self.I + lo:self.I + hi] if self.fused else self.ups[e][lo:hi]

    def down(self, e, lo, hi):
        return self.dn[e, :, lo:hi] if self.fused else self.downs[e][:, lo:hi]


def _check_values(fn, ids, levels, E, P):
    """The engine's range checks (ids first, then levels), on the device:
    the first offending entry in (t, k) order is reported."""
    bad = (ids < 0) | (ids >= E)
    if bool(bad.any()):
        i = int(bad.reshape(-1).nonzero()[0])
        t, k = divmod(i, ids.shape[1])
        raise ValueError(f"{fn}: topk_ids[{t}, {k}] = {int(ids[t, k])} is outside [0, {E}) (E = {E} experts)")
    if levels is not None:
        bad = (levels < 0) | (levels > P)
        if bool(bad.any()):
            i = int(bad.reshape(-1).nonzero()[0])
            t, k = divmod(i, levels.shape[1])
            raise ValueError(f"{fn}: levels[{t}, {k}] = {int(levels[t, k])} is outside [0, num_partitions={P}]")


def _mm_f32(a, b, caps):
    """a @ b with a float32 result (float32 accumulation; rounded to a's dtype
    first where the device's matmul cannot return float32)."""
    if a.dtype == torch.float32:
        return torch.mm(a, b)
    if caps["mm_f32"]:
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a, b).float()


def _gmm_f32(a, b, offs, caps):
    if a.dtype == torch.float32 or caps["grouped_mm_f32"]:
        return _GROUPED_MM(a, b, offs=offs, out_dtype=torch.float32)
    return _GROUPED_MM(a, b, offs=offs).float()


def moe(x, ids, tw, w: _Weights, levels, P: int, out, fn: str = "moe_experts", use_grouped_mm: Optional[bool] = None):
    """out (T, H) = the routed experts of x (see ops.moe_experts); the
    arguments are already checked for shapes, dtypes and devices."""
    T, K = ids.shape
    E, I, H = w.E, w.I, w.H
    dev, dt = x.device, x.dtype
    if T == 0:
        _check_values(fn, ids, levels, E, P)
        return out
    ids64 = ids.to(torch.int64).reshape(-1)
    lv = (torch.full((T * K,), P, dtype=torch.int64, device=dev) if levels is None
          else levels.to(torch.int64).reshape(-1))
    bad = ((ids64 < 0) | (ids64 >= E)).any().reshape(1)
    if levels is not None:
        bad = bad | ((lv < 0) | (lv > P)).any().reshape(1)
    # rows: the live pairs grouped by expert, levels descending inside an expert, (t, k) order
    # inside a level (a stable sort); dropped pairs get the last key and are never gathered
    live = lv > 0
    key = torch.where(live, ids64.clamp(0, E - 1) * P + (P - lv.clamp(0, P)), E * P)
    key, order = torch.sort(key, stable=True)
    counts = torch.bincount(key, minlength=E * P + 1)
    host = torch.cat([bad.to(torch.int64), counts]).tolist()  # the one synchronisation
    if host[0]:
        _check_values(fn, ids, levels, E, P)
    R = T * K - host[-1]
    pos = torch.full((T * K,), R, dtype=torch.int64, device=dev)  # row of each pair; R = the zero row
    Y = torch.zeros((1, H), dtype=torch.float32, device=dev)
    if R:
        pairs = order[:R]
        pos[pairs] = torch.arange(R, device=dev)
        xs = x.index_select(0, torch.div(pairs, K, rounding_mode="floor"))  # (R, H): live rows only
        Y = torch.cat([_rows_through_experts(xs, lv[pairs], host[1:-1], counts[:E * P], w, P, dt,
                                             use_grouped_mm), Y])
    pos = pos.reshape(T, K)
    wts = torch.where(live.reshape(T, K), tw.float(), torch.zeros((), dtype=torch.float32, device=dev))
    acc = torch.zeros((T, H), dtype=torch.float32, device=dev)
    for k in range(K):                             # the engine's k-order combine
        acc.addcmul_(Y.index_select(0, pos[:, k]), wts[:, k:k + 1])
    out.copy_(acc)
    return out


def partition_ranges(cnt, E: int, P: int, I: int):
    """[(q0, q1, lo, hi, m)]: consecutive partitions q0..q1 that the same rows
    need, as one neuron range [lo, hi), with m[e] = the rows of expert e whose
    level reaches q0 (a prefix of e's rows).  cnt[e * P + (P - l)] = rows of
    e at level l.  As in the engine, an expert set with no partial rows runs
    as with one partition."""
    m_of = []
    for q in range(1, P + 1):
        m_of.append([sum(cnt[e * P:e * P + (P - q) + 1]) for e in range(E)])
    ranges = []
    q = 1
    while q <= P and any(m_of[q - 1]):
        q1 = q
        while q1 < P and m_of[q1] == m_of[q - 1]:
            q1 += 1
        ranges.append((q, q1, ((q - 1) * I) // P, (q1 * I) // P, m_of[q - 1]))
        q = q1 + 1
    return ranges


def _rows_through_experts(xs, lvl, cnt, cnt_dev, w: _Weights, P, dt, use_grouped_mm):
    """Y (R, H) float32 for the rows xs (ordered by expert, level desc) with
    levels lvl.  Per neuron range [lo, hi) of consecutive partitions, the
    rows whose level reaches it (per expert, a prefix of its rows) compute
    gate/up on those neurons and add their down projection: every weight
    byte of a range is read once per call, every row computes exactly its
    prefix."""
    dev = xs.device
    caps = capabilities(dev, dt)
    grouped = (caps["grouped_mm"] if use_grouped_mm is None else use_grouped_mm) and w.fused
    Y = None
    # rows of each expert whose level reaches q, on the device: m_dev[e, P - q]
    m_dev = cnt_dev.reshape(w.E, P).cumsum(1) if grouped else None
    for q0, q1, lo, hi, m in partition_ranges(cnt, w.E, P, w.I):
        rows_n = sum(m)
        if Y is None:   # the first range: every live row
            idx, rows = None, xs
        else:           # rows whose level reaches q0 (known count: no synchronisation)
            idx = torch.nonzero_static(lvl >= q0, size=rows_n).squeeze(1)
            rows = xs.index_select(0, idx)
        Yq = None
        if grouped:
            offs = m_dev[:, P - q0].cumsum(0).to(torch.int32)  # computed on the device: no copy, no wait
            Yq = _range_grouped(rows, w, lo, hi, offs, caps, dt)
        if Yq is None:
            Yq = _range_loop(rows, w, lo, hi, m, caps, dt)
        if Y is None:
            Y = Yq
        else:           # unique rows: a gather, an add and a scatter (deterministic)
            Y.index_copy_(0, idx, Y.index_select(0, idx).add_(Yq))
    return Y


def _swiglu_into(g, u, dst):
    """dst (dtype view) = silu(g) * u computed in float32, rounded once."""
    torch.mul(F.silu(g), u, out=g)
    dst.copy_(g)
    return dst


def _range_grouped(rows, w: _Weights, lo, hi, offs, caps, dt):
    """Neurons [lo, hi) of the rows (grouped by expert, offsets offs) through
    grouped GEMMs over views of the weights; None when an operand's layout is
    refused (the caller then loops)."""
    n = hi - lo
    full = lo == 0 and hi == w.I  # all neurons: gate and up in one GEMM over gate_up_proj itself
    if full:
        gt, ut = w.gu.transpose(-2, -1), None
    else:
        gt, ut = w.gu[:, lo:hi].transpose(-2, -1), w.gu[:, w.I + lo:w.I + hi].transpose(-2, -1)
    dnt = w.dn[:, :, lo:hi].transpose(-2, -1)
    act = _padded_rows(rows.shape[0], n, dt, rows.device)
    if not all(_gmm_operand_ok(t) for t in (rows, gt, dnt, act) + (() if full else (ut,))):
        return None
    try:
        if full:
            gu = _gmm_f32(rows, gt, offs, caps)
            g, u = gu[:, :n], gu[:, n:]
        else:
            g = _gmm_f32(rows, gt, offs, caps)
            u = _gmm_f32(rows, ut, offs, caps)
        _swiglu_into(g, u, act)
        Y = _gmm_f32(act, dnt, offs, caps)
    except RuntimeError:  # a layout rule this torch enforces beyond the known ones
        return None
    path_counts["grouped_mm"] += 1
    return Y


def _range_loop(rows, w: _Weights, lo, hi, m, caps, dt):
    """Neurons [lo, hi) of the rows through one matmul per expert (views)."""
    Y = torch.empty((rows.shape[0], w.H), dtype=torch.float32, device=rows.device)
    act = torch.empty((rows.shape[0], hi - lo), dtype=dt, device=rows.device)
    r = 0
    for e, c in enumerate(m):
        if c == 0:
            continue
        xr = rows[r:r + c]
        g = _mm_f32(xr, w.gate(e, lo, hi).t(), caps)
        u = _mm_f32(xr, w.up(e, lo, hi).t(), caps)
        a = _swiglu_into(g, u, act[r:r + c])
        Y[r:r + c] = _mm_f32(a, w.down(e, lo, hi).t(), caps)
        r += c
    path_counts["loop"] += 1
    return Y
