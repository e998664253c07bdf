"""Taps: how the CAM engine reads a layer's activations and the gradient of a target with respect to them.

A tap turns a model into the pure function ``run(x, probes) -> (output, [A_1, ..., A_L])``: the forward
pass of the model in which the output of every target layer ``l`` is replaced by ``A_l + probes[l]``
(``probes=None``: nothing added). The probes are zeros, so values are unchanged, and the gradient of any
function of the output with respect to ``probes[l]`` IS its gradient with respect to the activation ``A_l``
-- and nothing else: not the input, not the parameters (``jax.vjp`` over the probes only differentiates the
part of the network downstream of the taps). No hooks, nothing left behind:

* :class:`NNXTap` (``flax.nnx`` modules, target layers by attribute path ``"layer4"``, ``"layer4.1"``,
  ``"features.-1"``): every call works on a *copy* made with ``nnx.split``/``nnx.merge``; the submodule at
  each path is swapped, in the copy only, for a wrapper that adds the probe and records the output. The
  user's module is never modified (also not when an exception is raised) and the copy is put in eval mode
  (like grad-cam's ``model.eval()``) without touching the original. Works under ``jax.jit``/``nnx.jit``
  and inside ``nnx.grad`` (the copy shares the traced state).
* :class:`LinenTap` (``flax.linen`` modules + variables, target layers by module path ``"layer4"``,
  ``"backbone/block_1"``): the probe is added by an ``nn.intercept_methods`` interceptor active only inside
  ``run``.
* :class:`FunctionTap`: a plain pair ``features(x) -> A`` and ``head(A) -> output``.

A target layer must be called exactly once per forward pass; otherwise a ``ValueError`` says so.

``run(x, probes, replace={path: array})`` REPLACES the output of the named target layers by the given arrays
(the layer itself is not called, nothing is added): the forward pass then only depends on ``x`` through the
layers that are not upstream of a replaced one, so under ``jax.jit`` the upstream computation is dead code
that XLA removes (AblationCAM's ablated forward passes run only the network downstream of the tapped layer).
A replaced layer's recorded activation is the replacement.
"""

from __future__ import annotations

import dataclasses
import functools
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import jax
import numpy as np
from flax import nnx

__all__ = ["FunctionTap", "LinenTap", "NNXTap", "Tap", "make_tap", "structural_key"]

Probes = Sequence[jax.Array] | None
Replace = Mapping[str, jax.Array] | None


class Tap:
    """Interface of the taps: ``layers`` (names), ``run(x, probes)``, and a split for ``jax.jit`` caching.

    ``split()`` returns ``(static, dynamic)``: ``static`` is hashable (a jit cache key: a change of it means
    recompilation), ``dynamic`` a pytree of arrays (parameters); ``rebuild(static, dynamic)`` returns an
    equivalent tap, to be used inside the jitted function.
    """

    layers: tuple[str, ...]

    def run(self, x: jax.Array, probes: Probes = None, *,
            replace: Replace = None) -> tuple[Any, list[jax.Array]]:  # pragma: no cover
        """``(output, [A_1, ..., A_L])``; ``probes[l]`` is added to layer ``l``'s output, ``replace[path]``
        replaces it (the layer is not run)."""
        raise NotImplementedError

    def split(self) -> tuple[Any, Any]:
        return self, ()

    def rebuild(self, static: Any, dynamic: Any) -> Tap:
        return static


def _check_layers(layers: Any, resolve: Callable[[int, Any], str] | None = None) -> tuple[str, ...]:
    """Path strings; module objects (grad-cam's ``[model.layer4]``) go through ``resolve(index, obj)``."""
    if isinstance(layers, str) or not isinstance(layers, (list, tuple)):
        layers = [layers]
    out = []
    for i, p in enumerate(layers):
        if not isinstance(p, str):
            if resolve is None:
                raise TypeError(f"target_layers[{i}]: expected a path string such as 'layer4', got "
                                f"{type(p).__name__}")
            p = resolve(i, p)
        out.append(p)
    if not out:
        raise TypeError("target_layers: expected a non-empty list of paths such as ['layer4'], got an empty list")
    if len(set(out)) != len(out):
        raise ValueError(f"target_layers: duplicate paths in {out}")
    return tuple(out)


