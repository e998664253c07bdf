"""Linen presets: :func:`create_attn` reads the same registry as NNX (:mod:`flax_attn.layers.registry`).

A registered name is a block class or a :class:`~flax_attn.layers.registry.Preset` (a named spec); the
Linen twin is built from the spec directly, so every preset, including user ones registered as a spec
with :func:`flax_attn.register_attn`, exists in Linen with exactly the same configuration. (A user
*factory* function is the one case built abstractly in NNX, ``nnx.eval_shape``, to read the spec of the
block it returns.)
"""

from __future__ import annotations

from typing import Any, TypeGuard

from flax import linen as nn
from flax import nnx

from flax_attn import layers as L
from flax_attn.layers.registry import AttnFactory, Preset, block_of, get_attn
from flax_attn.layers.specs import BlockSpec, CBAMSpec, ChannelSpec, SESpec, SpatialSpec
from flax_attn.linen._twin import SpecModule
from flax_attn.linen.cbam import CBAM
from flax_attn.linen.channel_attn import ChannelAttention, SqueezeExcite
from flax_attn.linen.spatial_attn import SpatialAttention

#: the Linen twin of each spec type
TWIN_OF_SPEC: dict[type, type[SpecModule]] = {
    SESpec: SqueezeExcite, ChannelSpec: ChannelAttention, SpatialSpec: SpatialAttention, CBAMSpec: CBAM,
}
_NNX_BLOCKS = (L.ChannelAttention, L.SpatialAttention, L.CBAM)
_SPECS = (ChannelSpec, SpatialSpec, CBAMSpec)
_MODULE_KWARGS = ("name", "parent", "dtype", "param_dtype", "use_running_average")


def _is_block_class(entry: object) -> TypeGuard[type[L.ChannelAttention | L.SpatialAttention | L.CBAM]]:
    return isinstance(entry, type) and issubclass(entry, _NNX_BLOCKS)


def _module_kwargs(module: nnx.Module) -> dict[str, Any]:
    """dtype, param_dtype and mode of an NNX block, read from its layers (its options live in the spec)."""
    channel = module.channel if isinstance(module, L.CBAM) else module
    spatial = module.spatial if isinstance(module, L.CBAM) else module
    layer: nnx.Linear | nnx.Conv
    if isinstance(channel, L.ChannelAttention):
        layer = channel.fc1
    else:  # module is a SpatialAttention (from_nnx has checked the block types)
        assert isinstance(spatial, L.SpatialAttention)
        layer = spatial.conv
    out: dict[str, Any] = dict(dtype=layer.dtype, param_dtype=layer.param_dtype)
    if not isinstance(module, L.ChannelAttention):
        bn = getattr(spatial, "bn", None)
        out["use_running_average"] = bool(bn.use_running_average) if bn is not None else False
    return out


def from_nnx(module: nnx.Module, *, preset: str | None = None) -> nn.Module:
    """The Linen twin of an NNX attention block, with the same spec (parameters are not copied).

    Supports :class:`flax_attn.layers.SqueezeExcite`, ``ChannelAttention``, ``SpatialAttention`` and
    ``CBAM``. Copy the parameters with :func:`flax_attn.convert.nnx_to_linen_variables`.

    Example:
        >>> from flax import nnx
        >>> import flax_attn
        >>> from_nnx(flax_attn.CBAM(64, rngs=nnx.Rngs(0))).kernel_size
        7
    """
    if not isinstance(module, _NNX_BLOCKS):
        raise TypeError(f"no Linen twin for {type(module).__name__}: expected SqueezeExcite, ChannelAttention, "
                        "SpatialAttention or CBAM from flax_attn.layers")
    spec = module.spec if preset is None else module.spec.replace(preset=preset)
    return block_of(spec, TWIN_OF_SPEC).from_spec(module.channels, spec, **_module_kwargs(module))


def create_attn(name: str | BlockSpec | AttnFactory, channels: int, /, **kwargs: Any) -> nn.Module:
    """Builds the Linen twin of the NNX block or preset ``name`` (see :func:`flax_attn.create_attn`).

    Same names, defaults and keyword overrides as the NNX registry, minus ``rngs``; Linen's own keywords
    (``name``, ``parent``, ``dtype``, ``param_dtype``, ``use_running_average``) go to the module. The
    module's ``preset`` field records a preset's name (use it as ``key_map`` in :mod:`flax_attn.convert`).

    Example:
        >>> se = create_attn("se_mobilenetv3", 72, name="attn")
        >>> se.hidden, se.gate, se.preset, se.name
        (24, 'hard_sigmoid', 'se_mobilenetv3', 'attn')
    """
    if "rngs" in kwargs:
        raise TypeError("Linen modules take no rngs: pass the PRNG key to module.init(...)")
    module_kwargs = {k: kwargs.pop(k) for k in _MODULE_KWARGS if k in kwargs}
    entry = name if isinstance(name, _SPECS) else get_attn(name)
    if isinstance(entry, _SPECS):
        spec = entry.replace(**kwargs)
    elif isinstance(entry, Preset):
        spec = entry.spec_for(channels, **kwargs)
    elif _is_block_class(entry):
        spec = entry.Spec.from_options(**kwargs)
    else:  # a user factory: build its block abstractly to read its spec
        return from_nnx(nnx.eval_shape(lambda: entry(channels, rngs=nnx.Rngs(0), **kwargs))).clone(**module_kwargs)
    twin = block_of(spec, TWIN_OF_SPEC)
    if not isinstance(spec, (SpatialSpec, CBAMSpec)):
        module_kwargs.pop("use_running_average", None)  # channel attention has no BatchNorm, hence no mode
    return twin.from_spec(channels, spec, **module_kwargs)
