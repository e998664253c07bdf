"""Linen twins of :class:`flax_attn.layers.ChannelAttention` and :class:`flax_attn.layers.SqueezeExcite`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from flax_attn.layers import _functional as F
from flax_attn.layers.channel_attn import POOL_FUSIONS

Dtype = Any


def _check_channels(channels: Any) -> None:
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
        raise ValueError(f"channels must be a positive int, got {channels!r}")


class ChannelAttention(nn.Module):
    """CBAM's Channel Attention Module, Linen twin of :class:`flax_attn.layers.ChannelAttention`.

    Same options and defaults, same parameters (``fc1.kernel (C, hidden)``, ``fc1.bias``, ``fc2.kernel``,
    ``fc2.bias``), same arithmetic (:mod:`flax_attn.layers._functional`). The call accepts (and ignores)
    ``train`` so that all attention blocks can be called alike. ``preset`` records the name of the preset
    that made the module (see :func:`flax_attn.linen.create_attn`); pass it as ``key_map`` to
    :func:`flax_attn.convert.torch_to_linen`.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> cam = ChannelAttention(64, reduction=16)
        >>> x = jnp.ones((2, 7, 9, 64))
        >>> cam.apply(cam.init(jax.random.key(0), x), x).shape
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
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    preset: str | None = None

    def __post_init__(self) -> None:
        _check_channels(self.channels)
        if self.pool_fusion not in POOL_FUSIONS:
            raise ValueError(f"unknown pool_fusion {self.pool_fusion!r}: expected one of {POOL_FUSIONS}")
        self.hidden  # noqa: B018  (validates the width options now, as the NNX constructor does)
        F.normalize_pool_types(self.pool_types)
        F.resolve_activation(self.act)
        F.resolve_activation(self.gate, argname="gate")
        super().__post_init__()

    @property
    def hidden(self) -> int:
        """The MLP's hidden width."""
        return F.hidden_width(self.channels, reduction=self.reduction, hidden_channels=self.hidden_channels,
                              divisor=self.divisor, round_limit=self.round_limit, min_hidden=self.min_hidden)

    def setup(self) -> None:
        self.fc1 = nn.Dense(self.hidden, use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype)
        self.fc2 = nn.Dense(self.channels, use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype)

    def logits(self, x: jax.Array, scale: jax.Array | None = None) -> jax.Array:
        """Pre-gate channel logits, shape ``(N, C)``, of ``x`` (or of ``x * scale`` without forming it)."""
        F.check_input(x, self.channels, f"{type(self).__name__}({self.channels})")
        act = F.resolve_activation(self.act)
        return F.channel_logits(x, F.normalize_pool_types(self.pool_types), self.pool_fusion,
                                lambda z: self.fc2(act(self.fc1(z))), scale)

    def attention_map(self, x: jax.Array, scale: jax.Array | None = None) -> jax.Array:
        """The channel attention ``M_c(x)``, broadcastable to ``x``: shape ``(N, 1, ..., 1, C)``.

        With ``scale`` (a spatial map ``(N, *spatial, 1)``) it is ``M_c(x * scale)``, computed without
        materialising ``x * scale`` (as the NNX block).
        """
        g = F.resolve_activation(self.gate, argname="gate")(self.logits(x, scale))
        return g.reshape(g.shape[:1] + (1,) * (x.ndim - 2) + g.shape[1:])

    def __call__(self, x: jax.Array, train: bool | None = None) -> jax.Array:
        m = self.attention_map(x)
        return x.astype(m.dtype) * m


class SqueezeExcite(ChannelAttention):
    """Squeeze-and-Excitation, Linen twin of :class:`flax_attn.layers.SqueezeExcite`.

    :class:`ChannelAttention` with a single average pool by default (``pool_types=("avg",)``); the same
    options, parameters (``fc1``, ``fc2``) and arithmetic as the NNX block.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> se = SqueezeExcite(64, reduction=16)
        >>> x = jnp.ones((2, 7, 9, 64))
        >>> se.apply(se.init(jax.random.key(0), x), x).shape
        (2, 7, 9, 64)
    """

    pool_types: Sequence[str] = ("avg",)
