"""Unit tests of :mod:`flax_attn.cam.metrics` (no torch): the imputer against a dense float64 numpy solve,
deletion / insertion against a plain numpy re-derivation of RISE's loop, batching, jit caching, errors.

The model is a plain function (a fixed random linear map + tanh) that numpy can evaluate too, so every
expected value here is re-derived independently; shapes are small and odd (7x9, 5x6).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flax_attn.cam as fc
from flax_attn.cam.metrics import NEIGHBOR_WEIGHTS

H, W, C, K = 7, 9, 3, 5
WMAT = np.random.default_rng(11).normal(size=(H * W * C, K)).astype(np.float32) / np.sqrt(H * W * C)


def model(x):
    return jnp.tanh(x.reshape(x.shape[0], -1) @ jnp.asarray(WMAT, x.dtype)) * 3.0


def model_np(x):
    return np.tanh(x.reshape(x.shape[0], -1).astype(np.float64) @ WMAT.astype(np.float64)) * 3.0


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x = rng.normal(0.2, 1.0, (4, H, W, C)).astype(np.float32)
    cams = rng.random((4, H, W)).astype(np.float32)
    return x, cams, np.array([0, 3, 1, 4])


def dense_impute(img, keep):
    """The noisy linear imputer's system built densely from its definition, solved in float64."""
    h, w, c = img.shape
    idx = {p: n for n, p in enumerate(zip(*np.nonzero(~keep), strict=True))}
    a = np.zeros((len(idx), len(idx)))
    b = np.zeros((len(idx), c))
    for (i, j), n in idx.items():
        for (di, dj), wt in NEIGHBOR_WEIGHTS:
            ii, jj = i + di, j + dj
            if not (0 <= ii < h and 0 <= jj < w):
                continue
            a[n, n] += wt
            if keep[ii, jj]:
                b[n] += wt * img[ii, jj]
            else:
                a[n, idx[(ii, jj)]] -= wt
    out = img.astype(np.float64).copy()
    sol = np.linalg.solve(a, b)
    for (i, j), n in idx.items():
        out[i, j] = sol[n]
    return out


def test_imputer_equals_dense_solve_and_noise_only_on_removed_pixels(data):
    x, cams, _ = data
    keep = np.asarray(fc.road_keep_mask(jnp.asarray(cams), 35))
    assert 0.2 < (~keep).mean() < 0.9
    ours = np.asarray(fc.noisy_linear_impute(jnp.asarray(x), jnp.asarray(keep), noise=0.0))
    ref = np.stack([dense_impute(x[i], keep[i]) for i in range(len(x))])
    assert np.abs(ours - ref).max() <= 1e-5 * np.abs(ref).max()
    nz = np.asarray(jax.random.normal(jax.random.key(3), x.shape))
    noisy = np.asarray(fc.noisy_linear_impute(jnp.asarray(x), jnp.asarray(keep), noise=0.05,
                                              noise_values=jnp.asarray(nz)))
    np.testing.assert_allclose(noisy - ours, 0.05 * nz * (~keep)[..., None], atol=1e-6)
    assert np.array_equal(noisy[keep], x[keep])  # known pixels untouched, bit for bit


def test_imputer_reproduces_a_linear_ramp_in_an_interior_hole():
    """Symmetric neighbour weights: a linear image is its own weighted neighbour mean away from the border."""
    i, j = np.meshgrid(np.arange(9.0), np.arange(11.0), indexing="ij")
    img = np.stack([0.3 * i - 0.2 * j + 1, 0.1 * i + 0.4 * j], -1)[None].astype(np.float32)
    keep = np.ones((1, 9, 11), bool)
    keep[0, 2:7, 3:9] = False
    out = np.asarray(fc.noisy_linear_impute(jnp.asarray(img), jnp.asarray(keep), noise=0.0))
    np.testing.assert_allclose(out, img, atol=2e-5)


