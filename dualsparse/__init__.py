"""dualsparse: DualSparse-MoE for Hugging Face Mixture-of-Experts models.

    import dualsparse as ds
    handle = ds.patch(model, ds.TwoThreshold(0.07, 0.09))
    imp = ds.profile(model, batches);  ds.reconstruct(model, imp)
    policy = ds.find_thresholds(model, batches, target_drop_rate=0.25)
    ds.set_policy(model, policy);  ds.drop_stats(model).overall

The C engine (``dualsparse.ops``) computes expert FFNs with per-(token,
expert) prefix partitions, so that dropped work becomes saved time.  Import
works with NumPy alone; torch and transformers are imported when the
Hugging Face functions are first used.
"""
from ._version import __version__
from . import ops
from .policies import (DynamicSkip, LoadAware, NoDrop, OneThreshold, Policy, RandomDrop, Thresholds, TopKReduce,
                       TwoThreshold)

_HF = ("patch", "set_policy", "drop_stats", "reset_stats", "profile", "reconstruct", "Importance",
       "find_thresholds", "calibrate_dynamic_skip", "routing_scores", "complete_partition", "supported_model_types",
       "DualSparseHandle", "DropStats", "ExpertParallel", "ExpertParallelError", "ExpertParallelStats", "ep_stats",
       "text_batches", "tune_policy", "TuneResult")

__all__ = ["__version__", "ops", "info", "Policy", "NoDrop", "OneThreshold", "TwoThreshold", "Thresholds",
           "DynamicSkip", "RandomDrop", "TopKReduce", "LoadAware", *_HF]


def __getattr__(name):
    if name in ("builtin", "sweep", "text"):
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    if name in _HF:
        from . import hf

        return getattr(hf, name)
    raise AttributeError(f"module 'dualsparse' has no attribute {name!r}")


def info():
    """A dict describing this installation (version, build, SIMD, threads, CUDA)."""
    from ._info import collect

    return collect()
