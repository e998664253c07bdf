"""Unit tests of the NNX attention blocks (no torch): shapes on 1-D/2-D/3-D maps, jit/grad/vmap, shape
properties (hypothesis), width rules against torchvision/timm numbers, the registry, and the errors that
bad input must raise. Numerical parity with PyTorch lives in ``parity_tests/test_blocks_parity.py``."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flax_attn
from flax_attn.layers import (
    CBAM,
    BatchNorm,
    CBAMSpec,
    ChannelAttention,
    ChannelSpec,
    Preset,
    SESpec,
    SpatialAttention,
    SpatialSpec,
    SqueezeExcite,
    create_attn,
    get_attn,
    list_attn,
    make_divisible,
    register_attn,
)
from flax_attn.layers import registry as registry_mod

C = 16
SHAPES = {1: (2, 9, C), 2: (2, 5, 7, C), 3: (2, 3, 4, 5, C)}
PRESETS = ("se_classic", "se_torchvision", "se_mobilenetv3", "se_efficientnet", "se_timm", "cbam_timm",
           "lightcbam_timm", "cbam_official")


_PROTOTYPES: dict[tuple, nnx.Module] = {}


def _block(kind: str, spatial_dims: int = 2, channels: int = C, **kw) -> nnx.Module:
    """A fresh block (a clone of a cached prototype: building one eagerly compiles its initialisers)."""
    key = (kind, spatial_dims, channels, tuple(sorted(kw.items(), key=str)))
    if key not in _PROTOTYPES:
        _PROTOTYPES[key] = _build(kind, spatial_dims, channels, **kw)
    return nnx.clone(_PROTOTYPES[key])


def _build(kind: str, spatial_dims: int, channels: int, **kw) -> nnx.Module:
    rngs = nnx.Rngs(0)
    if kind == "se":
        return SqueezeExcite(channels, rngs=rngs, **{"reduction": 4, **kw})
    if kind == "cam":
        return ChannelAttention(channels, rngs=rngs, **{"reduction": 4, **kw})
    if kind == "sam":
        return SpatialAttention(channels, rngs=rngs, **{"kernel_size": 3, "spatial_dims": spatial_dims, "use_bn": True, **kw})
    if kind == "cbam":
        return CBAM(channels, rngs=rngs, **{"reduction": 4, "kernel_size": 3, "spatial_dims": spatial_dims,
                                            "use_bn": True, **kw})
    raise AssertionError(kind)


def _x(shape, seed=0):
    """Random float32 input drawn with numpy (no per-shape JAX compilation), N(0.1, 1): never zero."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32) + 0.1)


BLOCKS = ("se", "cam", "sam", "cbam")


@nnx.jit
def _jit_apply(m, x):
    return m(x)


# ---------------------------------------------------------------------------------------------------
# shapes, modes, dtypes
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spatial_dims", [1, 2, 3])
@pytest.mark.parametrize("kind", BLOCKS)
def test_shapes_all_ranks(kind, spatial_dims):
    m = _block(kind, spatial_dims)
    x = _x(SHAPES[spatial_dims])
    y = _jit_apply(m, x)
    assert y.shape == x.shape and y.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(y)))
    if kind in ("se", "cam"):
        assert m.attention_map(x).shape == (2,) + (1,) * spatial_dims + (C,)
    if kind == "sam":
        assert m.attention_map(x).shape == x.shape[:-1] + (1,)


