"""patch / revert / set_policy / drop statistics for Hugging Face MoE models."""
from __future__ import annotations

import os
import threading
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.nn as nn

from .. import _torch_ops, ops
from ..policies import NoDrop, Policy
from . import experts_backend, saved, torch_experts
from .families import Family, family_for, num_experts

_SWAPPED: Dict[tuple, type] = {}
_SWAP_LOCK = threading.Lock()

# dtypes and devices the C engine serves; everything else runs in torch
_ENGINE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _backend_option(backend, where: str) -> str:
    if backend not in ops.BACKENDS:
        raise ValueError(f"dualsparse: {where} must be one of {', '.join(repr(b) for b in ops.BACKENDS)}; "
                         f"got {backend!r}")
    return backend


def _env_backend() -> str:
    """DUALSPARSE_BACKEND (auto|engine|torch|cuda), default "auto"."""
    return _backend_option(os.environ.get("DUALSPARSE_BACKEND", "auto").strip() or "auto",
                           "the environment variable DUALSPARSE_BACKEND")


def _patched_class(orig: type, impl, kind: str) -> type:
    """A subclass of ``orig`` whose forward is ``impl`` unless the layer must
    run the original computation (autograd); cached per (class, kind)."""
    key = (orig, kind)
    with _SWAP_LOCK:
        cls = _SWAPPED.get(key)
        if cls is None:
            def forward(self, *args, **kwargs):
                layer = self.__dict__.get("_ds_layer")
                if layer is None or layer.must_run_original(args, kwargs):
                    return orig.forward(self, *args, **kwargs)
                return impl(self, *args, **kwargs)

            forward.__doc__ = f"DualSparse forward of {orig.__name__} (original: {orig.__module__}.{orig.__qualname__})"
            cls = type(f"DualSparse{orig.__name__}", (orig,), {"forward": forward, "_ds_original_class": orig,
                                                                "__module__": orig.__module__})
            _SWAPPED[key] = cls
    return cls


# ------------------------------------------------------------- forwards

def _fused_experts_forward(self, hidden_states, top_k_index=None, top_k_weights=None, *args, **kwargs):
    if experts_backend.overridden(self):   # model.set_experts_implementation(<another>) after patching
        return self._ds_original_class.forward(self, hidden_states, top_k_index, top_k_weights, *args, **kwargs)
    return self._ds_layer.run(hidden_states, top_k_index, top_k_weights)


def _gpt_oss_experts_forward(self, hidden_states, router_indices=None, routing_weights=None):
    if experts_backend.overridden(self):
        return self._ds_original_class.forward(self, hidden_states, router_indices, routing_weights)
    layer = self._ds_layer
    if hidden_states.dim() == 3:  # transformers 4.x: (B, S, H) and dense (T, E) scores
        B, S, H = hidden_states.shape
        x = hidden_states.reshape(-1, H)
        w = torch.gather(routing_weights, 1, router_indices)
        return layer.run(x, router_indices, w).view(B, S, H)
    return layer.run(hidden_states, router_indices, routing_weights)


def _v4_block_forward(self, *args, **kwargs):
    return self._ds_layer.family.v4_forward(self, *args, **kwargs)


# ------------------------------------------------------------- layers

@dataclass
class LayerStats:
    computed: float = 0.0   # expert computation units done (pair at level p of P: p/P; shared: their size)
    full: float = 0.0       # units without dropping
    tokens: int = 0

    @property
    def drop_rate(self) -> float:
        return 0.0 if self.full == 0 else 1.0 - self.computed / self.full


