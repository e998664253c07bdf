"""Linen front end: conversion of a variables dict ``{"params": ..., "batch_stats": ...}``, and the
re-packaging of an NNX block's variables for its Linen twin (and back)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flax_attn.convert._arrays import numpy_to_tensor
from flax_attn.convert._keymap import KeyMapLike, resolve_key_map
from flax_attn.convert._rules import Slot, export_arrays, import_arrays, make_slot

if TYPE_CHECKING:
    from flax.core import FrozenDict

COLLECTIONS = ("params", "batch_stats")


def _flatten(tree: Mapping, prefix: tuple = ()) -> dict[tuple, Any]:
    out: dict[tuple, Any] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, prefix + (str(k),)))
        else:
            out[prefix + (str(k),)] = v
    return out


def _plan(variables: Any, key_map: KeyMapLike) -> tuple[list[Slot], list[tuple], list[str]]:
    if not isinstance(variables, Mapping):
        hint = " (for NNX modules use torch_to_nnx / nnx_to_torch)" if callable(variables) else ""
        raise TypeError(f"variables must be a Linen variables mapping like {{'params': ..., 'batch_stats': ...}}, "
                        f"got {type(variables).__name__}{hint}")
    if "params" not in variables and "batch_stats" not in variables:
        raise ValueError(f"variables must hold a 'params' (and optionally 'batch_stats') collection, got keys "
                         f"{sorted(map(str, variables))}: pass the full variables dict, not variables['params']")
    km = resolve_key_map(key_map)
    slots, locs = [], []
    for col in COLLECTIONS:
        if col not in variables:
            continue
        for path, value in _flatten(variables[col]).items():
            shape = tuple(np.shape(value))
            dtype = getattr(value, "dtype", None) or np.asarray(value).dtype
            slots.append(make_slot(path[:-1], path[-1], shape, dtype, km))
            locs.append((col,) + path)
    return slots, locs, []


def _set(tree: Mapping, path: tuple, value: Any) -> dict:
    out = dict(tree)
    if len(path) == 1:
        out[path[0]] = value
    else:
        out[path[0]] = _set(tree[path[0]], path[1:], value)
    return out


def _find(tree: Mapping, path: tuple) -> Any:
    for k in path:
        tree = tree[k]
    return tree


def torch_to_linen(
    variables: Mapping[str, Any],
    state_dict: Mapping[str, Any],
    *,
    key_map: KeyMapLike = None,
    strict: bool = True,
    cast: bool = False,
    strip_prefix: str | None = None,
) -> dict | FrozenDict:
    """A PyTorch ``state_dict`` as Linen variables shaped like the template ``variables``.

    ``variables`` (e.g. from ``module.init``) gives the tree, shapes and dtypes; its ``params`` and
    ``batch_stats`` leaves are replaced (other collections pass through), and a new dict is returned
    (a ``FrozenDict`` if the template is one). Rules, ``key_map`` (``None``: identity), ``strict``,
    ``cast`` and ``strip_prefix`` as in :func:`torch_to_nnx`.

    Example:
        >>> import jax, jax.numpy as jnp, numpy as np
        >>> from flax_attn.linen import SqueezeExcite
        >>> se = SqueezeExcite(32, reduction=16, use_bias=False)
        >>> v = se.init(jax.random.key(0), jnp.ones((1, 4, 4, 32)))
        >>> sd = {"fc.0.weight": np.ones((2, 32), np.float32), "fc.2.weight": np.ones((32, 2), np.float32)}
        >>> torch_to_linen(v, sd, key_map="se_classic")["params"]["fc1"]["kernel"].shape
        (32, 2)
    """
    slots, locs, problems = _plan(variables, key_map)
    arrays = import_arrays(slots, state_dict, strict=strict, cast=cast, problems=problems,
                           strip_prefix=strip_prefix)
    frozen = type(variables).__name__ == "FrozenDict"
    out: dict = {k: v for k, v in variables.items()}
    for slot, loc in zip(slots, locs):
        if slot.flax_path not in arrays:
            continue
        old = _find(variables, loc)
        new = jnp.asarray(arrays[slot.flax_path])
        sharding = getattr(old, "sharding", None)
        if sharding is not None:  # keep the variable's placement (also that of an abstract, eval_shape'd one)
            new = jax.device_put(new, sharding)
        out = _set(out, loc, new)
    if frozen:
        from flax.core import freeze

        return freeze(out)
    return out


def linen_to_numpy(variables: Mapping[str, Any], *, key_map: KeyMapLike = None) -> dict[str, np.ndarray]:
    """Linen variables as a PyTorch-layout ``state_dict`` of numpy arrays (no torch needed).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from flax_attn.linen import create_attn
        >>> se = create_attn("se_torchvision", 32)
        >>> v = se.init(jax.random.key(0), jnp.ones((1, 3, 3, 32)))
        >>> linen_to_numpy(v, key_map=se.preset)["fc1.weight"].shape
        (2, 32, 1, 1)
    """
    slots, locs, problems = _plan(variables, key_map)
    values = {s.flax_path: _find(variables, loc) for s, loc in zip(slots, locs)}
    return export_arrays(slots, values, problems)


def linen_to_torch(variables: Mapping[str, Any], *, key_map: KeyMapLike = None) -> dict[str, Any]:
    """Linen variables as a PyTorch ``state_dict`` (CPU tensors), ready for ``load_state_dict(strict=True)``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from flax_attn.linen import CBAM
        >>> cbam = CBAM(64, use_bn=True, compress=("max", "mean"))
        >>> v = cbam.init(jax.random.key(0), jnp.ones((1, 5, 5, 64)))
        >>> sorted(linen_to_torch(v, key_map="cbam_official"))[-1]
        'SpatialGate.spatial.conv.weight'
    """
    return {k: numpy_to_tensor(v) for k, v in linen_to_numpy(variables, key_map=key_map).items()}


# --------------------------------------------------------------------------------------------------
# NNX block <-> Linen twin: the same variable trees, so a re-packaging (no renames, no transposes)
# --------------------------------------------------------------------------------------------------


def _unfreeze(tree: Any) -> Any:
    return {k: _unfreeze(v) for k, v in tree.items()} if isinstance(tree, Mapping) else tree


def _structure(tree: Any) -> Any:
    return jax.tree.structure(_unfreeze(tree))


def nnx_to_linen_variables(module: nnx.Module) -> dict[str, dict]:
    """An NNX block's variables as a Linen variables dict ``{"params": ..., "batch_stats": ...}``.

    The NNX blocks and their Linen twins (:func:`flax_attn.linen.from_nnx`) have the same variable trees,
    so this is a re-packaging, no renaming or transposing (``batch_stats`` is present only when the block
    has BatchNorm statistics).

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> import flax_attn
        >>> from flax_attn.linen import from_nnx
        >>> m = flax_attn.SqueezeExcite(32, rngs=nnx.Rngs(0))
        >>> y = from_nnx(m).apply(nnx_to_linen_variables(m), jnp.ones((1, 3, 3, 32)))
        >>> bool(jnp.array_equal(y, m(jnp.ones((1, 3, 3, 32)))))
        True
    """
    if not isinstance(module, nnx.Module):
        raise TypeError(f"module must be a flax.nnx.Module, got {type(module).__name__}")
    out = {"params": nnx.to_pure_dict(nnx.state(module, nnx.Param))}
    stats = nnx.to_pure_dict(nnx.state(module, nnx.BatchStat))
    if stats:
        out["batch_stats"] = stats
    return out


def linen_variables_to_nnx(module: nnx.Module, variables: Any) -> nnx.Module:
    """Writes Linen variables (``params`` and ``batch_stats``) into the NNX twin ``module``, in place.

    The trees must match exactly (same block, same options): a missing or extra entry raises, and then
    ``module`` is unchanged (both collections are checked before either is written).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from flax import nnx
        >>> import flax_attn
        >>> from flax_attn import linen as fal
        >>> lin = fal.create_attn("cbam_timm", 32)
        >>> v = lin.init(jax.random.key(0), jnp.ones((2, 4, 4, 32)))
        >>> m = linen_variables_to_nnx(flax_attn.create_attn("cbam_timm", 32, rngs=nnx.Rngs(1)), v)
        >>> bool(jnp.array_equal(m.channel.fc1.kernel[...], v["params"]["channel"]["fc1"]["kernel"]))
        True
    """
    if not isinstance(module, nnx.Module):
        raise TypeError(f"module must be a flax.nnx.Module, got {type(module).__name__}")
    updates = []
    for col, kind in (("params", nnx.Param), ("batch_stats", nnx.BatchStat)):
        state = nnx.state(module, kind)
        pure = nnx.to_pure_dict(state)
        given = variables.get(col, {}) if hasattr(variables, "get") else {}
        if _structure(pure) != _structure(dict(given) if given else {}):
            raise ValueError(f"variables[{col!r}] does not match the module's {col} tree: expected "
                             f"{_structure(pure)}, got {_structure(dict(given) if given else {})}")
        if pure:
            updates.append((state, given))
    for state, given in updates:
        nnx.replace_by_pure_dict(state, _unfreeze(given))
        nnx.update(module, state)
    return module
