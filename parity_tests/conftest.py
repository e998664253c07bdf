"""Parity-suite setup on top of the root ``conftest.py`` (which sets JAX "highest" matmul precision, turns
torch TF32 off and seeds numpy/torch/random before every test).

Here: torch runs in float32 by default and deterministically, and the shared helpers of
``parity_tests/_utils.py`` are importable as ``parity_tests._utils`` (the repository root is on
``sys.path`` because the root conftest lives there).
"""

import zlib

import numpy as np
import pytest
import torch

torch.set_default_dtype(torch.float32)
torch.use_deterministic_algorithms(True, warn_only=True)


@pytest.fixture
def np_rng(request) -> np.random.Generator:
    """A numpy Generator seeded from the test's id, so every parametrised case draws its own data
    reproducibly (independent of test order and of pytest-xdist's distribution)."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))
