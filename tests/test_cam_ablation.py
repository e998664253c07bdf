"""AblationCAM, FullGrad and guided backprop without torch: the taps' ``replace`` (downstream-only forward,
checked on the compiled HLO), batch_size invariance, jit caching, and the errors users get for bad input."""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import flax_attn.cam as fc
from flax_attn.cam.ablation import ablation_cam, channels_to_ablate
from flax_attn.layers import BatchNorm


class Net(nnx.Module):
    """``up1 -> up2 -> relu`` (upstream, 2 convs), ``mid`` (tapped conv), ``down`` (1 conv) -> mean -> fc."""

    def __init__(self, *, rngs):
        self.up1 = nnx.Conv(3, 6, (3, 3), padding=((1, 1), (1, 1)), rngs=rngs)
        self.up2 = nnx.Conv(6, 6, (3, 3), padding=((1, 1), (1, 1)), rngs=rngs)
        self.bn = BatchNorm(6, rngs=rngs)
        self.mid = nnx.Conv(6, 5, (3, 3), strides=2, padding=((1, 1), (1, 1)), rngs=rngs)
        self.down = nnx.Conv(5, 4, (3, 3), padding=((1, 1), (1, 1)), rngs=rngs)
        self.fc = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x):
        h = jax.nn.relu(self.bn(self.up2(jax.nn.relu(self.up1(x)))))
        a = jax.nn.relu(self.mid(h))
        return self.fc(jnp.tanh(self.down(a)).mean((1, 2)))


@pytest.fixture(scope="module")
def net():
    m = Net(rngs=nnx.Rngs(0))
    m.bn.mean[...] = jax.random.normal(jax.random.key(1), (6,)) * 0.3
    m.bn.var[...] = jax.random.uniform(jax.random.key(2), (6,)) + 0.5
    m.bn.bias[...] = jax.random.normal(jax.random.key(3), (6,)) * 0.2
    m.eval()
    return m


@pytest.fixture(scope="module")
def x():
    return jax.random.normal(jax.random.key(4), (2, 9, 11, 3))


def _count_convs(compiled_text: str) -> int:
    return len(re.findall(r"\bconvolution\(", compiled_text))


# ---------------------------------------------------------------------------------------------- taps replace

def test_replace_returns_head_of_replacement_nnx(net, x):
    tap = fc.make_tap(net, ["mid"])
    _, (a,) = tap.run(x)
    other = a * 0.5 + 1.0
    out, (rec,) = tap.run(x, replace={"mid": other})
    ref = net.fc(jnp.tanh(net.down(other)).mean((1, 2)))
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)
    assert rec is other
    # a probe is still added on top of a replacement (its gradient is the gradient w.r.t. the activation)
    g = jax.grad(lambda p: tap.run(x, [p], replace={"mid": other})[0].sum())(jnp.zeros_like(a))
    g_ref = jax.grad(lambda a_: net.fc(jnp.tanh(net.down(a_)).mean((1, 2))).sum())(other)
    np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-7)


def test_replace_does_not_run_upstream_under_jit(net, x):
    """The compiled forward with ``mid`` replaced holds only the downstream conv (``down``): XLA removed the
    dead upstream convolutions (``up1``, ``up2``) and ``mid`` itself, which is never called."""
    tap = fc.make_tap(net, ["mid"])
    _, (a,) = tap.run(x)
    full = jax.jit(lambda x: tap.run(x)[0]).lower(x).compile().as_text()
    repl = jax.jit(lambda x, a: tap.run(x, replace={"mid": a})[0]).lower(x, a).compile().as_text()
    assert _count_convs(full) == 4
    assert _count_convs(repl) == 1


def test_ablation_cam_compiled_runs_downstream_only(net, x):
    """The whole jitted AblationCAM: one full forward (4 convs) + the ablated forward inside the lax.map loop,
    which holds only ``down`` (1 conv): 5 convolutions, not 8."""
    tap = fc.make_tap(net, ["mid"])
    txt = jax.jit(lambda x: ablation_cam(tap, x, [0, 2], batch_size=4).cam).lower(x).compile().as_text()
    assert _count_convs(txt) == 5
    assert "while" in txt  # the chunks are one loop in the compiled function, not unrolled host calls


