"""Parity-suite setup on top of the root ``conftest.py`` (which sets JAX "highest" matmul precision, turns
torch TF32 off and seeds numpy/torch/random before every test).

Here: torch's default dtype is pinned to float32. The shared helpers live in ``parity_tests/_utils.py``
and are imported as ``parity_tests._utils`` (the repository root is on ``sys.path`` because the root
conftest lives there).
"""

import torch

torch.set_default_dtype(torch.float32)
