"""Per-detection CAMs for YOLO-style detectors: every selected detection explained by ONE compiled call.

This reproduces the per-detection Grad-CAM loop of the ``yolov5_heatmap`` script (YOLOv5 7.0 +
``pytorch_grad_cam``): one eval forward with the target layer tapped (``model.23``, the last C3, is the
article's ``model.model[-2]``), the decoded predictions ``(B, N, 5 + nc)`` (xywh in input pixels,
objectness at index 4, class probabilities after it, sigmoid applied) sorted by objectness, the first
``int(N * ratio)`` taken while their objectness is ``>= conf_threshold`` (no NMS), and per detection the
gradient of one scalar of its prediction row (``backward_type``), a CAM method's channel weights, ReLU,
bilinear resize to the input size, min-max. The loop runs ``K`` backward passes; here all ``K`` gradients
come from one forward pass by ``jax.vmap`` over the output cotangents, inside one ``jax.jit``.

What the script silently gets wrong and we report instead: a detection whose gradient at every tapped
layer is exactly zero (``zero_grad``; at ``model.23`` every stride-8/16 prediction, since only the
stride-32 head reads that layer) gives a constant map, which the script skips (``continue``, no PNG)
without a word; we keep the row and flag it (``zero_grad``, ``constant``). Tap several layers
(``["model.17", "model.20", "model.23"]``) to explain detections of every stride.

Post-processing (``postprocess=``):

* ``"article"`` (default, the script exactly): per layer ``relu(raw)`` -> bilinear resize (half-pixel
  centres, ``cv2.resize``'s ``INTER_LINEAR``) -> ``(m - min) / (max - min)`` with NO epsilon; a map with
  ``max == min`` is the script's ``continue``: we return zeros and set ``constant``. Several layers: the
  per-layer maps (each already in [0, 1], zeros when constant) are averaged and min-maxed again the same way
  (one layer: unchanged).
* ``"gradcam"`` (``pytorch_grad_cam``'s ``BaseCAM``, e.g. its YOLOv5 EigenCAM tutorial): ``relu(raw)`` ->
  ``scale_cam_image`` (min-max with ``1e-7`` at the layer's resolution, then resize) -> grad-cam's
  ``aggregate_multi_layers`` (mean, min-max with ``1e-7``). The two orders differ (min-max before or after
  the resize: up to ~1/(2 * stride) of the range near interior extrema), hence the switch.

Compilation: the class form and the function share the CAM engine's ONE compile cache (the LRU of
:func:`~flax_attn.cam.compile_cache_info`, bounded by :func:`~flax_attn.cam.set_compile_cache_size`, emptied by
:func:`~flax_attn.cam.clear_compile_cache`), so a ``DetectionCAM`` and a ``detection_cams`` call with the same
options use the same compiled function. Its key (a change recompiles once): input shape/dtype, model
structure (NNX ``graphdef``), target layers, ``max_detections``, ``method``, ``backward_type`` (a callable by
:func:`~flax_attn.cam.taps.structural_key`: the same ``lambda`` source with the same closure values hits the
cache), ``postprocess``, ``eigen_smooth``, ``nms_iou`` (the NMS's IoU threshold is static).
``conf_threshold``, ``ratio`` and parameter values are traced: changing them never recompiles.
"""

from __future__ import annotations

import functools
import math
import os
import weakref
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from flax_attn.cam.api import _COMPILED, _OUTPUT_SHAPES, _aval, _Entry
from flax_attn.cam.engine import _check_input
from flax_attn.cam.methods import CamInputs, CamMethod, get_method
from flax_attn.cam.postprocess import aggregate_layers, resize_maps, scale_cam
from flax_attn.cam.taps import Tap, make_tap, structural_key

__all__ = [
    "BACKWARD_TYPES",
    "DEFAULT_LAYERS",
    "DetectionCAM",
    "DetectionCAMs",
    "detection_cams",
    "detection_colors",
    "draw_detections",
    "plot_detection_grid",
    "renormalize_in_boxes",
    "save_detection_cams",
    "save_png",
    "show_detection_cams",
]


class DetectionCAMs(NamedTuple):
    """Result of :func:`detection_cams`; ``K`` = ``max_detections`` slots per image, in selection order.

    * ``boxes`` ``(B, K, 4)``: xyxy in input pixels (``xywh2xyxy`` of the prediction row).
    * ``scores`` ``(B, K)``: the selection score: objectness (the script's ``conf``, shown in its labels);
      with ``nms_iou``: objectness x class probability (the score YOLOv5's NMS and ``detect.py`` use).
    * ``classes`` ``(B, K)`` int32: arg-max class probability.
    * ``valid`` ``(B, K)`` bool: the selection mask (the script's loop iterations). Invalid slots are NOT
      zero-filled: they hold the next predictions in objectness order (the ones the script's ``break`` or the
      ``K`` limit stops before) with their real boxes, scores and CAMs (with NMS, slots past the last kept
      box hold prediction row 0, the NMS's fill index). Use ``valid`` before reading any other field.
    * ``zero_grad`` ``(B, K)`` bool: the gradient of the detection's score is exactly zero at every tapped
      layer (at ``model.23``: every stride-8/16 detection). Always False for gradient-free methods
      (EigenCAM takes no gradient).
    * ``cams`` ``(B, K, H, W)``: normalised maps in [0, 1]; zeros where ``constant``.
    * ``constant`` ``(B, K)`` bool: the map before normalisation was constant (``max == min``; the script
      ``continue``-s and writes no PNG). Every ``zero_grad`` detection is ``constant``.
    * ``indices`` ``(B, K)`` int32: row of each slot in the model's ``(B, N, 5 + nc)`` predictions.
    * ``layer_zero_grad`` ``(B, K, L)`` bool: ``zero_grad`` per tapped layer (a layer without gradient
      contributes a zero map to the multi-layer mean; module docstring).
    * ``predictions`` ``(B, N, 5 + nc)``: the model's decoded predictions (from the same forward pass).
    """

    boxes: jax.Array
    scores: jax.Array
    classes: jax.Array
    valid: jax.Array
    zero_grad: jax.Array
    cams: jax.Array
    constant: jax.Array
    indices: jax.Array
    layer_zero_grad: jax.Array
    predictions: jax.Array


