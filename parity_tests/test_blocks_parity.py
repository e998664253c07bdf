"""Parity of the Flax attention blocks with PyTorch on identical weights.

Every case: random torch weights and random BatchNorm statistics (never the default init), transferred
with ``flax_attn.convert.torch_to_nnx``; a random channels-first input (no zeros, no ties in ``max``) and
a random cotangent; then

* outputs: ``rel_err <= 1e-5`` (float32, JAX "highest" matmul precision, torch TF32 off);
* gradients of ``sum(y * cotangent)`` w.r.t. the input and w.r.t. EVERY parameter (the torch parameter
  gradients are mapped into Flax's layout through the same conversion): ``rel_err <= 1e-5``;
* the whole state after the step (``nnx_to_numpy`` vs torch ``state_dict``): parameters unchanged,
  BatchNorm running mean / variance equal to ``1e-5`` and ``num_batches_tracked`` identical; blocks
  with BatchNorm run in both eval and train mode (the modes differ only there).

References: ``torch_ref.blocks`` for the generic blocks (grid below); for the presets, their external
twins: the article's ``SELayer``, the official CBAM code, ``torchvision.ops.SqueezeExcitation`` taken
out of torchvision's own MobileNetV3 / EfficientNet-B0 (so widths and gates are torchvision's), and
timm's ``SEModule`` / ``CbamModule`` / ``LightCbamModule``.

Runtime: Flax modules are built abstractly (``build_flax``: no initialiser compiles) and one jitted
value-and-grad function is shared by all cases (it retraces once per block configuration and shape).
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import torch_ref
from flax_attn.convert import nnx_to_numpy, torch_to_nnx
from flax_attn.layers import CBAM, ChannelAttention, SpatialAttention, SqueezeExcite, create_attn
from parity_tests._utils import (
    assert_close,
    build_flax,
    random_input,
    randomize_module_,
    rel_err,
    to_channels_first,
    to_channels_last,
)

TOL = 1e-5

FLAX_BLOCKS = {"se": SqueezeExcite, "cam": ChannelAttention, "sam": SpatialAttention, "cbam": CBAM}
TORCH_BLOCKS = {"se": torch_ref.SqueezeExcite, "cam": torch_ref.ChannelAttention,
                "sam": torch_ref.SpatialAttention, "cbam": torch_ref.CBAM}


# ---------------------------------------------------------------------------------------------------
# the check
# ---------------------------------------------------------------------------------------------------


def _loss(module, x, cot):
    y = module(x)
    return jnp.sum(y.astype(jnp.float32) * cot), y


_value_and_grad = nnx.jit(nnx.value_and_grad(_loss, argnums=(0, 1), has_aux=True))


def _flat_params(state: Any) -> dict[str, np.ndarray]:
    return {".".join(map(str, path)): np.asarray(v[...]) for path, v in nnx.to_flat_state(state)}


def _torch_step(torch_m: torch.nn.Module, x: torch.Tensor, cot: torch.Tensor):
    """Forward + backward of ``sum(y * cot)``: output, input gradient, parameter gradients, state after."""
    x_t = x.clone().requires_grad_(True)
    y_t = torch_m(x_t)
    (y_t * cot).sum().backward()
    grads = {}
    for name, p in torch_m.named_parameters():
        assert p.grad is not None, f"torch parameter {name} got no gradient"
        grads[name] = p.grad
    state = {k: v.detach().clone() for k, v in torch_m.state_dict().items()}
    return y_t.detach(), x_t.grad, grads, state


def _grads_in_flax_layout(flax_m: nnx.Module, grads: dict, state: dict, key_map: Any) -> dict[str, np.ndarray]:
    """Torch parameter gradients mapped to Flax paths/layout by the weight conversion itself."""
    sd = {**state, **grads}  # statistics ride along so that strict loading passes; Params get the grads
    mapped = torch_to_nnx(nnx.clone(flax_m), sd, key_map=key_map, cast=True)
    return _flat_params(nnx.state(mapped, nnx.Param))


ILL_CONDITIONED_TOL = 1e-4


class _Comparator:
    """The float32 comparison rule: ``rel_err(flax, torch_f32) <= tol`` (1e-5).

    Where that fails, a float64 run of the torch twin decides. Some quantities are sums that cancel: a
    BatchNorm scale/bias or conv-bias gradient is ONE number summed over every position of the batch (on
    small maps measured condition numbers sum|t| / |sum t| run from ~100 to 2600), so no float32
    computation, PyTorch's included, reproduces it to 1e-5. Such a quantity is recognised by PyTorch's own
    float32 result being off the float64 value by more than ``tol / 10`` (100 float32 ulps); for it, Flax
    must be within ``ILL_CONDITIONED_TOL`` = 1e-4 of float64. A well-conditioned quantity (torch float32
    within ``tol / 10`` of float64) gets no such allowance: the comparison fails.
    """

    def __init__(self, tol: float, reference64):
        self.tol = tol
        self._reference64 = reference64  # () -> dict of float64 results, computed on first need
        self._ref64 = None

    def __call__(self, key: str, got: Any, ref32: Any, what: str) -> None:
        err = rel_err(got, ref32)
        if err <= self.tol:
            return
        if self._ref64 is None:
            self._ref64 = self._reference64()
        ref64 = self._ref64[key]
        e_flax, e_torch = rel_err(got, ref64), rel_err(ref32, ref64)
        ill_conditioned = e_torch > self.tol / 10
        assert ill_conditioned and e_flax <= ILL_CONDITIONED_TOL, (
            f"{what}: rel err vs torch float32 {err:.3e} > {self.tol:.0e}; vs torch float64 {e_flax:.3e} "
            f"(torch float32 vs float64: {e_torch:.3e}, "
            f"{'ill' if ill_conditioned else 'well'}-conditioned)")


def check_parity(flax_m: nnx.Module, torch_m: torch.nn.Module, shape: tuple[int, ...], *, train: bool,
                 key_map: Any = None, seed: int = 0, tol: float = TOL, param_grads: bool = True) -> None:
    """Loads random torch weights into ``flax_m`` and compares output, input and parameter gradients
    (``param_grads=False``: output and input gradient only), and the state after one step (BatchNorm
    statistics) in the given mode."""
    randomize_module_(torch_m, seed=seed)
    torch_to_nnx(flax_m, torch_m.state_dict(), key_map=key_map)
    torch_m.train(train)
    if train:
        flax_m.train()
    else:
        flax_m.eval()
    torch_m64 = copy.deepcopy(torch_m).double()  # float64 twin, run only if a float32 comparison fails

    x = random_input(shape, seed=seed + 1)
    cot = random_input(shape, seed=seed + 2)  # every block keeps its input's shape
    y_t, gx_t, grads_t, state_t = _torch_step(torch_m, x, cot)

    (_, y), (g_params, g_x) = _value_and_grad(
        flax_m, jnp.asarray(to_channels_last(x)), jnp.asarray(to_channels_last(cot)))

    def reference64():
        y64, gx64, grads64, state64 = _torch_step(torch_m64, x.double(), cot.double())
        out = {"y": y64, "gx": gx64}
        out.update({f"param:{k}": v for k, v in _grads_in_flax_layout(flax_m, grads64, state64, key_map).items()})
        out.update({f"state:{k}": v for k, v in state64.items()})
        return out

    close = _Comparator(tol, reference64)
    close("y", to_channels_first(y), y_t, "output")
    close("gx", to_channels_first(g_x), gx_t, "grad wrt input")

    # parameter gradients: torch's, mapped to the Flax layout by the same conversion as the weights
    want = _grads_in_flax_layout(flax_m, grads_t, state_t, key_map)
    got = _flat_params(g_params)
    assert sorted(got) == sorted(want), f"parameter sets differ: {sorted(got)} vs {sorted(want)}"
    for name in want if param_grads else ():
        close(f"param:{name}", got[name], want[name], f"grad wrt {name}")

    # the state after the step: parameters untouched, BatchNorm statistics updated identically (train)
    sd_flax = nnx_to_numpy(flax_m, key_map=key_map)
    assert sorted(sd_flax) == sorted(state_t)
    for k, ref in state_t.items():
        if k.endswith("num_batches_tracked"):
            assert int(sd_flax[k]) == int(ref), f"{k}: {int(sd_flax[k])} != {int(ref)}"
        else:
            close(f"state:{k}", sd_flax[k], ref, f"state {k} after the step")


def _has_bn(kwargs: dict) -> bool:
    return bool(kwargs.get("use_bn"))


# ---------------------------------------------------------------------------------------------------
# generic blocks vs torch_ref.blocks: the grid
# ---------------------------------------------------------------------------------------------------
# (block, kwargs, NCHW-style shape). spatial_dims of SAM/CBAM follows the shape. Each option appears in at
# least one case; the key crossings (pools x fusion, compress x fusion, BN x arrangement, rank x block)
# are covered; shapes mix H != W, odd sizes, 1x1 maps, batch 1 and batch > 1.

GRID: list[tuple[str, str, dict, tuple[int, ...]]] = [
    # --- Squeeze-and-Excitation
    ("se-default-r16", "se", {}, (2, 32, 5, 7)),
    ("se-r5-not-divisible", "se", {"reduction": 5}, (1, 24, 3, 3)),
    ("se-hidden-nobias-silu-hsig-1x1", "se", {"hidden_channels": 6, "use_bias": False, "act": "silu",
                                              "gate": "hard_sigmoid"}, (3, 20, 1, 1)),
    ("se-tv-divisor-gelu", "se", {"reduction": 4, "divisor": 8, "round_limit": 0.9, "act": "gelu"}, (2, 40, 4, 3)),
    ("se-timm-divisor-hswish", "se", {"reduction": 16, "divisor": 8, "act": "hard_swish"}, (2, 48, 3, 5)),
    ("se-avgmax-mean-1d", "se", {"reduction": 4, "pool_types": ("avg", "max"), "pool_fusion": "mean"}, (2, 16, 9)),
    ("se-3d-silu", "se", {"reduction": 4, "act": "silu"}, (2, 16, 3, 4, 5)),
    ("se-min-hidden", "se", {"reduction": 16, "min_hidden": 3}, (2, 8, 5, 5)),
    ("se-gate-tanh-act-identity", "se", {"reduction": 2, "act": "identity", "gate": "tanh"}, (2, 8, 3, 2)),
    # --- Channel attention: pools, fusion, widths, activations, ranks
    ("cam-avg", "cam", {"reduction": 4, "pool_types": ("avg",)}, (2, 16, 5, 7)),
    ("cam-max", "cam", {"reduction": 4, "pool_types": ("max",)}, (2, 16, 5, 7)),
    ("cam-lp", "cam", {"reduction": 4, "pool_types": ("lp",)}, (2, 16, 5, 7)),
    ("cam-lse", "cam", {"reduction": 4, "pool_types": ("lse",)}, (2, 16, 5, 7)),
    ("cam-avgmax-default", "cam", {}, (2, 32, 7, 5)),
    ("cam-all4-sum", "cam", {"reduction": 3, "pool_types": ("avg", "max", "lp", "lse")}, (2, 17, 3, 5)),
    ("cam-maxlse-mean", "cam", {"reduction": 4, "pool_types": ("max", "lse"), "pool_fusion": "mean"}, (1, 16, 4, 6)),
    ("cam-all4-mean", "cam", {"reduction": 4, "pool_types": ("avg", "max", "lp", "lse"), "pool_fusion": "mean"},
     (2, 12, 3, 3)),
    ("cam-lplse-nobias-1x1", "cam", {"reduction": 2, "pool_types": ("lp", "lse"), "use_bias": False}, (3, 8, 1, 1)),
    ("cam-leaky-relu6", "cam", {"reduction": 4, "act": "leaky_relu"}, (2, 16, 3, 4)),
    ("cam-relu6", "cam", {"hidden_channels": 5, "act": "relu6"}, (2, 16, 3, 4)),
    ("cam-gelu-tanh-hsig", "cam", {"reduction": 4, "act": "gelu_tanh", "gate": "hard_sigmoid"}, (2, 16, 3, 4)),
    ("cam-1d", "cam", {"reduction": 3, "pool_types": ("avg", "max", "lp")}, (2, 12, 11)),
    ("cam-3d-lse", "cam", {"reduction": 4, "pool_types": ("lp", "lse")}, (1, 16, 3, 2, 5)),
    ("cam-divisor-timm", "cam", {"reduction": 16, "divisor": 1}, (2, 40, 3, 3)),
    # --- Spatial attention: kernels, compress orders/fusion/conv, BN, bias, gates, ranks
    ("sam-k7-meanmax", "sam", {"kernel_size": 7}, (2, 16, 5, 7)),
    ("sam-k3-maxmean", "sam", {"kernel_size": 3, "compress": ("max", "mean")}, (2, 16, 5, 7)),
    ("sam-k1-max-only", "sam", {"kernel_size": 1, "compress": ("max",)}, (2, 16, 4, 3)),
    ("sam-k3-mean-only", "sam", {"kernel_size": 3, "compress": ("mean",)}, (1, 16, 5, 5)),
    ("sam-k7-fusion-mean", "sam", {"kernel_size": 7, "compress_fusion": "mean"}, (2, 16, 3, 5)),
    ("sam-conv-compress", "sam", {"kernel_size": 3, "compress": "conv"}, (2, 16, 5, 4)),
    ("sam-conv-compress-3", "sam", {"kernel_size": 5, "compress": "conv", "compress_channels": 3, "use_bn": True},
     (2, 16, 5, 4)),
    ("sam-bn-k7", "sam", {"kernel_size": 7, "use_bn": True}, (2, 16, 5, 7)),
    ("sam-bn-momentum-eps", "sam", {"kernel_size": 3, "use_bn": True, "bn_momentum": 0.99, "bn_eps": 1e-3},
     (3, 16, 1, 1)),
    ("sam-nobias-nobn", "sam", {"kernel_size": 3, "conv_bias": False}, (2, 16, 3, 3)),
    ("sam-hsig-gate", "sam", {"kernel_size": 3, "gate": "hard_sigmoid"}, (2, 16, 4, 5)),
    ("sam-1d-bn", "sam", {"kernel_size": 5, "use_bn": True}, (2, 16, 9)),
    ("sam-3d-bn", "sam", {"kernel_size": 3, "use_bn": True, "compress": ("max", "mean")}, (2, 16, 3, 4, 5)),
    ("sam-k7-on-1x1", "sam", {"kernel_size": 7}, (1, 16, 1, 1)),
    # --- CBAM: arrangements x BN, no_spatial, gates, ranks, light variants
    ("cbam-channel-first-bn", "cbam", {"reduction": 4, "use_bn": True}, (2, 16, 5, 7)),
    ("cbam-spatial-first-bn", "cbam", {"reduction": 4, "use_bn": True, "arrangement": "spatial_first"}, (2, 16, 5, 7)),
    ("cbam-parallel-bn", "cbam", {"reduction": 4, "use_bn": True, "arrangement": "parallel"}, (2, 16, 5, 7)),
    ("cbam-parallel-add-bn", "cbam", {"reduction": 4, "use_bn": True, "arrangement": "parallel_add"}, (2, 16, 5, 7)),
    ("cbam-spatial-first-conv", "cbam", {"reduction": 4, "compress": "conv", "arrangement": "spatial_first",
                                         "pool_types": ("avg", "lp")}, (2, 16, 4, 3)),
    ("cbam-no-spatial", "cbam", {"reduction": 4, "no_spatial": True, "pool_types": ("avg", "max", "lse")},
     (2, 16, 5, 3)),
    ("cbam-spatial-gate", "cbam", {"reduction": 4, "spatial_gate": "hard_sigmoid", "kernel_size": 3}, (1, 16, 3, 5)),
    ("cbam-light", "cbam", {"reduction": 4, "pool_fusion": "mean", "compress_fusion": "mean", "use_bn": True,
                            "use_bias": False}, (2, 16, 5, 5)),
    ("cbam-bn-conv-bias", "cbam", {"reduction": 4, "use_bn": True, "conv_bias": True, "kernel_size": 3,
                                   "compress": ("max", "mean")}, (2, 16, 3, 4)),
    ("cbam-1d-conv-compress", "cbam", {"reduction": 4, "compress": "conv", "kernel_size": 5, "use_bn": True},
     (2, 16, 10)),
    ("cbam-3d-bn", "cbam", {"reduction": 4, "kernel_size": 3, "use_bn": True, "pool_types": ("max", "lp")},
     (2, 16, 3, 3, 4)),
    ("cbam-1x1-batch3", "cbam", {"reduction": 8, "use_bn": True, "kernel_size": 3}, (3, 24, 1, 1)),
    ("cbam-silu-gelu", "cbam", {"reduction": 4, "act": "gelu", "kernel_size": 1}, (2, 16, 4, 4)),
]


def _grid_params():
    params = []
    for case_id, block, kwargs, shape in GRID:
        modes = ["eval"]
        # train differs from eval only through BatchNorm. A conv bias in front of a train-mode BatchNorm
        # has an exactly zero gradient (the batch mean removes it): both sides return float noise there,
        # which no relative error can compare, so that case runs in eval mode, where the bias matters.
        if _has_bn(kwargs) and not kwargs.get("conv_bias"):
            modes.append("train")
        for mode in modes:
            params.append(pytest.param(block, kwargs, shape, mode, id=f"{case_id}-{mode}"))
    return params


def _make_pair(block: str, kwargs: dict, shape: tuple[int, ...]):
    channels = shape[1]
    kw = dict(kwargs)
    if block in ("sam", "cbam"):
        kw["spatial_dims"] = len(shape) - 2
    torch_m = TORCH_BLOCKS[block](channels, **kw)
    flax_m = build_flax(lambda: FLAX_BLOCKS[block](channels, rngs=nnx.Rngs(0), **kw))
    return flax_m, torch_m


@pytest.mark.parametrize("block,kwargs,shape,mode", _grid_params())
def test_generic_block_parity(block, kwargs, shape, mode):
    flax_m, torch_m = _make_pair(block, kwargs, shape)
    check_parity(flax_m, torch_m, shape, train=(mode == "train"), seed=len(shape) + shape[1])


def test_widths_match_torch_ref():
    """torch_ref re-implements the width rules independently; they agree with Flax on a sweep."""
    for channels in (1, 7, 8, 16, 24, 40, 72, 100, 120, 480, 960):
        for kw in ({"reduction": 16}, {"reduction": 4, "divisor": 8, "round_limit": 0.9},
                   {"reduction": 16, "divisor": 8}, {"reduction": 16, "divisor": 1}, {"reduction": 3, "min_hidden": 4},
                   {"reduction": 16, "divisor": 8, "min_hidden": 16}):
            t = torch_ref.hidden_width(channels, **kw)
            f = nnx.eval_shape(lambda: ChannelAttention(channels, rngs=nnx.Rngs(0), **kw)).hidden
            assert t == f, (channels, kw, t, f)


# ---------------------------------------------------------------------------------------------------
# shapes as a property (hypothesis): CBAM with BN in eval mode, any N, any map size incl. 1x1
# ---------------------------------------------------------------------------------------------------

@functools.cache
def _cbam_pair(spatial_dims: int):
    kw = {"reduction": 4, "use_bn": True, "kernel_size": 3, "pool_types": ("avg", "max", "lse"),
          "spatial_dims": spatial_dims}
    return kw


@settings(max_examples=8, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 3), spatial=st.lists(st.integers(1, 6), min_size=1, max_size=3))
def test_property_cbam_parity_any_shape(n, spatial):
    """Output and input gradient match for any batch and map size (1-D to 3-D, 1x1 included).

    Parameter gradients are sums over all positions; on the tiny maps drawn here they can cancel badly
    (measured: ``d/d spatial.bn.scale`` on a (2, 8, 6, 1, 1) input sums 12 terms of size ~0.02 to 9e-5, a
    condition number of 2600, so any float32 result, torch's included, is off by ~3e-5 from float64).
    The grid above checks parameter gradients on fixed, reasonably conditioned draws; here the
    elementwise quantities are compared."""
    kw = _cbam_pair(len(spatial))
    torch_m = torch_ref.CBAM(8, **kw)
    flax_m = build_flax(lambda: CBAM(8, rngs=nnx.Rngs(0), **kw))
    check_parity(flax_m, torch_m, (n, 8, *spatial), train=False, seed=n + 10 * len(spatial), param_grads=False)


# ---------------------------------------------------------------------------------------------------
# presets vs their external twins
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels,shape", [(16, (2, 5, 7)), (48, (1, 3, 3)), (32, (3, 1, 1))])
def test_se_classic_vs_article_selayer(channels, shape):
    torch_m = torch_ref.SELayer(channels)
    flax_m = build_flax(lambda: create_attn("se_classic", channels, rngs=nnx.Rngs(0)))
    assert flax_m.preset == "se_classic" and flax_m.hidden == channels // 16
    check_parity(flax_m, torch_m, (shape[0], channels, *shape[1:]), train=False, seed=channels)


OFFICIAL_POOLS = [("avg",), ("max",), ("lp",), ("lse",), ("avg", "max"), ("avg", "max", "lp", "lse")]


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("pool_types", OFFICIAL_POOLS, ids="+".join)
def test_cbam_official_vs_official_code(pool_types, mode):
    channels = 32
    torch_m = torch_ref.OfficialCBAM(channels, 16, pool_types=list(pool_types))
    flax_m = build_flax(lambda: create_attn("cbam_official", channels, rngs=nnx.Rngs(0), pool_types=pool_types))
    check_parity(flax_m, torch_m, (2, channels, 5, 7), train=(mode == "train"), seed=len(pool_types))


@pytest.mark.parametrize("shape", [(1, 48, 4, 3), (3, 48, 1, 1)])
def test_cbam_official_no_spatial(shape):
    torch_m = torch_ref.OfficialCBAM(48, 16, no_spatial=True)
    flax_m = build_flax(lambda: create_attn("cbam_official", 48, rngs=nnx.Rngs(0), no_spatial=True))
    check_parity(flax_m, torch_m, shape, train=False, seed=shape[0])


@functools.cache
def _torchvision_se_modules(arch: str) -> list[tuple[int, torch.nn.Module]]:
    """(block input channels, SqueezeExcitation) pairs from torchvision's own randomly initialised model."""
    import torchvision
    from torchvision.ops import SqueezeExcitation

    model = getattr(torchvision.models, arch)(weights=None)
    pairs = []
    for block in model.modules():
        inner = getattr(block, "block", None)  # MobileNetV3 InvertedResidual / EfficientNet MBConv
        if not isinstance(inner, torch.nn.Sequential):
            continue
        ses = [m for m in inner if isinstance(m, SqueezeExcitation)]
        if ses:
            block_in = inner[0][0].in_channels  # first Conv2dNormActivation's conv
            pairs.append((block_in, ses[0]))
    return pairs


def _tv_se(arch: str, channels: int) -> tuple[int, torch.nn.Module]:
    for block_in, se in _torchvision_se_modules(arch):
        if se.fc1.in_channels == channels:
            return block_in, se
    raise AssertionError(f"no SqueezeExcitation with {channels} channels in torchvision {arch}")


@pytest.mark.parametrize("arch,channels", [("mobilenet_v3_small", 16), ("mobilenet_v3_large", 72),
                                           ("mobilenet_v3_large", 120), ("mobilenet_v3_large", 480),
                                           ("mobilenet_v3_large", 960)])
def test_se_mobilenetv3_vs_torchvision(arch, channels):
    _, se_t = _tv_se(arch, channels)
    assert isinstance(se_t.scale_activation, torch.nn.Hardsigmoid)
    flax_m = build_flax(lambda: create_attn("se_mobilenetv3", channels, rngs=nnx.Rngs(0)))
    assert flax_m.hidden == se_t.fc1.out_channels  # torchvision's _make_divisible(C // 4, 8)
    check_parity(flax_m, se_t, (2, channels, 3, 5), train=False, seed=channels)


@pytest.mark.parametrize("expanded", [32, 96, 240, 672])
def test_se_efficientnet_vs_torchvision(expanded):
    block_in, se_t = _tv_se("efficientnet_b0", expanded)
    assert isinstance(se_t.activation, torch.nn.SiLU)
    flax_m = build_flax(lambda: create_attn("se_efficientnet", expanded, squeeze_from=block_in, rngs=nnx.Rngs(0)))
    assert flax_m.hidden == se_t.fc1.out_channels  # max(1, block_in // 4)
    check_parity(flax_m, se_t, (2, expanded, 4, 3), train=False, seed=expanded)


@pytest.mark.parametrize("channels,squeeze", [(32, 8), (40, 10), (24, 24)])
def test_se_torchvision_vs_squeeze_excitation(channels, squeeze):
    from torchvision.ops import SqueezeExcitation

    torch_m = SqueezeExcitation(channels, squeeze)
    flax_m = build_flax(lambda: create_attn("se_torchvision", channels, hidden_channels=squeeze, rngs=nnx.Rngs(0)))
    check_parity(flax_m, torch_m, (2, channels, 5, 3), train=False, seed=channels)


@pytest.mark.parametrize("channels,add_maxpool", [(32, False), (48, False), (24, True)])
def test_se_timm_vs_semodule(channels, add_maxpool):
    from timm.layers import SEModule

    torch_m = SEModule(channels, add_maxpool=add_maxpool)
    extra = {"pool_types": ("avg", "max"), "pool_fusion": "mean"} if add_maxpool else {}
    flax_m = build_flax(lambda: create_attn("se_timm", channels, rngs=nnx.Rngs(0), **extra))
    assert flax_m.hidden == torch_m.fc1.out_channels
    check_parity(flax_m, torch_m, (2, channels, 5, 6), train=False, seed=channels)


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("channels,shape", [(32, (2, 5, 7)), (40, (3, 1, 1))])
def test_cbam_timm_vs_cbammodule(channels, shape, mode):
    from timm.layers.cbam import CbamModule

    torch_m = CbamModule(channels)
    flax_m = build_flax(lambda: create_attn("cbam_timm", channels, rngs=nnx.Rngs(0)))
    assert flax_m.channel.hidden == torch_m.channel.fc1.out_channels
    check_parity(flax_m, torch_m, (shape[0], channels, *shape[1:]), train=(mode == "train"), seed=channels)


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("channels,shape", [(32, (2, 5, 7)), (24, (1, 3, 4))])
def test_lightcbam_timm_vs_lightcbammodule(channels, shape, mode):
    from timm.layers.cbam import LightCbamModule

    torch_m = LightCbamModule(channels)
    flax_m = build_flax(lambda: create_attn("lightcbam_timm", channels, rngs=nnx.Rngs(0)))
    assert flax_m.channel.hidden == torch_m.channel.fc1.out_channels
    check_parity(flax_m, torch_m, (shape[0], channels, *shape[1:]), train=(mode == "train"), seed=channels)


# ---------------------------------------------------------------------------------------------------
# bf16 compute with f32 parameters
# ---------------------------------------------------------------------------------------------------

# bfloat16 keeps 8 significant bits: one rounding has relative error <= 2**-8 = 3.9e-3. The block
# rounds the input, the pooled vectors, the MLP/conv outputs, the gates and the products: a few
# roundings in sequence, each partly averaged out over the tensor. 2e-2 (about 5 ulps) bounds that with
# margin while still catching a wrong formula (those give errors of order 1e-1 and more).
BF16_TOL = 2e-2


@pytest.mark.parametrize("block,kwargs", [("se", {"reduction": 4}), ("cam", {"reduction": 4}),
                                          ("sam", {"kernel_size": 7, "use_bn": True}),
                                          ("cbam", {"reduction": 4, "use_bn": True})])
def test_bf16_compute_close_to_f32(block, kwargs):
    shape = (2, 16, 5, 7)
    kw = dict(kwargs)
    if block in ("sam", "cbam"):
        kw["spatial_dims"] = 2
    torch_m = randomize_module_(TORCH_BLOCKS[block](16, **kw), seed=3).eval()
    flax_m = build_flax(lambda: FLAX_BLOCKS[block](16, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, **kw))
    torch_to_nnx(flax_m, torch_m.state_dict())
    flax_m.eval()
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(nnx.state(flax_m, nnx.Param)))
    x16 = jnp.asarray(to_channels_last(random_input(shape, seed=4))).astype(jnp.bfloat16)
    y16 = nnx.jit(lambda m, x: m(x))(flax_m, x16)
    assert y16.dtype == jnp.bfloat16
    # reference: float32 torch on the same (bf16-representable) input, so only the compute differs
    x32 = torch.from_numpy(to_channels_first(np.asarray(x16.astype(jnp.float32))).copy())
    with torch.no_grad():
        ref = torch_m(x32)
    err = rel_err(to_channels_first(np.asarray(y16.astype(jnp.float32))), ref)
    assert err <= BF16_TOL, f"bf16 rel err {err:.2e} > {BF16_TOL}"
    assert err > 0  # it really computed in bf16
