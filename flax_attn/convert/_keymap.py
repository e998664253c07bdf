"""Key maps: how Flax module paths are named in a PyTorch ``state_dict``, and a registry of them.

Imports nothing else of the package (the rule engine ``_rules`` builds on it, never the other way).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Union

Path = tuple[str, ...]
KeyMapLike = Union["KeyMap", str, None]


# Flax leaf name -> PyTorch leaf name (the fixed part of every key). Anything else keeps its name.
LEAF_NAMES: dict[str, str] = {
    "kernel": "weight",        # Dense / Conv
    "scale": "weight",         # BatchNorm / LayerNorm / GroupNorm
    "embedding": "weight",     # Embed
    "bias": "bias",
    "mean": "running_mean",    # BatchNorm statistics
    "var": "running_var",
    "num_batches_tracked": "num_batches_tracked",
}

NBT = "num_batches_tracked"


def torch_leaf_name(leaf: str) -> str:
    return LEAF_NAMES.get(leaf, leaf)


def _split(path: str | Iterable[str]) -> Path:
    if isinstance(path, str):
        if path == "":
            return ()
        parts = tuple(path.split("."))
    else:
        parts = tuple(str(p) for p in path)
    if any(p == "" for p in parts):
        raise ValueError(f"invalid module path {path!r}: empty component")
    return parts


def _starts_with(path: Path, prefix: Path) -> bool:
    return len(path) >= len(prefix) and path[: len(prefix)] == prefix


@dataclass(frozen=True)
class KeyMap:
    """Renames Flax module paths into PyTorch ``state_dict`` module paths (and marks 1x1-conv Denses).

    A key map works on *module paths* (dot-joined, list indices included: ``layer1.0.attn``); the leaf
    names (``kernel`` <-> ``weight``, ``mean`` <-> ``running_mean`` ...) and tensor layouts are the fixed
    rule table of :mod:`flax_attn.convert`, not part of the map. Three ingredients:

    * ``renames``: ``{flax_prefix: torch_prefix}``. A module path that starts with ``flax_prefix``
      (whole components) has that prefix replaced; the longest matching prefix wins; paths no rule
      matches keep their name (identity). ``{"fc1": "fc.0"}`` maps ``fc1.kernel`` to ``fc.0.weight``.
    * ``conv1x1``: Flax module paths of Denses stored in PyTorch as 1x1 convolutions
      (``(out, in, 1, 1)``, with ``conv1x1_dims`` trailing ones): export writes that shape. Import accepts
      a 1x1-conv tensor for *any* Dense, by shape, whether marked or not.
    * ``nested``: ``{flax_prefix: KeyMap or registered name}``: the sub-map applies to the paths under
      ``flax_prefix`` (relative to it); the prefix itself is renamed by this map's ``renames``. This is
      how a model map embeds block maps: a ResNet whose ``layer1.0.attn`` is an official-CBAM block::

          KeyMap({"fc": "classifier"}, nested={"layer1.0.attn": "cbam_official"})

      maps ``layer1.0.attn.channel.fc1.kernel`` to ``layer1.0.attn.ChannelGate.mlp.1.weight``.
      Nested maps nest (a sub-map may have its own ``nested``); the longest matching prefix wins.

    Converting an NNX module adds nested maps automatically: every sub-module that records a preset
    (``module.preset``, set by :func:`flax_attn.layers.create_attn`) gets that preset's registered map at
    its path, unless the map in use already has a nested entry at exactly that path. So a backbone's map
    only has to describe the backbone's own names.

    Example:
        >>> km = KeyMap({"fc1": "fc.0", "fc2": "fc.2"})
        >>> km.torch_key("fc2.kernel")
        'fc.2.weight'
        >>> KeyMap(nested={"blocks.3.se": "se_torchvision"}).torch_key("blocks.3.se.fc1.kernel")
        'blocks.3.se.fc1.weight'
    """

    renames: Mapping[str, str] = field(default_factory=dict)
    conv1x1: Iterable[str] = ()
    nested: Mapping[str, KeyMap | str] = field(default_factory=dict)
    conv1x1_dims: int = 2
    name: str | None = None
    # derived from the fields above in __post_init__ (lookup tables, not part of the map's identity)
    _renames: tuple[tuple[Path, Path], ...] = field(init=False, repr=False, compare=False)
    _nested: tuple[tuple[Path, KeyMap | str], ...] = field(init=False, repr=False, compare=False)
    _conv1x1: frozenset[Path] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.renames, Mapping):
            raise TypeError(f"KeyMap renames must be a mapping {{flax_prefix: torch_prefix}}, got "
                            f"{type(self.renames).__name__}")
        if not isinstance(self.nested, Mapping):
            raise TypeError(f"KeyMap nested must be a mapping {{flax_prefix: KeyMap | name}}, got "
                            f"{type(self.nested).__name__}")
        if isinstance(self.conv1x1, str):
            raise TypeError("KeyMap conv1x1 must be an iterable of module paths, got a single string "
                            f"{self.conv1x1!r} (write conv1x1=({self.conv1x1!r},))")
        if self.conv1x1_dims not in (1, 2, 3):
            raise ValueError(f"conv1x1_dims must be 1, 2 or 3, got {self.conv1x1_dims!r}")
        renames = tuple((_split(k), _split(v)) for k, v in self.renames.items())
        for (fk, _), key in zip(renames, self.renames):
            if not fk:
                raise ValueError(f"KeyMap rename prefixes must be non-empty, got {key!r}")
        nested = []
        for k, v in self.nested.items():
            if not isinstance(v, (KeyMap, str)):
                raise TypeError(f"KeyMap nested[{k!r}] must be a KeyMap or a registered name, got "
                                f"{type(v).__name__}")
            if not _split(k):
                raise ValueError("KeyMap nested prefixes must be non-empty (use the map itself at the root)")
            nested.append((_split(k), v))
        object.__setattr__(self, "renames", dict(self.renames))
        object.__setattr__(self, "nested", dict(self.nested))
        object.__setattr__(self, "conv1x1", tuple(self.conv1x1))
        object.__setattr__(self, "_renames", tuple(sorted(renames, key=lambda kv: -len(kv[0]))))
        object.__setattr__(self, "_nested", tuple(sorted(nested, key=lambda kv: -len(kv[0]))))
        object.__setattr__(self, "_conv1x1", frozenset(_split(p) for p in self.conv1x1))

    def __hash__(self) -> int:
        return hash((tuple(sorted(self.renames.items())), self.conv1x1, self.conv1x1_dims, self.name,
                     tuple(sorted((k, v) for k, v in self.nested.items()))))

    def _same_rules(self, other: KeyMap) -> bool:
        return (self.renames, self.conv1x1, self.nested, self.conv1x1_dims) == (
            other.renames, other.conv1x1, other.nested, other.conv1x1_dims)

    # -- construction helpers ------------------------------------------------------------------------

    @classmethod
    def identity(cls) -> KeyMap:
        """The map that renames nothing (Flax names are the PyTorch names)."""
        return cls(name="identity")

    def with_nested(self, prefix: str, submap: KeyMap | str) -> KeyMap:
        """A copy of this map with ``submap`` applied under ``prefix`` (replacing an entry at that prefix)."""
        return KeyMap(self.renames, conv1x1=self.conv1x1, nested={**self.nested, prefix: submap},
                      conv1x1_dims=self.conv1x1_dims, name=self.name)

    # -- translation -----------------------------------------------------------------------------------

    def _rename(self, path: Path) -> Path:
        for fk, tk in self._renames:  # longest first
            if _starts_with(path, fk):
                return tk + path[len(fk):]
        return path

    def translate(self, module_path: str | Iterable[str]) -> tuple[str, bool]:
        """Translates a Flax *module* path to ``(torch module path, is_conv1x1)``."""
        torch_path, conv, _dims = self._translate(_split(module_path))
        return ".".join(torch_path), conv

    def _translate(self, path: Path) -> tuple[Path, bool, int]:
        for prefix, sub in self._nested:  # longest first
            if _starts_with(path, prefix):
                submap = get_key_map(sub) if isinstance(sub, str) else sub
                rest, conv, dims = submap._translate(path[len(prefix):])
                return self._rename(prefix) + rest, conv, dims
        return self._rename(path), path in self._conv1x1, self.conv1x1_dims

    def torch_key(self, flax_path: str) -> str:
        """The PyTorch ``state_dict`` key of a Flax variable path (``"fc1.kernel"`` -> ``"fc.0.weight"``)."""
        parts = _split(flax_path)
        if not parts:
            raise ValueError("flax_path must name a variable, got ''")
        module, _, _ = self._translate(parts[:-1])
        return ".".join(module + (torch_leaf_name(parts[-1]),))

    def conv1x1_dims_at(self, module_path: Path) -> tuple[bool, int]:
        _, conv, dims = self._translate(module_path)
        return conv, dims

    def add_auto_nested(self, presets: Mapping[Path, str]) -> KeyMap:
        """A copy with ``presets`` (``{flax module path: preset name}``) nested, deepest maps innermost."""
        km: KeyMap = self
        for path in sorted(presets, key=len):
            km = km._insert(path, presets[path])
        return km

    def _insert(self, path: Path, name: str) -> KeyMap:
        for prefix, sub in self._nested:
            if path == prefix:
                return self  # an explicit entry wins
            if _starts_with(path, prefix):
                submap = get_key_map(sub) if isinstance(sub, str) else sub
                new_sub = submap._insert(path[len(prefix):], name)
                if new_sub is submap:
                    return self
                return self.with_nested(".".join(prefix), new_sub)
        return self.with_nested(".".join(path), name)


# --------------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------------

_KEY_MAPS: dict[str, KeyMap] = {}
_LOCK = threading.Lock()


def _norm_name(name: str) -> str:
    if not isinstance(name, str) or not name:
        raise TypeError(f"key map name must be a non-empty string, got {name!r}")
    return name.lower().replace("-", "_")


def register_key_map(name: str, key_map: KeyMap, *, overwrite: bool = False) -> KeyMap:
    """Registers ``key_map`` under ``name`` (a preset or model name); returns it.

    ``module.preset == name`` then selects this map in :func:`torch_to_nnx` / :func:`nnx_to_torch`.

    Example:
        >>> register_key_map("my_se", KeyMap({"fc1": "squeeze", "fc2": "excite"}))  # doctest: +ELLIPSIS
        KeyMap(...)
    """
    if not isinstance(key_map, KeyMap):
        raise TypeError(f"key_map must be a KeyMap, got {type(key_map).__name__}")
    key = _norm_name(name)
    with _LOCK:
        if key in _KEY_MAPS and not overwrite and not _KEY_MAPS[key]._same_rules(key_map):
            raise ValueError(f"a key map is already registered as {name!r} (pass overwrite=True to replace it)")
        if key_map.name != key:
            key_map = KeyMap(key_map.renames, conv1x1=key_map.conv1x1, nested=key_map.nested,
                             conv1x1_dims=key_map.conv1x1_dims, name=key)
        _KEY_MAPS[key] = key_map
    return key_map


def get_key_map(name: str | KeyMap) -> KeyMap:
    """The key map registered under ``name`` (a :class:`KeyMap` is returned as is).

    Example:
        >>> get_key_map("se_classic").torch_key("fc1.kernel")
        'fc.0.weight'
    """
    if isinstance(name, KeyMap):
        return name
    key = _norm_name(name)
    try:
        return _KEY_MAPS[key]
    except KeyError:
        raise ValueError(f"no key map registered as {name!r}: expected one of {sorted(_KEY_MAPS)} "
                         "(register one with flax_attn.convert.register_key_map)") from None


def list_key_maps() -> list[str]:
    """Names of the registered key maps.

    Example:
        >>> "cbam_official" in list_key_maps()
        True
    """
    return sorted(_KEY_MAPS)


def resolve_key_map(key_map: KeyMapLike, preset: str | None = None) -> KeyMap:
    """``key_map`` (a map or a registered name); ``None``: the map of ``preset`` if given, else identity."""
    if key_map is None:
        return get_key_map(preset) if preset is not None else KeyMap.identity()
    if isinstance(key_map, (KeyMap, str)):
        return get_key_map(key_map)
    raise TypeError(f"key_map must be a KeyMap, a registered name or None, got {type(key_map).__name__}")
