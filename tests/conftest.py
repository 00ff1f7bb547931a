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

# Under pytest-xdist (scripts/test.sh runs one worker per CPU) each worker
# gets its share of the CPUs, so that workers do not oversubscribe the
# machine; torch's count is also the engine's default.  Tests that need
# several threads ask for them explicitly.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

# The files that take longest (subprocesses, C builds, end-to-end runs) are
# collected first, longest first, so that xdist's one-file-per-worker
# scheduling (scripts/test.sh passes --no-loadscope-reorder to keep this
# order) starts them early instead of leaving one to run alone at the end.
SLOW_FILES_FIRST = ("test_lm_eval.py", "test_core_c.py", "test_readme.py", "test_ep.py", "test_moefication.py",
                    "test_sweep.py",
                    "test_cuda_emu.py", "test_compile.py", "test_builtin.py", "test_portability.py",
                    "test_notebooks.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(SLOW_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order inside a file is kept


ALL_SIMD_LEVELS = ("generic", "avx2", "avx512", "avx512_bf16", "amx_bf16")
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
