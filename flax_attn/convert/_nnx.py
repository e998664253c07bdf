"""NNX front end: enumerate a module's ``nnx.Param``/``nnx.BatchStat`` variables and write results back."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flax_attn.convert._arrays import numpy_to_tensor
from flax_attn.convert._keymap import KeyMap, KeyMapLike, Path, resolve_key_map
from flax_attn.convert._rules import Slot, export_arrays, import_arrays, make_slot

# layers whose kernels do not follow the Dense/Conv rules (torch has other layouts or no twin)
_UNSUPPORTED = tuple(getattr(nnx, n) for n in ("ConvTranspose", "LinearGeneral", "Einsum") if hasattr(nnx, n))


def _check_module(module: Any) -> None:
    if not isinstance(module, nnx.Module):
        hint = " (for Linen variables use torch_to_linen / linen_to_torch)" if isinstance(module, Mapping) else ""
        raise TypeError(f"module must be a flax.nnx.Module, got {type(module).__name__}{hint}")


def _walk(module: nnx.Module, key_map: KeyMapLike):
    _check_module(module)
    km: KeyMap = resolve_key_map(key_map, getattr(module, "preset", None) if key_map is None else None)
    modules: dict[tuple, nnx.Module] = {}
    variables: list[tuple[tuple, nnx.Variable]] = []
    for path, node in nnx.iter_graph(module):
        if isinstance(node, nnx.Module):
            modules[tuple(path)] = node
        elif isinstance(node, (nnx.Param, nnx.BatchStat)):
            variables.append((tuple(path), node))

    def normalize(path: tuple) -> Path:
        # nnx.Sequential keeps its layers in ``.layers``; torch's nn.Sequential names them 0, 1, ...
        out = []
        for i, comp in enumerate(path):
            if comp == "layers" and isinstance(modules.get(path[:i]), nnx.Sequential):
                continue
            out.append(str(comp))
        return tuple(out)

    presets = {normalize(p): preset for p, m in modules.items()
               if p and isinstance(preset := getattr(m, "preset", None), str)}
    return km.add_auto_nested(presets), modules, variables, normalize


def module_key_map(module: nnx.Module, key_map: KeyMapLike = None) -> KeyMap:
    """The key map conversions of ``module`` use: ``key_map`` (``None``: ``module.preset``'s map or
    identity) with the maps of the sub-modules' presets nested at their paths.

    Example:
        >>> from flax import nnx
        >>> from flax_attn import create_attn
        >>> class Block(nnx.Module):
        ...     def __init__(self):
        ...         self.attn = create_attn("cbam_official", 32, rngs=nnx.Rngs(0))
        >>> module_key_map(Block()).torch_key("attn.channel.fc1.kernel")
        'attn.ChannelGate.mlp.1.weight'
    """
    return _walk(module, key_map)[0]


def _plan(module: nnx.Module, key_map: KeyMapLike) -> tuple[list[Slot], list[nnx.Variable], list[str]]:
    km, modules, variables, normalize = _walk(module, key_map)
    problems: list[str] = []
    slots, refs = [], []
    for path, var in variables:
        parent = modules.get(path[:-1])
        npath = normalize(path)
        if isinstance(parent, _UNSUPPORTED):
            problems.append(f"{'.'.join(npath)}: {type(parent).__name__} layers are not supported by the "
                            "Dense/Conv layout rules")
            continue
        value = var.get_value()
        slots.append(make_slot(npath[:-1], npath[-1], tuple(value.shape), value.dtype, km))
        refs.append(var)
    return slots, refs, problems


def torch_to_nnx(
    module: nnx.Module,
    state_dict: Mapping[str, Any],
    *,
    key_map: KeyMapLike = None,
    strict: bool = True,
    cast: bool = False,
    strip_prefix: str | None = None,
) -> nnx.Module:
    """Loads a PyTorch ``state_dict`` (torch tensors or numpy arrays) into an NNX module, in place.

    Every ``nnx.Param`` and ``nnx.BatchStat`` of ``module`` is matched to its torch key through
    ``key_map`` (``None``: the map registered for ``module.preset`` if the module has one, else identity
    names; sub-modules with a ``preset`` get their map at their path), transposed to the Flax layout and
    written with the variable's dtype and sharding. All problems (missing variables, unexpected keys,
    shape mismatches, dtype mismatches, unsupported layers) are collected and raised together as one
    :class:`ConversionError` before anything is written. ``strict=False`` turns missing variables (left
    unchanged) and unexpected keys into a :class:`ConversionWarning`; shape and dtype problems still
    raise. A checkpoint dtype other than the variable's is an error unless ``cast=True`` (integers, e.g.
    torch's int64 ``num_batches_tracked``, convert exactly whenever the values fit).

    ``strip_prefix="module."`` removes that prefix from every checkpoint key that starts with it before
    matching (checkpoints saved from ``nn.DataParallel`` / ``DistributedDataParallel`` put every key under
    ``module.``); without it, such a checkpoint fails with a hint to strip the prefix. A long list of
    problems is shown capped (the first 20 and a count; ``ConversionError.problems`` has them all), and
    when most keys fail the error says that the checkpoint is probably of another architecture.

    ``module`` may be abstract (built under ``nnx.eval_shape``, its variables ``jax.ShapeDtypeStruct``,
    possibly with shardings): loading then skips the random initialisation entirely, and each array is
    placed with the sharding of its abstract variable.

    Returns ``module`` (updated).

    Example:
        >>> import numpy as np
        >>> from flax import nnx
        >>> from flax_attn import create_attn
        >>> se = create_attn("se_classic", 32, rngs=nnx.Rngs(0))          # torch: fc.0 / fc.2, no bias
        >>> sd = {"fc.0.weight": np.ones((2, 32), np.float32), "fc.2.weight": np.ones((32, 2), np.float32)}
        >>> torch_to_nnx(se, sd).fc1.kernel.shape
        (32, 2)
    """
    slots, refs, problems = _plan(module, key_map)
    arrays = import_arrays(slots, state_dict, strict=strict, cast=cast, problems=problems,
                           strip_prefix=strip_prefix)
    for slot, var in zip(slots, refs):
        if slot.flax_path not in arrays:
            continue
        old = var.get_value()
        new = jnp.asarray(arrays[slot.flax_path])
        sharding = getattr(old, "sharding", None)
        if sharding is not None:  # keep the variable's placement (also that of an abstract, eval_shape'd one)
            new = jax.device_put(new, sharding)
        var.set_value(new)
    return module


def nnx_to_numpy(module: nnx.Module, *, key_map: KeyMapLike = None) -> dict[str, np.ndarray]:
    """The module's ``nnx.Param``/``nnx.BatchStat`` variables as a PyTorch-layout ``state_dict`` of numpy arrays.

    Same keys, shapes and dtypes as :func:`nnx_to_torch` (``num_batches_tracked`` int64); needs no torch.

    Example:
        >>> from flax import nnx
        >>> from flax_attn import create_attn
        >>> sd = nnx_to_numpy(create_attn("se_torchvision", 32, rngs=nnx.Rngs(0)))
        >>> sd["fc1.weight"].shape                                   # a 1x1 conv, as torchvision stores it
        (2, 32, 1, 1)
    """
    slots, refs, problems = _plan(module, key_map)
    values = {s.flax_path: v.get_value() for s, v in zip(slots, refs)}
    return export_arrays(slots, values, problems)


def nnx_to_torch(module: nnx.Module, *, key_map: KeyMapLike = None) -> dict[str, Any]:
    """The module's variables as a PyTorch ``state_dict`` (CPU tensors), ready for ``load_state_dict(strict=True)``.

    Example:
        >>> from flax import nnx
        >>> from flax_attn import create_attn
        >>> sd = nnx_to_torch(create_attn("cbam_official", 64, rngs=nnx.Rngs(0)))
        >>> sorted(sd)[:2]
        ['ChannelGate.mlp.1.bias', 'ChannelGate.mlp.1.weight']
    """
    return {k: numpy_to_tensor(v) for k, v in nnx_to_numpy(module, key_map=key_map).items()}
