"""``"dualsparse"`` in transformers' experts interface (transformers 5.x).

Importing :mod:`dualsparse.hf` (which ``import dualsparse`` does not do by
itself, so that the package imports with NumPy alone) registers the name, so
that::

    import dualsparse.hf
    model = AutoModelForCausalLM.from_pretrained(path, experts_implementation="dualsparse")
    model.set_experts_implementation("dualsparse")

run every experts module through the engine.  Such a model drops nothing
unless a policy is saved in its config (a saved DualSparse model) or set with
``ds.set_policy(model, policy)``, which patches it (:func:`dualsparse.patch`:
statistics, profiling and threshold search then work as on any patched model).

On a patched model the experts implementation is ``"dualsparse"``; setting
another one with ``model.set_experts_implementation(...)`` takes effect (the
experts run transformers' implementation, without dropping, and a warning
says so) until ``"dualsparse"`` is set again or the patch is reverted.
"""
from __future__ import annotations

import threading
import warnings
import weakref

import torch

from .. import _torch_ops, ops  # noqa: F401  (_torch_ops: torch.ops.dualsparse.*)
from ..policies import NoDrop
from . import torch_experts

NAME = "dualsparse"
_ENGINE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# unpatched models running the backend: the experts modules of each config in
# the order of their first call (the model's layer order), for per-layer policies
_ORDER: "dict[int, tuple]" = {}
_LOCK = threading.Lock()
_GEN = torch.Generator().manual_seed(0)


def available() -> bool:
    """Whether this transformers has the experts interface (5.x)."""
    try:
        from transformers.integrations.moe import ExpertsInterface  # noqa: F401
    except ImportError:
        return False
    return True


def register() -> bool:
    """Registers ``"dualsparse"`` in transformers' experts interface; False
    where transformers has none (4.x) or is not installed."""
    try:
        from transformers.integrations.moe import ExpertsInterface
    except ImportError:
        return False
    ExpertsInterface.register(NAME, dualsparse_experts_forward)
    return True


def _ordinal(module) -> int:
    cfg = getattr(module, "config", None)
    key = id(cfg)
    with _LOCK:
        entry = _ORDER.get(key)
        if entry is None or entry[0]() is not cfg:
            entry = (weakref.ref(cfg) if cfg is not None else (lambda: None), [])
            _ORDER[key] = entry
        mods = entry[1]
        for i, r in enumerate(mods):
            if r() is module:
                return i
        mods.append(weakref.ref(module))
        return len(mods) - 1


def _policy(module):
    from .saved import SECTION, saved_policy

    cfg = getattr(module, "config", None)
    if cfg is None or getattr(cfg, SECTION, None) is None:
        return NoDrop()

    class _M:  # saved_policy reads model.config
        config = cfg

    p = saved_policy(_M, fn="experts_implementation='dualsparse'")
    return NoDrop() if p is None else p


