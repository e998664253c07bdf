"""The max derivatives of the package: CBAM's global max pools (``_max_reduce``) and the backbones' max-pool
(``max_pool``) route each output's gradient to exactly one element, the first arg-max (PyTorch's rule), in
reverse and forward mode, under ``jit``, with ties, odd shapes and an empty batch. NumPy references here; the
PyTorch comparison is in ``parity_tests/test_blocks_parity.py`` / ``test_models_parity.py``."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_attn.layers._functional import _max_reduce, max_pool
from flax_attn.models._common import MaxPool2d


def _np_max_grad(x: np.ndarray, axes: tuple[int, ...], w: np.ndarray) -> np.ndarray:
    """d/dx sum(max(x, axes) * w) with the whole gradient on the first arg-max (C order over ``axes``)."""
    rest = [d for d in range(x.ndim) if d not in axes]
    moved = np.transpose(x, rest + list(axes))
    lead = moved.shape[:len(rest)]
    flat = moved.reshape(lead + (-1,))
    idx = flat.argmax(-1)  # numpy: first occurrence
    g = np.zeros_like(flat)
    for pos in np.ndindex(*lead):
        g[pos + (idx[pos],)] = w[pos]
    return np.transpose(g.reshape(moved.shape), np.argsort(rest + list(axes)))


def _np_pool(x: np.ndarray, k: int, s: int, p: int, w: np.ndarray | None = None):
    """Max-pool (floor mode, -inf pads) and, with ``w``, d/dx sum(pool(x) * w), first arg-max in row-major
    window order (``torch.nn.functional.max_pool2d``'s CPU kernel)."""
    n, h, wd, c = x.shape
    ho, wo = (h + 2 * p - k) // s + 1, (wd + 2 * p - k) // s + 1
    out = np.full((n, ho, wo, c), -np.inf, x.dtype)
    g = np.zeros_like(x)
    for b, i, j, ch in itertools.product(range(n), range(ho), range(wo), range(c)):
        best, arg = -np.inf, None
        for di, dj in itertools.product(range(k), range(k)):
            r, q = i * s - p + di, j * s - p + dj
            if 0 <= r < h and 0 <= q < wd and (arg is None or x[b, r, q, ch] > best):
                best, arg = x[b, r, q, ch], (r, q)
        out[b, i, j, ch] = best
        if w is not None and arg is not None:
            g[b, arg[0], arg[1], ch] += w[b, i, j, ch]
    return out, g


@pytest.mark.parametrize("shape,axes", [((2, 5, 7, 6), (1, 2)), ((2, 5, 7, 6), (3,)), ((3, 4, 9), (1,)),
                                        ((2, 3, 4, 5, 6), (1, 2, 3)), ((2, 5, 7, 6), (1, 3)), ((4, 6), (0,))])
def test_max_reduce_gradient_goes_to_the_first_arg_max(shape, axes):
    rng = np.random.default_rng(0)
    x = rng.integers(-3, 3, shape).astype(np.float32)  # many ties
    out_shape = tuple(d for i, d in enumerate(shape) if i not in axes)
    w = rng.standard_normal(out_shape).astype(np.float32)
    f = jax.jit(jax.value_and_grad(lambda v: jnp.sum(_max_reduce(v, axes) * w)))
    val, g = f(jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(g), _np_max_grad(x, axes, w))
    np.testing.assert_allclose(float(val), float(np.sum(x.max(axis=axes) * w)), rtol=1e-6, atol=1e-6)
    # forward mode: the tangent of the first arg-max element
    t = rng.standard_normal(shape).astype(np.float32)
    _, tan = jax.jvp(lambda v: _max_reduce(v, axes), (jnp.asarray(x),), (jnp.asarray(t),))
    np.testing.assert_array_equal(np.asarray(tan), np.sum(_np_max_grad(x, axes, np.ones(out_shape, np.float32)) * t,
                                                          axis=axes))


def test_max_reduce_keepdims_and_scale():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 4, 5, 3)).astype(np.float32)
    s = rng.random((2, 1, 1, 3)).astype(np.float32) + 0.5
    out = _max_reduce(jnp.asarray(x), -1, jnp.asarray(s), keepdims=True)
    assert out.shape == (2, 4, 5, 1)
    np.testing.assert_array_equal(np.asarray(out), (x * s).max(-1, keepdims=True))
    g = jax.grad(lambda v: jnp.sum(_max_reduce(v, (1, 2), jnp.asarray(s))))(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(g), _np_max_grad(x * s, (1, 2), np.ones((2, 3), np.float32)) * s)


