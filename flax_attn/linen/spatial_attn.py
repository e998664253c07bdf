"""Linen twin of :class:`flax_attn.layers.SpatialAttention`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from flax_attn.layers import _functional as F
from flax_attn.layers._functional import Dtype
from flax_attn.layers.specs import SpatialSpec
from flax_attn.linen._twin import SpecModule
from flax_attn.linen.norm import BatchNorm


class SpatialAttention(SpecModule):
    """CBAM's Spatial Attention Module, Linen twin of :class:`flax_attn.layers.SpatialAttention`.

    Same options and defaults (the fields of :class:`~flax_attn.layers.specs.SpatialSpec`, kept validated
    as ``module.spec``), same variables (``params``: ``conv.kernel (k, k, K, 1)``, ``conv.bias``,
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

    Spec = SpatialSpec

    channels: int
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_running_average: bool = False

    def _use_ra(self, train: bool | None) -> bool:
        return self.use_running_average if train is None else not train

    @nn.compact
    def logits(self, x: jax.Array, train: bool | None = None, scale: jax.Array | None = None) -> jax.Array:
        """Pre-gate spatial logits, shape ``(N, *spatial, 1)``, of ``x`` (or of ``x * scale``, ``scale`` a
        channel map ``(N, 1, ..., 1, C)``, without forming the product for pooled compression)."""
        sp = self.spec
        F.check_input(x, self.channels, f"SpatialAttention({self.channels})", sp.spatial_dims)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if sp.compress == "conv":
            z = nn.Conv(sp.compress_channels, (1,) * sp.spatial_dims, padding="VALID", name="compress",
                        **kw)(x if scale is None else x * scale)
        else:
            z = F.channel_compress(x, sp.compress, sp.compress_fusion, scale)
        z = nn.Conv(1, (sp.kernel_size,) * sp.spatial_dims, padding=sp.padding, use_bias=sp.use_conv_bias,
                    conv_general_dilated=F.gate_conv, name="conv", **kw)(z)
        if sp.use_bn:
            z = BatchNorm(1, momentum=sp.bn_momentum, epsilon=sp.bn_eps, name="bn",
                          **kw)(z, use_running_average=self._use_ra(train))
        return z

    def attention_map(self, x: jax.Array, train: bool | None = None, scale: jax.Array | None = None) -> jax.Array:
        """The spatial attention ``M_s(x)`` (or ``M_s(x * scale)``), shape ``(N, *spatial, 1)``."""
        return self.spec.gate_fn(self.logits(x, train, scale))

    def __call__(self, x: jax.Array, train: bool | None = None) -> jax.Array:
        m = self.attention_map(x, train)
        return x.astype(m.dtype) * m
