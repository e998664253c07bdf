"""Weight conversion against the real PyTorch twins of every preset.

For each preset with a torch twin (torchvision ``SqueezeExcitation`` in its plain / MobileNetV3 /
EfficientNet configurations, timm ``SEModule`` / ``CbamModule`` / ``LightCbamModule``, the article's
``SELayer``, the official CBAM code, the generic ``torch_ref.blocks``): random weights AND random
BatchNorm statistics; torch -> Flax -> torch reproduces every tensor bit for bit (dtype included), the
result loads into the torch module with ``strict=True``, Flax -> torch -> Flax is bit exact too, and the
converted Flax module (NNX and Linen) computes the torch module's outputs (eval mode, rel err <= 1e-5).
The exhaustive per-option numeric grid is parity_tests/test_blocks_parity.py; this file is about weights.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
from flax import nnx
from safetensors.torch import save_file
from timm.layers import SEModule
from timm.layers.cbam import CbamModule, LightCbamModule

import flax_attn
import torch_ref
from flax_attn import linen as fal
from flax_attn.convert import (
    ConversionError,
    linen_to_torch,
    load_safetensors,
    nnx_to_torch,
    save_safetensors,
    torch_to_linen,
    torch_to_nnx,
)
from parity_tests._utils import assert_close, random_input, randomize_module_, to_channels_first, to_channels_last

TV_SE = torchvision.ops.SqueezeExcitation

# id -> (torch factory, Flax preset, Flax keyword overrides, input shape NCHW)
CASES = {
    "se_classic": (lambda: torch_ref.SELayer(48), "se_classic", {}, (2, 48, 5, 7)),
    "se_torchvision": (lambda: TV_SE(40, 12), "se_torchvision", dict(hidden_channels=12), (2, 40, 4, 3)),
    "se_mobilenetv3": (lambda: TV_SE(72, 24, scale_activation=torch.nn.Hardsigmoid), "se_mobilenetv3", {},
                       (1, 72, 5, 5)),
    "se_efficientnet": (lambda: TV_SE(96, 4, activation=torch.nn.SiLU), "se_efficientnet",
                        dict(squeeze_from=16), (2, 96, 3, 6)),
    "se_timm": (lambda: SEModule(64), "se_timm", {}, (2, 64, 6, 5)),
    "cbam_timm": (lambda: CbamModule(32), "cbam_timm", {}, (2, 32, 7, 6)),
    "lightcbam_timm": (lambda: LightCbamModule(32), "lightcbam_timm", {}, (2, 32, 5, 9)),
    "cbam_official": (lambda: torch_ref.OfficialCBAM(32), "cbam_official", {}, (2, 32, 6, 7)),
    "cbam_official_no_spatial": (lambda: torch_ref.OfficialCBAM(32, pool_types=("avg", "max", "lp"),
                                                                no_spatial=True),
                                 "cbam_official", dict(no_spatial=True, pool_types=("avg", "max", "lp")),
                                 (2, 32, 3, 4)),
    "generic_cbam_bn_conv": (lambda: torch_ref.CBAM(24, use_bn=True, compress="conv", conv_bias=True),
                             "cbam", dict(use_bn=True, compress="conv", conv_bias=True), (2, 24, 5, 4)),
    "generic_cbam_3d": (lambda: torch_ref.CBAM(16, spatial_dims=3, kernel_size=3, use_bn=True),
                        "cbam", dict(spatial_dims=3, kernel_size=3, use_bn=True), (2, 16, 3, 4, 5)),
    "generic_sam_1d": (lambda: torch_ref.SpatialAttention(8, spatial_dims=1, kernel_size=5, use_bn=True),
                       "sam", dict(spatial_dims=1, kernel_size=5, use_bn=True), (3, 8, 11)),
}


def _flax(preset, channels, kw, **extra):
    # abstract build: the loaded checkpoint fills every variable, no random init needed
    return nnx.eval_shape(lambda: flax_attn.create_attn(preset, channels, rngs=nnx.Rngs(0), **kw, **extra))


def _assert_state_dicts_identical(got, ref):
    assert sorted(got) == sorted(ref), (sorted(set(got) ^ set(ref)))
    for k, v in ref.items():
        assert got[k].dtype == v.dtype, (k, got[k].dtype, v.dtype)
        assert got[k].shape == v.shape, (k, got[k].shape, v.shape)
        assert torch.equal(got[k], v), k


@pytest.mark.parametrize("case", sorted(CASES))
def test_torch_flax_torch_bit_exact_and_same_outputs(case):
    make_torch, preset, kw, shape = CASES[case]
    t = randomize_module_(make_torch(), seed=len(case))
    t.eval()
    sd = {k: v.clone() for k, v in t.state_dict().items()}

    m = torch_to_nnx(_flax(preset, shape[1], kw), sd)
    back = nnx_to_torch(m)
    _assert_state_dicts_identical(back, sd)
    fresh = make_torch()
    fresh.load_state_dict(back, strict=True)
    _assert_state_dicts_identical(fresh.state_dict(), sd)

    # Flax -> torch -> Flax: bit exact too
    m2 = torch_to_nnx(_flax(preset, shape[1], kw), nnx_to_torch(m))
    for (p, a), (_, b) in zip(nnx.to_flat_state(nnx.state(m)), nnx.to_flat_state(nnx.state(m2))):
        assert a.get_value().dtype == b.get_value().dtype
        np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), err_msg=str(p))

    # the converted module computes the torch module's numbers (eval mode: the randomised statistics)
    x = random_input(shape, seed=3)
    with torch.no_grad():
        y_t = t(x)
    m.eval()
    y_f = m(jnp.asarray(to_channels_last(x)))
    assert_close(to_channels_first(y_f), y_t, 1e-5, f"{case} NNX output")

    # Linen: the same checkpoint into Linen variables
    lin = fal.create_attn(preset, shape[1], **kw)
    template = jax.eval_shape(lambda: lin.init(jax.random.key(0), jnp.zeros(to_channels_last(x).shape), train=False))
    v = torch_to_linen(template, sd, key_map=preset)
    assert_close(to_channels_first(lin.apply(v, jnp.asarray(to_channels_last(x)), train=False)), y_t, 1e-5,
                 f"{case} Linen output")
    _assert_state_dicts_identical(linen_to_torch(v, key_map=preset), sd)


@pytest.mark.parametrize("case", ["cbam_timm", "se_classic"])
def test_safetensors_file_from_torch(case, tmp_path):
    make_torch, preset, kw, shape = CASES[case]
    t = randomize_module_(make_torch(), seed=11)
    path = tmp_path / "w.safetensors"
    save_file(t.state_dict(), str(path))            # written by torch's own safetensors writer
    m = torch_to_nnx(_flax(preset, shape[1], kw), load_safetensors(path))
    _assert_state_dicts_identical(nnx_to_torch(m), t.state_dict())


def test_bfloat16_round_trip_bit_exact():
    t = randomize_module_(SEModule(64), seed=5).to(torch.bfloat16)
    sd = t.state_dict()
    m = torch_to_nnx(_flax("se_timm", 64, {}, param_dtype=jnp.bfloat16), sd)
    assert m.fc1.kernel.get_value().dtype == jnp.bfloat16
    _assert_state_dicts_identical(nnx_to_torch(m), sd)


def test_bfloat16_batchnorm_statistics_need_cast():
    # the Flax BatchNorm keeps its statistics in float32 whatever param_dtype is; a bf16 torch module has
    # bf16 buffers: loading them is an explicit cast (exact: float32 holds every bf16 value)
    t = randomize_module_(CbamModule(32), seed=5).to(torch.bfloat16)
    sd = t.state_dict()
    with pytest.raises(ConversionError, match="running_var: checkpoint has bfloat16, the Flax variable is float32"):
        torch_to_nnx(_flax("cbam_timm", 32, {}, param_dtype=jnp.bfloat16), sd)
    m = torch_to_nnx(_flax("cbam_timm", 32, {}, param_dtype=jnp.bfloat16), sd, cast=True)
    back = nnx_to_torch(m)
    assert back["spatial.conv.bn.running_var"].dtype == torch.float32
    assert torch.equal(back["spatial.conv.bn.running_var"].to(torch.bfloat16), sd["spatial.conv.bn.running_var"])
    fresh = CbamModule(32).to(torch.bfloat16)
    fresh.load_state_dict(back, strict=True)          # torch casts the float32 statistics back, exactly
    _assert_state_dicts_identical(fresh.state_dict(), sd)


def test_strictness_against_a_real_torch_module():
    t = randomize_module_(torch_ref.OfficialCBAM(32), seed=2)
    sd = t.state_dict()
    bad = {k: v for k, v in sd.items() if k != "ChannelGate.mlp.3.bias"}
    bad["ChannelGate.mlp.1.weight"] = sd["ChannelGate.mlp.1.weight"][:, :16]
    bad["fc.weight"] = torch.zeros(3)
    with pytest.raises(ConversionError) as info:
        torch_to_nnx(_flax("cbam_official", 32, {}), bad)
    assert len(info.value.problems) == 3
    # the wrong preset: every key is reported, nothing loads
    with pytest.raises(ConversionError, match="missing: channel.fc1.kernel"):
        torch_to_nnx(_flax("cbam_timm", 32, {}), sd)


def test_meta_tensor_is_named_not_a_raw_torch_error():
    """A state dict from a model built under ``torch.device("meta")`` has no data: the error names the key."""
    with torch.device("meta"):
        t = SEModule(64)
    sd = t.state_dict()
    m = _flax("se_timm", 64, {})
    with pytest.raises(ConversionError, match=r"fc1\.weight: a meta tensor \(shape \(8, 64, 1, 1\), torch.float32\) "
                                              r"has no data") as info:
        torch_to_nnx(m, sd)
    assert len(info.value.problems) == 4                      # every meta tensor is listed, nothing is loaded
    with pytest.raises(TypeError, match=r"state_dict\['fc1.weight'\]: a meta tensor"):
        save_safetensors(sd, "/nonexistent/never-written.safetensors")
