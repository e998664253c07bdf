"""Linen twins of :class:`flax_attn.layers.ChannelAttention` and :class:`flax_attn.layers.SqueezeExcite`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from flax_attn.layers import _functional as F
from flax_attn.layers._functional import Dtype
from flax_attn.layers.specs import ChannelSpec, SESpec
from flax_attn.linen._twin import SpecModule


class ChannelAttention(SpecModule):
    """CBAM's Channel Attention Module, Linen twin of :class:`flax_attn.layers.ChannelAttention`.

    Same options and defaults (the fields of :class:`~flax_attn.layers.specs.ChannelSpec`, kept validated
    as ``module.spec``), same parameters (``fc1.kernel (C, hidden)``, ``fc1.bias``, ``fc2.kernel``,
    ``fc2.bias``), same arithmetic (:mod:`flax_attn.layers._functional`). The call accepts (and ignores)
    ``train`` so that all attention blocks can be called alike. ``preset`` records the name of the preset
    that made the module (see :func:`flax_attn.linen.create_attn`); pass it as ``key_map`` to
    :func:`flax_attn.convert.torch_to_linen`.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> cam = ChannelAttention(64, reduction=16)
        >>> x = jnp.ones((2, 7, 9, 64))
        >>> cam.apply(cam.init(jax.random.key(0), x), x).shape, cam.hidden
        ((2, 7, 9, 64), 4)
    """

    Spec = ChannelSpec

    channels: int
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @property
    def hidden(self) -> int:
        """The MLP's hidden width."""
        return self.spec.hidden(self.channels)

    def setup(self) -> None:
        kw = dict(use_bias=self.spec.use_bias, dtype=self.dtype, param_dtype=self.param_dtype)
        self.fc1 = nn.Dense(self.hidden, **kw)
        self.fc2 = nn.Dense(self.channels, **kw)

    def logits(self, x: jax.Array, scale: jax.Array | None = None) -> jax.Array:
        """Pre-gate channel logits, shape ``(N, C)``, of ``x`` (or of ``x * scale`` without forming it)."""
        F.check_input(x, self.channels, f"{type(self).__name__}({self.channels})")
        act = self.spec.act_fn
        return F.channel_logits(x, self.spec.pool_types, self.spec.pool_fusion,
                                lambda z: self.fc2(act(self.fc1(z))), scale)

    def attention_map(self, x: jax.Array, scale: jax.Array | None = None) -> jax.Array:
        """The channel attention ``M_c(x)``, broadcastable to ``x``: shape ``(N, 1, ..., 1, C)``.

        With ``scale`` (a spatial map ``(N, *spatial, 1)``) it is ``M_c(x * scale)``, computed without
        materialising ``x * scale`` (as the NNX block).
        """
        g = self.spec.gate_fn(self.logits(x, scale))
        return g.reshape(g.shape[:1] + (1,) * (x.ndim - 2) + g.shape[1:])

    def __call__(self, x: jax.Array, train: bool | None = None) -> jax.Array:
        m = self.attention_map(x)
        return x.astype(m.dtype) * m


class SqueezeExcite(ChannelAttention):
    """Squeeze-and-Excitation, Linen twin of :class:`flax_attn.layers.SqueezeExcite`.

    :class:`ChannelAttention` with the options of :class:`~flax_attn.layers.specs.SESpec` (a single
    average pool by default, ``pool_types=("avg",)``); the same parameters (``fc1``, ``fc2``) and
    arithmetic as the NNX block.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> se = SqueezeExcite(64, reduction=16)
        >>> x = jnp.ones((2, 7, 9, 64))
        >>> se.apply(se.init(jax.random.key(0), x), x).shape
        (2, 7, 9, 64)
    """

    Spec = SESpec
