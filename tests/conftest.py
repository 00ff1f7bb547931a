"""Shared fixtures: SIMD level restoration, every usable SIMD level, seeds."""
from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest
import torch

try:  # keep hypothesis' cache out of the source tree
    from hypothesis import configuration as _hyp_conf

    _hyp_conf.set_hypothesis_home_dir(os.path.join(tempfile.gettempdir(), "dualsparse-tests-hypothesis"))
except ImportError:  # pragma: no cover
    pass

from dualsparse import ops

ALL_SIMD_LEVELS = ("generic", "avx2", "avx512", "avx512_bf16")
DETECTED_SIMD_LEVEL = ops.simd_level()


def usable_simd_levels():
    return [name for name, ok in ops.simd_levels().items() if ok]


@pytest.fixture(autouse=True)
def _restore_simd_level():
    """Every test leaves the engine at the SIMD level it was detected with."""
    yield
    if ops.simd_level() != DETECTED_SIMD_LEVEL:
        ops.set_simd_level(DETECTED_SIMD_LEVEL)


@pytest.fixture(params=ALL_SIMD_LEVELS)
def simd_level(request):
    """Runs the test once per SIMD level this CPU and build offer (others are
    skipped with the reason), with that level active."""
    name = request.param
    if not ops.simd_levels().get(name, False):
        pytest.skip(f"SIMD level {name} is not usable on this CPU/build ({ops.simd_levels()})")
    ops.set_simd_level(name)
    assert ops.simd_level() == name
    yield name
    ops.set_simd_level(DETECTED_SIMD_LEVEL)


@pytest.fixture
def rng():
    return np.random.default_rng(20250818)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(20250818)


@pytest.fixture
def torch_threads():
    """Restores torch's thread count after a test that changes it."""
    n = torch.get_num_threads()
    yield n
    torch.set_num_threads(n)
