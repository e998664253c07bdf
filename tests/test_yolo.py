"""YOLOv5 without torch: shapes, modes, errors, parameter counts (abstract), jit, NMS vs a plain numpy NMS,
letterbox and the inverse box mapping. Parity with the real package is in parity_tests/test_yolo_parity.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flax_attn.layers.norm import BatchNorm
from flax_attn.models import (
    YOLOv5,
    create_model,
    letterbox,
    letterbox_boxes,
    list_models,
    nms,
    non_max_suppression,
    scale_boxes,
    xywh2xyxy,
    xyxy2xywh,
    yolov5_num_params,
)


@pytest.fixture(scope="module")
def tiny():
    """yolov5n with 3 classes (one compiled init)."""
    return create_model("yolov5n", num_classes=3, rngs=nnx.Rngs(0))


def _x(h, w, b=1, seed=0):
    return jax.random.normal(jax.random.key(seed), (b, h, w, 3)) + 0.1


# ------------------------------------------------------------------------------------------------ model
def test_registered_names():
    assert {"yolov5n", "yolov5s", "yolov5m", "yolov5l", "yolov5x"} <= set(list_models("yolov5*"))


def test_eval_and_train_outputs(tiny):
    tiny.eval()
    out = tiny(_x(64, 96, b=2))
    assert out.shape == (2, 3 * (8 * 12 + 4 * 6 + 2 * 3), 8)
    assert bool(jnp.all((out[..., 4:] >= 0) & (out[..., 4:] <= 1)))     # sigmoid'ed scores
    assert bool(jnp.all(out[..., 2:4] > 0))                              # widths / heights
    # P3 boxes: centres within (-0.5, 1.5) cells of their grid cell, in pixels
    p3 = out[:, : 3 * 8 * 12, :2].reshape(2, 3, 8, 12, 2)
    gx, gy = jnp.meshgrid(jnp.arange(12), jnp.arange(8))
    assert bool(jnp.all(jnp.abs(p3[..., 0] / 8 - gx - 0.5) <= 1.0 + 1e-5))
    assert bool(jnp.all(jnp.abs(p3[..., 1] / 8 - gy - 0.5) <= 1.0 + 1e-5))
    tiny.train()
    raw = tiny(_x(64, 96, b=2))
    assert [r.shape for r in raw] == [(2, 3, 8, 12, 8), (2, 3, 4, 6, 8), (2, 3, 2, 3, 8)]
    tiny.eval()


def test_decoding_formula(tiny):
    """Eval output = the v6/v7 decoding of the raw maps the same weights give with BatchNorm in eval mode."""
    tiny.eval()
    x = _x(64, 64, seed=1)
    dec = tiny(x)
    tiny.model[24].deterministic = False
    raw = tiny(x)
    tiny.model[24].deterministic = True
    anchors = np.asarray(tiny.model[24].anchors[...])
    rows = []
    for i, (r, s) in enumerate(zip(raw, (8, 16, 32))):
        r = np.asarray(r, np.float64)
        sig = 1 / (1 + np.exp(-r))
        _, na, ny, nx, _ = r.shape
        gy, gx = np.meshgrid(np.arange(ny), np.arange(nx), indexing="ij")
        grid = np.stack([gx, gy], -1) - 0.5
        xy = (sig[..., :2] * 2 + grid) * s
        wh = (sig[..., 2:4] * 2) ** 2 * (anchors[i] * s)[None, :, None, None, :]
        rows.append(np.concatenate([xy, wh, sig[..., 4:]], -1).reshape(1, -1, 8))
    np.testing.assert_allclose(np.asarray(dec), np.concatenate(rows, 1), rtol=2e-6, atol=2e-5)


def test_layer_names_are_pytorch_paths(tiny):
    from flax_attn.convert import to_yolov5_numpy

    sd = to_yolov5_numpy(tiny)
    assert "model.23.cv3.conv.weight" in sd and "model.24.m.0.weight" in sd and "model.24.anchors" in sd
    assert sd["model.24.m.0.weight"].shape == (3 * 8, 64, 1, 1)
    assert sd["model.9.cv2.bn.running_var"].shape == (256,)
    np.testing.assert_allclose(sd["model.24.anchors"][0], np.array([[10, 13], [16, 30], [33, 23]]) / 8)
    bn = tiny.model[0].bn
    assert isinstance(bn, BatchNorm) and bn.epsilon == 1e-3 and abs(bn.momentum - 0.97) < 1e-12


def test_cam_tap_paths_resolve(tiny):
    from flax_attn.cam.taps import NNXTap

    tap = NNXTap(tiny, ["model.17", "model.23", "model.24.m.0"])
    out, acts = tap.run(_x(64, 96))
    assert out.shape == (1, 378, 8)
    assert [a.shape for a in acts] == [(1, 8, 12, 64), (1, 2, 3, 256), (1, 8, 12, 24)]


def test_jit_forward_compiles_once_per_shape(tiny):
    tiny.eval()
    traces = []

    @nnx.jit
    def fwd(m, x):
        traces.append(x.shape)
        return m(x)

    a = fwd(tiny, _x(64, 64))
    b = fwd(tiny, _x(64, 64, seed=3))
    assert len(traces) == 1 and a.shape == b.shape
    fwd(tiny, _x(96, 64))
    assert len(traces) == 2
    np.testing.assert_allclose(np.asarray(a), np.asarray(tiny(_x(64, 64))), rtol=1e-5, atol=1e-4)


def test_bad_inputs_raise_clear_errors(tiny):
    with pytest.raises(ValueError, match=r"multiples of 32.*H=65.*W=96.*\(1, 65, 96, 3\)"):
        tiny(jnp.ones((1, 65, 96, 3)))
    with pytest.raises(ValueError, match=r"3 input channels.*\(1, 64, 64, 4\)"):
        tiny(jnp.ones((1, 64, 64, 4)))
    with pytest.raises(ValueError, match="NCHW"):
        tiny(jnp.ones((1, 3, 64, 64)))
    with pytest.raises(ValueError, match=r"\(B, H, W, 3\).*\(64, 64, 3\)"):
        tiny(jnp.ones((64, 64, 3)))
    with pytest.raises(TypeError, match="array"):
        tiny([[1.0]])
    with pytest.raises(ValueError, match="unknown YOLOv5 variant 'yolov5q'"):
        YOLOv5("yolov5q", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="num_classes"):
        nnx.eval_shape(lambda: YOLOv5("yolov5n", num_classes=0, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="attn_positions.*'neck'"):
        nnx.eval_shape(lambda: YOLOv5("yolov5n", attn="cbam", attn_positions=("neck",), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="needs an attention block"):
        nnx.eval_shape(lambda: YOLOv5("yolov5n", attn_positions="c3", rngs=nnx.Rngs(0)))


# (unfused: conv + BN parameters, the package's model summary; fused: BN folded into conv biases, the
# numbers of the YOLOv5 README / "Fusing layers..." summary; the difference is the number of BN channels)
PARAM_COUNTS = {
    "yolov5n": (1_872_157, 1_867_405),
    "yolov5s": (7_235_389, 7_225_885),
    "yolov5m": (21_190_557, 21_172_173),
    "yolov5l": (46_563_709, 46_533_693),
    "yolov5x": (86_749_405, 86_705_005),
}


@pytest.mark.parametrize("name", sorted(PARAM_COUNTS))
def test_parameter_counts_published(name):
    model = nnx.eval_shape(lambda: create_model(name, num_classes=80, jit=False))
    unfused, fused = PARAM_COUNTS[name]
    bn_channels = sum(m.num_features for _, m in nnx.iter_modules(model) if isinstance(m, BatchNorm))
    assert yolov5_num_params(model) == unfused
    assert yolov5_num_params(model) - bn_channels == fused


def test_attention_slot_positions():
    def build(**kw):
        return nnx.eval_shape(lambda: YOLOv5("yolov5n", num_classes=3, rngs=nnx.Rngs(0), **kw))

    plain = build()
    assert plain.attn_layers == () and all(plain.model[i].attn is None for i in (2, 4, 6, 8, 9))
    c3 = build(attn="cbam")
    assert c3.attn_layers == (2, 4, 6, 8) and c3.model[9].attn is None
    assert c3.model[8].attn.__class__.__name__ == "CBAM"
    both = build(attn="se", attn_positions=("c3", "sppf"))
    assert both.attn_layers == (2, 4, 6, 8, 9)
    assert build(attn="cbam_official", attn_positions=[4, 9]).attn_layers == (4, 9)
    assert yolov5_num_params(both) > yolov5_num_params(plain)


def test_attention_variant_runs(tiny):
    model = create_model("yolov5n", num_classes=3, attn="cbam", attn_positions=("c3", "sppf"), rngs=nnx.Rngs(1))
    model.eval()
    out = nnx.jit(lambda m, x: m(x))(model, _x(64, 64))
    assert out.shape == (1, 3 * (64 + 16 + 4), 8) and bool(jnp.all(jnp.isfinite(out)))


# ------------------------------------------------------------------------------------------- box helpers
def test_xywh_xyxy_round_trip():
    b = jax.random.uniform(jax.random.key(0), (5, 7, 4), minval=1, maxval=50)
    np.testing.assert_allclose(np.asarray(xyxy2xywh(xywh2xyxy(b))), np.asarray(b), rtol=1e-6, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(xywh2xyxy(jnp.array([10.0, 20.0, 4.0, 6.0]))), [8, 17, 12, 23])
    with pytest.raises(ValueError, match=r"\(\.\.\., 4\).*\(3, 5\)"):
        xywh2xyxy(jnp.ones((3, 5)))


def _numpy_nms(boxes, scores, classes, thr, k):
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    keep = []
    for i in order:
        if not np.isfinite(scores[i]):
            continue
        ok = True
        for j in keep:
            if classes[j] != classes[i]:
                continue
            a, b = boxes[i], boxes[j]
            iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
            ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
            inter = iw * ih
            union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
            if inter / union > thr:
                ok = False
                break
        if ok:
            keep.append(i)
    return keep[:k]


@pytest.mark.parametrize("thr", [0.3, 0.6])
def test_nms_matches_numpy_nms(thr):
    rng = np.random.default_rng(0)
    b, n, k = 3, 200, 40
    xy = rng.uniform(0, 100, (b, n, 2))
    wh = rng.uniform(5, 40, (b, n, 2))
    boxes = np.concatenate([xy, xy + wh], -1).astype(np.float32)
    scores = rng.uniform(0, 1, (b, n)).astype(np.float32)
    scores[:, ::17] = -np.inf                                              # never kept
    classes = rng.integers(0, 3, (b, n)).astype(np.int32)
    res = jax.jit(lambda bx, s, c: nms(bx, s, c, iou_threshold=thr, max_detections=k))(boxes, scores, classes)
    assert res.indices.shape == res.valid.shape == (b, k)
    for i in range(b):
        ref = _numpy_nms(boxes[i].astype(np.float64), scores[i], classes[i], thr, k)
        n_ok = int(res.valid[i].sum())
        assert n_ok == len(ref)
        assert np.asarray(res.indices[i, :n_ok]).tolist() == ref
        assert not bool(res.valid[i, n_ok:].any()) and bool((res.indices[i, n_ok:] == 0).all())
    agnostic = nms(boxes[0], scores[0], iou_threshold=thr, max_detections=k)
    ref = _numpy_nms(boxes[0].astype(np.float64), scores[0], np.zeros(n), thr, k)
    assert np.asarray(agnostic.indices[: int(agnostic.valid.sum())]).tolist() == ref


def test_nms_few_boxes_are_masked_and_errors():
    res = nms(jnp.array([[0, 0, 10, 10.0], [1, 1, 10, 10]]), jnp.array([0.5, 0.9]), max_detections=4)
    assert res.indices.tolist() == [1, 0, 0, 0] and res.valid.tolist() == [True, False, False, False]
    with pytest.raises(ValueError, match="scores must have shape"):
        nms(jnp.ones((3, 4)), jnp.ones(4))
    with pytest.raises(ValueError, match="max_detections must be a positive int, got 0"):
        nms(jnp.ones((3, 4)), jnp.ones(3), max_detections=0)
    with pytest.raises(ValueError, match="iou_threshold"):
        nms(jnp.ones((3, 4)), jnp.ones(3), iou_threshold=1.5)


def test_non_max_suppression_static_size(tiny):
    tiny.eval()
    pred = tiny(_x(64, 64, b=2))
    det = jax.jit(lambda p: non_max_suppression(p, 0.0, 0.5, max_det=7))(pred)
    assert det.boxes.shape == (2, 7, 4) and det.scores.shape == det.classes.shape == det.valid.shape == (2, 7)
    # scores are obj * best class prob of the selected rows, boxes their xyxy
    rows = jnp.take_along_axis(pred, det.indices[..., None], axis=1)
    expect = rows[..., 4] * jnp.max(rows[..., 5:], axis=-1)
    np.testing.assert_allclose(np.asarray(det.scores), np.where(det.valid, np.asarray(expect), 0), rtol=1e-6)
    assert bool(jnp.all(det.scores[:, :-1] >= det.scores[:, 1:]))
    with pytest.raises(ValueError, match=r"\(B, N, 5 \+ nc\)"):
        non_max_suppression(jnp.ones((10, 85)))


# ----------------------------------------------------------------------------------------------- letterbox
@pytest.mark.parametrize("shape,new_shape,auto,expected", [
    ((480, 600), 640, True, (512, 640)),
    ((333, 517), 640, True, (416, 640)),
    ((333, 517), (320, 416), False, (320, 416)),
    ((1000, 701), 640, True, (640, 480)),
])
def test_letterbox_shape_grey_and_box_round_trip(shape, new_shape, auto, expected):
    rng = np.random.default_rng(1)
    img = jnp.asarray(rng.integers(0, 256, shape + (3,), dtype=np.uint8))
    out, ratio, pad = letterbox(img, new_shape, auto=auto)
    assert out.shape[:2] == expected and out.dtype == jnp.uint8
    assert out.shape[0] % 32 == 0 and out.shape[1] % 32 == 0
    top, left = int(round(pad[1] - 0.1)), int(round(pad[0] - 0.1))
    if top:
        assert bool((out[:top] == 114).all())
    if left:
        assert bool((out[:, :left] == 114).all())
    # boxes of the original image -> letterboxed -> back
    xy = rng.uniform(0, min(shape) / 2, (30, 2))
    boxes = jnp.asarray(np.concatenate([xy, xy + rng.uniform(1, min(shape) / 2, (30, 2))], -1), jnp.float32)
    there = letterbox_boxes(boxes, (ratio, pad))
    assert bool(jnp.all(there[:, :2] >= 0)) and bool(jnp.all(there[:, 2] <= out.shape[1] + 1e-3))
    back = scale_boxes(out.shape[:2], there, shape, (ratio, pad))
    np.testing.assert_allclose(np.asarray(back), np.asarray(boxes), rtol=1e-5, atol=1e-3)


def test_letterbox_is_jittable_and_keeps_float_images():
    img = jax.random.uniform(jax.random.key(0), (2, 100, 150, 3))
    out = jax.jit(lambda im: letterbox(im, 320)[0])(img)
    assert out.shape == (2, 224, 320, 3) and out.dtype == img.dtype
    np.testing.assert_allclose(np.asarray(out[:, :2]), 114.0)
    same = letterbox(jnp.full((64, 96, 3), 7, jnp.uint8), 96)[0]
    assert same.shape == (64, 96, 3) and bool((same == 7).all())
    with pytest.raises(ValueError, match=r"\(H, W, C\).*\(5,\)"):
        letterbox(jnp.ones(5))
    with pytest.raises(TypeError, match="new_shape"):
        letterbox(img[0], "640")
