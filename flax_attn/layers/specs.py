"""Block options as data: one frozen spec per block family, shared by the NNX blocks and their Linen twins.

A spec owns everything about a block's options: their names, types and defaults (its fields), their
validation and normalisation (``pool_types``, ``compress``), and the values derived from them (hidden
width, conv input width, resolved activations). The NNX blocks (:mod:`flax_attn.layers`) and the Linen
twins (:mod:`flax_attn.linen`) both build one and keep it as ``module.spec``; their keyword options are
generated from the spec's fields, so an option is declared exactly once, here.

Presets are named specs (:data:`flax_attn.layers.registry`): ``CBAMSpec.from_options(...)`` with
``preset="cbam_official"``, the name conversion uses to pick the key map of the PyTorch twin.

Example:
    >>> from flax_attn.layers.specs import CBAMSpec, ChannelSpec
    >>> ChannelSpec(reduction=4, pool_types="max").hidden(64), ChannelSpec(pool_types="max").pool_types
    (16, ('max',))
    >>> spec = CBAMSpec.from_options(reduction=8, kernel_size=3, arrangement="parallel")
    >>> spec.channel.reduction, spec.spatial.kernel_size, spec.spatial.conv_in
    (8, 3, 2)
"""

import dataclasses
import inspect
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import jax

from flax_attn.layers import _functional as F
from flax_attn.layers._functional import ActivationLike

POOL_FUSIONS: tuple[str, ...] = ("sum", "mean")
COMPRESS_FUSIONS: tuple[str, ...] = ("concat", "mean")
ARRANGEMENTS: tuple[str, ...] = ("channel_first", "spatial_first", "parallel", "parallel_add")

_S = TypeVar("_S", bound="_Spec")


def check_choice(value: Any, choices: Sequence[str], argname: str) -> str:
    """``value`` if it is one of ``choices``, else a ValueError naming ``argname``."""
    if value not in choices:
        raise ValueError(f"unknown {argname} {value!r}: expected one of {tuple(choices)}")
    return value


def check_channels(channels: Any) -> int:
    """``channels`` if it is a positive int, else a ValueError."""
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
        raise ValueError(f"channels must be a positive int, got {channels!r}")
    return channels


