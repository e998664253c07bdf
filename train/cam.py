"""CAM figures and the CAM localisation score (pointing game, energy in box).

Grad-CAM (Selvaraju et al., 2017) of the ``layer4`` output, from :mod:`flax_attn.cam` (pytorch-grad-cam's
pipeline: ReLU, per-image min-max, resize to the input size).
"""

from __future__ import annotations

import os

import jax
import numpy as np
from flax import nnx

from flax_attn.cam import compute_cam, make_tap, show_cam_on_image


def grad_cam(model: nnx.Module, x: jax.Array, targets: jax.Array | None = None, *,
             layer: str = "layer4") -> tuple[jax.Array, jax.Array]:
    """Grad-CAM maps ``(B, H, W)`` in [0, 1] of ``layer`` for class ``targets`` (default: the predicted class)
    and the logits, computed by :func:`flax_attn.cam.compute_cam` (traceable: call it inside ``jax.jit``)."""
    res = compute_cam(make_tap(model, [layer]), x, targets, method="gradcam")
    return res.cam, res.output


def localisation_scores(cams: np.ndarray, boxes: np.ndarray) -> dict[str, float]:
    """Pointing game (fraction of maps whose maximum lies in the box) and mean fraction of CAM energy in the box.

    ``cams (N, H, W)`` non-negative, ``boxes (N, 4)`` ``(top, left, bottom, right)``, exclusive end. Also returns
    the chance levels of both (a uniform random point / a uniform map: the mean box area fraction).
    """
    cams = np.asarray(cams, np.float64)
    n, h, w = cams.shape
    rows = np.arange(h)[None, :, None]
    cols = np.arange(w)[None, None, :]
    b = np.asarray(boxes)
    inside = ((rows >= b[:, 0, None, None]) & (rows < b[:, 2, None, None])
              & (cols >= b[:, 1, None, None]) & (cols < b[:, 3, None, None]))
    flat = cams.reshape(n, -1).argmax(1)
    hit = inside.reshape(n, -1)[np.arange(n), flat]
    total = cams.reshape(n, -1).sum(1)
    energy = np.where(total > 0, (cams * inside).reshape(n, -1).sum(1) / np.maximum(total, 1e-12), 0.0)
    area = inside.reshape(n, -1).mean(1)
    return {"pointing_game": float(hit.mean()), "energy_in_box": float(energy.mean()),
            "box_area_fraction": float(area.mean())}


def overlay(img: np.ndarray, cam: np.ndarray) -> np.ndarray:
    """A jet-coloured CAM blended on an image in [0, 1] (:func:`flax_attn.cam.show_cam_on_image`), uint8 RGB."""
    rgb = np.repeat(img, 3, -1) if img.shape[-1] == 1 else img[..., :3]
    return np.asarray(show_cam_on_image(np.clip(rgb, 0, 1), np.clip(cam, 0, 1), use_rgb=True))


def save_cam_grid(path: str, rows: list[tuple[str, np.ndarray, np.ndarray]], images: np.ndarray,
                  labels: np.ndarray, class_names: tuple[str, ...], boxes: np.ndarray | None = None) -> str:
    """A PNG grid: first row the validation images (with the ground-truth box), then one row per model:
    the Grad-CAM overlay of its predicted class, titled with the prediction.

    ``rows``: ``(name, cams (N, H, W), predictions (N,))`` per model.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    n = images.shape[0]
    fig, axes = plt.subplots(1 + len(rows), n, figsize=(1.6 * n, 1.75 * (1 + len(rows))), squeeze=False)
    for j in range(n):
        ax = axes[0, j]
        img = images[j]
        ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1)
        ax.set_title(f"true {class_names[labels[j]]}", fontsize=8)
        for r, (name, cams, preds) in enumerate(rows, start=1):
            a = axes[r, j]
            a.imshow(overlay(img, cams[j]))
            ok = preds[j] == labels[j]
            a.set_title(f"pred {class_names[preds[j]]}", fontsize=8, color="black" if ok else "red")
            y, x = np.unravel_index(np.argmax(cams[j]), cams[j].shape)
            a.plot([x], [y], "w+", markersize=6)
            if j == 0:
                a.set_ylabel(name, fontsize=9)
        if boxes is not None:
            top, left, bottom, right = boxes[j]
            for r in range(1 + len(rows)):
                axes[r, j].add_patch(Rectangle((left - 0.5, top - 0.5), right - left, bottom - top,
                                               fill=False, ec="lime", lw=1))
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
