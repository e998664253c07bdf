"""flax_attn.cam vs pytorch_grad_cam 1.5.7 on identical weights (small CNNs with SE and CBAM blocks).

Normalised CAMs must agree to max |diff| <= 1e-4 and the raw per-layer maps (the method's map before
ReLU / min-max / resize, captured from grad-cam's own ``get_cam_image``) to a relative error <= 1e-5.

EigenCAM / EigenGradCAM / ``eigen_smooth`` use the first right singular vector, whose sign is arbitrary:
grad-cam keeps whatever numpy's LAPACK returns, we pick the sign with ``sum(v) >= 0`` on every backend.
The full-pipeline comparisons therefore run grad-cam with its ``get_2d_projection`` patched to apply our
sign rule to numpy's vector (fixture ``signed_svd``; everything else in grad-cam unchanged), and
``test_eigen_projection_matches_numpy_up_to_sign`` checks against the UNPATCHED grad-cam that our raw
projection equals numpy's up to one global sign per image (the only freedom the SVD has).

The parity grid calls :func:`flax_attn.cam.compute_cam` eagerly (op-by-op caches are shared by all the
methods, which keeps this file fast); ``test_jitted_object_api_matches_gradcam`` covers the jitted classes.
"""

from __future__ import annotations

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import pytorch_grad_cam as pgc
import torch
from pytorch_grad_cam.utils import model_targets as mt
from pytorch_grad_cam.utils.image import show_cam_on_image as gc_show

import flax_attn.cam as fc
from parity_tests.cam_models import make_pair, nchw

GC = {
    "gradcam": pgc.GradCAM,
    "hirescam": pgc.HiResCAM,
    "gradcamelementwise": pgc.GradCAMElementWise,
    "gradcam++": pgc.GradCAMPlusPlus,
    "xgradcam": pgc.XGradCAM,
    "layercam": pgc.LayerCAM,
    "eigencam": pgc.EigenCAM,
    "eigengradcam": pgc.EigenGradCAM,
    "shapleycam": pgc.ShapleyCAM,
}
LAYER_SETS = [("layer2",), ("layer1.attn", "layer3")]


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


@pytest.fixture(scope="module")
def pair():
    return make_pair(0)


@pytest.fixture(scope="module")
def images():
    return np.random.RandomState(1).randn(2, 13, 17, 3).astype(np.float32)


def _signed_projection(activation_batch):
    """grad-cam's get_2d_projection with our deterministic sign rule applied to numpy's vector."""
    activation_batch = activation_batch.copy()
    activation_batch[np.isnan(activation_batch)] = 0
    out = []
    for a in activation_batch:
        r = a.reshape(a.shape[0], -1).transpose()
        r = r - r.mean(axis=0)
        _, _, vt = np.linalg.svd(r, full_matrices=True)
        v = vt[0] if vt[0].sum() >= 0 else -vt[0]
        out.append((r @ v).reshape(a.shape[1:]))
    return np.float32(out)


@pytest.fixture
def signed_svd(monkeypatch):
    import pytorch_grad_cam.base_cam as m0
    import pytorch_grad_cam.eigen_cam as m1
    import pytorch_grad_cam.eigen_grad_cam as m2
    import pytorch_grad_cam.grad_cam_elementwise as m3
    import pytorch_grad_cam.hirescam as m4
    import pytorch_grad_cam.layer_cam as m5

    for m in (m0, m1, m2, m3, m4, m5):
        monkeypatch.setattr(m, "get_2d_projection", _signed_projection)


def _get(model, path):
    for p in path.split("."):
        model = getattr(model, p)
    return model


def run_gradcam(cls, model, layers, x, targets, base=None, **kw):
    """grad-cam's CAM plus the raw per-layer maps captured from its own get_cam_image."""
    cam = cls(model, [_get(model, p) for p in layers])
    inner = cam.base_cam if isinstance(cam, pgc.FinerCAM) else cam
    raws = []
    orig = inner.get_cam_image

    def capture(*a, **k):
        r = orig(*a, **k)
        raws.append(np.asarray(r.detach().numpy() if isinstance(r, torch.Tensor) else r))
        return r

    inner.get_cam_image = capture
    out = cam(nchw(x), targets, **kw)
    inner.activations_and_grads.release()
    return np.asarray(out), raws


