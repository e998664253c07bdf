"""Unit tests of flax_attn.models that need no torch: shapes, options, named features, errors, pooling.

Large models are only built abstractly (``nnx.eval_shape``); forward passes use tiny widths.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flax_attn.layers import CBAM, SqueezeExcite
from flax_attn.models import (
    NamedSequential,
    RegNetConfig,
    ResNet,
    Sequential,
    StochasticDepth,
    create_model,
    list_models,
)
from flax_attn.models._common import MaxPool2d, _adaptive_matrix, adaptive_avg_pool2d
from flax_attn.models.regnet import REGNET_CONFIGS, regnet_block_params


def abstract(name: str, **kw):
    return nnx.eval_shape(lambda: create_model(name, jit=False, **kw))


@nnx.jit
def forward(model, x):
    return model(x)


TINY = {"num_classes": 5, "in_chans": 1, "width": 8, "stem": "cifar"}


def filled(name: str, seed: int = 0, **kw):
    """The model built abstractly, then filled with numpy draws (no per-shape XLA compile of the init)."""
    model = abstract(name, **kw)
    rng = np.random.RandomState(seed)
    for path, var in nnx.iter_graph(model):
        if not isinstance(var, nnx.Variable) or not isinstance(var.get_value(), jax.ShapeDtypeStruct):
            continue
        sds = var.get_value()
        if jax.dtypes.issubdtype(sds.dtype, jax.dtypes.prng_key):
            var.set_value(jax.random.key(int(rng.randint(1 << 30))))
        elif jnp.issubdtype(sds.dtype, jnp.integer):
            var.set_value(jnp.zeros(sds.shape, sds.dtype))
        elif path[-1] in ("var", "scale"):
            var.set_value(jnp.asarray(rng.rand(*sds.shape) + 0.5, sds.dtype))
        else:
            fan_in = int(np.prod(sds.shape[:-1])) if len(sds.shape) > 1 else 25
            var.set_value(jnp.asarray(rng.randn(*sds.shape) * np.sqrt(2.0 / fan_in), sds.dtype))
    return model


@pytest.fixture(scope="module")
def tiny_cbam():
    """One really initialised model (the init is one XLA compilation): tiny CBAM-ResNet-18, zero-init residual."""
    return create_model("resnet18", attn="cbam_official", zero_init_residual=True, **TINY)


# ------------------------------------------------------------------------------------------------ registry
def test_registry_names_and_errors():
    names = list_models()
    for n in ("resnet18", "resnet152", "se_resnet50", "cbam_resnet101", "mobilenet_v3_large",
              "mobilenet_v3_small", "efficientnet_b0", "efficientnet_b7", "vgg16", "vgg16_bn",
              "regnet_y_800mf", "regnet_y_128gf", "regnet_x_400mf"):
        assert n in names
    assert list_models("cbam_*") == [f"cbam_resnet{d}" for d in (101, 152, 18, 34, 50)]
    with pytest.raises(ValueError, match="unknown model 'resnet19'"):
        create_model("resnet19")
    with pytest.raises(TypeError, match="rngs must be an nnx.Rngs"):
        create_model("resnet18", rngs=0)
    with pytest.raises(ValueError, match="cbam_resnet18 uses attn='cbam_official'"):
        create_model("cbam_resnet18", attn="se")
    with pytest.raises(ValueError, match="unknown attention block 'sk'"):
        create_model("resnet18", attn="sk", jit=False)
    with pytest.raises(TypeError, match="attn must be None, a registered attention name or a callable"):
        create_model("resnet18", attn=3, jit=False)
    with pytest.raises(ValueError, match="unknown stem"):
        create_model("resnet18", stem="deep", jit=False)
    with pytest.raises(ValueError, match="layers must be 4 positive ints"):
        ResNet("basic", (2, 2, 2), rngs=nnx.Rngs(0))


# -------------------------------------------------------------------------------------------------- resnet
@pytest.mark.parametrize("attn", [None, "se", lambda c, *, rngs: SqueezeExcite(c, reduction=4, rngs=rngs)],
                         ids=["none", "se", "callable"])
def test_tiny_resnet_forward_train_and_eval(attn):
    model = filled("resnet18", attn=attn, **TINY)
    x = jax.random.normal(jax.random.key(0), (2, 12, 9, 1))
    model.train()
    y_train = forward(model, x)
    model.eval()
    y_eval = forward(model, x)
    assert y_train.shape == y_eval.shape == (2, 5)
    assert bool(jnp.all(jnp.isfinite(y_train))) and bool(jnp.all(jnp.isfinite(y_eval)))
    assert not np.allclose(y_train, y_eval)  # batch statistics vs running statistics
    assert int(model.bn1.num_batches_tracked[...]) == 1  # statistics updated by the training call only


def test_attention_placement_and_widths():
    r18 = abstract("resnet18", attn="cbam")
    r50 = abstract("se_resnet50")
    assert r18.layer1[0].attn.channels == 64 and r18.layer4[1].attn.channels == 512  # after bn2
    assert r50.layer1[0].attn.channels == 256 and r50.layer4[2].attn.channels == 2048  # after bn3
    assert r50.layer1[0].attn.preset == "se_classic" and r50.layer1[0].attn.hidden == 16
    assert abstract("resnet34").layer1[0].attn is None
    assert abstract("resnet50", attn="se", attn_kwargs={"reduction": 8}).layer2[0].attn.hidden == 64


def test_real_init_zero_residual_and_official_cbam(tiny_cbam):
    model = tiny_cbam
    blocks = [b for stage in (model.layer1, model.layer2, model.layer3, model.layer4) for b in stage]
    assert all(float(jnp.abs(b.bn2.scale[...]).max()) == 0.0 for b in blocks)  # zero_init_residual
    assert all(float(b.bn1.scale[...].min()) == 1.0 for b in blocks)
    # the official CBAM code starts every spatial gate's BatchNorm gamma at 0
    assert all(float(jnp.abs(b.attn.spatial.bn.scale[...]).max()) == 0.0 for b in blocks)
    # torchvision's conv init: kaiming normal, fan_out, gain sqrt(2)
    k = np.asarray(model.layer4[0].conv2.kernel[...])
    assert abs(k.std() / np.sqrt(2.0 / (9 * 64)) - 1) < 0.05
    b = np.asarray(model.fc.bias[...])  # torch Linear default: U(+-1/sqrt(fan_in))
    assert np.abs(b).max() <= 1 / np.sqrt(64)
    x = jax.random.normal(jax.random.key(0), (2, 12, 9, 1))
    model.eval()
    assert forward(model, x).shape == (2, 5)
    bottleneck = abstract("resnet50")
    assert bottleneck.layer2[0].last_bn() is bottleneck.layer2[0].bn3  # what zero_init_residual zeroes


def test_stems_and_channels():
    tv = abstract("resnet18", in_chans=1)
    assert tv.conv1.kernel.shape == (7, 7, 1, 64) and tv.maxpool is not None
    cifar = abstract("resnet18", stem="cifar", width=16)
    assert cifar.conv1.kernel.shape == (3, 3, 3, 16) and cifar.maxpool is None
    assert cifar.fc.kernel.shape == (128, 1000)
    out = jax.eval_shape(lambda m, x: m(x), abstract("resnet50"),
                         jax.ShapeDtypeStruct((2, 193, 171, 3), jnp.float32))
    assert out.shape == (2, 1000)


def test_bad_input_is_explained():
    model = abstract("resnet18", **TINY)
    with pytest.raises(ValueError, match=r"did you pass NCHW"):
        model(jnp.ones((2, 1, 12, 9)))
    with pytest.raises(ValueError, match=r"expects channels-last input \(N, H, W, 1\), got \(12, 9, 1\)"):
        model(jnp.ones((12, 9, 1)))
    with pytest.raises(TypeError, match="expects a jax/numpy array"):
        model([[1.0]])


def test_dtype_and_param_dtype():
    model = filled("resnet18", dtype=jnp.bfloat16, **TINY)
    model.eval()
    y = forward(model, jnp.ones((1, 8, 8, 1)))
    assert y.dtype == jnp.bfloat16
    assert model.conv1.kernel[...].dtype == jnp.float32
    half = abstract("mobilenet_v3_small", param_dtype=jnp.bfloat16)
    assert half.features[0][0].kernel.dtype == jnp.bfloat16


# ---------------------------------------------------------------------------------------- named features
def test_named_feature_paths():
    mnv3 = abstract("mobilenet_v3_large")
    assert isinstance(mnv3.features, Sequential) and len(mnv3.features) == 17
    assert mnv3.features[-1][0].kernel.shape == (1, 1, 160, 960)  # the article's target, features[-1]
    eff = abstract("efficientnet_b0")
    assert len(eff.features) == 9 and eff.features[-1][0].kernel.shape == (1, 1, 320, 1280)
    assert eff.features[1][0].block[1].preset == "se_efficientnet"
    reg = abstract("regnet_y_800mf")
    assert isinstance(reg.trunk_output, NamedSequential)
    assert reg.trunk_output.names() == ("block1", "block2", "block3", "block4")
    assert getattr(reg.trunk_output.block3, "block3-7").f.se.hidden == 80  # round(0.25 * 320)
    assert reg.trunk_output["block2"] is reg.trunk_output.block2
    vgg = abstract("vgg16")
    assert len(vgg.features) == 31 and vgg.features[28].kernel.shape == (3, 3, 512, 512)
    paths = {".".join(map(str, p)) for p, _ in nnx.iter_graph(reg)}
    assert "trunk_output.block1.block1-0.f.a.0.kernel" in paths


def test_forward_features_shapes():
    x = jax.ShapeDtypeStruct((1, 193, 171, 3), jnp.float32)
    for name, shape in (("mobilenet_v3_small", (1, 7, 6, 576)), ("efficientnet_b0", (1, 7, 6, 1280)),
                        ("regnet_y_400mf", (1, 7, 6, 440)), ("vgg11", (1, 6, 5, 512))):
        out = jax.eval_shape(lambda m, x: m.forward_features(x), abstract(name, num_classes=4), x)
        assert out.shape == shape, name


# ------------------------------------------------------------------------------------------------- configs
def test_regnet_widths_follow_torchvision():
    # torchvision's regnet_y_800mf / regnet_x_400mf stage widths, strides, depths, group widths
    assert regnet_block_params(REGNET_CONFIGS["regnet_y_800mf"]) == [
        (64, 2, 1, 16, 1.0), (144, 2, 3, 16, 1.0), (320, 2, 8, 16, 1.0), (784, 2, 2, 16, 1.0)]
    assert [w for w, *_ in regnet_block_params(REGNET_CONFIGS["regnet_x_400mf"])] == [32, 64, 160, 400]
    with pytest.raises(ValueError, match="invalid RegNet settings"):
        regnet_block_params(RegNetConfig(10, 30, 10.0, 2.0, 8))


# ---------------------------------------------------------------------------------- pooling, dropout, depth
def _torch_adaptive_reference(x: np.ndarray, out: int) -> np.ndarray:
    n, h, w, c = x.shape
    res = np.zeros((n, out, out, c), np.float64)
    for i in range(out):
        h0, h1 = (i * h) // out, -(-((i + 1) * h) // out)
        for j in range(out):
            w0, w1 = (j * w) // out, -(-((j + 1) * w) // out)
            res[:, i, j] = x[:, h0:h1, w0:w1].mean(axis=(1, 2))
    return res


@pytest.mark.parametrize("hw", [(1, 1), (5, 6), (7, 7), (13, 11), (14, 21)])
def test_adaptive_avg_pool_matches_torch_bins(hw):
    x = np.random.RandomState(0).randn(2, *hw, 3).astype(np.float32)
    out = np.asarray(adaptive_avg_pool2d(jnp.asarray(x), 7))
    np.testing.assert_allclose(out, _torch_adaptive_reference(x, 7), rtol=1e-6, atol=1e-6)
    assert _adaptive_matrix(5, 7).sum(axis=1).tolist() == pytest.approx([1.0] * 7)


def test_max_pool_pads_with_minus_inf_and_floors():
    x = -1.0 - np.random.RandomState(1).rand(1, 7, 6, 2).astype(np.float32)  # all negative: pads must not win
    out = np.asarray(MaxPool2d(3, 2, 1)(jnp.asarray(x)))
    assert out.shape == (1, 4, 3, 2)
    ref = np.full((1, 4, 3, 2), -np.inf, np.float32)
    for i in range(4):
        for j in range(3):
            ref[0, i, j] = x[0, max(0, 2 * i - 1):2 * i + 2, max(0, 2 * j - 1):2 * j + 2].max(axis=(0, 1))
    np.testing.assert_array_equal(out, ref)
    g = jax.grad(lambda v: MaxPool2d(3, 2, 1)(v).sum())(jnp.asarray(x))
    assert float(g.sum()) == out.size  # differentiable, one unit of gradient per output


def test_stochastic_depth_only_in_training():
    sd = StochasticDepth(0.25, rngs=nnx.Rngs(dropout=3))
    x = jnp.ones((4000, 2, 2, 1))
    y = sd(x)
    kept = np.asarray(y[:, 0, 0, 0])
    np.testing.assert_allclose(np.unique(kept), [0.0, 1 / 0.75], rtol=1e-6)
    assert abs((kept == 0).mean() - 0.25) < 0.03
    assert bool(jnp.all(y == y[:, :1, :1, :]))  # "row" mode: one draw per sample
    sd.eval()
    assert bool(jnp.all(sd(x) == x))
    with pytest.raises(ValueError, match="probability must be in"):
        StochasticDepth(1.5, rngs=None)
    with pytest.raises(ValueError, match="needs rngs"):
        StochasticDepth(0.5, rngs=None)(x)


def test_dropout_follows_train_eval():
    model = filled("mobilenet_v3_small", num_classes=3, dropout=0.5)
    model.eval()
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    a, b = forward(model, x), forward(model, x)
    np.testing.assert_array_equal(a, b)
    model.train()
    model.set_attributes(use_running_average=True)  # isolate dropout: BatchNorm on running statistics
    c, d = forward(model, x), forward(model, x)
    assert float(jnp.abs(c - d).max()) > 1e-3 * float(jnp.abs(c).max())  # a fresh dropout mask per call


@pytest.mark.parametrize("h,w,k,stride,dil,pad", [(2, 2, 3, 1, 1, 1), (1, 3, 3, 1, 1, 1), (2, 5, 5, 2, 1, 2),
                                                  (3, 2, 3, 2, 2, 2), (1, 1, 7, 1, 1, 3), (9, 9, 3, 1, 1, 1),
                                                  (4, 4, 3, 2, 1, 1), (8, 7, 3, 2, 1, 1), (16, 16, 3, 2, 1, 1),
                                                  (15, 13, 1, 2, 1, 0), (4, 4, 1, 2, 1, 0), (23, 9, 3, 2, 1, 1)])
def test_small_map_conv_equals_lax_conv(h, w, k, stride, dil, pad):
    """The im2col path taken for maps smaller than the kernel (an XLA:CPU performance cliff) and for strided
    convolutions (3x3 and 1x1) over maps up to 24 computes the same convolution as lax, values and gradients;
    larger maps go to lax unchanged."""
    from jax import lax

    from flax_attn.models._common import _small_map_conv

    rng = np.random.RandomState(0)
    x = jnp.asarray(rng.randn(2, h, w, 4).astype(np.float32))
    kern = jnp.asarray(rng.randn(k, k, 4, 6).astype(np.float32))
    dn = lax.conv_dimension_numbers(x.shape, kern.shape, ("NHWC", "HWIO", "NHWC"))
    kw = dict(rhs_dilation=(dil, dil), dimension_numbers=dn, precision=lax.Precision.HIGHEST)

    def run(fn, x, kern):
        return fn(x, kern, (stride, stride), ((pad, pad), (pad, pad)), **kw)

    ref = run(lax.conv_general_dilated, x, kern)
    out = run(_small_map_conv, x, kern)
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    g_ref = jax.grad(lambda a, b: jnp.sum(run(lax.conv_general_dilated, a, b) ** 2), argnums=(0, 1))(x, kern)
    g_out = jax.grad(lambda a, b: jnp.sum(run(_small_map_conv, a, b) ** 2), argnums=(0, 1))(x, kern)
    for a, b in zip(g_out, g_ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)
