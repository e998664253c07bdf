"""The training application of flax-attn (run from a checkout: ``python -m train``)."""

from train.config import Config
from train.train import NonFiniteLossError, train_and_evaluate

__all__ = ["Config", "NonFiniteLossError", "train_and_evaluate"]
