"""Linen twin of :class:`flax_attn.layers.CBAM`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from flax_attn.layers import _functional as F
from flax_attn.layers.cbam import ARRANGEMENTS
from flax_attn.linen.channel_attn import ChannelAttention
from flax_attn.linen.spatial_attn import SpatialAttention

Dtype = Any


class CBAM(nn.Module):
    """CBAM = ``channel`` (:class:`ChannelAttention`) + ``spatial`` (:class:`SpatialAttention`), Linen twin
    of :class:`flax_attn.layers.CBAM`: same options, arrangements, variables and arithmetic.

    Mode as in :class:`SpatialAttention`: attribute ``use_running_average`` (default ``False``), call
    argument ``train`` overrides it; training-mode calls with ``use_bn=True`` update ``batch_stats``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> cbam = CBAM(64, reduction=16, kernel_size=7)
        >>> x = jnp.ones((2, 7, 9, 64))
        >>> cbam.apply(cbam.init(jax.random.key(0), x), x).shape
        (2, 7, 9, 64)
    """

    channels: int
    reduction: float = 16
    hidden_channels: int | None = None
    divisor: int | None = None
    round_limit: float = 0.0
    min_hidden: int = 1
    pool_types: Sequence[str] = ("avg", "max")
    pool_fusion: str = "sum"
    use_bias: bool = True
    act: F.ActivationLike = "relu"
    gate: F.ActivationLike = "sigmoid"
    kernel_size: int = 7
    spatial_dims: int = 2
    compress: str | Sequence[str] = ("mean", "max")
    compress_fusion: str = "concat"
    compress_channels: int = 2
    use_bn: bool = False
    conv_bias: bool | None = None
    bn_momentum: float = 0.9
    bn_eps: float = 1e-5
    spatial_gate: F.ActivationLike | None = None
    arrangement: str = "channel_first"
    no_spatial: bool = False
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_running_average: bool = False
    preset: str | None = None

    def __post_init__(self) -> None:
        if self.arrangement not in ARRANGEMENTS:
            raise ValueError(f"unknown arrangement {self.arrangement!r}: expected one of {ARRANGEMENTS}")
        super().__post_init__()

    def setup(self) -> None:
        self.channel = ChannelAttention(
            self.channels, reduction=self.reduction, hidden_channels=self.hidden_channels, divisor=self.divisor,
            round_limit=self.round_limit, min_hidden=self.min_hidden, pool_types=self.pool_types,
            pool_fusion=self.pool_fusion, use_bias=self.use_bias, act=self.act, gate=self.gate, dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        if not self.no_spatial:
            self.spatial = SpatialAttention(
                self.channels, kernel_size=self.kernel_size, spatial_dims=self.spatial_dims, compress=self.compress,
                compress_fusion=self.compress_fusion, compress_channels=self.compress_channels, use_bn=self.use_bn,
                conv_bias=self.conv_bias, bn_momentum=self.bn_momentum, bn_eps=self.bn_eps,
                gate=self.gate if self.spatial_gate is None else self.spatial_gate, dtype=self.dtype,
                param_dtype=self.param_dtype, use_running_average=self.use_running_average,
            )

    @property
    def hidden(self) -> int:
        """The channel MLP's hidden width."""
        return F.hidden_width(self.channels, reduction=self.reduction, hidden_channels=self.hidden_channels,
                              divisor=self.divisor, round_limit=self.round_limit, min_hidden=self.min_hidden)

    def __call__(self, x: jax.Array, train: bool | None = None) -> jax.Array:
        if self.no_spatial:
            return self.channel(x)
        return F.apply_arrangement(
            x, self.arrangement, self.channel.attention_map,
            lambda x, scale=None: self.spatial.attention_map(x, train, scale=scale))
