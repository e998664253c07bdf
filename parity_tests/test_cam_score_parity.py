"""The score family of :mod:`flax_attn.cam.score` vs its references on identical weights.

* ``ScoreCAM`` vs ``pytorch_grad_cam.ScoreCAM`` 1.5.7 (same ``batch_size``): normalised maps max |diff| <= 1e-4,
  raw per-layer maps (captured from grad-cam's own ``get_cam_image``) relative error <= 1e-5.
* ``SSCAM``, ``ISCAM``, ``SmoothGradCAMpp`` vs ``torchcam.methods`` 0.5.0. torchcam returns ``relu(raw)`` at the
  layer's resolution (min-max with eps 1e-8 when ``normalized=True``), we return the raw map and the resized,
  min-max-ed CAM; so our ``relu(raw)`` is compared with torchcam's ``normalized=False`` maps (relative error
  <= 1e-5) and ``scale_cam(relu(raw))`` with torchcam's own ``_normalize`` of them (max |diff| <= 1e-4).
  The noisy methods get OUR noise: torchcam's ``_distrib`` (a ``torch.distributions.Normal``) is replaced by
  a feeder that returns, in torchcam's sampling order, the tensors our ``jax.random`` key produces
  (``_ss_noise`` / ``_smooth_noise``, the functions our implementation draws from).

Everything runs in float32 on both sides: the scores enter a softmax over channels and the maps a min-max,
both well conditioned on these models (the measured errors are ~1e-7, far below the bounds).
Small SE/CBAM CNNs of ``parity_tests/cam_models.py`` at 13x17, and a torchvision ResNet-18 (random weights,
randomised BatchNorm statistics) at 64x48 (``slow``: 512 masked forward passes per side; SmoothGradCAM++
there in float64 on both sides, see its docstring).
"""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import pytorch_grad_cam as pgc
import torch
import torch.nn.functional as F
from flax import nnx
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget as GCTarget
from torchcam import methods as tcm

import flax_attn.cam as fc
from flax_attn.cam import score as sc
from parity_tests.cam_models import make_pair, nchw

LAYER_SETS = [("layer2",), ("layer1.attn", "layer3")]
CLASSES = [1, 4]


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


@pytest.fixture(scope="module")
def pair():
    return make_pair(0)


@pytest.fixture(scope="module")
def images():
    return np.random.RandomState(1).randn(2, 13, 17, 3).astype(np.float32)


def _get(model, path):
    for p in path.split("."):
        model = getattr(model, p)
    return model


def gradcam_scorecam(model, layers, x, classes, batch_size):
    cam = pgc.ScoreCAM(model, [_get(model, p) for p in layers])
    cam.batch_size = batch_size
    raws = []
    orig = cam.get_cam_image

    def capture(*a, **k):
        r = orig(*a, **k)
        raws.append(np.asarray(r))
        return r

    cam.get_cam_image = capture
    out = cam(nchw(x), [GCTarget(c) for c in classes])
    cam.activations_and_grads.release()
    return np.asarray(out), raws


class _Feed:
    """Stands in for torchcam's ``Normal(0, std)``: returns our noise tensors in the order they are asked for."""

    def __init__(self, tensors):
        self.tensors = list(tensors)
        self.used = 0

    def sample(self, size):
        t = self.tensors[self.used]
        assert tuple(t.shape) == tuple(size), (tuple(t.shape), tuple(size))
        self.used += 1
        return t


def torchcam_maps(cls, model, layers, x, classes, feed=None, **kw):
    """torchcam's per-layer maps (``normalized=False``, i.e. ``relu(raw)`` at the layer's resolution)."""
    with cls(model, list(layers), input_shape=tuple(nchw(x).shape[1:]), **kw) as ex:
        if feed is not None:
            ex._distrib = feed
        model(nchw(x))
        maps = ex(class_idx=list(classes), normalized=False)
    if feed is not None:
        assert feed.used == len(feed.tensors)  # every noise tensor was consumed, none was drawn by torch
    return [m.detach().numpy() for m in maps]


def check_torchcam(ours: fc.CamResult, ref_maps, x):
    assert len(ours.raw) == len(ref_maps)
    for r_ours, r_ref in zip(ours.raw, ref_maps):
        r = np.maximum(np.asarray(r_ours), 0)
        assert r.shape == r_ref.shape
        assert rel(r, r_ref) <= 1e-5
        norm_ref = tcm.ScoreCAM._normalize(torch.from_numpy(r_ref.copy())).numpy()
        assert np.abs(np.asarray(fc.scale_cam(jnp.asarray(r))) - norm_ref).max() <= 1e-4
    assert ours.cam.shape == (x.shape[0],) + x.shape[1:3]


