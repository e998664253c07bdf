"""YOLOv5 pre- and post-processing in JAX: letterbox, box mapping, ``xywh2xyxy``, jit-able NMS.

* :func:`letterbox` resizes keeping the aspect ratio and pads with grey 114 to a stride multiple, the
  arithmetic of YOLOv5's ``utils.augmentations.letterbox`` (``auto=True`` by default: the minimum
  rectangle); the bilinear resize has cv2's ``INTER_LINEAR`` geometry (half-pixel centres, no
  antialiasing), so a uint8 image agrees with the package's within 1 grey level (cv2 interpolates uint8 in
  11-bit fixed point, we in float32 and round).
* :func:`scale_boxes` maps xyxy boxes from the letterboxed image back to the original one (YOLOv5's
  ``scale_boxes``, clipping included); :func:`letterbox_boxes` is its inverse (original -> letterboxed).
* :func:`nms` is class-aware greedy NMS (``torchvision.ops.batched_nms`` semantics: a box is suppressed
  by a higher-scoring kept box of the same class with IoU ``>`` the threshold) with a static output size
  and a validity mask, traceable under ``jax.jit`` and ``vmap``; :func:`non_max_suppression` is YOLOv5's
  post-processing (objectness filter, ``score = obj * cls``, best class per box, NMS, ``max_det``) on the
  model's decoded output ``(B, N, 5 + nc)``.

Shapes are static: a new image shape or a new ``max_det`` / ``max_candidates`` recompiles.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


def _pair(v: Any, name: str) -> tuple[int, int]:
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        return int(v), int(v)
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(u, (int, np.integer)) for u in v):
        return int(v[0]), int(v[1])
    raise TypeError(f"{name} must be an int or a (height, width) pair of ints, got {v!r}")


# ------------------------------------------------------------------------------------------------ boxes
def xywh2xyxy(x: jax.Array) -> jax.Array:
    """``(..., 4)`` centre/size boxes ``(x, y, w, h)`` -> corners ``(x1, y1, x2, y2)``.

    Example:
        >>> xywh2xyxy(jnp.array([[10.0, 20.0, 4.0, 6.0]])).tolist()
        [[8.0, 17.0, 12.0, 23.0]]
    """
    x = jnp.asarray(x)
    if x.shape[-1:] != (4,):
        raise ValueError(f"xywh2xyxy: expected boxes of shape (..., 4), got {tuple(x.shape)}")
    xy, wh = x[..., :2], x[..., 2:4] / 2
    return jnp.concatenate([xy - wh, xy + wh], axis=-1)


def xyxy2xywh(x: jax.Array) -> jax.Array:
    """``(..., 4)`` corners -> centre/size (the inverse of :func:`xywh2xyxy`).

    Example:
        >>> xyxy2xywh(jnp.array([8.0, 17.0, 12.0, 23.0])).tolist()
        [10.0, 20.0, 4.0, 6.0]
    """
    x = jnp.asarray(x)
    if x.shape[-1:] != (4,):
        raise ValueError(f"xyxy2xywh: expected boxes of shape (..., 4), got {tuple(x.shape)}")
    return jnp.concatenate([(x[..., :2] + x[..., 2:4]) / 2, x[..., 2:4] - x[..., :2]], axis=-1)


def box_iou(a: jax.Array, b: jax.Array) -> jax.Array:
    """IoU of xyxy boxes, broadcasting over leading axes (``(..., 4)``, ``(..., 4)`` -> ``(...)``)."""
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    lt = jnp.maximum(a[..., :2], b[..., :2])
    rb = jnp.minimum(a[..., 2:4], b[..., 2:4])
    wh = jnp.clip(rb - lt, 0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area_a + area_b - inter)


# -------------------------------------------------------------------------------------------- letterbox
class LetterboxParams(NamedTuple):
    """Static geometry of a letterbox: the resized size ``(h, w)``, the pads, the ratio (``(r, r)`` unless
    ``scale_fill``) and YOLOv5's ``(dw, dh)`` (half the total padding, possibly ``x.5``)."""

    new_unpad: tuple[int, int]
    top: int
    bottom: int
    left: int
    right: int
    ratio: tuple[float, float]
    pad: tuple[float, float]

    @property
    def shape(self) -> tuple[int, int]:
        """The letterboxed image's ``(height, width)``."""
        return (self.new_unpad[0] + self.top + self.bottom, self.new_unpad[1] + self.left + self.right)


