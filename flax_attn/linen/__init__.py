"""Linen twins of the attention blocks: same names, options, parameter trees and arithmetic as NNX.

``SqueezeExcite``, ``ChannelAttention``, ``SpatialAttention``, ``CBAM`` and the PyTorch-semantics
``BatchNorm`` are ``flax.linen`` modules whose variables are exactly those of the NNX blocks of
:mod:`flax_attn.layers` (``params``: ``fc1``/``fc2``/``conv``/``bn``/``compress``; ``batch_stats``:
``bn.mean``/``bn.var``/``bn.num_batches_tracked``) and whose math is the shared
:mod:`flax_attn.layers._functional`, so NNX and Linen produce identical outputs from identical
parameters.

Train/eval: blocks take a ``train`` call argument (``True``: batch statistics, updated in
``batch_stats``, so apply with ``mutable=["batch_stats"]``; ``False``: running statistics); without it
the ``use_running_average`` attribute decides (default ``False``, training mode, as a fresh NNX block).
``BatchNorm`` takes ``use_running_average`` (attribute or call argument), like its NNX twin.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax_attn import linen as fal
    >>> cbam = fal.create_attn("cbam_official", 64)
    >>> x = jax.random.normal(jax.random.key(0), (2, 7, 9, 64))
    >>> v = cbam.init(jax.random.key(1), x, train=False)
    >>> y, upd = cbam.apply(v, x, train=True, mutable=["batch_stats"])
    >>> y.shape
    (2, 7, 9, 64)
"""

from flax_attn.convert import linen_variables_to_nnx, nnx_to_linen_variables  # re-exported: they live in convert
from flax_attn.linen.cbam import CBAM
from flax_attn.linen.channel_attn import ChannelAttention, SqueezeExcite
from flax_attn.linen.norm import BatchNorm
from flax_attn.linen.registry import create_attn, from_nnx
from flax_attn.linen.spatial_attn import SpatialAttention

__all__ = [
    "CBAM",
    "BatchNorm",
    "ChannelAttention",
    "SpatialAttention",
    "SqueezeExcite",
    "create_attn",
    "from_nnx",
    "linen_variables_to_nnx",
    "nnx_to_linen_variables",
]
