"""AblationCAM, FullGrad and guided backprop vs pytorch_grad_cam 1.5.7 on identical weights: the small SE/CBAM
networks of ``cam_models.py`` and torchvision's ResNet-18 (random weights and BatchNorm statistics, converted
with ``flax_attn.convert.from_torchvision``) at small odd inputs.

Normalised maps must agree to max |diff| <= 1e-4, AblationCAM's raw maps (captured from grad-cam's own
``get_cam_image``) to a relative error <= 1e-5, guided gradients to a relative error <= 1e-5.

AblationCAM on a layer whose minimum is not 0 (``layer2.bn``, before its ReLU) runs grad-cam with
``batch_size=1``: grad-cam's ``AblationLayer`` modifies its chunk in place and re-reads the minimum, so the
``i``-th member of a chunk ablates to ``min - (i + 1) * 1e7``, so its result can depend on ``batch_size``
(not here: a ReLU follows ``layer2.bn`` and clips every such value to 0); with one channel per chunk it is the
rule ``min - 1e7`` that we apply to every channel.

``ratio_channels_to_ablate`` is compared on a dense layer (``layer3.bn``): on a post-ReLU layer, sparse
channels that lie entirely inside the EigenCAM mask all score exactly 1.0, and grad-cam breaks such ties with
numpy's unstable quicksort, we with a stable sort (float rounding under jit can also split them): which of
the tied channels is ablated is then arbitrary on both sides.
"""

from __future__ import annotations

import copy

import jax.numpy as jnp
import numpy as np
import pytest
import pytorch_grad_cam as pgc
import torch
import torchvision
from pytorch_grad_cam.utils.image import deprocess_image as gc_deprocess
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget as GcTarget

import flax_attn.cam as fc
from flax_attn.convert import from_torchvision
from parity_tests._utils import randomize_module_
from parity_tests.cam_models import make_pair, nchw


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def _get(model, path):
    for p in path.split("."):
        model = getattr(model, p)
    return model


def _gc_with_raws(cam, x, targets):
    raws = []
    orig = cam.get_cam_image

    def capture(*a, **k):
        r = orig(*a, **k)
        raws.append(np.asarray(r))
        return r

    cam.get_cam_image = capture
    out = cam(nchw(x), targets)
    cam.activations_and_grads.release()
    return np.asarray(out), raws


@pytest.fixture(scope="module")
def pair():
    return make_pair(0)


@pytest.fixture(scope="module")
def images():
    return np.random.RandomState(1).randn(2, 13, 17, 3).astype(np.float32)


@pytest.fixture(scope="module")
def resnet():
    tm = torchvision.models.resnet18(num_classes=10)
    randomize_module_(tm)
    tm.eval()
    return tm, from_torchvision("resnet18", tm.state_dict())


# ------------------------------------------------------------------------------------------------ AblationCAM

@pytest.mark.parametrize("layers,gc_batch,ratio", [
    (("layer2",), 32, 1.0),                 # CBAM output: minimum exactly 0 -> ablate to 0
    (("layer1.attn", "layer3"), 32, 1.0),   # two layers, each ablated on its own
    (("layer2.bn",), 1, 1.0),               # before the ReLU: minimum < 0 -> min - 1e7 (see module docstring)
    (("layer3.bn",), 1, 0.25),              # EigenCAM channel ranking: 4 highest + 4 lowest of 16 channels
])
def test_ablationcam_matches_gradcam(pair, images, layers, gc_batch, ratio):
    tm, fm = pair
    gc = pgc.AblationCAM(tm, [_get(tm, p) for p in layers], batch_size=gc_batch, ratio_channels_to_ablate=ratio)
    ref, ref_raws = _gc_with_raws(gc, images, [GcTarget(1), GcTarget(4)])
    ours = fc.AblationCAM(fm, list(layers), batch_size=5, ratio_channels_to_ablate=ratio)(
        jnp.asarray(images), [1, 4], return_raw=True)
    assert ours.cam.shape == ref.shape
    assert np.abs(np.asarray(ours.cam) - ref).max() <= 1e-4
    assert len(ref_raws) == len(layers)
    for r_ours, r_ref in zip(ours.raw, ref_raws):
        assert rel(r_ours, r_ref) <= 1e-5