def test_road_keep_mask_is_percentile_rule(data):
    _, cams, _ = data
    for p in (10, 50, 87.5):
        morf = np.asarray(fc.road_keep_mask(jnp.asarray(cams), p))
        lerf = np.asarray(fc.road_keep_mask(jnp.asarray(cams), p, most_relevant_first=False))
        for i in range(len(cams)):
            assert np.array_equal(morf[i], cams[i] < np.percentile(cams[i], p))
            assert np.array_equal(lerf[i], (1 - cams[i]) < np.percentile(1 - cams[i], p))


def test_confidence_change_equals_numpy(data):
    x, cams, cls = data
    before = model_np(x)[np.arange(4), cls]
    after = model_np(x * cams[..., None])[np.arange(4), cls]
    d = after - before
    np.testing.assert_allclose(fc.CamMultImageConfidenceChange()(x, cams, cls, model), d, atol=1e-5)
    np.testing.assert_allclose(fc.DropInConfidence()(x, cams, cls, model), np.maximum(-d, 0), atol=1e-5)
    np.testing.assert_array_equal(fc.IncreaseInConfidence()(x, cams, cls, model), np.float32(d > 0))


def test_road_scores_equal_numpy_rederivation(data):
    x, cams, cls = data
    ps = [20, 60]
    key = jax.random.key(5)
    ours = np.asarray(fc.ROADCombined(ps)(x, cams, cls, model, key=key))
    morf_lerf = []
    for r, morf in enumerate((False, True)):
        nz = np.asarray(jax.random.normal(jax.random.fold_in(key, r), (len(ps),) + x.shape))
        d = []
        for k, p in enumerate(ps):
            keep = np.stack([(c if morf else 1 - c) < np.percentile(c if morf else 1 - c, p) for c in cams])
            imp = np.stack([dense_impute(x[i], keep[i]) for i in range(4)]) + 0.01 * nz[k] * (~keep)[..., None]
            d.append(model_np(imp)[np.arange(4), cls] - model_np(x)[np.arange(4), cls])
        morf_lerf.append(np.mean(d, 0))
    np.testing.assert_allclose(ours, (morf_lerf[0] - morf_lerf[1]) / 2, atol=1e-5)