def test_replace_linen_and_function_taps():
    class L(nn.Module):
        @nn.compact
        def __call__(self, x):
            a = nn.Conv(4, (3, 3), name="conv")(x)
            return nn.Dense(2, name="head")(a.mean((1, 2)))

    m = L()
    xx = jnp.ones((1, 6, 6, 3))
    v = m.init(jax.random.key(0), xx)
    rep = jnp.full((1, 6, 6, 4), 2.0)
    out, (rec,) = fc.make_tap((m, v), ["conv"]).run(xx, replace={"conv": rep})
    ref = nn.Dense(2).apply({"params": v["params"]["head"]}, rep.mean((1, 2)))
    np.testing.assert_allclose(out, ref, rtol=1e-6)
    assert rec is rep

    calls = []
    tap = fc.FunctionTap(lambda z: calls.append(1) or z * 3.0, lambda a: a.sum((1, 2)))
    out, _ = tap.run(xx, replace={"features": rep[..., :3]})
    assert calls == [] and np.allclose(out, 2.0 * 36)


def test_replace_errors(net, x):
    tap = fc.make_tap(net, ["mid"])
    with pytest.raises(ValueError, match=r"replace: \['down'\] are not target layers"):
        tap.run(x, replace={"down": jnp.zeros(1)})
    with pytest.raises(TypeError, match="replace: expected a mapping"):
        tap.run(x, replace=[jnp.zeros(1)])
    with pytest.raises(TypeError, match=r"replace\['mid'\]: expected an array"):
        tap.run(x, replace={"mid": 3.0})


# ---------------------------------------------------------------------------------------------- AblationCAM

@pytest.fixture(scope="module")
def ref_bs3(net, x):
    return fc.AblationCAM(net, ["mid"], batch_size=3)(x, [0, 2], return_raw=True)


@pytest.mark.parametrize("bs", [1, 7, 64])
def test_batch_size_does_not_change_results(net, x, ref_bs3, bs):
    """Only float32 rounding differs (XLA tiles convolutions of another batch differently, and ``y - y_c``
    cancels digits): relative error 1e-5 on the raw maps, 1e-5 max-abs on the normalised maps."""
    res = fc.AblationCAM(net, ["mid"], batch_size=bs)(x, [0, 2], return_raw=True)
    a, b = np.asarray(res.raw[0], np.float64), np.asarray(ref_bs3.raw[0], np.float64)
    assert np.linalg.norm(a - b) / np.linalg.norm(b) <= 1e-5
    assert np.abs(np.asarray(res.cam) - np.asarray(ref_bs3.cam)).max() <= 1e-5


def _weights_by_hand(tap, x, cls, layer):
    """w_c = (y - y_c) / y by one eager forward per channel, grad-cam's ablation value (0 if the image's
    minimum is 0, else min - 1e7); returns (activation, weights (C, B))."""
    out, (a,) = tap.run(x)
    rows = jnp.arange(x.shape[0])
    y = out[rows, cls]
    amin = jnp.min(a, axis=(1, 2, 3))
    value = jnp.where(amin == 0, 0.0, amin - 1e7)[:, None, None]
    w = []
    for c in range(a.shape[-1]):
        out_c, _ = tap.run(x, replace={layer: a.at[..., c].set(value)})
        w.append((y - out_c[rows, cls]) / y)
    return a, jnp.stack(w)


def test_weights_are_relative_score_drops(net, x, ref_bs3):
    """raw = sum_c w_c A_c with w_c = (y - y_c) / y; ``mid`` (a conv before its ReLU) has a negative minimum,
    so ablated channels are set to ``min - 1e7``."""
    a, w = _weights_by_hand(fc.make_tap(net, ["mid"]), x, jnp.array([0, 2]), "mid")
    assert float(jnp.min(a)) < 0
    np.testing.assert_allclose(ref_bs3.raw[0], jnp.einsum("bhwc,cb->bhw", a, w), rtol=1e-5, atol=1e-6)


def test_zero_minimum_ablates_to_zero(net, x):
    """A post-ReLU map (minimum exactly 0): ablated channels are set to 0."""
    tap = fc.FunctionTap(lambda z: jax.nn.relu(net.mid(net.bn(net.up2(net.up1(z))))),
                         lambda a: net.fc(net.down(a).mean((1, 2))))
    a, w = _weights_by_hand(tap, x, jnp.array([1, 1]), "features")
    assert float(jnp.min(a)) == 0.0
    res = jax.jit(lambda x: ablation_cam(tap, x, [1, 1], batch_size=4))(x)
    np.testing.assert_allclose(res.raw[0], jnp.einsum("bhwc,cb->bhw", a, w), rtol=1e-5, atol=1e-6)


def test_jit_caching(net, x):
    cam = fc.AblationCAM(net, ["mid"], batch_size=5)
    cam(x, [0, 1])
    first = cam.num_traces
    cam(x * 2.0, [2, 1])  # new values, new classes: no recompilation
    assert cam.num_traces == first
    other = fc.AblationCAM(net, ["mid"], batch_size=5)  # same structure and options: shares the compilation
    other(x, [1, 1])
    assert other.num_traces == 0
    third = fc.AblationCAM(net, ["mid"], batch_size=6)  # a new batch_size compiles once more
    third(x, [1, 1])
    assert third.num_traces == 1


