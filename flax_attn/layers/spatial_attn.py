"""Spatial attention: CBAM's Spatial Attention Module (SAM).

Woo et al., "CBAM: Convolutional Block Attention Module", ECCV 2018, section 3.1 and table 3.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from flax_attn.layers import _functional as F
from flax_attn.layers._functional import Dtype
from flax_attn.layers.norm import BatchNorm
from flax_attn.layers.specs import SpatialSpec, SpecBlock, check_channels, options_signature


class SpatialAttention(SpecBlock, nnx.Module):
    """CBAM's Spatial Attention Module: ``y = x * gate(bn(conv_k(compress(x))))``.

    ``compress`` squeezes the channel axis of a channels-last map:

    * a concat order of channel pools, e.g. ``("mean", "max")`` (the paper's ``[AvgPool; MaxPool]``,
      default) or ``("max", "mean")`` (the official code's ``ChannelPool``); with
      ``compress_fusion="mean"`` the pooled maps are averaged into one channel (timm's light variant);
    * ``"conv"``: a learned 1x1 convolution ``compress`` from ``C`` to ``compress_channels`` maps (the
      paper's ablation; the paper does not state the width, 2 keeps the 7x7 conv's shape of the pooled case).

    A ``kernel_size`` x ... convolution ``conv`` (any odd size, padding ``(k - 1) // 2`` so the map keeps its
    size; the paper compares 3 and 7) maps the compressed channels to one attention logit per position, an
    optional :class:`BatchNorm` ``bn`` follows (the official code: no conv bias, BN with torch momentum 0.01),
    then the gate. The map is broadcast over the channels.

    Args:
        channels: input channels ``C`` (checked at call time; sizes the ``"conv"`` compression).
        spec: a :class:`~flax_attn.layers.specs.SpatialSpec` (default: the paper's options); the keyword
            options below override its fields.
        kernel_size: odd spatial kernel size, default 7.
        spatial_dims: 1, 2 (default) or 3 spatial dimensions.
        compress: concat order of ``"max"``/``"mean"`` pools, or ``"conv"``.
        compress_fusion: ``"concat"`` (default) or ``"mean"``.
        compress_channels: output width of the ``"conv"`` compression.
        use_bn: BatchNorm after the conv (default False, the paper's equation).
        conv_bias: bias in the conv; default ``not use_bn``.
        bn_momentum, bn_eps: BatchNorm options (Flax momentum convention, torch momentum = 1 - momentum).
        gate: gate name or callable, default ``"sigmoid"``.
        preset: the preset name recorded for conversion.
        dtype: computation dtype (``None``: inferred); ``param_dtype``: parameter dtype.

    The keyword options are the fields of :class:`~flax_attn.layers.specs.SpatialSpec` (``module.spec``).
    An empty batch gives an empty output (in training mode BatchNorm needs more than one value per channel).

    Parameters: ``conv.kernel (k, k, K, 1)``, ``conv.bias``, ``bn.scale``, ``bn.bias`` (+ statistics),
    ``compress.kernel``/``compress.bias`` for ``compress="conv"``.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> sam = SpatialAttention(64, kernel_size=7, rngs=nnx.Rngs(0))
        >>> sam(jnp.ones((2, 7, 9, 64))).shape
        (2, 7, 9, 64)
    """

    Spec: type[SpatialSpec] = SpatialSpec

    def __init__(self, channels: int, spec: SpatialSpec | None = None, *, dtype: Dtype | None = None,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs, **options: Any):
        self.channels = check_channels(channels)
        self.spec = sp = self.Spec.build(spec, **options)
        nd = sp.spatial_dims
        self.compress = (nnx.Conv(channels, sp.compress_channels, (1,) * nd, padding="VALID", dtype=dtype,
                                  param_dtype=param_dtype, rngs=rngs) if sp.compress == "conv" else None)
        self.conv = nnx.Conv(sp.conv_in, 1, (sp.kernel_size,) * nd, padding=sp.padding, use_bias=sp.use_conv_bias,
                             dtype=dtype, param_dtype=param_dtype, conv_general_dilated=F.gate_conv, rngs=rngs)
        self.bn = (BatchNorm(1, momentum=sp.bn_momentum, epsilon=sp.bn_eps, dtype=dtype, param_dtype=param_dtype,
                             rngs=rngs) if sp.use_bn else None)

    def logits(self, x: jax.Array, scale: jax.Array | None = None) -> jax.Array:
        """Pre-gate spatial logits, shape ``(N, *spatial, 1)``, of ``x`` (or of ``x * scale``, ``scale`` a
        channel map ``(N, 1, ..., 1, C)``, without forming the product for pooled compression)."""
        F.check_input(x, self.channels, f"SpatialAttention({self.channels})", self.spec.spatial_dims)
        if self.compress is not None:
            z = self.compress(x if scale is None else x * scale)
        else:
            z = F.channel_compress(x, self.spec.compress, self.spec.compress_fusion, scale)
        z = self.conv(z)
        if self.bn is not None:
            z = self.bn(z)
        return z

    def attention_map(self, x: jax.Array, scale: jax.Array | None = None) -> jax.Array:
        """The spatial attention ``M_s(x)`` (or ``M_s(x * scale)``), shape ``(N, *spatial, 1)``."""
        return self.spec.gate_fn(self.logits(x, scale))

    def __call__(self, x: jax.Array) -> jax.Array:
        m = self.attention_map(x)
        return x.astype(m.dtype) * m


SpatialAttention.__signature__ = options_signature(SpatialAttention.__init__, SpatialSpec)  # type: ignore[attr-defined]
