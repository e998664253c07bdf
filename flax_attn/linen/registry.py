"""Linen presets: :func:`create_attn` reuses the NNX preset registry (:mod:`flax_attn.layers.registry`).

The NNX factory of the preset is evaluated abstractly (``nnx.eval_shape``: no parameters are allocated)
and the resolved configuration of the block it builds (widths, pools, gates, BatchNorm options, dtypes)
is copied into the Linen twin, so every NNX preset, including user ones added with
:func:`flax_attn.register_attn`, exists in Linen with exactly the same configuration.
"""

from __future__ import annotations

from typing import Any

from flax import linen as nn
from flax import nnx

from flax_attn import layers as L
from flax_attn.layers.registry import AttnFactory, get_attn
from flax_attn.linen.cbam import CBAM
from flax_attn.linen.channel_attn import ChannelAttention, SqueezeExcite
from flax_attn.linen.spatial_attn import SpatialAttention


def _channel_kwargs(m: L.ChannelAttention) -> dict[str, Any]:
    return dict(hidden_channels=m.hidden, pool_types=m.pool_types, pool_fusion=m.pool_fusion,
                use_bias=m.fc1.bias is not None, act=m.act, gate=m.gate_fn, dtype=m.dtype,
                param_dtype=m.fc1.kernel.dtype)


def _spatial_kwargs(m: L.SpatialAttention) -> dict[str, Any]:
    return dict(kernel_size=m.kernel_size, spatial_dims=m.spatial_dims, compress=m.compress_mode,
                compress_fusion=m.compress_fusion,
                compress_channels=m.compress.out_features if m.compress is not None else 2,
                use_bn=m.bn is not None, conv_bias=m.conv.bias is not None,
                bn_momentum=m.bn.momentum if m.bn is not None else 0.9,
                bn_eps=m.bn.epsilon if m.bn is not None else 1e-5, dtype=m.dtype,
                param_dtype=m.conv.kernel.dtype, use_running_average=bool(m.bn.use_running_average)
                if m.bn is not None else False)


def from_nnx(module: nnx.Module, *, preset: str | None = None) -> nn.Module:
    """The Linen twin of an NNX attention block, with the same configuration (parameters are not copied).

    Supports :class:`flax_attn.layers.SqueezeExcite`, ``ChannelAttention``, ``SpatialAttention`` and
    ``CBAM``. Copy the parameters with :func:`nnx_to_linen_variables`.

    Example:
        >>> from flax import nnx
        >>> import flax_attn
        >>> from_nnx(flax_attn.CBAM(64, rngs=nnx.Rngs(0))).kernel_size
        7
    """
    preset = preset if preset is not None else getattr(module, "preset", None)
    if isinstance(module, L.SqueezeExcite):
        return SqueezeExcite(module.channels, **_channel_kwargs(module), preset=preset)
    if isinstance(module, L.ChannelAttention):
        return ChannelAttention(module.channels, **_channel_kwargs(module), preset=preset)
    if isinstance(module, L.SpatialAttention):
        return SpatialAttention(module.channels, **_spatial_kwargs(module), preset=preset)
    if isinstance(module, L.CBAM):
        ch = _channel_kwargs(module.channel)
        if module.spatial is None:
            sp: dict[str, Any] = dict(no_spatial=True)
        else:
            sp = _spatial_kwargs(module.spatial)
            sp["spatial_gate"] = module.spatial.gate_fn
        return CBAM(module.channels, **{**ch, **sp}, arrangement=module.arrangement, preset=preset)
    raise TypeError(f"no Linen twin for {type(module).__name__}: expected SqueezeExcite, ChannelAttention, "
                    "SpatialAttention or CBAM from flax_attn.layers")


def create_attn(name: str | AttnFactory, channels: int, **kwargs: Any) -> nn.Module:
    """Builds the Linen twin of the NNX block or preset ``name`` (see :func:`flax_attn.create_attn`).

    Same names, defaults and keyword overrides as the NNX registry, minus ``rngs``; the module's
    ``preset`` field records a preset's name (use it as ``key_map`` in :mod:`flax_attn.convert`).

    Example:
        >>> se = create_attn("se_mobilenetv3", 72)
        >>> se.hidden, se.gate.__name__, se.preset
        (24, 'hard_sigmoid', 'se_mobilenetv3')
    """
    if "rngs" in kwargs:
        raise TypeError("Linen modules take no rngs: pass the PRNG key to module.init(...)")
    factory = get_attn(name)
    nnx_module = nnx.eval_shape(lambda: factory(channels, rngs=nnx.Rngs(0), **kwargs))
    return from_nnx(nnx_module)


def _pure(state: nnx.State) -> dict:
    return nnx.to_pure_dict(state)


def nnx_to_linen_variables(module: nnx.Module) -> dict[str, dict]:
    """An NNX block's variables as a Linen variables dict ``{"params": ..., "batch_stats": ...}``.

    The NNX blocks and their Linen twins have the same variable trees, so this is a re-packaging, no
    renaming or transposing (``batch_stats`` is present only when the block has BatchNorm statistics).

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> import flax_attn
        >>> m = flax_attn.SqueezeExcite(32, rngs=nnx.Rngs(0))
        >>> y = from_nnx(m).apply(nnx_to_linen_variables(m), jnp.ones((1, 3, 3, 32)))
        >>> bool(jnp.array_equal(y, m(jnp.ones((1, 3, 3, 32)))))
        True
    """
    if not isinstance(module, nnx.Module):
        raise TypeError(f"module must be a flax.nnx.Module, got {type(module).__name__}")
    out = {"params": _pure(nnx.state(module, nnx.Param))}
    stats = _pure(nnx.state(module, nnx.BatchStat))
    if stats:
        out["batch_stats"] = stats
    return out


def linen_variables_to_nnx(module: nnx.Module, variables: Any) -> nnx.Module:
    """Writes Linen variables (``params`` and ``batch_stats``) into the NNX twin ``module``, in place.

    The trees must match exactly (same block, same options): a missing or extra entry raises.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from flax import nnx
        >>> import flax_attn
        >>> lin = create_attn("cbam_timm", 32)
        >>> v = lin.init(jax.random.key(0), jnp.ones((2, 4, 4, 32)))
        >>> m = linen_variables_to_nnx(flax_attn.create_attn("cbam_timm", 32, rngs=nnx.Rngs(1)), v)
        >>> bool(jnp.array_equal(m.channel.fc1.kernel[...], v["params"]["channel"]["fc1"]["kernel"]))
        True
    """
    if not isinstance(module, nnx.Module):
        raise TypeError(f"module must be a flax.nnx.Module, got {type(module).__name__}")
    for col, kind in (("params", nnx.Param), ("batch_stats", nnx.BatchStat)):
        state = nnx.state(module, kind)
        pure = _pure(state)
        given = variables.get(col, {}) if hasattr(variables, "get") else {}
        if jax_tree_structure(pure) != jax_tree_structure(dict(given) if given else {}):
            raise ValueError(f"variables[{col!r}] does not match the module's {col} tree: expected "
                             f"{jax_tree_structure(pure)}, got {jax_tree_structure(dict(given) if given else {})}")
        if pure:
            nnx.replace_by_pure_dict(state, _unfreeze(given))
            nnx.update(module, state)
    return module


def _unfreeze(tree: Any) -> Any:
    from collections.abc import Mapping

    return {k: _unfreeze(v) for k, v in tree.items()} if isinstance(tree, Mapping) else tree


def jax_tree_structure(tree: Any) -> Any:
    import jax

    return jax.tree.structure(_unfreeze(tree))
