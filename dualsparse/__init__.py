"""dualsparse: DualSparse-MoE for Hugging Face Mixture-of-Experts models.

The C engine (``dualsparse.ops``) computes expert FFNs with per-(token,
expert) prefix partitions, so that dropped work becomes saved time.  Import
works with NumPy alone; torch is imported where it is used.
"""
from ._version import __version__
from . import ops

__all__ = ["__version__", "ops", "info"]


def info():
    """A dict describing this installation (version, build, SIMD, threads, CUDA)."""
    from ._info import collect

    return collect()
