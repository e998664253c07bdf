"""Shared test setup (DESIGN.md, "Numerics in tests"): float32 with highest matmul precision on the JAX
side, TF32 off on the torch side, fixed seeds. Tests that need several JAX devices run in a subprocess
with XLA_FLAGS set (see tests/ for the helper), so this process keeps the default single CPU device."""

import os
import random

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# One persistent XLA compilation cache for the session's processes: the two xdist workers build the same
# module fixtures (models, compiled steps) and the subprocess tests (SIGKILL/resume, multi-device) compile
# what the parent compiled. Kept under .pytest_cache (never in a clean clone, so CI starts cold); set as
# environment variables so that subprocesses inherit it. Compilations under 0.5 s are not worth the disk.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(os.path.dirname(os.path.abspath(__file__)), ".pytest_cache", "jax_compilation_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

try:  # torch is a test dependency, but unit tests under tests/ must not need it
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
except ImportError:  # pragma: no cover
    torch = None


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    if torch is not None:
        torch.manual_seed(0)
    yield


_SLOW_CASES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "slow_cases.txt")


def _measured_slow() -> set[str]:
    """Node ids listed in slow_cases.txt (one per line, ``#`` comments)."""
    with open(_SLOW_CASES) as f:
        return {line.split("#", 1)[0].strip() for line in f} - {""}


def pytest_collection_modifyitems(config, items):
    """Marks the measured-slow cases ``slow`` (see slow_cases.txt), as if decorated."""
    slow = _measured_slow()
    for item in items:
        if item.nodeid in slow:
            item.add_marker(pytest.mark.slow)