@pytest.mark.slow
def test_ablationcam_resnet18_layer4_matches_gradcam(resnet):
    """Normalised maps within 1e-4 of grad-cam. The raw maps are ill-conditioned: a channel's weight is the
    score drop ``y - y_c`` of one channel out of 512 (~|y| / 512), and grad-cam casts the scores to float32
    (``np.float32``) before differencing, so its own weights carry ~1e-4 relative noise (measured: 1.5e-4 between
    grad-cam float32 and grad-cam on a float64 copy of the model). Both sides are therefore compared to grad-cam
    on the float64 model, and ours must be within 3x grad-cam's own float32 error there (DESIGN.md, numerics)."""
    tm, fm = resnet
    x = np.random.RandomState(3).randn(2, 61, 67, 3).astype(np.float32)  # layer4: 2 x 3 x 512
    targets = [GcTarget(2), GcTarget(7)]
    ref, ref_raws = _gc_with_raws(pgc.AblationCAM(tm, [tm.layer4], batch_size=64), x, targets)
    t64 = copy.deepcopy(tm).double()
    raws64 = []
    cam64 = pgc.AblationCAM(t64, [t64.layer4], batch_size=64)
    orig = cam64.get_cam_image
    cam64.get_cam_image = lambda *a, **k: raws64.append(np.asarray(orig(*a, **k))) or raws64[-1]
    cam64(nchw(x).double(), targets)
    cam64.activations_and_grads.release()
    ours = fc.AblationCAM(fm, ["layer4"], batch_size=128)(jnp.asarray(x), [2, 7], return_raw=True)
    assert np.abs(np.asarray(ours.cam) - ref).max() <= 1e-4
    own = rel(ref_raws[0], raws64[0])
    assert 1e-6 < own < 1e-3  # the reference's own float32 error (it is not zero: the bound below is not vacuous)
    assert rel(ours.raw[0], raws64[0]) <= 3 * own


# ------------------------------------------------------------------------------------------------ FullGrad

def test_fullgrad_matches_gradcam_cam_net(pair, images):
    tm, fm = pair
    ref = pgc.FullGrad(tm, [])(nchw(images), [GcTarget(1), GcTarget(4)])
    ours = fc.FullGrad(fm, target_layers=[])(jnp.asarray(images), [1, 4])
    assert np.abs(np.asarray(ours) - ref).max() <= 1e-4


def test_fullgrad_matches_gradcam_torchvision_resnet18(resnet):
    """Every BatchNorm of a torchvision ResNet-18 (its convolutions have no bias) through our conversion."""
    tm, fm = resnet
    x = np.random.RandomState(2).randn(2, 40, 48, 3).astype(np.float32)
    ref = pgc.FullGrad(tm, [])(nchw(x), [GcTarget(1), GcTarget(4)])
    assert len(fc.bias_layers(fm)) == sum(isinstance(m, torch.nn.BatchNorm2d) for m in tm.modules()) == 20
    ours = fc.FullGrad(fm, target_layers=[])(jnp.asarray(x), [1, 4])
    assert np.abs(np.asarray(ours) - ref).max() <= 1e-4


# ------------------------------------------------------------------------------------------------ guided backprop

@pytest.mark.parametrize("category", [3, None])
def test_guided_backprop_matches_gradcam(resnet, category):
    tm, fm = resnet
    x = np.random.RandomState(4).randn(1, 40, 48, 3).astype(np.float32)
    ref = pgc.GuidedBackpropReLUModel(tm)(nchw(x), target_category=category)  # (H, W, C) of image 0
    ours = fc.GuidedBackpropReLUModel(fm)(jnp.asarray(x), category)
    assert ours.shape == (1,) + ref.shape
    assert rel(ours[0], ref) <= 1e-5
    plain = np.asarray(torch.autograd.functional.jacobian(lambda t: tm(t)[0, 3], nchw(x)))[0].transpose(1, 2, 0)
    assert rel(plain, ref) > 0.1  # the guided ReLUs changed the gradient: the comparison above is not vacuous


def test_guided_gradcam_and_deprocess_match_gradcam_example(resnet):
    """grad-cam's usage example: ``cam_gb = deprocess_image(cam_mask * gb)`` with its GradCAM and guided model."""
    tm, fm = resnet
    x = np.random.RandomState(5).randn(1, 40, 48, 3).astype(np.float32)
    gray = pgc.GradCAM(tm, [tm.layer4])(nchw(x), [GcTarget(3)])[0]
    gb = pgc.GuidedBackpropReLUModel(tm)(nchw(x), target_category=3)
    ref = gc_deprocess(np.stack([gray] * 3, axis=-1) * gb)
    ours_cam = fc.GradCAM(fm, ["layer4"])(jnp.asarray(x), [3])
    ours = fc.deprocess_image(fc.guided_gradcam(ours_cam, fc.GuidedBackpropReLUModel(fm)(jnp.asarray(x), 3))[0])
    assert ours.dtype == np.uint8 and ours.shape == ref.shape
    assert np.abs(ours.astype(int) - ref.astype(int)).max() <= 1  # uint8 truncation of equal floats to 1e-5
    np.testing.assert_array_equal(fc.deprocess_image(gb), gc_deprocess(gb))
