"""The layout rule table and the framework-neutral import/export engine (numpy only, no torch).

A conversion is planned as a list of :class:`Slot` (one per Flax variable: its Flax path, PyTorch key,
layout kind, shape and dtype); import and export then apply the rule of each slot. The NNX and Linen
front ends (``_nnx.py``, ``_linen.py``) only enumerate variables and write results back.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from flax_attn.convert._arrays import tensor_to_numpy
from flax_attn.convert._errors import ConversionError, ConversionWarning
from flax_attn.convert._keymap import NBT, KeyMap, Path, torch_leaf_name


@dataclass
class Slot:
    """One Flax variable and where/how it lives in a PyTorch ``state_dict``."""

    flax_path: str              # "channel.fc1.kernel" (dot-joined, for messages and Linen writes)
    torch_key: str              # "ChannelGate.mlp.1.weight"
    kind: str                   # "dense" | "conv" | "plain"
    shape: tuple[int, ...]      # Flax shape
    dtype: np.dtype             # Flax dtype
    conv1x1_dims: int | None    # export a dense kernel as (out, in, 1, ...) with this many ones
    is_nbt: bool = False        # BatchNorm num_batches_tracked (int32 in Flax, int64 in torch)


def make_slot(module_path: Path, leaf: str, shape: tuple[int, ...], dtype: Any, key_map: KeyMap) -> Slot:
    torch_module, conv, dims = key_map._translate(module_path)
    torch_key = ".".join(torch_module + (torch_leaf_name(leaf),))
    if leaf == "kernel" and len(shape) == 2:
        kind = "dense"
    elif leaf == "kernel" and len(shape) >= 3:
        kind = "conv"
    else:
        kind = "plain"
    return Slot(
        flax_path=".".join(module_path + (leaf,)), torch_key=torch_key, kind=kind, shape=tuple(shape),
        dtype=np.dtype(dtype), conv1x1_dims=dims if (conv and kind == "dense") else None, is_nbt=leaf == NBT,
    )


# --------------------------------------------------------------------------------------------------
# layouts
# --------------------------------------------------------------------------------------------------


def torch_shape(slot: Slot) -> tuple[int, ...]:
    """The shape PyTorch stores this variable with (what export writes)."""
    s = slot.shape
    if slot.kind == "dense":
        out = (s[1], s[0])
        return out + (1,) * slot.conv1x1_dims if slot.conv1x1_dims else out
    if slot.kind == "conv":  # (*k, in/g, out) -> (out, in/g, *k)
        return (s[-1], s[-2]) + s[:-2]
    return s


def to_flax_layout(slot: Slot, value: np.ndarray) -> np.ndarray | str:
    """Torch-layout ``value`` -> Flax layout, or an error string when the shape does not fit."""
    expected = torch_shape(slot)
    if slot.kind == "dense":
        v = value
        # a Dense stored as a 1x1 conv (torchvision/timm SE): (out, in, 1, ..., 1), accepted by shape
        if v.ndim > 2 and all(d == 1 for d in v.shape[2:]):
            v = v.reshape(v.shape[:2])
        if v.shape != (slot.shape[1], slot.shape[0]):
            return (f"shape mismatch for {slot.flax_path} <- {slot.torch_key}: checkpoint has "
                    f"{tuple(value.shape)}, the Flax Dense kernel {slot.shape} needs torch shape "
                    f"{(slot.shape[1], slot.shape[0])} (Linear) or {(slot.shape[1], slot.shape[0], 1, 1)} "
                    "(1x1 conv)")
        return np.transpose(v)
    if value.shape != expected:
        what = "Conv kernel" if slot.kind == "conv" else "variable"
        return (f"shape mismatch for {slot.flax_path} <- {slot.torch_key}: checkpoint has "
                f"{tuple(value.shape)}, the Flax {what} {slot.shape} needs torch shape {expected}")
    if slot.kind == "conv":
        n = value.ndim - 2
        return np.transpose(value, tuple(range(2, 2 + n)) + (1, 0))
    return value


def to_torch_layout(slot: Slot, value: np.ndarray) -> np.ndarray:
    if slot.kind == "dense":
        v = np.transpose(value)
        return v.reshape(v.shape + (1,) * slot.conv1x1_dims) if slot.conv1x1_dims else v
    if slot.kind == "conv":
        n = value.ndim - 2
        return np.transpose(value, (n + 1, n) + tuple(range(n)))
    return value


# --------------------------------------------------------------------------------------------------
# dtypes
# --------------------------------------------------------------------------------------------------


def _convert_dtype(slot: Slot, value: np.ndarray, cast: bool) -> np.ndarray | str:
    target = slot.dtype
    if value.dtype == target:
        return value
    src_kind, dst_kind = value.dtype.kind, target.kind
    if src_kind in "iub" and dst_kind in "iu":
        # integers (num_batches_tracked: int64 in torch, int32 here): exact while the values fit
        info = np.iinfo(target)
        if value.size and (value.min() < info.min or value.max() > info.max):
            return (f"{slot.flax_path} <- {slot.torch_key}: integer values in [{value.min()}, {value.max()}] "
                    f"do not fit the Flax dtype {target}")
        return value.astype(target)
    if cast:
        return value.astype(target)
    return (f"dtype mismatch for {slot.flax_path} <- {slot.torch_key}: checkpoint has {value.dtype}, the Flax "
            f"variable is {target} (pass cast=True to convert, or build the module with param_dtype={value.dtype})")


def _c(x: np.ndarray) -> np.ndarray:
    """A C-contiguous, writable copy (``np.ascontiguousarray`` would turn a 0-d array into 1-d)."""
    return np.array(x, order="C", copy=True)


def export_dtype(slot: Slot) -> np.dtype:
    return np.dtype(np.int64) if slot.is_nbt else slot.dtype


# --------------------------------------------------------------------------------------------------
# engine
# --------------------------------------------------------------------------------------------------


def _bn_groups(slots: list[Slot]) -> set[str]:
    """Torch module paths of BatchNorm-like modules (``mean`` and ``var`` leaves) without a num_batches_tracked."""
    by_module: dict[str, set[str]] = {}
    for s in slots:
        mod, _, leaf = s.torch_key.rpartition(".")
        by_module.setdefault(mod, set()).add(leaf)
    return {m for m, leaves in by_module.items() if {"running_mean", "running_var"} <= leaves and NBT not in leaves}


def _join(mod: str, leaf: str) -> str:
    return f"{mod}.{leaf}" if mod else leaf


def check_plan(slots: list[Slot], problems: list[str]) -> None:
    seen: dict[str, str] = {}
    for s in slots:
        if s.torch_key in seen:
            problems.append(f"key map sends both {seen[s.torch_key]} and {s.flax_path} to torch key {s.torch_key!r}")
        seen[s.torch_key] = s.flax_path


def import_arrays(slots: list[Slot], state_dict: Mapping[str, Any], *, strict: bool, cast: bool,
                  problems: list[str] | None = None, strip_prefix: str | None = None) -> dict[str, np.ndarray]:
    """Checks ``state_dict`` against the plan and returns ``{flax_path: array in Flax layout/dtype}``.

    Raises one :class:`ConversionError` listing every problem, with diagnoses of the whole set as its
    ``hints`` (a key prefix to strip; most keys failing: another architecture); with ``strict=False``
    missing variables (left out of the result) and unexpected keys are reported by a
    :class:`ConversionWarning` instead. ``strip_prefix`` (``"module."``) is removed from the keys that
    start with it before matching.
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping {{torch key: tensor or array}}, got {type(state_dict).__name__}")
    problems = list(problems or [])
    if strip_prefix is not None:
        state_dict = _strip_prefix(state_dict, strip_prefix, problems)
    check_plan(slots, problems)
    soft: list[str] = []
    out: dict[str, np.ndarray] = {}
    used: set[str] = set()
    fits = 0  # checkpoint keys that match a variable by name and shape
    for s in slots:
        if s.torch_key not in state_dict:
            if s.is_nbt:
                continue  # old torch checkpoints have none; the module keeps its counter (torch does the same)
            soft.append(f"missing: {s.flax_path} (torch key {s.torch_key!r}) is not in the checkpoint")
            continue
        used.add(s.torch_key)
        fits += 1  # the name matches; taken back below if the shape does not
        try:
            value = tensor_to_numpy(state_dict[s.torch_key])
        except (TypeError, ValueError) as e:
            problems.append(f"{s.torch_key}: {e}")
            continue
        v = to_flax_layout(s, value)
        if isinstance(v, str):
            problems.append(v)
            fits -= 1
            continue
        v = _convert_dtype(s, v, cast)
        if isinstance(v, str):
            problems.append(v)
            continue
        out[s.flax_path] = _c(v)
    # a torch BatchNorm's counter has no Flax home when the Flax BN does not keep one (flax.nnx.BatchNorm)
    droppable = {_join(m, NBT) for m in _bn_groups(slots)}
    unexpected: list[str] = []
    for key in state_dict:
        if not isinstance(key, str):
            problems.append(f"state_dict keys must be strings, got {key!r}")
        elif key not in used and key not in droppable:
            unexpected.append(key)
            soft.append(f"unexpected: checkpoint key {key!r} matches no Flax variable")
    if strict:
        problems = soft + problems
    if problems:
        hints = diagnose(slots, state_dict, fits=fits, unexpected=unexpected)
        raise ConversionError(problems, header="torch -> Flax conversion failed; nothing was loaded", hints=hints)
    if soft:
        warnings.warn(ConversionError(soft, header="non-strict torch -> Flax conversion skipped keys").args[0],
                      ConversionWarning, stacklevel=3)
    return out


