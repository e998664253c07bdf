"""BatchNorm with PyTorch semantics, so BatchNorm statistics match ``torch.nn.BatchNorm*d`` bit for bit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from flax_attn.layers import _functional as F
from flax_attn.layers._functional import Dtype


class BatchNorm(nnx.Module):
    """Batch normalisation over the last (channel) axis that behaves like ``torch.nn.BatchNorm{1,2,3}d``.

    Differences from :class:`flax.nnx.BatchNorm`, each needed for parity with PyTorch:

    * in training mode the running variance is updated with the *unbiased* batch variance
      (``var * n / (n - 1)``, ``n`` = elements per channel) while the input is normalised with the
      biased one, exactly as PyTorch does; Flax uses the biased variance for both;
    * ``num_batches_tracked`` is kept (an int32 :class:`nnx.BatchStat`, incremented per training call)
      so that a PyTorch ``state_dict`` round-trips through Flax bit for bit;
    * variance is computed in two passes (``mean((x - mean)**2)``), never as ``E[x^2] - E[x]^2``.

    ``momentum`` uses the Flax convention: ``running = momentum * running + (1 - momentum) * batch``.
    PyTorch's ``momentum=m`` is ``momentum=1 - m`` here (torch default 0.1 -> 0.9, the default).
    Parameter names: ``scale``, ``bias``; statistics: ``mean``, ``var``, ``num_batches_tracked``.

    Mode follows ``use_running_average``, set by ``model.train()`` / ``model.eval()``.

    Example:
        >>> from flax import nnx
        >>> import jax.numpy as jnp
        >>> bn = BatchNorm(8, rngs=nnx.Rngs(0))
        >>> bn(jnp.ones((2, 4, 4, 8))).shape
        (2, 4, 4, 8)
    """

    def __init__(
        self,
        num_features: int,
        *,
        momentum: float = 0.9,
        epsilon: float = 1e-5,
        use_running_average: bool = False,
        use_scale: bool = True,
        use_bias: bool = True,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs | None = None,
    ):
        if num_features < 1:
            raise ValueError(f"num_features must be >= 1, got {num_features}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(
                f"momentum must be in [0, 1] (Flax convention: torch momentum m is 1 - m here), got {momentum}"
            )
        self.num_features = num_features
        self.momentum = momentum
        self.epsilon = epsilon
        self.use_running_average = use_running_average
        self.dtype = dtype
        self.scale = nnx.Param(jnp.ones((num_features,), param_dtype)) if use_scale else None
        self.bias = nnx.Param(jnp.zeros((num_features,), param_dtype)) if use_bias else None
        self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))
        self.num_batches_tracked = nnx.BatchStat(jnp.zeros((), jnp.int32))

    def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
        if x.ndim < 2 or x.shape[-1] != self.num_features:
            raise ValueError(
                f"BatchNorm({self.num_features}) expects channels-last input with {self.num_features} "
                f"channels, got shape {tuple(x.shape)}"
            )
        use_ra = self.use_running_average if use_running_average is None else use_running_average
        dtype = self.dtype or jnp.result_type(x, *(p[...] for p in (self.scale, self.bias) if p is not None))
        if use_ra:
            mean, var = self.mean[...], self.var[...]
        else:
            mean, var, n = F.train_statistics(x)
            self.mean[...], self.var[...] = F.updated_running_stats(
                self.mean[...], self.var[...], mean, var, n, self.momentum)
            self.num_batches_tracked[...] = self.num_batches_tracked[...] + 1
        scale = self.scale[...].astype(dtype) if self.scale is not None else None
        bias = self.bias[...].astype(dtype) if self.bias is not None else None
        return F.normalize(x.astype(dtype), mean.astype(dtype), var.astype(dtype), scale, bias, self.epsilon)