def test_targets_2d_and_functional_equal_class(net, x):
    two = fc.AblationCAM(net, ["mid"], batch_size=8)(x, jnp.array([[0, 2], [1, 2]]))
    assert two.shape == (2, 2, 9, 11)
    one = ablation_cam(fc.make_tap(net, ["mid"]), x, [2, 2], batch_size=8).cam
    np.testing.assert_allclose(two[:, 1], one, atol=1e-6)


def test_channels_to_ablate_counts():
    a = jax.random.normal(jax.random.key(0), (5, 5, 10))
    assert channels_to_ablate(a, 1.0).tolist() == list(range(10))
    sel = channels_to_ablate(a, 0.3)  # k = 3: the 3 highest and the 3 lowest scored channels
    assert sel.shape == (6,) and len(set(sel.tolist())) == 6
    assert sorted(channels_to_ablate(a, 0.5).tolist()) == list(range(10))  # 2k >= C: every channel
    assert channels_to_ablate(a, 0.05).shape == (0,)  # k = 0: nothing ablated


def test_ratio_keeps_original_score_for_skipped_channels(net, x):
    res = fc.AblationCAM(net, ["mid"], ratio_channels_to_ablate=0.2)(x, [0, 2], return_raw=True)
    # C = 5, k = 1: 2 channels ablated per image; with a single map the raw is a sum of 2 weighted channels
    tap = fc.make_tap(net, ["mid"])
    _, (a,) = tap.run(x)
    sel = jax.vmap(lambda ab: channels_to_ablate(ab, 0.2))(a)
    assert sel.shape == (2, 2)
    full = fc.AblationCAM(net, ["mid"])(x, [0, 2], return_raw=True)
    # the full-ratio weights recovered channel by channel agree with the reduced run on the selected channels
    for b in range(2):
        sub = jnp.zeros(a.shape[-1]).at[sel[b]].set(1.0)
        w_full = _weights_from_raw(a[b], full.raw[0][b])
        np.testing.assert_allclose(_weights_from_raw(a[b], res.raw[0][b]), w_full * sub, rtol=1e-4, atol=1e-5)


def _weights_from_raw(a, raw):
    """Least-squares channel weights of raw = sum_c w_c a_c (a has full column rank here)."""
    return jnp.linalg.lstsq(a.reshape(-1, a.shape[-1]), raw.reshape(-1))[0]


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, None])
def test_bad_batch_size(net, bad):
    with pytest.raises(ValueError, match="batch_size: expected an integer >= 1"):
        fc.AblationCAM(net, ["mid"], batch_size=bad)


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.01, "half", False])
def test_bad_ratio(net, bad):
    with pytest.raises(ValueError, match=r"ratio_channels_to_ablate: expected a number in \(0, 1\]"):
        fc.AblationCAM(net, ["mid"], ratio_channels_to_ablate=bad)


def test_ablation_unsupported_options(net, x):
    with pytest.raises(ValueError, match="aug_smooth is not supported"):
        fc.AblationCAM(net, ["mid"])(x, [0, 0], aug_smooth=True)
    with pytest.raises(ValueError, match="reshape_transform is not supported"):
        fc.AblationCAM(net, ["mid"], reshape_transform=lambda a: a)
    with pytest.raises(ValueError, match="returns a vector"):
        ablation_cam(fc.make_tap(net, ["mid"]), x, fc.RawScoresOutputTarget())


# ---------------------------------------------------------------------------------------------- FullGrad

def test_fullgrad_bias_layers_and_functional_equals_class(net, x):
    assert fc.bias_layers(net) == ["bn", "down", "mid", "up1", "up2"]
    cam = fc.FullGrad(net, target_layers=[])
    a = cam(x, [0, 2])
    b = jax.jit(lambda x: fc.fullgrad(net, x, [0, 2]).cam)(x)
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert a.shape == (2, 9, 11) and float(a.min()) == 0.0 and abs(float(a.max()) - 1.0) < 1e-5
    n = cam.num_traces
    cam(x * 0.5, [1, 1])
    assert cam.num_traces == n  # new values and classes: no recompilation