def test_max_reduce_gradient_survives_a_recomputed_operand():
    """The operand is an elementwise expression XLA may recompute per consumer: every output still sends its
    whole gradient to one element (a mask ``x == max`` can miss there)."""
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((8, 6, 6, 32)).astype(np.float32))
    a = jnp.asarray(rng.standard_normal(32).astype(np.float32))

    def f(v):
        z = jax.nn.relu((v - 0.1) * jax.lax.rsqrt(a * a + 1e-5) * 1.3 + 0.2)
        return jnp.sum(_max_reduce(z, (1, 2))) + jnp.sum(_max_reduce(z, -1))

    g = np.asarray(jax.jit(jax.grad(f))(x))
    z = np.asarray(jax.nn.relu((x - 0.1) * jax.lax.rsqrt(a * a + 1e-5) * 1.3 + 0.2))
    per_unit = 1.3 / np.sqrt(np.asarray(a) ** 2 + 1e-5)
    # gradient mass: one unit per output whose arg-max is positive (ReLU passes it), scaled by d z / d x
    mass = (g / per_unit).sum()
    expected = (z.max(axis=(1, 2)) > 0).sum() + (z.max(axis=-1) > 0).sum()
    np.testing.assert_allclose(mass, expected, rtol=1e-5)


def test_max_reduce_empty_batch():
    g = jax.grad(lambda v: jnp.sum(_max_reduce(v, (1, 2))))(jnp.zeros((0, 3, 4, 2)))
    assert g.shape == (0, 3, 4, 2)


@pytest.mark.parametrize("shape,k,s,p", [((2, 9, 7, 3), 3, 2, 1), ((1, 8, 8, 2), 2, 2, 0), ((2, 7, 6, 2), 5, 1, 2),
                                         ((1, 5, 5, 1), 3, 1, 1), ((2, 10, 11, 2), 3, 3, 0), ((1, 2, 3, 2), 3, 2, 1)])
def test_max_pool_matches_torch_rule_with_ties(shape, k, s, p):
    rng = np.random.default_rng(3)
    x = rng.integers(-2, 2, shape).astype(np.float32)  # ties everywhere
    ref, _ = _np_pool(x, k, s, p)
    w = rng.standard_normal(ref.shape).astype(np.float32)
    _, g_ref = _np_pool(x, k, s, p, w)
    f = lambda v: max_pool(v, (k, k), (s, s), ((p, p), (p, p)))  # noqa: E731
    np.testing.assert_array_equal(np.asarray(jax.jit(f)(jnp.asarray(x))), ref)
    g = jax.jit(jax.grad(lambda v: jnp.sum(f(v) * w)))(jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(g), g_ref)
    # forward mode agrees with the reverse-mode rule, and the primal under jvp is the pool
    t = rng.standard_normal(shape).astype(np.float32)
    out, tan = jax.jvp(f, (jnp.asarray(x),), (jnp.asarray(t),))
    np.testing.assert_array_equal(np.asarray(out), ref)
    np.testing.assert_allclose(float(jnp.sum(tan * w)), float(np.sum(g_ref * t)), rtol=1e-5)


def test_max_pool_equals_xla_gradient_on_continuous_inputs():
    """Without ties the rule is JAX's own ``reduce_window`` derivative, bit for bit."""
    x = jnp.asarray(np.random.default_rng(4).standard_normal((3, 13, 11, 5)).astype(np.float32))

    def xla(v):
        return jax.lax.reduce_window(v, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), ((0, 0), (1, 1), (1, 1), (0, 0)))

    w = jnp.cos(jnp.arange(3 * 7 * 6 * 5, dtype=jnp.float32)).reshape(3, 7, 6, 5)
    g1 = jax.grad(lambda v: jnp.sum(MaxPool2d(3, 2, 1)(v) * w))(x)
    g2 = jax.grad(lambda v: jnp.sum(xla(v) * w))(x)
    np.testing.assert_array_equal(np.asarray(g1), np.asarray(g2))
    np.testing.assert_array_equal(np.asarray(MaxPool2d(3, 2, 1)(x)), np.asarray(xla(x)))


def test_max_pool_second_order_and_vmap():
    x = jnp.asarray(np.random.default_rng(5).standard_normal((2, 6, 6, 2)).astype(np.float32))
    f = lambda v: jnp.sum(max_pool(v, (3, 3), (2, 2), ((1, 1), (1, 1))) ** 2)  # noqa: E731
    h = jax.grad(lambda v: jnp.sum(jax.grad(f)(v)))(x)  # d/dx of 2 * pool(x) routed: 2 per arg-max element
    assert float(h.sum()) == pytest.approx(2.0 * 2 * 3 * 3 * 2)
    per = jax.vmap(lambda v: max_pool(v[None], (3, 3), (2, 2), ((1, 1), (1, 1)))[0])(x)
    np.testing.assert_array_equal(np.asarray(per), np.asarray(max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))))