def ss_noise_tensors(key, layers_acts, num_samples, std):
    """Our SS-CAM noise as torchcam samples it: layer-major, then sample, each ``(B, C, H, W)``."""
    out = []
    for li, (b, c, size) in enumerate(layers_acts):
        lk = sc._layer_key(key, li)
        for s in range(num_samples):
            n = jax.vmap(lambda p, s=s, lk=lk, size=size: sc._ss_noise(lk, jnp.int32(s), p, size, std, jnp.float32))(
                jnp.arange(b * c, dtype=jnp.int32))
            out.append(torch.from_numpy(np.asarray(n).reshape((b, c) + size)))
    return out


def _layer_shapes(fm, layers, x):
    _, acts = fc.make_tap(fm, list(layers)).run(jnp.asarray(x))
    return [(a.shape[0], a.shape[-1], tuple(x.shape[1:3])) for a in acts]


def test_scorecam_matches_gradcam(pair, images, layers=LAYER_SETS[1]):
    tm, fm = pair
    ref, ref_raws = gradcam_scorecam(tm, layers, images, CLASSES, batch_size=5)
    ours = fc.ScoreCAM(fm, list(layers), batch_size=5)(jnp.asarray(images), CLASSES, return_raw=True)
    assert ours.cam.shape == ref.shape
    assert np.abs(np.asarray(ours.cam) - ref).max() <= 1e-4
    assert len(ref_raws) == len(layers)
    for r_ours, r_ref in zip(ours.raw, ref_raws):
        assert r_ours.shape == r_ref.shape
        assert rel(r_ours, r_ref) <= 1e-5


def test_scorecam_default_targets_match_gradcam(pair, images):
    """``targets=None``: the arg-max class of the clean forward pass, as grad-cam (one layer, functional form)."""
    tm, fm = pair
    cam = pgc.ScoreCAM(tm, [tm.layer2])
    ref = cam(nchw(images), None)
    cam.activations_and_grads.release()
    ours = sc.score_cam(fc.make_tap(fm, ["layer2"]), jnp.asarray(images))
    assert np.abs(np.asarray(ours.cam) - ref).max() <= 1e-4


def test_iscam_matches_torchcam(pair, images, layers=LAYER_SETS[1]):
    tm, fm = pair
    ref = torchcam_maps(tcm.ISCAM, tm, layers, images, CLASSES, batch_size=7, num_samples=3)
    ours = fc.ISCAM(fm, list(layers), batch_size=5, num_samples=3)(jnp.asarray(images), CLASSES, return_raw=True)
    check_torchcam(ours, ref, images)


def test_sscam_matches_torchcam_with_our_noise(pair, images, layers=LAYER_SETS[1]):
    tm, fm = pair
    key, n, std = jax.random.key(3), 3, 2.0
    feed = _Feed(ss_noise_tensors(key, _layer_shapes(fm, layers, images), n, std))
    ref = torchcam_maps(tcm.SSCAM, tm, layers, images, CLASSES, feed=feed, batch_size=7, num_samples=n, std=std)
    ours = fc.SSCAM(fm, list(layers), batch_size=5, num_samples=n, std=std)(jnp.asarray(images), CLASSES,
                                                                            return_raw=True, key=key)
    check_torchcam(ours, ref, images)


def test_smoothgradcampp_matches_torchcam_with_our_noise(pair, images):
    tm, fm = pair
    key, n, std = jax.random.key(5), 4, 0.3
    noise = np.asarray(sc._smooth_noise(key, n, images.shape, std, jnp.float32))
    feed = _Feed([nchw(v) for v in noise])
    ref = torchcam_maps(tcm.SmoothGradCAMpp, tm, ["layer2"], images, CLASSES, feed=feed, num_samples=n, std=std)
    ours = fc.SmoothGradCAMpp(fm, ["layer2"], num_samples=n, std=std)(jnp.asarray(images), CLASSES,
                                                                       return_raw=True, key=key)
    check_torchcam(ours, ref, images)


def _as_float64(model):
    state = nnx.state(model)
    nnx.update(model, jax.tree.map(lambda v: v.astype(jnp.float64) if jnp.issubdtype(v.dtype, jnp.floating) else v,
                                   state))