def test_parameter_names_and_shapes():
    m = CBAM(C, reduction=4, kernel_size=5, use_bn=True, compress="conv", compress_channels=3, rngs=nnx.Rngs(0))
    params = nnx.state(m, nnx.Param)
    flat = {".".join(map(str, k)): v[...].shape for k, v in nnx.to_flat_state(params)}
    assert flat == {
        "channel.fc1.kernel": (C, 4), "channel.fc1.bias": (4,),
        "channel.fc2.kernel": (4, C), "channel.fc2.bias": (C,),
        "spatial.compress.kernel": (1, 1, C, 3), "spatial.compress.bias": (3,),
        "spatial.conv.kernel": (5, 5, 3, 1),  # conv_bias defaults to not use_bn
        "spatial.bn.scale": (1,), "spatial.bn.bias": (1,),
    }
    stats = {".".join(map(str, k)) for k, _ in nnx.to_flat_state(nnx.state(m, nnx.BatchStat))}
    assert stats == {"spatial.bn.mean", "spatial.bn.var", "spatial.bn.num_batches_tracked"}
    assert CBAM(C, no_spatial=True, rngs=nnx.Rngs(0)).spatial is None


def test_train_and_eval_mode_differ_only_with_bn():
    x = _x(SHAPES[2])
    m = _block("cbam")
    y_train = m(x)
    assert int(m.spatial.bn.num_batches_tracked[...]) == 1
    m.eval()
    y_eval = m(x)
    assert int(m.spatial.bn.num_batches_tracked[...]) == 1  # eval leaves the statistics alone
    assert not np.allclose(y_train, y_eval)
    se = _block("se")
    y0 = se(x)
    se.eval()
    np.testing.assert_array_equal(y0, se(x))


def test_bf16_compute_with_f32_params():
    x = _x(SHAPES[2])
    m32 = _block("cbam")
    m16 = _block("cbam", dtype=jnp.bfloat16)
    assert m16.channel.fc1.kernel[...].dtype == jnp.float32
    y16 = _jit_apply(m16, x.astype(jnp.bfloat16))
    assert y16.dtype == jnp.bfloat16
    y32 = _jit_apply(m32, x)
    err = float(jnp.linalg.norm(y16.astype(jnp.float32) - y32) / jnp.linalg.norm(y32))
    assert err < 2e-2, err  # bf16 has 8 mantissa bits: ~4e-3 per rounding, a handful of roundings


