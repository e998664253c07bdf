"""COCO mAP (:func:`flax_attn.models.detection_map`) against pycocotools' COCOeval on the same detections.

pycocotools (a test extra, not a dependency of the library) is the reference: the same ground truth and
detections go through ``COCO`` / ``loadRes`` / ``COCOeval(..., "bbox")``; we compare ``stats[0]``
(mAP@0.5:0.95), ``stats[1]`` (mAP@0.5) and the whole interpolated precision and recall arrays for area
"all", maxDets 100 (float64 both sides, so equal to 1e-12). Cases: jittered true positives with false
positives and misses, an empty image, an image with detections only, a class with detections but no
ground truth, a crowded cluster of overlapping boxes, tied scores, more than 100 detections of one class
in one image, integer-valued pixel boxes.
"""

from __future__ import annotations

import contextlib
import io

import jax.numpy as jnp
import numpy as np
import pytest

from flax_attn.models import COCO_IOU_THRESHOLDS, DetectionMetrics, Detections, detection_map


def _coco(dets, gts, nc):
    """COCOeval on the same data: (stats[0], stats[1], precision (T, R, K), recall (T, K)), area all, 100 dets."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    def xywh(b):
        x1, y1, x2, y2 = (float(v) for v in b)
        return [x1, y1, x2 - x1, y2 - y1]

    anns = []
    for i, (boxes, classes) in enumerate(gts):
        for b, c in zip(boxes, classes):
            w = xywh(b)
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": int(c) + 1, "bbox": w,
                         "area": w[2] * w[3], "iscrowd": 0})
    res = [{"image_id": i + 1, "category_id": int(c) + 1, "bbox": xywh(b), "score": float(s)}
           for i, (boxes, scores, classes) in enumerate(dets) for b, s, c in zip(boxes, scores, classes)]
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": [{"id": i + 1, "width": 640, "height": 640} for i in range(len(gts))],
                      "annotations": anns, "categories": [{"id": k + 1, "name": str(k)} for k in range(nc)]}
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(res), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats[0], ev.stats[1], ev.eval["precision"][:, :, :, 0, 2], ev.eval["recall"][:, :, 0, 2]


def _check(dets, gts, nc) -> DetectionMetrics:
    m = detection_map(dets, gts, nc)
    s0, s1, prec, rec = _coco(dets, gts, nc)
    np.testing.assert_allclose(m.precision, prec, rtol=0, atol=1e-12)
    np.testing.assert_allclose(m.recall, rec, rtol=0, atol=1e-12)
    assert abs(m.map50_95 - s0) <= 1e-12 and abs(m.map50 - s1) <= 1e-12, (m.map50, s1, m.map50_95, s0)
    return m


def _box(rng, n, lo=0.0, hi=600.0, smin=4.0, smax=200.0):
    xy = rng.uniform(lo, hi, (n, 2))
    wh = rng.uniform(smin, smax, (n, 2))
    return np.concatenate([xy, xy + wh], 1)


def _scene(seed, n_img=8, nc=4):
    """Ground truth with a class (nc - 1) that never occurs, detections = jittered ground truth (some missed,
    some badly placed) + false positives (also of class nc - 1); image 2 empty, image 3 detections only,
    image 4 a crowded cluster."""
    rng = np.random.default_rng(seed)
    gts, dets = [], []
    for i in range(n_img):
        n = 0 if i in (2, 3) else int(rng.integers(1, 9))
        gb = _box(rng, n)
        if i == 4:                                            # crowded: 12 boxes jittered around one spot
            gb = np.array([100, 100, 160, 150]) + rng.normal(0, 6, (12, 4))
            gb[:, 2:] = np.maximum(gb[:, 2:], gb[:, :2] + 1)
            n = 12
        gc = rng.integers(0, nc - 1, n)
        keep = rng.uniform(size=n) > 0.2                      # ~20 % missed
        jitter = rng.normal(0, 1, (n, 4)) * np.tile(gb[:, 2:] - gb[:, :2], 2) * rng.choice([0.02, 0.08, 0.3], (n, 1))
        db = gb + jitter
        db = np.concatenate([np.minimum(db[:, :2], db[:, 2:]), np.maximum(db[:, :2], db[:, 2:])], 1)[keep]
        dc = gc[keep].copy()
        nfp = 0 if i == 2 else int(rng.integers(0, 6))
        db = np.concatenate([db, _box(rng, nfp)])
        dc = np.concatenate([dc, rng.integers(0, nc, nfp)])
        if i == 4:                                            # duplicates on the crowd
            db = np.concatenate([db, db[:4] + 1.0])
            dc = np.concatenate([dc, dc[:4]])
        ds = rng.uniform(0.05, 1.0, len(db))
        gts.append((gb, gc))
        dets.append((db, ds, dc))
    return dets, gts


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_equals_cocoeval_on_random_scenes(seed):
    dets, gts = _scene(seed)
    m = _check(dets, gts, 4)
    assert np.isnan(m.ap50_per_class[3]) and m.num_gt[3] == 0 and 3 not in m.classes_present
    assert 0 < m.map50_95 < m.map50 < 1                       # not a degenerate case
    np.testing.assert_allclose(np.nanmean(m.ap50_per_class), m.map50, rtol=1e-12)
    np.testing.assert_allclose(np.nanmean(m.ap50_95_per_class), m.map50_95, rtol=1e-12)


def test_equals_cocoeval_with_tied_scores_and_integer_boxes():
    dets, gts = _scene(7, n_img=6, nc=3)
    dets = [(np.round(b), np.round(s * 4) / 4, c) for b, s, c in dets]   # scores in {0, .25, .5, .75, 1}
    gts = [(np.round(b), c) for b, c in gts]
    dets = [(np.concatenate([b[:, :2], np.maximum(b[:, 2:], b[:, :2])], 1), s, c) for b, s, c in dets]
    _check(dets, gts, 3)


def test_more_than_max_dets_per_image_and_class():
    """130 detections of one class in one image: COCO keeps the 100 best of each (image, class)."""
    rng = np.random.default_rng(11)
    gb = _box(rng, 40)
    db = np.concatenate([gb + rng.normal(0, 2, gb.shape), _box(rng, 90)])
    db = np.concatenate([np.minimum(db[:, :2], db[:, 2:]), np.maximum(db[:, :2], db[:, 2:])], 1)
    ds = rng.uniform(0, 1, len(db))
    ds[:40] *= 0.5                                            # many true positives fall below the top 100
    dets = [(db, ds, np.zeros(len(db), int)), (gb[:5], np.ones(5), np.ones(5, int))]
    gts = [(gb, np.zeros(40, int)), (gb[:5], np.ones(5, int))]
    m = _check(dets, gts, 2)
    full = detection_map(dets, gts, 2, max_dets=200)
    assert full.ap50_per_class[0] > m.ap50_per_class[0]       # the cut-off really dropped matches


def test_simple_known_values():
    gt = [{"boxes": [[0, 0, 10, 10], [20, 20, 30, 30]], "classes": [0, 1]}, {"boxes": np.zeros((0, 4)), "classes": []}]
    perfect = [{"boxes": [[0, 0, 10, 10], [20, 20, 30, 30]], "scores": [0.9, 0.8], "classes": [0, 1]},
               {"boxes": [], "scores": [], "classes": []}]
    m = detection_map(perfect, gt, 3)
    assert m.map50 == pytest.approx(1.0) and m.map50_95 == pytest.approx(1.0)
    assert m.num_gt.tolist() == [1, 1, 0]
    none = [{"boxes": [], "scores": [], "classes": []}] * 2
    m0 = detection_map(none, gt, 3)
    assert m0.map50 == 0.0 and m0.map50_95 == 0.0 and (m0.recall[:, :2] == 0).all()
    empty = detection_map(perfect, [{"boxes": [], "classes": []}] * 2, 3)
    assert empty.map50 == -1.0 and empty.map50_95 == -1.0 and np.isnan(empty.ap50_per_class).all()
    # a box at IoU 0.75 with its ground truth counts for thresholds 0.5 .. 0.75 (6 of 10)
    half = detection_map([([[0, 0, 10, 7.5]], [1.0], [0])], [([[0, 0, 10, 10]], [0])], 1)
    assert half.map50 == pytest.approx(1.0) and half.map50_95 == pytest.approx(0.6)
    assert COCO_IOU_THRESHOLDS[5] == pytest.approx(0.75)


def test_batched_detections_from_nms_equal_per_image_lists():
    rng = np.random.default_rng(5)
    dets, gts = _scene(5, n_img=3, nc=3)
    k = 12
    boxes = np.zeros((3, k, 4), np.float32)
    scores = np.zeros((3, k), np.float32)
    classes = np.zeros((3, k), np.int32)
    valid = np.zeros((3, k), bool)
    lists = []
    for i, (b, s, c) in enumerate(dets):
        n = min(len(b), k)
        boxes[i, :n], scores[i, :n], classes[i, :n], valid[i, :n] = b[:n], s[:n], c[:n], True
        boxes[i, n:] = rng.uniform(0, 50, (k - n, 4))          # garbage in the invalid slots
        lists.append((boxes[i, :n], scores[i, :n], classes[i, :n]))
    batched = Detections(jnp.asarray(boxes), jnp.asarray(scores), jnp.asarray(classes), jnp.asarray(valid),
                         jnp.zeros((3, k), jnp.int32))
    a, b = detection_map(batched, gts, 3), _check(lists, gts, 3)
    np.testing.assert_array_equal(a.precision, b.precision)


def test_bad_input_errors():
    gt = [([[0, 0, 10, 10]], [0])]
    with pytest.raises(ValueError, match="x2 >= x1"):
        detection_map([([[5, 5, 2, 2]], [1.0], [0])], gt, 1)
    with pytest.raises(ValueError, match=r"\(n, 4\)"):
        detection_map([([[0, 0, 10]], [1.0], [0])], gt, 1)
    with pytest.raises(ValueError, match=r"in \[0, 2\)"):
        detection_map([([[0, 0, 10, 10]], [1.0], [2])], gt, 2)
    with pytest.raises(ValueError, match="1 images of detections but 2"):
        detection_map([([[0, 0, 10, 10]], [1.0], [0])], gt * 2, 1)
    with pytest.raises(ValueError, match="scores"):
        detection_map([([[0, 0, 10, 10]], [1.0, 0.5], [0])], gt, 1)
    with pytest.raises(TypeError, match="integers"):
        detection_map([([[0, 0, 10, 10]], [1.0], [0.5])], gt, 1)
    with pytest.raises(ValueError, match="missing"):
        detection_map([{"boxes": [[0, 0, 1, 1]], "scores": [1.0]}], gt, 1)
    with pytest.raises(ValueError, match="num_classes"):
        detection_map([], [], 0)