def run_ours(model, layers, x, targets=None, method="gradcam", **kw):
    return fc.compute_cam(fc.make_tap(model, list(layers)), jnp.asarray(x), targets, method=method, **kw)


def check(ours, ref, ref_raws, n_layers):
    assert ours.cam.shape == ref.shape
    assert np.abs(np.asarray(ours.cam) - ref).max() <= 1e-4
    assert len(ref_raws) == n_layers
    for r_ours, r_ref in zip(ours.raw, ref_raws):
        assert r_ours.shape == r_ref.shape
        assert rel(r_ours, r_ref) <= 1e-5


@pytest.mark.parametrize("layers", LAYER_SETS, ids=lambda v: "+".join(v))
@pytest.mark.parametrize("method", sorted(GC))
def test_method_matches_gradcam(pair, images, signed_svd, method, layers):
    tm, fm = pair
    ref, raws = run_gradcam(GC[method], tm, layers, images, None)
    ours = run_ours(fm, layers, images, None, method)
    check(ours, ref, raws, len(layers))
    assert float(np.asarray(ours.cam).max()) > 0.5  # a real map, not a degenerate constant


@pytest.mark.parametrize("method", ["gradcam++", "gradcamelementwise"])  # channel-weight and element-wise paths
def test_eigen_smooth_matches_gradcam(pair, images, signed_svd, method):
    tm, fm = pair
    layers = ("layer2", "layer3")
    ref, raws = run_gradcam(GC[method], tm, layers, images, None, eigen_smooth=True)
    check(run_ours(fm, layers, images, None, method, eigen_smooth=True), ref, raws, 2)


@pytest.mark.parametrize("method", ["eigencam", "eigengradcam"])
def test_eigen_projection_matches_numpy_up_to_sign(pair, images, method):
    tm, fm = pair
    _, raws = run_gradcam(GC[method], tm, ("layer2",), images, None)
    ours = np.asarray(run_ours(fm, ("layer2",), images, None, method).raw[0])
    for o, r in zip(ours, raws[0]):
        s = np.sign(np.sum(o * r))
        assert s != 0
        assert rel(o, s * r) <= 1e-5


@pytest.mark.parametrize("method", ["gradcam"])
def test_aug_smooth_matches_gradcam(pair, images, signed_svd, method):
    """grad-cam's 6 views (flip x {0.9, 1, 1.1}); with targets=None the arg-max class is taken per view."""
    tm, fm = pair
    ref, raws = run_gradcam(GC[method], tm, ("layer2",), images, None, aug_smooth=True)
    ours = run_ours(fm, ("layer2",), images, None, method, aug_smooth=True)
    assert np.abs(np.asarray(ours.cam) - ref).max() <= 1e-4
    # grad-cam runs the 6 views one after the other: (flip, factor) in ttach's order
    assert len(raws) == 6 and ours.raw[0].shape == (6,) + raws[0].shape
    for v in range(6):
        assert rel(ours.raw[0][v], raws[v]) <= 1e-5


def _target_cases():
    return {
        "logit": ([mt.ClassifierOutputTarget(3), mt.ClassifierOutputTarget(0)],
                  [fc.ClassifierOutputTarget(3), fc.ClassifierOutputTarget(0)]),
        "softmax": ([mt.ClassifierOutputSoftmaxTarget(2), mt.ClassifierOutputSoftmaxTarget(5)],
                    [fc.ClassifierOutputSoftmaxTarget(2), fc.ClassifierOutputSoftmaxTarget(5)]),
        "rest": ([mt.ClassifierOutputReST(1), mt.ClassifierOutputReST(4)],
                 [fc.ClassifierOutputReST(1), fc.ClassifierOutputReST(4)]),
        "finer": ([mt.FinerWeightedTarget(1, [2, 5], 0.7), mt.FinerWeightedTarget(4, [0, 3], 1.0)],
                  [fc.FinerWeightedTarget(1, jnp.array([2, 5]), 0.7),
                   fc.FinerWeightedTarget(4, jnp.array([0, 3]), 1.0)]),
        "callable": ([lambda o: o[2] - 0.5 * o[3]] * 2, [lambda o: o[2] - 0.5 * o[3]] * 2),
    }