def test_smoothgradcampp_two_layers_matches_torchcam_float64(pair, images):
    """float64 on both sides (same float64 noise): at ``layer1.attn`` (the SE gate of the first block, whose
    gradients pass through two CBAM blocks) torchcam's own float32 map is 3e-5 away from its float64 run
    (``2 g^2 + sum(g^3 A)`` cancels, and ``g^2``, ``g^3`` are tiny), so a float32 comparison there would measure
    float32 noise, not the formula. In float64 the two agree to ~1e-12."""
    tm, fm = pair
    layers = ["layer1.attn", "layer3"]
    key, n, std = jax.random.key(5), 4, 0.3
    tm64 = copy.deepcopy(tm).double()
    with jax.enable_x64(True):
        fm64 = nnx.clone(fm)
        _as_float64(fm64)
        x64 = jnp.asarray(images.astype(np.float64))
        noise = np.asarray(sc._smooth_noise(key, n, images.shape, std, jnp.float64))
        ours = sc.smooth_gradcampp(fc.make_tap(fm64, layers), x64, CLASSES, key=key, num_samples=n, std=std)
        assert ours.raw[0].dtype == jnp.float64
        ref = torchcam_maps(tcm.SmoothGradCAMpp, tm64, layers, images.astype(np.float64), CLASSES,
                            feed=_Feed([nchw(v) for v in noise]), num_samples=n, std=std)
        for r_ours, r_ref in zip(ours.raw, ref):
            assert rel(np.maximum(np.asarray(r_ours), 0), r_ref) <= 1e-10
        check_torchcam(ours, ref, images)


@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize("src,dst", [((3, 5), (13, 17)), ((1, 1), (7, 9)), ((4, 4), (4, 4)), ((7, 2), (8, 31)),
                                     ((9, 8), (4, 3))])
def test_torch_bilinear_resize(src, dst, align_corners):
    a = np.random.RandomState(0).randn(2, 3, *src).astype(np.float32)
    ref = F.interpolate(torch.from_numpy(a), size=dst, mode="bilinear", align_corners=align_corners).numpy()
    ours = np.asarray(sc._resize_torch(jnp.asarray(a), dst, align_corners))
    assert np.abs(ours - ref).max() <= 1e-6


# ------------------------------------------------------------------------------------------------------
# torchvision ResNet-18
# ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def resnet18():
    import torchvision

    from flax_attn.convert import from_torchvision
    from parity_tests._utils import randomize_bn_stats_

    torch.manual_seed(0)
    tm = torchvision.models.resnet18(num_classes=10)
    randomize_bn_stats_(tm)
    tm.eval()
    fm = from_torchvision("resnet18", tm.state_dict())
    x = np.random.RandomState(2).randn(1, 64, 48, 3).astype(np.float32)
    return tm, fm, x


@pytest.mark.slow
def test_scorecam_resnet18_matches_gradcam(resnet18):
    tm, fm, x = resnet18
    ref, ref_raws = gradcam_scorecam(tm, ["layer4"], x, [7], batch_size=64)
    ours = fc.ScoreCAM(fm, ["layer4"], batch_size=64)(jnp.asarray(x), [7], return_raw=True)
    assert np.abs(np.asarray(ours.cam) - ref).max() <= 1e-4
    assert rel(ours.raw[0], ref_raws[0]) <= 1e-5


@pytest.mark.slow
def test_smoothgradcampp_resnet18_matches_torchcam_float64(resnet18):
    """float64 on both sides: through ResNet-18's layer4 (BatchNorms, residual sums) the float32 maps at layer3
    differ from torchcam's float32 ones by 6.7e-5 (relative, measured), float32 noise of g^2 and g^3 (see
    the two-layer test above); in float64 they agree to ~1e-12."""
    tm, fm, x = resnet18
    key, n, std = jax.random.key(7), 4, 0.3
    tm64 = copy.deepcopy(tm).double()
    with jax.enable_x64(True):
        fm64 = nnx.clone(fm)
        _as_float64(fm64)
        noise = np.asarray(sc._smooth_noise(key, n, x.shape, std, jnp.float64))
        ref = torchcam_maps(tcm.SmoothGradCAMpp, tm64, ["layer3"], x.astype(np.float64), [7],
                            feed=_Feed([nchw(v) for v in noise]), num_samples=n, std=std)
        ours = sc.smooth_gradcampp(fc.make_tap(fm64, ["layer3"]), jnp.asarray(x.astype(np.float64)), [7], key=key,
                                   num_samples=n, std=std)
        assert rel(np.maximum(np.asarray(ours.raw[0]), 0), ref[0]) <= 1e-10
        check_torchcam(ours, ref, x)
