"""The model factory of the training application (names checked before anything is compiled).

Backbones come from :mod:`flax_attn.models` (``create_model("resnet18", attn=..., width=..., stem=...)``);
``resnet10`` (one basic block per stage, the same ``ResNet`` class) is added here for quick experiments
and tests.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from flax_attn.layers import list_attn
from flax_attn.models import ResNet, create_model, list_models
from train.config import Config


def model_names() -> list[str]:
    """Names accepted by ``Config.model``: ResNets with an attention slot."""
    return sorted({"resnet10", *list_models("resnet*")}, key=lambda s: int(s[6:]))


def check_model_names(config: Config) -> None:
    """Raises ``ValueError`` for an unknown model or attention name (called before any compile)."""
    if config.model not in model_names():
        raise ValueError(f"unknown model {config.model!r}: expected one of {model_names()}")
    if config.attn != "none" and config.attn.lower().replace("-", "_") not in list_attn():
        raise ValueError(f"unknown attn {config.attn!r}: expected 'none' or one of {list_attn()}")


def build_model(config: Config, *, num_classes: int, in_chans: int, rngs: nnx.Rngs) -> nnx.Module:
    """The NNX classifier of ``config`` (NHWC in, logits out; ``layer4`` is the CAM target layer)."""
    check_model_names(config)
    kw = dict(num_classes=num_classes, in_chans=in_chans, attn=None if config.attn == "none" else config.attn,
              width=config.width, stem=config.stem, zero_init_residual=config.zero_init_residual,
              dtype=jnp.bfloat16 if config.compute_dtype == "bfloat16" else None, param_dtype=jnp.float32,
              rngs=rngs)
    if config.model == "resnet10":
        return ResNet("basic", (1, 1, 1, 1), **kw)
    return create_model(config.model, jit=False, **kw)
