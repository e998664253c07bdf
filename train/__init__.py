"""The training application of flax-attn (run from a checkout: ``python -m train``)."""

from train.checkpoints import CheckpointError
from train.config import Config
from train.data import DataError
from train.train import NonFiniteLossError, ResumeError, train_and_evaluate

__all__ = ["CheckpointError", "Config", "DataError", "NonFiniteLossError", "ResumeError", "train_and_evaluate"]
