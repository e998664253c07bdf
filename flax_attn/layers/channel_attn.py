"""Channel attention: CBAM's Channel Attention Module (CAM), the base of Squeeze-and-Excitation.

Woo et al., "CBAM: Convolutional Block Attention Module", ECCV 2018, section 3.1.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from flax_attn.layers import _functional as F
from flax_attn.layers._functional import Dtype
from flax_attn.layers.specs import ChannelSpec, SpecBlock, check_channels, options_signature


class ChannelAttention(SpecBlock, nnx.Module):
    """CBAM's Channel Attention Module: ``y = x * gate(sum_p MLP(pool_p(x)))``.

    Each global pool in ``pool_types`` (``avg``, ``max``, ``lp`` = L2, ``lse`` = log-sum-exp) squeezes the
    channels-last map ``(N, *spatial, C)`` to ``(N, C)``; a shared two-layer MLP ``fc1 -> act -> fc2``
    maps each to ``C`` logits; the logits are summed (``pool_fusion="sum"``, the paper; the fc2 bias is
    therefore added once per pool, as in the official code) and gated. ``pool_fusion="mean"`` averages the
    pooled vectors *before* one MLP pass (timm's ``LightChannelAttn``).

    Works on 1-D, 2-D and 3-D maps: ``(N, L, C)``, ``(N, H, W, C)``, ``(N, D, H, W, C)``; an empty batch
    gives an empty output.

    Args:
        channels: number of input channels ``C``.
        spec: a :class:`~flax_attn.layers.specs.ChannelSpec` (default: the paper's options); the keyword
            options below override its fields.
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
        preset: the preset name recorded for conversion (set by :func:`flax_attn.layers.create_attn`).
        dtype: computation dtype (``None``: inferred); ``param_dtype``: parameter dtype.

    The keyword options are the fields of :class:`~flax_attn.layers.specs.ChannelSpec` (``module.spec``).
    Parameters: ``fc1.kernel (C, hidden)``, ``fc1.bias``, ``fc2.kernel (hidden, C)``, ``fc2.bias``.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> cam = ChannelAttention(64, reduction=16, rngs=nnx.Rngs(0))
        >>> cam(jnp.ones((2, 7, 9, 64))).shape, cam.hidden
        ((2, 7, 9, 64), 4)
    """

    Spec: type[ChannelSpec] = ChannelSpec

    def __init__(self, channels: int, spec: ChannelSpec | None = None, *, dtype: Dtype | None = None,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs, **options: Any):
        self.channels = check_channels(channels)
        self.spec = self.Spec.build(spec, **options)
        self.hidden = self.spec.hidden(channels)
        self.fc1 = nnx.Linear(channels, self.hidden, use_bias=self.spec.use_bias, dtype=dtype,
                              param_dtype=param_dtype, precision=None, rngs=rngs)
        self.fc2 = nnx.Linear(self.hidden, channels, use_bias=self.spec.use_bias, dtype=dtype,
                              param_dtype=param_dtype, precision=None, rngs=rngs)

    def _name(self) -> str:
        return f"{type(self).__name__}({self.channels})"

    def logits(self, x: jax.Array, scale: jax.Array | None = None) -> jax.Array:
        """Pre-gate channel logits, shape ``(N, C)``, of ``x`` (or of ``x * scale`` without forming it)."""
        F.check_input(x, self.channels, self._name())
        act = self.spec.act_fn
        return F.channel_logits(x, self.spec.pool_types, self.spec.pool_fusion,
                                lambda z: self.fc2(act(self.fc1(z))), scale)

    def attention_map(self, x: jax.Array, scale: jax.Array | None = None) -> jax.Array:
        """The channel attention ``M_c(x)``, broadcastable to ``x``: shape ``(N, 1, ..., 1, C)``.

        With ``scale`` (a spatial map ``(N, *spatial, 1)``) it is ``M_c(x * scale)``, computed without
        materialising ``x * scale``.
        """
        g = self.spec.gate_fn(self.logits(x, scale))
        return g.reshape(g.shape[:1] + (1,) * (x.ndim - 2) + g.shape[1:])

    def __call__(self, x: jax.Array) -> jax.Array:
        m = self.attention_map(x)
        return x.astype(m.dtype) * m


ChannelAttention.__signature__ = options_signature(ChannelAttention.__init__, ChannelSpec)  # type: ignore[attr-defined]
