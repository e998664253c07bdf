"""CBAM: Convolutional Block Attention Module (channel attention + spatial attention).

Woo et al., "CBAM: Convolutional Block Attention Module", ECCV 2018.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from flax_attn.layers import _functional as F
from flax_attn.layers.channel_attn import ChannelAttention
from flax_attn.layers.spatial_attn import SpatialAttention

Dtype = Any

ARRANGEMENTS = ("channel_first", "spatial_first", "parallel", "parallel_add")


class CBAM(nnx.Module):
    """CBAM = :class:`ChannelAttention` ``channel`` + :class:`SpatialAttention` ``spatial``.

    Arrangements (the paper's table 4), with ``M_c``/``M_s`` the channel/spatial attention maps:

    * ``"channel_first"`` (default, best in the paper): ``x' = x * M_c(x)``, ``y = x' * M_s(x')``;
    * ``"spatial_first"``: ``x' = x * M_s(x)``, ``y = x' * M_c(x')``;
    * ``"parallel"``: both maps from the same input, applied together: ``y = x * M_c(x) * M_s(x)``;
    * ``"parallel_add"``: both branches from the same input, outputs summed:
      ``y = x * M_c(x) + x * M_s(x)``.

    ``no_spatial=True`` drops the spatial module (the official code's flag), leaving channel attention.

    Channel options (``reduction``, ``hidden_channels``, ``divisor``, ``round_limit``, ``min_hidden``,
    ``pool_types``, ``pool_fusion``, ``use_bias``, ``act``) are those of :class:`ChannelAttention`; spatial
    options (``kernel_size``, ``spatial_dims``, ``compress``, ``compress_fusion``, ``compress_channels``,
    ``use_bn``, ``conv_bias``, ``bn_momentum``, ``bn_eps``) those of :class:`SpatialAttention`. ``gate``
    applies to both unless ``spatial_gate`` is given.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> cbam = CBAM(64, reduction=16, kernel_size=7, rngs=nnx.Rngs(0))
        >>> cbam(jnp.ones((2, 7, 9, 64))).shape
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
        pool_types: Sequence[str] = ("avg", "max"),
        pool_fusion: str = "sum",
        use_bias: bool = True,
        act: F.ActivationLike = "relu",
        gate: F.ActivationLike = "sigmoid",
        kernel_size: int = 7,
        spatial_dims: int = 2,
        compress: str | Sequence[str] = ("mean", "max"),
        compress_fusion: str = "concat",
        compress_channels: int = 2,
        use_bn: bool = False,
        conv_bias: bool | None = None,
        bn_momentum: float = 0.9,
        bn_eps: float = 1e-5,
        spatial_gate: F.ActivationLike | None = None,
        arrangement: str = "channel_first",
        no_spatial: bool = False,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if arrangement not in ARRANGEMENTS:
            raise ValueError(f"unknown arrangement {arrangement!r}: expected one of {ARRANGEMENTS}")
        self.channels = channels
        self.arrangement = arrangement
        self.channel = ChannelAttention(
            channels, reduction=reduction, hidden_channels=hidden_channels, divisor=divisor,
            round_limit=round_limit, min_hidden=min_hidden, pool_types=pool_types, pool_fusion=pool_fusion,
            use_bias=use_bias, act=act, gate=gate, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
        )
        self.spatial = None if no_spatial else SpatialAttention(
            channels, kernel_size=kernel_size, spatial_dims=spatial_dims, compress=compress,
            compress_fusion=compress_fusion, compress_channels=compress_channels, use_bn=use_bn,
            conv_bias=conv_bias, bn_momentum=bn_momentum, bn_eps=bn_eps,
            gate=gate if spatial_gate is None else spatial_gate, dtype=dtype, param_dtype=param_dtype,
            rngs=rngs,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.spatial is None:
            return self.channel(x)
        return F.apply_arrangement(x, self.arrangement, self.channel.attention_map, self.spatial.attention_map)
