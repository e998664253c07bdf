"""``gate_conv``: the spatial gate's convolution as one banded matmul equals ``lax.conv_general_dilated`` (values
and both gradients) on odd shapes, kernel sizes and paddings, and hands everything it does not cover to lax."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_attn.layers import _functional as F

DN = ("NHWC", "HWIO", "NHWC")


def _lax(x, k, padding, strides=(1, 1)):
    return jax.lax.conv_general_dilated(x, k, strides, padding, dimension_numbers=DN)


def _gate(x, k, padding, strides=(1, 1)):
    dn = jax.lax.conv_dimension_numbers(x.shape, k.shape, DN)
    return F.gate_conv(x, k, strides, padding, dimension_numbers=dn)


@pytest.mark.parametrize("shape,ksize,padding", [
    ((2, 9, 11, 2), 7, ((3, 3), (3, 3))), ((3, 5, 4, 2), 7, ((3, 3), (3, 3))), ((1, 1, 1, 2), 7, ((3, 3), (3, 3))),
    ((2, 13, 6, 1), 3, ((1, 1), (1, 1))), ((2, 8, 8, 3), 5, ((2, 2), (2, 2))), ((2, 7, 9, 2), 3, ((0, 2), (1, 0))),
    ((4, 6, 64, 2), 7, ((3, 3), (3, 3))),
])
def test_banded_matmul_equals_lax_conv(shape, ksize, padding):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(shape).astype(np.float32))
    k = jnp.asarray(rng.standard_normal((ksize, ksize, shape[-1], 1)).astype(np.float32))
    ref, out = _lax(x, k, padding), jax.jit(_gate, static_argnums=2)(x, k, padding)
    assert out.shape == ref.shape
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5 * float(jnp.abs(ref).max()))
    w = jnp.asarray(rng.standard_normal(ref.shape).astype(np.float32))
    g_ref = jax.grad(lambda a, b: jnp.sum(_lax(a, b, padding) * w), (0, 1))(x, k)
    g = jax.jit(jax.grad(lambda a, b: jnp.sum(_gate(a, b, padding) * w), (0, 1)))(x, k)
    for a, b in zip(g, g_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5 * float(jnp.abs(b).max()))


def test_other_convolutions_go_to_lax_unchanged(monkeypatch):
    calls = []
    real = jax.lax.conv_general_dilated

    def spy(*a, **kw):
        calls.append(a[0].shape)
        return real(*a, **kw)

    monkeypatch.setattr(jax.lax, "conv_general_dilated", spy)
    rng = np.random.default_rng(1)
    k = jnp.asarray(rng.standard_normal((3, 3, 2, 1)).astype(np.float32))
    wide = jnp.asarray(rng.standard_normal((1, 4, F.BANDED_CONV_MAX_WIDTH + 1, 2)).astype(np.float32))
    _gate(wide, k, ((1, 1), (1, 1)))  # wider than the banded path's limit
    small = jnp.asarray(rng.standard_normal((1, 6, 6, 2)).astype(np.float32))
    _gate(small, k, ((1, 1), (1, 1)), strides=(2, 2))  # strided
    k2 = jnp.asarray(rng.standard_normal((3, 3, 2, 2)).astype(np.float32))
    _gate(small, k2, ((1, 1), (1, 1)))  # two output channels
    assert len(calls) == 3
    calls.clear()
    out = _gate(small, k, ((1, 1), (1, 1)))
    assert calls == [] and out.shape == (1, 6, 6, 1)
    # 1-D and 3-D spatial gates (SpatialAttention(spatial_dims=1/3)) go to lax
    x3 = jnp.asarray(rng.standard_normal((1, 4, 5, 6, 2)).astype(np.float32))
    k3 = jnp.asarray(rng.standard_normal((3, 3, 3, 2, 1)).astype(np.float32))
    dn3 = jax.lax.conv_dimension_numbers(x3.shape, k3.shape, ("NDHWC", "DHWIO", "NDHWC"))
    F.gate_conv(x3, k3, (1, 1, 1), ((1, 1),) * 3, dimension_numbers=dn3)
    assert len(calls) == 1


def test_empty_batch_and_bfloat16():
    k = jnp.ones((7, 7, 2, 1), jnp.float32)
    assert _gate(jnp.zeros((0, 5, 5, 2)), k, ((3, 3), (3, 3))).shape == (0, 5, 5, 1)
    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 10, 12, 2)), jnp.bfloat16)
    out = _gate(x, k.astype(jnp.bfloat16), ((3, 3), (3, 3)))
    ref = _lax(x.astype(jnp.float32), k, ((3, 3), (3, 3)))
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref), rtol=3e-2,
                               atol=3e-2 * float(jnp.abs(ref).max()))