def rise_curve(x, cam, cls, step, baseline, deletion):
    """RISE's CausalMetric loop in numpy (ranking ties: lower flat index first)."""
    h, w, _ = x.shape
    n = -(-h * w // step)
    order = np.argsort(-cam.reshape(-1), kind="stable")
    start = (x if deletion else baseline).reshape(h * w, -1).copy()
    finish = (baseline if deletion else x).reshape(h * w, -1)
    scores = []
    for i in range(n + 1):
        scores.append(model_np(start.reshape(1, h, w, -1))[0, cls])
        if i < n:
            sel = order[step * i: step * (i + 1)]
            start[sel] = finish[sel]
    s = np.array(scores)
    return (s.sum() - s[0] / 2 - s[-1] / 2) / n, s


@pytest.mark.parametrize("step,deletion", [(5, True), (9, False), (64, True)])
def test_deletion_insertion_equal_rise_loop(data, step, deletion):
    x, cams, cls = data
    cls_ = fc.DeletionCurve if deletion else fc.InsertionCurve
    auc, curves = cls_(step=step, batch_size=3)(x, cams, cls, model, return_curves=True)
    base = np.zeros_like(x) if deletion else np.asarray(fc.gaussian_blur(jnp.asarray(x)))
    for i in range(len(x)):
        ref_auc, ref_s = rise_curve(x[i], cams[i], cls[i], step, base[i], deletion)
        np.testing.assert_allclose(curves[i], ref_s, atol=1e-5)
        np.testing.assert_allclose(auc[i], ref_auc, atol=1e-5)
    assert curves.shape == (4, fc.DeletionCurve.num_steps(H, W, step) + 1)


def test_gaussian_blur_equals_numpy():
    x = np.random.default_rng(1).random((1, 6, 13, 2)).astype(np.float32)
    r = np.arange(11) - 5.0
    k = np.exp(-0.5 * (r / 5.0) ** 2)
    k /= k.sum()
    xp = np.pad(x.astype(np.float64), ((0, 0), (5, 5), (5, 5), (0, 0)))
    ref = np.zeros(x.shape)
    for a in range(11):
        for b in range(11):
            ref += k[a] * k[b] * xp[:, a:a + 6, b:b + 13]
    np.testing.assert_allclose(fc.gaussian_blur(jnp.asarray(x)), ref, atol=1e-6)


def test_batching_and_batch_size_do_not_change_results(data):
    x, cams, cls = data
    m = fc.ROADCombined([30, 70], noise=0.0)
    full = np.asarray(m(x, cams, cls, model))
    parts = np.concatenate([np.asarray(m(x[i:i + 1], cams[i:i + 1], cls[i:i + 1], model)) for i in range(4)])
    np.testing.assert_allclose(full, parts, atol=1e-6)
    chunked = np.asarray(fc.ROADCombined([30, 70], noise=0.0, batch_size=3)(x, cams, cls, model))
    np.testing.assert_allclose(full, chunked, atol=1e-6)
    d_full = np.asarray(fc.DeletionCurve(step=7)(x, cams, cls, model))
    d_chunk = np.asarray(fc.DeletionCurve(step=7, batch_size=5)(x, cams, cls, model))
    np.testing.assert_allclose(d_full, d_chunk, atol=1e-6)


def test_two_d_targets_and_default_target(data):
    x, cams, cls = data
    m = fc.CamMultImageConfidenceChange()
    two = np.asarray(m(x, cams, np.stack([cls, (cls + 1) % K], 1), model))
    assert two.shape == (4, 2)
    np.testing.assert_allclose(two[:, 0], m(x, cams, cls, model), atol=1e-6)
    np.testing.assert_allclose(two[:, 1], m(x, cams, (cls + 1) % K, model), atol=1e-6)
    top = model_np(x).argmax(1)
    np.testing.assert_allclose(m(x, cams, None, model), m(x, cams, top, model), atol=1e-6)


def test_keys_seed_and_noise(data):
    x, cams, cls = data
    m = fc.ROADMostRelevantFirst(50)
    a, b = m(x, cams, cls, model), m(x, cams, cls, model)  # fresh key per call, like grad-cam's randn
    assert not np.allclose(a, b)
    k = jax.random.key(1)
    np.testing.assert_array_equal(m(x, cams, cls, model, key=k), m(x, cams, cls, model, key=k))
    np.testing.assert_array_equal(fc.ROADMostRelevantFirst(50, seed=4)(x, cams, cls, model),
                                  fc.ROADMostRelevantFirst(50, seed=4)(x, cams, cls, model))


def test_jit_cache_shared_and_not_retraced(data):
    x, cams, cls = data
    m = fc.ROADLeastRelevantFirstAverage([25, 75])
    m(x, cams, cls, model)
    m(x + 1, cams[::-1], cls[::-1], model)  # new values: no new trace
    assert m.num_traces <= 1
    m2 = fc.ROADLeastRelevantFirstAverage([25, 75])
    m2(x * 2, cams, [fc.ClassifierOutputTarget(int(c)) for c in cls], model)
    assert m2.num_traces == 0  # another object, same model and options: the shared cache
    m3 = fc.ROADLeastRelevantFirstAverage([10, 90])
    m3(x, cams, cls, model)
    assert m3.num_traces == 0  # new percentile values (same count) are arguments, not constants
    c = fc.CamMultImageConfidenceChange()
    c(x, cams, cls, model)
    before = fc.metric_cache_info()[2]
    c(x[:2], cams[:2], cls[:2], model)  # new batch size: one trace
    assert fc.metric_cache_info()[2] == before + 1


def test_nnx_model_and_in_place_weight_change():
    from flax import nnx

    net = nnx.Sequential(nnx.Conv(3, 4, (3, 3), rngs=nnx.Rngs(0)), lambda a: a.mean((1, 2)))
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 6, 5, 3)).astype(np.float32)
    cams = rng.random((2, 6, 5)).astype(np.float32)
    m = fc.CamMultImageConfidenceChange()
    ref = np.asarray(net(x * cams[..., None]) - net(x))[np.arange(2), [1, 2]]
    np.testing.assert_allclose(m(x, cams, [1, 2], net), ref, atol=1e-5)
    net.layers[0].kernel[...] = net.layers[0].kernel[...] * 2.0 + 0.1  # in place: the next call must see it
    ref2 = np.asarray(net(x * cams[..., None]) - net(x))[np.arange(2), [1, 2]]
    assert not np.allclose(ref, ref2)
    np.testing.assert_allclose(m(x, cams, [1, 2], net), ref2, atol=1e-5)
    assert m.num_traces <= 1