class _Id:
    """Hashable by identity; holds a reference, so the id cannot be reused while a cache keeps the key."""

    __slots__ = ("obj",)

    def __init__(self, obj: Any):
        self.obj = obj

    def __hash__(self) -> int:
        return id(self.obj)

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, _Id) and other.obj is self.obj


def _global_names(code: types.CodeType) -> list[str]:
    """Names a code object (and the code nested in it) may read from its globals."""
    names = list(code.co_names)
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            names.extend(_global_names(c))
    return sorted(set(names))


_SMALL_ARRAY = 1024  # constants up to this many elements are keyed by value, larger ones by identity


def structural_key(obj: Any, _depth: int = 0) -> Any:
    """A hashable key equal for objects that behave the same under tracing (the CAM compile-cache key).

    Plain values by value; tuples, lists and dicts element-wise; functions by their code, defaults and the
    keys of their closure cells and of the globals they read (so ``lambda o: o[c]`` rebuilt with the same
    ``c``, local or global, is the same key, and with another ``c`` another key);
    ``functools.partial`` and bound methods by their parts; dataclasses (the CAM targets) by type and
    fields; small concrete arrays by value; objects with their own ``__eq__``/``__hash__`` by themselves;
    anything else (and tracers) by identity. As with ``jax.jit``, the contents of other mutable objects a
    function reads (an attribute of a module, an NNX model's parameters) are read when it is traced.

    Example:
        >>> def target(c):
        ...     return lambda o: o[c]
        >>> structural_key(target(3)) == structural_key(target(3)), structural_key(target(3)) == structural_key(target(4))
        (True, False)
    """
    if _depth > 8:
        return ("id", _Id(obj))
    d = _depth + 1
    if obj is None or isinstance(obj, (bool, int, float, complex, str, bytes)):
        return ("v", type(obj), obj)
    if isinstance(obj, (tuple, list)):
        return ("seq", type(obj), tuple(structural_key(v, d) for v in obj))
    if isinstance(obj, dict):
        try:
            items = sorted(obj.items())
        except TypeError:
            return ("id", _Id(obj))
        return ("dict", tuple((k, structural_key(v, d)) for k, v in items))
    if isinstance(obj, jax.core.Tracer):
        return ("id", _Id(obj))
    if isinstance(obj, (jax.Array, np.ndarray, np.generic)):
        if obj.size <= _SMALL_ARRAY:
            a = np.asarray(obj)
            return ("array", a.shape, str(a.dtype), a.tobytes())
        return ("id", _Id(obj))
    if isinstance(obj, types.FunctionType):
        cells = []
        for c in obj.__closure__ or ():
            try:
                v = c.cell_contents
            except ValueError:  # an empty cell
                v = None
            cells.append(structural_key(v, d))
        g = obj.__globals__
        used = tuple((n, structural_key(g[n], d)) for n in _global_names(obj.__code__) if n in g)
        return ("fn", obj.__code__, _Id(g), used, structural_key(obj.__defaults__, d),
                structural_key(obj.__kwdefaults__, d), tuple(cells))
    if isinstance(obj, functools.partial):
        return ("partial", structural_key(obj.func, d), structural_key(obj.args, d),
                structural_key(obj.keywords, d))
    if isinstance(obj, types.MethodType):
        return ("method", structural_key(obj.__func__, d), structural_key(obj.__self__, d))
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return ("dataclass", type(obj),
                tuple((f.name, structural_key(getattr(obj, f.name), d)) for f in dataclasses.fields(obj)))
    if type(obj).__eq__ is not object.__eq__ and type(obj).__hash__ is not None:
        try:
            hash(obj)
            return ("obj", type(obj), obj)
        except TypeError:
            pass
    return ("id", _Id(obj))