def dualsparse_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """The experts step of an unpatched model whose experts implementation is
    ``"dualsparse"``: the engine (CPU, or the CUDA module), or the same
    computation in torch elsewhere, under the policy saved in the config
    (default: no drop).  hidden_states: (T, H); top_k_*: (T, K)."""
    x, ids, w = hidden_states, top_k_index, top_k_weights
    layer = self.__dict__.get("_ds_layer")
    if layer is not None:
        # a patched layer asked for its original computation (autograd): the implementation it had before
        prev = getattr(layer, "prev_experts_impl", None)
        return _original(self, None if prev is None else prev[1])(self, x, ids, w)
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters(recurse=False))):
        global _GRAD_WARNED
        if not _GRAD_WARNED:
            _GRAD_WARNED = True
            warnings.warn("dualsparse experts implementation: autograd is recording, so the experts run transformers' "
                          "eager computation (the engine computes no gradients); use torch.no_grad() / "
                          "torch.inference_mode() to run the engine", RuntimeWarning, stacklevel=3)
        return _original(self, "eager")(self, x, ids, w)
    policy = _policy(self)
    levels = None
    if not isinstance(policy, NoDrop):
        if torch.compiler.is_compiling():
            raise RuntimeError("dualsparse experts implementation: to torch.compile a model with a dropping policy, "
                               "patch it first (ds.patch(model)); its layers then compile as one operator each")
        levels, new_w = policy.route(w, ids, _ordinal(self), _GEN)
        if new_w is not None:
            w = new_w
    P = policy.num_partitions
    if getattr(self, "is_transposed", False) and getattr(self, "has_bias", False):   # GPT-OSS
        return torch_experts.gpt_oss_experts(self, x, ids, w, levels, P)
    gu, dn = self.gate_up_proj, self.down_proj
    usable = x.dtype in _ENGINE_DTYPES and gu.dtype == x.dtype and (
        x.device.type == "cpu" or (x.device.type == "cuda" and _cuda_ok()))
    if usable and getattr(self, "act_fn", None) is not None and not _is_silu(self.act_fn):
        usable = False
    if usable:
        if w.dtype not in (torch.float32, x.dtype):
            w = w.float()
        if torch.compiler.is_compiling():
            return torch.ops.dualsparse.moe_experts(x, ids, w, gu, dn, levels, P, None)
        return ops.moe_experts(x, ids, w, gu, dn, levels=levels, num_partitions=P)
    act = getattr(self, "act_fn", None) or torch.nn.functional.silu
    return torch_experts.swiglu_experts(x, ids, w, gu, dn, levels, P, act=act)


_GRAD_WARNED = False


def _original(module, impl):
    """transformers' forward ``impl`` (None or "eager": the class's own) of
    an experts module."""
    cls = getattr(type(module), "_ds_original_class", type(module))
    fwd = cls.forward
    eager = getattr(fwd, "__wrapped__", fwd)   # use_experts_implementation wraps the eager forward
    if impl in (None, "eager", NAME):
        return eager
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    return ALL_EXPERTS_FUNCTIONS.get_interface(impl, eager)


def _is_silu(act) -> bool:
    return act is torch.nn.functional.silu or isinstance(act, torch.nn.SiLU) or \
        type(act).__name__ in ("SiLUActivation", "SiLU")


def _cuda_ok() -> bool:
    from .patching import _cuda_usable

    return _cuda_usable()


# ------------------------------------------------- patched models

def uses_backend(model) -> bool:
    """An unpatched model whose experts implementation is ``"dualsparse"``."""
    cfg = getattr(model, "config", None)
    return getattr(cfg, "_experts_implementation_internal", None) == NAME


def config_of(experts):
    return getattr(experts, "config", None)


def select_on_patch(layer) -> None:
    """On a patched 5.x experts module, the experts implementation becomes
    ``"dualsparse"`` (the previous one is restored by :func:`restore`)."""
    cfg = config_of(layer.experts)
    if cfg is None or not hasattr(cfg, "_experts_implementation_internal") or not available():
        layer.prev_experts_impl = None
        return
    layer.prev_experts_impl = (cfg, cfg._experts_implementation_internal)
    cfg._experts_implementation_internal = NAME


def restore(layer) -> None:
    prev = getattr(layer, "prev_experts_impl", None)
    if prev is not None:
        cfg, value = prev
        if cfg._experts_implementation_internal == NAME:
            cfg._experts_implementation_internal = value
    layer.prev_experts_impl = None


def overridden(experts) -> bool:
    """True when another experts implementation than ``"dualsparse"`` was set
    on a patched model (it then runs, with a warning once per handle)."""
    cfg = config_of(experts)
    impl = getattr(cfg, "_experts_implementation_internal", None) if cfg is not None else None
    if impl is None or impl == NAME or getattr(experts.__dict__.get("_ds_layer"), "prev_experts_impl", None) is None:
        return False
    h = experts.__dict__["_ds_layer"].handle
    if not getattr(h, "impl_warned", False):
        h.impl_warned = True
        warnings.warn(f"dualsparse: experts_implementation={impl!r} was set on a patched model: its experts now run "
                      f"transformers' {impl!r} implementation, without dropping and without drop statistics. "
                      f"model.set_experts_implementation('dualsparse') runs the engine again.",
                      RuntimeWarning, stacklevel=4)
    return True
