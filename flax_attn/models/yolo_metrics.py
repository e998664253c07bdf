"""COCO-style detection mAP (mAP@0.5 and mAP@0.5:0.95) in numpy, the numbers of ``pycocotools``' COCOeval.

:func:`detection_map` reproduces ``COCOeval(gt, dt, "bbox")`` with ``evaluate(); accumulate()`` and the
first two ``summarize()`` statistics, for area range "all" and ``maxDets = 100``, without pycocotools (the
train extras do not install it; the test suite checks equality against it):

* per image and class, detections sorted by descending score (stable, as COCOeval's mergesort) and cut to
  the ``max_dets`` best; box IoU as pycocotools' ``bbIou`` (from ``x, y, w, h``, in float64);
* per IoU threshold ``t`` in ``linspace(0.5, 0.95, 10)``, greedy matching in score order: a detection takes
  the not yet matched ground truth with the highest IoU ``>= min(t, 1 - 1e-10)`` (ties: the later ground
  truth, as COCOeval's loop);
* per class, the detections of all images sorted by score (stable, images in order), precision and recall
  cumulated, precision made monotone from the right, read at the 101 recall thresholds
  ``linspace(0, 1, 101)`` (``searchsorted(..., "left")``, 0 past the last recall);
* mAP = mean over the classes that have ground truth (COCOeval's ``precision > -1``) and, for
  mAP@0.5:0.95, over the 10 thresholds; a class without ground truth is left out (its detections count
  nowhere) and its per-class AP is NaN. With no ground truth at all both means are -1, like COCOeval.

Not reproduced: crowd annotations (``iscrowd``), the small/medium/large area ranges and maxDets 1/10.
Ground-truth "area" is the box area here (COCO json files carry segmentation areas; for range "all" it does
not matter unless a box is larger than ``1e5 x 1e5``, which is rejected).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from flax_attn.models.yolo_ops import Detections

__all__ = ["COCO_IOU_THRESHOLDS", "COCO_RECALL_THRESHOLDS", "DetectionMetrics", "detection_map"]

#: COCOeval's IoU thresholds 0.50:0.05:0.95 (``np.linspace`` exactly as pycocotools builds them)
COCO_IOU_THRESHOLDS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)
#: COCOeval's 101 recall thresholds 0:0.01:1
COCO_RECALL_THRESHOLDS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)
_MAX_AREA = 1e5**2  # COCO's area range "all" is [0, 1e5 ** 2]


@dataclasses.dataclass(frozen=True)
class DetectionMetrics:
    """Result of :func:`detection_map`.

    Attributes:
        map50: mAP@0.5 (COCOeval ``stats[1]``), -1 if no class has ground truth.
        map50_95: mAP@0.5:0.95 (COCOeval ``stats[0]``), -1 if no class has ground truth.
        ap50_per_class: ``(num_classes,)`` AP@0.5 per class, NaN where a class has no ground truth.
        ap50_95_per_class: ``(num_classes,)`` AP@0.5:0.95 per class, NaN likewise.
        num_gt: ``(num_classes,)`` ground-truth boxes per class.
        precision: ``(10, 101, num_classes)`` interpolated precision (COCOeval ``eval["precision"][..., 0, -1]``:
            IoU threshold x recall threshold x class, -1 for classes without ground truth).
        recall: ``(10, num_classes)`` final recall per threshold and class (-1 without ground truth).
    """

    map50: float
    map50_95: float
    ap50_per_class: np.ndarray
    ap50_95_per_class: np.ndarray
    num_gt: np.ndarray
    precision: np.ndarray
    recall: np.ndarray

    @property
    def classes_present(self) -> np.ndarray:
        """Indices of the classes that have ground truth (those the means run over)."""
        return np.flatnonzero(self.num_gt > 0)


def _boxes(v: Any, what: str) -> np.ndarray:
    b = np.asarray(v, dtype=np.float64)
    if b.size == 0:
        return b.reshape(0, 4)
    if b.ndim != 2 or b.shape[1] != 4:
        raise ValueError(f"detection_map: {what} boxes must be (n, 4) xyxy, got shape {b.shape}")
    if not np.isfinite(b).all():
        raise ValueError(f"detection_map: {what} boxes must be finite")
    if (b[:, 2] < b[:, 0]).any() or (b[:, 3] < b[:, 1]).any():
        raise ValueError(f"detection_map: {what} boxes must be xyxy with x2 >= x1 and y2 >= y1, got "
                         f"{b[(b[:, 2] < b[:, 0]) | (b[:, 3] < b[:, 1])][:3].tolist()} (xywh passed?)")
    if ((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) > _MAX_AREA).any():
        raise ValueError(f"detection_map: {what} boxes larger than COCO's 'all' area range (1e5 x 1e5)")
    return b


def _classes(v: Any, n: int, num_classes: int, what: str) -> np.ndarray:
    c = np.asarray(v)
    if c.size == 0 and n == 0:
        return np.zeros((0,), np.int64)
    if c.shape != (n,):
        raise ValueError(f"detection_map: {what} classes must be ({n},) like its boxes, got shape {c.shape}")
    if not (np.issubdtype(c.dtype, np.integer) or (np.issubdtype(c.dtype, np.floating) and (c == np.round(c)).all())):
        raise TypeError(f"detection_map: {what} classes must be integers, got {c.dtype} {c[:5].tolist()}")
    c = c.astype(np.int64)
    if ((c < 0) | (c >= num_classes)).any():
        raise ValueError(f"detection_map: {what} classes must be in [0, {num_classes}), got {np.unique(c)[:10].tolist()}")
    return c


def _fields(item: Any, keys: tuple[str, ...], what: str) -> tuple[Any, ...]:
    if isinstance(item, Mapping):
        missing = [k for k in keys if k not in item]
        if missing:
            raise ValueError(f"detection_map: {what} is missing {missing} (expected keys {list(keys)})")
        return tuple(item[k] for k in keys)
    if isinstance(item, (tuple, list)) and len(item) == len(keys):
        return tuple(item)
    raise TypeError(f"detection_map: {what} must be a mapping with keys {list(keys)} or a tuple ({', '.join(keys)}), "
                    f"got {type(item).__name__}")


def _split_detections(detections: Any) -> list[Any]:
    """A batched :class:`Detections` (``non_max_suppression`` output) -> one (boxes, scores, classes) per image."""
    if isinstance(detections, Detections):
        boxes, scores, classes, valid = (np.asarray(a) for a in detections[:4])
        return [(boxes[i][valid[i]], scores[i][valid[i]], classes[i][valid[i]]) for i in range(boxes.shape[0])]
    return list(detections)


def _xywh(b: np.ndarray) -> np.ndarray:
    """xyxy -> COCO's ``[x, y, w, h]`` (what a COCO results file holds)."""
    return np.concatenate([b[:, :2], b[:, 2:] - b[:, :2]], axis=1)


