"""Linen twin of :class:`flax_attn.layers.CBAM`."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flax_attn.layers import _functional as F
from flax_attn.layers._functional import Dtype
from flax_attn.layers.specs import CBAMSpec
from flax_attn.linen._twin import SpecModule
from flax_attn.linen.channel_attn import ChannelAttention
from flax_attn.linen.spatial_attn import SpatialAttention


class CBAM(SpecModule):
    """CBAM = ``channel`` (:class:`ChannelAttention`) + ``spatial`` (:class:`SpatialAttention`), Linen twin
    of :class:`flax_attn.layers.CBAM`: same options (the flat form of
    :class:`~flax_attn.layers.specs.CBAMSpec`, kept as ``module.spec``), arrangements, variables and
    arithmetic.

    Mode as in :class:`SpatialAttention`: attribute ``use_running_average`` (default ``False``), call
    argument ``train`` overrides it; training-mode calls with ``use_bn=True`` update ``batch_stats``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> cbam = CBAM(64, reduction=16, kernel_size=7)
        >>> x = jnp.ones((2, 7, 9, 64))
        >>> cbam.apply(cbam.init(jax.random.key(0), x), x).shape
        (2, 7, 9, 64)
    """

    Spec = CBAMSpec

    channels: int
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_running_average: bool = False

    def setup(self) -> None:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.channel = ChannelAttention.from_spec(self.channels, self.spec.channel, **kw)
        if self.spec.spatial is not None:
            self.spatial = SpatialAttention.from_spec(self.channels, self.spec.spatial,
                                                      use_running_average=self.use_running_average, **kw)

    @property
    def hidden(self) -> int:
        """The channel MLP's hidden width."""
        return self.spec.channel.hidden(self.channels)

    def __call__(self, x: jax.Array, train: bool | None = None) -> jax.Array:
        if self.spec.spatial is None:
            return self.channel(x)
        return F.apply_arrangement(
            x, self.spec.arrangement, self.channel.attention_map,
            lambda x, scale=None: self.spatial.attention_map(x, train, scale=scale))
