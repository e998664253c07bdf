"""FullGrad (Srinivas & Fleuret, NeurIPS 2019, arXiv:1905.00780) as grad-cam 1.5.7's ``FullGrad``.

The saliency is the input-gradient term plus one bias-gradient term per convolution and BatchNorm of the
network (every one of them, ``target_layers`` is ignored as in grad-cam):

* input: ``|dy/dx * x|``, min-max scaled per image and input channel, summed over channels;
* each ``nnx.Conv`` with a bias and each BatchNorm with a bias (``flax.nnx.BatchNorm`` or
  :class:`flax_attn.layers.BatchNorm`): ``|b * dy/dz|`` with ``z`` the layer's output and ``b`` its bias
  (BatchNorm, in eval mode: ``beta - mean * gamma / sqrt(var + eps)``, grad-cam's ``get_bias_data``), min-max
  scaled per image and channel, resized to the input size, summed over channels;
* the terms are summed and min-max scaled (no ReLU: every term is non-negative).

Resizing is linear, so ``sum_c resize(m_c) = resize(sum_c m_c)``: we sum the scaled channel maps at the layer's
resolution and resize once per layer (grad-cam resizes every channel; only float rounding differs). Layers whose
output is not a spatial map (a BatchNorm on ``(B, C)`` features) are skipped, like grad-cam's type filter
(``Conv2d``/``BatchNorm2d`` only). Linen and ``(features, head)`` models are not supported: the bias layers are
found by walking the NNX module tree. ``eigen_smooth`` is not supported.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from flax_attn.cam.ablation import _call_jitted
from flax_attn.cam.api import BaseCAM
from flax_attn.cam.engine import CamResult, _default_target, _per_target, _scores, preflight
from flax_attn.cam.postprocess import resize_maps, scale_cam
from flax_attn.cam.taps import NNXTap, _resolve, nnx_module_paths
from flax_attn.cam.targets import PreparedTargets
from flax_attn.layers.norm import BatchNorm

__all__ = ["FullGrad", "bias_layers", "fullgrad"]

_BN_TYPES = (nnx.BatchNorm, BatchNorm)


def bias_layers(model: nnx.Module) -> list[str]:
    """Paths of the layers FullGrad uses: every ``nnx.Conv`` with a bias and every BatchNorm (``nnx.BatchNorm``,
    :class:`flax_attn.layers.BatchNorm`) with a bias, in module-tree order.

    Example:
        >>> from flax import nnx
        >>> m = nnx.Sequential(nnx.Conv(3, 4, (3, 3), rngs=nnx.Rngs(0)), nnx.Conv(4, 4, (1, 1), use_bias=False,
        ...                    rngs=nnx.Rngs(0)), nnx.BatchNorm(4, rngs=nnx.Rngs(0)))
        >>> bias_layers(m)
        ['0', '2']
    """
    if not isinstance(model, nnx.Module):
        raise TypeError(f"FullGrad: expected a flax.nnx.Module (its convolutions and BatchNorms are found by walking "
                        f"the module tree), got {type(model).__name__}")
    out = []
    for p in nnx_module_paths(model):
        obj = _resolve(model, p)[2]
        if isinstance(obj, (nnx.Conv, *_BN_TYPES)) and getattr(obj, "bias", None) is not None:
            out.append(p)
    return out


def _bias(layer: Any) -> jax.Array:
    """grad-cam's ``get_bias_data``: a conv's bias; a BatchNorm's ``beta - mean * gamma / sqrt(var + eps)``."""
    bias = layer.bias[...]
    if isinstance(layer, _BN_TYPES):
        gamma = layer.scale[...] if layer.scale is not None else jnp.ones_like(bias)
        return bias - layer.mean[...] * gamma / jnp.sqrt(layer.var[...] + layer.epsilon)
    return bias


def _scaled_sum(m: jax.Array, size: tuple[int, ...]) -> jax.Array:
    """``(B, *spatial, C)`` -> per-(image, channel) min-max over space, summed over channels, resized: ``(B, *size)``."""
    spatial = m.ndim - 2
    per_channel = scale_cam(jnp.moveaxis(m, -1, 1), spatial_ndim=spatial)  # (B, C, *spatial)
    return resize_maps(jnp.sum(per_channel, axis=1), size)


