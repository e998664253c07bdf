"""CBAM: Convolutional Block Attention Module (channel attention + spatial attention).

Woo et al., "CBAM: Convolutional Block Attention Module", ECCV 2018.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from flax_attn.layers import _functional as F
from flax_attn.layers._functional import Dtype
from flax_attn.layers.channel_attn import ChannelAttention
from flax_attn.layers.spatial_attn import SpatialAttention
from flax_attn.layers.specs import CBAMSpec, SpecBlock, check_channels, options_signature


class CBAM(SpecBlock, nnx.Module):
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
    applies to both unless ``spatial_gate`` is given. Together they are the flat form of
    :class:`~flax_attn.layers.specs.CBAMSpec` (``module.spec``; pass ``spec=`` to start from one).

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> cbam = CBAM(64, reduction=16, kernel_size=7, rngs=nnx.Rngs(0))
        >>> cbam(jnp.ones((2, 7, 9, 64))).shape
        (2, 7, 9, 64)
    """

    Spec: type[CBAMSpec] = CBAMSpec

    def __init__(self, channels: int, spec: CBAMSpec | None = None, *, dtype: Dtype | None = None,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs, **options: Any):
        self.channels = check_channels(channels)
        self.spec = self.Spec.build(spec, **options)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.channel = ChannelAttention(channels, self.spec.channel, **kw)
        self.spatial = None if self.spec.spatial is None else SpatialAttention(channels, self.spec.spatial, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.spatial is None:
            return self.channel(x)
        return F.apply_arrangement(x, self.spec.arrangement, self.channel.attention_map,
                                   self.spatial.attention_map)


CBAM.__signature__ = options_signature(CBAM.__init__, CBAMSpec)  # type: ignore[attr-defined]
