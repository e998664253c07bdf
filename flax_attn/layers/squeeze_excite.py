"""Squeeze-and-Excitation.

Hu et al., "Squeeze-and-Excitation Networks", CVPR 2018 / TPAMI 2019.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
from flax import nnx

from flax_attn.layers import _functional as F
from flax_attn.layers.channel_attn import ChannelAttention

Dtype = Any


class SqueezeExcite(ChannelAttention):
    """Squeeze-and-Excitation: ``y = x * sigmoid(fc2(relu(fc1(mean(x)))))``.

    The squeeze is a global average pool over the spatial axes of a channels-last map, the excitation a
    bottleneck MLP of width ``C // reduction`` (paper: ``r = 16``, FC layers with bias, ReLU, sigmoid).
    SE is the single-pool case of :class:`ChannelAttention`, so every option of that class applies
    (``pool_types`` included: ``("avg", "max")`` turns it into CBAM's channel module) and the parameter tree
    is the same: ``fc1.kernel``, ``fc1.bias``, ``fc2.kernel``, ``fc2.bias``.

    Presets reproduce other implementations exactly (``create_attn("se_classic", C)`` is the source
    article's bias-free ``SELayer``, ``"se_torchvision"``, ``"se_timm"``, ``"se_mobilenetv3"``...), see
    :func:`flax_attn.layers.create_attn`.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> se = SqueezeExcite(64, reduction=16, rngs=nnx.Rngs(0))
        >>> se(jnp.ones((2, 7, 9, 64))).shape
        (2, 7, 9, 64)
    """

    def __init__(
        self,
        channels: int,
        *,
        reduction: float = 16,
        hidden_channels: int | None = None,
        divisor: int | None = None,
        round_limit: float = 0.0,
        min_hidden: int = 1,
        pool_types: Sequence[str] = ("avg",),
        pool_fusion: str = "sum",
        use_bias: bool = True,
        act: F.ActivationLike = "relu",
        gate: F.ActivationLike = "sigmoid",
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        super().__init__(
            channels, reduction=reduction, hidden_channels=hidden_channels, divisor=divisor,
            round_limit=round_limit, min_hidden=min_hidden, pool_types=pool_types, pool_fusion=pool_fusion,
            use_bias=use_bias, act=act, gate=gate, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
        )
