"""flax_attn.convert without torch: numpy state dicts and safetensors files.

Layout rules per layer kind, strictness (every problem in one error, nothing loaded), dtypes, key maps
(renames, nested prefixes, presets found in sub-modules), Linen variables, safetensors round trips."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

import flax_attn
from flax_attn import linen as fal
from flax_attn.convert import (
    ConversionError,
    ConversionWarning,
    KeyMap,
    get_key_map,
    linen_to_numpy,
    list_key_maps,
    load_safetensors,
    module_key_map,
    nnx_to_numpy,
    register_key_map,
    save_safetensors,
    torch_to_linen,
    torch_to_nnx,
)
from flax_attn.layers import list_attn

RNG = np.random.default_rng(0)


def _r(*shape, dtype=np.float32):
    return RNG.normal(size=shape).astype(dtype)


def _snapshot(module):
    return {k: np.array(v) for k, v in nnx_to_numpy(module).items()}


def _assert_sd_equal(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, (k, a[k].dtype, b[k].dtype)
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _abstract(fn):
    """The module ``fn()`` builds, without running its initialisers (variables are ShapeDtypeStructs)."""
    return nnx.eval_shape(fn)


def _build(fn, seed=0):
    """``fn()``'s module with random values (no initialiser compiles: that keeps this file fast)."""
    return _randomize(_abstract(fn), seed)


def _randomize(module, seed=0):
    rng = np.random.default_rng(seed)
    for path, var in nnx.iter_graph(module):
        if isinstance(var, (nnx.Param, nnx.BatchStat)):
            v = var.get_value()
            new = rng.integers(1, 1000, v.shape) if path[-1] == "num_batches_tracked" else rng.normal(size=v.shape)
            var.set_value(jnp.asarray(new, v.dtype))
    return module


# --------------------------------------------------------------------------------------------------
# layout rules
# --------------------------------------------------------------------------------------------------


def test_dense_transposes():
    lin = _abstract(lambda: nnx.Linear(3, 5, rngs=nnx.Rngs(0)))
    w, b = _r(5, 3), _r(5)
    torch_to_nnx(lin, {"weight": w, "bias": b})
    np.testing.assert_array_equal(np.asarray(lin.kernel[...]), w.T)
    x = _r(2, 3)
    np.testing.assert_allclose(np.asarray(lin(x)), x @ w.T + b, rtol=1e-6)
    _assert_sd_equal(nnx_to_numpy(lin), {"weight": w, "bias": b})