def _check_replace(layers: Sequence[str], replace: Replace) -> Mapping[str, jax.Array]:
    """``replace`` as a mapping over tapped paths, or a clear error."""
    if replace is None:
        return {}
    if not isinstance(replace, Mapping):
        raise TypeError(f"replace: expected a mapping {{layer path: array}}, got {type(replace).__name__}")
    unknown = [k for k in replace if k not in layers]
    if unknown:
        raise ValueError(f"replace: {unknown} are not target layers of this tap; target layers: {list(layers)}")
    for k, v in replace.items():
        if not hasattr(v, "shape") or not hasattr(v, "dtype"):
            raise TypeError(f"replace[{k!r}]: expected an array, got {type(v).__name__}")
    return replace


def _add_probe(path: str, y: Any, probe: jax.Array | None, sink: dict[str, jax.Array]) -> jax.Array:
    if not isinstance(y, jax.Array) and not hasattr(y, "shape"):
        raise TypeError(f"target layer {path!r} returned {type(y).__name__}, expected a single array")
    if path in sink:
        raise ValueError(
            f"target layer {path!r} is called more than once in the forward pass (shared module?): "
            f"tap a module that runs exactly once"
        )
    if probe is not None:
        if tuple(probe.shape) != tuple(y.shape):
            raise ValueError(f"probe for {path!r}: expected shape {tuple(y.shape)}, got {tuple(probe.shape)}")
        y = y + probe.astype(y.dtype)
    sink[path] = y
    return y


def _collect(layers: Sequence[str], sink: Mapping[str, jax.Array], available: Callable[[], list[str]]):
    missing = [p for p in layers if p not in sink]
    if missing:
        raise ValueError(f"target layers {missing} were not called in the forward pass; called modules: "
                         f"{available()}")
    return [sink[p] for p in layers]


# ------------------------------------------------------------------------------------------------------
# NNX
# ------------------------------------------------------------------------------------------------------

def nnx_module_paths(model: nnx.Module) -> list[str]:
    """Dotted attribute paths of every submodule (``Sequential``'s ``layers`` hidden: ``"layer4.1"``)."""
    out = []
    for path, _ in nnx.iter_modules(model):
        if not path:
            continue
        parts: list[str] = []
        obj: Any = model
        for p in path:
            if isinstance(obj, nnx.Sequential) and p == "layers":
                obj = obj.layers
                continue
            obj = obj[p] if isinstance(p, int) else getattr(obj, cast(str, p))  # nnx path parts: int or str
            parts.append(str(p))
        if parts:  # a Sequential's own ``layers`` list is not a path
            out.append(".".join(parts))
    return sorted(set(out), key=lambda s: (s.count("."), s))


def _resolve(model: Any, path: str) -> tuple[Any, Any, Any]:
    """Returns (parent container, key, object) for a dotted path; raises listing the available paths."""
    obj, parent = model, None
    key: str | int | None = None
    for part in path.split("."):
        nxt = None
        if part and not part.lstrip("-").isdigit() and hasattr(obj, part) and not part.startswith("_"):
            parent, key, nxt = obj, part, getattr(obj, part)
        elif part.lstrip("-").isdigit():
            seq = obj.layers if isinstance(obj, nnx.Sequential) else obj
            try:
                n = len(seq)
                i = int(part)
                if -n <= i < n:
                    parent, key, nxt = seq, i % n, seq[i % n]
            except TypeError:
                nxt = None
        if nxt is None or not callable(nxt):
            raise ValueError(
                f"unknown target layer path {path!r} (failed at {part!r}); available paths: "
                f"{nnx_module_paths(model) if isinstance(model, nnx.Module) else '?'}"
            )
        obj = nxt
    return parent, key, obj


def nnx_path_of(model: nnx.Module, layer: Any, index: int = 0) -> str:
    """The dotted path of the submodule object ``layer`` in ``model`` (grad-cam's ``[model.layer4]``).

    Example:
        >>> from flax import nnx
        >>> m = nnx.Sequential(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
        >>> nnx_path_of(m, m.layers[0])
        '0'
    """
    for p in nnx_module_paths(model):
        if _resolve(model, p)[2] is layer:
            return p
    if layer is model:
        raise ValueError(f"target_layers[{index}]: the model itself cannot be a target layer; pass a submodule "
                         "path such as 'layer4'")
    raise ValueError(f"target_layers[{index}]: this {type(layer).__name__} is not a submodule of the model; pass "
                     f"a path string such as 'layer4' (available: {nnx_module_paths(model)[:12]} ...)")