def letterbox_params(shape: tuple[int, int], new_shape: int | tuple[int, int] = 640, *, auto: bool = True,
                     scale_fill: bool = False, scaleup: bool = True, stride: int = 32) -> LetterboxParams:
    """The letterbox geometry of an image of ``shape = (height, width)``, YOLOv5's arithmetic.

    Example:
        >>> p = letterbox_params((480, 640), 640)
        >>> p.shape, p.ratio, p.pad
        ((480, 640), (1.0, 1.0), (0.0, 0.0))
    """
    h0, w0 = _pair(tuple(shape), "shape")
    nh, nw = _pair(new_shape, "new_shape")
    if min(h0, w0, nh, nw) <= 0:
        raise ValueError(f"letterbox: image shape {(h0, w0)} and new_shape {(nh, nw)} must be positive")
    if not isinstance(stride, int) or stride <= 0:
        raise ValueError(f"letterbox: stride must be a positive int, got {stride!r}")
    r = min(nh / h0, nw / w0)
    if not scaleup:
        r = min(r, 1.0)
    ratio = (r, r)
    unpad_w, unpad_h = int(round(w0 * r)), int(round(h0 * r))
    dw, dh = nw - unpad_w, nh - unpad_h
    if auto:
        dw, dh = dw % stride, dh % stride
    elif scale_fill:
        dw, dh = 0, 0
        unpad_w, unpad_h = nw, nh
        ratio = (nw / w0, nh / h0)
    half_w, half_h = dw / 2, dh / 2
    top, bottom = int(round(half_h - 0.1)), int(round(half_h + 0.1))
    left, right = int(round(half_w - 0.1)), int(round(half_w + 0.1))
    return LetterboxParams((unpad_h, unpad_w), top, bottom, left, right, ratio, (half_w, half_h))


def _resize_linear(img: jax.Array, out_h: int, out_w: int) -> jax.Array:
    """cv2 ``INTER_LINEAR`` geometry (half-pixel centres, edge clamp, no antialias), float math, ``(..., H, W, C)``."""
    h, w = img.shape[-3], img.shape[-2]

    def axis(n_in: int, n_out: int):
        src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
        src = np.maximum(src, 0.0)  # cv2 clamps the left edge to the first pixel
        i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        frac = (src - i0).astype(np.float32)
        return i0, i1, frac

    y0, y1, fy = axis(h, out_h)
    x0, x1, fx = axis(w, out_w)
    f = img.astype(jnp.float32)
    top = jnp.take(f, y0, axis=-3)
    bot = jnp.take(f, y1, axis=-3)
    fy = jnp.asarray(fy)[:, None, None]
    rows = top + (bot - top) * fy
    left = jnp.take(rows, x0, axis=-2)
    right = jnp.take(rows, x1, axis=-2)
    return left + (right - left) * jnp.asarray(fx)[:, None]