@pytest.mark.parametrize("method,kind", [("gradcam", k) for k in ("logit", "softmax", "rest", "finer", "callable")]
                         + [("shapleycam", "softmax"), ("shapleycam", "rest")])
def test_targets_match_gradcam(pair, images, kind, method):
    tm, fm = pair
    gc_t, our_t = _target_cases()[kind]
    # grad-cam's ShapleyCAM frees the graph after the first layer's Hessian-vector product
    # (retain_graph=False) and then fails on a second layer: one layer for it
    layers = ("layer2",) if method == "shapleycam" else ("layer2", "layer3")
    ref, raws = run_gradcam(GC[method], tm, layers, images, gc_t)
    check(run_ours(fm, layers, images, our_t, method), ref, raws, len(layers))


def test_binary_classifier_target_matches_gradcam(images):
    tm, fm = make_pair(3, num_classes=1)
    ref, raws = run_gradcam(pgc.GradCAM, tm, ("layer2",), images,
                            [mt.BinaryClassifierOutputTarget(1), mt.BinaryClassifierOutputTarget(0)])
    ours = run_ours(fm, ("layer2",), images,
                    [fc.BinaryClassifierOutputTarget(1), fc.BinaryClassifierOutputTarget(0)])
    check(ours, ref, raws, 1)


def test_segmentation_target_matches_gradcam(images):
    tm, fm = make_pair(4, seg=True)
    rs = np.random.RandomState(5)
    masks = [(rs.rand(7, 9) > 0.5).astype(np.float32) for _ in range(2)]
    gc_t = [mt.SemanticSegmentationTarget(2, masks[0]), mt.SemanticSegmentationTarget(5, masks[1])]
    our_t = fc.SemanticSegmentationTarget(jnp.array([2, 5]), jnp.asarray(np.stack(masks)))
    for method in ("gradcam", "hirescam"):
        ref, raws = run_gradcam(GC[method], tm, ("layer1",), images, gc_t)
        check(run_ours(fm, ("layer1",), images, our_t, method), ref, raws, 1)


@pytest.mark.parametrize("method", ["gradcam++", "shapleycam"])
def test_2d_targets_equal_gradcam_per_target(pair, images, signed_svd, method):
    """(B, T) targets from one forward pass == T separate grad-cam runs."""
    tm, fm = pair
    classes = np.array([[0, 3, 5], [2, 2, 1]])
    layers = ("layer2",) if method == "shapleycam" else ("layer2", "layer3")
    ours = run_ours(fm, layers, images, jnp.asarray(classes), method)
    assert ours.cam.shape == (2, 3, 13, 17)
    for t in range(3):
        ref, raws = run_gradcam(GC[method], tm, layers, images,
                                [mt.ClassifierOutputTarget(int(c)) for c in classes[:, t]])
        assert np.abs(np.asarray(ours.cam[:, t]) - ref).max() <= 1e-4
        for r_ours, r_ref in zip(ours.raw, raws):
            assert rel(r_ours[:, t], r_ref) <= 1e-5


@pytest.mark.parametrize("kw", [{}, {"alpha": 0.6, "comparison_categories": [1, 2], "target_idx": 3}],
                         ids=["default", "options"])
def test_finercam_matches_gradcam(pair, images, kw):
    tm, fm = pair
    ref, raws = run_gradcam(pgc.FinerCAM, tm, ("layer2", "layer3"), images, None, **kw)
    opts = {k: tuple(v) if isinstance(v, list) else v for k, v in kw.items()}
    ours = run_ours(fm, ("layer2", "layer3"), images, None, fc.finer_cam(**opts))
    check(ours, ref, raws, 2)