class _Probe:
    """Stand-in for a submodule in the working copy: calls it, adds the probe, records the output (or, with a
    replacement, returns the replacement without calling it)."""

    def __init__(self, inner: Callable, path: str, probe: jax.Array | None, sink: dict[str, jax.Array],
                 replacement: jax.Array | None = None):
        self.inner, self.path, self.probe, self.sink = inner, path, probe, sink
        self.replacement = replacement

    def __call__(self, *args, **kwargs):
        y = self.inner(*args, **kwargs) if self.replacement is None else self.replacement
        return _add_probe(self.path, y, self.probe, self.sink)


class NNXTap(Tap):
    """Tap of a ``flax.nnx`` module by attribute paths (see the module docstring).

    ``call`` selects the forward function (default ``model(x)``); ``eval_mode=True`` (default, as
    grad-cam) runs the copy with ``.eval()`` (BatchNorm running statistics, dropout off).

    Example:
        >>> from flax import nnx
        >>> import jax.numpy as jnp
        >>> model = nnx.Sequential(nnx.Conv(3, 4, (3, 3), rngs=nnx.Rngs(0)), lambda a: a.mean((1, 2)))
        >>> out, (act,) = NNXTap(model, ["0"]).run(jnp.ones((1, 8, 8, 3)))
        >>> act.shape
        (1, 8, 8, 4)
    """

    def __init__(self, model: nnx.Module, target_layers: Sequence[str], *,
                 call: Callable[[nnx.Module, jax.Array], Any] | None = None, eval_mode: bool = True):
        if not isinstance(model, nnx.Module):
            raise TypeError(f"NNXTap: expected a flax.nnx.Module, got {type(model).__name__}")
        self.model = model
        self.layers = _check_layers(target_layers, lambda i, obj: nnx_path_of(model, obj, i))
        for p in self.layers:
            _resolve(model, p)
        self.call = call
        self.eval_mode = eval_mode

    def run(self, x, probes=None, *, replace=None):
        graphdef, state = nnx.split(self.model)
        return self._run(graphdef, state, x, probes, replace)

    def _run(self, graphdef, state, x, probes, replace=None):
        rep = _check_replace(self.layers, replace)
        work = nnx.merge(graphdef, state)
        if self.eval_mode:
            work.eval()
        sink: dict[str, jax.Array] = {}
        for i, p in enumerate(self.layers):
            parent, key, obj = _resolve(work, p)
            wrapper = _Probe(obj, p, None if probes is None else probes[i], sink, rep.get(p))
            if isinstance(key, int):
                parent[key] = wrapper
            else:
                setattr(parent, key, wrapper)
        out = work(x) if self.call is None else self.call(work, x)
        return out, _collect(self.layers, sink, lambda: nnx_module_paths(self.model))

    def split(self):
        graphdef, state = nnx.split(self.model)
        # reuse the previous static key while the structure is unchanged: its hash is computed once and
        # jit's cache lookup then hits the identity fast path (hashing a ResNet-50 graphdef costs ~10 ms)
        last = getattr(self, "_last_static", None)
        if last is None or last.graphdef != graphdef:
            last = self._last_static = _NNXStatic(graphdef, self.layers, self.call, self.eval_mode)
        return last, state

    def rebuild(self, static, dynamic):
        return _NNXSplitTap(static, dynamic)


class _NNXStatic:
    """The jit cache key of an NNX tap: equal for taps of models with the same structure (graphdef), paths,
    ``call`` and mode, whichever objects they are (a new CAM object on the same model shares compilations)."""

    def __init__(self, graphdef, layers, call, eval_mode):
        self.key = (graphdef, layers, structural_key(call), eval_mode)
        self.graphdef, self.layers, self.call, self.eval_mode = graphdef, layers, call, eval_mode
        self._hash = hash(self.key)

    def __hash__(self):
        return self._hash

    def __eq__(self, other):
        return self is other or (isinstance(other, _NNXStatic) and self._hash == other._hash and self.key == other.key)