def letterbox(image: jax.Array, new_shape: int | tuple[int, int] = 640, *, color: float | tuple[float, ...] = 114,
              auto: bool = True, scale_fill: bool = False, scaleup: bool = True,
              stride: int = 32) -> tuple[jax.Array, tuple[float, float], tuple[float, float]]:
    """YOLOv5's ``letterbox``: resize ``image`` ``(H, W, C)`` (or ``(B, H, W, C)``, one geometry for all)
    keeping the aspect ratio, then pad with ``color`` to ``new_shape`` (``auto=True``: only to the next
    multiple of ``stride``). Returns ``(image, ratio, (dw, dh))`` as the package does; a uint8 image stays
    uint8 (rounded), a float image stays float. Traceable under ``jax.jit`` (the geometry is static).

    Example:
        >>> img = jnp.full((480, 600, 3), 7, jnp.uint8)
        >>> out, ratio, pad = letterbox(img, 640)
        >>> out.shape, ratio, pad, int(out[0, 0, 0]), int(out[300, 300, 0])
        ((512, 640, 3), (1.0666666666666667, 1.0666666666666667), (0.0, 0.0), 7, 7)
    """
    shape = getattr(image, "shape", None)
    if shape is None or len(shape) not in (3, 4):
        raise ValueError(f"letterbox: expected an (H, W, C) or (B, H, W, C) image, got shape {shape}")
    p = letterbox_params(tuple(shape[-3:-1]), new_shape, auto=auto, scale_fill=scale_fill, scaleup=scaleup,
                         stride=stride)
    x = jnp.asarray(image)
    if (p.new_unpad[0], p.new_unpad[1]) != tuple(shape[-3:-1]):
        y = _resize_linear(x, *p.new_unpad)
        if jnp.issubdtype(x.dtype, jnp.integer):
            info = jnp.iinfo(x.dtype)
            y = jnp.clip(jnp.round(y), info.min, info.max)
        x = y.astype(x.dtype)
    c = shape[-1]
    col = jnp.broadcast_to(jnp.asarray(color, x.dtype), (c,))
    lead = x.shape[:-3]
    out_h, out_w = p.shape
    canvas = jnp.broadcast_to(col, lead + (out_h, out_w, c))
    canvas = jax.lax.dynamic_update_slice(canvas, x, (0,) * len(lead) + (p.top, p.left, 0))
    return canvas, p.ratio, p.pad


def clip_boxes(boxes: jax.Array, shape: tuple[int, int]) -> jax.Array:
    """Clips xyxy ``boxes`` to an image of ``shape = (height, width)``."""
    h, w = _pair(tuple(shape), "shape")
    lo = jnp.zeros(4, boxes.dtype)
    hi = jnp.asarray([w, h, w, h], boxes.dtype)
    return jnp.clip(boxes, lo, hi)


def scale_boxes(img1_shape: tuple[int, int], boxes: jax.Array, img0_shape: tuple[int, int],
                ratio_pad: tuple[tuple[float, float], tuple[float, float]] | None = None) -> jax.Array:
    """Maps xyxy ``boxes`` from the letterboxed ``img1_shape`` back to the original ``img0_shape`` (both
    ``(height, width)``), then clips; YOLOv5's ``scale_boxes``. ``ratio_pad = (ratio, (dw, dh))`` as
    :func:`letterbox` returns them; ``None``: recomputed from the shapes (the package's default).

    Example:
        >>> lb, ratio, pad = letterbox(jnp.zeros((100, 200, 3), jnp.uint8), 640)
        >>> scale_boxes(lb.shape[:2], jnp.array([[64.0, 32.0, 640.0, 320.0]]), (100, 200), (ratio, pad)).tolist()
        [[20.0, 10.0, 200.0, 100.0]]
    """
    boxes = jnp.asarray(boxes)
    if boxes.shape[-1:] != (4,):
        raise ValueError(f"scale_boxes: expected xyxy boxes of shape (..., 4), got {tuple(boxes.shape)}")
    h1, w1 = _pair(tuple(img1_shape), "img1_shape")
    h0, w0 = _pair(tuple(img0_shape), "img0_shape")
    if ratio_pad is None:
        gain = min(h1 / h0, w1 / w0)
        pad = ((w1 - w0 * gain) / 2, (h1 - h0 * gain) / 2)
    else:
        gain, pad = ratio_pad[0][0], ratio_pad[1]
    off = jnp.asarray([pad[0], pad[1], pad[0], pad[1]], boxes.dtype)
    return clip_boxes((boxes - off) / gain, (h0, w0))


