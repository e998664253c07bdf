"""KPCA-CAM, FEM and DeepFeatureFactorization without torch: jit caching, the NMF's stopping rule and
monotone descent, the KPCA sign rule, 3-D maps, NaN handling, and the errors users get for bad input."""

from __future__ import annotations

import gc
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import flax_attn.cam as fc


class Net(nnx.Module):
    def __init__(self, *, rngs):
        self.conv = nnx.Conv(3, 6, (3, 3), padding=((1, 1), (1, 1)), rngs=rngs)
        self.layer2 = nnx.Conv(6, 8, (3, 3), strides=2, padding=((1, 1), (1, 1)), rngs=rngs)
        self.fc = nnx.Linear(8, 5, rngs=rngs)

    def __call__(self, x):
        return self.fc(jax.nn.relu(self.layer2(jnp.tanh(self.conv(x)))).mean((1, 2)))


@pytest.fixture(scope="module")
def net():
    return Net(rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def x():
    return jax.random.normal(jax.random.key(1), (2, 10, 9, 3))


def test_kpca_fem_jit_cache(net, x):
    cam = fc.KPCA_CAM(net, ["conv"])
    a = cam(x)
    cam(x + 1.0)
    assert cam.num_traces == 1 and a.shape == (2, 10, 9)
    again = fc.KPCA_CAM(net, [net.conv])  # same options, same structure: shares the compiled function
    np.testing.assert_array_equal(again(x), a)
    assert again.num_traces == 0
    rbf = fc.KPCA_CAM(net, ["conv"], kernel="rbf")  # another option: one more compilation
    assert not np.allclose(rbf(x), a)
    assert rbf.num_traces == 1
    f = fc.FEM(net, ["conv", "layer2"], k=1.5)
    f(x)
    f(x * 2)
    assert f.num_traces == 1
    assert fc.FEM(net, ["conv", "layer2"], k=1.5).method == f.method  # equal by value
    assert fc.get_method("kpcacam", kernel="poly", gamma=0.5).options[:2] == (("kernel", "poly"), ("gamma", 0.5))


def test_kpca_sign_rule_and_equivalence_to_numpy():
    a = jax.random.normal(jax.random.key(2), (6, 7, 5))
    with jax.enable_x64(True):
        p = np.asarray(fc.kernel_pca_projection(jnp.asarray(np.asarray(a), jnp.float64), "rbf", 0.2))
    flat = np.asarray(a, np.float64).reshape(-1, 5)
    flat = flat - flat.mean(0)
    d2 = ((flat[:, None] - flat[None]) ** 2).sum(-1)
    k = np.exp(-0.2 * d2)
    n = len(k)
    one = np.full((n, n), 1 / n)
    kc = k - one @ k - k @ one + one @ k @ one
    lam, v = np.linalg.eigh(kc)
    v = v[:, -1] * np.sign(v[np.argmax(np.abs(v[:, -1])), -1])
    np.testing.assert_allclose(p.ravel(), v * np.sqrt(lam[-1]), rtol=1e-9, atol=1e-12)
    assert p.ravel()[np.argmax(np.abs(p))] > 0  # the largest-magnitude entry is positive (svd_flip)


def test_fem_3d_and_definition():
    a = jax.random.normal(jax.random.key(3), (4, 5, 3, 6))  # (h, w, d, C): a 3-D map
    raw = fc.get_method("fem", k=1.0).cam_image(fc.CamInputs(a, None, None, None, False))
    an = np.asarray(a, np.float64)
    th = an.mean((0, 1, 2)) + an.std((0, 1, 2))
    w = (an > th).mean((0, 1, 2))
    np.testing.assert_allclose(raw, (w * an).sum(-1), rtol=1e-5, atol=1e-6)


def test_nmf_stopping_rule_and_descent():
    x = jnp.abs(jax.random.normal(jax.random.key(4), (12, 40)))
    one = fc.nmf(x, 4, max_iter=1)
    assert int(one.n_iter) == 1
    full = fc.nmf(x, 4)
    assert 1 < int(full.n_iter) <= 200
    assert float(full.reconstruction_err) < float(one.reconstruction_err)
    assert float(jnp.min(full.W)) >= 0 and float(jnp.min(full.H)) >= 0
    np.testing.assert_allclose(full.reconstruction_err, jnp.linalg.norm(x - full.W @ full.H), rtol=1e-6)
    assert int(fc.nmf(x, 4, tol=1.0).n_iter) == 1  # tol >= 1: the first iteration already satisfies it
    jitted = jax.jit(lambda m: fc.nmf(m, 4))(x)  # traceable: shapes and options static
    np.testing.assert_allclose(jitted.W, full.W, rtol=1e-5, atol=1e-6)
    other = fc.nmf(x, 4, random_state=1)  # another initial point
    assert not np.allclose(other.W, full.W)


def test_dff_class_jit_cache_nan_and_head(net, x):
    d = fc.DeepFeatureFactorization(net, "layer2", computation_on_concepts="fc")
    concepts, expl, scores = d(x, n_components=3)
    assert concepts.shape == (8, 3) and expl.shape == (2, 3, 10, 9) and scores.shape == (3, 5)
    np.testing.assert_allclose(scores, net.fc(concepts.T), rtol=1e-6)
    assert float(expl.min()) >= 0 and float(expl.max()) <= 1
    d(x * 0.5, n_components=3)
    assert d.num_traces == 1
    d(x, n_components=2)  # a new n_components: one more compilation
    assert d.num_traces == 2
    raw = fc.DeepFeatureFactorization(net, [net.layer2])(x, 3, return_raw=True)
    assert isinstance(raw, fc.DFFResult) and raw.concept_outputs is None and raw.raw_explanations.shape == (2, 3, 5, 5)
    np.testing.assert_allclose(raw.concepts, concepts, rtol=1e-6)
    other = Net(rngs=nnx.Rngs(7))  # same structure: the compiled function is shared, the model not kept alive
    d2 = fc.DeepFeatureFactorization(other, "layer2")
    d2(x, n_components=3)
    assert d2.num_traces == 0
    ref = weakref.ref(other)
    del d2, other
    gc.collect()
    assert ref() is None
    acts = jax.random.normal(jax.random.key(5), (2, 4, 4, 6)).at[0, 1, 1, 2].set(jnp.nan)
    c, e = fc.dff(acts, 2)
    c0, e0 = fc.dff(acts.at[0, 1, 1, 2].set(0.0), 2)  # NaN -> 0, as grad-cam
    np.testing.assert_array_equal(c, c0)
    np.testing.assert_array_equal(e, e0)


def test_show_factorization_on_image_does_not_modify_input():
    e = np.random.RandomState(0).rand(3, 6, 7).astype(np.float32)
    e_copy = e.copy()
    out = fc.show_factorization_on_image(np.zeros((6, 7, 3)), e, image_weight=0.0)
    np.testing.assert_array_equal(e, e_copy)
    assert out.shape == (6, 7, 3) and out.dtype == np.uint8 and out.max() > 0


def test_errors(net, x):
    with pytest.raises(ValueError, match="kernel: expected one of"):
        fc.KPCA_CAM(net, ["conv"], kernel="laplace")
    with pytest.raises(ValueError, match="gamma: expected a positive number or None, got -1"):
        fc.KPCA_CAM(net, ["conv"], gamma=-1)
    with pytest.raises(ValueError, match="k: expected a finite number"):
        fc.FEM(net, ["conv"], k="2")
    with pytest.raises(ValueError, match="options"):
        fc.get_method("fem", sigma=2)
    with pytest.raises(ValueError, match=r"takes the options \['coef0', 'degree', 'gamma', 'kernel'\], got \['kernal'\]"):
        fc.get_method("kpcacam", kernal="rbf")
    with pytest.raises(ValueError, match="n_components: expected an integer >= 1, got 0"):
        fc.DeepFeatureFactorization(net, "layer2")(x, 0)
    with pytest.raises(ValueError, match="ONE layer"):
        fc.DeepFeatureFactorization(net, ["conv", "layer2"])
    with pytest.raises(TypeError, match="a path needs an NNX model"):
        fc.DeepFeatureFactorization((jnp.tanh, lambda a: a.mean((1, 2))), None, computation_on_concepts="fc")
    with pytest.raises(ValueError, match="unknown target layer path 'head'"):
        fc.DeepFeatureFactorization(net, "layer2", computation_on_concepts="head")
    with pytest.raises(ValueError, match="NMF needs non-negative values"):
        fc.nmf(-jnp.ones((3, 4)), 2)
    with pytest.raises(ValueError, match="init: only scikit-learn's 'random'"):
        fc.nmf(jnp.ones((3, 4)), 2, init="nndsvd")
    with pytest.raises(ValueError, match="max_iter: expected an integer >= 1"):
        fc.nmf(jnp.ones((3, 4)), 2, max_iter=0)
    with pytest.raises(ValueError, match=r"img: expected \(H, W, 3\) with H, W = \(6, 7\)"):
        fc.show_factorization_on_image(np.zeros((7, 6, 3)), np.zeros((2, 6, 7)))
    with pytest.raises(ValueError, match="colors: expected 2 colours"):
        fc.show_factorization_on_image(np.zeros((6, 7, 3)), np.zeros((2, 6, 7)), colors=[(1, 0, 0)])
    with pytest.raises(ValueError, match="concept_labels: expected 2 labels"):
        fc.show_factorization_on_image(np.zeros((6, 7, 3)), np.zeros((2, 6, 7)), concept_labels=["a"])
    with pytest.raises(ValueError, match=r"explanations: expected \(k, H, W\)"):
        fc.show_factorization_on_image(np.zeros((6, 7, 3)), np.zeros((6, 7)))
