"""Channel attention: CBAM's Channel Attention Module (CAM), the base of Squeeze-and-Excitation.

Woo et al., "CBAM: Convolutional Block Attention Module", ECCV 2018, section 3.1.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from flax_attn.layers import _functional as F

Dtype = Any

POOL_FUSIONS = ("sum", "mean")


class ChannelAttention(nnx.Module):
    """CBAM's Channel Attention Module: ``y = x * gate(sum_p MLP(pool_p(x)))``.

    Each global pool in ``pool_types`` (``avg``, ``max``, ``lp`` = L2, ``lse`` = log-sum-exp) squeezes the
    channels-last map ``(N, *spatial, C)`` to ``(N, C)``; a shared two-layer MLP ``fc1 -> act -> fc2``
    maps each to ``C`` logits; the logits are summed (``pool_fusion="sum"``, the paper; the fc2 bias is
    therefore added once per pool, as in the official code) and gated. ``pool_fusion="mean"`` averages the
    pooled vectors *before* one MLP pass (timm's ``LightChannelAttn``).

    Works on 1-D, 2-D and 3-D maps: ``(N, L, C)``, ``(N, H, W, C)``, ``(N, D, H, W, C)``.

    Args:
        channels: number of input channels ``C``.
        reduction: ratio ``r``; hidden width ``C // r`` (floor, minimum ``min_hidden``) unless ``divisor``.
        hidden_channels: explicit hidden width; overrides ``reduction``.
        divisor: round the hidden width to a multiple of ``divisor`` (torchvision / timm rule, see
            :func:`flax_attn.layers.make_divisible`); ``None`` uses the floor rule of the papers' code.
        round_limit: ``make_divisible``'s ``round_limit`` (timm 0.0, torchvision 0.9); used with ``divisor``.
        min_hidden: smallest hidden width (default 1).
        pool_types: non-empty sequence of ``avg``/``max``/``lp``/``lse``; the paper's default ``(avg, max)``.
        pool_fusion: ``"sum"`` (MLP per pool, outputs summed) or ``"mean"`` (pools averaged, one MLP).
        use_bias: biases in ``fc1``/``fc2`` (the official CBAM code: yes).
        act: inner activation (name or callable), default ``"relu"``.
        gate: gate (``"sigmoid"``, ``"hard_sigmoid"`` or callable), default ``"sigmoid"``.
        dtype: computation dtype (``None``: inferred); ``param_dtype``: parameter dtype.

    Parameters: ``fc1.kernel (C, hidden)``, ``fc1.bias``, ``fc2.kernel (hidden, C)``, ``fc2.bias``.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> cam = ChannelAttention(64, reduction=16, rngs=nnx.Rngs(0))
        >>> cam(jnp.ones((2, 7, 9, 64))).shape
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
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ValueError(f"channels must be a positive int, got {channels!r}")
        if pool_fusion not in POOL_FUSIONS:
            raise ValueError(f"unknown pool_fusion {pool_fusion!r}: expected one of {POOL_FUSIONS}")
        self.channels = channels
        self.hidden = F.hidden_width(
            channels, reduction=reduction, hidden_channels=hidden_channels, divisor=divisor,
            round_limit=round_limit, min_hidden=min_hidden,
        )
        self.pool_types = F.normalize_pool_types(pool_types)
        self.pool_fusion = pool_fusion
        self.act = F.resolve_activation(act)
        self.gate_fn = F.resolve_activation(gate, argname="gate")
        self.dtype = dtype
        self.fc1 = nnx.Linear(channels, self.hidden, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                              precision=None, rngs=rngs)
        self.fc2 = nnx.Linear(self.hidden, channels, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                              precision=None, rngs=rngs)

    def _name(self) -> str:
        return f"{type(self).__name__}({self.channels})"

    def logits(self, x: jax.Array, scale: jax.Array | None = None) -> jax.Array:
        """Pre-gate channel logits, shape ``(N, C)``, of ``x`` (or of ``x * scale`` without forming it)."""
        F.check_input(x, self.channels, self._name())
        return F.channel_logits(x, self.pool_types, self.pool_fusion,
                                lambda z: self.fc2(self.act(self.fc1(z))), scale)

    def attention_map(self, x: jax.Array, scale: jax.Array | None = None) -> jax.Array:
        """The channel attention ``M_c(x)``, broadcastable to ``x``: shape ``(N, 1, ..., 1, C)``.

        With ``scale`` (a spatial map ``(N, *spatial, 1)``) it is ``M_c(x * scale)``, computed without
        materialising ``x * scale``.
        """
        g = self.gate_fn(self.logits(x, scale))
        return g.reshape(g.shape[:1] + (1,) * (x.ndim - 2) + g.shape[1:])

    def __call__(self, x: jax.Array) -> jax.Array:
        m = self.attention_map(x)
        return x.astype(m.dtype) * m