@pytest.mark.parametrize("nd,groups", [(1, 1), (2, 1), (3, 1), (2, 2), (2, 6)])
def test_conv_kernels_nd_grouped_depthwise(nd, groups):
    cin, cout, k = 6, 12, (3, 5, 1)[:nd]
    conv = _abstract(lambda: nnx.Conv(cin, cout, k, feature_group_count=groups, padding="VALID", rngs=nnx.Rngs(0)))
    w = _r(cout, cin // groups, *k)                     # torch OI(D)HW
    torch_to_nnx(conv, {"weight": w, "bias": _r(cout)})
    assert conv.kernel.shape == (*k, cin // groups, cout)
    # flax[*k, i, o] == torch[o, i, *k]
    np.testing.assert_array_equal(np.asarray(conv.kernel[...]), np.moveaxis(w, (0, 1), (-1, -2)))
    _assert_sd_equal({"weight": w}, {"weight": nnx_to_numpy(conv)["weight"]})
    # numerics against a direct (torch-semantics) grouped correlation written in numpy
    if nd == 2:
        x = _r(2, 5, 7, cin)
        out = np.asarray(conv(x)) - np.asarray(conv.bias[...])
        cg, og = cin // groups, cout // groups
        ref = np.zeros(out.shape, np.float64)
        for o in range(cout):
            g = o // og
            for dy in range(k[0]):
                for dx in range(k[1]):
                    patch = x[:, dy:dy + out.shape[1], dx:dx + out.shape[2], g * cg:(g + 1) * cg]
                    ref[..., o] += patch @ w[o, :, dy, dx]
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    if nd == 1:
        x = _r(1, 7, cin)
        out = np.asarray(conv(x))[0] - np.asarray(conv.bias[...])
        ref = np.stack([sum(x[0, i + t] @ w[:, :, t].T for t in range(3)) for i in range(5)])
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_dense_accepts_1x1_conv_on_import_and_exports_it_when_marked():
    lin = _abstract(lambda: nnx.Linear(4, 2, rngs=nnx.Rngs(0)))
    w = _r(2, 4, 1, 1)
    torch_to_nnx(lin, {"weight": w, "bias": _r(2)})       # unmarked: accepted by shape
    np.testing.assert_array_equal(np.asarray(lin.kernel[...]), w[:, :, 0, 0].T)
    assert nnx_to_numpy(lin)["weight"].shape == (2, 4)    # unmarked: exported as a Linear
    unmarked = KeyMap()                                    # identity map: no conv1x1 marks
    se = _build(lambda: flax_attn.create_attn("se_torchvision", 16, rngs=nnx.Rngs(0)))
    sd = nnx_to_numpy(se)
    assert sd["fc1.weight"].shape == (se.hidden, 16, 1, 1) and sd["fc2.weight"].shape == (16, se.hidden, 1, 1)
    assert nnx_to_numpy(se, key_map=unmarked)["fc1.weight"].shape == (se.hidden, 16)
    # 1-D / 3-D 1x1 convs
    km = KeyMap(conv1x1=("fc1",), conv1x1_dims=3)
    assert nnx_to_numpy(se, key_map=km)["fc1.weight"].shape == (se.hidden, 16, 1, 1, 1)
    bad = {**sd, "fc1.weight": _r(se.hidden, 16, 3, 3)}   # a real 3x3 conv is not a Dense
    with pytest.raises(ConversionError, match=r"fc1.kernel <- fc1.weight: checkpoint has \(1, 16, 3, 3\)"):
        torch_to_nnx(se, bad)


def test_batchnorm_names_and_num_batches_tracked():
    bn = _abstract(lambda: flax_attn.BatchNorm(3, rngs=nnx.Rngs(0)))
    sd = {"weight": _r(3), "bias": _r(3), "running_mean": _r(3), "running_var": np.abs(_r(3)) + 0.5,
          "num_batches_tracked": np.array(12345, np.int64)}
    torch_to_nnx(bn, sd)
    assert bn.num_batches_tracked[...].dtype == jnp.int32 and int(bn.num_batches_tracked[...]) == 12345
    np.testing.assert_array_equal(np.asarray(bn.var[...]), sd["running_var"])
    out = nnx_to_numpy(bn)
    _assert_sd_equal(out, sd)                                  # int64 again, same value
    # an old checkpoint without the counter: accepted, the counter is left as it was
    torch_to_nnx(bn, {k: v for k, v in sd.items() if k != "num_batches_tracked"})
    assert int(bn.num_batches_tracked[...]) == 12345
    # a counter that does not fit int32 is an error, not a silent wrap
    with pytest.raises(ConversionError, match="do not fit"):
        torch_to_nnx(bn, {**sd, "num_batches_tracked": np.array(2**40, np.int64)})


def test_flax_batchnorm_without_counter_drops_and_restores_it():
    bn = _abstract(lambda: nnx.BatchNorm(3, rngs=nnx.Rngs(0)))
    sd = {"weight": _r(3), "bias": _r(3), "running_mean": _r(3), "running_var": _r(3) ** 2,
          "num_batches_tracked": np.array(7, np.int64)}
    torch_to_nnx(bn, sd)
    out = nnx_to_numpy(bn)
    assert out["num_batches_tracked"].dtype == np.int64 and int(out["num_batches_tracked"]) == 0
    np.testing.assert_array_equal(out["running_mean"], sd["running_mean"])


def test_sequential_and_list_paths_are_torch_names():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.features = nnx.Sequential(nnx.Conv(3, 4, (3, 3), rngs=rngs), flax_attn.BatchNorm(4, rngs=rngs),
                                           nnx.relu, nnx.Sequential(nnx.Linear(4, 4, rngs=rngs)))
            self.layer1 = nnx.List([nnx.Linear(4, 5, rngs=rngs), nnx.Linear(5, 6, use_bias=False, rngs=rngs)])

    net = _build(lambda: Net(nnx.Rngs(0)))
    sd = nnx_to_numpy(net)
    assert sorted(sd) == sorted([
        "features.0.weight", "features.0.bias", "features.1.weight", "features.1.bias", "features.1.running_mean",
        "features.1.running_var", "features.1.num_batches_tracked", "features.3.0.weight", "features.3.0.bias",
        "layer1.0.weight", "layer1.0.bias", "layer1.1.weight"])
    net2 = torch_to_nnx(_abstract(lambda: Net(nnx.Rngs(1))), sd)
    _assert_sd_equal(_snapshot(net2), sd)


def test_unsupported_layers_are_reported():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.up = nnx.ConvTranspose(3, 4, (2, 2), rngs=rngs)
            self.fc = nnx.Linear(2, 2, rngs=rngs)

    with pytest.raises(ConversionError, match="up.kernel: ConvTranspose layers are not supported"):
        nnx_to_numpy(_build(lambda: Net(nnx.Rngs(0))))


# --------------------------------------------------------------------------------------------------
# strictness
# --------------------------------------------------------------------------------------------------


def _cbam_sd(c=16):
    return nnx_to_numpy(_build(lambda: flax_attn.create_attn("cbam_timm", c, rngs=nnx.Rngs(3)), 3))


def test_all_problems_in_one_error_and_nothing_loaded():
    m = _build(lambda: flax_attn.create_attn("cbam_timm", 16, rngs=nnx.Rngs(0)))
    before = _snapshot(m)
    sd = _cbam_sd()
    del sd["channel.fc2.weight"]                                   # missing
    sd["spatial.conv.bn.weight"] = _r(1)                           # a good one, must not be written either
    sd["spatial.conv.conv.weight"] = _r(1, 3, 7, 7)                # shape mismatch
    sd["channel.fc1.weight"] = sd["channel.fc1.weight"].astype(np.float64)  # dtype mismatch
    sd["head.weight"] = _r(2, 2)                                   # unexpected
    with pytest.raises(ConversionError) as info:
        torch_to_nnx(m, sd)
    e = info.value
    assert isinstance(e, ValueError) and len(e.problems) == 4, e.problems
    msg = str(e)
    for part in ["missing: channel.fc2.kernel (torch key 'channel.fc2.weight')",
                 "unexpected: checkpoint key 'head.weight'",
                 "shape mismatch for spatial.conv.kernel <- spatial.conv.conv.weight: checkpoint has (1, 3, 7, 7)",
                 "dtype mismatch for channel.fc1.kernel <- channel.fc1.weight: checkpoint has float64",
                 "4 problems", "nothing was loaded"]:
        assert part in msg, (part, msg)
    _assert_sd_equal(_snapshot(m), before)


def test_non_strict_warns_loads_the_rest_but_shape_errors_still_raise():
    m = _build(lambda: flax_attn.create_attn("cbam_timm", 16, rngs=nnx.Rngs(0)))
    before = _snapshot(m)
    sd = _cbam_sd()
    full = dict(sd)
    del sd["channel.fc2.weight"]
    sd["extra.weight"] = _r(3)
    with pytest.warns(ConversionWarning, match=r"(?s)missing: channel.fc2.kernel.*unexpected: checkpoint key 'extra"):
        torch_to_nnx(m, sd, strict=False)
    after = _snapshot(m)
    np.testing.assert_array_equal(after["channel.fc2.weight"], before["channel.fc2.weight"])  # left unchanged
    for k in sd:
        if k in after:
            np.testing.assert_array_equal(after[k], full[k])
    with pytest.raises(ConversionError, match="shape mismatch"):
        torch_to_nnx(m, {**sd, "spatial.conv.bn.weight": _r(2)}, strict=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch_to_nnx(m, full, strict=False)                        # nothing to report: no warning


def test_dtypes_are_kept_unless_cast():
    m = _build(lambda: flax_attn.create_attn("se", 16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    sd32 = {k: v.astype(np.float32) for k, v in nnx_to_numpy(m).items()}
    with pytest.raises(ConversionError, match="checkpoint has float32, the Flax variable is bfloat16"):
        torch_to_nnx(m, sd32)
    torch_to_nnx(m, sd32, cast=True)
    assert m.fc1.kernel[...].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(m.fc1.kernel[...]), sd32["fc1.weight"].T.astype(ml_dtypes.bfloat16))
    sd = nnx_to_numpy(m)
    assert sd["fc1.weight"].dtype == ml_dtypes.bfloat16


def test_bad_arguments():
    m = _build(lambda: flax_attn.create_attn("se", 16, rngs=nnx.Rngs(0)))
    with pytest.raises(TypeError, match="state_dict must be a mapping"):
        torch_to_nnx(m, [("fc1.weight", 1)])
    with pytest.raises(TypeError, match="module must be a flax.nnx.Module.*torch_to_linen"):
        torch_to_nnx({"params": {}}, {})
    with pytest.raises(TypeError, match="key_map must be a KeyMap"):
        nnx_to_numpy(m, key_map=3)
    with pytest.raises(ValueError, match="no key map registered as 'nope'"):
        nnx_to_numpy(m, key_map="nope")
    m.preset = "no_such_preset"
    with pytest.raises(ValueError, match="no key map registered as 'no_such_preset'"):
        nnx_to_numpy(m)
    with pytest.raises(ConversionError, match=r"fc1.kernel has no value \(an abstract, eval_shape'd variable\)"):
        nnx_to_numpy(_abstract(lambda: flax_attn.create_attn("se", 16, rngs=nnx.Rngs(0))))
    with pytest.raises(ConversionError, match="expected a tensor or an array"):
        torch_to_nnx(_abstract(lambda: flax_attn.create_attn("se", 16, rngs=nnx.Rngs(0))),
                     {**nnx_to_numpy(_build(lambda: flax_attn.create_attn("se", 16, rngs=nnx.Rngs(0)))),
                      "fc1.bias": object()})


# --------------------------------------------------------------------------------------------------
# key maps
# --------------------------------------------------------------------------------------------------


def test_every_registry_preset_has_a_key_map_and_round_trips_bit_exact():
    assert set(list_attn()) <= set(list_key_maps())
    for name in list_attn():
        m = _build(lambda: flax_attn.create_attn(name, 24, rngs=nnx.Rngs(0)), seed=1)
        sd = nnx_to_numpy(m)
        m2 = torch_to_nnx(_abstract(lambda: flax_attn.create_attn(name, 24, rngs=nnx.Rngs(5))), sd)
        _assert_sd_equal(nnx_to_numpy(m2), sd)
        for (p, a), (_, b) in zip(nnx.to_flat_state(nnx.state(m)), nnx.to_flat_state(nnx.state(m2))):
            np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), err_msg=str(p))


@pytest.mark.parametrize("preset,expected", [
    ("se_classic", ["fc.0.weight", "fc.2.weight"]),
    ("se_torchvision", ["fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight"]),
    ("se_timm", ["fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight"]),
    ("cbam_timm", ["channel.fc1.weight", "channel.fc2.weight", "spatial.conv.bn.bias",
                   "spatial.conv.bn.num_batches_tracked", "spatial.conv.bn.running_mean",
                   "spatial.conv.bn.running_var", "spatial.conv.bn.weight", "spatial.conv.conv.weight"]),
    ("cbam_official", ["ChannelGate.mlp.1.bias", "ChannelGate.mlp.1.weight", "ChannelGate.mlp.3.bias",
                       "ChannelGate.mlp.3.weight", "SpatialGate.spatial.bn.bias",
                       "SpatialGate.spatial.bn.num_batches_tracked", "SpatialGate.spatial.bn.running_mean",
                       "SpatialGate.spatial.bn.running_var", "SpatialGate.spatial.bn.weight",
                       "SpatialGate.spatial.conv.weight"]),
    ("cbam", ["channel.fc1.bias", "channel.fc1.weight", "channel.fc2.bias", "channel.fc2.weight",
              "spatial.conv.bias", "spatial.conv.weight"]),
])
def test_preset_torch_names(preset, expected):
    assert sorted(nnx_to_numpy(_build(lambda: flax_attn.create_attn(preset, 32, rngs=nnx.Rngs(0))))) == expected


def test_keymap_renames_longest_prefix_whole_components():
    km = KeyMap({"a": "A", "a.b": "X.Y", "ab": "Z"})
    assert km.torch_key("a.b.c.kernel") == "X.Y.c.weight"
    assert km.torch_key("a.bb.kernel") == "A.bb.weight"
    assert km.torch_key("ab.scale") == "Z.weight"
    assert km.torch_key("abc.mean") == "abc.running_mean"
    assert km.torch_key("kernel") == "weight"
    assert km.translate("a.b") == ("X.Y", False)
    with pytest.raises(TypeError, match="single string"):
        KeyMap(conv1x1="fc1")
    with pytest.raises(ValueError, match="empty component"):
        KeyMap({"a..b": "c"})


def test_nested_maps_compose_with_prefixes():
    inner = KeyMap({"fc1": "squeeze"}, conv1x1=("fc1",), nested={"deep": "se_classic"})
    km = KeyMap({"stage1": "layer1", "stage1.0.attn": "layer1.0.se"}, nested={"stage1.0.attn": inner})
    assert km.torch_key("stage1.0.attn.fc1.kernel") == "layer1.0.se.squeeze.weight"
    assert km.translate("stage1.0.attn.fc1") == ("layer1.0.se.squeeze", True)
    assert km.torch_key("stage1.0.attn.deep.fc2.kernel") == "layer1.0.se.deep.fc.2.weight"
    assert km.torch_key("stage1.0.conv1.kernel") == "layer1.0.conv1.weight"
    assert km.with_nested("stage1.1.attn", "cbam_official").torch_key(
        "stage1.1.attn.spatial.bn.var") == "layer1.1.attn.SpatialGate.spatial.bn.running_var"


class _Block(nnx.Module):
    def __init__(self, attn, rngs):
        self.conv1 = nnx.Conv(4, 16, (3, 3), rngs=rngs)
        self.attn = flax_attn.create_attn(attn, 16, rngs=rngs)


class _Net(nnx.Module):
    def __init__(self, rngs, attn="cbam_official"):
        self.stem = nnx.Conv(3, 4, (3, 3), rngs=rngs)
        self.layer1 = nnx.List([_Block(attn, rngs), _Block("se_timm", rngs)])
        self.head = nnx.Linear(16, 10, rngs=rngs)


def test_presets_of_submodules_are_nested_automatically():
    net = _build(lambda: _Net(nnx.Rngs(0)))
    sd = nnx_to_numpy(net, key_map=KeyMap({"head": "fc"}))
    assert "layer1.0.attn.ChannelGate.mlp.1.weight" in sd
    assert "layer1.0.attn.SpatialGate.spatial.bn.running_var" in sd
    assert sd["layer1.1.attn.fc1.weight"].shape[2:] == (1, 1)        # se_timm: 1x1 conv
    assert "fc.weight" in sd and "stem.weight" in sd
    net2 = torch_to_nnx(_abstract(lambda: _Net(nnx.Rngs(1))), sd, key_map=KeyMap({"head": "fc"}))
    _assert_sd_equal(nnx_to_numpy(net2, key_map=KeyMap({"head": "fc"})), sd)
    # the effective map, for inspection
    eff = module_key_map(net, KeyMap({"head": "fc"}))
    assert eff.torch_key("layer1.0.attn.spatial.bn.var") == "layer1.0.attn.SpatialGate.spatial.bn.running_var"
    assert eff.translate("layer1.1.attn.fc2") == ("layer1.1.attn.fc2", True)
    # a registered model map; an explicit nested entry wins over the sub-module's preset
    register_key_map("test_net_v1", KeyMap({"head": "fc"}, nested={"layer1.0.attn": KeyMap()}), overwrite=True)
    net.preset = "test_net_v1"
    sd2 = nnx_to_numpy(net)
    assert "layer1.0.attn.channel.fc1.weight" in sd2 and "layer1.1.attn.fc1.weight" in sd2


def test_register_key_map():
    km = register_key_map("test_map_a", KeyMap({"x": "y"}), overwrite=True)
    assert get_key_map("TEST-map-a") is km and km.name == "test_map_a"
    register_key_map("test_map_a", KeyMap({"x": "y"}))          # the same map again: fine
    with pytest.raises(ValueError, match="already registered"):
        register_key_map("test_map_a", KeyMap({"x": "z"}))
    with pytest.raises(TypeError, match="must be a KeyMap"):
        register_key_map("test_map_b", {"x": "y"})


def test_duplicate_torch_keys_are_an_error():
    m = _build(lambda: flax_attn.create_attn("se", 16, rngs=nnx.Rngs(0)))
    with pytest.raises(ConversionError, match="sends both fc1.kernel and fc2.kernel to torch key 'fc.weight'"):
        nnx_to_numpy(m, key_map=KeyMap({"fc1": "fc", "fc2": "fc"}))


# --------------------------------------------------------------------------------------------------
# Linen
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["cbam_official", "se_torchvision", "lightcbam_timm"])
def test_linen_round_trip_and_same_numbers_as_nnx(preset):
    m = _build(lambda: flax_attn.create_attn(preset, 16, rngs=nnx.Rngs(0)))
    sd = nnx_to_numpy(m)
    lin = fal.create_attn(preset, 16)
    x = jnp.asarray(_r(2, 5, 3, 16))
    template = jax.eval_shape(lambda: lin.init(jax.random.key(0), x, train=False))
    v = torch_to_linen(template, sd, key_map=lin.preset)
    assert jax.tree.structure(v) == jax.tree.structure(template) and type(v) is type(template)
    _assert_sd_equal(linen_to_numpy(v, key_map=preset), sd)
    m.eval()
    np.testing.assert_array_equal(np.asarray(lin.apply(v, x, train=False)), np.asarray(m(x)))
    # FrozenDict in, FrozenDict out; other collections pass through
    from flax.core import freeze
    fv = torch_to_linen(freeze({**template, "intermediates": {"z": jnp.ones(2)}}), sd, key_map=preset)
    assert type(fv).__name__ == "FrozenDict" and "intermediates" in fv


def test_linen_errors():
    lin = fal.create_attn("se_classic", 16)
    v = jax.eval_shape(lambda: lin.init(jax.random.key(0), jnp.ones((1, 2, 2, 16))))
    with pytest.raises(ValueError, match="pass the full variables dict"):
        torch_to_linen(v["params"], {})
    with pytest.raises(ConversionError, match=r"missing: fc1.kernel \(torch key 'fc.0.weight'\)"):
        torch_to_linen(v, {"fc.2.weight": _r(16, 1)}, key_map="se_classic")
    with pytest.raises(TypeError, match="Linen variables mapping"):
        linen_to_numpy(_abstract(lambda: flax_attn.SqueezeExcite(16, rngs=nnx.Rngs(0))))


# --------------------------------------------------------------------------------------------------
# safetensors
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.bfloat16])
def test_safetensors_round_trip(tmp_path, param_dtype):
    m = _build(lambda: flax_attn.create_attn("cbam_official", 16, param_dtype=param_dtype, rngs=nnx.Rngs(0)))
    sd = nnx_to_numpy(m)
    path = tmp_path / "cbam.safetensors"
    save_safetensors(sd, path)
    loaded = load_safetensors(path)
    _assert_sd_equal(loaded, sd)
    m2 = torch_to_nnx(_abstract(lambda: flax_attn.create_attn("cbam_official", 16, param_dtype=param_dtype,
                                                              rngs=nnx.Rngs(1))), loaded)
    _assert_sd_equal(nnx_to_numpy(m2), sd)
    with pytest.raises(FileNotFoundError, match="no safetensors file"):
        load_safetensors(tmp_path / "nope.safetensors")
    with pytest.raises(TypeError, match="keys must be strings"):
        save_safetensors({1: np.ones(2)}, tmp_path / "x.safetensors")


