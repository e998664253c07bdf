"""YOLOv5 loss without torch: jit (one compile per shape, not per target values), padding masks, the
last-write rule for targets sharing a cell, gradients, hyper-parameter scaling and bad-input errors.
Equality with the package's ComputeLoss is in parity_tests/test_yolo_loss_parity.py."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_attn.models import YOLOV5_ANCHORS, YOLOv5LossHyp, yolov5_loss

NC = 3
GRIDS = ((8, 8), (4, 4), (2, 2))   # a 64x64 input
ANCHORS = jnp.asarray(np.asarray(YOLOV5_ANCHORS, np.float32).reshape(3, 3, 2) / np.array([8, 16, 32])[:, None, None])


def _preds(b=2, seed=0):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.normal(0, 1, (b, 3, ny, nx, 5 + NC)).astype(np.float32)) for ny, nx in GRIDS]


_TRACES: list[YOLOv5LossHyp] = []
_DEFAULT = YOLOv5LossHyp()


@functools.cache
def _jitted(hyp: YOLOv5LossHyp = _DEFAULT):
    """One jitted (loss, parts) and gradient w.r.t. the maps per hyp (~5 s CPU per compile); counts traces."""

    def f(preds, t, v):
        _TRACES.append(hyp)
        loss, parts = yolov5_loss(preds, t, v, anchors=ANCHORS, hyp=hyp)
        return loss, parts

    return jax.jit(jax.value_and_grad(f, has_aux=True))


def _loss(preds, t, v, hyp: YOLOv5LossHyp = _DEFAULT):
    (loss, parts), _ = _jitted(hyp)(preds, t, v)
    return loss, parts


def _targets(rows, m=4, b=2):
    t = np.zeros((b, m, 5), np.float32)
    v = np.zeros((b, m), bool)
    for i, r in enumerate(rows):
        for k, row in enumerate(r):
            t[i, k], v[i, k] = row, True
    return jnp.asarray(t), jnp.asarray(v)


ROWS = [[[0, 0.3, 0.4, 0.2, 0.3], [2, 0.72, 0.61, 0.5, 0.4]], [[1, 0.5, 0.5, 0.1, 0.1]]]


def test_jit_compiles_once_per_shape():
    preds = _preds()
    t, v = _targets(ROWS)
    loss, parts = _loss(preds, t, v)
    assert loss.shape == () and parts.shape == (3,) and bool(jnp.all(parts > 0))
    np.testing.assert_allclose(loss, parts.sum() * 2, rtol=1e-6)        # (lbox + lobj + lcls) * B
    n = len(_TRACES)
    t2, v2 = _targets([[[1, 0.1, 0.9, 0.05, 0.6]], []])                 # other values, same shapes
    loss2, _ = _loss(preds, t2, v2)
    assert len(_TRACES) == n, "new target values must not retrace"
    assert float(loss2) != float(loss)


def test_padding_rows_are_ignored():
    preds = _preds()
    t, v = _targets(ROWS)
    ref = _loss(preds, t, v)
    garbage = jnp.where(v[..., None], t, jnp.asarray([7.0, -3.0, 2.0, 0.0, -1.0]))   # invalid rows: nonsense
    np.testing.assert_array_equal(_loss(preds, garbage, v)[1], ref[1])
    # a larger static M with more padding: same numbers
    t8, v8 = _targets(ROWS, m=8)
    np.testing.assert_allclose(_loss(preds, t8, v8)[1], ref[1], rtol=1e-6)


def test_no_targets_gives_objectness_only():
    preds = _preds()
    t, v = _targets([[], []])
    _, parts = _loss(preds, t, v)
    assert float(parts[0]) == 0.0 and float(parts[2]) == 0.0 and float(parts[1]) > 0
    # all-negative objectness: BCE(x, 0) = softplus(x), mean per level, balance 4 / 1 / 0.4, gain 1
    want = sum(w * float(jnp.mean(jax.nn.softplus(p[..., 4]))) for w, p in zip((4.0, 1.0, 0.4), preds))
    np.testing.assert_allclose(parts[1], want, rtol=1e-6)


def test_duplicate_cell_keeps_the_last_target():
    """Two targets with the same centre hit the same (anchor, cell)s; the package's ``tobj[...] = iou``
    keeps the later row's IoU, so the objectness part of [A, B] equals that of [B] alone, and of [B, A]
    that of [A] alone (their box/class parts add up instead)."""
    preds = _preds(b=1, seed=3)
    a = [0, 0.55, 0.45, 0.20, 0.20]
    b = [1, 0.55, 0.45, 0.17, 0.23]      # same centre, other size (the same 3 P3 anchors only), other class

    def obj(rows):
        t, v = _targets([rows], b=1)
        return float(_loss(preds, t, v)[1][1])

    assert obj([a]) != pytest.approx(obj([b]), rel=1e-4)               # the two IoUs differ
    assert obj([a, b]) == pytest.approx(obj([b]), rel=1e-6)
    assert obj([b, a]) == pytest.approx(obj([a]), rel=1e-6)


def test_gradient_is_finite_and_reaches_matched_cells_only():
    preds = _preds()
    t, v = _targets(ROWS)
    _, grads = _jitted()(preds, t, v)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)
    # box / class channels get gradient only where a target matched; objectness everywhere
    for g in grads:
        assert bool(jnp.all(g[..., 4] != 0))
        assert 0 < int(jnp.sum(jnp.any(g[..., :4] != 0, axis=-1))) < g[..., 0].size
    # extreme logits (underflowing sigmoids) in unmatched cells must not turn into NaN
    # (in a matched cell the package's CIoU is 0/0 there too: w / h of a zero-size predicted box)
    wild = [jnp.where(jnp.all(g[..., :4] == 0, axis=-1, keepdims=True) & (jnp.arange(5 + NC) >= 2)
                      & (jnp.arange(5 + NC) < 4), -200.0, p) for p, g in zip(preds, grads)]
    assert float(jnp.min(wild[0])) == -200.0
    (loss, _), grads = _jitted()(wild, t, v)
    assert bool(jnp.isfinite(loss)) and all(bool(jnp.all(jnp.isfinite(g))) for g in grads)


def test_single_class_and_hyp_gains():
    rng = np.random.default_rng(1)
    preds = [jnp.asarray(rng.normal(0, 1, (2, 3, ny, nx, 6)).astype(np.float32)) for ny, nx in GRIDS]
    t, v = _targets([[[0, 0.3, 0.4, 0.2, 0.3]], [[0, 0.6, 0.6, 0.3, 0.2]]])
    _, parts = _loss(preds, t, v)
    assert float(parts[2]) == 0.0                                       # nc == 1: no class loss (as YOLOv5)
    _, doubled = _loss(preds, t, v, YOLOv5LossHyp(box=0.1, obj=2.0))
    np.testing.assert_allclose(doubled[:2], 2 * parts[:2], rtol=1e-6)
    h = YOLOv5LossHyp.scaled(num_classes=8, img_size=320, nl=3)
    assert (h.box, h.cls, h.obj) == pytest.approx((0.05, 0.05, 0.25))
    assert YOLOv5LossHyp.scaled(80, 640, nl=4).box == pytest.approx(0.05 * 3 / 4)


def test_bad_input_errors():
    preds = _preds()
    t, v = _targets(ROWS)
    with pytest.raises(TypeError, match=r"model\.train"):
        yolov5_loss(jnp.zeros((2, 100, 8)), t, v, anchors=ANCHORS)      # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"model\.train"):
        yolov5_loss([jnp.zeros((2, 100, 8))], t, v, anchors=ANCHORS)
    with pytest.raises(ValueError, match=r"\(B=2, M, 5\)"):
        yolov5_loss(preds, t[..., :4], v, anchors=ANCHORS)
    with pytest.raises(ValueError, match="valid must be"):
        yolov5_loss(preds, t, v[:, :2], anchors=ANCHORS)
    with pytest.raises(TypeError, match="bool mask"):
        yolov5_loss(preds, t, v.astype(jnp.float32), anchors=ANCHORS)
    with pytest.raises(ValueError, match="anchors must be"):
        yolov5_loss(preds, t, v, anchors=ANCHORS[:2])
    with pytest.raises(ValueError, match="balance"):
        yolov5_loss(preds, t, v, anchors=ANCHORS, balance=(4.0, 1.0))
    with pytest.raises(ValueError, match=r"classes must be integers in \[0, 3\)"):
        yolov5_loss(preds, t.at[0, 0, 0].set(3.0), v, anchors=ANCHORS)
    with pytest.raises(ValueError, match="w > 0"):
        yolov5_loss(preds, t.at[0, 0, 3].set(0.0), v, anchors=ANCHORS)
    with pytest.raises(ValueError, match="preds\\[1\\]"):
        yolov5_loss([preds[0], preds[1][..., :7], preds[2]], t, v, anchors=ANCHORS)
    with pytest.raises(TypeError, match="YOLOv5LossHyp"):
        yolov5_loss(preds, t, v, anchors=ANCHORS, hyp={"box": 0.05})   # type: ignore[arg-type]
    with pytest.raises(ValueError, match="anchor_t"):
        YOLOv5LossHyp(anchor_t=1.0)
    with pytest.raises(ValueError, match=">= 0"):
        YOLOv5LossHyp(box=-1.0)
    with pytest.raises(ValueError, match="num_classes"):
        YOLOv5LossHyp.scaled(num_classes=0, img_size=64)
