"""Overlays: ``show_cam_on_image`` with grad-cam's formula, and a matplotlib grid of images x targets."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["jet_colormap", "plot_cam_grid", "show_cam_on_image"]

COLORMAP_JET = 2  # cv2.COLORMAP_JET, accepted for grad-cam compatibility


def jet_colormap() -> np.ndarray:
    """The 256-entry JET colour table of OpenCV's ``COLORMAP_JET`` as ``(256, 3)`` uint8 RGB.

    Piecewise linear with slope 4 per entry (GNU Octave's ``jet`` resampled to 256 levels); OpenCV's own
    table differs from the exact ramps only at entry 159 (blue 1 instead of 2, its interpolation rounding),
    reproduced here so overlays match ``cv2.applyColorMap`` exactly.

    Example:
        >>> jet_colormap()[[0, 128, 255]].tolist()
        [[0, 0, 128], [130, 255, 126], [128, 0, 0]]
    """
    i = np.arange(256)
    r = np.clip(np.minimum(4 * i - 382, 1148 - 4 * i), 0, 255)
    g = np.clip(np.minimum(4 * i - 128, 892 - 4 * i), 0, 255)
    b = np.clip(np.minimum(4 * i + 128, 638 - 4 * i), 0, 255)
    b[159] = 1
    return np.stack([r, g, b], axis=1).astype(np.uint8)


def _to_uint8(v: Any, xp: Any) -> Any:
    # np.uint8(float) truncates toward zero; inputs here are in [0, 255]
    return xp.floor(xp.clip(v, 0, 255)).astype(xp.uint8)


def show_cam_on_image(img: Any, mask: Any, use_rgb: bool = False, colormap: Any = "jet",
                      image_weight: float = 0.5) -> np.ndarray:
    """Overlay a CAM on an image with grad-cam's ``show_cam_on_image`` formula, batched; a NumPy ``uint8`` image.

    ``heat = JET[uint8(255 * mask)] / 255`` (BGR unless ``use_rgb``), ``cam = (1 - w) * heat + w * img``,
    ``uint8(255 * cam / max(cam))``. ``img``: float in [0, 1], ``(..., H, W, 3)``; ``mask``: ``(..., H, W)``
    in [0, 1] (NumPy or JAX arrays). ``colormap``: ``"jet"``/``2`` (``cv2.COLORMAP_JET``) or your own
    ``(256, 3)`` uint8 RGB table. Returns a host ``np.ndarray`` of dtype uint8 ``(..., H, W, 3)`` (the max
    is taken per image), as grad-cam does, ready for ``PIL.Image.fromarray`` or ``cv2.imencode``. Inside
    ``jax.jit`` (traced inputs) the same formula is traced and a ``jax.Array`` comes back.

    Example:
        >>> import numpy as np
        >>> show_cam_on_image(np.full((4, 4, 3), 0.5), np.zeros((4, 4)), use_rgb=True)[0, 0].tolist()
        [127, 127, 255]
    """
    traced = isinstance(img, jax.core.Tracer) or isinstance(mask, jax.core.Tracer)
    xp: Any = jnp if traced else np
    img = xp.asarray(img, xp.float32)
    mask = xp.asarray(mask, xp.float32)
    if img.ndim < 3 or img.shape[-1] != 3:
        raise ValueError(f"img: expected (..., H, W, 3) floats in [0, 1], got shape {img.shape}")
    try:
        shape = np.broadcast_shapes(img.shape[:-1], mask.shape)
    except ValueError:
        raise ValueError(f"mask: expected shape {img.shape[:-1]} (img without its colour axis), got {mask.shape}") from None
    img, mask = xp.broadcast_to(img, shape + (3,)), xp.broadcast_to(mask, shape)
    if not 0.0 <= float(image_weight) <= 1.0:
        raise ValueError(f"image_weight should be in the range [0, 1], got {image_weight}")
    if not traced and img.size and float(np.max(img)) > 1:
        raise ValueError(f"img: expected np.float32 values in the range [0, 1], got max {float(np.max(img))}")
    if (isinstance(colormap, str) and colormap.lower() == "jet") or (isinstance(colormap, int) and colormap == 2):
        lut = jet_colormap()
    else:
        lut = np.asarray(colormap)
        if lut.shape != (256, 3):
            raise ValueError(f"colormap: expected 'jet', 2 (cv2.COLORMAP_JET) or a (256, 3) RGB table, got {colormap!r}")
    lut = xp.asarray(lut if use_rgb else lut[:, ::-1])
    heat = lut[_to_uint8(255 * mask, xp).astype(xp.int32)].astype(xp.float32) / 255
    w = float(image_weight)  # a Python scalar, as grad-cam: the arithmetic stays float32
    cam = (1 - w) * heat + w * img
    cam = cam / xp.max(cam, axis=(-3, -2, -1), keepdims=True)
    return _to_uint8(255 * cam, xp)


def plot_cam_grid(images: Any, cams: Any, *, row_titles: Sequence[str] | None = None,
                  col_titles: Sequence[str] | None = None, image_weight: float = 0.5,
                  cell_size: float = 2.2) -> Any:
    """A matplotlib figure: one row per image, the image then one overlay per target.

    ``images``: ``(B, H, W, 3)`` floats in [0, 1]; ``cams``: ``(B, H, W)`` or ``(B, T, H, W)``.

    Example:
        >>> import numpy as np
        >>> fig = plot_cam_grid(np.random.rand(2, 8, 8, 3), np.random.rand(2, 3, 8, 8))
        >>> len(fig.axes)
        8
    """
    import matplotlib.pyplot as plt

    images = np.asarray(images, np.float32)
    cams = np.asarray(cams, np.float32)
    if cams.ndim == 3:
        cams = cams[:, None]
    if images.ndim != 4 or cams.ndim != 4 or cams.shape[0] != images.shape[0] or cams.shape[2:] != images.shape[1:3]:
        raise ValueError(f"expected images (B, H, W, 3) and cams (B, [T,] H, W) of the same B, H, W; got "
                         f"{images.shape} and {cams.shape}")
    b, t = cams.shape[:2]
    overlays = show_cam_on_image(images[:, None], cams, use_rgb=True, image_weight=image_weight)
    fig, axes = plt.subplots(b, t + 1, figsize=(cell_size * (t + 1), cell_size * b), squeeze=False)
    for i in range(b):
        axes[i, 0].imshow(images[i])
        if row_titles is not None:
            axes[i, 0].set_ylabel(row_titles[i])
        for j in range(t):
            axes[i, j + 1].imshow(overlays[i, j])
            if i == 0 and col_titles is not None:
                axes[0, j + 1].set_title(col_titles[j])
    if col_titles is not None and len(col_titles) == t + 1:
        for j, title in enumerate(col_titles):
            axes[0, j].set_title(title)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return fig
