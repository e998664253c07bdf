"""flax_attn.cam.detection without torch, on a tiny hand-made YOLO-style NNX detector: the article's selection,
per-detection CAMs from one vmapped call equal to one-detection-at-a-time gradients, the zero-gradient mask,
backward types, NMS mode, jit caching, renormalisation in boxes, figures, and the errors for bad input."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import flax_attn.cam as fc
from flax_attn.cam import detection as det

NC = 3
STRIDES = (8, 16, 32)


class TinyDetect(nnx.Module):
    """YOLOv5's Detect decode: per level a 1x1 conv to na * (5 + nc), sigmoid, grid / anchor decode, concat."""

    def __init__(self, ch, nc, *, rngs):
        self.nc, self.na = nc, 2
        self.anchors = jnp.array([[[10, 13], [16, 30]], [[30, 61], [62, 45]], [[116, 90], [156, 198]]], jnp.float32)
        self.m = nnx.List([nnx.Conv(c, self.na * (5 + nc), (1, 1), rngs=rngs) for c in ch])

    def __call__(self, xs):
        z = []
        for i, x in enumerate(xs):
            b, h, w, _ = x.shape
            y = jax.nn.sigmoid(self.m[i](x).reshape(b, h, w, self.na, 5 + self.nc))
            gy, gx = jnp.meshgrid(jnp.arange(h), jnp.arange(w), indexing="ij")
            grid = jnp.stack([gx, gy], -1)[:, :, None, :].astype(y.dtype) - 0.5
            xy = (y[..., :2] * 2 + grid) * STRIDES[i]
            wh = (y[..., 2:4] * 2) ** 2 * self.anchors[i]
            y = jnp.concatenate([xy, wh, y[..., 4:]], -1)
            z.append(jnp.transpose(y, (0, 3, 1, 2, 4)).reshape(b, -1, 5 + self.nc))
        return jnp.concatenate(z, 1)


class TinyYolo(nnx.Module):
    """P3/P4/P5 feature maps ``model.0/1/2`` (strides 8/16/32) and a Detect head ``model.3``; like YOLOv5 the
    stride-32 head reads ``model.2`` only, so stride-8/16 detections have no gradient there."""

    def __init__(self, nc=NC, *, rngs):
        self.model = nnx.Sequential(
            nnx.Conv(3, 8, (8, 8), strides=8, rngs=rngs),
            nnx.Conv(8, 8, (3, 3), strides=2, rngs=rngs),
            nnx.Conv(8, 8, (3, 3), strides=2, rngs=rngs),
            TinyDetect((8, 8, 8), nc, rngs=rngs),
        )

    def __call__(self, x):
        if x.shape[-1] != 3:
            raise ValueError(f"x: expected 3 channels, got shape {x.shape}")
        if x.shape[1] % 32 or x.shape[2] % 32:
            raise ValueError(f"x: sides must be multiples of 32, got {x.shape}")
        layers = self.model.layers
        p3 = jax.nn.silu(layers[0](x))
        p4 = jax.nn.silu(layers[1](p3))
        p5 = jax.nn.silu(layers[2](p4))
        return layers[3]([p3, p4, p5])


H, W = 64, 96


