"""Linen twin of :class:`flax_attn.layers.BatchNorm` (PyTorch-semantics BatchNorm)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from flax_attn.layers import _functional as F
from flax_attn.layers._functional import Dtype


class BatchNorm(nn.Module):
    """BatchNorm over the last axis with PyTorch semantics; the Linen twin of :class:`flax_attn.layers.BatchNorm`.

    Same options, same variables (``params``: ``scale``, ``bias``; ``batch_stats``: ``mean``, ``var``,
    ``num_batches_tracked`` int32) and the same arithmetic (running variance updated with the unbiased
    batch variance, Flax momentum convention: torch ``m`` is ``1 - m`` here).

    Mode: ``use_running_average`` (attribute, default ``False`` = training mode, as the NNX module after
    construction), overridden by the call argument of the same name. In training mode the statistics are
    updated, so apply with ``mutable=["batch_stats"]``; they are not updated by ``init``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> bn = BatchNorm(8)
        >>> x = jax.random.normal(jax.random.key(0), (2, 4, 4, 8))
        >>> v = bn.init(jax.random.key(1), x)
        >>> y, upd = bn.apply(v, x, mutable=["batch_stats"])
        >>> int(upd["batch_stats"]["num_batches_tracked"])
        1
    """

    num_features: int
    momentum: float = 0.9
    epsilon: float = 1e-5
    use_running_average: bool = False
    use_scale: bool = True
    use_bias: bool = True
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    def __post_init__(self) -> None:
        if self.num_features < 1:
            raise ValueError(f"num_features must be >= 1, got {self.num_features}")
        if not 0.0 <= self.momentum <= 1.0:
            raise ValueError(
                f"momentum must be in [0, 1] (Flax convention: torch momentum m is 1 - m here), got {self.momentum}"
            )
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
        c = self.num_features
        if x.ndim < 2 or x.shape[-1] != c:
            raise ValueError(
                f"BatchNorm({c}) expects channels-last input with {c} channels, got shape {tuple(x.shape)}"
            )
        scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype) if self.use_scale else None
        bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype) if self.use_bias else None
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        nbt = self.variable("batch_stats", "num_batches_tracked", lambda: jnp.zeros((), jnp.int32))
        use_ra = self.use_running_average if use_running_average is None else use_running_average
        dtype = self.dtype or jnp.result_type(x, *(p for p in (scale, bias) if p is not None))
        if use_ra:
            mean, var = ra_mean.value, ra_var.value
        else:
            mean, var, n = F.train_statistics(x)
            if not self.is_initializing():
                ra_mean.value, ra_var.value = F.updated_running_stats(
                    ra_mean.value, ra_var.value, mean, var, n, self.momentum)
                nbt.value = nbt.value + 1
        scale = scale.astype(dtype) if scale is not None else None
        bias = bias.astype(dtype) if bias is not None else None
        return F.normalize(x.astype(dtype), mean.astype(dtype), var.astype(dtype), scale, bias, self.epsilon)