def _bb_iou(d: np.ndarray, g: np.ndarray) -> np.ndarray:
    """pycocotools' ``bbIou`` (non-crowd) on xywh boxes: ``(D, G)`` IoU, 0 without overlap."""
    w = np.minimum(d[:, None, 2] + d[:, None, 0], g[None, :, 2] + g[None, :, 0]) - np.maximum(d[:, None, 0], g[None, :, 0])
    h = np.minimum(d[:, None, 3] + d[:, None, 1], g[None, :, 3] + g[None, :, 1]) - np.maximum(d[:, None, 1], g[None, :, 1])
    inter = w * h
    union = (d[:, 2] * d[:, 3])[:, None] + (g[:, 2] * g[:, 3])[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = inter / union
    return np.where((w > 0) & (h > 0), iou, 0.0)


def _match(iou: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """COCOeval's greedy matching: ``(T, D)`` bool, detection ``d`` (score order) matched at threshold ``t``."""
    t_count, (d_count, g_count) = len(thresholds), iou.shape
    matched = np.zeros((t_count, d_count), bool)
    if g_count == 0:
        return matched
    taken = np.zeros((t_count, g_count), bool)
    thr = np.minimum(thresholds, 1 - 1e-10)[:, None]
    rows = np.arange(t_count)
    for d in range(d_count):
        ok = ~taken & (iou[d][None, :] >= thr)
        val = np.where(ok, iou[d][None, :], -np.inf)
        m = g_count - 1 - np.argmax(val[:, ::-1], axis=1)       # the last ground truth with the best IoU
        hit = ok.any(axis=1)
        matched[:, d] = hit
        taken[rows[hit], m[hit]] = True
    return matched


def detection_map(detections: Sequence[Any] | Detections, ground_truths: Sequence[Any], num_classes: int, *,
                  max_dets: int = 100) -> DetectionMetrics:
    """COCO mAP@0.5 and mAP@0.5:0.95 of per-image detections against ground truth (see the module docstring).

    Args:
        detections: one entry per image, each a mapping ``{"boxes", "scores", "classes"}`` or a tuple
            ``(boxes, scores, classes)``: boxes ``(n, 4)`` xyxy (any pixel frame, the same as the ground
            truth), scores ``(n,)``, integer classes ``(n,)``; or the batched :class:`Detections` of
            :func:`non_max_suppression` (its ``valid`` slots are taken).
        ground_truths: one entry per image (same order), ``{"boxes", "classes"}`` or ``(boxes, classes)``.
        num_classes: classes are ``0 .. num_classes - 1``.
        max_dets: detections kept per image and class, best scores first (COCO: 100).

    Returns:
        :class:`DetectionMetrics`; ``map50`` / ``map50_95`` equal COCOeval's ``stats[1]`` / ``stats[0]``.

    Example:
        >>> gt = [{"boxes": [[10, 10, 50, 50]], "classes": [0]}]
        >>> det = [{"boxes": [[12, 10, 50, 52], [60, 60, 70, 70]], "scores": [0.9, 0.8], "classes": [0, 0]}]
        >>> m = detection_map(det, gt, num_classes=2)
        >>> round(m.map50, 3), round(m.map50_95, 3), m.classes_present.tolist()
        (1.0, 0.9, [0])
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"detection_map: num_classes must be a positive int, got {num_classes!r}")
    if isinstance(max_dets, bool) or not isinstance(max_dets, (int, np.integer)) or max_dets < 1:
        raise ValueError(f"detection_map: max_dets must be a positive int, got {max_dets!r}")
    dets = _split_detections(detections)
    gts = list(ground_truths)
    if len(dets) != len(gts):
        raise ValueError(f"detection_map: {len(dets)} images of detections but {len(gts)} of ground truth "
                         "(one entry per image, same order)")
    thresholds, rec_thrs = COCO_IOU_THRESHOLDS, COCO_RECALL_THRESHOLDS
    n_t, n_r = len(thresholds), len(rec_thrs)
    scores_k: list[list[np.ndarray]] = [[] for _ in range(num_classes)]
    matched_k: list[list[np.ndarray]] = [[] for _ in range(num_classes)]
    num_gt = np.zeros(num_classes, np.int64)
    for i, (det, gt) in enumerate(zip(dets, gts)):
        gb, gc = _fields(gt, ("boxes", "classes"), f"ground_truths[{i}]")
        gb = _boxes(gb, f"ground_truths[{i}]")
        gc = _classes(gc, len(gb), num_classes, f"ground_truths[{i}]")
        db, ds, dc = _fields(det, ("boxes", "scores", "classes"), f"detections[{i}]")
        db = _boxes(db, f"detections[{i}]")
        ds = np.asarray(ds, np.float64).reshape(-1) if np.size(ds) else np.zeros((0,), np.float64)
        if ds.shape != (len(db),) or not np.isfinite(ds).all():
            raise ValueError(f"detection_map: detections[{i}] scores must be ({len(db)},) finite, got {np.shape(ds)}")
        dc = _classes(dc, len(db), num_classes, f"detections[{i}]")
        num_gt += np.bincount(gc, minlength=num_classes)
        for k in np.union1d(np.unique(gc), np.unique(dc)):
            dk = np.flatnonzero(dc == k)
            dk = dk[np.argsort(-ds[dk], kind="mergesort")][:max_dets]
            iou = _bb_iou(_xywh(db[dk]), _xywh(gb[gc == k]))
            scores_k[k].append(ds[dk])
            matched_k[k].append(_match(iou, thresholds))

    precision = -np.ones((n_t, n_r, num_classes))
    recall = -np.ones((n_t, num_classes))
    for k in range(num_classes):
        if num_gt[k] == 0:
            continue
        s = np.concatenate(scores_k[k]) if scores_k[k] else np.zeros((0,))
        order = np.argsort(-s, kind="mergesort")
        tps = (np.concatenate(matched_k[k], axis=1) if matched_k[k] else np.zeros((n_t, 0), bool))[:, order]
        tp = np.cumsum(tps, axis=1).astype(float)
        fp = np.cumsum(~tps, axis=1).astype(float)
        nd = tps.shape[1]
        for t in range(n_t):
            rc = tp[t] / num_gt[k]
            pr = tp[t] / (fp[t] + tp[t] + np.spacing(1))
            recall[t, k] = rc[-1] if nd else 0
            pr = np.maximum.accumulate(pr[::-1])[::-1] if nd else pr
            inds = np.searchsorted(rc, rec_thrs, side="left")
            q = np.zeros(n_r)
            ok = inds < nd
            q[ok] = pr[inds[ok]]
            precision[t, :, k] = q

    def _mean(p: np.ndarray) -> float:
        v = p[p > -1]
        return float(np.mean(v)) if v.size else -1.0

    present = num_gt > 0
    ap50 = np.full(num_classes, np.nan)
    ap = np.full(num_classes, np.nan)
    ap50[present] = precision[0][:, present].mean(axis=0)
    ap[present] = precision[:, :, present].mean(axis=(0, 1))
    return DetectionMetrics(map50=_mean(precision[0]), map50_95=_mean(precision), ap50_per_class=ap50,
                            ap50_95_per_class=ap, num_gt=num_gt, precision=precision, recall=recall)
