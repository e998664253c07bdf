"""Post-processing shared by every CAM method: ReLU, min-max scaling, resizing, layer aggregation, and the
first-principal-component projection used by EigenCAM and ``eigen_smooth``.

All functions work on channels-last maps with arbitrary leading (batch / target) axes and are traceable
under :func:`jax.jit`, :func:`jax.vmap` and :func:`jax.grad`. They reproduce ``pytorch_grad_cam`` 1.5.7's
``scale_cam_image``, ``aggregate_multi_layers`` and ``get_2d_projection`` numerically.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

__all__ = [
    "MINMAX_EPS",
    "aggregate_layers",
    "first_component_projection",
    "resize_maps",
    "scale_cam",
]

#: grad-cam's epsilon in ``scale_cam_image``: ``(m - min) / (1e-7 + max(m - min))``.
MINMAX_EPS = 1e-7


def scale_cam(cam: jax.Array, *, spatial_ndim: int = 2) -> jax.Array:
    """Per-map min-max scaling as grad-cam's ``scale_cam_image`` (without its resize).

    ``cam`` has shape ``(..., *spatial)`` with ``spatial_ndim`` trailing spatial axes; every map is shifted
    by its minimum and divided by ``1e-7 + max``. A constant map becomes all zeros, never NaN.

    Example:
        >>> import jax.numpy as jnp
        >>> scale_cam(jnp.array([[[1.0, 2.0, 3.0]]])).tolist()
        [[[0.0, 0.5, 1.0]]]
    """
    axes = tuple(range(cam.ndim - spatial_ndim, cam.ndim))
    cam = cam - jnp.min(cam, axis=axes, keepdims=True)
    return cam / (MINMAX_EPS + jnp.max(cam, axis=axes, keepdims=True))


def resize_maps(cam: jax.Array, size: Sequence[int]) -> jax.Array:
    """Bilinear resize of the trailing spatial axes of ``cam`` to ``size`` (``(H, W)`` or ``(H, W, D)``).

    Uses half-pixel centres without antialiasing, which is what ``cv2.resize(..., INTER_LINEAR)`` does when
    upsampling (grad-cam's resize); maps that already have the requested size are returned unchanged.

    Example:
        >>> import jax.numpy as jnp
        >>> resize_maps(jnp.ones((2, 3, 4)), (6, 8)).shape
        (2, 6, 8)
    """
    size = tuple(int(s) for s in size)
    spatial = cam.shape[cam.ndim - len(size):]
    if spatial == size:
        return cam
    return jax.image.resize(cam, cam.shape[: cam.ndim - len(size)] + size, method="linear", antialias=False)


def aggregate_layers(per_layer: Sequence[jax.Array], *, spatial_ndim: int = 2) -> jax.Array:
    """grad-cam's ``aggregate_multi_layers``: ``scale(mean_l(max(cam_l, 0)))`` over already scaled maps.

    Example:
        >>> import jax.numpy as jnp
        >>> aggregate_layers([jnp.zeros((1, 2, 2)), jnp.ones((1, 2, 2))]).shape
        (1, 2, 2)
    """
    stacked = jnp.maximum(jnp.stack(list(per_layer), axis=0), 0)
    return scale_cam(jnp.mean(stacked, axis=0), spatial_ndim=spatial_ndim)


def first_component_projection(a: jax.Array) -> jax.Array:
    """Projection of a channels-last map on its first principal component (grad-cam's ``get_2d_projection``).

    ``a`` has shape ``(*spatial, C)`` (one example): NaNs are zeroed, the ``(N, C)`` matrix of positions is
    centred over positions, and projected on the first right singular vector ``v``. The sign of a singular
    vector is arbitrary (numpy returns whatever LAPACK does); we make it deterministic on every backend by
    choosing the sign with ``sum(v) >= 0``: positions whose channels fire above average project positively.
    Use :func:`jax.vmap` for batches.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> first_component_projection(jax.random.normal(jax.random.key(0), (5, 6, 8))).shape
        (5, 6)
    """
    a = jnp.where(jnp.isnan(a), 0, a)
    spatial = a.shape[:-1]
    flat = a.reshape(-1, a.shape[-1])
    flat = flat - jnp.mean(flat, axis=0)
    _, _, vt = jnp.linalg.svd(flat, full_matrices=False)
    v = vt[0]
    sign = jnp.where(jnp.sum(v) >= 0, 1.0, -1.0).astype(v.dtype)
    return (flat @ (v * sign)).reshape(spatial)