def letterbox_boxes(boxes: jax.Array, ratio_pad: tuple[tuple[float, float], tuple[float, float]]) -> jax.Array:
    """Maps xyxy boxes of the original image into the letterboxed one: ``x * ratio + pad`` (the inverse of
    :func:`scale_boxes` with the same ``ratio_pad``, before clipping)."""
    (rw, rh), (dw, dh) = ratio_pad
    boxes = jnp.asarray(boxes)
    return boxes * jnp.asarray([rw, rh, rw, rh], boxes.dtype) + jnp.asarray([dw, dh, dw, dh], boxes.dtype)


# --------------------------------------------------------------------------------------------------- NMS
class NMSResult(NamedTuple):
    """``indices`` ``(..., K)`` into the input boxes (score order; ``0`` where not ``valid``) and ``valid``."""

    indices: jax.Array
    valid: jax.Array


def _nms_one(boxes, scores, classes, iou_threshold, max_detections, max_candidates):
    n = boxes.shape[0]
    m = min(max_candidates, n)
    top_s, top_i = jax.lax.top_k(scores, m)                     # descending; ties: lower index first
    b = boxes[top_i].astype(jnp.float32)
    c = classes[top_i]
    alive0 = top_s > -jnp.inf
    pos = jnp.arange(m)

    def body(k, state):
        alive, idx, valid = state
        j = jnp.argmax(alive)                                   # first alive = best remaining score
        ok = alive[j]
        iou = box_iou(b[j], b)
        suppress = (c == c[j]) & (iou > iou_threshold)
        alive = jnp.where(ok, alive & ~suppress & (pos != j), alive)
        idx = idx.at[k].set(jnp.where(ok, top_i[j], 0))
        valid = valid.at[k].set(ok)
        return alive, idx, valid

    init = (alive0, jnp.zeros(max_detections, jnp.int32), jnp.zeros(max_detections, bool))
    _, idx, valid = jax.lax.fori_loop(0, max_detections, body, init)
    return idx, valid


def nms(boxes: jax.Array, scores: jax.Array, classes: jax.Array | None = None, *, iou_threshold: float = 0.45,
        max_detections: int = 300, max_candidates: int = 30000) -> NMSResult:
    """Class-aware greedy NMS with a static output size, jit- and vmap-able.

    ``boxes`` ``(..., N, 4)`` xyxy, ``scores`` ``(..., N)`` (``-inf`` marks a box that must never be
    kept), ``classes`` ``(..., N)`` ints (``None``: class-agnostic). A box is suppressed by a kept box of
    the same class with a higher score and IoU ``> iou_threshold`` (torchvision's ``batched_nms``). Only
    the ``max_candidates`` best-scoring boxes take part (YOLOv5's ``max_nms``). Returns :class:`NMSResult`
    with ``max_detections`` slots in descending score order; slots past the last kept box have
    ``valid=False`` and index 0. Leading axes are batched with ``vmap``.

    Example:
        >>> b = jnp.array([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30.0]])
        >>> r = nms(b, jnp.array([0.9, 0.8, 0.7]), max_detections=3)
        >>> r.indices.tolist(), r.valid.tolist()
        ([0, 2, 0], [True, True, False])
    """
    boxes, scores = jnp.asarray(boxes), jnp.asarray(scores)
    if boxes.ndim < 2 or boxes.shape[-1] != 4:
        raise ValueError(f"nms: boxes must have shape (..., N, 4), got {tuple(boxes.shape)}")
    if scores.shape != boxes.shape[:-1]:
        raise ValueError(f"nms: scores must have shape {tuple(boxes.shape[:-1])} (boxes minus the last axis), "
                         f"got {tuple(scores.shape)}")
    classes = jnp.zeros(scores.shape, jnp.int32) if classes is None else jnp.asarray(classes)
    if classes.shape != scores.shape:
        raise ValueError(f"nms: classes must have shape {tuple(scores.shape)}, got {tuple(classes.shape)}")
    for name, v in (("max_detections", max_detections), ("max_candidates", max_candidates)):
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"nms: {name} must be a positive int, got {v!r}")
    if not (isinstance(iou_threshold, (int, float)) and 0.0 <= iou_threshold <= 1.0):
        raise ValueError(f"nms: iou_threshold must be a number in [0, 1], got {iou_threshold!r}")
    fn = lambda b, s, c: _nms_one(b, s, c, iou_threshold, max_detections, max_candidates)  # noqa: E731
    for _ in range(boxes.ndim - 2):
        fn = jax.vmap(fn)
    return NMSResult(*fn(boxes, scores, classes))