class MoELayer:
    """One patched MoE layer: where its weights are and how to run it."""

    def __init__(self, handle, name: str, block: nn.Module, ordinal: int, family: Family):
        self.handle = handle
        self.name = name
        self.block = block
        self.ordinal = ordinal
        self.family = family
        self.experts = block.experts
        self.layout = "list" if isinstance(self.experts, nn.ModuleList) else "fused"
        cfg = handle.model.config
        self.num_experts = num_experts(cfg)
        self.top_k = int(cfg.num_experts_per_tok)
        self.shared_units = _shared_units(block, family, cfg)
        self.stats = LayerStats()
        self.swapped: List[tuple] = []   # (module, original class)
        self.gate_up: Optional[torch.Tensor] = None
        self.down: Optional[torch.Tensor] = None
        self.importance = None            # (sums (4, E, I) float64, counts (E,)) while profiling
        self.params: List[torch.Tensor] = []  # expert parameters, for the autograd check
        self.key = _torch_ops.register_layer(self)  # for the torch.compile operator
        if family.gpt_oss:
            self.intermediate = int(self.experts.gate_up_proj.shape[-1] // 2)
            self.hidden = int(self.experts.gate_up_proj.shape[1])
        elif self.layout == "fused":
            self.intermediate = int(self.experts.gate_up_proj.shape[1] // 2)
            self.hidden = int(self.experts.gate_up_proj.shape[2])
        else:
            g = getattr(self.experts[0], family.linear_names[0]).weight
            self.intermediate, self.hidden = int(g.shape[0]), int(g.shape[1])

    # -- parameters the engine reads
    def expert_params(self) -> List[torch.Tensor]:
        if self.layout == "fused":
            return [p for p in self.experts.parameters(recurse=False)]
        names = self.family.linear_names
        return [getattr(m, n).weight for m in self.experts for n in names]

    def fused_weights(self):
        """(gate_up (E, 2I, H), down (E, H, I)) views of the model's own storage."""
        if self.layout == "fused":
            return self.experts.gate_up_proj, self.experts.down_proj
        self._check_stacked()
        return self.gate_up, self.down

    def _check_stacked(self):
        """After stacking, every Linear must still point into the stacked
        storage (someone may have replaced .data, e.g. model.to(dtype))."""
        g, u, d = self.family.linear_names
        e0 = self.experts[0]
        w = getattr(e0, g).weight
        if self.gate_up is None or w.data_ptr() != self.gate_up.data_ptr() or w.dtype != self.gate_up.dtype \
                or w.device != self.gate_up.device:
            self.stack()

    def stack(self):
        g, u, d = self.family.linear_names
        mods = self.experts
        self.gate_up, self.down = ops.stack_linear_experts(
            [getattr(m, g) for m in mods], [getattr(m, u) for m in mods], [getattr(m, d) for m in mods])

    # -- autograd guard
    def must_run_original(self, args, kwargs) -> bool:
        if not torch.is_grad_enabled():
            return False
        needs = any(p.requires_grad for p in self.params)
        if not needs:
            for a in list(args) + list(kwargs.values()):
                if isinstance(a, torch.Tensor) and a.requires_grad:
                    needs = True
                    break
        if needs and not self.handle.grad_warned:
            self.handle.grad_warned = True
            warnings.warn(
                "dualsparse: the patched MoE layers run their original (undropped) computation while autograd is "
                "recording (the engine computes no gradients). Use torch.no_grad() or torch.inference_mode() to "
                "drop expert computation.", RuntimeWarning, stacklevel=4)
        return needs

    # -- the computation
    def run(self, x, ids, w):
        if torch.compiler.is_compiling():
            # one opaque operator that runs this method at run time (policy, statistics, threads)
            return torch.ops.dualsparse.moe_layer(x, ids, w, self.key)
        h = self.handle
        if h.ep is not None:
            return h.ep.run(self, x, ids, w)
        policy = h.policy
        if h.recorder is not None:
            h.recorder.record(self.ordinal, w, h.token_mask)
        levels, new_w = policy.route(w, ids, self.ordinal, h.generator)
        if new_w is not None:
            w = new_w
        P = policy.num_partitions
        self._count(ids, levels, P, h.token_mask)
        if self.importance is not None:
            if h.token_mask is not None and h.token_mask.numel() == x.shape[0]:
                m = h.token_mask.to(x.device)
                self._accumulate_importance(x[m], ids[m], w[m])
            else:
                self._accumulate_importance(x, ids, w)
        if self.family.gpt_oss:
            return torch_experts.gpt_oss_experts(self.experts, x, ids, w, levels, P)
        gu, dn = self.fused_weights()
        if x.dtype in _ENGINE_DTYPES and gu.dtype == x.dtype:
            if w.dtype not in (torch.float32, x.dtype):
                w = w.float()
            return ops.moe_experts(x, ids, w, gu, dn, levels=levels, num_partitions=P,
                                   num_threads=h.num_threads, backend=h.current_backend())
        return torch_experts.swiglu_experts(x, ids, w, gu, dn, levels, P, act=self._act())

    def _count(self, ids, levels, P, mask):
        """Drop accounting; rows outside the calibration token mask (padding)
        are not counted."""
        if mask is not None and mask.numel() == ids.shape[0]:
            mask = mask.to(ids.device)
            T = int(mask.sum().item())
            if levels is not None:
                levels = levels[mask]
        else:
            T = ids.shape[0]
        K = ids.shape[1]
        st = self.stats
        st.tokens += T
        st.full += T * K + T * self.shared_units
        if levels is None:
            st.computed += T * K + T * self.shared_units
        else:
            st.computed += float(levels.sum(dtype=torch.int64).item()) / P + T * self.shared_units

    def _act(self):
        act = getattr(self.experts, "act_fn", None)
        if act is None and self.layout == "list":
            act = getattr(self.experts[0], "act_fn", None)
        return act if act is not None else torch.nn.functional.silu

    def _accumulate_importance(self, x, ids, w):
        sums, counts = self.importance
        weighted = self.handle.profile_weighted
        if self.family.gpt_oss:
            _torch_importance_gpt_oss(self.experts, x, ids, w if weighted else None, sums, counts)
            return
        gu, _ = self.fused_weights()
        if x.device.type == "cpu" and x.dtype in _ENGINE_DTYPES and gu.dtype == x.dtype:
            ops.neuron_importance(x, ids, gu, sums, counts=counts, topk_weights=w.float() if weighted else None,
                                  num_threads=self.handle.num_threads)
        else:
            _torch_importance(x, ids, w if weighted else None, gu, sums, counts, self._act())

    # -- patch / revert
    def swap(self, module: nn.Module, impl, kind: str):
        orig = type(module)
        if getattr(orig, "_ds_original_class", None) is not None:
            raise RuntimeError(f"dualsparse: {self.name} is already patched by another handle")
        # transformers 4.x output capture can leave a per-instance forward
        # that would hide the class-level one; it is a bound copy of the
        # class forward, so dropping it changes nothing else
        module.__dict__.pop("forward", None)
        module.__class__ = _patched_class(orig, impl, kind)
        module.__dict__["_ds_layer"] = self
        self.swapped.append((module, orig))

    def patch(self):
        if self.family.gpt_oss:
            self.swap(self.experts, _gpt_oss_experts_forward, "gpt_oss_experts")
            experts_backend.select_on_patch(self)
        elif self.layout == "fused":
            self.swap(self.experts, _fused_experts_forward, "fused_experts")
            experts_backend.select_on_patch(self)
        else:
            if self.family.v4_forward is None:
                raise NotImplementedError(f"dualsparse: no transformers 4.x forward for {self.family.model_type}")
            self.stack()
            self.swap(self.block, _v4_block_forward, "v4_block")
        # the Parameter objects stay the same (stacking and .to() change .data)
        self.params = self.expert_params()

    def revert(self):
        experts_backend.restore(self)
        for module, orig in reversed(self.swapped):
            module.__class__ = orig
            module.__dict__.pop("_ds_layer", None)
        self.swapped.clear()


def _shared_units(block, family: Family, cfg) -> float:
    """Cost of the always-run shared expert(s) per token, in routed-expert
    units (intermediate size of the shared MLP over the routed one)."""
    inter = getattr(cfg, family.inter_attr, None) or getattr(cfg, "intermediate_size")
    total = 0.0
    for attr in ("shared_expert", "shared_experts"):
        m = getattr(block, attr, None)
        if m is None:
            continue
        up = getattr(m, "up_proj", None) or getattr(m, "w3", None)
        if up is not None:
            total += up.weight.shape[0] / float(inter)
    return total


def _torch_importance(x, ids, w, gate_up, sums, counts, act):
    E, I2, H = gate_up.shape
    I = I2 // 2
    for e in torch.unique(ids.reshape(-1)).tolist():
        if e >= E:
            continue
        t_idx, k_idx = torch.where(ids == e)
        gu = (x[t_idx] @ gate_up[e].t()).double()
        a, b = gu[:, :I], gu[:, I:]
        s = act(a)
        c = torch.ones(len(t_idx), dtype=torch.float64, device=x.device) if w is None else w[t_idx, k_idx].double()
        _add_metrics(sums, counts, e, s, b, c)


def _torch_importance_gpt_oss(module, x, ids, w, sums, counts):
    E = module.gate_up_proj.shape[0]
    for e in torch.unique(ids.reshape(-1)).tolist():
        if e >= E:
            continue
        t_idx, k_idx = torch.where(ids == e)
        a, b = torch_experts.gpt_oss_gate_up(module, x[t_idx], e)
        a = a.double().clamp(max=module.limit)
        b = b.double().clamp(min=-module.limit, max=module.limit) + 1
        s = a * torch.sigmoid(a * module.alpha)
        c = torch.ones(len(t_idx), dtype=torch.float64, device=x.device) if w is None else w[t_idx, k_idx].double()
        _add_metrics(sums, counts, e, s, b, c)


def _add_metrics(sums, counts, e, s, b, c):
    sb = s * b
    vals = [(c[:, None] * s).sum(0), (c[:, None] * s.abs()).sum(0), (c[:, None] * sb).sum(0),
            (c[:, None] * sb.abs()).sum(0)]
    for m, v in enumerate(vals):
        sums[m, e] += v.cpu().numpy()
    counts[e] += float(c.sum().item())


# ------------------------------------------------------------- handle

class DualSparseHandle:
    """What :func:`patch` returns: the patched layers, the policy, drop
    statistics, and :meth:`revert`."""

    def __init__(self, model, family: Family, policy: Policy, num_threads: Optional[int],
                 backend: Optional[str] = None):
        self.model = model
        self.family = family
        self.policy = policy
        self.num_threads = num_threads
        #: the expert backend forced at patch time (None: DUALSPARSE_BACKEND, else "auto")
        self.backend = backend
        self.generator = torch.Generator().manual_seed(0)
        self.layers: List[MoELayer] = []
        self.reverted = False
        self.profile_weighted = False
        self.token_mask = None   # (rows,) bool while calibrating on padded batches
        self.recorder = None     # ScoreRecorder while searching thresholds
        self.grad_warned = False
        self.ep = None           # ExpertParallelRuntime under expert_parallel
        pseed = getattr(policy, "seed", None)
        if pseed is not None:    # a seeded policy (RandomDrop) fixes the random stream
            self.generator.manual_seed(int(pseed))

    def current_backend(self) -> str:
        """The backend of ops.moe_experts for this model's experts: the
        ``backend`` given to :func:`patch`, else DUALSPARSE_BACKEND, else
        "auto"."""
        return self.backend if self.backend is not None else _env_backend()

    # -- policy
    def set_policy(self, policy: Policy) -> None:
        """Under expert parallelism this is collective: every rank must call
        it with the same policy (checked by a handshake)."""
        _check_policy(policy, len(self.layers))
        if self.ep is not None:
            self.ep.check_policy(policy)
            self.ep.handshake(policy, what="set_policy")
        self.policy = policy
        seed = getattr(policy, "seed", None)
        if seed is not None:
            self.generator.manual_seed(int(seed))

    # -- statistics
    def stats(self):
        """A snapshot (later forwards do not change it)."""
        return DropStats([LayerStats(l.stats.computed, l.stats.full, l.stats.tokens) for l in self.layers],
                         [l.name for l in self.layers])

    def reset_stats(self):
        for l in self.layers:
            l.stats = LayerStats()
        if self.ep is not None:
            self.ep.reset()

    def ep_stats(self):
        """Per-rank loads of the expert-parallel layers (see
        :class:`ExpertParallelStats`); the same on every rank."""
        if self.ep is None:
            raise ValueError("dualsparse.ep_stats: the model was not patched with expert_parallel")
        return self.ep.stats()

    def revert(self):
        """Restores the original module classes (the module objects were never
        replaced); later forwards compute exactly as before the patch.  4.x
        expert weights stay in their stacked storage (same values)."""
        if self.reverted:
            return
        for l in self.layers:
            l.revert()
        self.reverted = True
        if getattr(self.model, "_dualsparse_handle", None) is self:
            del self.model._dualsparse_handle
        saved.detach(self)

    def __repr__(self):
        state = "reverted" if self.reverted else f"{len(self.layers)} MoE layers, policy {self.policy.describe()}"
        if self.ep is not None and not self.reverted:
            state += f", expert parallel rank {self.ep.rank} of {self.ep.world} (sub_experts={self.ep.Q})"
        return f"<DualSparseHandle {self.family.model_type}: {state}>"


@dataclass
class DropStats:
    """Drop statistics: expert computation units (a pair computing p of P
    partitions counts p/P; shared experts count by their size) accumulated
    since the last reset."""

    layers: list
    names: list

    @property
    def per_layer(self) -> List[float]:
        return [l.drop_rate for l in self.layers]

    @property
    def overall(self) -> float:
        full = sum(l.full for l in self.layers)
        return 0.0 if full == 0 else 1.0 - sum(l.computed for l in self.layers) / full

    @property
    def tokens(self) -> int:
        return self.layers[0].tokens if self.layers else 0

    def __repr__(self):
        return f"DropStats(overall={self.overall:.4f}, per_layer=[{', '.join(f'{r:.3f}' for r in self.per_layer)}])"


def _check_policy(policy, n_layers):
    if not isinstance(policy, Policy):
        raise TypeError(f"dualsparse: policy must be a dualsparse policy (NoDrop, OneThreshold, TwoThreshold, "
                        f"Thresholds, DynamicSkip, RandomDrop, TopKReduce); got {type(policy).__name__}")
    policy.check_layers(n_layers)


def find_moe_blocks(model, family: Family):
    """(name, block) of every sparse MoE block, in model order."""
    found = []
    for name, mod in model.named_modules():
        experts = getattr(mod, "experts", None)
        if experts is None or not isinstance(experts, nn.Module):
            continue
        if isinstance(experts, nn.ModuleList) or hasattr(experts, "gate_up_proj"):
            if hasattr(mod, "gate") or hasattr(mod, "router"):
                found.append((name, mod))
    return found


def get_handle(model) -> Optional[DualSparseHandle]:
    return getattr(model, "_dualsparse_handle", None)


def patch(model, policy: Optional[Policy] = None, *, num_threads: Optional[int] = None, expert_parallel=None,
          backend: Optional[str] = None):
    """Turns a loaded Hugging Face MoE model into a DualSparse model, in place.

    Every sparse MoE layer's expert computation then runs through the engine
    under ``policy`` (default :class:`NoDrop`): routing levels from the
    top-K-normalised scores, dropped pairs skipped, major-only pairs computing
    the first half of their (reconstructed) neurons.  ``num_threads`` sets the
    engine's threads (default ``torch.get_num_threads()``); a seeded policy
    (``RandomDrop(rate, seed)``) restarts its random stream whenever it is
    installed.  ``backend`` forces the expert backend of
    :func:`dualsparse.ops.moe_experts` (``"auto"``, ``"engine"``, ``"torch"``,
    ``"cuda"``; default: the environment variable ``DUALSPARSE_BACKEND``,
    else ``"auto"``).  Parameter names, shapes
    and ``state_dict`` are unchanged; :meth:`DualSparseHandle.revert` restores
    the original module classes.  Patching an already patched model returns its
    handle (with ``policy`` applied when given).  Without ``policy``, a model
    loaded from a saved DualSparse folder gets the policy saved in its config
    (``model.save_pretrained`` of a patched model writes it).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"dualsparse.patch: model must be a torch.nn.Module (a transformers model); got {type(model).__name__}")
    from .expert_parallel import ExpertParallelRuntime, as_options

    ep_opts = as_options(expert_parallel)
    if backend is not None:
        _backend_option(backend, "patch: backend")
    else:
        _env_backend()  # a bad DUALSPARSE_BACKEND is reported now, not at the first forward
    existing = get_handle(model)
    if existing is not None and not existing.reverted:
        have = None if existing.ep is None else existing.ep.opts
        if ep_opts is not None and ep_opts != have:
            raise ValueError("dualsparse.patch: the model is already patched with other expert_parallel settings; "
                             "call handle.revert() first")
        if policy is not None:
            existing.set_policy(policy)
        if num_threads is not None:
            existing.num_threads = num_threads
        if backend is not None:
            existing.backend = backend
        return existing
    if policy is None:
        policy = saved.saved_policy(model)   # a saved DualSparse model's policy, if any
    else:
        saved.read_section(getattr(model, "config", None))  # a section of a newer format is an error either way
    family = family_for(model)
    blocks = find_moe_blocks(model, family)
    if not blocks:
        raise ValueError(f"dualsparse.patch: {type(model).__name__} ({family.model_type}) has no sparse MoE layer "
                         "(every layer is dense?)")
    meta = next((f"{bn}.{pn}" for bn, block in blocks for pn, p in block.named_parameters() if p.is_meta), None)
    if meta is not None:
        raise ValueError(f"dualsparse.patch: {meta} is on the 'meta' device (a model built without its weights, "
                         "e.g. under init_empty_weights or with device_map='meta'); load the real weights first "
                         "(from_pretrained with a real device, or load_state_dict(..., assign=True)), then patch")
    policy = NoDrop() if policy is None else policy
    _check_policy(policy, len(blocks))
    if num_threads is not None:
        ops._threads(num_threads)
    handle = DualSparseHandle(model, family, policy, num_threads, backend)
    handle.layers = [MoELayer(handle, name, block, i, family) for i, (name, block) in enumerate(blocks)]
    try:
        for layer in handle.layers:
            layer.patch()
    except BaseException:
        for layer in handle.layers:
            layer.revert()
        raise
    if ep_opts is not None:
        try:
            handle.ep = ExpertParallelRuntime(handle, ep_opts)
        except BaseException:
            for layer in handle.layers:
                layer.revert()
            raise
    model._dualsparse_handle = handle
    saved.attach(handle)
    return handle


def _require_handle(model, fn) -> DualSparseHandle:
    h = get_handle(model)
    if h is None or h.reverted:
        raise ValueError(f"dualsparse.{fn}: the model is not patched; call dualsparse.patch(model, policy) first")
    return h


def set_policy(model, policy: Policy) -> None:
    """Changes the drop policy of a patched model (no re-patching).  A model
    loaded with ``experts_implementation="dualsparse"`` is patched with it."""
    h = get_handle(model)
    if (h is None or h.reverted) and experts_backend.uses_backend(model):
        patch(model, policy)
        return
    _require_handle(model, "set_policy").set_policy(policy)


def drop_stats(model) -> DropStats:
    """Drop statistics accumulated since the last :func:`reset_stats`:
    ``.overall`` and ``.per_layer`` (one entry per MoE layer, model order)."""
    return _require_handle(model, "drop_stats").stats()


def reset_stats(model) -> None:
    _require_handle(model, "reset_stats").reset_stats()


def ep_stats(model):
    """Per-rank, per-layer loads before/after dropping and max-load ratios of
    a model patched with ``expert_parallel`` (:class:`ExpertParallelStats`)."""
    return _require_handle(model, "ep_stats").ep_stats()
