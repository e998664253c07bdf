"""The model factory of the training application (names checked before anything is compiled)."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from flax_attn.layers import list_attn
from train._fallback_model import create_model as _create_model
from train.config import Config

MODELS = ("resnet10", "resnet18")


def check_model_names(config: Config) -> None:
    """Raises ``ValueError`` for an unknown model or attention name (called before any compile)."""
    if config.model not in MODELS:
        raise ValueError(f"unknown model {config.model!r}: expected one of {list(MODELS)}")
    if config.attn != "none" and config.attn.lower().replace("-", "_") not in list_attn():
        raise ValueError(f"unknown attn {config.attn!r}: expected 'none' or one of {list_attn()}")


def build_model(config: Config, *, num_classes: int, in_chans: int, rngs: nnx.Rngs) -> nnx.Module:
    """The NNX classifier of ``config`` (NHWC in, logits out); ``layer4`` is the CAM target layer."""
    check_model_names(config)
    dtype = jnp.bfloat16 if config.compute_dtype == "bfloat16" else None
    return _create_model(config.model, num_classes=num_classes, in_chans=in_chans,
                         attn=None if config.attn == "none" else config.attn, width=config.width,
                         stem=config.stem, zero_init_residual=config.zero_init_residual, dtype=dtype,
                         param_dtype=jnp.float32, rngs=rngs)