def _fullgrad_prepared(model: nnx.Module, paths: list[str], x: jax.Array, prepared: PreparedTargets, *,
                       eval_mode: bool = True, call: Callable | None = None) -> CamResult:
    target, grid, _, has_t = prepared
    tap = NNXTap(model, paths, eval_mode=eval_mode, call=call)
    shapes = jax.eval_shape(lambda: tap.run(x))[1]
    keep = [i for i, s in enumerate(shapes) if len(s.shape) == x.ndim]
    work = nnx.merge(*nnx.split(model))
    if eval_mode:
        work.eval()
    biases = [_bias(_resolve(work, paths[i])[2]) for i in keep]
    zeros = [jnp.zeros(s.shape, s.dtype) for s in shapes]
    output, vjp_fn = jax.vjp(lambda xx, probes: tap.run(xx, probes)[0], x, zeros)
    if target is None and grid is None:
        target, _, _ = _default_target(jax.lax.stop_gradient(output)).broadcast(x.shape[0])

    def grads_for(tcol):
        ct, s = jax.grad(lambda o: (jnp.sum(sc := _scores(tcol, o)), sc), has_aux=True)(output)
        gx, gp = vjp_fn(ct)
        return gx, [gp[i] for i in keep], s

    gx, gps, scores = _per_target(grads_for, target, grid)  # (T, B, ...)
    size = x.shape[1:-1]
    total = jax.vmap(lambda g: _scaled_sum(jnp.abs(g * x), size))(gx)  # (T, B, *size)
    for b, g in zip(biases, gps):
        total = total + jax.vmap(lambda g1, b=b: _scaled_sum(jnp.abs(g1 * b.astype(g1.dtype)), size))(g)
    total = jnp.moveaxis(total, 0, 1)  # (B, T, *size)
    poison = jnp.where(jnp.isnan(jnp.moveaxis(scores, 0, 1)), jnp.nan, 0.0)
    total = total + poison.reshape(poison.shape + (1,) * len(size)).astype(total.dtype)
    cam = scale_cam(total, spatial_ndim=len(size))
    if not has_t:
        cam, total = cam[:, 0], total[:, 0]
    return CamResult(cam, [total], output)


def fullgrad(model: nnx.Module, x: jax.Array, targets: Any = None) -> CamResult:
    """Functional FullGrad on an NNX model (traceable; use it inside your own ``jax.jit``). See the module
    docstring. ``raw`` holds the summed saliency before the final min-max.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from flax import nnx
        >>> m = nnx.Sequential(nnx.Conv(3, 4, (3, 3), rngs=nnx.Rngs(0)), lambda a: jax.nn.relu(a).mean((1, 2)))
        >>> fullgrad(m, jax.random.normal(jax.random.key(0), (2, 8, 8, 3)), [0, 3]).cam.shape
        (2, 8, 8)
    """
    paths = _checked_bias_layers(model)
    tap = NNXTap(model, paths)
    x, prepared = preflight(tap, x, targets)
    return _fullgrad_prepared(model, paths, x, prepared)


def _checked_bias_layers(model: Any) -> list[str]:
    paths = bias_layers(model)
    if not paths:
        raise ValueError(f"FullGrad: {type(model).__name__} has no convolution or BatchNorm with a bias (nnx.Conv "
                         "with use_bias=True, nnx.BatchNorm / flax_attn.layers.BatchNorm with use_bias=True): "
                         "FullGrad's bias-gradient terms would be empty")
    return paths


class FullGrad(BaseCAM):
    """FullGrad as grad-cam 1.5.7's ``FullGrad(model, target_layers=[])``: every conv/BatchNorm bias of an NNX
    model (see the module docstring); ``target_layers`` is ignored (a warning if non-empty, as grad-cam).
    Call: ``cam(x, targets=None, *, return_raw=False)``, jitted; returns ``(B, H, W)`` (``(B, T, H, W)`` for 2-D
    targets).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from flax import nnx
        >>> m = nnx.Sequential(nnx.Conv(3, 4, (3, 3), rngs=nnx.Rngs(0)), lambda a: jax.nn.relu(a).mean((1, 2)))
        >>> FullGrad(m, target_layers=[])(jax.random.normal(jax.random.key(0), (2, 8, 8, 3)), [0, 3]).shape
        (2, 8, 8)
    """

    method_name = "gradcam"  # BaseCAM's registry lookup; FullGrad runs its own pipeline

    def __init__(self, model: Any, target_layers: Any = None, *, reshape_transform: Callable | None = None,
                 call: Callable | None = None, eval_mode: bool = True):
        if target_layers:
            warnings.warn("FullGrad: target_layers is ignored; all bias layers are used instead", stacklevel=2)
        if reshape_transform is not None:
            raise ValueError("FullGrad: reshape_transform is not supported")
        self.bias_paths = _checked_bias_layers(model)
        super().__init__(model, self.bias_paths, call=call, eval_mode=eval_mode)

    def __call__(self, input_tensor: jax.Array, targets: Any = None, *, aug_smooth: bool = False,
                 eigen_smooth: bool = False, return_raw: bool = False,
                 key: jax.Array | None = None) -> jax.Array | CamResult:
        if aug_smooth or eigen_smooth:
            raise ValueError("FullGrad: aug_smooth and eigen_smooth are not supported")
        paths, call, eval_mode = list(self.bias_paths), self.tap.call, self.tap.eval_mode  # type: ignore[attr-defined]

        def impl(tap, x, prepared):
            model = nnx.merge(tap.static.graphdef, tap.state)
            return _fullgrad_prepared(model, paths, x, prepared, eval_mode=eval_mode, call=call)

        return _call_jitted(self, "fullgrad", (tuple(paths),), input_tensor, targets, impl, return_raw)

    def __repr__(self) -> str:
        return f"FullGrad({len(self.bias_paths)} bias layers)"
