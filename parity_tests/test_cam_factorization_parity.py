"""KPCA-CAM, FEM, DeepFeatureFactorization and show_factorization_on_image vs pytorch_grad_cam 1.5.7 on
identical weights (the small SE/CBAM networks of ``cam_models`` and a torchvision ResNet-18 at a small input).

* KPCA-CAM: grad-cam runs scikit-learn's ``KernelPCA(n_components=1)`` (ARPACK above 200 positions, dense
  ``eigh`` below; ``layer1`` of the small net has 13*17 = 221 positions, ``layer3`` 4*5, so both solvers are
  compared) and fixes the eigenvector's sign with ``svd_flip`` (largest-magnitude entry positive): ours
  applies the same rule, so the maps agree WITHOUT any sign patch. Normalised maps: max |diff| <= 1e-4 in
  float32 (measured <= 1.5e-5, the sigmoid kernel being the least well conditioned). The projection itself
  is compared in float64 on both sides (scikit-learn on float64 activations, ours under
  ``jax.enable_x64``), where float32 rounding of the kernel matrix no longer hides a wrong sign or centring.
* FEM: normalised maps max |diff| <= 1e-4 (measured <= 5e-7).
* DFF: our NMF starts from scikit-learn's initial point and runs its coordinate-descent iterations, so the
  number of iterations is the same, the reconstruction error is within ``sklearn * (1 + 1e-3)`` (measured
  ~5e-7 relative), concepts and concept scores through the head within 1e-5 relative (measured ~3e-6) and
  the heatmaps within 1e-4 (measured <= 4e-6). Float32 on both sides.
* show_factorization_on_image: grad-cam's default colours call ``plt.cm.get_cmap``, which matplotlib 3.9
  removed, so grad-cam is given the ``gist_rainbow`` colours explicitly (ours computes them by default and
  they are checked equal). OpenCV's uint8 HSV->RGB conversion is reproduced exactly on this machine's
  OpenCV build (vectorised loop, truncation, FMA-contracted ``1 - s*h``); the bound is 1 grey level, which
  holds for builds without FMA and for the scalar tail, which rounds instead of truncating.
"""

from __future__ import annotations

import warnings

import cv2
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import pytest
import pytorch_grad_cam as pgc
import torch
import torchvision
from pytorch_grad_cam.feature_factorization.deep_feature_factorization import DeepFeatureFactorization as GcDFF
from pytorch_grad_cam.utils.image import show_factorization_on_image as gc_show_factorization
from sklearn.decomposition import NMF, KernelPCA

import flax_attn.cam as fc
from flax_attn.cam.factorization import _hsv_to_rgb_u8, _rgb_to_hsv_u8
from flax_attn.convert import from_torchvision
from parity_tests._utils import randomize_module_
from parity_tests.cam_models import make_pair, nchw

KERNELS = ("sigmoid", "rbf", "linear", "poly", "cosine")


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def maxdiff(a, b):
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


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


def _torch_acts(model, layer, x):
    got = {}
    h = _get(model, layer).register_forward_hook(lambda m, i, o: got.__setitem__("a", o.detach()))
    with torch.no_grad():
        model(x)
    h.remove()
    return got["a"].numpy()


def _grad_cam(cls, model, layers, x, **kw):
    cam = cls(model, [_get(model, p) for p in layers], **kw)
    out = cam(x, None)
    cam.activations_and_grads.release()
    return out


@pytest.mark.parametrize("kernel", KERNELS)
def test_kpca_cam_matches_gradcam(pair, images, kernel):
    tm, fm = pair
    layers = ("layer1", "layer3")
    ref = _grad_cam(pgc.KPCA_CAM, tm, layers, nchw(images), kernel=kernel)
    ours = fc.compute_cam(fc.make_tap(fm, list(layers)), jnp.asarray(images), None,
                          method=fc.get_method("kpcacam", kernel=kernel))
    assert ours.cam.shape == ref.shape
    assert maxdiff(ours.cam, ref) <= 1e-4


def test_kpca_cam_class_with_gamma_matches_gradcam(pair, images):
    tm, fm = pair
    ref = _grad_cam(pgc.KPCA_CAM, tm, ("layer2",), nchw(images), kernel="rbf", gamma=0.3)
    ours = fc.KPCA_CAM(fm, [fm.layer2], kernel="rbf", gamma=0.3)(jnp.asarray(images))
    assert maxdiff(ours, ref) <= 1e-4


@pytest.mark.parametrize("kernel", KERNELS)
def test_kpca_projection_float64_equals_sklearn(pair, images, kernel):
    """float64 on both sides: scikit-learn's KernelPCA (eigen_solver "auto": ARPACK for layer1's 221
    positions, dense for layer3's 20) vs ours, sign included, per image."""
    tm, _ = pair
    for layer in ("layer1", "layer3"):
        a = _torch_acts(tm, layer, nchw(images)).astype(np.float64)  # (B, C, h, w)
        with jax.enable_x64(True):
            ours = jax.vmap(lambda m: fc.kernel_pca_projection(m, kernel))(jnp.asarray(np.moveaxis(a, 1, -1)))
            ours = np.asarray(ours)
        for b in range(a.shape[0]):
            r = a[b].reshape(a.shape[1], -1).T
            r = r - r.mean(axis=0)
            ref = KernelPCA(n_components=1, kernel=kernel).fit_transform(r).reshape(a.shape[2:])
            assert rel(ours[b], ref) <= 1e-8, (layer, b)