def _strip_prefix(state_dict: Mapping[str, Any], prefix: Any, problems: list[str]) -> dict[str, Any]:
    """``state_dict`` with ``prefix`` removed from the keys that start with it (a collision is a problem)."""
    if not isinstance(prefix, str) or not prefix.strip("."):
        raise TypeError(f"strip_prefix must be a non-empty string such as 'module.', got {prefix!r}")
    prefix = prefix if prefix.endswith(".") else prefix + "."
    out: dict[str, Any] = {}
    origin: dict[str, Any] = {}
    for key, value in state_dict.items():
        new = key[len(prefix):] if isinstance(key, str) and key.startswith(prefix) else key
        if new in out:
            problems.append(f"strip_prefix={prefix!r}: checkpoint keys {origin[new]!r} and {key!r} are both "
                            f"{new!r} once stripped")
            continue
        out[new], origin[new] = value, key
    return out


def _prefix_hint(expected: set[str], unexpected: list[str]) -> str | None:
    """"strip 'module.'" when removing one leading prefix from the unexpected keys makes them match."""
    counts: dict[str, int] = {}
    for key in unexpected:
        parts = key.split(".")
        for n in (1, 2):
            if len(parts) > n and ".".join(parts[n:]) in expected:
                p = ".".join(parts[:n]) + "."
                counts[p] = counts.get(p, 0) + 1
    if not counts:
        return None
    prefix, n = max(counts.items(), key=lambda kv: kv[1])
    if n < max(1, len(unexpected) // 2):
        return None
    ddp = " (DataParallel / DistributedDataParallel checkpoints put every key under 'module.')" \
        if prefix == "module." else ""
    return (f"hint: {n} of the {len(unexpected)} unexpected checkpoint keys match once their prefix {prefix!r} is "
            f"removed: strip {prefix!r} (pass strip_prefix={prefix!r}){ddp}")


def diagnose(slots: list[Slot], state_dict: Mapping[str, Any], *, fits: int, unexpected: list[str]) -> list[str]:
    """Diagnoses of a failed import as a whole: a prefix to strip; most keys failing (another architecture)."""
    hints = []
    expected = {s.torch_key for s in slots}
    prefix = _prefix_hint(expected, unexpected)
    if prefix is not None:
        hints.append(prefix)
    wanted = sum(1 for s in slots if not s.is_nbt)
    n_keys = len(state_dict)
    if prefix is None and fits * 2 < max(wanted, n_keys):
        hints.append(f"hint: only {fits} of the checkpoint's {n_keys} keys match one of the model's {wanted} "
                     "variables by name and shape: the checkpoint is probably of another architecture "
                     "(or needs another key_map)")
    return hints


def host_value(slot: Slot, value: Any, problems: list[str]) -> np.ndarray | None:
    """A variable's value on the host, or ``None`` (and a problem) for an abstract value."""
    if isinstance(value, jax.ShapeDtypeStruct):
        problems.append(f"{slot.flax_path} has no value (an abstract, eval_shape'd variable): load or "
                        "initialise it before exporting")
        return None
    return np.asarray(jax.device_get(value))


def export_arrays(slots: list[Slot], values: Mapping[str, Any],
                  problems: list[str] | None = None) -> dict[str, np.ndarray]:
    """``{flax_path: value}`` -> ``{torch key: numpy array in torch layout/dtype}``."""
    problems = list(problems or [])
    check_plan(slots, problems)
    values = {s.flax_path: host_value(s, values[s.flax_path], problems) for s in slots}
    if problems:
        raise ConversionError(problems, header="Flax -> torch conversion failed")
    out: dict[str, np.ndarray] = {}
    for s in slots:
        v = np.asarray(values[s.flax_path])
        out[s.torch_key] = _c(to_torch_layout(s, v).astype(export_dtype(s), copy=False))
    for mod in sorted(_bn_groups(slots)):
        out[_join(mod, NBT)] = np.zeros((), np.int64)  # a Flax BN without a counter: torch's initial value
    return out
