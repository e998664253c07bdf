"""The YOLOv5 7.0 training loss in JAX: ``utils/loss.py``'s ``ComputeLoss``, jittable with a static box count.

:func:`yolov5_loss` takes the three raw train-mode maps of :class:`flax_attn.models.YOLOv5`
(``model.train(); model(x)``, each ``(B, na, ny, nx, 5 + nc)``), padded targets ``(B, M, 5)`` with a validity
mask ``(B, M)``, and the Detect anchors in stride units (``model.model[24].anchors[...]``), and returns what
the package's ``ComputeLoss(model)(preds, targets)`` returns: ``(lbox + lobj + lcls) * B`` and the three parts.

What it reproduces (YOLOv5 7.0, ``autobalance=False``, ``gr = 1.0``, ``sort_obj_iou = False``):

* ``build_targets``: a target is matched to an anchor of a level when ``max(r, 1 / r) < anchor_t`` for both
  width and height ratios ``r = wh / anchor`` (grid units); each match also goes to the two neighbouring
  cells whose border is nearer than half a cell (offsets ``g = 0.5``, not on the outer ring: ``gxy > 1``),
  cell indices truncated then clamped to the grid, and the box target is ``(gxy - gij, gwh)`` with the
  *clamped* ``gij`` (the package clamps ``gi``/``gj`` in place, views of ``gij``, before it builds ``tbox``).
* box loss ``mean(1 - CIoU)`` over the matches of a level (``utils/metrics.bbox_iou(CIoU=True)``, eps 1e-7,
  ``alpha`` without gradient); objectness BCE against ``clamp(iou, 0)`` (no gradient) at the matched cells,
  0 elsewhere, mean over the whole map, times ``balance[level]``; class BCE (``nc > 1`` only) against
  ``smooth_BCE(label_smoothing)`` targets, mean over matches x classes; ``BCEWithLogitsLoss(pos_weight)``
  with ``cls_pw`` / ``obj_pw``; the package's ``FocalLoss(gamma=fl_gamma, alpha=0.25)`` when ``fl_gamma > 0``.
* **duplicates**: when several matches hit the same ``(image, anchor, cell)``, the package's
  ``tobj[b, a, gj, gi] = iou`` keeps the *last* write (CPU ``index_put_``, sequential); the package's match
  order is (neighbour offset, anchor, target row), so the winner is the match latest in that order. Every
  match still counts in the box and class losses.

Static shapes: the number of matches is dynamic in PyTorch; here every level evaluates all
``5 * na * B * M`` candidate (offset, anchor, target) triples (at most 3 of the 5 offsets are ever active)
with masks, so a new ``M``, batch size, grid or class count recompiles, the values of the targets do not.
Padding rows (``valid == False``) never match anything.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["YOLOv5LossHyp", "yolov5_loss"]

# the package's build_targets offsets (centre, then the j, k, l, m neighbours), in units of g = 0.5
_OFFSETS = np.array([[0, 0], [1, 0], [0, 1], [-1, 0], [0, -1]], np.float32) * 0.5
_G = 0.5
_EPS = 1e-7


@dataclasses.dataclass(frozen=True)
class YOLOv5LossHyp:
    """Loss hyper-parameters of YOLOv5 7.0 (defaults: ``data/hyps/hyp.scratch-low.yaml``, unscaled).

    ``box`` / ``obj`` / ``cls`` are the gains of the three parts, ``cls_pw`` / ``obj_pw`` the BCE
    ``pos_weight`` s, ``anchor_t`` the anchor-multiple threshold of the matching, ``fl_gamma`` the focal-loss
    gamma (0 = plain BCE), ``label_smoothing`` the class label smoothing eps (targets ``1 - eps/2``, ``eps/2``).
    YOLOv5's ``train.py`` rescales the gains to the class count, image size and number of levels before
    training: use :meth:`scaled` for that.

    Example:
        >>> YOLOv5LossHyp.scaled(num_classes=10, img_size=320).obj
        0.25
    """

    box: float = 0.05
    obj: float = 1.0
    cls: float = 0.5
    cls_pw: float = 1.0
    obj_pw: float = 1.0
    anchor_t: float = 4.0
    fl_gamma: float = 0.0
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise TypeError(f"YOLOv5LossHyp.{f.name}: expected a finite float, got {v!r}")
            if v < 0:
                raise ValueError(f"YOLOv5LossHyp.{f.name}: expected a value >= 0, got {v!r}")
        if self.anchor_t <= 1.0:
            raise ValueError(f"YOLOv5LossHyp.anchor_t: expected a ratio > 1 (YOLOv5 uses 4.0), got {self.anchor_t!r}")
        if self.label_smoothing > 1.0:
            raise ValueError(f"YOLOv5LossHyp.label_smoothing: expected eps in [0, 1], got {self.label_smoothing!r}")

    @classmethod
    def scaled(cls, num_classes: int, img_size: int, nl: int = 3, **overrides: float) -> YOLOv5LossHyp:
        """The gains as YOLOv5's ``train.py`` scales them: ``box *= 3 / nl``, ``cls *= nc / 80 * 3 / nl``,
        ``obj *= (img_size / 640) ** 2 * 3 / nl``. ``overrides`` replace the *unscaled* values first (as
        editing the hyp YAML does); ``cls_pw``, ``obj_pw``, ``anchor_t``, ``fl_gamma`` and
        ``label_smoothing`` are not scaled.

        Example:
            >>> h = YOLOv5LossHyp.scaled(num_classes=80, img_size=320, box=0.1)
            >>> (h.box, h.cls, h.obj)
            (0.1, 0.5, 0.25)
        """
        for name, v in (("num_classes", num_classes), ("img_size", img_size), ("nl", nl)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"YOLOv5LossHyp.scaled: {name} must be a positive int, got {v!r}")
        base = cls(**overrides)
        return dataclasses.replace(
            base,
            box=base.box * (3 / nl),                                   # the package's in-place *= order
            cls=base.cls * (num_classes / 80 * 3 / nl),
            obj=base.obj * ((img_size / 640) ** 2 * 3 / nl),
        )


def _bce_with_logits(x: jax.Array, t: jax.Array, pos_weight: float) -> jax.Array:
    """Elementwise ``torch.nn.BCEWithLogitsLoss(pos_weight=..., reduction='none')`` (torch's stable form)."""
    log_weight = (pos_weight - 1.0) * t + 1.0
    return (1.0 - t) * x + log_weight * (jnp.log1p(jnp.exp(-jnp.abs(x))) + jnp.maximum(-x, 0.0))


def _criterion(x: jax.Array, t: jax.Array, pos_weight: float, gamma: float) -> jax.Array:
    """Elementwise BCE, wrapped in YOLOv5's ``FocalLoss(gamma, alpha=0.25)`` when ``gamma > 0``."""
    loss = _bce_with_logits(x, t, pos_weight)
    if gamma > 0:
        p = jax.nn.sigmoid(x)
        p_t = t * p + (1 - t) * (1 - p)
        alpha_factor = t * 0.25 + (1 - t) * (1 - 0.25)
        loss = loss * (alpha_factor * (1.0 - p_t) ** gamma)
    return loss


def _ciou(b1: jax.Array, b2: jax.Array) -> jax.Array:
    """``utils/metrics.bbox_iou(b1, b2, xywh=True, CIoU=True)`` elementwise over ``(..., 4)`` boxes."""
    x1, y1, w1, h1 = (b1[..., k] for k in range(4))
    x2, y2, w2, h2 = (b2[..., k] for k in range(4))
    w1_, h1_, w2_, h2_ = w1 / 2, h1 / 2, w2 / 2, h2 / 2
    b1_x1, b1_x2, b1_y1, b1_y2 = x1 - w1_, x1 + w1_, y1 - h1_, y1 + h1_
    b2_x1, b2_x2, b2_y1, b2_y2 = x2 - w2_, x2 + w2_, y2 - h2_, y2 + h2_
    inter = (jnp.clip(jnp.minimum(b1_x2, b2_x2) - jnp.maximum(b1_x1, b2_x1), 0)
             * jnp.clip(jnp.minimum(b1_y2, b2_y2) - jnp.maximum(b1_y1, b2_y1), 0))
    union = w1 * h1 + w2 * h2 - inter + _EPS
    iou = inter / union
    cw = jnp.maximum(b1_x2, b2_x2) - jnp.minimum(b1_x1, b2_x1)
    ch = jnp.maximum(b1_y2, b2_y2) - jnp.minimum(b1_y1, b2_y1)
    c2 = cw**2 + ch**2 + _EPS
    rho2 = ((b2_x1 + b2_x2 - b1_x1 - b1_x2) ** 2 + (b2_y1 + b2_y2 - b1_y1 - b1_y2) ** 2) / 4
    v = (4 / math.pi**2) * (jnp.arctan(w2 / h2) - jnp.arctan(w1 / h1)) ** 2
    alpha = jax.lax.stop_gradient(v / (v - iou + (1 + _EPS)))
    return iou - (rho2 / c2 + v * alpha)


def _is_concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check_inputs(preds: Any, targets: Any, valid: Any, anchors: Any,
                  balance: Sequence[float]) -> tuple[list[jax.Array], jax.Array, jax.Array, jax.Array, int]:
    if not isinstance(preds, (tuple, list)) or not preds:
        raise TypeError(f"yolov5_loss: preds must be the tuple of raw per-level maps of model.train(); model(x), "
                        f"got {type(preds).__name__}")
    ps = [jnp.asarray(p) for p in preds]
    nl = len(ps)
    for i, p in enumerate(ps):
        if p.ndim != 5:
            raise ValueError(f"yolov5_loss: preds[{i}] must be a raw train-mode map (B, na, ny, nx, 5 + nc), got shape "
                             f"{tuple(p.shape)} (eval mode returns the decoded (B, N, 5 + nc): call model.train())")
        if not jnp.issubdtype(p.dtype, jnp.floating):
            raise TypeError(f"yolov5_loss: preds[{i}] must be floating point, got {p.dtype}")
    b, na, _, _, no = ps[0].shape
    if no < 6:
        raise ValueError(f"yolov5_loss: preds[0] last axis must be 5 + nc >= 6, got {no}")
    for i, p in enumerate(ps):
        if (p.shape[0], p.shape[1], p.shape[4]) != (b, na, no) or p.dtype != ps[0].dtype:
            raise ValueError(f"yolov5_loss: preds[{i}] has shape {tuple(p.shape)} / {p.dtype}, expected (B={b}, na={na}, "
                             f"ny, nx, {no}) / {ps[0].dtype} like preds[0]")
    anchors = jnp.asarray(anchors)
    if anchors.shape != (nl, na, 2):
        raise ValueError(f"yolov5_loss: anchors must be (nl={nl}, na={na}, 2) in stride units "
                         f"(model.model[24].anchors[...]), got {tuple(anchors.shape)}")
    targets = jnp.asarray(targets)
    if targets.ndim != 3 or targets.shape[0] != b or targets.shape[2] != 5:
        raise ValueError(f"yolov5_loss: targets must be (B={b}, M, 5) rows [class, cx, cy, w, h] normalised to [0, 1], "
                         f"got {tuple(targets.shape)}")
    valid = jnp.asarray(valid)
    if valid.shape != targets.shape[:2]:
        raise ValueError(f"yolov5_loss: valid must be a (B, M) = {tuple(targets.shape[:2])} mask, got {tuple(valid.shape)}")
    if valid.dtype != jnp.bool_:
        raise TypeError(f"yolov5_loss: valid must be a bool mask, got {valid.dtype}")
    if len(balance) != nl:
        raise ValueError(f"yolov5_loss: balance must have one weight per level ({nl}), got {tuple(balance)}")
    nc = no - 5
    if _is_concrete(targets) and _is_concrete(valid):
        t, v = np.asarray(targets), np.asarray(valid)
        rows = t[v]
        if rows.size:
            cls = rows[:, 0]
            bad = (cls < 0) | (cls >= nc) | (cls != np.floor(cls))
            if bad.any():
                raise ValueError(f"yolov5_loss: target classes must be integers in [0, {nc}), got "
                                 f"{sorted(set(cls[bad].tolist()))[:5]}")
            if not np.isfinite(rows).all() or (rows[:, 3:5] <= 0).any():
                raise ValueError("yolov5_loss: valid target boxes must be finite with w > 0 and h > 0 (mask padding rows "
                                 "with valid=False)")
    return ps, targets.astype(ps[0].dtype), valid, anchors.astype(ps[0].dtype), nc


def yolov5_loss(preds: Sequence[jax.Array], targets: jax.Array, valid: jax.Array, *, anchors: jax.Array,
                hyp: YOLOv5LossHyp = YOLOv5LossHyp(),
                balance: Sequence[float] = (4.0, 1.0, 0.4)) -> tuple[jax.Array, jax.Array]:
    """YOLOv5 7.0's ``ComputeLoss`` (see the module docstring): returns ``(loss, parts)``.

    Args:
        preds: the raw per-level maps of ``model.train(); model(x)``, each ``(B, na, ny, nx, 5 + nc)``.
        targets: ``(B, M, 5)`` rows ``[class, cx, cy, w, h]``, the box normalised to ``[0, 1]`` of the input
            size (the YOLO label format); ``M`` is a static maximum, pad with anything.
        valid: ``(B, M)`` bool, ``False`` on padding rows (never matched, never counted).
        anchors: ``(nl, na, 2)`` anchors in stride units, ``model.model[24].anchors[...]``.
        hyp: the gains (:class:`YOLOv5LossHyp`; YOLOv5 training scales them with :meth:`YOLOv5LossHyp.scaled`).
        balance: per-level objectness weights (YOLOv5: ``(4.0, 1.0, 0.4)`` for P3-P5).

    Returns:
        ``loss = (lbox + lobj + lcls) * B`` (a scalar) and ``parts = [lbox, lobj, lcls]`` (gains applied, not
        times ``B``): the package's ``ComputeLoss(...)`` ``[0]`` and ``[1]``. Both are differentiable;
        traceable under ``jax.jit`` (the value checks on classes and box sizes run only on concrete inputs).

    Example:
        >>> from flax import nnx
        >>> from flax_attn.models import create_model
        >>> model = create_model("yolov5n", num_classes=3, rngs=nnx.Rngs(0))
        >>> model.train()
        >>> preds = model(jnp.ones((2, 64, 64, 3)))
        >>> targets = jnp.array([[[1, 0.5, 0.5, 0.2, 0.3]], [[0, 0.0, 0.0, 0.0, 0.0]]])
        >>> valid = jnp.array([[True], [False]])
        >>> loss, parts = yolov5_loss(preds, targets, valid, anchors=model.model[24].anchors[...])
        >>> loss.shape, parts.shape
        ((), (3,))
    """
    if not isinstance(hyp, YOLOv5LossHyp):
        raise TypeError(f"yolov5_loss: hyp must be a YOLOv5LossHyp, got {type(hyp).__name__}")
    balance = tuple(float(w) for w in balance)
    ps, targets, valid, anchors, nc = _check_inputs(preds, targets, valid, anchors, balance)
    dt = ps[0].dtype
    bs, na, m = ps[0].shape[0], ps[0].shape[1], targets.shape[1]
    cp, cn = 1.0 - 0.5 * hyp.label_smoothing, 0.5 * hyp.label_smoothing
    off = jnp.asarray(_OFFSETS, dt)[:, None, None, None, :]                     # (5, 1, 1, 1, 2)
    # the package's match order: (offset, anchor, target row); a later match wins a duplicate tobj cell
    order = jnp.arange(5 * na * bs * m, dtype=jnp.int32).reshape(5, na, bs, m)
    b_idx = jnp.arange(bs)[None, None, :, None]
    a_idx = jnp.arange(na)[None, :, None, None]
    cls_idx = targets[..., 0].astype(jnp.int32)                                 # (B, M), truncation as .long()

    lbox = jnp.zeros((), dt)
    lobj = jnp.zeros((), dt)
    lcls = jnp.zeros((), dt)
    for i, pi in enumerate(ps):
        ny, nx = pi.shape[2], pi.shape[3]
        gain = jnp.asarray([nx, ny], dt)
        gxy = targets[..., 1:3] * gain                                          # (B, M, 2) grid units
        gwh = targets[..., 3:5] * gain
        anc = anchors[i]                                                        # (na, 2)
        r = gwh[None] / anc[:, None, None, :]                                   # (na, B, M, 2)
        match_a = (jnp.max(jnp.maximum(r, 1 / r), axis=-1) < hyp.anchor_t) & valid[None]
        gxi = gain - gxy
        jk = (gxy % 1 < _G) & (gxy > 1)
        lm = (gxi % 1 < _G) & (gxi > 1)
        use_off = jnp.stack([jnp.ones_like(jk[..., 0]), jk[..., 0], jk[..., 1], lm[..., 0], lm[..., 1]])  # (5, B, M)
        mask = match_a[None] & use_off[:, None]                                 # (5, na, B, M)

        gij = jnp.trunc(gxy[None, None] - off).astype(jnp.int32)               # (5, 1, B, M, 2)
        gi = jnp.clip(gij[..., 0], 0, nx - 1)
        gj = jnp.clip(gij[..., 1], 0, ny - 1)
        gi, gj = (jnp.broadcast_to(v, mask.shape) for v in (gi, gj))
        txy = gxy[None, None] - jnp.stack([gi, gj], axis=-1).astype(dt)        # clamped gij, as the package
        tbox = jnp.concatenate([txy, jnp.broadcast_to(gwh[None, None], txy.shape)], axis=-1)

        sel = pi[b_idx, a_idx, gj, gi]                                          # (5, na, B, M, 5 + nc)
        # masked-out candidates get harmless values (finite CIoU, zero gradient through the where)
        sel = jnp.where(mask[..., None], sel, 0.0)
        tbox = jnp.where(mask[..., None], tbox, jnp.asarray([0.5, 0.5, 1.0, 1.0], dt))
        pxy = jax.nn.sigmoid(sel[..., 0:2]) * 2 - 0.5
        pwh = (jax.nn.sigmoid(sel[..., 2:4]) * 2) ** 2 * anc[None, :, None, None, :]
        iou = _ciou(jnp.concatenate([pxy, pwh], axis=-1), tbox)                 # (5, na, B, M)
        n = jnp.sum(mask)
        nf = jnp.maximum(n, 1).astype(dt)
        lbox = lbox + jnp.sum(jnp.where(mask, 1.0 - iou, 0.0)) / nf

        # objectness target: clamp(iou, 0) without gradient; the last write wins a duplicate cell
        cell = ((b_idx * na + a_idx) * ny + gj) * nx + gi                      # (5, na, B, M)
        size = bs * na * ny * nx
        last = jnp.full((size,), -1, jnp.int32).at[cell.ravel()].max(jnp.where(mask, order, -1).ravel())
        win = mask & (last[cell] == order)
        tobj = jnp.zeros((size,), dt).at[jnp.where(win, cell, size).ravel()].set(
            jax.lax.stop_gradient(jnp.clip(iou, 0)).ravel(), mode="drop").reshape(pi.shape[:4])
        lobj = lobj + jnp.mean(_criterion(pi[..., 4], tobj, hyp.obj_pw, hyp.fl_gamma)) * balance[i]

        if nc > 1:
            t = jnp.where(jax.nn.one_hot(cls_idx, nc, dtype=jnp.bool_)[None, None], cp, cn).astype(dt)
            lc = _criterion(sel[..., 5:], jnp.broadcast_to(t, sel[..., 5:].shape), hyp.cls_pw, hyp.fl_gamma)
            lcls = lcls + jnp.sum(jnp.where(mask[..., None], lc, 0.0)) / (nf * nc)

    lbox, lobj, lcls = lbox * hyp.box, lobj * hyp.obj, lcls * hyp.cls
    return (lbox + lobj + lcls) * bs, jnp.stack([lbox, lobj, lcls])