class _Spec:
    """Shared behaviour of the specs: the flat keyword options, their round trip and overrides."""

    @classmethod
    def options(cls) -> tuple[inspect.Parameter, ...]:
        """The block's keyword options (name, type, default), in signature order."""
        return tuple(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default,
                                       annotation=f.type) for f in dataclasses.fields(cls))  # type: ignore[arg-type]

    @classmethod
    def from_options(cls: type[_S], **options: Any) -> _S:
        """The spec of the flat keyword options (as a block's constructor takes them)."""
        _check_known(cls, options)
        return cls(**options)

    def to_options(self) -> dict[str, Any]:
        """The flat keyword options that rebuild this spec: ``type(s).from_options(**s.to_options()) == s``."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    def replace(self: _S, **overrides: Any) -> _S:
        """A copy with some flat options changed (validated again); unknown names raise a TypeError."""
        return type(self).from_options(**{**self.to_options(), **overrides}) if overrides else self

    @classmethod
    def build(cls: type[_S], spec: "_Spec | None" = None, **options: Any) -> _S:
        """``spec`` (default: this class's defaults) with ``options`` applied, type-checked."""
        if spec is None:
            return cls.from_options(**options)
        if not isinstance(spec, cls):
            raise TypeError(f"spec must be a {cls.__name__}, got {type(spec).__name__}")
        return spec.replace(**options)


def _check_known(cls: type, options: dict[str, Any]) -> None:
    names = [p.name for p in cls.options()]  # type: ignore[attr-defined]
    unknown = sorted(set(options) - set(names))
    if unknown:
        raise TypeError(f"unknown option(s) {unknown} for {cls.__name__}: expected some of {names}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ChannelSpec(_Spec):
    """Options of CBAM's channel attention (:class:`flax_attn.layers.ChannelAttention`).

    ``hidden(C)`` is the MLP width: ``hidden_channels`` if given, else ``max(min_hidden, C // reduction)``
    (``divisor=None``) or ``make_divisible(C / reduction, divisor, round_limit)``. ``pool_types`` is
    normalised to a tuple (``"mean"`` means ``"avg"``); ``act``/``gate`` are names or callables.

    Example:
        >>> ChannelSpec(reduction=16, divisor=8).hidden(64)
        8
    """

    reduction: float = 16
    hidden_channels: int | None = None
    divisor: int | None = None
    round_limit: float = 0.0
    min_hidden: int = 1
    pool_types: str | Sequence[str] = ("avg", "max")
    pool_fusion: str = "sum"
    use_bias: bool = True
    act: ActivationLike = "relu"
    gate: ActivationLike = "sigmoid"
    preset: str | None = None

    def __post_init__(self) -> None:
        self.hidden(1)  # validates reduction / hidden_channels with the width rule's own messages
        object.__setattr__(self, "pool_types", F.normalize_pool_types(self.pool_types))
        check_choice(self.pool_fusion, POOL_FUSIONS, "pool_fusion")
        F.resolve_activation(self.act)
        F.resolve_activation(self.gate, argname="gate")

    def hidden(self, channels: int) -> int:
        """The MLP's hidden width for ``channels`` input channels."""
        return F.hidden_width(channels, reduction=self.reduction, hidden_channels=self.hidden_channels,
                              divisor=self.divisor, round_limit=self.round_limit, min_hidden=self.min_hidden)

    @property
    def act_fn(self) -> Callable[[jax.Array], jax.Array]:
        return F.resolve_activation(self.act)

    @property
    def gate_fn(self) -> Callable[[jax.Array], jax.Array]:
        return F.resolve_activation(self.gate, argname="gate")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SESpec(ChannelSpec):
    """Squeeze-and-Excitation: a :class:`ChannelSpec` whose default squeeze is one average pool.

    Example:
        >>> SESpec().pool_types
        ('avg',)
    """

    pool_types: str | Sequence[str] = ("avg",)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SpatialSpec(_Spec):
    """Options of CBAM's spatial attention (:class:`flax_attn.layers.SpatialAttention`).

    ``compress`` is normalised to ``"conv"`` or a tuple of ``"max"``/``"mean"`` (``"avg"`` means ``"mean"``);
    derived: ``conv_in`` (input width of the ``kernel_size`` conv) and ``use_conv_bias``.

    Example:
        >>> SpatialSpec(compress="conv", compress_channels=3).conv_in, SpatialSpec(use_bn=True).use_conv_bias
        (3, False)
    """

    kernel_size: int = 7
    spatial_dims: int = 2
    compress: str | Sequence[str] = ("mean", "max")
    compress_fusion: str = "concat"
    compress_channels: int = 2
    use_bn: bool = False
    conv_bias: bool | None = None
    bn_momentum: float = 0.9
    bn_eps: float = 1e-5
    gate: ActivationLike = "sigmoid"
    preset: str | None = None

    def __post_init__(self) -> None:
        F.check_kernel_size(self.kernel_size)
        F.check_spatial_dims(self.spatial_dims)
        object.__setattr__(self, "compress", F.normalize_compress(self.compress))
        check_choice(self.compress_fusion, COMPRESS_FUSIONS, "compress_fusion")
        F.resolve_activation(self.gate, argname="gate")
        if self.compress == "conv" and self.compress_channels < 1:
            raise ValueError(f"compress_channels must be >= 1, got {self.compress_channels}")

    @property
    def conv_in(self) -> int:
        """Channels entering the ``kernel_size`` conv: the compressed maps."""
        if self.compress == "conv":
            return self.compress_channels
        return 1 if self.compress_fusion == "mean" else len(self.compress)

    @property
    def use_conv_bias(self) -> bool:
        """``conv_bias``, defaulting to ``not use_bn``."""
        return (not self.use_bn) if self.conv_bias is None else self.conv_bias

    @property
    def padding(self) -> tuple[tuple[int, int], ...]:
        """Symmetric padding ``(k - 1) // 2`` per spatial axis: the map keeps its size."""
        pad = (self.kernel_size - 1) // 2
        return ((pad, pad),) * self.spatial_dims

    @property
    def gate_fn(self) -> Callable[[jax.Array], jax.Array]:
        return F.resolve_activation(self.gate, argname="gate")


# CBAM's flat options: the channel options, the spatial ones (``gate`` is shared), then its own
_CBAM_OWN = (
    inspect.Parameter("spatial_gate", inspect.Parameter.KEYWORD_ONLY, default=None,
                      annotation=ActivationLike | None),
    inspect.Parameter("arrangement", inspect.Parameter.KEYWORD_ONLY, default="channel_first", annotation=str),
    inspect.Parameter("no_spatial", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=bool),
    inspect.Parameter("preset", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=str | None),
)


def _part_names(cls: type[_Spec]) -> list[str]:
    return [p.name for p in cls.options() if p.name not in ("preset",)]


@dataclasses.dataclass(frozen=True, kw_only=True)
class CBAMSpec(_Spec):
    """Options of :class:`flax_attn.layers.CBAM`: a channel spec, a spatial spec (``None``: no spatial
    module, the official code's ``no_spatial``) and the arrangement (the paper's table 4).

    The block takes them flat (:meth:`from_options`): the channel options, the spatial options, ``gate``
    for both unless ``spatial_gate`` is given, ``arrangement``, ``no_spatial`` and ``preset``.

    Example:
        >>> CBAMSpec.from_options(gate="tanh", no_spatial=True).spatial is None
        True
    """

    channel: ChannelSpec = ChannelSpec()
    spatial: SpatialSpec | None = SpatialSpec()
    arrangement: str = "channel_first"
    preset: str | None = None

    def __post_init__(self) -> None:
        check_choice(self.arrangement, ARRANGEMENTS, "arrangement")

    @classmethod
    def options(cls) -> tuple[inspect.Parameter, ...]:
        channel = [p for p in ChannelSpec.options() if p.name != "preset"]
        spatial = [p for p in SpatialSpec.options() if p.name not in ("preset", "gate")]
        return (*channel, *spatial, *_CBAM_OWN)

    @classmethod
    def from_options(cls, **options: Any) -> "CBAMSpec":
        _check_known(cls, options)
        channel = ChannelSpec(**{k: options[k] for k in _part_names(ChannelSpec) if k in options})
        spatial = None
        if not options.get("no_spatial", False):
            sp = {k: options[k] for k in _part_names(SpatialSpec) if k in options and k != "gate"}
            gate = options.get("spatial_gate")
            spatial = SpatialSpec(**sp, gate=channel.gate if gate is None else gate)
        return cls(channel=channel, spatial=spatial, arrangement=options.get("arrangement", "channel_first"),
                   preset=options.get("preset"))

    def to_options(self) -> dict[str, Any]:
        out = {k: v for k, v in self.channel.to_options().items() if k != "preset"}
        spatial = self.spatial if self.spatial is not None else SpatialSpec()
        out.update({k: v for k, v in spatial.to_options().items() if k not in ("preset", "gate")})
        same_gate = self.spatial is None or self.spatial.gate == self.channel.gate
        out.update(spatial_gate=None if same_gate else spatial.gate, arrangement=self.arrangement,
                   no_spatial=self.spatial is None, preset=self.preset)
        return out


BlockSpec = ChannelSpec | SpatialSpec | CBAMSpec
"""The spec of any attention block (:class:`SESpec` is a :class:`ChannelSpec`)."""


class SpecBlock:
    """Mixin of the NNX blocks: ``preset`` reads (and, assigned, rewrites) ``spec.preset``."""

    spec: Any

    @property
    def preset(self) -> str | None:
        """The preset that made the block (``spec.preset``); conversion picks its key map by this name."""
        return self.spec.preset

    @preset.setter
    def preset(self, name: str | None) -> None:
        self.spec = self.spec.replace(preset=name)


def options_signature(fn: Callable[..., Any], spec_cls: type[_Spec]) -> inspect.Signature:
    """``fn``'s signature (less ``self``) with its ``**options`` replaced by the spec's typed keyword-only
    options: what ``inspect.signature`` and ``help()`` show for a block class."""
    sig = inspect.signature(fn)
    params = [p for p in sig.parameters.values()
              if p.kind is not inspect.Parameter.VAR_KEYWORD and p.name != "self"]
    cut = next((i for i, p in enumerate(params) if p.kind is inspect.Parameter.KEYWORD_ONLY), len(params))
    return sig.replace(parameters=[*params[:cut], *spec_cls.options(), *params[cut:]])


__all__ = [
    "ARRANGEMENTS",
    "COMPRESS_FUSIONS",
    "POOL_FUSIONS",
    "BlockSpec",
    "CBAMSpec",
    "ChannelSpec",
    "SESpec",
    "SpatialSpec",
    "SpecBlock",
]
