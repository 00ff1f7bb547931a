"""Model-family adapters: where the MoE layers of a Hugging Face model are,
how their experts are stored, and how their routing is computed.

Two layouts are covered for every family:

* transformers 5.x: a fused ``XxxExperts`` module (``gate_up_proj [E, 2I, H]``,
  ``down_proj [E, H, I]``) called as ``experts(x, top_k_index, top_k_weights)``
  by the block, which computes the routing with its router module.  The patch
  swaps the experts module's class for a subclass whose ``forward`` runs the
  engine; routers, shared experts and the block stay as they are.
* transformers 4.x: an ``nn.ModuleList`` of per-expert MLPs with the routing
  inline in the block's forward.  The patch stacks the experts' weights once
  into the fused layout (each ``nn.Linear`` keeps its parameter, re-pointed at
  a view of the stacked storage, so names, values and ``state_dict`` are
  unchanged) and swaps the block's class for a subclass whose ``forward``
  repeats the family's routing exactly and calls the engine.

GPT-OSS keeps its own fused, transposed, interleaved layout with biases in
both generations and runs through a torch implementation (see
``torch_experts.py``).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F


@dataclass
class Family:
    model_type: str
    #: attribute of the decoder layer holding the MoE block, by generation
    block_attrs: tuple = ("mlp",)
    #: names of the per-expert Linear weights in 4.x (gate, up, down)
    linear_names: tuple = ("gate_proj", "up_proj", "down_proj")
    #: 4.x block forward (routing + experts), or None when the 4.x experts are fused
    v4_forward: Optional[Callable] = None
    #: whether the experts are GPT-OSS style (torch path)
    gpt_oss: bool = False
    #: config attribute with the routed experts' intermediate size
    inter_attr: str = "intermediate_size"
    #: complete partition: None if exact, else the reason it is not
    complete_partition_blocker: Optional[Callable] = None


# ------------------------------------------------------------ 4.x routing

def _topk_softmax(logits, k, renorm, dtype):
    w = F.softmax(logits, dim=1, dtype=torch.float)
    w, idx = torch.topk(w, k, dim=-1)
    if renorm:
        w = w / w.sum(dim=-1, keepdim=True)
    return idx, w.to(dtype)


def _v4_mixtral(self, hidden_states):
    B, S, H = hidden_states.shape
    if self.training and self.jitter_noise > 0:
        hidden_states *= torch.empty_like(hidden_states).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
    x = hidden_states.view(-1, H)
    router_logits = self.gate(x)
    idx, w = _topk_softmax(router_logits, self.top_k, True, x.dtype)
    out = self._ds_layer.run(x, idx, w)
    return out.reshape(B, S, H), router_logits


def _v4_qwen(self, hidden_states):
    """Qwen2-MoE (with its gated shared expert), Qwen3-MoE and OLMoE."""
    B, S, H = hidden_states.shape
    x = hidden_states.view(-1, H)
    router_logits = self.gate(x)
    idx, w = _topk_softmax(router_logits, self.top_k, bool(self.norm_topk_prob), x.dtype)
    out = self._ds_layer.run(x, idx, w)
    shared = getattr(self, "shared_expert", None)
    if shared is not None:
        out = out + F.sigmoid(self.shared_expert_gate(x)) * shared(x)
    return out.reshape(B, S, H), router_logits


def _v4_deepseek(self, hidden_states):
    residuals = hidden_states
    orig_shape = hidden_states.shape
    topk_indices, topk_weights = self.gate(hidden_states)
    x = hidden_states.view(-1, hidden_states.shape[-1])
    out = self._ds_layer.run(x, topk_indices, topk_weights).view(*orig_shape)
    shared = getattr(self, "shared_experts", None)
    if shared is not None:
        out = out + shared(residuals)
    return out


def _v4_phimoe(self, hidden_states):
    B, S, H = hidden_states.shape
    if self.training and self.input_jitter_noise > 0:
        hidden_states *= torch.empty_like(hidden_states).uniform_(1.0 - self.input_jitter_noise, 1.0 + self.input_jitter_noise)
    x = hidden_states.view(-1, H)
    router_logits = self.gate(x)
    sparsemixer = sys.modules[type(self).__mro__[1].__module__].sparsemixer
    w, idx = sparsemixer(router_logits, jitter_eps=self.router_jitter_noise, training=self.training)
    out = self._ds_layer.run(x, idx, w)
    return out.reshape(B, S, H), router_logits


# ------------------------------------------------- complete-partition checks

def _block_deepseek_v3(config):
    n_group = getattr(config, "n_group", 1) or 1
    topk_group = getattr(config, "topk_group", n_group) or n_group
    if n_group > 1 and topk_group < n_group:
        return ("DeepSeek-V3 selects experts within the top groups by the sum of each group's two best "
                f"scores (n_group={n_group}, topk_group={topk_group}); copies of one expert would count twice "
                "in that sum, so a model with repeated gate columns routes differently")
    return None


def _block_phimoe(config):
    return ("PhiMoE's sparsemixer picks two experts one after the other with masked softmaxes; "
            "a second copy of the first expert would be picked as the second, so the routing is not preserved")


FAMILIES: Dict[str, Family] = {
    "mixtral": Family("mixtral", block_attrs=("mlp", "block_sparse_moe"), linear_names=("w1", "w3", "w2"),
                      v4_forward=_v4_mixtral),
    "qwen2_moe": Family("qwen2_moe", v4_forward=_v4_qwen, inter_attr="moe_intermediate_size"),
    "qwen3_moe": Family("qwen3_moe", v4_forward=_v4_qwen, inter_attr="moe_intermediate_size"),
    "olmoe": Family("olmoe", v4_forward=_v4_qwen),
    # greedy, or group-limited by the group maximum: copies of an expert keep both exact
    "deepseek_v2": Family("deepseek_v2", v4_forward=_v4_deepseek, inter_attr="moe_intermediate_size"),
    "deepseek_v3": Family("deepseek_v3", v4_forward=_v4_deepseek, inter_attr="moe_intermediate_size",
                          complete_partition_blocker=_block_deepseek_v3),
    "phimoe": Family("phimoe", block_attrs=("mlp", "block_sparse_moe"), linear_names=("w1", "w3", "w2"),
                     v4_forward=_v4_phimoe, complete_partition_blocker=_block_phimoe),
    "gpt_oss": Family("gpt_oss", gpt_oss=True),
}


def supported_model_types() -> List[str]:
    return sorted(FAMILIES)


def family_for(model) -> Family:
    config = getattr(model, "config", None)
    mt = getattr(config, "model_type", None)
    if mt is None:
        raise TypeError(f"dualsparse: expected a Hugging Face transformers model with a .config; got {type(model).__name__}")
    fam = FAMILIES.get(mt)
    if fam is None:
        raise NotImplementedError(
            f"dualsparse: model_type {mt!r} ({type(model).__name__}) is not supported; supported MoE families: "
            + ", ".join(supported_model_types()))
    return fam


def num_experts(config) -> int:
    for attr in ("n_routed_experts", "num_local_experts", "num_experts"):
        v = getattr(config, attr, None)
        if v:
            return int(v)
    raise ValueError(f"dualsparse: cannot find the number of experts in {type(config).__name__}")


def expert_count_attr(config) -> str:
    for attr in ("n_routed_experts", "num_local_experts", "num_experts"):
        if getattr(config, attr, None):
            return attr
    raise ValueError(f"dualsparse: cannot find the number of experts in {type(config).__name__}")
