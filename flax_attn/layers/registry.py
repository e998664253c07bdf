"""A small registry of attention blocks and named presets, in the manner of timm's ``get_attn``.

A preset is data: a named spec (:class:`Preset`), like timm's ``partial(SEModule, ...)``. It reproduces
another implementation exactly (same arithmetic, same widths; parameter names map through
:mod:`flax_attn.convert`'s key maps); the block it builds carries the preset's name in ``spec.preset``
(``module.preset``), and conversion picks the key map by it. The Linen registry
(:func:`flax_attn.linen.create_attn`) reads the same presets.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import jax.numpy as jnp
from flax import nnx

from flax_attn.layers._functional import Dtype, make_divisible
from flax_attn.layers.cbam import CBAM
from flax_attn.layers.channel_attn import ChannelAttention
from flax_attn.layers.spatial_attn import SpatialAttention
from flax_attn.layers.specs import BlockSpec, CBAMSpec, ChannelSpec, SESpec, SpatialSpec
from flax_attn.layers.squeeze_excite import SqueezeExcite

AttnFactory = Callable[..., nnx.Module]

#: what a backbone's ``attn=`` takes: a registered name, a block spec, a factory
#: ``factory(channels, *, rngs, **kwargs) -> nnx.Module``, or ``None`` (no block)
AttnSpec = str | BlockSpec | AttnFactory | None

#: the NNX block class of each spec type (called as ``block(channels, spec, *, dtype, param_dtype, rngs)``)
BLOCK_OF_SPEC: dict[type, Callable[..., nnx.Module]] = {
    SESpec: SqueezeExcite, ChannelSpec: ChannelAttention, SpatialSpec: SpatialAttention, CBAMSpec: CBAM,
}

_SPEC_TYPES = (ChannelSpec, SpatialSpec, CBAMSpec)

_T = TypeVar("_T")


def block_of(spec: BlockSpec, blocks: Mapping[type, _T]) -> _T:
    """The entry of ``blocks`` (spec type -> block class) for ``spec``, by its most specific spec type."""
    for t in type(spec).__mro__:
        if t in blocks:
            return blocks[t]
    raise TypeError(f"spec must be a ChannelSpec, SpatialSpec or CBAMSpec, got {type(spec).__name__}")


@dataclasses.dataclass(frozen=True)
class Preset:
    """A named block spec: ``spec`` with ``spec.preset == name``; ``width(channels, **kw)`` (optional) is
    the preset's own hidden-width rule where it depends on the channels in a way the spec's options do not
    express (its keyword-only arguments, e.g. ``squeeze_from``, become options of the preset).

    Calling it builds the NNX block: ``preset(channels, *, rngs, dtype=None, param_dtype=float32, **overrides)``.

    Example:
        >>> p = get_attn("se_mobilenetv3")
        >>> p.spec_for(72).hidden_channels, p.spec_for(72).gate, p.spec_for(72).preset
        (24, 'hard_sigmoid', 'se_mobilenetv3')
    """

    spec: BlockSpec
    doc: str
    width: Callable[..., int] | None = None

    @property
    def name(self) -> str:
        return str(self.spec.preset)

    def spec_for(self, channels: int, **overrides: Any) -> BlockSpec:
        """The spec for ``channels`` channels with keyword ``overrides`` of its options."""
        if self.width is not None:
            names = [p.name for p in inspect.signature(self.width).parameters.values()
                     if p.kind is inspect.Parameter.KEYWORD_ONLY]
            width_kw = {k: overrides.pop(k) for k in names if k in overrides}
            overrides = {"hidden_channels": self.width(channels, **width_kw), **overrides}
        return self.spec.replace(**overrides)

    def __call__(self, channels: int, *, rngs: nnx.Rngs, dtype: Dtype | None = None,
                 param_dtype: Dtype = jnp.float32, **overrides: Any) -> nnx.Module:
        spec = self.spec_for(channels, **overrides)
        return block_of(spec, BLOCK_OF_SPEC)(channels, spec, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def _preset(name: str, spec: BlockSpec, doc: str, width: Callable[..., int] | None = None) -> Preset:
    return Preset(spec.replace(preset=name), doc, width)


def _mobilenetv3_width(channels: int) -> int:
    return make_divisible(channels // 4, 8)  # torchvision floors C / 4 first (differs from C / 4 at C = 107)


def _efficientnet_width(channels: int, *, squeeze_from: int | None = None) -> int:
    return max(1, (channels if squeeze_from is None else squeeze_from) // 4)


_TIMM_SPATIAL = dict(compress=("mean", "max"), kernel_size=7, use_bn=True, conv_bias=False, bn_momentum=0.9)

PRESETS: tuple[Preset, ...] = (
    _preset("se_classic", SESpec(reduction=16, use_bias=False),
            "The source article's ``SELayer``: Linear(C, C // 16, bias=False), ReLU, Linear(C // 16, C, "
            "bias=False), Sigmoid. (PyTorch makes a zero-width layer for C < 16; here the width is at least 1.)"),
    _preset("se_torchvision", SESpec(reduction=16),
            "``torchvision.ops.SqueezeExcitation(C, squeeze_channels)``: 1x1 convs with bias, ReLU, Sigmoid. "
            "torchvision has no default width: pass ``hidden_channels=squeeze_channels`` (default here C // 16)."),
    _preset("se_mobilenetv3", SESpec(gate="hard_sigmoid"),
            "torchvision MobileNetV3's SE: ``SqueezeExcitation(C, _make_divisible(C // 4, 8), "
            "scale_activation=Hardsigmoid)``.", _mobilenetv3_width),
    _preset("se_efficientnet", SESpec(act="silu"),
            "torchvision EfficientNet's SE: ``SqueezeExcitation(C, max(1, block_in // 4), activation=SiLU)``. "
            "In an MBConv block the SE runs on the expanded width ``C`` but squeezes to a quarter of the "
            "block's *input* width: pass ``squeeze_from=block_in`` (default ``C``) or ``hidden_channels``.",
            _efficientnet_width),
    _preset("se_timm", SESpec(reduction=16, divisor=8, round_limit=0.0),
            "timm's ``SEModule``: width ``make_divisible(C / 16, 8, round_limit=0)``, 1x1 convs with bias, "
            "ReLU, Sigmoid (``add_maxpool=True`` is ``pool_types=('avg', 'max'), pool_fusion='mean'``)."),
    _preset("cbam_timm", CBAMSpec.from_options(reduction=16, divisor=1, round_limit=0.0, use_bias=False,
                                               pool_types=("avg", "max"), **_TIMM_SPATIAL),
            "timm's ``CbamModule``: width ``round(C / 16)``, bias-free 1x1 MLP, avg+max summed; spatial "
            "[mean, max] -> 7x7 conv without bias + BatchNorm (torch momentum 0.1)."),
    _preset("lightcbam_timm", CBAMSpec.from_options(reduction=16, divisor=1, round_limit=0.0, use_bias=False,
                                                    pool_types=("avg", "max"), pool_fusion="mean",
                                                    compress_fusion="mean", **_TIMM_SPATIAL),
            "timm's ``LightCbamModule``: avg and max pools averaged before one MLP pass; spatial mean and max "
            "averaged into one map -> 7x7 conv without bias + BatchNorm."),
    _preset("cbam_official", CBAMSpec.from_options(reduction=16, pool_types=("avg", "max"), compress=("max", "mean"),
                                                   kernel_size=7, use_bn=True, conv_bias=False, bn_momentum=0.99),
            "The official CBAM code (Jongchan/attention-module): Linear MLP with bias, width C // 16, avg+max; "
            "spatial ChannelPool [max, mean] -> 7x7 conv without bias -> BatchNorm(eps 1e-5, torch momentum "
            "0.01)."),
)

_REGISTRY: dict[str, AttnFactory] = {
    # generic blocks, the papers' defaults
    "se": SqueezeExcite,
    "cam": ChannelAttention,
    "channel_attention": ChannelAttention,
    "sam": SpatialAttention,
    "spatial_attention": SpatialAttention,
    "cbam": CBAM,
    **{p.name: p for p in PRESETS},
}


def _key(name: str) -> str:
    return name.lower().replace("-", "_")


def list_attn() -> list[str]:
    """Names accepted by :func:`get_attn` / :func:`create_attn`."""
    return sorted(_REGISTRY)


def get_attn(name: str | AttnFactory) -> AttnFactory:
    """The block class or :class:`Preset` registered under ``name`` (a callable is returned as is).

    Example:
        >>> get_attn("cbam").__name__, get_attn("cbam_official").spec.spatial.compress
        ('CBAM', ('max', 'mean'))
    """
    if callable(name):
        return name
    if not isinstance(name, str):
        raise TypeError(f"attention name must be a string or a callable, got {type(name).__name__}")
    key = _key(name)
    if key not in _REGISTRY:
        raise ValueError(f"unknown attention block {name!r}: expected one of {list_attn()}")
    return _REGISTRY[key]


def create_attn(name: str | BlockSpec | AttnFactory, channels: int, *, rngs: nnx.Rngs, **kwargs: Any) -> nnx.Module:
    """Builds the attention block ``name`` (a registered name, a block spec or a factory) for ``channels``
    channels; keywords override the defaults (``dtype``/``param_dtype`` go to the block).

    Example:
        >>> from flax import nnx
        >>> se = create_attn("se_mobilenetv3", 72, rngs=nnx.Rngs(0))
        >>> se.hidden, se.preset
        (24, 'se_mobilenetv3')
    """
    if isinstance(name, _SPEC_TYPES):
        return block_of(name, BLOCK_OF_SPEC)(channels, name, rngs=rngs, **kwargs)
    return get_attn(name)(channels, rngs=rngs, **kwargs)


def register_attn(name: str, factory: AttnFactory | BlockSpec, *, overwrite: bool = False) -> None:
    """Registers a user block: a block spec (a preset of that name, also available in Linen) or a factory
    ``factory(channels, *, rngs, **kwargs) -> nnx.Module``.

    Example (not run as a doctest: registering is global)::

        register_attn("se_r8", SESpec(reduction=8))      # a preset: create_attn("se_r8", C, rngs=...) in NNX,
        get_attn("se_r8").spec.preset                     # flax_attn.linen.create_attn("se_r8", C) in Linen
    """
    key = _key(name)
    if key in _REGISTRY and not overwrite:
        raise ValueError(f"attention block {name!r} is already registered (pass overwrite=True to replace it)")
    if isinstance(factory, _SPEC_TYPES):
        factory = _preset(key, factory, f"User preset {key!r}.")
    elif not callable(factory):
        raise TypeError(f"factory must be a block spec or a callable, got {type(factory).__name__}")
    _REGISTRY[key] = factory
