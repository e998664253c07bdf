"""Squeeze-and-Excitation.

Hu et al., "Squeeze-and-Excitation Networks", CVPR 2018 / TPAMI 2019.
"""

from __future__ import annotations

from flax_attn.layers.channel_attn import ChannelAttention
from flax_attn.layers.specs import SESpec, options_signature


class SqueezeExcite(ChannelAttention):
    """Squeeze-and-Excitation: ``y = x * sigmoid(fc2(relu(fc1(mean(x)))))``.

    The squeeze is a global average pool over the spatial axes of a channels-last map, the excitation a
    bottleneck MLP of width ``C // reduction`` (paper: ``r = 16``, FC layers with bias, ReLU, sigmoid).
    SE is the single-pool case of :class:`ChannelAttention`: its spec is
    :class:`~flax_attn.layers.specs.SESpec` (a ``ChannelSpec`` with ``pool_types=("avg",)``), so every
    option of that class applies (``pool_types`` included: ``("avg", "max")`` turns it into CBAM's channel
    module) and the parameter tree is the same: ``fc1.kernel``, ``fc1.bias``, ``fc2.kernel``, ``fc2.bias``.

    Presets reproduce other implementations exactly (``create_attn("se_classic", C)`` is the source
    article's bias-free ``SELayer``, ``"se_torchvision"``, ``"se_timm"``, ``"se_mobilenetv3"``...), see
    :func:`flax_attn.layers.create_attn`.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> se = SqueezeExcite(64, reduction=16, rngs=nnx.Rngs(0))
        >>> se(jnp.ones((2, 7, 9, 64))).shape, se.spec.pool_types
        ((2, 7, 9, 64), ('avg',))
    """

    Spec = SESpec


SqueezeExcite.__signature__ = options_signature(ChannelAttention.__init__, SESpec)  # type: ignore[attr-defined]
