"""Linen twin of :class:`flax_attn.layers.SpatialAttention`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from flax_attn.layers import _functional as F
from flax_attn.linen.channel_attn import _check_channels
from flax_attn.linen.norm import BatchNorm

Dtype = Any


class SpatialAttention(nn.Module):
    """CBAM's Spatial Attention Module, Linen twin of :class:`flax_attn.layers.SpatialAttention`.

    Same options and defaults, same variables (``params``: ``conv.kernel (k, k, K, 1)``, ``conv.bias``,
    ``bn.scale``, ``bn.bias``, ``compress.kernel``/``compress.bias``; ``batch_stats``: ``bn.mean``,
    ``bn.var``, ``bn.num_batches_tracked``) and the same arithmetic.

    Mode (matters only with ``use_bn=True``): the attribute ``use_running_average`` (default ``False``,
    training mode, like a freshly built NNX module; ``True`` is NNX's ``.eval()``), overridden by the
    call argument ``train`` when given (``train=False`` uses the running statistics). Training-mode
    calls update the statistics: apply with ``mutable=["batch_stats"]``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> sam = SpatialAttention(64, kernel_size=7, use_bn=True)
        >>> x = jax.random.normal(jax.random.key(0), (2, 7, 9, 64))
        >>> v = sam.init(jax.random.key(1), x, train=False)
        >>> y, upd = sam.apply(v, x, train=True, mutable=["batch_stats"])
        >>> y.shape
        (2, 7, 9, 64)
    """

    channels: int
    kernel_size: int = 7
    spatial_dims: int = 2
    compress: str | Sequence[str] = ("mean", "max")
    compress_fusion: str = "concat"
    compress_channels: int = 2
    use_bn: bool = False
    conv_bias: bool | None = None
    bn_momentum: float = 0.9
    bn_eps: float = 1e-5
    gate: F.ActivationLike = "sigmoid"
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_running_average: bool = False
    preset: str | None = None

    def __post_init__(self) -> None:
        _check_channels(self.channels)
        F.check_kernel_size(self.kernel_size)
        F.check_spatial_dims(self.spatial_dims)
        mode = F.normalize_compress(self.compress)
        if self.compress_fusion not in ("concat", "mean"):
            raise ValueError(f"unknown compress_fusion {self.compress_fusion!r}: expected 'concat' or 'mean'")
        F.resolve_activation(self.gate, argname="gate")
        if mode == "conv" and self.compress_channels < 1:
            raise ValueError(f"compress_channels must be >= 1, got {self.compress_channels}")
        super().__post_init__()

    def _use_ra(self, train: bool | None) -> bool:
        return self.use_running_average if train is None else not train

    @nn.compact
    def logits(self, x: jax.Array, train: bool | None = None, scale: jax.Array | None = None) -> jax.Array:
        """Pre-gate spatial logits, shape ``(N, *spatial, 1)``, of ``x`` (or of ``x * scale``, ``scale`` a
        channel map ``(N, 1, ..., 1, C)``, without forming the product for pooled compression)."""
        F.check_input(x, self.channels, f"SpatialAttention({self.channels})", self.spatial_dims)
        mode = F.normalize_compress(self.compress)
        nd = self.spatial_dims
        if mode == "conv":
            z = nn.Conv(self.compress_channels, (1,) * nd, padding="VALID", dtype=self.dtype,
                        param_dtype=self.param_dtype, name="compress")(x if scale is None else x * scale)
        else:
            z = F.channel_compress(x, mode, self.compress_fusion, scale)
        conv_bias = (not self.use_bn) if self.conv_bias is None else self.conv_bias
        pad = (self.kernel_size - 1) // 2
        z = nn.Conv(1, (self.kernel_size,) * nd, padding=((pad, pad),) * nd, use_bias=conv_bias, dtype=self.dtype,
                    param_dtype=self.param_dtype, name="conv")(z)
        if self.use_bn:
            z = BatchNorm(1, momentum=self.bn_momentum, epsilon=self.bn_eps, dtype=self.dtype,
                          param_dtype=self.param_dtype, name="bn")(z, use_running_average=self._use_ra(train))
        return z

    def attention_map(self, x: jax.Array, train: bool | None = None, scale: jax.Array | None = None) -> jax.Array:
        """The spatial attention ``M_s(x)`` (or ``M_s(x * scale)``), shape ``(N, *spatial, 1)``."""
        return F.resolve_activation(self.gate, argname="gate")(self.logits(x, train, scale))

    def __call__(self, x: jax.Array, train: bool | None = None) -> jax.Array:
        m = self.attention_map(x, train)
        return x.astype(m.dtype) * m
