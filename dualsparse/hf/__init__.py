"""Hugging Face integration: patch a loaded transformers MoE model, profile
and reconstruct neurons, drop expert computation, export partitions."""
from .families import supported_model_types
from .partition import complete_partition
from .expert_parallel import ExpertParallel, ExpertParallelError, ExpertParallelStats
from .patching import DropStats, DualSparseHandle, drop_stats, ep_stats, patch, reset_stats, set_policy
from .profile import Importance, profile, reconstruct
from .search import calibrate_dynamic_skip, find_thresholds, routing_scores
from .textbatches import text_batches
from .tune import TuneResult, tune_policy
from . import experts_backend as _experts_backend

# "dualsparse" in transformers' experts interface (transformers 5.x):
# from_pretrained(..., experts_implementation="dualsparse") after `import dualsparse.hf`
_experts_backend.register()

__all__ = [
    "patch", "set_policy", "drop_stats", "reset_stats", "DualSparseHandle", "DropStats",
    "profile", "reconstruct", "Importance", "find_thresholds", "calibrate_dynamic_skip", "routing_scores",
    "complete_partition", "supported_model_types",
    "ExpertParallel", "ExpertParallelError", "ExpertParallelStats", "ep_stats", "text_batches",
    "tune_policy", "TuneResult",
]
