"""Unit tests of the score family (:mod:`flax_attn.cam.score`) without torch: chunking never changes the
result, jit caching, noise keys, 2-D targets, errors. Numerical parity with grad-cam / torchcam is in
``parity_tests/test_cam_score_parity.py``.

One small NNX CNN (conv -> ReLU -> stride-2 conv "features" -> mean -> linear) at 9x11 input: 6 channels at
5x6, 2 images, so a ScoreCAM call scores 12 masked images.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import flax_attn.cam as fc
from flax_attn.cam import score as sc


class Net(nnx.Module):
    def __init__(self, rngs):
        self.stem = nnx.Conv(3, 4, (3, 3), rngs=rngs)
        self.features = nnx.Conv(4, 6, (3, 3), strides=2, rngs=rngs)
        self.head = nnx.Linear(6, 5, rngs=rngs)

    def __call__(self, x):
        return self.head(jnp.tanh(self.features(jax.nn.relu(self.stem(x)))).mean((1, 2)))


@pytest.fixture(scope="module")
def model():
    return Net(nnx.Rngs(0))


@pytest.fixture(scope="module")
def x():
    return jax.random.normal(jax.random.key(1), (2, 9, 11, 3))


@pytest.fixture(scope="module")
def tap(model):
    return fc.make_tap(model, ["features"])


def test_scorecam_batch_size_does_not_change_results(tap, x):
    ref = sc.score_cam(tap, x, [1, 3], batch_size=12)  # one chunk
    for bs in (5, 64):  # several chunks with a padded last one; one chunk larger than everything
        got = sc.score_cam(tap, x, [1, 3], batch_size=bs)
        np.testing.assert_allclose(got.raw[0], ref.raw[0], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(got.cam, ref.cam, rtol=0, atol=1e-6)


def test_sscam_iscam_batch_size_does_not_change_results(tap, x):
    key = jax.random.key(4)
    a = sc.ss_cam(tap, x, [1, 3], key=key, batch_size=7, num_samples=2)
    b = sc.ss_cam(tap, x, [1, 3], key=key, batch_size=24, num_samples=2)
    np.testing.assert_allclose(a.raw[0], b.raw[0], rtol=1e-6, atol=1e-7)
    a = sc.is_cam(tap, x, [1, 3], batch_size=5, num_samples=2)
    b = sc.is_cam(tap, x, [1, 3], batch_size=24, num_samples=2)
    np.testing.assert_allclose(a.raw[0], b.raw[0], rtol=1e-6, atol=1e-7)


def test_scorecam_by_hand(model, x):
    """The weights are softmax_c of the scores of x * minmax(upsample_align_corners(A_c)), re-derived here
    with numpy and plain loops (one image and channel at a time)."""
    tap = fc.make_tap(model, ["features"])
    _, (acts,) = tap.run(x)
    acts = np.asarray(acts, np.float64)
    size = x.shape[1:3]
    mh = sc.interpolation_matrix(acts.shape[1], size[0], align_corners=True)
    mw = sc.interpolation_matrix(acts.shape[2], size[1], align_corners=True)
    raw = np.zeros((2,) + acts.shape[1:3])
    for b, cls in enumerate([1, 3]):
        scores = []
        for c in range(acts.shape[-1]):
            u = mh @ acts[b, :, :, c] @ mw.T
            u = (u - u.min()) / (u.max() - u.min() + 1e-8)
            scores.append(float(model(x[b:b + 1] * jnp.asarray(u[None, :, :, None], jnp.float32))[0, cls]))
        w = np.exp(np.array(scores) - max(scores))
        w /= w.sum()
        raw[b] = acts[b] @ w
    got = sc.score_cam(tap, x, [1, 3], batch_size=4)
    np.testing.assert_allclose(got.raw[0], raw, rtol=1e-5, atol=1e-6)


def test_align_corners_matrix_endpoints_and_rows():
    m = sc.interpolation_matrix(5, 13, align_corners=True)
    np.testing.assert_allclose(m.sum(1), 1.0)
    assert m[0, 0] == 1.0 and m[-1, -1] == 1.0  # corners map onto corners
    m = sc.interpolation_matrix(5, 13, align_corners=False)
    np.testing.assert_allclose(m.sum(1), 1.0)
    assert m[0, 0] == 1.0 and 0 < m[1, 0] < 1  # half-pixel centres: clamped at the border, then blended


def test_two_dimensional_targets_equal_per_target_calls(tap, x):
    both = sc.score_cam(tap, x, jnp.array([[1, 4], [0, 2]]), batch_size=8)
    assert both.cam.shape == (2, 2, 9, 11)
    one = sc.score_cam(tap, x, [4, 2], batch_size=8)
    np.testing.assert_allclose(both.cam[:, 1], one.cam, atol=1e-6)
    sg = sc.smooth_gradcampp(tap, x, jnp.array([[1, 4], [0, 2]]), key=jax.random.key(0))
    one = sc.smooth_gradcampp(tap, x, [4, 2], key=jax.random.key(0))
    np.testing.assert_allclose(sg.cam[:, 1], one.cam, atol=1e-6)


def test_callable_targets_equal_class_indices(tap, x):
    ref = sc.score_cam(tap, x, [1, 3], batch_size=5)
    got = sc.score_cam(tap, x, [lambda o: o[1], lambda o: o[3]], batch_size=5)
    np.testing.assert_allclose(got.cam, ref.cam, atol=1e-6)


def test_class_api_jit_caching(model, x):
    fc.clear_compile_cache()
    cam = fc.ScoreCAM(model, ["features"], batch_size=5)
    a = cam(x, [1, 3])
    b = cam(x, [2, 0])  # new class values: same compiled function
    assert cam.num_traces == 1
    assert not np.allclose(a, b)
    again = fc.ScoreCAM(model, [model.features], batch_size=5)  # a new object on the same model structure
    np.testing.assert_allclose(again(x, [1, 3]), a, atol=1e-6)
    assert again.num_traces == 0
    other = fc.ScoreCAM(model, ["features"], batch_size=6)  # another chunking: another program
    other(x, [1, 3])
    assert other.num_traces == 1
    np.testing.assert_allclose(
        fc.ScoreCAM(model, ["features"], batch_size=5)(x, [1, 3]),
        jax.jit(lambda x: sc.score_cam(fc.make_tap(model, ["features"]), x, [1, 3], batch_size=5).cam)(x),
        atol=1e-6)


def test_noise_keys(model, x):
    cam = fc.SSCAM(model, ["features"], num_samples=2, batch_size=12, seed=3)
    first, second = cam(x, [1, 3]), cam(x, [1, 3])
    assert not np.allclose(first, second)  # a new key per call
    np.testing.assert_allclose(fc.SSCAM(model, ["features"], num_samples=2, batch_size=12, seed=3)(x, [1, 3]), first)
    k = jax.random.key(9)
    np.testing.assert_allclose(cam(x, [1, 3], key=k), cam(x, [1, 3], key=k))
    sg = fc.SmoothGradCAMpp(model, ["features"])
    assert sg.num_samples == 4 and sg.std == 0.3  # torchcam's defaults
    np.testing.assert_allclose(sg(x, [1, 3], key=k), sg(x, [1, 3], key=k))
    assert not np.allclose(sg(x, [1, 3], key=k), sg(x, [1, 3], key=jax.random.key(10)))


def test_defaults_are_the_references():
    f = (jnp.tanh, lambda a: a.mean((1, 2)))
    assert fc.ScoreCAM(f).batch_size == 16  # grad-cam
    s = fc.SSCAM(f)
    assert (s.batch_size, s.num_samples, s.std) == (32, 35, 2.0)  # torchcam
    i = fc.ISCAM(f)
    assert (i.batch_size, i.num_samples) == (32, 10)
    assert sc.iscam_coefficients(3).tolist() == pytest.approx([1 / 3, 1.0, 2.0])
    assert isinstance(s, fc.BaseCAM)


@pytest.mark.parametrize("bad,exc,msg", [(0, ValueError, "batch_size: expected an integer >= 1, got 0"),
                                         (-3, ValueError, "got -3"), (2.5, TypeError, "float"),
                                         ("4", TypeError, "str"), (True, TypeError, "bool")])
def test_bad_batch_size(model, tap, x, bad, exc, msg):
    with pytest.raises(exc, match=msg):
        fc.ScoreCAM(model, ["features"], batch_size=bad)
    with pytest.raises(exc, match=msg):
        sc.score_cam(tap, x, [1, 3], batch_size=bad)
    with pytest.raises(exc, match=msg):
        fc.ISCAM(model, ["features"], batch_size=bad)


def test_bad_options_and_inputs(model, tap, x):
    with pytest.raises(ValueError, match="num_samples: expected an integer >= 1, got 0"):
        fc.SSCAM(model, ["features"], num_samples=0)
    with pytest.raises(ValueError, match="std: expected a finite number > 0, got 0"):
        fc.SmoothGradCAMpp(model, ["features"], std=0)
    with pytest.raises(ValueError, match="std: expected a finite number > 0, got nan"):
        sc.ss_cam(tap, x, key=jax.random.key(0), std=float("nan"))
    with pytest.raises(TypeError, match="std: expected a positive real number, got str"):
        fc.SSCAM(model, ["features"], std="2")
    with pytest.raises(ValueError, match="SSCAM is random: pass key="):
        sc.ss_cam(tap, x, key=None)
    with pytest.raises(TypeError, match=r"key: expected a jax\.random key, got int"):
        sc.smooth_gradcampp(tap, x, key=3)
    with pytest.raises(ValueError, match="SoftmaxOutputTarget returns a vector"):
        sc.score_cam(tap, x, fc.SoftmaxOutputTarget())
    with pytest.raises(ValueError, match="got 3 targets for a batch of 2 images"):
        fc.ScoreCAM(model, ["features"])(x, [1, 2, 3])
    with pytest.raises(ValueError, match="class index out of range"):
        fc.ISCAM(model, ["features"])(x, [1, 7])
    with pytest.raises(ValueError, match=r"x: expected channels-last images \(B, H, W, C\), got \(9, 11\)"):
        fc.ScoreCAM(model, ["features"])(x[0, :, :, 0], [1])
    with pytest.raises(ValueError, match="expected channels-last maps"):
        sc.score_cam(fc.make_tap(model, ["head"]), x, [1, 3])
    with pytest.raises(TypeError, match="unexpected keyword argument 'aug_smooth'"):
        fc.ScoreCAM(model, ["features"])(x, [1, 3], aug_smooth=True)  # not offered (see docs/cam.md)
