"""The ``"torch"`` backend of :func:`dualsparse.ops.moe_experts`: the
engine's semantics from torch operations on the tensors' own device.

Work is done only for live pairs.  Pairs at level 0 are never gathered; the
live pairs are ordered by level (highest first), then expert, then (t, k), so
the rows of each level form one slice grouped by expert, and each level p
runs one grouped GEMM per projection over the experts' *prefix* views:

* gate: ``gate_up_proj[:, :n_p, :]``, up: ``gate_up_proj[:, I:I + n_p, :]``
  (both views of the model's weight, transposed, never copied),
* down: ``down_proj[:, :, :n_p]`` (a view),

with ``n_p = (p * I) // P``.  ``torch.nn.functional.grouped_mm`` (or
``torch._grouped_mm``) runs them where the installed torch accepts the
operands for the device and dtype (a one-time probe per device and dtype; its
layout rules are checked per call, e.g. 16-byte strides); otherwise, per
call, a loop of one matmul per (level, expert) group on the same views.

Rounding points are the engine's: gate/up products are accumulated in
float32 and kept in float32, the SwiGLU activation ``silu(g) * u`` is
computed in float32 and rounded to the weight dtype, the down projection is
accumulated and kept in float32, and the combine adds ``w[t,k] * y`` over k
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

    # per expert, (n, H) / (H, n) views
    def gate(self, e, n):
        return self.gu[e, :n] if self.fused else self.gates[e][:n]

    def up(self, e, n):
        return self.gu[e, self.I:self.I + n] if self.fused else self.ups[e][:n]

    def down(self, e, n):
        return self.dn[e, :, :n] if self.fused else self.downs[e][:, :n]

    # all experts, transposed for grouped_mm: (E, H, n) / (E, n, H)
    def gate_t(self, n):
        return self.gu[:, :n].transpose(-2, -1)

    def up_t(self, n):
        return self.gu[:, self.I:self.I + n].transpose(-2, -1)

    def down_t(self, n):
        return self.dn[:, :, :n].transpose(-2, -1)


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
    _check_values(fn, ids, levels, E, P)
    if T == 0:
        return out
    lv = (torch.full((T, K), P, dtype=torch.int64, device=dev) if levels is None
          else levels.to(torch.int64))
    ids64 = ids.to(torch.int64)
    # live pairs only, in (t, k) order, then stably ordered by (level desc, expert)
    live = (lv > 0).reshape(-1).nonzero().squeeze(1)
    R = int(live.numel())
    pos = torch.full((T * K,), R, dtype=torch.int64, device=dev)  # row of each pair; R = the zero row
    Ys = []
    if R:
        lvl = lv.reshape(-1)[live]
        exp = ids64.reshape(-1)[live]
        key = (P - lvl) * E + exp
        key, order = torch.sort(key, stable=True)
        pairs = live[order]
        counts = torch.bincount(key, minlength=P * E).reshape(P, E)
        pos[pairs] = torch.arange(R, device=dev)
        counts_host = counts.tolist()              # the one synchronisation
        xs = x.index_select(0, torch.div(pairs, K, rounding_mode="floor"))  # (R, H): live rows only
        caps = capabilities(dev, dt)
        grouped = caps["grouped_mm"] and w.fused if use_grouped_mm is None else (use_grouped_mm and w.fused)
        if grouped:
            offs_all = torch.cumsum(counts, dim=1).to(torch.int32)
        r0 = 0
        for q in range(P):                         # level p = P - q, highest first
            p = P - q
            m = sum(counts_host[q])
            if m == 0:
                continue
            n = (p * I) // P
            rows = xs[r0:r0 + m]
            Y = None
            if grouped:
                Y = _level_grouped(rows, w, n, offs_all[q], caps, dt)
            if Y is None:
                Y = _level_loop(rows, w, n, counts_host[q], caps, dt)
            Ys.append(Y)
            r0 += m
    Ys.append(torch.zeros((1, H), dtype=torch.float32, device=dev))
    Y = torch.cat(Ys) if len(Ys) > 1 else Ys[0]
    pos = pos.reshape(T, K)
    wts = torch.where(lv > 0, tw.float(), torch.zeros((), dtype=torch.float32, device=dev))
    acc = torch.zeros((T, H), dtype=torch.float32, device=dev)
    for k in range(K):                             # the engine's k-order combine
        acc.addcmul_(Y.index_select(0, pos[:, k]), wts[:, k:k + 1])
    out.copy_(acc)
    return out


def _swiglu_into(g, u, dst):
    """dst (dtype view) = silu(g) * u computed in float32, rounded once."""
    torch.mul(F.silu(g), u, out=g)
    dst.copy_(g)
    return dst


def _level_grouped(rows, w: _Weights, n, offs, caps, dt):
    """One level's rows (grouped by expert, offsets offs) through grouped
    GEMMs over the prefix views; None when an operand's layout is refused."""
    gt, ut, dnt = w.gate_t(n), w.up_t(n), w.down_t(n)
    act = _padded_rows(rows.shape[0], n, dt, rows.device)
    if not all(_gmm_operand_ok(t) for t in (rows, gt, ut, dnt, act)):
        return None
    try:
        g = _gmm_f32(rows, gt, offs, caps)
        u = _gmm_f32(rows, ut, offs, caps)
        _swiglu_into(g, u, act)
        Y = _gmm_f32(act, dnt, offs, caps)
    except RuntimeError:  # a layout rule this torch enforces beyond the known ones
        return None
    path_counts["grouped_mm"] += 1
    return Y


def _level_loop(rows, w: _Weights, n, counts, caps, dt):
    """One level's rows through one matmul per expert group (same views)."""
    Y = torch.empty((rows.shape[0], w.H), dtype=torch.float32, device=rows.device)
    act = torch.empty((rows.shape[0], n), dtype=dt, device=rows.device)
    r = 0
    for e, c in enumerate(counts):
        if c == 0:
            continue
        xr = rows[r:r + c]
        g = _mm_f32(xr, w.gate(e, n).t(), caps)
        u = _mm_f32(xr, w.up(e, n).t(), caps)
        a = _swiglu_into(g, u, act[r:r + c])
        Y[r:r + c] = _mm_f32(a, w.down(e, n).t(), caps)
        r += c
    path_counts["loop"] += 1
    return Y
