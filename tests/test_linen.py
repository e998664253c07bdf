"""Linen twins (flax_attn.linen) vs the NNX blocks: same parameter trees, same outputs, gradients and
BatchNorm statistics from the same parameters, same errors. No torch needed."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import flax_attn
from flax_attn import linen as fal
from flax_attn.layers import list_attn
from flax_attn.layers import registry as layers_registry
from flax_attn.linen import registry as fal_registry

# (registry name, keyword overrides, input shape (N, *spatial, C)); odd sizes, H != W, 1x1 maps, N = 1 and > 1
SHAPE = (2, 5, 7, 16)  # most cases share it, so the eager ops compile once
_ALIASES = {"channel_attention", "spatial_attention"}  # same classes as "cam" / "sam"
CASES = [(name, {}, SHAPE) for name in list_attn() if name not in _ALIASES] + [
    ("cbam", dict(arrangement="spatial_first", use_bn=True), (1, 6, 3, 16)),
    ("cbam", dict(arrangement="parallel", use_bn=True, conv_bias=True), SHAPE),
    ("cbam", dict(arrangement="parallel_add", compress="conv", compress_channels=3), SHAPE),
    ("cbam", dict(no_spatial=True, pool_types=("lp", "lse"), act="gelu"), SHAPE),
    ("cbam", dict(spatial_dims=1, kernel_size=3, use_bn=True), (2, 9, 16)),
    ("cbam", dict(spatial_dims=3, kernel_size=3, compress=("max",), spatial_gate="hard_sigmoid"), (2, 3, 4, 5, 16)),
    ("sam", dict(compress_fusion="mean", use_bn=True, bn_momentum=0.7, bn_eps=1e-3), (2, 1, 1, 16)),
    ("se", dict(pool_types=("avg", "max"), pool_fusion="mean", act="silu", gate="hard_sigmoid"), (1, 1, 1, 16)),
    ("cbam_timm", dict(param_dtype=jnp.bfloat16, dtype=jnp.bfloat16), SHAPE),
]
IDS = [f"{n}-{i}" for i, (n, _, _) in enumerate(CASES)]


def _randomize(module: nnx.Module, seed: int) -> None:
    """Fresh non-default values for every variable (biases not 0, BN scale not 1, statistics not identity)."""
    rng = np.random.default_rng(seed)
    for path, var in nnx.iter_graph(module):
        if not isinstance(var, (nnx.Param, nnx.BatchStat)):
            continue
        v = var.get_value()
        if path[-1] == "num_batches_tracked":
            new = np.asarray(rng.integers(1, 1000), np.int32)
        elif path[-1] == "var":
            new = rng.uniform(0.5, 2.0, v.shape)
        else:
            new = rng.normal(0.0, 0.5, v.shape)
        var.set_value(jnp.asarray(new, v.dtype))


def _make(name, kw, c, seed=0):
    # built abstractly and filled with random values: no initialiser compiles (keeps the file fast)
    m = nnx.eval_shape(lambda: flax_attn.create_attn(name, c, rngs=nnx.Rngs(seed), **kw))
    _randomize(m, seed + 1)
    return m, fal.create_attn(name, c, **kw)


def _input(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(0.1, 1.0, shape), jnp.float32)


def _tree_equal(a, b):
    ta, tb = jax.tree.structure(a), jax.tree.structure(b)
    assert ta == tb, f"{ta} != {tb}"
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.shape == y.shape and x.dtype == y.dtype, (x.shape, y.shape, x.dtype, y.dtype)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _shapes(tree):
    return jax.tree.map(lambda x: (tuple(x.shape), jnp.dtype(x.dtype)), tree)


@pytest.mark.parametrize("name,kw,shape", CASES, ids=IDS)
def test_same_tree_and_outputs(name, kw, shape):
    m, lin = _make(name, kw, shape[-1])
    x = _input(shape)
    v = fal.nnx_to_linen_variables(m)
    # Linen's own init builds exactly the NNX tree (names, shapes, dtypes)
    init = jax.eval_shape(lambda: lin.init(jax.random.key(0), x, train=False))
    assert _shapes(dict(init)) == _shapes(v)
    assert lin.preset == getattr(m, "preset", None)

    # eval mode: running statistics, nothing mutated
    m.eval()
    y_nnx = m(x)
    y_lin = lin.apply(v, x, train=False)
    np.testing.assert_array_equal(np.asarray(y_lin), np.asarray(y_nnx))

    # train mode: batch statistics, BatchNorm statistics updated identically
    m.train()
    y_nnx = m(x)
    y_lin, upd = lin.apply(v, x, train=True, mutable=["batch_stats"])
    np.testing.assert_array_equal(np.asarray(y_lin), np.asarray(y_nnx))
    after = fal.nnx_to_linen_variables(m)
    if "batch_stats" in after:
        _tree_equal(dict(upd)["batch_stats"], after["batch_stats"])
        counters = [(a, b) for (pa, a), (_, b) in zip(
            jax.tree_util.tree_leaves_with_path(after["batch_stats"]),
            jax.tree_util.tree_leaves_with_path(v["batch_stats"])) if pa[-1].key == "num_batches_tracked"]
        assert counters and all(int(a) == int(b) + 1 for a, b in counters)
    else:
        assert dict(upd) == {}

    # and back: the Linen variables load into a fresh NNX twin
    m2 = nnx.eval_shape(lambda: flax_attn.create_attn(name, shape[-1], rngs=nnx.Rngs(7), **kw))
    fal.linen_variables_to_nnx(m2, after)
    _tree_equal(fal.nnx_to_linen_variables(m2), after)


def _pick(*names):
    idx = [i for i, (n, _, _) in enumerate(CASES) if n in names]
    return pytest.mark.parametrize("name,kw,shape", [CASES[i] for i in idx], ids=[IDS[i] for i in idx])


@_pick("cbam_official", "lightcbam_timm")
def test_jit_matches(name, kw, shape):
    m, lin = _make(name, kw, shape[-1], seed=5)
    x = _input(shape, 3)
    v = fal.nnx_to_linen_variables(m)
    m.eval()
    y_eval = m(x)
    np.testing.assert_allclose(np.asarray(jax.jit(lambda v, x: lin.apply(v, x, train=False))(v, x)),
                               np.asarray(y_eval), rtol=1e-6, atol=1e-6)
    m.train()
    y, upd = jax.jit(lambda v, x: lin.apply(v, x, train=True, mutable=["batch_stats"]))(v, x)
    y_nnx = nnx.jit(lambda m, x: m(x))(m, x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_nnx), rtol=1e-6, atol=1e-6)
    after = fal.nnx_to_linen_variables(m)
    assert jax.tree.structure(upd["batch_stats"]) == jax.tree.structure(after["batch_stats"])
    for a, b in zip(jax.tree.leaves(upd["batch_stats"]), jax.tree.leaves(after["batch_stats"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


@_pick("se_classic", "se_mobilenetv3", "cbam_timm", "lightcbam_timm", "cbam_official", "sam", "cam")
def test_gradients_match(name, kw, shape):
    m, lin = _make(name, kw, shape[-1], seed=3)
    m.eval()
    x = _input(shape, 1)
    w = _input(shape, 2)
    v = fal.nnx_to_linen_variables(m)

    def loss_nnx(model, x):
        return jnp.sum(model(x) * w)

    gm, gx = nnx.grad(loss_nnx, argnums=(0, 1))(m, x)
    g_nnx = nnx.to_pure_dict(nnx.state(gm, nnx.Param))

    def loss_lin(params, x):
        return jnp.sum(lin.apply({**v, "params": params}, x, train=False) * w)

    gp, gx_lin = jax.grad(loss_lin, argnums=(0, 1))(v["params"], x)
    np.testing.assert_allclose(np.asarray(gx_lin), np.asarray(gx), rtol=1e-6, atol=1e-7)
    assert jax.tree.structure(gp) == jax.tree.structure(g_nnx)
    for a, b in zip(jax.tree.leaves(gp), jax.tree.leaves(g_nnx)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_mode_attribute_and_call_argument():
    m, _ = _make("cbam_official", {}, 16)
    x = _input((2, 5, 6, 16))
    v = fal.nnx_to_linen_variables(m)
    m.eval()
    y_eval = m(x)
    m.train()
    y_train = m(x)
    train_default = fal.create_attn("cbam_official", 16)           # like a fresh NNX module: training mode
    y, upd = train_default.apply(v, x, mutable=["batch_stats"])
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y_train))
    _tree_equal(upd["batch_stats"], fal.nnx_to_linen_variables(m)["batch_stats"])
    evaluating = train_default.clone(use_running_average=True)     # NNX's .eval()
    np.testing.assert_array_equal(np.asarray(evaluating.apply(v, x)), np.asarray(y_eval))
    np.testing.assert_array_equal(np.asarray(train_default.apply(v, x, train=False)), np.asarray(y_eval))
    y2, _ = evaluating.apply(v, x, train=True, mutable=["batch_stats"])  # the call argument wins
    np.testing.assert_array_equal(np.asarray(y2), np.asarray(y_train))
    with pytest.raises(Exception, match="batch_stats"):  # statistics can only be updated when mutable
        train_default.apply(v, x)
    # init leaves the statistics at their initial values (Linen convention)
    init = train_default.init(jax.random.key(0), x)
    np.testing.assert_array_equal(np.asarray(init["batch_stats"]["spatial"]["bn"]["var"]), np.ones(1))
    assert int(init["batch_stats"]["spatial"]["bn"]["num_batches_tracked"]) == 0


def test_batchnorm_twin():
    bn_nnx = nnx.eval_shape(lambda: flax_attn.BatchNorm(3, momentum=0.8, epsilon=1e-3, rngs=nnx.Rngs(0)))
    _randomize(bn_nnx, 5)
    bn_lin = fal.BatchNorm(3, momentum=0.8, epsilon=1e-3)
    x = _input((4, 5, 3))
    v = fal.nnx_to_linen_variables(bn_nnx)
    assert _shapes(dict(bn_lin.init(jax.random.key(0), x))) == _shapes(v)
    for _ in range(2):  # two steps: counters and statistics keep agreeing
        y, upd = bn_lin.apply(v, x, mutable=["batch_stats"])
        v = {**v, **upd}
        np.testing.assert_array_equal(np.asarray(y), np.asarray(bn_nnx(x)))
    _tree_equal(v["batch_stats"], fal.nnx_to_linen_variables(bn_nnx)["batch_stats"])
    np.testing.assert_array_equal(np.asarray(bn_lin.apply(v, x, use_running_average=True)),
                                  np.asarray(bn_nnx(x, use_running_average=True)))


def _err(fn):
    try:
        fn()
    except (ValueError, TypeError) as e:
        return type(e), str(e)
    raise AssertionError("no error raised")


@pytest.mark.parametrize("name,shape,dtype", [
    ("cbam", (2, 16, 5, 7), jnp.float32),   # NCHW
    ("se", (2, 5, 7), jnp.float32),         # wrong channels, rank 3 ok
    ("sam", (2, 5, 16), jnp.float32),       # SAM needs 2 spatial dims
    ("cam", (16,), jnp.float32),            # rank 1
    ("cbam_timm", (2, 5, 7, 16), jnp.int32),  # integer input
    ("cbam_official", (2, 0, 7, 16), jnp.float32),  # an empty map
    ("cam", (2, 5, 0, 16), jnp.float32),
    ("sam", (0, 5, 7, 16), jnp.float32),  # an empty batch in training mode with BatchNorm
])
def test_bad_input_errors_identical(name, shape, dtype):
    kw = {"use_bn": True} if shape[0] == 0 else {}  # an empty batch is refused only by train-mode BatchNorm
    m, lin = _make(name, kw, 16)
    v = fal.nnx_to_linen_variables(m)
    x = jnp.ones(shape, dtype)
    e_nnx = _err(lambda: m(x))
    e_lin = _err(lambda: lin.apply(v, x, mutable=["batch_stats"]))
    assert e_lin == e_nnx


@pytest.mark.parametrize("cls,kw", [
    ("ChannelAttention", dict(pool_fusion="max")),
    ("ChannelAttention", dict(pool_types=())),
    ("SqueezeExcite", dict(reduction=0)),
    ("SqueezeExcite", dict(act="nope")),
    ("SpatialAttention", dict(kernel_size=4)),
    ("SpatialAttention", dict(spatial_dims=4)),
    ("SpatialAttention", dict(compress=("min",))),
    ("CBAM", dict(arrangement="serial")),
    ("BatchNorm", dict(momentum=1.5)),
])
def test_bad_options_errors_identical(cls, kw):
    e_nnx = _err(lambda: getattr(flax_attn, cls)(16, rngs=nnx.Rngs(0), **kw))
    e_lin = _err(lambda: getattr(fal, cls)(16, **kw))
    assert e_lin == e_nnx


def test_create_attn_errors_and_presets():
    assert fal.create_attn("se_mobilenetv3", 72).hidden == 24
    assert fal.create_attn("se_timm", 64).hidden == nnx.eval_shape(
        lambda: flax_attn.create_attn("se_timm", 64, rngs=nnx.Rngs(0))).hidden
    with pytest.raises(ValueError, match="unknown attention block"):
        fal.create_attn("nope", 8)
    with pytest.raises(TypeError, match="rngs"):
        fal.create_attn("se", 8, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="no Linen twin"):
        fal.from_nnx(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
    m = nnx.eval_shape(lambda: flax_attn.create_attn("cbam", 16, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="does not match"):
        fal.linen_variables_to_nnx(m, {"params": {"fc1": {}}})


@pytest.mark.parametrize("name", ["se", "cam", "sam", "cbam_official"])
def test_empty_batch_gives_empty_output(name):
    m, lin = _make(name, {}, 16)
    v = fal.nnx_to_linen_variables(m)
    m.eval()
    x = jnp.zeros((0, 5, 7, 16))
    y = lin.apply(v, x, train=False)
    assert y.shape == x.shape
    np.testing.assert_array_equal(np.asarray(y), np.asarray(m(x)))


def test_create_attn_takes_linen_module_keywords():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return fal.create_attn("cbam_official", 16, name="attn", use_running_average=True)(x)

    x = _input(SHAPE)
    v = Net().init(jax.random.key(0), x)
    assert set(v["params"]) == {"attn"} and set(v["batch_stats"]) == {"attn"}
    lin = fal.create_attn("se_timm", 16, name="se", dtype=jnp.bfloat16, use_running_average=True)
    assert (lin.name, lin.dtype, lin.preset) == ("se", jnp.bfloat16, "se_timm")


@pytest.mark.parametrize("name", [n for n in list_attn() if n not in _ALIASES])
def test_linen_twin_has_the_nnx_spec_without_building_nnx(name, monkeypatch):
    nnx_block = nnx.eval_shape(lambda: flax_attn.create_attn(name, 40, rngs=nnx.Rngs(0)))

    def no_nnx(*a, **k):
        raise AssertionError("Linen create_attn must not build an NNX module to learn a preset's options")

    monkeypatch.setattr(fal_registry.nnx, "eval_shape", no_nnx)
    lin = fal.create_attn(name, 40)
    assert lin.spec == nnx_block.spec and lin.preset == nnx_block.preset
    assert fal.from_nnx(nnx_block).spec == nnx_block.spec
    # the twin's dataclass fields are the spec's options (one list, generated from the spec)
    fields = [f.name for f in dataclasses.fields(type(lin))]
    assert fields[0] == "channels" and [p.name for p in type(lin).Spec.options()] == fields[1:len(lin.spec.to_options()) + 1]


def test_linen_from_spec_and_user_factories(monkeypatch):
    spec = flax_attn.layers.get_attn("lightcbam_timm").spec.replace(kernel_size=3)
    lin = fal.create_attn(spec, 16)
    assert isinstance(lin, fal.CBAM) and lin.spec == spec and lin.kernel_size == 3
    assert fal.CBAM.from_spec(16, spec).spec == spec
    with pytest.raises(TypeError, match="spec must be a CBAMSpec, got ChannelSpec"):
        fal.CBAM.from_spec(16, spec.channel)
    # a registered factory (not a spec): its block is built abstractly to read the spec
    monkeypatch.setattr(layers_registry, "_REGISTRY", dict(layers_registry._REGISTRY))
    flax_attn.register_attn("my_se", lambda c, *, rngs, **kw: flax_attn.SqueezeExcite(c, reduction=2, rngs=rngs, **kw))
    assert fal.create_attn("my_se", 16, name="m").hidden == 8