@pytest.mark.parametrize("k", [1.0, 2.0])
def test_fem_matches_gradcam(pair, images, k):
    tm, fm = pair
    layers = ("layer1.attn", "layer2")
    ref = _grad_cam(pgc.FEM, tm, layers, nchw(images), k=k)
    ours = fc.FEM(fm, list(layers), k=k)(jnp.asarray(images))
    assert maxdiff(ours, ref) <= 1e-4


def _sklearn_nmf(acts_nchw, k):
    x = acts_nchw.transpose(1, 0, 2, 3).reshape(acts_nchw.shape[1], -1)
    x = x - x.min(axis=-1)[:, None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning when max_iter is reached
        m = NMF(n_components=k, init="random", random_state=0)
        m.fit_transform(x)
    return m


def _check_dff(tm, fm, layer, x, k, head_t, head_ours):
    gc = GcDFF(tm, _get(tm, layer), computation_on_concepts=head_t)
    ref = gc(nchw(x) if isinstance(x, np.ndarray) else x, k)
    gc.activations_and_grads.release()
    xt = nchw(x)
    sk = _sklearn_nmf(_torch_acts(tm, layer, xt), k)
    ours = fc.DeepFeatureFactorization(fm, layer, computation_on_concepts=head_ours)(jnp.asarray(x), k,
                                                                                      return_raw=True)
    assert float(ours.reconstruction_err) <= sk.reconstruction_err_ * (1 + 1e-3)
    assert int(ours.n_iter) == sk.n_iter_
    assert ours.concepts.shape == ref[0].shape
    assert rel(ours.concepts, ref[0]) <= 1e-5
    assert ours.explanations.shape == (x.shape[0], k) + x.shape[1:3]
    assert maxdiff(ours.explanations, np.stack(ref[1])) <= 1e-4
    if head_t is not None:
        assert ours.concept_outputs.shape == ref[2].shape
        assert rel(ours.concept_outputs, ref[2]) <= 1e-5
    return ours


def test_dff_matches_gradcam_small_net(pair, images):
    tm, fm = pair
    _check_dff(tm, fm, "layer3", images, 5, tm.fc, "fc")  # head by path
    _check_dff(tm, fm, "layer2", images, 4, None, None)


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    tm = randomize_module_(torchvision.models.resnet18(num_classes=10), seed=3).eval()
    return tm, from_torchvision("resnet18", tm.state_dict())


def test_resnet18_kpca_fem_dff_match_gradcam(resnet):
    tm, fm = resnet
    x = np.random.RandomState(2).randn(2, 96, 112, 3).astype(np.float32)
    ref = _grad_cam(pgc.KPCA_CAM, tm, ("layer3", "layer4"), nchw(x))
    assert maxdiff(fc.KPCA_CAM(fm, ["layer3", "layer4"])(jnp.asarray(x)), ref) <= 1e-4
    ref = _grad_cam(pgc.FEM, tm, ("layer4",), nchw(x))
    assert maxdiff(fc.FEM(fm, [fm.layer4])(jnp.asarray(x)), ref) <= 1e-4
    _check_dff(tm, fm, "layer4", x, 4, tm.fc, fm.fc)  # head as the NNX submodule


def _rainbow(n):
    cmap = matplotlib.colormaps["gist_rainbow"]
    return [np.array(cmap(i)) for i in np.arange(0, 1, 1.0 / n)]


def test_opencv_hsv_round_trip_reproduced():
    rgb = np.random.RandomState(0).randint(0, 256, (512, 512, 3)).astype(np.uint8)
    np.testing.assert_array_equal(_rgb_to_hsv_u8(rgb), cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV))
    h, s, v = np.meshgrid(np.arange(0, 180, 3), np.arange(256), np.arange(256), indexing="ij")
    hsv = np.stack([h, s, v], -1).astype(np.uint8).reshape(-1, 256, 3)
    d = np.abs(_hsv_to_rgb_u8(hsv).astype(int) - cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB).astype(int))
    assert d.max() <= 1


@pytest.mark.parametrize("weight", [0.3, 0.5])
def test_show_factorization_matches_gradcam(weight):
    rng = np.random.RandomState(4)
    img = rng.rand(24, 32, 3)
    expl = rng.rand(5, 24, 32).astype(np.float32)
    ref = gc_show_factorization(img, expl.copy(), colors=_rainbow(5), image_weight=weight)
    ours = fc.show_factorization_on_image(img, expl, image_weight=weight)
    assert ours.dtype == np.uint8 and ours.shape == ref.shape
    assert np.abs(ours.astype(int) - ref.astype(int)).max() <= 1
    labels = [f"concept {i}" for i in range(5)]
    ref = gc_show_factorization(img, expl.copy(), colors=_rainbow(5), image_weight=weight, concept_labels=labels)
    ours = fc.show_factorization_on_image(img, expl, image_weight=weight, concept_labels=labels)
    assert ours.shape == ref.shape == (24, 64, 3)
    assert np.abs(ours.astype(int) - ref.astype(int)).max() <= 1