@pytest.mark.parametrize("make,match", [
    (lambda: fc.ROADMostRelevantFirst(120), "percentile out of range: got 120"),
    (lambda: fc.ROADLeastRelevantFirst(-1), "percentile out of range: got -1"),
    (lambda: fc.ROADMostRelevantFirst("auto"), "Otsu"),
    (lambda: fc.ROADCombined([10, 101]), "percentile out of range: got 101"),
    (lambda: fc.ROADCombined([]), "at least one percentile"),
    (lambda: fc.ROADCombined(50), "sequence of percentiles"),
    (lambda: fc.ROADCombined(batch_size=0), "batch_size: expected a positive integer"),
    (lambda: fc.DeletionCurve(step=0), "step: expected a positive integer"),
    (lambda: fc.InsertionCurve(baseline="noise"), "baseline: expected 'zeros', 'blur'"),
])
def test_bad_options_raise(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_bad_inputs_raise(data):
    x, cams, cls = data
    m = fc.CamMultImageConfidenceChange()
    with pytest.raises(ValueError, match=r"cams: expected one map per image of shape \(4, 7, 9\).*got \(4, 9, 7\)"):
        m(x, cams.transpose(0, 2, 1), cls, model)
    with pytest.raises(ValueError, match=r"pick one target of a \(B, T, H, W\) CAM"):
        m(x, cams[:, None], cls, model)
    with pytest.raises(ValueError, match=r"got \(3, 7, 9\)"):
        m(x, cams[:3], cls, model)
    with pytest.raises(ValueError, match=r"expected channels-last images \(B, H, W, C\)"):
        m(x[0], cams, cls, model)
    with pytest.raises(ValueError, match="got 3 targets for a batch of 4"):
        m(x, cams, cls[:3], model)
    with pytest.raises(ValueError, match="class index out of range"):
        m(x, cams, [0, 1, 2, 9], model)
    with pytest.raises(TypeError, match="model: expected"):
        m(x, cams, cls, "resnet")
    with pytest.raises(ValueError, match=r"baseline: expected an array broadcastable to the images"):
        fc.DeletionCurve(baseline=np.zeros((2, 2)))(x, cams, cls, model)


def test_linen_pair_and_tap_models(data):
    import flax.linen as nn

    x, cams, cls = data

    class Net(nn.Module):
        @nn.compact
        def __call__(self, v):
            return nn.Dense(K)(v.reshape(v.shape[0], -1))

    net = Net()
    variables = net.init(jax.random.key(0), x[:1])
    kern = np.asarray(variables["params"]["Dense_0"]["kernel"], np.float64)
    bias = np.asarray(variables["params"]["Dense_0"]["bias"], np.float64)

    def ref(v):
        return v.reshape(len(v), -1).astype(np.float64) @ kern + bias

    d = (ref(x * cams[..., None]) - ref(x))[np.arange(4), cls]
    np.testing.assert_allclose(fc.CamMultImageConfidenceChange()(x, cams, cls, (net, variables)), d, atol=1e-5)
    tap = fc.FunctionTap(lambda v: v, lambda v: net.apply(variables, v))
    np.testing.assert_allclose(fc.CamMultImageConfidenceChange()(x, cams, cls, tap), d, atol=1e-5)