def _conf(row: jax.Array) -> jax.Array:
    return row[4]


def _class(row: jax.Array) -> jax.Array:
    return jnp.max(row[5:])


def _conf_class(row: jax.Array) -> jax.Array:
    return row[4] * jnp.max(row[5:])


def _box(row: jax.Array) -> jax.Array:
    return jnp.sum(row[:4])


#: ``backward_type`` names -> the scalar of ONE prediction row ``(5 + nc,)`` whose gradient is taken:
#: ``"conf"`` objectness (the script's default), ``"class"`` the highest class probability (the script's
#: other choice, ``post_result[i, 1:].max()``), ``"conf*class"`` their product (the score NMS uses),
#: ``"box"`` the sum of the row's four box numbers as the model outputs them (x, y, w, h; later versions of
#: the script). A callable ``row -> scalar`` is accepted too.
BACKWARD_TYPES: dict[str, Callable[[jax.Array], jax.Array]] = {
    "conf": _conf,
    "class": _class,
    "conf*class": _conf_class,
    "box": _box,
}

_POSTPROCESS = ("article", "gradcam")


def _xywh2xyxy(b: jax.Array) -> jax.Array:
    try:  # the detector's own helper when the models package provides it
        from flax_attn.models.yolo_ops import xywh2xyxy
    except ImportError:  # pragma: no cover - models without YOLO ops
        xy, wh = b[..., :2], b[..., 2:4]
        return jnp.concatenate([xy - wh / 2, xy + wh / 2], axis=-1)
    return xywh2xyxy(b)


