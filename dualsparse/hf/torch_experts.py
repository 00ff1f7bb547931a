"""Pure-torch expert computation with prefix partitions.

``swiglu_experts`` hands SiLU experts in the engine's dtypes to
:func:`dualsparse.ops.moe_experts` (backend "auto": the engine, the CUDA
module or the torch backend, which all skip dropped work); the masked
computation here serves what they do not (other activations, float64) and
GPT-OSS's biased, clamped, interleaved experts.  The semantics are the
engine's: a pair at level p computes the first ``(p * I) // P`` neurons of
its expert; a dropped pair contributes nothing.  Neurons past a pair's prefix
are masked to zero, which gives the same values as not computing them (no
time is saved by the masked computation).
"""
from __future__ import annotations

import torch


def prefix_mask(levels, P: int, I: int, device) -> torch.Tensor:
    """(T, K, I) boolean mask of the neurons each pair computes."""
    n = (levels.to(torch.int64) * I) // P
    return torch.arange(I, device=device)[None, None, :] < n[..., None]


def _pairs_by_expert(ids, levels, P: int, I: int, E: int):
    """(e, token rows, slots, neuron mask of those pairs or None) for every
    expert with at least one pair that computes something."""
    mask = None if levels is None else prefix_mask(levels, P, I, ids.device)
    for e in torch.unique(ids.reshape(-1)).tolist():
        if e >= E:  # expert-parallel sentinel index
            continue
        t_idx, k_idx = torch.where(ids == e)
        m = None
        if mask is not None:
            m = mask[t_idx, k_idx]
            keep = m.any(-1)
            t_idx, k_idx, m = t_idx[keep], k_idx[keep], m[keep]
        if t_idx.numel():
            yield e, t_idx, k_idx, m


def _is_silu(act) -> bool:
    return (act is torch.nn.functional.silu or isinstance(act, torch.nn.SiLU)
            or type(act).__name__ == "SiLUActivation")  # transformers' ACT2FN["silu"]


def swiglu_experts(x, ids, w, gate_up, down, levels=None, P: int = 1, act=torch.nn.functional.silu,
                   backend: str = "auto"):
    """x: (T, H); ids, w, levels: (T, K); gate_up: (E, 2I, H); down: (E, H, I).

    SiLU experts in float32 / bfloat16 / float16 run through
    :func:`dualsparse.ops.moe_experts` with ``backend`` (dropped pairs and
    neurons past a prefix cost nothing; expert ids >= E, the expert-parallel
    sentinel, are dropped pairs); anything else (another activation,
    float64, mixed dtypes) through the masked computation below."""
    from .. import ops

    E, I2, _ = gate_up.shape
    if (_is_silu(act) and x.dtype in (torch.float32, torch.bfloat16, torch.float16) and gate_up.dtype == x.dtype
            and down.dtype == x.dtype and gate_up.is_contiguous() and down.is_contiguous() and x.dim() == 2):
        sentinel = ids >= E
        lv = torch.full(ids.shape, P, dtype=torch.int8, device=ids.device) if levels is None else levels
        if bool(sentinel.any()):
            lv = torch.where(sentinel, torch.zeros((), dtype=lv.dtype, device=lv.device), lv)
            ids = torch.where(sentinel, torch.zeros((), dtype=ids.dtype, device=ids.device), ids)
        tw = w if w.dtype in (torch.float32, x.dtype) else w.float()
        return ops.moe_experts(x, ids, tw, gate_up, down, levels=lv, num_partitions=P, backend=backend)
    I = I2 // 2
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e, t_idx, k_idx, m in _pairs_by_expert(ids, levels, P, I, E):
        gu = x[t_idx] @ gate_up[e].t()
        h = act(gu[:, :I]) * gu[:, I:]
        if m is not None:
            h = h * m
        y = (h @ down[e].t()).float() * w[t_idx, k_idx, None].float()
        out.index_add_(0, t_idx, y)
    return out.to(x.dtype)


def gpt_oss_experts(module, x, ids, w, levels=None, P: int = 1):
    """GPT-OSS experts (gate_up_proj [E, H, 2I] with gate/up in even/odd
    columns, biases, clamped gate).  x: (T, H); ids, w, levels: (T, K).  A
    pair at level p computes neurons [0, (p*I)//P) and always gets the down
    bias (the expert's output bias is not split between partitions)."""
    E, _, I2 = module.gate_up_proj.shape
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e, t_idx, k_idx, m in _pairs_by_expert(ids, levels, P, I2 // 2, E):
        gate, up = gpt_oss_gate_up(module, x[t_idx], e)
        gate = gate.clamp(min=None, max=module.limit)
        up = up.clamp(min=-module.limit, max=module.limit)
        h = (up + 1) * (gate * torch.sigmoid(gate * module.alpha))
        if m is not None:
            h = h * m
        y = h @ module.down_proj[e] + module.down_proj_bias[e]
        out.index_add_(0, t_idx, (y * w[t_idx, k_idx, None]).float())
    return out.to(x.dtype)


def gpt_oss_gate_up(module, x, e):
    """(a, b) pre-activation gate and up values of expert e for rows x."""
    gu = x @ module.gate_up_proj[e] + module.gate_up_proj_bias[e]
    return gu[..., ::2], gu[..., 1::2]
