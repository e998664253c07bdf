"""Parity of :mod:`flax_attn.cam.metrics` with grad-cam 1.5.7's ``pytorch_grad_cam.metrics`` on the same weights.

Models: the small SE/CBAM CNN of ``parity_tests/cam_models.py`` (odd input 19x17) and a torchvision ResNet-18
(random weights, randomised BatchNorm) at 32x32, converted with ``from_torchvision``. Cams: smooth random maps
in [0, 1] (no ties at a percentile threshold) and, once, real Grad-CAM maps (with exact zeros after ReLU).

Noise: grad-cam draws ``torch.randn_like`` inside ``NoisyLinearImputer``; the fixture ``same_noise`` replaces
it by the values our metric draws (``jax.random.normal(key, (P, B, H, W, C))``, documented in the module),
picked at the imputed pixels of the mask grad-cam is solving for, in grad-cam's call order (LeRF then MoRF,
percentiles outer, images inner). Everything else in grad-cam runs unchanged (scipy's float64 ``spsolve``).

Bounds: scores within 1e-4 (absolute; the issue's bound), imputed images within 1e-5 relative (our float32
conjugate gradient stops at ``||r|| <= 1e-6 ||b||``; at these sizes the measured error is ~1e-6).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from pytorch_grad_cam import metrics as gm
from pytorch_grad_cam.metrics import road as groad
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget as GTarget

import flax_attn.cam as fc
from flax_attn.convert import from_torchvision
from parity_tests._utils import assert_close, max_abs
from parity_tests.cam_models import make_pair, nchw

SCORE_TOL = 1e-4
KEY_SEED = 7


def smooth_cams(b, h, w, seed):
    rng = np.random.default_rng(seed)
    base = rng.random((b, h // 3 + 2, w // 3 + 2))
    yy = np.linspace(0, base.shape[1] - 1, h)
    xx = np.linspace(0, base.shape[2] - 1, w)
    out = np.empty((b, h, w))
    for i in range(b):  # separable linear interpolation: smooth, no exact ties
        rows = np.stack([np.interp(yy, np.arange(base.shape[1]), base[i, :, j]) for j in range(base.shape[2])], 1)
        out[i] = np.stack([np.interp(xx, np.arange(base.shape[2]), r) for r in rows])
    out += 1e-3 * rng.random(out.shape)
    out = (out - out.min((1, 2), keepdims=True)) / np.ptp(out, axis=(1, 2), keepdims=True)
    return out.astype(np.float32)


@pytest.fixture(scope="module")
def small():
    tm, fm = make_pair(seed=3)
    x = np.random.default_rng(1).normal(0.1, 1.0, (3, 19, 17, 3)).astype(np.float32)
    return tm, fm, x, smooth_cams(3, 19, 17, 2), [1, 4, 2]


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    tm = torchvision.models.resnet18(num_classes=10)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for m in tm.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
    tm.eval()
    fm = from_torchvision("resnet18", tm.state_dict())
    x = np.random.default_rng(2).normal(0.1, 1.0, (2, 32, 32, 3)).astype(np.float32)
    return tm, fm, x, smooth_cams(2, 32, 32, 3), [3, 7]


def _our_noise(key, n_percentiles, shape):
    import jax

    return np.asarray(jax.random.normal(key, (n_percentiles,) + shape))


@pytest.fixture
def same_noise(monkeypatch):
    """``install(list of (C, H, W) noise arrays in grad-cam's call order)``; checks every one was used."""
    state = {"queue": [], "mask": None, "used": 0}
    original = groad.NoisyLinearImputer.__call__

    def call(self, img, mask):
        state["mask"] = mask.numpy().copy()
        return original(self, img, mask)

    def randn_like(t, *a, **k):
        noise = state["queue"][state["used"]]
        state["used"] += 1
        idx = np.flatnonzero(state["mask"].reshape(-1) == 0)
        vals = noise.reshape(noise.shape[0], -1)[:, idx]
        assert vals.shape == tuple(t.shape), (vals.shape, t.shape)
        return torch.from_numpy(np.ascontiguousarray(vals)).to(t.dtype)

    monkeypatch.setattr(groad.NoisyLinearImputer, "__call__", call)
    monkeypatch.setattr(groad.torch, "randn_like", randn_like)

    def install(arrays):
        state["queue"] = list(arrays)
        state["used"] = 0

    yield install
    assert state["used"] == len(state["queue"]), f"grad-cam used {state['used']} of {len(state['queue'])} noises"


def noise_queue(key, percentiles, b, shape, runs):
    """Our noise in grad-cam's order: run (LeRF, MoRF) outer, percentile, image; (C, H, W) each."""
    import jax

    out = []
    for r in range(runs):
        k = jax.random.fold_in(key, r) if runs > 1 else key
        nz = _our_noise(k, len(percentiles), (b,) + shape)
        out += [nz[p, i].transpose(2, 0, 1) for p in range(len(percentiles)) for i in range(b)]
    return out


def gc_targets(classes):
    return [GTarget(c) for c in classes]


@pytest.mark.parametrize("name", ["CamMultImageConfidenceChange", "DropInConfidence", "IncreaseInConfidence"])
def test_confidence_change_matches_gradcam(small, name):
    tm, fm, x, cams, classes = small
    ref = getattr(gm.cam_mult_image, name)()(nchw(x), cams, gc_targets(classes), tm)
    ours = getattr(fc, name)()(x, cams, [fc.ClassifierOutputTarget(c) for c in classes], fm)
    assert max_abs(ours, ref) <= SCORE_TOL, (np.asarray(ours), ref)
    if name == "CamMultImageConfidenceChange":
        assert np.abs(ref).min() > 1e-3  # a real change, not a trivially equal zero
        r_s, r_vis = gm.cam_mult_image.CamMultImageConfidenceChange()(nchw(x), cams, gc_targets(classes), tm,
                                                                      return_visualization=True, return_diff=False)
        o_s, o_vis = fc.CamMultImageConfidenceChange()(x, cams, classes, fm, return_visualization=True,
                                                       return_diff=False)
        assert max_abs(o_s, r_s) <= SCORE_TOL
        assert_close(np.asarray(o_vis).transpose(0, 3, 1, 2), r_vis, 1e-6, "cam x image")


@pytest.mark.parametrize("morf,percentile", [(True, 80), (False, 20), (True, 35), (False, 65)])
def test_road_single_matches_gradcam_images_and_scores(small, same_noise, morf, percentile):
    import jax

    tm, fm, x, cams, classes = small
    key = jax.random.key(KEY_SEED)
    same_noise(noise_queue(key, [percentile], len(x), x.shape[1:], 1))
    gcls = groad.ROADMostRelevantFirst if morf else groad.ROADLeastRelevantFirst
    r_s, r_vis = gcls(percentile)(nchw(x), cams, gc_targets(classes), tm, return_visualization=True)
    ours_cls = fc.ROADMostRelevantFirst if morf else fc.ROADLeastRelevantFirst
    o_s, o_vis = ours_cls(percentile)(x, cams, classes, fm, return_visualization=True, key=key)
    o_vis = np.asarray(o_vis).transpose(0, 3, 1, 2)
    changed = np.abs(r_vis.numpy() - nchw(x).numpy()) > 0
    assert changed.mean() > 0.1  # the imputation did something
    assert_close(o_vis, r_vis, 1e-5, "imputed images")
    assert max_abs(o_s, r_s) <= SCORE_TOL, (np.asarray(o_s), r_s)


def test_road_noise_free_matches_gradcam(small, monkeypatch):
    """noise=0 on our side, zero noise on grad-cam's: the solver and the thresholds alone."""
    tm, fm, x, cams, classes = small
    monkeypatch.setattr(groad.torch, "randn_like", torch.zeros_like)
    r_s = groad.ROADMostRelevantFirst(50)(nchw(x), cams, gc_targets(classes), tm)
    o_s = fc.ROADMostRelevantFirst(50, noise=0.0)(x, cams, classes, fm)
    assert max_abs(o_s, r_s) <= SCORE_TOL


@pytest.mark.parametrize("name", ["ROADMostRelevantFirstAverage", "ROADLeastRelevantFirstAverage", "ROADCombined"])
def test_road_averages_match_gradcam(small, same_noise, name):
    import jax

    tm, fm, x, cams, classes = small
    percentiles = [10, 45, 90]
    key = jax.random.key(KEY_SEED + 1)
    same_noise(noise_queue(key, percentiles, len(x), x.shape[1:], 2 if name == "ROADCombined" else 1))
    ref = getattr(groad, name)(percentiles)(nchw(x), cams, gc_targets(classes), tm)
    ours = getattr(fc, name)(percentiles)(x, cams, classes, fm, key=key)
    assert max_abs(ours, ref) <= SCORE_TOL, (np.asarray(ours), ref)


@pytest.mark.slow  # ResNet-18 compile + grad-cam's 2 x 3 x 2 sparse solves: ~60 s under load
def test_road_combined_resnet18_matches_gradcam(resnet, same_noise):
    import jax

    tm, fm, x, cams, classes = resnet
    percentiles = [20, 50, 80]
    key = jax.random.key(KEY_SEED + 2)
    same_noise(noise_queue(key, percentiles, len(x), x.shape[1:], 2))
    ref = groad.ROADCombined(percentiles)(nchw(x), cams, gc_targets(classes), tm)
    ours = fc.ROADCombined(percentiles)(x, cams, [fc.ClassifierOutputTarget(c) for c in classes], fm, key=key)
    assert max_abs(ours, ref) <= SCORE_TOL, (np.asarray(ours), ref)


def test_road_on_gradcam_maps_with_ties(small, same_noise):
    """Real Grad-CAM maps (exact zeros after ReLU, so a low percentile can sit on a tie at 0)."""
    import jax

    tm, fm, x, _, classes = small
    cams = np.asarray(fc.GradCAM(fm, target_layers=["layer3"])(x, classes))
    assert (cams == 0).mean() > 0.05
    key = jax.random.key(KEY_SEED + 3)
    percentiles = [10, 30, 70]
    same_noise(noise_queue(key, percentiles, len(x), x.shape[1:], 2))
    ref = groad.ROADCombined(percentiles)(nchw(x), cams, gc_targets(classes), tm)
    ours = fc.ROADCombined(percentiles)(x, cams, classes, fm, key=key)
    assert max_abs(ours, ref) <= SCORE_TOL, (np.asarray(ours), ref)


def test_percentile_threshold_equals_numpy():
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    for n in (5, 17 * 19, 224 * 3):
        v = rng.random((4, n)).astype(np.float32)
        for p in (0, 1, 10, 33.3, 50, 62.5, 90, 99.9, 100):
            ours = np.asarray(fc.percentile_threshold(jnp.asarray(v), p))
            ref = np.array([np.percentile(r, p) for r in v], np.float32)
            np.testing.assert_array_equal(ours, ref, err_msg=f"n={n} p={p}")
