"""A small registry of attention blocks and named presets, in the manner of timm's ``get_attn``.

Presets reproduce other implementations exactly (same arithmetic, same widths; parameter names map
through :mod:`flax_attn.convert`'s key maps). Each module made by a preset records its name in
``module.preset`` so that conversion can pick the right key map.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flax import nnx

from flax_attn.layers._functional import make_divisible
from flax_attn.layers.cbam import CBAM
from flax_attn.layers.channel_attn import ChannelAttention
from flax_attn.layers.spatial_attn import SpatialAttention
from flax_attn.layers.squeeze_excite import SqueezeExcite

AttnFactory = Callable[..., nnx.Module]


def _with_defaults(cls: type, preset: str, doc: str, **defaults: Any) -> AttnFactory:
    def factory(channels: int, *, rngs: nnx.Rngs, **kwargs: Any) -> nnx.Module:
        module = cls(channels, rngs=rngs, **{**defaults, **kwargs})
        module.preset = preset
        return module

    factory.__name__ = preset
    factory.__qualname__ = preset
    factory.__doc__ = doc + f"\n\nDefaults: ``{cls.__name__}(channels, {', '.join(f'{k}={v!r}' for k, v in defaults.items())})``; any keyword overrides them."
    return factory


def _se_mobilenetv3(channels: int, *, rngs: nnx.Rngs, **kwargs: Any) -> nnx.Module:
    """torchvision MobileNetV3's SE: ``SqueezeExcitation(C, _make_divisible(C // 4, 8), scale_activation=Hardsigmoid)``."""
    kw = dict(hidden_channels=make_divisible(channels // 4, 8), act="relu", gate="hard_sigmoid", use_bias=True)
    module = SqueezeExcite(channels, rngs=rngs, **{**kw, **kwargs})
    module.preset = "se_mobilenetv3"
    return module


def _se_efficientnet(channels: int, *, rngs: nnx.Rngs, squeeze_from: int | None = None,
                     **kwargs: Any) -> nnx.Module:
    """torchvision EfficientNet's SE: ``SqueezeExcitation(C, max(1, block_in // 4), activation=SiLU)``.

    In an MBConv block the SE runs on the expanded width ``C`` but squeezes to a quarter of the block's
    *input* width: pass ``squeeze_from=block_in`` (default ``C``) or an explicit ``hidden_channels``.
    """
    kw = dict(hidden_channels=max(1, (channels if squeeze_from is None else squeeze_from) // 4), act="silu",
              gate="sigmoid", use_bias=True)
    module = SqueezeExcite(channels, rngs=rngs, **{**kw, **kwargs})
    module.preset = "se_efficientnet"
    return module


_REGISTRY: dict[str, AttnFactory] = {
    # generic blocks, the papers' defaults
    "se": SqueezeExcite,
    "cam": ChannelAttention,
    "channel_attention": ChannelAttention,
    "sam": SpatialAttention,
    "spatial_attention": SpatialAttention,
    "cbam": CBAM,
    # presets
    "se_classic": _with_defaults(
        SqueezeExcite, "se_classic",
        "The source article's ``SELayer``: Linear(C, C // 16, bias=False), ReLU, Linear(C // 16, C, bias=False),"
        " Sigmoid. (PyTorch makes a zero-width layer for C < 16; here the width is at least 1.)",
        reduction=16, use_bias=False, act="relu", gate="sigmoid"),
    "se_torchvision": _with_defaults(
        SqueezeExcite, "se_torchvision",
        "``torchvision.ops.SqueezeExcitation(C, squeeze_channels)``: 1x1 convs with bias, ReLU, Sigmoid. "
        "torchvision has no default width: pass ``hidden_channels=squeeze_channels`` (default here C // 16).",
        reduction=16, use_bias=True, act="relu", gate="sigmoid"),
    "se_mobilenetv3": _se_mobilenetv3,
    "se_efficientnet": _se_efficientnet,
    "se_timm": _with_defaults(
        SqueezeExcite, "se_timm",
        "timm's ``SEModule``: width ``make_divisible(C / 16, 8, round_limit=0)``, 1x1 convs with bias, ReLU, "
        "Sigmoid (``add_maxpool=True`` is ``pool_types=('avg', 'max'), pool_fusion='mean'``).",
        reduction=16, divisor=8, round_limit=0.0, use_bias=True, act="relu", gate="sigmoid"),
    "cbam_timm": _with_defaults(
        CBAM, "cbam_timm",
        "timm's ``CbamModule``: width ``round(C / 16)``, bias-free 1x1 MLP, avg+max summed; spatial "
        "[mean, max] -> 7x7 conv without bias + BatchNorm (torch momentum 0.1).",
        reduction=16, divisor=1, round_limit=0.0, use_bias=False, pool_types=("avg", "max"),
        compress=("mean", "max"), kernel_size=7, use_bn=True, conv_bias=False, bn_momentum=0.9),
    "lightcbam_timm": _with_defaults(
        CBAM, "lightcbam_timm",
        "timm's ``LightCbamModule``: avg and max pools averaged before one MLP pass; spatial mean and max "
        "averaged into one map -> 7x7 conv without bias + BatchNorm.",
        reduction=16, divisor=1, round_limit=0.0, use_bias=False, pool_types=("avg", "max"),
        pool_fusion="mean", compress=("mean", "max"), compress_fusion="mean", kernel_size=7, use_bn=True,
        conv_bias=False, bn_momentum=0.9),
    "cbam_official": _with_defaults(
        CBAM, "cbam_official",
        "The official CBAM code (Jongchan/attention-module): Linear MLP with bias, width C // 16, avg+max; "
        "spatial ChannelPool [max, mean] -> 7x7 conv without bias -> BatchNorm(eps 1e-5, torch momentum 0.01).",
        reduction=16, use_bias=True, pool_types=("avg", "max"), compress=("max", "mean"), kernel_size=7,
        use_bn=True, conv_bias=False, bn_momentum=0.99, bn_eps=1e-5),
}


def list_attn() -> list[str]:
    """Names accepted by :func:`get_attn` / :func:`create_attn`."""
    return sorted(_REGISTRY)


def get_attn(name: str | AttnFactory) -> AttnFactory:
    """Returns the class or preset factory registered under ``name`` (a callable is returned as is).

    Example:
        >>> get_attn("cbam").__name__
        'CBAM'
    """
    if callable(name):
        return name
    if not isinstance(name, str):
        raise TypeError(f"attention name must be a string or a callable, got {type(name).__name__}")
    key = name.lower().replace("-", "_")
    if key not in _REGISTRY:
        raise ValueError(f"unknown attention block {name!r}: expected one of {list_attn()}")
    return _REGISTRY[key]


def create_attn(name: str | AttnFactory, channels: int, *, rngs: nnx.Rngs, **kwargs: Any) -> nnx.Module:
    """Builds the attention block ``name`` for ``channels`` channels; keywords override the defaults.

    Example:
        >>> from flax import nnx
        >>> se = create_attn("se_mobilenetv3", 72, rngs=nnx.Rngs(0))
        >>> se.hidden
        24
    """
    return get_attn(name)(channels, rngs=rngs, **kwargs)


def register_attn(name: str, factory: AttnFactory, *, overwrite: bool = False) -> None:
    """Registers a user block: ``factory(channels, *, rngs, **kwargs) -> nnx.Module``."""
    key = name.lower().replace("-", "_")
    if key in _REGISTRY and not overwrite:
        raise ValueError(f"attention block {name!r} is already registered (pass overwrite=True to replace it)")
    _REGISTRY[key] = factory