# ---------------------------------------------------------------------------------------------------
# transformations: jit, grad, vmap
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", BLOCKS)
def test_jit_matches_eager(kind):
    x = _x(SHAPES[2])
    m = _block(kind)
    m.eval()
    np.testing.assert_allclose(_jit_apply(m, x), m(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", BLOCKS)
def test_jit_train_step_updates_bn_like_eager(kind):
    x = _x(SHAPES[2])
    m_jit, m_eager = _block(kind), _block(kind)
    np.testing.assert_allclose(_jit_apply(m_jit, x), m_eager(x), rtol=1e-6, atol=1e-6)
    for a, b in zip(jax.tree.leaves(nnx.state(m_jit, nnx.BatchStat)), jax.tree.leaves(nnx.state(m_eager, nnx.BatchStat))):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def _loss(m, x):
    return jnp.sum(jnp.sin(m(x)))


_grad = nnx.jit(nnx.grad(_loss, argnums=(0, 1)))


@jax.jit
def _jvp(graphdef, state, x, v):
    return jax.jvp(lambda x: _loss(nnx.merge(graphdef, state), x), (x,), (v,))[1]


@pytest.mark.parametrize("kind", BLOCKS)
def test_grad_wrt_params_and_input(kind):
    x = _x(SHAPES[2])
    m = _block(kind)
    m.eval()
    g_m, g_x = _grad(m, x)
    assert g_x.shape == x.shape and float(jnp.abs(g_x).sum()) > 0
    leaves = jax.tree.leaves(g_m)
    assert leaves and all(bool(jnp.all(jnp.isfinite(v))) for v in leaves)
    assert all(float(jnp.abs(v).sum()) > 0 for v in leaves), "every parameter must receive a gradient"
    # reverse mode agrees with forward mode along a random direction (correctness against PyTorch is
    # proven in parity_tests/; a finite difference would straddle the kinks of max/ReLU in float32)
    v = _x(x.shape, seed=3)
    graphdef, state = nnx.split(m)
    np.testing.assert_allclose(float(jnp.vdot(g_x, v)), float(_jvp(graphdef, state, x, v)), rtol=1e-5)


@pytest.mark.parametrize("kind", BLOCKS)
def test_vmap_over_leading_axis_equals_loop(kind):
    xs = _x((3,) + SHAPES[2])
    m = _block(kind)
    m.eval()
    graphdef, state = nnx.split(m)
    ys = jax.jit(jax.vmap(lambda x: nnx.merge(graphdef, state)(x)))(xs)
    for i in range(xs.shape[0]):
        np.testing.assert_allclose(ys[i], _jit_apply(m, xs[i]), rtol=1e-6, atol=1e-6)


def test_batch_elements_are_independent_in_eval_mode():
    x = _x((3,) + SHAPES[2][1:])
    m = _block("cbam")
    m.eval()
    y = _jit_apply(m, x)
    np.testing.assert_allclose(_jit_apply(m, x[1:2]), y[1:2], rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# shape properties (hypothesis)
# ---------------------------------------------------------------------------------------------------

_dims = st.integers(1, 6)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.integers(1, 3), spatial=st.lists(_dims, min_size=1, max_size=3), channels=st.sampled_from([1, 3, 16]),
       kind=st.sampled_from(BLOCKS))
def test_property_shape_preserved_and_gated(batch, spatial, channels, kind):
    """Any N >= 1, any map size (1x1 included), C = 1 or not: the output has the input's shape, and with a
    sigmoid gate every output has the input's sign and no larger magnitude."""
    sd = len(spatial)
    m = _block(kind, sd, channels=channels)
    m.eval()
    x = _x((batch, *spatial, channels), seed=batch + channels)
    y = _jit_apply(m, x)
    assert y.shape == x.shape
    assert bool(jnp.all(jnp.abs(y) <= jnp.abs(x) * (1 + 1e-6)))
    assert bool(jnp.all(y * x >= 0))


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spatial=st.lists(_dims, min_size=2, max_size=2), k=st.sampled_from([1, 3, 5, 7]))
def test_property_spatial_attention_keeps_size_and_kernel1_is_pointwise(spatial, k):
    """For any odd k the map keeps its size (padding (k - 1) // 2); with k = 1 SAM acts per position, so
    flipping the map flips the output."""
    m = _block("sam", channels=6, kernel_size=k)
    m.eval()
    x = _x((1, *spatial, 6))
    y = _jit_apply(m, x)
    assert y.shape == x.shape
    if k == 1:
        xt = x[:, ::-1, ::-1, :]
        np.testing.assert_allclose(_jit_apply(m, xt), y[:, ::-1, ::-1, :], rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# widths
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value,divisor,expected",
    [(4, 8, 8), (18, 8, 24), (30, 8, 32), (120, 8, 120), (168, 8, 168), (240, 8, 240),  # MobileNetV3-Large
     (24, 8, 24), (60, 8, 64), (36, 8, 40), (72, 8, 72), (144, 8, 144),  # MobileNetV3-Small
     (10.2, 1, 10), (3.5, 1, 4), (0.3, 1, 1)],
)
def test_make_divisible_torchvision_numbers(value, divisor, expected):
    assert make_divisible(value, divisor) == expected


def test_make_divisible_round_limit_and_errors():
    # timm: round_limit=0 never bumps up; torchvision's 0.9 does (16 < 0.9 * 18)
    assert make_divisible(18, 8, round_limit=0.0) == 16
    assert make_divisible(18, 8) == 24
    assert make_divisible(5, 8, min_value=16) == 16
    with pytest.raises(ValueError, match="divisor must be >= 1"):
        make_divisible(10, 0)


@pytest.mark.parametrize(
    "preset,channels,kwargs,hidden",
    [
        # torchvision MobileNetV3 (Large and Small): SqueezeExcitation(C, _make_divisible(C // 4, 8))
        ("se_mobilenetv3", 16, {}, 8), ("se_mobilenetv3", 72, {}, 24), ("se_mobilenetv3", 120, {}, 32),
        ("se_mobilenetv3", 240, {}, 64), ("se_mobilenetv3", 480, {}, 120), ("se_mobilenetv3", 576, {}, 144),
        ("se_mobilenetv3", 672, {}, 168), ("se_mobilenetv3", 960, {}, 240),
        # torchvision EfficientNet-B0 MBConv: SE on the expanded width, squeeze = max(1, block_in // 4)
        ("se_efficientnet", 32, {}, 8), ("se_efficientnet", 96, {"squeeze_from": 16}, 4),
        ("se_efficientnet", 144, {"squeeze_from": 24}, 6), ("se_efficientnet", 1152, {"squeeze_from": 192}, 48),
        # timm SEModule: make_divisible(C / 16, 8, round_limit=0)
        ("se_timm", 64, {}, 8), ("se_timm", 256, {}, 16), ("se_timm", 200, {}, 16), ("se_timm", 24, {}, 8),
        ("se_timm", 2048, {}, 128),
        # timm CbamModule: make_divisible(C / 16, 1, round_limit=0) = round half up
        ("cbam_timm", 64, {}, 4), ("cbam_timm", 24, {}, 2), ("cbam_timm", 40, {}, 3), ("cbam_timm", 8, {}, 1),
        ("lightcbam_timm", 100, {}, 6),
        # floor rule: article SELayer, official CBAM
        ("se_classic", 64, {}, 4), ("se_classic", 47, {}, 2), ("cbam_official", 256, {}, 16),
        ("se_torchvision", 64, {"hidden_channels": 10}, 10),
    ],
)
def test_preset_widths(preset, channels, kwargs, hidden):
    # eval_shape: build the module abstractly (the widths are static; no initialiser runs)
    m = nnx.eval_shape(lambda: create_attn(preset, channels, rngs=nnx.Rngs(0), **kwargs))
    assert m.preset == preset
    block = m.channel if isinstance(m, CBAM) else m
    assert block.hidden == hidden
    assert block.fc1.kernel.shape == (channels, hidden)


@pytest.mark.parametrize(
    "kwargs,hidden",
    [({"reduction": 16}, 3), ({"reduction": 7}, 7), ({"reduction": 100}, 1), ({"reduction": 100, "min_hidden": 4}, 4),
     ({"hidden_channels": 5}, 5), ({"reduction": 16, "divisor": 8}, 8), ({"reduction": 4, "divisor": 8}, 16),
     ({"reduction": 5, "divisor": 4, "round_limit": 0.9}, 12), ({"reduction": 1.5}, 33)],
)
def test_hidden_width_rules(kwargs, hidden):
    assert nnx.eval_shape(lambda: ChannelAttention(50, rngs=nnx.Rngs(0), **kwargs)).hidden == hidden


# ---------------------------------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------------------------------


def test_registry_lookup_and_presets():
    names = list_attn()
    for name in ("se", "cam", "sam", "cbam", *PRESETS):
        assert name in names
    assert get_attn("cbam") is CBAM and get_attn("SE") is SqueezeExcite and get_attn("spatial-attention") is SpatialAttention
    assert get_attn(SqueezeExcite) is SqueezeExcite  # a callable passes through
    for name in PRESETS:
        m = create_attn(name, 32, rngs=nnx.Rngs(0))
        assert m.preset == name
        x = _x((2, 5, 3, 32))
        assert _jit_apply(m, x).shape == x.shape
    # keyword overrides reach the block
    assert create_attn("cbam_official", 32, rngs=nnx.Rngs(0), kernel_size=3).spatial.conv.kernel[...].shape[0] == 3
    assert flax_attn.create_attn is create_attn


def test_register_attn(monkeypatch):
    monkeypatch.setattr(registry_mod, "_REGISTRY", dict(registry_mod._REGISTRY))

    def my_block(channels, *, rngs, **kw):
        return SqueezeExcite(channels, reduction=2, rngs=rngs, **kw)

    register_attn("My-Block", my_block)
    assert "my_block" in list_attn()
    assert create_attn("my_block", 8, rngs=nnx.Rngs(0)).hidden == 4
    with pytest.raises(ValueError, match="already registered"):
        register_attn("my_block", my_block)
    register_attn("my_block", SqueezeExcite, overwrite=True)
    assert get_attn("my_block") is SqueezeExcite


def test_registry_errors():
    with pytest.raises(ValueError, match="unknown attention block 'se_nope'.*expected one of"):
        create_attn("se_nope", 8, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="must be a string or a callable, got int"):
        get_attn(3)


# ---------------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", BLOCKS)
def test_nchw_input_is_rejected_with_hint(kind):
    m = _block(kind)
    with pytest.raises(ValueError, match=r"16 channels.*\(2, 16, 5, 7\).*channels-first"):
        m(_x((2, C, 5, 7)))


@pytest.mark.parametrize("kind", BLOCKS)
def test_wrong_rank_is_rejected(kind):
    m = _block(kind)
    with pytest.raises(ValueError, match=r"rank 2 shape \(2, 16\)"):
        m(_x((2, C)))
    if kind in ("sam", "cbam"):  # spatial_dims=2 fixes the rank
        with pytest.raises(ValueError, match=r"\(N, H, W, C\).*rank 3"):
            m(_x((2, 9, C)))


def test_wrong_channel_count_and_dtype():
    m = _block("cam")
    with pytest.raises(ValueError, match=r"expects channels-last input with 16 channels.*\(2, 5, 7, 8\)"):
        m(_x((2, 5, 7, 8)))
    with pytest.raises(TypeError, match="floating-point input, got dtype int32"):
        m(jnp.ones((2, 5, 7, C), jnp.int32))
    with pytest.raises(TypeError, match="expects an array, got list"):
        m([[1.0] * C])


@pytest.mark.parametrize(
    "factory,match,exc",
    [
        (lambda: ChannelAttention(C, pool_types=(), rngs=nnx.Rngs(0)), "pool_types must be a non-empty", ValueError),
        (lambda: SqueezeExcite(C, pool_types=("avg", "median"), rngs=nnx.Rngs(0)), "unknown pool type 'median'", ValueError),
        (lambda: ChannelAttention(C, pool_fusion="max", rngs=nnx.Rngs(0)), "unknown pool_fusion 'max'", ValueError),
        (lambda: SpatialAttention(C, kernel_size=4, rngs=nnx.Rngs(0)), "kernel_size must be a positive odd int.*got 4", ValueError),
        (lambda: SpatialAttention(C, kernel_size=0, rngs=nnx.Rngs(0)), "kernel_size must be a positive odd int", ValueError),
        (lambda: SpatialAttention(C, kernel_size=3.0, rngs=nnx.Rngs(0)), "kernel_size must be an odd int", TypeError),
        (lambda: CBAM(C, kernel_size=6, rngs=nnx.Rngs(0)), "kernel_size must be a positive odd int.*got 6", ValueError),
        (lambda: SpatialAttention(C, spatial_dims=4, rngs=nnx.Rngs(0)), "spatial_dims must be 1, 2 or 3, got 4", ValueError),
        (lambda: SpatialAttention(C, compress=(), rngs=nnx.Rngs(0)), "compress must be 'conv' or a non-empty", ValueError),
        (lambda: SpatialAttention(C, compress=("max", "min"), rngs=nnx.Rngs(0)), "unknown spatial compression 'min'", ValueError),
        (lambda: SpatialAttention(C, compress_fusion="sum", rngs=nnx.Rngs(0)), "unknown compress_fusion 'sum'", ValueError),
        (lambda: SqueezeExcite(C, act="swoosh", rngs=nnx.Rngs(0)), "unknown act 'swoosh'.*expected a callable", ValueError),
        (lambda: CBAM(C, gate="softmax", rngs=nnx.Rngs(0)), "unknown gate 'softmax'", ValueError),
        (lambda: SqueezeExcite(C, act=3, rngs=nnx.Rngs(0)), "act must be a string or a callable, got int", TypeError),
        (lambda: CBAM(C, arrangement="serial", rngs=nnx.Rngs(0)), "unknown arrangement 'serial'.*channel_first", ValueError),
        (lambda: ChannelAttention(0, rngs=nnx.Rngs(0)), "channels must be a positive int, got 0", ValueError),
        (lambda: ChannelAttention(C, reduction=0, rngs=nnx.Rngs(0)), "reduction must be > 0, got 0", ValueError),
        (lambda: ChannelAttention(C, hidden_channels=0, rngs=nnx.Rngs(0)), "hidden_channels must be >= 1, got 0", ValueError),
        (lambda: create_attn("cbam_offical", C, rngs=nnx.Rngs(0)), "unknown attention block 'cbam_offical'", ValueError),
        (lambda: BatchNorm(4, momentum=1.5, rngs=nnx.Rngs(0)), "momentum must be in \\[0, 1\\]", ValueError),
    ],
)
def test_bad_options_raise_clear_errors(factory, match, exc):
    with pytest.raises(exc, match=match):
        factory()


# ---------------------------------------------------------------------------------------------------
# empty inputs (issue 12): an empty batch works, an empty map is refused by name
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spatial_dims", [1, 2])
@pytest.mark.parametrize("kind", BLOCKS)
def test_empty_batch_gives_empty_output(kind, spatial_dims):
    m = _block(kind, spatial_dims)
    m.eval()
    x = jnp.zeros((0,) + SHAPES[spatial_dims][1:])
    for y in (m(x), _jit_apply(m, x)):
        assert y.shape == x.shape and y.dtype == x.dtype
    g_m, g_x = _grad(m, x)  # the arg-max gradient of the max pools reshapes an empty batch too
    assert g_x.shape == x.shape and all(v.shape == p.shape for v, p in zip(
        jax.tree.leaves(g_m), jax.tree.leaves(nnx.state(m, nnx.Param))))


@pytest.mark.parametrize("kind", ["sam", "cbam"])
def test_empty_batch_in_training_mode_with_batchnorm_is_refused(kind):
    m = _block(kind)  # training mode, BatchNorm: batch statistics of no value do not exist (as in torch)
    with pytest.raises(ValueError, match=r"more than 1 value per channel, got input shape \(0, 5, 7, 1\)"):
        m(jnp.zeros((0, 5, 7, C)))


@pytest.mark.parametrize("shape", [(2, 0, 7, C), (2, 5, 0, C)])
@pytest.mark.parametrize("kind", BLOCKS)
def test_empty_map_raises_naming_the_shape(kind, shape):
    m = _block(kind)
    m.eval()
    with pytest.raises(ValueError, match=rf"every spatial size >= 1.*got shape \({shape[0]}, {shape[1]}, {shape[2]}, 16\)"):
        m(jnp.zeros(shape))


# ---------------------------------------------------------------------------------------------------
# options are data: specs
# ---------------------------------------------------------------------------------------------------


def test_specs_validate_normalise_and_derive():
    spec = ChannelSpec(reduction=4, pool_types="mean", divisor=8)
    assert spec.pool_types == ("avg",) and spec.hidden(64) == 16 and spec.hidden(20) == 8
    assert SESpec().pool_types == ("avg",) and ChannelSpec().pool_types == ("avg", "max")
    sp = SpatialSpec(compress=["avg", "max"], kernel_size=3, spatial_dims=3)
    assert sp.compress == ("mean", "max") and sp.conv_in == 2 and sp.padding == ((1, 1),) * 3
    assert SpatialSpec(compress="conv", compress_channels=5).conv_in == 5
    assert SpatialSpec(compress_fusion="mean").conv_in == 1
    assert SpatialSpec(use_bn=True).use_conv_bias is False and SpatialSpec(use_bn=True, conv_bias=True).use_conv_bias
    cb = CBAMSpec.from_options(reduction=8, kernel_size=3, gate="tanh", arrangement="parallel")
    assert (cb.channel.reduction, cb.spatial.kernel_size, cb.spatial.gate, cb.arrangement) == (8, 3, "tanh", "parallel")
    assert CBAMSpec.from_options(spatial_gate="hard_sigmoid").spatial.gate == "hard_sigmoid"
    assert CBAMSpec.from_options(no_spatial=True).spatial is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.reduction = 2  # type: ignore[misc]
    hash(cb)  # specs are static metadata of the modules (jit caches key on them)


@pytest.mark.parametrize("spec", [
    ChannelSpec(reduction=3, pool_types=("lp", "max"), act="gelu", preset="x"), SESpec(hidden_channels=5),
    SpatialSpec(compress="conv", compress_channels=3, use_bn=True, bn_momentum=0.7),
    CBAMSpec.from_options(spatial_gate="tanh", arrangement="spatial_first", use_bn=True, preset="p"),
    CBAMSpec.from_options(no_spatial=True, pool_fusion="mean"),
])
def test_spec_round_trips_through_its_flat_options(spec):
    assert type(spec).from_options(**spec.to_options()) == spec
    assert [p.name for p in type(spec).options()] == list(spec.to_options())
    assert spec.replace() is spec


def test_spec_replace_revalidates_and_names_unknown_options():
    spec = get_attn("cbam_official").spec
    assert spec.replace(kernel_size=3).spatial.kernel_size == 3 and spec.replace(kernel_size=3).preset == "cbam_official"
    assert spec.replace(gate="tanh").spatial.gate == "tanh"  # gate still drives both maps
    with pytest.raises(ValueError, match="kernel_size must be a positive odd int.*got 4"):
        spec.replace(kernel_size=4)
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['kernel'\] for CBAMSpec: expected some of"):
        spec.replace(kernel=3)
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['squeeze_from'\] for SESpec"):
        SqueezeExcite(8, squeeze_from=4, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="spec must be a SpatialSpec, got ChannelSpec"):
        SpatialAttention(8, ChannelSpec(), rngs=nnx.Rngs(0))


def test_blocks_keep_their_spec_and_presets_are_named_specs():
    m = nnx.eval_shape(lambda: CBAM(C, reduction=4, kernel_size=3, rngs=nnx.Rngs(0)))
    assert m.spec == CBAMSpec.from_options(reduction=4, kernel_size=3)
    assert m.channel.spec is m.spec.channel and m.spatial.spec is m.spec.spatial and m.preset is None
    for name in PRESETS:
        preset = get_attn(name)
        assert isinstance(preset, Preset) and preset.name == name and preset.spec.preset == name
        block = nnx.eval_shape(lambda: create_attn(name, 40, rngs=nnx.Rngs(0)))
        assert block.spec == preset.spec_for(40) and block.preset == name
    # a spec is an attention argument too, and the block's sub-modules never carry the preset
    block = nnx.eval_shape(lambda: create_attn(get_attn("cbam_timm").spec, C, rngs=nnx.Rngs(0)))
    assert block.preset == "cbam_timm" and block.channel.preset is None and block.spatial.preset is None
    block.preset = "renamed"  # assigning the name rewrites the spec, the one place it lives
    assert block.spec.preset == "renamed" and block.spec.channel == get_attn("cbam_timm").spec.channel


def test_signatures_show_the_spec_options():
    import inspect

    for cls, spec_cls in ((SqueezeExcite, SESpec), (ChannelAttention, ChannelSpec), (SpatialAttention, SpatialSpec),
                          (CBAM, CBAMSpec)):
        params = inspect.signature(cls).parameters
        for opt in spec_cls.options():
            assert params[opt.name].kind is inspect.Parameter.KEYWORD_ONLY
            assert params[opt.name].default == opt.default and params[opt.name].annotation == opt.annotation
        assert list(params)[:2] == ["channels", "spec"] and "rngs" in params
    assert inspect.signature(SqueezeExcite).parameters["pool_types"].default == ("avg",)


def test_register_a_spec_as_preset(monkeypatch):
    monkeypatch.setattr(registry_mod, "_REGISTRY", dict(registry_mod._REGISTRY))
    register_attn("se_r2", SESpec(reduction=2, act="silu"))
    m = create_attn("se_r2", 8, rngs=nnx.Rngs(0))
    assert m.preset == "se_r2" and m.hidden == 4 and m.spec.act == "silu"
    with pytest.raises(TypeError, match="factory must be a block spec or a callable, got int"):
        register_attn("bad", 3)


# ---------------------------------------------------------------------------------------------------
# one vocabulary: activations and the models' attention argument
# ---------------------------------------------------------------------------------------------------


def test_one_activation_table_for_blocks_and_models():
    from flax_attn.layers._functional import resolve_activation
    from flax_attn.models._common import act_module

    for name in ("relu", "silu", "hard_swish"):
        assert act_module(name).fn is resolve_activation(name)
    x = _x((64,)) * 4
    # torch.nn.Hardswish's order of operations: x * relu6(x + 3) / 6 (jax.nn.hard_swish rounds otherwise)
    np.testing.assert_array_equal(resolve_activation("hard_swish")(x), x * jnp.clip(x + 3.0, 0.0, 6.0) / 6.0)
    np.testing.assert_allclose(resolve_activation("hard_swish")(x), jax.nn.hard_swish(x), rtol=1e-6, atol=1e-7)


def test_models_resolve_every_kind_of_attention_argument():
    from flax_attn.models._common import make_attn

    def build(attn):
        return nnx.eval_shape(lambda: make_attn(attn, C, dtype=jnp.bfloat16, param_dtype=jnp.float32,
                                                rngs=nnx.Rngs(0)))

    assert build(None) is None
    by_name, by_spec = build("cbam_official"), build(get_attn("cbam_official").spec)
    assert by_name.spec == by_spec.spec and by_spec.channel.fc1.dtype == jnp.bfloat16
    assert build(lambda c, *, rngs: SqueezeExcite(c, reduction=2, rngs=rngs)).hidden == 8
    with pytest.raises(TypeError, match=r"attn must be None, a registered attention name or a callable \(or a block spec.*got int"):
        build(3)


def test_batchnorm_train_mode_needs_two_values_per_channel():
    m = _block("sam")
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        m(_x((1, 1, 1, C)))
    m.eval()
    assert m(_x((1, 1, 1, C))).shape == (1, 1, 1, C)  # eval mode is fine on a single 1x1 map


def test_batchnorm_statistics_follow_torch_semantics():
    """Running variance uses the unbiased batch variance, normalisation the biased one, momentum is Flax's."""
    bn = BatchNorm(3, momentum=0.75, rngs=nnx.Rngs(0))
    x = np.asarray(_x((4, 5, 3)))
    y = bn(jnp.asarray(x))
    flat = x.reshape(-1, 3).astype(np.float64)
    mean, var_b, var_u = flat.mean(0), flat.var(0), flat.var(0, ddof=1)
    np.testing.assert_allclose(y, (x - mean) / np.sqrt(var_b + 1e-5), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bn.mean[...], 0.25 * mean, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(bn.var[...], 0.75 + 0.25 * var_u, rtol=1e-5)
    assert int(bn.num_batches_tracked[...]) == 1 and bn.num_batches_tracked[...].dtype == jnp.int32