class Detections(NamedTuple):
    """:func:`non_max_suppression` output, ``K = max_det`` slots per image in descending score order:
    ``boxes`` ``(B, K, 4)`` xyxy in the model's input pixels, ``scores`` ``(B, K)`` (``obj * cls``),
    ``classes`` ``(B, K)`` int32, ``valid`` ``(B, K)`` and ``indices`` ``(B, K)`` (the prediction rows)."""

    boxes: jax.Array
    scores: jax.Array
    classes: jax.Array
    valid: jax.Array
    indices: jax.Array


def non_max_suppression(prediction: jax.Array, conf_thres: float = 0.25, iou_thres: float = 0.45, *,
                        agnostic: bool = False, max_det: int = 300, max_nms: int = 30000) -> Detections:
    """YOLOv5's ``non_max_suppression`` (single label per box) on decoded predictions ``(B, N, 5 + nc)``,
    static-size and jit-able: candidates need objectness ``> conf_thres`` and ``obj * max(cls) > conf_thres``;
    score = ``obj * cls`` of the best class; class-aware NMS (``agnostic=False``) at ``iou_thres``; at most
    ``max_det`` kept. Invalid slots are zero with ``valid=False``.

    Example:
        >>> from flax_attn.models import create_model
        >>> model = create_model("yolov5n", num_classes=2); model.eval()
        >>> det = non_max_suppression(model(jnp.ones((1, 64, 64, 3))), 0.0, max_det=5)
        >>> det.boxes.shape, det.valid.shape
        ((1, 5, 4), (1, 5))
    """
    p = jnp.asarray(prediction)
    if p.ndim != 3 or p.shape[-1] < 6:
        raise ValueError(f"non_max_suppression: expected decoded predictions (B, N, 5 + nc), got {tuple(p.shape)}")
    for name, v in (("conf_thres", conf_thres), ("iou_thres", iou_thres)):
        if not (isinstance(v, (int, float)) and 0.0 <= v <= 1.0):
            raise ValueError(f"non_max_suppression: {name} must be in [0, 1], got {v!r}")
    obj = p[..., 4]
    cls = p[..., 5:] * obj[..., None]
    conf = jnp.max(cls, axis=-1)
    j = jnp.argmax(cls, axis=-1).astype(jnp.int32)
    keep = (obj > conf_thres) & (conf > conf_thres)
    score = jnp.where(keep, conf, -jnp.inf)
    boxes = xywh2xyxy(p[..., :4])
    r = nms(boxes, score, None if agnostic else j, iou_threshold=iou_thres, max_detections=max_det,
            max_candidates=max_nms)
    take = lambda a: jnp.take_along_axis(a, r.indices, axis=1)  # noqa: E731
    valid = r.valid
    out_boxes = jnp.where(valid[..., None], jnp.take_along_axis(boxes, r.indices[..., None], axis=1), 0)
    return Detections(out_boxes, jnp.where(valid, take(conf), 0), jnp.where(valid, take(j), 0), valid, r.indices)


__all__ = [
    "Detections",
    "LetterboxParams",
    "NMSResult",
    "box_iou",
    "clip_boxes",
    "letterbox",
    "letterbox_boxes",
    "letterbox_params",
    "nms",
    "non_max_suppression",
    "scale_boxes",
    "xywh2xyxy",
    "xyxy2xywh",
]
