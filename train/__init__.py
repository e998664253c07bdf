"""The training application of flax-attn (run from a checkout: ``python -m train``)."""

# process defaults (XLA:CPU flags, allocator settings) first: before JAX, orbax or tensorstore start threads
import train.xla_flags  # noqa: F401,I001

from train.checkpoints import CheckpointError
from train.config import Config
from train.data import DataError
from train.train import NonFiniteLossError, ResumeError, train_and_evaluate

__all__ = ["CheckpointError", "Config", "DataError", "NonFiniteLossError", "ResumeError", "train_and_evaluate"]