def test_fullgrad_bias_term_formula(net, x):
    """The BatchNorm bias is ``beta - mean * gamma / sqrt(var + eps)``: the FullGrad map changes when only the
    running mean changes (a plain input gradient would too, but the raw map must match the formula below)."""
    tap = fc.make_tap(net, fc.bias_layers(net))
    shapes = [s.shape for s in jax.eval_shape(lambda: tap.run(x))[1]]
    zeros = [jnp.zeros(s) for s in shapes]
    gx, gp = jax.grad(lambda xx, p: tap.run(xx, p)[0][:, 1].sum(), argnums=(0, 1))(x, zeros)
    bn = net.bn
    biases = [bn.bias[...] - bn.mean[...] * bn.scale[...] / jnp.sqrt(bn.var[...] + bn.epsilon),
              net.down.bias[...], net.mid.bias[...], net.up1.bias[...], net.up2.bias[...]]

    def scaled(m):
        m = jnp.moveaxis(m, -1, 1)
        m = m - m.min(axis=(2, 3), keepdims=True)
        m = m / (1e-7 + m.max(axis=(2, 3), keepdims=True))
        return jax.image.resize(m.sum(1), (2, 9, 11), "linear", antialias=False)

    total = scaled(jnp.abs(gx * x)) + sum(scaled(jnp.abs(g * b)) for g, b in zip(gp, biases))
    np.testing.assert_allclose(fc.fullgrad(net, x, [1, 1]).raw[0], total, rtol=1e-5, atol=1e-6)


def test_fullgrad_errors(x):
    class NoBias(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(3, 4, (3, 3), use_bias=False, rngs=rngs)
            self.fc = nnx.Linear(4, 2, rngs=rngs)

        def __call__(self, x):
            return self.fc(self.conv(x).mean((1, 2)))

    with pytest.raises(ValueError, match="has no convolution or BatchNorm with a bias"):
        fc.FullGrad(NoBias(nnx.Rngs(0)), target_layers=[])
    with pytest.raises(TypeError, match=r"FullGrad: expected a flax\.nnx\.Module"):
        fc.FullGrad((lambda z: z, lambda a: a.sum((1, 2))), target_layers=[])
    with pytest.warns(UserWarning, match="target_layers is ignored"):
        fc.FullGrad(Net(rngs=nnx.Rngs(0)), target_layers=["mid"])


# ---------------------------------------------------------------------------------------------- guided backprop

def test_guided_backprop_equals_hand_written_guided_model(net, x):
    """Every jax.nn.relu of the model replaced by guided_relu by hand gives the same gradients."""
    def by_hand(x):
        r = fc.guided_relu
        h = r(net.bn(net.up2(r(net.up1(x)))))
        return net.fc(jnp.tanh(net.down(r(net.mid(h)))).mean((1, 2)))

    ref = jax.vmap(jax.grad(lambda xi, c: by_hand(xi[None])[0, c]), in_axes=(0, 0))(x, jnp.array([0, 2]))
    ours = fc.GuidedBackpropReLUModel(net)(x, [0, 2])
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-8)
    plain = jax.vmap(jax.grad(lambda xi, c: net(xi[None])[0, c]))(x, jnp.array([0, 2]))
    assert not np.allclose(ours, plain, atol=1e-4)


def test_guided_backprop_inside_jit_and_plain_function(x):
    w = jax.random.normal(jax.random.key(0), (3, 4))
    f = lambda z: jax.jit(jax.nn.relu)(z @ w).mean((1, 2))  # noqa: E731  (a jit call is inlined)
    g = fc.guided_backprop(f, x, 1)
    g_ref = jax.grad(lambda z: fc.guided_relu(z @ w).mean((1, 2))[:, 1].sum())(x)
    np.testing.assert_allclose(g, g_ref, rtol=1e-6, atol=1e-8)


def test_guided_backprop_limits_and_errors(net, x):
    def scanned(z):
        def body(c, _):
            return jax.nn.relu(c) - 0.1, None
        return jax.lax.scan(body, z, None, length=2)[0].mean((1, 2))

    with pytest.raises(NotImplementedError, match="relu inside 'scan'"):
        fc.guided_backprop(scanned, x, 0)
    # hand-written maximum is not a ReLU here (documented): the gradient is the plain one
    f = lambda z: jnp.maximum(z, 0).mean((1, 2))  # noqa: E731
    np.testing.assert_allclose(fc.guided_backprop(f, x, 0), jax.grad(lambda z: f(z)[:, 0].sum())(x))
    with pytest.raises(ValueError, match="target_category: expected None, an integer or 2 integers"):
        fc.GuidedBackpropReLUModel(net)(x, [0, 1, 2])
    with pytest.raises(ValueError, match="guided_gradcam: the CAM's shape"):
        fc.guided_gradcam(jnp.ones((2, 9, 10)), jnp.ones((2, 9, 11, 3)))