class _NNXSplitTap(NNXTap):
    def __init__(self, static: _NNXStatic, state):
        self.static, self.state = static, state
        self.layers, self.call, self.eval_mode = static.layers, static.call, static.eval_mode
        self.model = None  # type: ignore[assignment]  # rebuilt inside jit from (graphdef, state): no model

    def run(self, x, probes=None, *, replace=None):
        return self._run(self.static.graphdef, self.state, x, probes, replace)


# ------------------------------------------------------------------------------------------------------
# Linen
# ------------------------------------------------------------------------------------------------------

class LinenTap(Tap):
    """Tap of a ``flax.linen`` module by module path (``"layer4"``, ``"stage2/block1"``; ``.`` works too).

    ``apply_kwargs`` are passed to ``module.apply`` (e.g. ``{"train": False}``); ``method`` selects the
    module method (default ``__call__``). Only ``__call__`` of submodules can be tapped.

    Example:
        >>> import flax.linen as nn, jax, jax.numpy as jnp
        >>> class Net(nn.Module):
        ...     @nn.compact
        ...     def __call__(self, x):
        ...         return nn.Dense(3, name="head")(nn.Conv(4, (3, 3), name="conv")(x).mean((1, 2)))
        >>> net = Net(); x = jnp.ones((1, 8, 8, 3)); v = net.init(jax.random.key(0), x)
        >>> LinenTap(net, v, ["conv"]).run(x)[1][0].shape
        (1, 8, 8, 4)
    """

    def __init__(self, module: Any, variables: Any, target_layers: Sequence[str], *,
                 apply_kwargs: Mapping[str, Any] | None = None, method: str | Callable | None = None):
        import flax.linen as nn

        if not isinstance(module, nn.Module):
            raise TypeError(f"LinenTap: expected a flax.linen.Module, got {type(module).__name__}")
        self.module, self.variables = module, variables
        def not_an_object(i: int, obj: Any) -> str:
            raise TypeError(f"target_layers[{i}]: a Linen submodule cannot be located by object "
                            f"({type(obj).__name__}); pass its path string, e.g. 'layer4' or 'stage2/block1'")

        self.layers = tuple(p.replace(".", "/") for p in _check_layers(target_layers, not_an_object))
        self.apply_kwargs = dict(apply_kwargs or {})
        self.method = method

    def run(self, x, probes=None, *, replace=None):
        return self._run(self.variables, x, probes, replace)

    def _run(self, variables, x, probes, replace=None):
        import flax.linen as nn

        rep = _check_replace(self.layers, None if replace is None else {
            k.replace(".", "/"): v for k, v in replace.items()} if isinstance(replace, Mapping) else replace)
        sink: dict[str, jax.Array] = {}
        seen: list[str] = []
        index = {p: i for i, p in enumerate(self.layers)}

        def interceptor(next_fun, args, kwargs, context):
            if context.method_name != "__call__" or context.module.scope is None:
                return next_fun(*args, **kwargs)
            path = "/".join(str(s) for s in context.module.scope.path)
            if path in rep:  # replaced: the submodule is not run
                seen.append(path)
                return _add_probe(path, rep[path], None if probes is None else probes[index[path]], sink)
            y = next_fun(*args, **kwargs)
            if not path:
                return y
            seen.append(path)
            if path in index:
                y = _add_probe(path, y, None if probes is None else probes[index[path]], sink)
            return y

        from flax.errors import ModifyScopeVariableError

        with nn.intercept_methods(interceptor):
            kw = dict(self.apply_kwargs)
            if self.method is not None:
                kw["method"] = self.method
            try:
                out = self.module.apply(variables, x, **kw)
            except ModifyScopeVariableError as e:
                raise ValueError(
                    f"the Linen model tried to update a variable while being explained ({e.__class__.__name__}): "
                    "it runs in training mode (BatchNorm statistics); pass the flag that selects eval mode, "
                    "e.g. apply_kwargs={'train': False} (GradCAM((module, variables), [...], "
                    "apply_kwargs={'train': False}))"
                ) from None
        missing = [p for p in self.layers if p not in sink]
        if missing:
            raise ValueError(f"unknown target layer path(s) {missing}; available paths: {sorted(set(seen))}")
        return out, [sink[p] for p in self.layers]

    def split(self):
        static = getattr(self, "_static", None)
        if static is None:
            key = structural_key((type(self), self.module, self.layers, self.apply_kwargs, self.method))
            bare = object.__new__(LinenTap)  # the same tap without its variables: a cache key holds no weights
            bare.__dict__.update(self.__dict__, variables=None)
            static = self._static = _KeyedStatic(key, bare)
        return static, self.variables

    def rebuild(self, static, dynamic):
        return _BoundLinen(static.tap, dynamic)