def test_randomcam_distribution_like_gradcam(pair, images):
    """RandomCAM is random: same shape and range as grad-cam, weights ~ U(-1, 1) per image and channel."""
    tm, fm = pair
    ref, raws = run_gradcam(pgc.RandomCAM, tm, ("layer2",), images, None)
    key = jax.random.key(7)
    ours = run_ours(fm, ("layer2",), images, None, "randomcam", key=key)
    assert ours.cam.shape == ref.shape and ours.raw[0].shape == raws[0].shape
    assert float(jnp.min(ours.cam)) >= 0 and float(jnp.max(ours.cam)) <= 1
    # the raw map is sum_c w_c A_c with w = uniform(key_b) in [-1, 1): recover it and compare
    _, (acts,) = fc.make_tap(fm, ["layer2"]).run(jnp.asarray(images))
    keys = jax.random.split(jax.random.fold_in(key, 0), (2, 1))
    w = jax.vmap(lambda k: jax.random.uniform(k[0], (acts.shape[-1],), minval=-1.0, maxval=1.0))(keys)
    assert rel(ours.raw[0], jnp.einsum("bhwc,bc->bhw", acts, w)) <= 1e-5
    many = jax.random.uniform(jax.random.key(0), (20000,), minval=-1.0, maxval=1.0)
    assert abs(float(many.mean())) < 0.02 and abs(float(many.var()) - 1 / 3) < 0.01


def test_tiny_maps_and_batch_one():
    """Batch 1, H != W, a 1x1 last-layer map (constant: zeros, never NaN) and a 2x2 one."""
    tm, fm = make_pair(6)
    x = np.random.RandomState(2).randn(1, 3, 4, 3).astype(np.float32)
    for layers in (("layer2", "layer3"),):
        ref, raws = run_gradcam(pgc.GradCAM, tm, layers, x, None)
        ours = run_ours(fm, layers, x)
        check(ours, ref, raws, len(layers))
        assert np.all(np.isfinite(np.asarray(ours.cam)))


def test_jitted_object_api_matches_gradcam(pair, images):
    """The jitted class API equals grad-cam; a model left in train mode is explained in eval mode (as
    grad-cam's model.eval()) without being modified."""
    tm, fm = pair
    fm.train()
    try:
        cam = fc.GradCAMPlusPlus(fm, target_layers=["layer2", "layer3"])
        ours = cam(jnp.asarray(images), [fc.ClassifierOutputTarget(2), fc.ClassifierOutputTarget(5)])
        assert fm.layer2.bn.use_running_average is False
    finally:
        fm.eval()
    ref, _ = run_gradcam(pgc.GradCAMPlusPlus, tm, ("layer2", "layer3"), images,
                         [mt.ClassifierOutputTarget(2), mt.ClassifierOutputTarget(5)])
    assert np.abs(np.asarray(ours) - ref).max() <= 1e-4


def test_jet_colormap_equals_opencv():
    lut = cv2.applyColorMap(np.arange(256, dtype=np.uint8)[:, None], cv2.COLORMAP_JET)[:, 0, ::-1]
    np.testing.assert_array_equal(fc.jet_colormap(), lut)


@pytest.mark.parametrize("use_rgb", [True, False])
@pytest.mark.parametrize("weight", [0.5, 0.3])
def test_show_cam_on_image_matches_gradcam(use_rgb, weight):
    rs = np.random.RandomState(3)
    img = rs.rand(2, 11, 14, 3).astype(np.float32)
    mask = rs.rand(2, 11, 14).astype(np.float32)
    ours = fc.show_cam_on_image(img, mask, use_rgb=use_rgb, image_weight=weight)
    for i in range(2):
        ref = gc_show(img[i], mask[i], use_rgb=use_rgb, image_weight=weight)
        assert type(ours) is type(ref) and ours.dtype == ref.dtype  # a host NumPy uint8 image, as grad-cam's
        assert np.abs(ours[i].astype(int) - ref.astype(int)).max() <= 1


@pytest.mark.parametrize("src,dst", [((3, 5), (13, 17)), ((1, 1), (7, 9)), ((4, 4), (4, 4)), ((7, 2), (8, 31))])
def test_resize_matches_cv2(src, dst):
    m = np.random.RandomState(4).rand(*src).astype(np.float32)
    ref = cv2.resize(m, dst[::-1])
    np.testing.assert_allclose(np.asarray(fc.resize_maps(jnp.asarray(m), dst)), ref, atol=1e-6, rtol=0)
