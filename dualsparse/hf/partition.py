"""Complete expert partition: a standard checkpoint with E*P experts."""
from __future__ import annotations

import copy
import re
from typing import Dict

import torch

from .families import expert_count_attr, family_for, num_experts
from .patching import find_moe_blocks, get_handle


def _router_scale(family, config) -> float:
    """Factor applied to each sub-expert's down projection so that the
    copies' routing weights (each a share of the original) add back up."""
    if family.model_type == "deepseek_v3" and not getattr(config, "norm_topk_prob", True):
        return 1.0  # sigmoid scores without renormalisation: every copy gets the full weight
    return None  # P


def complete_partition(model, num_partitions: int = 2):
    """A new model of the same family whose every routed expert is split into
    ``num_partitions`` (P) sub-experts: E*P experts, top-(K*P) routing,
    intermediate size I/P, each gate row repeated P times and each
    sub-expert's down projection scaled by P.  It is a standard Hugging Face
    model (``save_pretrained`` writes it, vanilla transformers reloads it)
    with the same outputs up to rounding.  Raises for routers that copies of
    an expert cannot reproduce exactly (PhiMoE's sparsemixer; DeepSeek-V3
    group-limited routing).

    Limits: (1) each sub-expert's output is rounded to the dtype before the
    combine adds them, so in bfloat16/float16 the two models differ by
    roundings; (2) where the router scores of two different experts tie
    exactly at the top-K boundary, the original's top-K keeps one of them
    and the top-(K*P) may keep copies of several (torch's tie order), so that
    token gets some sub-experts of each tied expert.  Exact ties are rare in
    float32 (equal router rows) but occur in bfloat16 (8-bit mantissas), and
    the roundings of (1) can create or break them in later layers.
    On transformers 5.x a sub-expert size that transformers' default
    ``grouped_mm`` kernels cannot take (not a multiple of 8 neurons) makes
    the exported model use the ``eager`` experts implementation, also in its
    saved config."""
    P = num_partitions
    if isinstance(P, bool) or not isinstance(P, int) or P < 1:
        raise ValueError(f"dualsparse.complete_partition: num_partitions must be an int >= 1; got {num_partitions!r}")
    family = family_for(model)
    cfg = model.config
    if family.complete_partition_blocker is not None:
        why = family.complete_partition_blocker(cfg)
        if why:
            raise NotImplementedError(f"dualsparse.complete_partition: cannot partition {family.model_type} "
                                      f"exactly: {why}")
    h = get_handle(model)
    if h is not None and not h.reverted:
        raise ValueError("dualsparse.complete_partition: revert the patch first (handle.revert()); "
                         "the exported model is a plain transformers model")
    blocks = find_moe_blocks(model, family)
    if not blocks:
        raise ValueError(f"dualsparse.complete_partition: {type(model).__name__} has no sparse MoE layer")
    E = num_experts(cfg)
    inter_attr = family.inter_attr
    I = int(getattr(cfg, inter_attr))
    if I % P != 0:
        raise ValueError(f"dualsparse.complete_partition: num_partitions={P} does not divide the experts' "
                         f"intermediate size {inter_attr}={I}")
    scale = _router_scale(family, cfg)
    scale = float(P) if scale is None else scale

    new_cfg = copy.deepcopy(cfg)
    setattr(new_cfg, expert_count_attr(cfg), E * P)
    new_cfg.num_experts_per_tok = int(cfg.num_experts_per_tok) * P
    setattr(new_cfg, inter_attr, I // P)
    if family.model_type in ("deepseek_v2", "deepseek_v3") and getattr(cfg, "n_shared_experts", None):
        # the shared MLP is moe_intermediate_size * n_shared_experts wide: keep its size
        new_cfg.n_shared_experts = int(cfg.n_shared_experts) * P

    old_sd = model.state_dict()
    prefixes = [name + "." for name, _ in blocks]
    new_sd: Dict[str, torch.Tensor] = {}
    sl = [slice(p * (I // P), (p + 1) * (I // P)) for p in range(P)]
    with torch.no_grad():
        for key, t in old_sd.items():
            pre = next((p for p in prefixes if key.startswith(p)), None)
            if pre is None:
                new_sd[key] = t
                continue
            rest = key[len(pre):]
            if rest.startswith("experts."):
                _split_expert_param(new_sd, pre, rest, t, family, E, I, P, sl, scale)
            elif rest in ("gate.weight", "router.weight", "gate.bias", "router.bias",
                          "gate.e_score_correction_bias", "router.e_score_correction_bias"):
                new_sd[key] = t.repeat_interleave(P, dim=0)
            else:
                new_sd[key] = t  # shared experts and their gate
    new_model = _instantiate(model, new_cfg)
    _fit_experts_implementation(new_model, I // P)
    missing, unexpected = new_model.load_state_dict(new_sd, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"dualsparse.complete_partition: parameters did not map cleanly "
                           f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    return new_model.eval()


def _split_expert_param(new_sd, pre, rest, t, family, E, I, P, sl, scale):
    names = family.linear_names
    m = re.match(r"experts\.(\d+)\.(\w+)\.weight$", rest)
    if m:  # transformers 4.x per-expert Linear
        e, which = int(m.group(1)), m.group(2)
        for p in range(P):
            k = f"{pre}experts.{e * P + p}.{which}.weight"
            if which == names[2]:  # down: (H, I) -> columns
                new_sd[k] = (t[:, sl[p]] * scale).to(t.dtype).contiguous()
            else:
                new_sd[k] = t[sl[p]].contiguous()
        return
    if family.gpt_oss:
        if rest == "experts.gate_up_proj":      # (E, H, 2I) interleaved
            parts = [t[:, :, 2 * s.start:2 * s.stop] for s in sl]
            new_sd[pre + rest] = torch.stack(parts, dim=1).reshape(E * P, t.shape[1], -1).contiguous()
        elif rest == "experts.gate_up_proj_bias":  # (E, 2I)
            parts = [t[:, 2 * s.start:2 * s.stop] for s in sl]
            new_sd[pre + rest] = torch.stack(parts, dim=1).reshape(E * P, -1).contiguous()
        elif rest == "experts.down_proj":       # (E, I, H)
            parts = [t[:, s, :] * scale for s in sl]
            new_sd[pre + rest] = torch.stack(parts, dim=1).reshape(E * P, -1, t.shape[2]).to(t.dtype).contiguous()
        elif rest == "experts.down_proj_bias":  # (E, H): every sub-expert keeps the bias (weights add to one)
            new_sd[pre + rest] = t.repeat_interleave(P, dim=0).contiguous()
        else:
            raise RuntimeError(f"dualsparse.complete_partition: unexpected GPT-OSS parameter {pre + rest}")
        return
    if rest == "experts.gate_up_proj":          # (E, 2I, H)
        g, u = t[:, :I], t[:, I:]
        parts = [torch.cat([g[:, s], u[:, s]], dim=1) for s in sl]
        new_sd[pre + rest] = torch.stack(parts, dim=1).reshape(E * P, 2 * (I // P), t.shape[2]).contiguous()
    elif rest == "experts.down_proj":           # (E, H, I)
        parts = [t[:, :, s] * scale for s in sl]
        new_sd[pre + rest] = torch.stack(parts, dim=1).reshape(E * P, t.shape[1], I // P).to(t.dtype).contiguous()
    else:
        raise RuntimeError(f"dualsparse.complete_partition: unexpected expert parameter {pre + rest}")


def _fit_experts_implementation(new, inter: int) -> None:
    """transformers 5.x runs fused experts through ``grouped_mm`` by default,
    whose kernels need every row of the weights to span a multiple of 16
    bytes: sub-experts of ``inter`` neurons with ``inter % 8 != 0`` fail in
    16-bit dtypes (and in float32 unless ``inter % 4 == 0``).  Such a model
    gets the ``eager`` experts (one matmul per expert), also written to its
    config so that a saved copy loads that way."""
    cfg = new.config
    if not hasattr(new, "set_experts_implementation") or inter % 8 == 0:
        return
    if getattr(cfg, "_experts_implementation", None) not in (None, "grouped_mm"):
        return  # batched_mm, eager and other kernels without that constraint stay as chosen
    new.set_experts_implementation("eager")
    cfg.experts_implementation = "eager"


def _instantiate(model, cfg):
    cls = type(model)
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    new = None
    if hasattr(cls, "_from_config"):
        for kw in ("dtype", "torch_dtype"):  # transformers 5.x, 4.x
            try:
                new = cls._from_config(cfg, **{kw: dtype})
                break
            except TypeError:
                continue
    if new is None:
        new = cls(cfg)
    if hasattr(model, "get_experts_implementation") and hasattr(new, "set_experts_implementation"):
        try:
            new.set_experts_implementation(model.get_experts_implementation())
        except Exception:  # noqa: BLE001 - keep the default when the setting does not transfer
            pass
    return new.to(device=device, dtype=dtype)