def _minmax_exact(m: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The script's ``(m - min) / (max - min)`` over the two trailing axes; constant maps -> 0 and a flag."""
    mn = jnp.min(m, axis=(-2, -1), keepdims=True)
    mx = jnp.max(m, axis=(-2, -1), keepdims=True)
    rng = mx - mn
    const = rng == 0
    out = jnp.where(const, 0, (m - mn) / jnp.where(const, 1, rng))
    return out, const[..., 0, 0]


def _float_arg(value: Any, argname: str, expected: str) -> float:
    """``float(value)``, or a TypeError naming the argument and what it expects."""
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{argname}: expected {expected}, got {type(value).__name__}") from None


def _check_options(max_detections: Any, ratio: Any, conf_threshold: Any, backward_type: Any,
                   postprocess: Any, nms_iou: Any) -> tuple[int, float, float, Any, float | None]:
    if isinstance(max_detections, bool) or not isinstance(max_detections, (int, np.integer)) or max_detections <= 0:
        raise ValueError(f"max_detections: expected a positive int (the static number K of CAM slots per image), "
                         f"got {max_detections!r}")
    ratio_f = _float_arg(ratio, "ratio", "a float in (0, 1]")
    if not 0.0 < ratio_f <= 1.0:
        raise ValueError(f"ratio: expected a float in (0, 1] (the fraction of predictions the script visits), "
                         f"got {ratio!r}")
    thr = _float_arg(conf_threshold, "conf_threshold", "a float")
    if not math.isfinite(thr):
        raise ValueError(f"conf_threshold: expected a finite float, got {conf_threshold!r}")
    if isinstance(backward_type, str):
        if backward_type not in BACKWARD_TYPES:
            raise ValueError(f"backward_type: unknown {backward_type!r}; expected one of "
                             f"{sorted(BACKWARD_TYPES)} or a callable row -> scalar")
    elif not callable(backward_type):
        raise TypeError(f"backward_type: expected one of {sorted(BACKWARD_TYPES)} or a callable row -> scalar, "
                        f"got {type(backward_type).__name__}")
    if postprocess not in _POSTPROCESS:
        raise ValueError(f"postprocess: expected one of {_POSTPROCESS}, got {postprocess!r}")
    iou = None
    if nms_iou is not None:
        iou = _float_arg(nms_iou, "nms_iou", "None or a float in [0, 1]")
        if not 0.0 <= iou <= 1.0:
            raise ValueError(f"nms_iou: expected None (the script's selection, no NMS) or an IoU in [0, 1], "
                             f"got {nms_iou!r}")
    return int(max_detections), ratio_f, thr, backward_type, iou


def _check_method(method: str | CamMethod) -> CamMethod:
    m = get_method(method)
    if m.needs_hvp or m.needs_key:
        raise ValueError(f"method: {m.name!r} is not supported for detection CAMs (it needs "
                         f"{'a Hessian-vector product' if m.needs_hvp else 'a random key'}); use a gradient "
                         f"method (gradcam, gradcam++, xgradcam, layercam, hirescam, gradcamelementwise, "
                         f"eigengradcam) or eigencam")
    if m.default_targets is not None:  # e.g. FinerCAM: its own contrast target would be silently replaced
        raise ValueError(f"method: {m.name!r} is not supported for detection CAMs (it brings its own target, "
                         f"which the detection score backward_type replaces); use its base method "
                         f"(e.g. 'gradcam') with a callable backward_type for a contrast")
    return m


#: The script's target layer ``model.model[-2]`` (YOLOv5's last C3).
DEFAULT_LAYERS: tuple[str, ...] = ("model.23",)


def _layers_for(model: Any, target_layers: Any) -> Any:
    """``target_layers`` for :func:`make_tap`; the default applies to NNX detectors only (a Tap or a
    ``(features, head)`` pair has its own layers)."""
    if target_layers is DEFAULT_LAYERS or target_layers is None:
        from flax import nnx

        return list(DEFAULT_LAYERS) if isinstance(model, nnx.Module) else None
    return list(target_layers) if isinstance(target_layers, tuple) else target_layers


def _predictions(output: Any) -> Any:
    """The decoded predictions of the eval forward (YOLOv5 PyTorch returns ``(pred, raw_maps)``)."""
    if isinstance(output, (tuple, list)):
        return output[0]
    return output


def _check_output(out_shape: Any, batch: int) -> tuple[int, int]:
    pred = _predictions(out_shape)
    shape = tuple(getattr(pred, "shape", ()))
    if len(shape) != 3 or shape[0] != batch or shape[2] < 6:
        raise ValueError(f"model: expected an eval forward returning decoded predictions (B, N, 5 + num_classes) "
                         f"with B = {batch}, got {shape if shape else type(pred).__name__}")
    return shape[1], shape[2]


def _cotangent(output: Any, ct_pred: jax.Array) -> Any:
    if isinstance(output, (tuple, list)):
        rest = jax.tree.map(jnp.zeros_like, type(output)(output[1:]))
        return type(output)([ct_pred, *rest])
    return ct_pred


def _detect_impl(tap: Tap, x: jax.Array, conf_threshold: jax.Array, n_visit: jax.Array,
                 nms_iou: float | None, *, k: int, method: CamMethod, backward_type: Any,
                 postprocess: str, eigen_smooth: bool) -> DetectionCAMs:
    score_fn = BACKWARD_TYPES[backward_type] if isinstance(backward_type, str) else backward_type
    shapes = jax.eval_shape(lambda: tap.run(x))[1]
    zeros = [jnp.zeros(s.shape, s.dtype) for s in shapes]
    b = x.shape[0]
    size = x.shape[1:-1]

    def fwd(probes):
        return tap.run(x, probes)

    if method.uses_gradients:
        output, vjp_fn, acts = jax.vjp(fwd, zeros, has_aux=True)
    else:
        output, acts = fwd(None)
        vjp_fn = None
    pred = _predictions(output)
    sel = jax.lax.stop_gradient(pred)

    # ---- selection (indices (B, K), valid (B, K), scores (B, K)) --------------------------------------
    obj = sel[..., 4]
    if nms_iou is None:
        top_obj, idx = jax.lax.top_k(obj, k)
        valid = (jnp.arange(k)[None, :] < n_visit) & (top_obj >= conf_threshold)
        scores = top_obj
    else:
        idx, valid, scores = _nms_select(sel, conf_threshold, nms_iou, k)
    idx = idx.astype(jnp.int32)
    rows = jnp.take_along_axis(sel, idx[..., None], axis=1)  # (B, K, D)
    boxes = _xywh2xyxy(rows[..., :4])
    classes = jnp.argmax(rows[..., 5:], axis=-1).astype(jnp.int32)

    # ---- gradients of all K detections: one cotangent per slot, vmapped ------------------------------
    nl = len(acts)
    if vjp_fn is not None:
        row_ids = jnp.arange(pred.shape[1], dtype=jnp.int32)[None, :, None]

        def grads_for(idx_k):  # idx_k (B,): one slot of every image
            r = jnp.take_along_axis(pred, idx_k[:, None, None], axis=1)[:, 0]  # (B, D)
            g_row = jax.grad(lambda r: jnp.sum(jax.vmap(score_fn)(r)))(r)  # d score / d row, (B, D)
            # the one-hot cotangent (B, N, D) of the score, written as a select on the row index rather than
            # the scatter into zeros that jax.grad of the gather gives (the same values): XLA fuses the select
            # into the slices the model's backward takes (Detect reads its own level's rows only) and never
            # writes the K x (B, N, D) zeros (171 MB for yolov5s at 640x640, K = 20, per image)
            ct = jnp.where(row_ids == idx_k[:, None, None], g_row[:, None, :], jnp.zeros((), pred.dtype))
            return vjp_fn(_cotangent(output, ct))[0]

        grads = jax.vmap(grads_for, in_axes=1)(idx)  # per layer (K, B, ...)
        grads = [jnp.moveaxis(g, 0, 1) for g in grads]  # (B, K, ...)
        layer_zero = jnp.stack([jnp.all(g == 0, axis=tuple(range(2, g.ndim))) for g in grads], axis=-1)
    else:
        grads = [None] * nl
        layer_zero = jnp.zeros((b, k, nl), bool)

    # ---- per layer: method -> raw (B, K, h, w) -> ReLU -> resize / min-max ---------------------------
    def one(a1, g1):
        return method.cam_image(CamInputs(a1, g1, None, None, eigen_smooth))

    per_layer: list[Any] = []
    for a, g in zip(acts, grads):
        if g is not None:
            raw = jax.vmap(lambda a1, gk: jax.vmap(lambda g1: one(a1, g1))(gk))(a, g)  # (B, K, h, w)
        else:  # gradient-free: one map per image, shared by its detections
            raw = jax.vmap(lambda a1: one(a1, None))(a)[:, None]
        raw = jnp.maximum(raw, 0)
        if postprocess == "article":
            per_layer.append(_minmax_exact(resize_maps(raw, size)))
        else:
            per_layer.append(resize_maps(scale_cam(raw, spatial_ndim=2), size))
    if postprocess == "article":
        # constant: the single-layer map before normalisation was constant; several layers: every layer's
        # map was constant (then the mean is all zeros) or the mean is. (The flag of the last min-max: the
        # same as max(cam) == 0, since a non-constant map's maximum is (max - min) / (max - min) = 1 exactly,
        # without another pass over the K full-size maps.)
        if nl == 1:
            cam, cam_const = per_layer[0]
        else:
            cam, cam_const = _minmax_exact(jnp.mean(jnp.stack([m for m, _ in per_layer]), axis=0))
    else:
        cam = aggregate_layers(per_layer, spatial_ndim=2)
        cam_const = jnp.max(cam, axis=(-2, -1)) == jnp.min(cam, axis=(-2, -1))
    cam = jnp.broadcast_to(cam, (b, k) + tuple(size))
    cam_const = jnp.broadcast_to(cam_const, (b, k))
    return DetectionCAMs(boxes=boxes, scores=scores, classes=classes, valid=valid,
                         zero_grad=jnp.all(layer_zero, axis=-1), cams=cam, constant=cam_const, indices=idx,
                         layer_zero_grad=layer_zero, predictions=pred)


def _nms_select(sel: jax.Array, conf_threshold: jax.Array, iou: float, k: int):
    """YOLOv5's ``non_max_suppression`` candidates (objectness and ``obj * max(cls)`` above the threshold,
    score ``obj * cls``) through the detector's own jittable class-aware NMS (``flax_attn.models.yolo_ops``),
    with a traced threshold."""
    from flax_attn.models.yolo_ops import nms, xywh2xyxy

    obj = sel[..., 4]
    cls = sel[..., 5:] * obj[..., None]
    conf = jnp.max(cls, axis=-1)
    j = jnp.argmax(cls, axis=-1).astype(jnp.int32)
    keep = (obj > conf_threshold) & (conf > conf_threshold)
    r = nms(xywh2xyxy(sel[..., :4]), jnp.where(keep, conf, -jnp.inf), j, iou_threshold=iou, max_detections=k)
    return r.indices, r.valid, jnp.take_along_axis(conf, r.indices, axis=1)


class _Prepared(NamedTuple):
    k: int
    thr: float
    n_visit: int
    backward_type: Any
    nms_iou: float | None


def _prepare(tap: Tap, x: Any, *, max_detections: Any, ratio: Any, conf_threshold: Any,
             backward_type: Any, postprocess: Any, nms_iou: Any) -> tuple[jax.Array, _Prepared, Any]:
    k, ratio_f, thr, bt, iou = _check_options(max_detections, ratio, conf_threshold, backward_type, postprocess, nms_iou)
    x = _check_input(x)
    if x.ndim != 4:
        raise ValueError(f"x: expected channels-last images (B, H, W, C), got shape {x.shape}")
    static, dynamic = tap.split()
    # the engine's shared cache of output structures (the model's own shape errors surface here)
    out = _OUTPUT_SHAPES.get((static, _aval(x)), lambda: jax.eval_shape(lambda: tap.run(x)[0]))
    n, _ = _check_output(out, x.shape[0])
    if k > n:
        raise ValueError(f"max_detections: {k} slots per image but the model makes only {n} predictions "
                         f"for input {x.shape}")
    n_visit = int(n * ratio_f)  # the script's int(post_result.size(0) * ratio)
    return x, _Prepared(k, thr, n_visit, bt, iou), (static, dynamic)


def _run_compiled(tap: Tap, x: jax.Array, p: _Prepared, static: Any, dynamic: Any, *, method: CamMethod,
                  postprocess: str, eigen_smooth: bool) -> tuple[DetectionCAMs, int]:
    """Runs the shared compiled function for these options (compiled on a miss); returns the result and the
    number of traces the call caused."""
    bt = p.backward_type
    key = ("detection_cams", type(tap), static, _aval(x), p.k, method, structural_key(bt), p.nms_iou, postprocess,
           eigen_smooth)

    def make():
        entry = _Entry()

        def impl(dynamic, x, thr, n_visit):
            _COMPILED.traces += 1
            t = entry.tap().rebuild(static, dynamic)  # the calling tap; the entry never keeps a model alive
            return _detect_impl(t, x, thr, n_visit, p.nms_iou, k=p.k, method=method, backward_type=bt,
                                postprocess=postprocess, eigen_smooth=eigen_smooth)

        entry.fn = jax.jit(impl)
        return entry

    entry = _COMPILED.get(key, make)
    entry.tap = weakref.ref(tap)
    before = _COMPILED.traces
    res = entry.fn(dynamic, x, jnp.asarray(p.thr, x.dtype), jnp.asarray(p.n_visit, jnp.int32))
    return res, _COMPILED.traces - before


class DetectionCAM:
    """Per-detection CAMs of a YOLO-style detector, one jitted call per image batch (compiled functions in the
    CAM engine's shared LRU cache, as :class:`~flax_attn.cam.GradCAM`'s).

    ``model``: a ``flax.nnx.Module`` whose eval forward returns decoded predictions ``(B, N, 5 + nc)`` (or a
    tuple starting with them), e.g. ``create_model("yolov5s")``; or any :class:`~flax_attn.cam.Tap`.
    ``target_layers``: paths (``["model.23"]`` = the script's ``model.model[-2]``; ``["model.17",
    "model.20", "model.23"]`` explains every stride). ``method``: a registered name (``"gradcam"``,
    ``"gradcam++"``, ``"xgradcam"``, ``"layercam"``, ``"hirescam"``, ``"gradcamelementwise"``,
    ``"eigengradcam"``, gradient-free ``"eigencam"``) or a :class:`~flax_attn.cam.CamMethod`.
    ``postprocess``: ``"article"`` or ``"gradcam"`` (module docstring). Calls take the options of
    :func:`detection_cams` and return :class:`DetectionCAMs`; ``num_traces`` counts the compilations this
    object's calls caused (0 when the same options were compiled before, by any object or the function).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from flax_attn.cam import FunctionTap
        >>> w = jax.random.normal(jax.random.key(0), (4, 7))
        >>> head = lambda a: jax.nn.sigmoid(a.reshape(a.shape[0], -1, 4) @ w)   # (B, N, 5 + 2)
        >>> cam = DetectionCAM(FunctionTap(jnp.tanh, head), method="gradcam")
        >>> x = jax.random.normal(jax.random.key(1), (2, 8, 8, 4))
        >>> res = cam(x, max_detections=5, conf_threshold=0.0, ratio=1.0)
        >>> res.cams.shape, res.valid.shape, cam.num_traces
        ((2, 5, 8, 8), (2, 5), 1)
    """

    def __init__(self, model: Any, target_layers: Sequence[str] | None = DEFAULT_LAYERS, *,
                 method: str | CamMethod = "xgradcam", postprocess: str = "article", eigen_smooth: bool = False,
                 **tap_kwargs: Any):
        self.tap = make_tap(model, _layers_for(model, target_layers), **tap_kwargs)
        self.target_layers = self.tap.layers
        self.method = _check_method(method)
        if postprocess not in _POSTPROCESS:
            raise ValueError(f"postprocess: expected one of {_POSTPROCESS}, got {postprocess!r}")
        self.postprocess = postprocess
        self.eigen_smooth = bool(eigen_smooth)
        self.num_traces = 0

    def __call__(self, x: jax.Array, *, max_detections: int = 20, conf_threshold: float = 0.6,
                 ratio: float = 0.02, backward_type: str | Callable[[jax.Array], jax.Array] = "conf",
                 nms_iou: float | None = None) -> DetectionCAMs:
        x, p, (static, dynamic) = _prepare(self.tap, x, max_detections=max_detections, ratio=ratio,
                                           conf_threshold=conf_threshold, backward_type=backward_type,
                                           postprocess=self.postprocess, nms_iou=nms_iou)
        res, traces = _run_compiled(self.tap, x, p, static, dynamic, method=self.method,
                                    postprocess=self.postprocess, eigen_smooth=self.eigen_smooth)
        self.num_traces += traces
        return res

    def __repr__(self) -> str:
        return f"DetectionCAM(target_layers={list(self.target_layers)}, method={self.method.name!r})"


def detection_cams(model: Any, x: jax.Array, target_layers: Sequence[str] | None = DEFAULT_LAYERS, *,
                   method: str | CamMethod = "xgradcam", backward_type: str | Callable = "conf",
                   conf_threshold: float = 0.6, ratio: float = 0.02, max_detections: int = 20,
                   nms_iou: float | None = None, postprocess: str = "article",
                   eigen_smooth: bool = False) -> DetectionCAMs:
    """CAMs of the selected detections of a YOLO-style detector: one forward, all gradients, one jit.

    Args:
      model: an NNX detector whose eval forward returns decoded predictions ``(B, N, 5 + nc)`` (xywh in
        input pixels, objectness at 4, class probabilities after it, sigmoid applied), or a Tap.
      x: channels-last images ``(B, H, W, C)``, e.g. letterboxed, RGB in [0, 1] as the script feeds YOLOv5.
      target_layers: tapped layers (``["model.23"]`` is the script's ``model.model[-2]``); several layers
        are averaged after per-layer normalisation (module docstring).
      method: a CAM method name or :class:`~flax_attn.cam.CamMethod` (gradient methods and ``"eigencam"``).
      backward_type: ``"conf"``, ``"class"``, ``"conf*class"``, ``"box"`` (:data:`BACKWARD_TYPES`) or a
        callable on ONE prediction row ``(5 + nc,) -> scalar``.
      conf_threshold: the script's threshold on objectness (with NMS: YOLOv5's ``conf_thres``).
      ratio: the script visits the first ``int(N * ratio)`` predictions by objectness, in (0, 1].
      max_detections: ``K``, the static number of slots per image (the script's count can be larger:
        ``valid`` then covers the first ``K``).
      nms_iou: ``None`` (the script: no NMS) or an IoU threshold: slots are YOLOv5's class-aware NMS
        detections in score order.
      postprocess: ``"article"`` (the script) or ``"gradcam"`` (grad-cam's ``BaseCAM``).
      eigen_smooth: first principal component instead of the channel sum (grad-cam's option).

    Returns:
      :class:`DetectionCAMs`. The compiled function lives in the CAM engine's shared LRU cache
      (:func:`~flax_attn.cam.compile_cache_info`), shared with :class:`DetectionCAM`; see the module docstring
      for what recompiles.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from flax_attn.cam import FunctionTap
        >>> w = jax.random.normal(jax.random.key(0), (4, 7))
        >>> tap = FunctionTap(jnp.tanh, lambda a: jax.nn.sigmoid(a.reshape(a.shape[0], -1, 4) @ w))
        >>> x = jax.random.normal(jax.random.key(1), (1, 8, 8, 4))
        >>> res = detection_cams(tap, x, method="gradcam++", backward_type="class", conf_threshold=0.0,
        ...                      ratio=0.5, max_detections=40)
        >>> int(res.valid.sum())   # int(64 * 0.5) predictions visited
        32
    """
    tap = make_tap(model, _layers_for(model, target_layers))
    m = _check_method(method)
    x, p, (static, dynamic) = _prepare(tap, x, max_detections=max_detections, ratio=ratio,
                                       conf_threshold=conf_threshold, backward_type=backward_type,
                                       postprocess=postprocess, nms_iou=nms_iou)
    return _run_compiled(tap, x, p, static, dynamic, method=m, postprocess=postprocess,
                         eigen_smooth=bool(eigen_smooth))[0]


# ------------------------------------------------------------------------------------------------------
# renormalisation in boxes (grad-cam's YOLOv5 EigenCAM tutorial)
# ------------------------------------------------------------------------------------------------------

def _renorm_one(cam: jax.Array, boxes: jax.Array, valid: jax.Array, rowwise: bool) -> jax.Array:
    h, w = cam.shape
    eps = jnp.asarray(1e-7, cam.dtype)
    ys = jnp.arange(h)[:, None]
    xs = jnp.arange(w)[None, :]
    bi = jnp.trunc(boxes).astype(jnp.int32)  # the tutorial's int(row["xmin"]) ...
    x1, x2 = jnp.clip(bi[:, 0], 0, w), jnp.clip(bi[:, 2], 0, w)
    y1, y2 = jnp.clip(bi[:, 1], 0, h), jnp.clip(bi[:, 3], 0, h)

    def body(out, box):
        bx1, by1, bx2, by2, v = box
        rows = (ys >= by1) & (ys < by2)
        cols = (xs >= bx1) & (xs < bx2)
        inside = rows & cols
        if rowwise:  # scale_cam_image on the 2-D crop: every crop ROW is min-maxed on its own
            mn = jnp.min(jnp.where(cols, cam, jnp.inf), axis=1, keepdims=True)
            sh = cam - mn
            mx = jnp.max(jnp.where(cols, sh, -jnp.inf), axis=1, keepdims=True)
        else:  # the crop as one map
            mn = jnp.min(jnp.where(inside, cam, jnp.inf))
            sh = cam - mn
            mx = jnp.max(jnp.where(inside, sh, -jnp.inf))
        val = sh / (eps + mx)
        keep = v & (bx2 > bx1) & (by2 > by1)
        return jnp.where(inside & keep, val, out), None

    out, _ = jax.lax.scan(body, jnp.zeros_like(cam), (x1, y1, x2, y2, valid))
    if rowwise:  # the final scale_cam_image(renormalized_cam): again row by row
        out = out - jnp.min(out, axis=1, keepdims=True)
        return out / (eps + jnp.max(out, axis=1, keepdims=True))
    return scale_cam(out[None])[0]


def renormalize_in_boxes(cam: jax.Array, boxes: jax.Array, valid: jax.Array | None = None, *,
                         rowwise: bool = True) -> jax.Array:
    """grad-cam's ``renormalize_cam_in_bounding_boxes`` (its YOLOv5 EigenCAM tutorial), batched and jittable.

    The tutorial zeroes the map outside the boxes, writes ``scale_cam_image(cam[y1:y2, x1:x2])`` into each
    box (boxes in order: a later box overwrites an earlier one where they overlap; corners truncated with
    ``int`` as the tutorial does, and clipped to the image as YOLOv5's boxes are), then applies
    ``scale_cam_image`` to the whole map. ``scale_cam_image`` expects a BATCH of maps and iterates over its
    first axis: given a 2-D map it min-maxes every ROW separately (``(r - min r) / (1e-7 + max(r - min r))``),
    both inside each box and over the final image. ``rowwise=True`` (default) reproduces that exactly;
    ``rowwise=False`` is what the tutorial means: each box min-maxed as one map, then the whole map
    (``1e-7`` as grad-cam). Invalid (``valid=False``) and empty boxes are skipped (the tutorial's numpy
    slicing would fail on an empty box).

    Args:
      cam: ``(H, W)`` or ``(B, H, W)`` maps (e.g. an EigenCAM, or one detection's CAM).
      boxes: ``(K, 4)`` / ``(B, K, 4)`` xyxy pixels (e.g. :attr:`DetectionCAMs.boxes`).
      valid: ``(K,)`` / ``(B, K)`` mask; ``None``: every box.

    Example:
        >>> import jax.numpy as jnp
        >>> cam = jnp.arange(16.0).reshape(4, 4)
        >>> renormalize_in_boxes(cam, jnp.array([[0.0, 0.0, 2.0, 2.0]]))[:2, :2].round(3).tolist()
        [[0.0, 1.0], [0.0, 1.0]]
    """
    cam = jnp.asarray(cam)
    boxes = jnp.asarray(boxes)
    if cam.ndim not in (2, 3) or not jnp.issubdtype(cam.dtype, jnp.floating):
        raise ValueError(f"cam: expected float maps (H, W) or (B, H, W), got shape {cam.shape} dtype {cam.dtype}")
    lead = cam.shape[:-2]
    if boxes.shape[:-2] != lead or boxes.ndim != cam.ndim or boxes.shape[-1] != 4:
        raise ValueError(f"boxes: expected shape {lead + ('K', 4)} for cam {cam.shape}, got {boxes.shape}")
    if valid is None:
        valid = jnp.ones(boxes.shape[:-1], bool)
    valid = jnp.asarray(valid, bool)
    if valid.shape != boxes.shape[:-1]:
        raise ValueError(f"valid: expected shape {boxes.shape[:-1]}, got {valid.shape}")
    fn = functools.partial(_renorm_one, rowwise=bool(rowwise))
    if cam.ndim == 2:
        return fn(cam, boxes.astype(cam.dtype), valid)
    return jax.vmap(fn)(cam, boxes.astype(cam.dtype), valid)


# ------------------------------------------------------------------------------------------------------
# figures (host side, numpy uint8; Pillow draws boxes and labels)
# ------------------------------------------------------------------------------------------------------

def detection_colors(num_classes: int, seed: int = 0) -> np.ndarray:
    """One RGB colour per class, ``(num_classes, 3)`` ints: the script's
    ``np.random.seed(0); np.random.uniform(0, 255, size=(nc, 3)).astype(np.int_)``.

    Example:
        >>> detection_colors(2).tolist()
        [[139, 182, 153], [138, 108, 164]]
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes <= 0:
        raise ValueError(f"num_classes: expected a positive int, got {num_classes!r}")
    return np.random.RandomState(seed).uniform(0, 255, size=(int(num_classes), 3)).astype(np.int_)


def _pil():
    try:
        from PIL import Image, ImageDraw, ImageFont
    except ImportError as e:  # pragma: no cover
        raise ImportError("drawing detections needs Pillow (pip install pillow)") from e
    return Image, ImageDraw, ImageFont


def draw_detections(image: Any, boxes: Any, labels: Sequence[str], colors: Any, *,
                    thickness: int = 2, font_size: int = 16) -> np.ndarray:
    """Boxes with their labels drawn on a copy of an RGB uint8 image ``(H, W, 3)`` (host side).

    As the script's ``draw_detections``: a rectangle of ``thickness`` pixels in the box's colour and the label
    above its top-left corner. ``boxes`` ``(K, 4)`` xyxy pixels (truncated to ints as the script does),
    ``colors`` ``(K, 3)`` RGB.

    Example:
        >>> import numpy as np
        >>> img = draw_detections(np.zeros((32, 32, 3), np.uint8), [[4, 8, 20, 30]], ["cat 0.91"], [[255, 0, 0]])
        >>> img[8, 10].tolist(), img.dtype.name
        ([255, 0, 0], 'uint8')
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image: expected an RGB uint8 image (H, W, 3), got shape {image.shape} dtype {image.dtype}")
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    colors = np.asarray(colors).reshape(-1, 3)
    if len(labels) != len(boxes) or len(colors) != len(boxes):
        raise ValueError(f"labels, colors: expected one per box ({len(boxes)}), got {len(labels)} labels and "
                         f"{len(colors)} colors")
    Image, ImageDraw, ImageFont = _pil()
    pil = Image.fromarray(image.copy())
    draw = ImageDraw.Draw(pil)
    try:
        font = ImageFont.load_default(size=font_size)
    except TypeError:  # pragma: no cover - Pillow < 10.1
        font = ImageFont.load_default()
    for (x1, y1, x2, y2), label, c in zip(boxes.astype(int), labels, colors):
        col = tuple(int(v) for v in c)
        draw.rectangle([x1, y1, x2, y2], outline=col, width=thickness)
        tb = draw.textbbox((0, 0), label, font=font)
        draw.text((x1, max(y1 - 5 - (tb[3] - tb[1]) - tb[1], 0)), label, fill=col, font=font)
    return np.asarray(pil)


def _names(class_names: Sequence[str] | None, classes: np.ndarray) -> list[str]:
    if class_names is None:
        return [str(int(c)) for c in classes]
    out = []
    for c in classes:
        if not 0 <= int(c) < len(class_names):
            raise ValueError(f"class_names: class {int(c)} has no name ({len(class_names)} names given)")
        out.append(str(class_names[int(c)]))
    return out


def show_detection_cams(image: Any, dets: DetectionCAMs, class_names: Sequence[str] | None = None, *,
                        index: int = 0, colors: Any = None, include_constant: bool = False,
                        image_weight: float = 0.5) -> list[tuple[int, np.ndarray]]:
    """Per selected detection of image ``index``: ``(slot, overlay)``, the CAM on the image
    (``show_cam_on_image``, RGB) with the detection's box and the label ``"{name} {score:.2f}"`` in its
    class colour, as the script saves them. ``image``: ``(H, W, 3)`` floats in [0, 1] (the network input).
    Constant maps are left out as the script does unless ``include_constant`` (their overlay is the plain
    colour map of zero).

    Example:
        >>> import numpy as np, jax.numpy as jnp
        >>> d = DetectionCAMs(*(jnp.asarray(v) for v in (np.array([[[1, 1, 6, 6]]], np.float32),
        ...     np.array([[0.9]]), np.array([[0]]), np.array([[True]]), np.array([[False]]),
        ...     np.random.rand(1, 1, 8, 8), np.array([[False]]), np.array([[0]]),
        ...     np.zeros((1, 1, 1), bool), np.zeros((1, 1, 6)))))
        >>> [(i, o.shape) for i, o in show_detection_cams(np.random.rand(8, 8, 3), d, ["cat"])]
        [(0, (8, 8, 3))]
    """
    from flax_attn.cam.image import show_cam_on_image

    image = np.asarray(image, np.float32)
    cams = np.asarray(dets.cams[index])
    if image.ndim != 3 or image.shape[:2] != cams.shape[1:]:
        raise ValueError(f"image: expected (H, W, 3) with H, W = {cams.shape[1:]} (the CAM size), got {image.shape}")
    valid = np.asarray(dets.valid[index])
    keep = valid if include_constant else valid & ~np.asarray(dets.constant[index])
    slots = np.nonzero(keep)[0]
    if len(slots) == 0:
        return []
    classes = np.asarray(dets.classes[index])
    nc = int(dets.predictions.shape[-1]) - 5
    colors = detection_colors(nc) if colors is None else np.asarray(colors)
    names = _names(class_names, classes[slots])
    scores = np.asarray(dets.scores[index])
    boxes = np.asarray(dets.boxes[index])
    overlays = np.asarray(show_cam_on_image(image[None], cams[slots], use_rgb=True, image_weight=image_weight))
    out = []
    for j, s in enumerate(slots):
        img = draw_detections(overlays[j], boxes[s][None], [f"{names[j]} {scores[s]:.2f}"],
                              colors[classes[s]][None])
        out.append((int(s), img))
    return out


def save_png(path: str, image: Any) -> None:
    """Writes an RGB uint8 ``(H, W, 3)`` image as PNG (host side, Pillow).

    Example:
        >>> import numpy as np, os, tempfile
        >>> p = os.path.join(tempfile.mkdtemp(), "a.png"); save_png(p, np.zeros((4, 4, 3), np.uint8))
        >>> os.path.getsize(p) > 0
        True
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image: expected an RGB uint8 image (H, W, 3), got shape {image.shape} dtype {image.dtype}")
    Image, _, _ = _pil()
    Image.fromarray(image).save(path)


def save_detection_cams(save_dir: str, image: Any, dets: DetectionCAMs, class_names: Sequence[str] | None = None,
                        **kwargs: Any) -> list[str]:
    """The script's output: one PNG ``{save_dir}/{i}.png`` per selected detection with a non-constant map
    (``i`` = its rank, the script's loop index), for image 0 (``index=`` in ``kwargs``, as for
    :func:`show_detection_cams`). Returns the paths written.

    Example:
        >>> import numpy as np, jax.numpy as jnp, tempfile
        >>> d = DetectionCAMs(*(jnp.asarray(v) for v in (np.array([[[1, 1, 6, 6]]], np.float32),
        ...     np.array([[0.9]]), np.array([[0]]), np.array([[True]]), np.array([[False]]),
        ...     np.random.rand(1, 1, 8, 8), np.array([[False]]), np.array([[0]]),
        ...     np.zeros((1, 1, 1), bool), np.zeros((1, 1, 6)))))
        >>> [os.path.basename(p) for p in save_detection_cams(tempfile.mkdtemp(), np.random.rand(8, 8, 3), d)]
        ['0.png']
    """
    os.makedirs(save_dir, exist_ok=True)
    paths = []
    for slot, img in show_detection_cams(image, dets, class_names, **kwargs):
        p = os.path.join(save_dir, f"{slot}.png")
        save_png(p, img)
        paths.append(p)
    return paths


def plot_detection_grid(image: Any, dets: DetectionCAMs, class_names: Sequence[str] | None = None, *,
                        index: int = 0, max_panels: int = 12, cols: int = 4, cell_size: float = 2.6,
                        include_constant: bool = True, **kwargs: Any) -> Any:
    """A matplotlib figure: the overlays of :func:`show_detection_cams` in a grid (slot, ``zero_grad`` and
    ``constant`` in each title: constant maps are shown, not hidden, unless ``include_constant=False``).

    Example:
        >>> import numpy as np, jax.numpy as jnp
        >>> d = DetectionCAMs(*(jnp.asarray(v) for v in (np.array([[[1, 1, 6, 6]]], np.float32),
        ...     np.array([[0.9]]), np.array([[0]]), np.array([[True]]), np.array([[False]]),
        ...     np.random.rand(1, 1, 8, 8), np.array([[False]]), np.array([[0]]),
        ...     np.zeros((1, 1, 1), bool), np.zeros((1, 1, 6)))))
        >>> len(plot_detection_grid(np.random.rand(8, 8, 3), d).axes)
        1
    """
    import matplotlib.pyplot as plt

    panels = show_detection_cams(image, dets, class_names, index=index, include_constant=include_constant,
                                 **kwargs)[:max_panels]
    if not panels:
        raise ValueError("plot_detection_grid: no selected detection to show (valid is all False)")
    n = len(panels)
    cols = min(cols, n)
    nrows = -(-n // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(cell_size * cols, cell_size * nrows), squeeze=False)
    zg = np.asarray(dets.zero_grad[index])
    const = np.asarray(dets.constant[index])
    for ax in axes.ravel():
        ax.set_axis_off()
    for ax, (slot, img) in zip(axes.ravel(), panels):
        ax.imshow(img)
        flags = " zero-grad" if zg[slot] else (" constant" if const[slot] else "")
        ax.set_title(f"#{slot}{flags}", fontsize=9)
    fig.tight_layout()
    return fig
