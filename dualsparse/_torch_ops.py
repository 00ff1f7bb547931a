"""The engine's operations as torch custom operators, for ``torch.compile``.

Importing this module (done by the Hugging Face integration) registers:

* ``torch.ops.dualsparse.moe_experts(x, topk_ids, topk_weights, gate_up_proj,
  down_proj, levels, num_partitions, num_threads)``: :func:`dualsparse.ops.moe_experts`
  as an opaque operator (CPU engine or CUDA module), with a fake (shape-only)
  implementation;
* ``torch.ops.dualsparse.route_levels(topk_weights, thresholds, normalize)``:
  :func:`dualsparse.ops.route_levels` with the thresholds as a float64 tensor,
  so that new threshold values need no recompilation;
* ``torch.ops.dualsparse.moe_layer(x, topk_ids, topk_weights, layer_key)``:
  the whole expert step of one patched MoE layer (the policy's routing
  decision, the drop statistics, importance and score recording while
  profiling or searching, the expert computation).  A patched layer calls it
  while Dynamo traces, so a compiled graph holds one opaque call per MoE layer
  that runs the same code as eager at run time: the policy installed *when the
  graph runs* applies (``ds.set_policy`` takes effect without recompiling),
  the statistics are exact and accumulate outside the compiled region, and the
  thread count is resolved there (``torch.get_num_threads()`` is never traced).

The fake implementations return an uninitialised tensor of the output's
shape and dtype; none of these operators has a gradient (the engine computes
none).
"""
from __future__ import annotations

import itertools
import threading
import weakref
from typing import Optional

import torch

_LIB = "dualsparse"
_KEYS = itertools.count(1)
_LAYERS: "dict[int, weakref.ref]" = {}
_LOCK = threading.Lock()


def register_layer(layer) -> int:
    """A key under which ``moe_layer`` finds ``layer`` (weakly held)."""
    key = next(_KEYS)
    with _LOCK:
        _LAYERS[key] = weakref.ref(layer, lambda _ref, k=key: _LAYERS.pop(k, None))
    return key


def _layer(key: int):
    ref = _LAYERS.get(int(key))
    layer = None if ref is None else ref()
    if layer is None:
        raise RuntimeError(f"dualsparse::moe_layer: no live patched MoE layer has key {key} (the model was freed or "
                           "the compiled function outlived it); compile the model again after patching")
    return layer


def _fresh(out: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
    """Custom operators must not return (views of) their inputs."""
    for t in inputs:
        if t is not None and out.numel() and t.numel() and out.untyped_storage().data_ptr() == \
                t.untyped_storage().data_ptr():
            return out.clone()
    return out


@torch.library.custom_op(f"{_LIB}::moe_layer", mutates_args=())
def moe_layer(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, layer_key: int) -> torch.Tensor:
    """x: (T, H); topk_ids, topk_weights: (T, K) -> (T, H) in x's dtype."""
    layer = _layer(layer_key)
    return _fresh(layer.run(x, topk_ids, topk_weights), x, topk_weights)


@moe_layer.register_fake
def _moe_layer_fake(x, topk_ids, topk_weights, layer_key):
    return x.new_empty(x.shape)


@torch.library.custom_op(f"{_LIB}::moe_experts", mutates_args=())
def moe_experts(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, gate_up_proj: torch.Tensor,
                down_proj: torch.Tensor, levels: Optional[torch.Tensor] = None, num_partitions: int = 1,
                num_threads: Optional[int] = None) -> torch.Tensor:
    """:func:`dualsparse.ops.moe_experts`; x: (T, H) -> (T, H)."""
    from . import ops

    return ops.moe_experts(x, topk_ids, topk_weights, gate_up_proj, down_proj, levels=levels,
                           num_partitions=num_partitions, num_threads=num_threads)


@moe_experts.register_fake
def _moe_experts_fake(x, topk_ids, topk_weights, gate_up_proj, down_proj, levels=None, num_partitions=1,
                      num_threads=None):
    torch._check(x.dim() == 2, lambda: f"moe_experts: x must be 2-D (tokens, hidden); got {x.dim()}-D")
    return x.new_empty(x.shape)


@torch.library.custom_op(f"{_LIB}::route_levels", mutates_args=())
def route_levels(topk_weights: torch.Tensor, thresholds: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """:func:`dualsparse.ops.route_levels`; thresholds: (P,) tensor -> int8 (T, K)."""
    from . import ops

    return ops.route_levels(topk_weights, thresholds.detach().cpu().double().reshape(-1).tolist(),
                            normalize=normalize)


@route_levels.register_fake
def _route_levels_fake(topk_weights, thresholds, normalize=True):
    return topk_weights.new_empty(topk_weights.shape, dtype=torch.int8)