class _BoundLinen(Tap):
    def __init__(self, tap: LinenTap, variables):
        self.tap, self.variables, self.layers = tap, variables, tap.layers

    def run(self, x, probes=None, *, replace=None):
        return self.tap._run(self.variables, x, probes, replace)


class _KeyedStatic:
    """The jit cache key of a tap whose structure lives in Python objects: equal for taps built from
    equal parts (:func:`structural_key`); ``tap`` is the first such tap, used to rebuild inside jit."""

    def __init__(self, key: Any, tap: Tap):
        self.key, self.tap, self._hash = key, tap, hash(key)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: Any) -> bool:
        return self is other or (isinstance(other, _KeyedStatic) and self._hash == other._hash
                                 and self.key == other.key)


# ------------------------------------------------------------------------------------------------------
# plain functions
# ------------------------------------------------------------------------------------------------------

class FunctionTap(Tap):
    """Tap of a model given as ``features(x) -> A`` and ``head(A) -> output`` (one target layer).

    Example:
        >>> import jax.numpy as jnp
        >>> tap = FunctionTap(lambda x: x * 2.0, lambda a: a.mean((1, 2)))
        >>> tap.run(jnp.ones((1, 4, 4, 3)))[1][0].shape
        (1, 4, 4, 3)
    """

    def __init__(self, features: Callable[[jax.Array], jax.Array], head: Callable[[jax.Array], Any],
                 *, name: str = "features"):
        if not callable(features) or not callable(head):
            raise TypeError("FunctionTap: expected two callables, features(x) -> A and head(A) -> output")
        self.features, self.head = features, head
        self.layers = (name,)

    def run(self, x, probes=None, *, replace=None):
        rep = _check_replace(self.layers, replace)
        sink: dict[str, jax.Array] = {}
        name = self.layers[0]
        a = rep[name] if name in rep else self.features(x)  # replaced: features are not computed
        a = _add_probe(name, a, None if probes is None else probes[0], sink)
        return self.head(a), [a]

    def split(self):
        static = getattr(self, "_static", None)
        if static is None:
            static = self._static = _KeyedStatic(
                structural_key((type(self), self.features, self.head, self.layers)), self)
        return static, ()

    def rebuild(self, static, dynamic):
        return static.tap


def make_tap(model: Any, target_layers: Sequence[str] | None = None, **kwargs: Any) -> Tap:
    """Builds the right tap: a :class:`Tap` as is; an ``nnx.Module`` -> :class:`NNXTap`; a
    ``(linen_module, variables)`` pair -> :class:`LinenTap`; a ``(features, head)`` pair of callables ->
    :class:`FunctionTap`.

    Example:
        >>> import jax.numpy as jnp
        >>> make_tap((lambda x: x, lambda a: a.sum((1, 2)))).layers
        ('features',)
    """
    if isinstance(model, Tap):
        return model
    if isinstance(model, nnx.Module):
        return NNXTap(model, target_layers if target_layers is not None else [], **kwargs)
    if isinstance(model, tuple) and len(model) == 2:
        import flax.linen as nn

        if isinstance(model[0], nn.Module):
            return LinenTap(model[0], model[1], target_layers if target_layers is not None else [], **kwargs)
        if callable(model[0]) and callable(model[1]):
            if target_layers not in (None, [], (), ["features"]):
                raise ValueError(f"target_layers: a (features, head) pair has a single tap, got {target_layers}")
            return FunctionTap(model[0], model[1], **kwargs)
    raise TypeError(
        "model: expected a flax.nnx.Module, a (flax.linen.Module, variables) pair, a (features, head) pair of "
        f"callables, or a Tap; got {type(model).__name__}"
    )