def level_of(idx, h=H, w=W, na=2):
    sizes = [na * (h // s) * (w // s) for s in STRIDES]
    return np.searchsorted(np.cumsum(sizes), np.asarray(idx), side="right")


@pytest.fixture(scope="module")
def model():
    return TinyYolo(rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def x():
    return jax.random.uniform(jax.random.key(1), (2, H, W, 3))


def article_selection(pred, ratio, thr):
    """The script's selection in numpy: sort by objectness, the first int(N * ratio), break under thr."""
    out = []
    for p in np.asarray(pred):
        order = np.argsort(-p[:, 4], kind="stable")
        sel = []
        for i in range(int(p.shape[0] * ratio)):
            if p[order[i], 4] < thr:
                break
            sel.append(int(order[i]))
        out.append(sel)
    return out


def one_detection_cams(model, x, layers, pairs, score_fn, method):
    """One detection at a time (the script's loop): the gradient of ONE score w.r.t. the taps, then the
    method, ReLU, resize, min-max (no epsilon; constant -> zeros) per layer, mean, min-max. ``pairs`` =
    [(image, row)]; one jitted function, called once per detection."""
    tap = fc.make_tap(model, layers)
    m = fc.get_method(method)
    shapes = jax.eval_shape(lambda: tap.run(x))[1]

    def norm(r):
        mn, mx = r.min(), r.max()
        return jnp.where(mx == mn, 0.0, (r - mn) / jnp.where(mx == mn, 1.0, mx - mn))

    @jax.jit
    def one(x, b, row):
        zeros = [jnp.zeros(s.shape, s.dtype) for s in shapes]
        grads = jax.grad(lambda pr: score_fn(tap.run(x, pr)[0][b, row]))(zeros)
        acts = tap.run(x)[1]
        maps = [norm(fc.resize_maps(jnp.maximum(m.cam_image(fc.CamInputs(a[b], g[b], None, None, False)), 0),
                                    x.shape[1:3])) for a, g in zip(acts, grads)]
        cam = maps[0] if len(maps) == 1 else norm(jnp.mean(jnp.stack(maps), 0))
        return cam, jnp.stack([jnp.all(g[b] == 0) for g in grads])

    return [tuple(np.asarray(v) for v in one(x, b, row)) for b, row in pairs]


@pytest.fixture(scope="module")
def cam_k12(model):
    return fc.DetectionCAM(model, ["model.2"], method="gradcam")


@pytest.mark.parametrize("ratio,thr", [(0.1, 0.6), (0.02, 0.5)])  # stops at the threshold / at int(N * ratio)
def test_selection_boxes_and_fields_follow_the_article(model, x, cam_k12, ratio, thr):
    pred = np.asarray(model(x))
    k = 12
    res = cam_k12(x, conf_threshold=thr, ratio=ratio, max_detections=k)
    ref = article_selection(pred, ratio, thr)
    assert 0 < len(ref[0]) < k or 0 < len(ref[1]) < k  # some slots invalid: the masks are exercised
    for b in range(2):
        n = len(ref[b])
        np.testing.assert_array_equal(np.asarray(res.valid[b]), np.arange(k) < n)
        np.testing.assert_array_equal(np.asarray(res.indices[b, :n]), ref[b][:k])
        # invalid slots hold the NEXT predictions in objectness order (documented), not zeros
        order = np.argsort(-pred[b, :, 4], kind="stable")
        np.testing.assert_array_equal(np.asarray(res.indices[b]), order[:k])
        rows = pred[b, order[:k]]
        np.testing.assert_allclose(np.asarray(res.scores[b]), rows[:, 4], rtol=0, atol=0)
        np.testing.assert_array_equal(np.asarray(res.classes[b]), rows[:, 5:].argmax(-1))
        xyxy = np.concatenate([rows[:, :2] - rows[:, 2:4] / 2, rows[:, :2] + rows[:, 2:4] / 2], -1)
        np.testing.assert_allclose(np.asarray(res.boxes[b]), xyxy, rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(np.asarray(res.predictions), pred, rtol=1e-6, atol=1e-6)
    assert res.cams.shape == (2, k, H, W) and res.cams.dtype == jnp.float32


@pytest.mark.parametrize("method,layers,backward", [
    ("xgradcam", ["model.2"], "conf"),
    ("gradcam++", ["model.1"], "class"),
    ("layercam", ["model.0", "model.1", "model.2"], "conf*class"),
    ("hirescam", ["model.1", "model.2"], "box"),
])
def test_vmapped_cams_equal_one_backward_per_detection(model, x, method, layers, backward):
    k = 10
    res = fc.detection_cams(model, x, layers, method=method, backward_type=backward, conf_threshold=0.0,
                            ratio=1.0, max_detections=k)
    score_fn = det.BACKWARD_TYPES[backward]
    pairs = [(b, int(res.indices[b, s])) for b in range(2) for s in (0, 3, 9)]
    refs = one_detection_cams(model, x, layers, pairs, score_fn, method)
    for (b, _), s, (cam, zero) in zip(pairs, [0, 3, 9] * 2, refs):
        np.testing.assert_allclose(np.asarray(res.cams[b, s]), cam, atol=2e-6, rtol=0)
        np.testing.assert_array_equal(np.asarray(res.layer_zero_grad[b, s]), zero)
        assert bool(res.zero_grad[b, s]) == bool(zero.all())
        assert bool(res.constant[b, s]) == (cam.max() == cam.min())


def test_zero_grad_mask_is_the_stride_of_the_detection(model, x):
    # every prediction selected (K = N = 252): all levels appear; at model.2 (stride 32) only stride-32 rows
    # have a gradient
    k = 252
    res = fc.detection_cams(model, x, ["model.2"], method="gradcam", conf_threshold=0.0, ratio=1.0,
                            max_detections=k)
    lev = level_of(np.asarray(res.indices))
    assert set(np.unique(lev)) == {0, 1, 2}
    np.testing.assert_array_equal(np.asarray(res.zero_grad), lev != 2)
    assert np.all(np.asarray(res.constant)[lev != 2])  # what the script skips silently is flagged
    assert np.all(np.asarray(res.cams)[lev != 2] == 0)
    # three layers: a stride-8 detection has a gradient at model.0 only, stride-16 at model.0/1
    res3 = fc.detection_cams(model, x, ["model.0", "model.1", "model.2"], method="gradcam", conf_threshold=0.0,
                             ratio=1.0, max_detections=k)
    lz = np.asarray(res3.layer_zero_grad)
    lev3 = level_of(np.asarray(res3.indices))
    np.testing.assert_array_equal(lz, lev3[..., None] < np.arange(3)[None, None, :])
    assert not np.asarray(res3.zero_grad).any()


def test_batch_images_are_independent(model, x):
    kw = dict(method="xgradcam", conf_threshold=0.3, ratio=0.2, max_detections=6)
    both = fc.detection_cams(model, x, ["model.1"], **kw)
    for b in range(2):
        one = fc.detection_cams(model, x[b:b + 1], ["model.1"], **kw)
        for f in ("indices", "valid", "zero_grad", "constant"):
            np.testing.assert_array_equal(np.asarray(getattr(one, f)[0]), np.asarray(getattr(both, f)[b]))
        np.testing.assert_allclose(np.asarray(one.cams[0]), np.asarray(both.cams[b]), atol=1e-6)


def test_callable_backward_type_and_gradient_free_eigencam(model, x):
    kw = dict(conf_threshold=0.0, ratio=1.0, max_detections=5)
    conf = fc.detection_cams(model, x, ["model.1"], method="gradcam", backward_type="conf", **kw)
    fn = fc.detection_cams(model, x, ["model.1"], method="gradcam", backward_type=lambda r: r[4], **kw)
    np.testing.assert_array_equal(np.asarray(conf.cams), np.asarray(fn.cams))
    eig = fc.detection_cams(model, x, ["model.1"], method="eigencam", postprocess="gradcam", **kw)
    assert not np.asarray(eig.zero_grad).any()  # no gradient is taken
    np.testing.assert_array_equal(np.asarray(eig.cams[:, 0]), np.asarray(eig.cams[:, 4]))  # one map per image
    # postprocess="gradcam" is the engine's (grad-cam's BaseCAM) pipeline
    tap = fc.make_tap(model, ["model.1"])
    ref = jax.jit(lambda x: fc.compute_cam(tap, x, method="eigencam").cam)(x)
    np.testing.assert_allclose(np.asarray(eig.cams[:, 2]), np.asarray(ref), atol=1e-6)


def test_gradcam_postprocess_equals_the_engine_for_one_detection(model, x):
    res = fc.detection_cams(model, x, ["model.0", "model.1"], method="gradcam++", postprocess="gradcam",
                            conf_threshold=0.0, ratio=1.0, max_detections=3)
    rows = np.asarray(res.indices[:, 1])
    tap = fc.make_tap(model, ["model.0", "model.1"])

    @jax.jit
    def ref(x, rows):
        targets = [lambda o, b=b: o[rows[b], 4] for b in range(2)]
        return fc.compute_cam(tap, x, targets, method="gradcam++").cam

    np.testing.assert_allclose(np.asarray(res.cams[:, 1]), np.asarray(ref(x, jnp.asarray(rows))), atol=1e-6)


def test_jit_caching_class_and_function(model, x, cam_k12):
    cam_k12(x, max_detections=12)
    n = cam_k12.num_traces
    a = cam_k12(x, max_detections=12, conf_threshold=0.2, ratio=0.05)
    b = cam_k12(x * 0.5, max_detections=12, conf_threshold=0.62, ratio=0.5)  # traced options: no recompilation
    assert cam_k12.num_traces == n
    assert not np.array_equal(np.asarray(a.valid), np.asarray(b.valid))
    cam_k12(x, max_detections=11)  # K is static
    assert cam_k12.num_traces == n + 1
    model2 = TinyYolo(rngs=nnx.Rngs(5))  # same structure, new values: the function form hits its cache
    kw = dict(method="gradcam", conf_threshold=0.1, ratio=0.1, max_detections=5)
    r1 = fc.detection_cams(model, x, ["model.1"], **kw, backward_type="conf")
    traces = fc.compile_cache_info().traces
    fc.detection_cams(model, x, ["model.1"], **{**kw, "conf_threshold": 0.5})
    r2 = fc.detection_cams(model2, x, ["model.1"], **kw)
    assert fc.compile_cache_info().traces == traces
    assert not np.array_equal(np.asarray(r1.predictions), np.asarray(r2.predictions))


def test_detection_cams_share_the_engines_compile_cache(model, x):
    """One LRU for the engine and detection CAMs: one size knob, one clear, and the class and the function
    (and a rebuilt lambda backward_type) reuse each other's compiled functions."""
    kw = dict(conf_threshold=0.1, ratio=0.1, max_detections=4)
    fc.clear_compile_cache()
    try:
        fc.detection_cams(model, x, ["model.2"], method="xgradcam", **kw)
        info = fc.compile_cache_info()
        assert (info.misses, info.traces, info.size) == (1, 1, 1)
        cam = fc.DetectionCAM(model, ["model.2"], method="xgradcam")
        cam(x, **kw)  # the function's entry: no compilation
        assert cam.num_traces == 0 and fc.compile_cache_info().hits == 1
        for c in (1, 1, 2):  # a rebuilt lambda with the same closure value is the same key, another value is not
            cam(x, **kw, backward_type=lambda r, c=c: r[4] * c)
        assert cam.num_traces == 2
        fc.GradCAM(model, ["model.2"])(x, [lambda o: o[0, 4]] * 2)  # an engine entry in the same cache
        assert fc.compile_cache_info().size == 4
        fc.set_compile_cache_size(2)  # bounds detection entries too: least recently used dropped
        assert fc.compile_cache_info().size == 2
        cam(x, **kw)  # its entry was dropped: compiled again
        assert cam.num_traces == 3
        fc.clear_compile_cache()
        assert fc.compile_cache_info().size == 0
        cam(x, **kw)
        assert cam.num_traces == 4
    finally:
        fc.set_compile_cache_size(fc.DEFAULT_COMPILE_CACHE_SIZE)


def test_nms_mode_selects_the_detectors_nms_detections(model, x):
    from flax_attn.models.yolo_ops import non_max_suppression

    res = fc.detection_cams(model, x, ["model.2"], method="gradcam", conf_threshold=0.35, ratio=1.0,
                            max_detections=16, nms_iou=0.3)
    ref = non_max_suppression(model(x), 0.35, 0.3, max_det=16)
    assert 0 < int(ref.valid.sum()) < 32  # 13 and 11 kept: invalid slots exercised
    np.testing.assert_array_equal(np.asarray(res.valid), np.asarray(ref.valid))
    v = np.asarray(ref.valid)
    np.testing.assert_array_equal(np.asarray(res.indices)[v], np.asarray(ref.indices)[v])
    np.testing.assert_allclose(np.asarray(res.scores)[v], np.asarray(ref.scores)[v], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(res.classes)[v], np.asarray(ref.classes)[v])
    np.testing.assert_allclose(np.asarray(res.boxes)[v], np.asarray(ref.boxes)[v], rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(max_detections=0), ValueError, "max_detections"),
    (dict(max_detections=-3), ValueError, "max_detections"),
    (dict(max_detections=True), ValueError, "max_detections"),
    (dict(max_detections=10_000), ValueError, "max_detections"),
    (dict(ratio=0.0), ValueError, "ratio"),
    (dict(ratio=1.5), ValueError, "ratio"),
    (dict(ratio="a"), TypeError, "ratio"),
    (dict(backward_type="logit"), ValueError, "backward_type"),
    (dict(backward_type=3), TypeError, "backward_type"),
    (dict(conf_threshold=float("nan")), ValueError, "conf_threshold"),
    (dict(postprocess="opencv"), ValueError, "postprocess"),
    (dict(method="shapleycam"), ValueError, "method"),
    (dict(method="finercam"), ValueError, "brings its own target"),
    (dict(method="nocam"), ValueError, "unknown CAM method"),
    (dict(nms_iou=2.0), ValueError, "nms_iou"),
])
def test_bad_options(model, x, kwargs, err, match):
    with pytest.raises(err, match=match):
        fc.detection_cams(model, x, ["model.2"], **kwargs)


def test_bad_inputs(model, x):
    with pytest.raises(ValueError, match="multiples of 32"):  # the model's own check surfaces
        fc.detection_cams(model, x[:, :48], ["model.2"])
    with pytest.raises(ValueError, match="channels"):
        fc.detection_cams(model, jnp.moveaxis(x, -1, 1)[:, :, :, :32], ["model.2"])
    with pytest.raises(TypeError, match="floating"):
        fc.detection_cams(model, x.astype(jnp.int32), ["model.2"])
    with pytest.raises(ValueError, match="unknown target layer"):
        fc.detection_cams(model, x, ["model.9"])
    classifier = nnx.Sequential(nnx.Conv(3, 4, (3, 3), rngs=nnx.Rngs(0)), lambda a: a.mean((1, 2)))
    with pytest.raises(ValueError, match=r"\(B, N, 5 \+ num_classes\)"):
        fc.detection_cams(classifier, x, ["0"])


def numpy_scale_cam_image(cam):
    """grad-cam's scale_cam_image without resize: iterates over the first axis (rows of a 2-D map)."""
    out = []
    for img in cam:
        img = img - np.min(img)
        img = img / (1e-7 + np.max(img))
        out.append(img)
    return np.float32(out)


def numpy_renormalize(boxes, cam):
    out = np.zeros(cam.shape, dtype=np.float32)
    for x1, y1, x2, y2 in boxes:
        out[y1:y2, x1:x2] = numpy_scale_cam_image(cam[y1:y2, x1:x2].copy())
    return numpy_scale_cam_image(out)


def test_renormalize_in_boxes_rowwise_and_per_box():
    rs = np.random.RandomState(0)
    cam = rs.rand(2, 40, 50).astype(np.float32)
    boxes = np.array([[[3.7, 2.2, 20.9, 30.0], [15, 10, 45, 39], [0, 0, 5, 5]],
                      [[10, 5, 30, 25], [-4, -2, 12, 60], [1, 1, 2, 2]]], np.float32)
    valid = np.array([[True, True, False], [True, True, True]])
    got = np.asarray(fc.renormalize_in_boxes(jnp.asarray(cam), jnp.asarray(boxes), jnp.asarray(valid)))
    for b in range(2):
        bi = [[max(int(v), 0) for v in bx] for bx, ok in zip(boxes[b], valid[b]) if ok]
        bi = [[x1, y1, min(x2, 50), min(y2, 40)] for x1, y1, x2, y2 in bi]
        np.testing.assert_allclose(got[b], numpy_renormalize(bi, cam[b]), atol=1e-5)
    per_box = np.asarray(fc.renormalize_in_boxes(jnp.asarray(cam[0]), jnp.asarray(boxes[0, :1]), rowwise=False))
    crop = cam[0, 2:30, 3:20]
    ref = np.zeros_like(cam[0])
    ref[2:30, 3:20] = (crop - crop.min()) / (1e-7 + (crop - crop.min()).max())
    np.testing.assert_allclose(per_box, ref / (1e-7 + ref.max()), atol=1e-6)
    jitted = jax.jit(fc.renormalize_in_boxes)(jnp.asarray(cam), jnp.asarray(boxes), jnp.asarray(valid))
    np.testing.assert_allclose(np.asarray(jitted), got, atol=1e-7)
    with pytest.raises(ValueError, match="boxes"):
        fc.renormalize_in_boxes(jnp.asarray(cam), jnp.asarray(boxes[0]))


def test_figures(model, x, tmp_path):
    res = fc.detection_cams(model, x, ["model.0", "model.1", "model.2"], method="xgradcam",
                            conf_threshold=0.0, ratio=1.0, max_detections=4)
    names = ["cat", "dog", "bird"]
    img = np.asarray(x[0])
    panels = fc.show_detection_cams(img, res, names)
    assert [s for s, _ in panels] == [int(i) for i in np.nonzero(~np.asarray(res.constant[0]))[0]]
    colors = fc.detection_colors(NC)
    checked = 0
    for s, overlay in panels:  # the box's top / bottom edge in the class colour, where it lies inside the image
        x1, y1, x2, y2 = np.asarray(res.boxes[0, s]).astype(int)
        xe = max(x1, 0) + 2
        for ye in (y1, y2):
            if 0 <= ye < H and xe < min(x2, W):
                np.testing.assert_array_equal(overlay[ye, xe], colors[int(res.classes[0, s])])
                checked += 1
    assert checked >= 2, f"{checked} box edges inside the image: the colour check barely ran"
    paths = fc.save_detection_cams(str(tmp_path), img, res, names)
    assert sorted(os.path.basename(p) for p in paths) == sorted(f"{s}.png" for s, _ in panels)
    import matplotlib

    matplotlib.use("Agg")
    fig = fc.plot_detection_grid(img, res, names, cols=2)
    assert len([a for a in fig.axes if a.images]) == 4
    with pytest.raises(ValueError, match="class_names"):
        fc.show_detection_cams(img, res, ["only-one"])