def test_convert_never_imports_torch(tmp_path):
    code = (
        "import sys, numpy as np\n"
        "from flax import nnx\n"
        "import flax_attn\n"
        "from flax_attn.convert import nnx_to_numpy, torch_to_nnx, save_safetensors, load_safetensors\n"
        "m = flax_attn.create_attn('cbam_timm', 16, rngs=nnx.Rngs(0))\n"
        f"p = {str(tmp_path / 'w.safetensors')!r}\n"
        "save_safetensors(nnx_to_numpy(m), p)\n"
        "torch_to_nnx(m, load_safetensors(p))\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print('ok')\n"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


# --------------------------------------------------------------------------------------------------
# diagnoses: a prefix to strip, long error lists, a checkpoint of another architecture
# --------------------------------------------------------------------------------------------------


def test_module_prefix_is_diagnosed_and_stripped_on_request():
    """A DataParallel/DDP checkpoint (every key under ``module.``) says what to do, and strip_prefix does it."""
    src = _build(lambda: flax_attn.create_attn("cbam_timm", 16, rngs=nnx.Rngs(3)), 3)
    sd = nnx_to_numpy(src)
    ddp = {f"module.{k}": v for k, v in sd.items()}
    m = _build(lambda: flax_attn.create_attn("cbam_timm", 16, rngs=nnx.Rngs(0)))
    before = _snapshot(m)
    with pytest.raises(ConversionError, match=r"strip 'module\.'.*strip_prefix='module\.'") as info:
        torch_to_nnx(m, ddp)
    assert any("strip" in h for h in info.value.hints)
    _assert_sd_equal(_snapshot(m), before)                          # nothing loaded
    torch_to_nnx(m, ddp, strip_prefix="module.")
    _assert_sd_equal(_snapshot(m), sd)
    torch_to_nnx(m, ddp, strip_prefix="module")                     # the dot is implied
    # keys without the prefix stay as they are; a stripped key that collides with another is an error
    with pytest.raises(ConversionError, match=r"'channel.fc1.weight' and 'module.channel.fc1.weight' are both"):
        torch_to_nnx(m, {**sd, "module.channel.fc1.weight": sd["channel.fc1.weight"]}, strip_prefix="module.")
    with pytest.raises(TypeError, match=r"strip_prefix must be a non-empty string.*got 3"):
        torch_to_nnx(m, sd, strip_prefix=3)
    # Linen: the same keyword
    lin = fal.create_attn("cbam_timm", 16)
    template = jax.eval_shape(lambda: lin.init(jax.random.key(0), jnp.ones((1, 4, 4, 16)), train=False))
    with pytest.raises(ConversionError, match=r"strip 'module\.'"):
        torch_to_linen(template, ddp, key_map="cbam_timm")
    _assert_sd_equal(linen_to_numpy(torch_to_linen(template, ddp, key_map="cbam_timm", strip_prefix="module."),
                                    key_map="cbam_timm"), sd)


def test_long_error_lists_are_capped_and_wrong_architecture_is_said():
    """Hundreds of problems: the message shows the first 20 and a count (the full list is on .problems), and
    says that the checkpoint is of another architecture when most keys fail."""
    class Wide(nnx.Module):
        def __init__(self, rngs):
            self.blocks = nnx.List([nnx.Linear(3, 3, rngs=rngs) for _ in range(60)])

    m = _build(lambda: Wide(nnx.Rngs(0)))
    other = {f"stage{i}.conv.weight": _r(4, 3, 1, 1) for i in range(50)}
    with pytest.raises(ConversionError) as info:
        torch_to_nnx(m, other)
    e = info.value
    assert len(e.problems) == 170                                   # 120 missing + 50 unexpected
    msg = str(e)
    assert "170 problems: 120 missing, 50 unexpected" in msg
    assert msg.count("\n  - ") == 20 and "... and 150 more (all 170 are listed on this exception's .problems)" in msg
    assert len(msg) < 4000
    assert "0 of the checkpoint's 50 keys match" in msg and "another architecture" in msg
    import pickle
    e2 = pickle.loads(pickle.dumps(e))
    assert e2.problems == e.problems and e2.hints == e.hints and str(e2) == msg
    # a few problems: no architecture hint
    sd = nnx_to_numpy(m)
    del sd["blocks.0.weight"]
    with pytest.raises(ConversionError) as info:
        torch_to_nnx(m, sd)
    assert info.value.hints == [] and "more" not in str(info.value)


def test_from_torchvision_names_the_registered_model_a_checkpoint_belongs_to():
    from flax_attn.convert import from_torchvision, to_torchvision_numpy
    from flax_attn.models import create_model

    r34 = _build(lambda: create_model("resnet34", num_classes=10, width=8, jit=False))
    sd = to_torchvision_numpy(r34)
    with pytest.raises(ConversionError, match=r"registered model with exactly these keys: 'resnet34'") as info:
        from_torchvision("resnet18", sd)
    assert "another architecture" not in str(info.value)            # resnet18's keys are all there
    assert from_torchvision("resnet34", sd).fc.kernel.shape == (64, 10)   # the hint is right
