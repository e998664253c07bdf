"""CAM targets: what scalar of the model output a CAM explains.

A target is called on the output of ONE example (e.g. ``(K,)`` logits, ``(H, W, K)`` channels-last
segmentation logits) and returns a scalar, as in ``pytorch_grad_cam.utils.model_targets``. The classes here
are JAX pytrees whose array fields may carry leading batch axes: ``()`` (same target for every image),
``(B,)`` (one target per image, grad-cam's list) or ``(B, T)`` (``T`` targets per image: CAMs of shape
``(B, T, H, W)`` from one forward pass). Because the fields are pytree leaves, changing a class index never
triggers recompilation. Any other callable ``output -> scalar`` is accepted too (see :func:`normalize_targets`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, NamedTuple, TypeVar, dataclass_transform

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "BinaryClassifierOutputTarget",
    "ClassifierOutputReST",
    "ClassifierOutputSoftmaxTarget",
    "ClassifierOutputTarget",
    "FinerWeightedTarget",
    "PreparedTargets",
    "RawScoresOutputTarget",
    "SemanticSegmentationTarget",
    "SoftmaxOutputTarget",
    "Target",
    "normalize_targets",
]


def _take(o: jax.Array, c: jax.Array) -> jax.Array:
    """``o[..., c]`` with a checked index: a class outside ``[0, K)`` that could not be checked eagerly (traced
    under the user's jit) gives NaN, never a clamped or wrapped class (``jnp.take``'s ``mode="fill"`` alone
    still wraps ``-1`` to ``K - 1``). The engine turns a NaN score into NaN maps."""
    c = jnp.asarray(c)
    k = o.shape[-1]
    ok = (c >= 0) & (c < k)
    val = jnp.take(o, jnp.where(ok, c, 0), axis=-1)
    return jnp.where(ok, val, jnp.asarray(jnp.nan, o.dtype))


class Target:
    """Base class of the pytree targets.

    Subclasses are frozen dataclasses registered as pytrees; ``_event_ndim`` maps each array field to the
    number of trailing axes that belong to one target (0 for a class index, 1 for a list of classes, 2 for a
    segmentation mask); any further leading axes are batch axes ``()``, ``(B,)`` or ``(B, T)``, taken from
    the field named by ``_primary``. ``scalar`` is False for targets that return a vector (usable only by
    gradient-free methods, as in grad-cam).
    """

    _event_ndim: ClassVar[dict[str, int]] = {}
    _primary: ClassVar[str] = ""
    scalar: ClassVar[bool] = True
    # declared, never set here: every concrete target is a dataclass (``_pytree_target``)
    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]

    def __call__(self, output: jax.Array) -> jax.Array:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- batch handling -------------------------------------------------------------------------
    def batch_shape(self) -> tuple[int, ...]:
        if not self._primary:
            return ()
        leaf = jnp.shape(getattr(self, self._primary))
        return tuple(leaf[: len(leaf) - self._event_ndim[self._primary]])

    def broadcast(self, batch: int) -> tuple[Target, int, bool]:
        """Leaves reshaped to ``(B, T, *event)``; returns (target, T, whether a target axis was given)."""
        bs = self.batch_shape()
        name = type(self).__name__
        if len(bs) > 2:
            raise ValueError(f"{name}: expected batch axes (), (B,) or (B, T) on {self._primary!r}, got {bs}")
        if len(bs) >= 1 and bs[0] != batch:
            raise ValueError(
                f"{name}: got {bs[0]} targets for a batch of {batch} images (expected one per image, "
                f"shape ({batch},) or ({batch}, T)); grad-cam would silently return zero maps here"
            )
        t = bs[1] if len(bs) == 2 else 1
        lead = (batch, t)
        fields = {}
        for f, e in self._event_ndim.items():
            leaf, xp = _as_leaf(getattr(self, f))
            leaf_bs = leaf.shape[: leaf.ndim - e]
            event = leaf.shape[leaf.ndim - e:]
            if leaf_bs == bs and len(bs) == 1:
                leaf = xp.broadcast_to(leaf.reshape((batch, 1) + event), lead + event)
            elif leaf_bs == bs and len(bs) == 2:
                pass
            elif leaf_bs == ():
                leaf = xp.broadcast_to(leaf, lead + event)
            else:
                raise ValueError(
                    f"{name}.{f}: batch axes {leaf_bs} do not match {self._primary!r}'s {bs} (expected {bs} or ())"
                )
            fields[f] = leaf
        return dataclasses.replace(self, **fields), t, len(bs) == 2

    def validate(self, output_shape: tuple[int, ...]) -> None:
        """Checks concrete class indices against the per-example output shape (no-op on traced values)."""


def _as_leaf(value: Any) -> tuple[Any, Any]:
    """A target field as an array and the array module to reshape it with.

    Class indices that are not traced stay NumPy (int32), so that they can still be checked against the
    output size when the engine itself runs under the user's ``jax.jit`` (a ``jnp`` op there would turn
    them into tracers); traced values and floating fields (masks, weights) stay ``jnp``. The dtype is
    explicit (no weak types): ints from Python and from arrays share one jit cache entry.
    """
    if isinstance(value, jax.core.Tracer):
        leaf = jnp.asarray(value)
        return (leaf.astype(jnp.int32) if jnp.issubdtype(leaf.dtype, jnp.integer) else leaf), jnp
    arr = np.asarray(value) if not isinstance(value, jax.Array) else value
    if np.issubdtype(arr.dtype, np.integer):
        return np.asarray(arr).astype(np.int32), np
    return jnp.asarray(arr), jnp


def _check_classes(name: str, field: str, value: Any, num_classes: int) -> None:
    if isinstance(value, jax.core.Tracer):
        return
    arr = np.asarray(value)
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name}.{field}: expected integer class indices, got dtype {arr.dtype}")
    if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
        raise ValueError(
            f"{name}.{field}: class index out of range: got values in [{arr.min()}, {arr.max()}], "
            f"expected [0, {num_classes}) for a model output with {num_classes} classes"
        )


_TargetT = TypeVar("_TargetT", bound=Target)


@dataclass_transform(frozen_default=True)
def _pytree_target(cls: type[_TargetT]) -> type[_TargetT]:
    cls = dataclasses.dataclass(frozen=True)(cls)
    data = [f for f in cls._event_ndim]
    meta = [f.name for f in dataclasses.fields(cls) if f.name not in data]
    return jax.tree_util.register_dataclass(cls, data_fields=data, meta_fields=meta)


@_pytree_target
class ClassifierOutputTarget(Target):
    """The logit of ``category``: ``output[..., category]`` (grad-cam's ``ClassifierOutputTarget``).

    Example:
        >>> import jax.numpy as jnp
        >>> float(ClassifierOutputTarget(1)(jnp.array([0.5, 2.0, -1.0])))
        2.0
    """

    category: Any
    _event_ndim: ClassVar[dict[str, int]] = {"category": 0}
    _primary: ClassVar[str] = "category"

    def __call__(self, output: jax.Array) -> jax.Array:
        return _take(output, self.category)

    def validate(self, output_shape: tuple[int, ...]) -> None:
        _check_classes(type(self).__name__, "category", self.category, output_shape[-1])


@_pytree_target
class ClassifierOutputSoftmaxTarget(ClassifierOutputTarget):
    """The softmax probability of ``category`` (grad-cam's ``ClassifierOutputSoftmaxTarget``).

    Example:
        >>> import jax.numpy as jnp
        >>> round(float(ClassifierOutputSoftmaxTarget(0)(jnp.array([0.0, 0.0]))), 3)
        0.5
    """

    def __call__(self, output: jax.Array) -> jax.Array:
        return _take(jax.nn.softmax(output, axis=-1), self.category)


@_pytree_target
class ClassifierOutputReST(ClassifierOutputTarget):
    """ReST (arXiv:2501.06261): ``output[c] - cross_entropy(output, c)``, pre- and post-softmax together.

    Example:
        >>> import jax.numpy as jnp
        >>> round(float(ClassifierOutputReST(0)(jnp.array([0.0, 0.0]))), 4)
        -0.6931
    """

    def __call__(self, output: jax.Array) -> jax.Array:
        logit = _take(output, self.category)
        return logit - (jax.nn.logsumexp(output, axis=-1) - logit)


@_pytree_target
class BinaryClassifierOutputTarget(Target):
    """A single-logit binary classifier: ``output`` for ``category == 1``, ``-output`` otherwise.

    Example:
        >>> import jax.numpy as jnp
        >>> float(BinaryClassifierOutputTarget(0)(jnp.array([1.5])))
        -1.5
    """

    category: Any
    _event_ndim: ClassVar[dict[str, int]] = {"category": 0}
    _primary: ClassVar[str] = "category"

    def __call__(self, output: jax.Array) -> jax.Array:
        sign = jnp.where(jnp.asarray(self.category) == 1, 1.0, -1.0).astype(output.dtype)
        return jnp.sum(output * sign)

    def validate(self, output_shape: tuple[int, ...]) -> None:
        _check_classes(type(self).__name__, "category", self.category, 2)


@_pytree_target
class SemanticSegmentationTarget(Target):
    """Sum of the ``category`` scores of a channels-last segmentation output over ``mask`` (``(H, W)``).

    Example:
        >>> import jax.numpy as jnp
        >>> t = SemanticSegmentationTarget(1, jnp.array([[1.0, 0.0]]))
        >>> float(t(jnp.arange(4.0).reshape(1, 2, 2)))
        1.0
    """

    category: Any
    mask: Any
    _event_ndim: ClassVar[dict[str, int]] = {"category": 0, "mask": 2}
    _primary: ClassVar[str] = "category"

    def __call__(self, output: jax.Array) -> jax.Array:
        return jnp.sum(_take(output, self.category) * self.mask)

    def validate(self, output_shape: tuple[int, ...]) -> None:
        _check_classes(type(self).__name__, "category", self.category, output_shape[-1])
        if tuple(jnp.shape(self.mask)[-2:]) != tuple(output_shape[-3:-1]):
            raise ValueError(
                f"SemanticSegmentationTarget.mask: expected trailing shape {tuple(output_shape[-3:-1])} "
                f"(the output's spatial size, channels-last), got {tuple(jnp.shape(self.mask))}"
            )


@_pytree_target
class FinerWeightedTarget(Target):
    """FinerCAM's target: ``sum_k p_k (o[main] - alpha o[c_k]) / (sum_k p_k + 1e-9)``, ``p = softmax(o)``.

    ``comparison_categories`` has a trailing axis of length K (the classes to contrast with).

    Example:
        >>> import jax.numpy as jnp
        >>> t = FinerWeightedTarget(0, jnp.array([1]), 1.0)
        >>> round(float(t(jnp.array([2.0, 1.0]))), 4)
        1.0
    """

    main_category: Any
    comparison_categories: Any
    alpha: Any = 1.0
    _event_ndim: ClassVar[dict[str, int]] = {"main_category": 0, "comparison_categories": 1, "alpha": 0}
    _primary: ClassVar[str] = "main_category"

    def __call__(self, output: jax.Array) -> jax.Array:
        wn = _take(output, self.main_category)
        prob = jax.nn.softmax(output, axis=-1)
        comp = jnp.asarray(self.comparison_categories)
        w = _take(prob, comp)
        num = jnp.sum(w * (wn - self.alpha * _take(output, comp)))
        return num / (jnp.sum(w) + 1e-9)

    def validate(self, output_shape: tuple[int, ...]) -> None:
        _check_classes("FinerWeightedTarget", "main_category", self.main_category, output_shape[-1])
        _check_classes("FinerWeightedTarget", "comparison_categories", self.comparison_categories,
                       output_shape[-1])


@_pytree_target
class SoftmaxOutputTarget(Target):
    """The whole softmax vector (not a scalar: for gradient-free methods only, as in grad-cam).

    Example:
        >>> import jax.numpy as jnp
        >>> SoftmaxOutputTarget()(jnp.zeros(4)).shape
        (4,)
    """

    scalar: ClassVar[bool] = False

    def __call__(self, output: jax.Array) -> jax.Array:
        return jax.nn.softmax(output, axis=-1)


@_pytree_target
class RawScoresOutputTarget(Target):
    """The raw output itself (not a scalar: for gradient-free methods only, as in grad-cam).

    Example:
        >>> import jax.numpy as jnp
        >>> RawScoresOutputTarget()(jnp.zeros(4)).shape
        (4,)
    """

    scalar: ClassVar[bool] = False

    def __call__(self, output: jax.Array) -> jax.Array:
        return output


# ------------------------------------------------------------------------------------------------------
# normalisation of the user's ``targets`` argument
# ------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class CallableGrid:
    """A ``(B, T)`` grid of arbitrary callables (static under jit: new callables recompile)."""

    rows: tuple[tuple[Callable[[jax.Array], jax.Array], ...], ...]
    has_target_axis: bool

    @property
    def num_targets(self) -> int:
        return len(self.rows[0])


class PreparedTargets(NamedTuple):
    """The user's ``targets`` in the engine's form (what :func:`normalize_targets` returns).

    ``target``: a pytree :class:`Target` with leaves ``(B, T, ...)`` (or ``None``); ``grid``: a
    :class:`CallableGrid` of arbitrary callables (or ``None``; at most one of the two is set, neither for
    ``targets=None``); ``num_targets``: ``T``; ``has_target_axis``: whether the maps keep a ``T`` axis.
    """

    target: Target | None
    grid: CallableGrid | None
    num_targets: int
    has_target_axis: bool


def _stack_targets(items: Sequence[Target], what: str) -> Target:
    cls = type(items[0])
    if any(type(t) is not cls for t in items):
        raise TypeError(f"{what}: all targets in a list must have the same class, got "
                        f"{sorted({type(t).__name__ for t in items})}")
    if any(t.batch_shape() != () for t in items):
        raise ValueError(f"{what}: targets inside a list must be single targets (no batch axes)")
    def stack(*xs: Any) -> Any:
        if any(isinstance(v, jax.core.Tracer) for v in xs):
            return jnp.stack([jnp.asarray(v) for v in xs])
        arr = np.stack([np.asarray(v) for v in xs])
        return arr if np.issubdtype(arr.dtype, np.integer) else jnp.asarray(arr)

    return jax.tree.map(stack, *items)


def normalize_targets(targets: Any, batch: int) -> PreparedTargets:
    """Turns the user's ``targets`` into :class:`PreparedTargets` (pytree target with leaves ``(B, T, ...)``
    or callable grid, ``T``, whether the maps keep a ``T`` axis).

    Accepted: ``None`` (arg-max class per image); an integer array / list of ints of shape ``(B,)`` or
    ``(B, T)`` (class indices); a :class:`Target` with batch axes ``()``, ``(B,)`` or ``(B, T)``; a list of
    ``B`` targets (grad-cam style) or of ``B`` lists of ``T`` targets; a callable ``output -> scalar`` (every
    image), or a list of ``B`` callables (or ``B`` lists of ``T``). A count that does not match the batch
    raises ``ValueError``.

    Example:
        >>> p = normalize_targets([3, 5], batch=2)
        >>> p.target.category.shape, p.num_targets, p.has_target_axis
        ((2, 1), 1, False)
    """
    if targets is None:
        return PreparedTargets(None, None, 1, False)
    if isinstance(targets, Target):
        tgt, t, has_t = targets.broadcast(batch)
        return PreparedTargets(tgt, None, t, has_t)
    if isinstance(targets, (jax.Array, np.ndarray, int, np.integer)):
        return normalize_targets(ClassifierOutputTarget(targets), batch)
    if callable(targets):
        return PreparedTargets(None, CallableGrid(tuple((targets,) for _ in range(batch)), False), 1, False)
    if isinstance(targets, (list, tuple)):
        if len(targets) != batch:
            raise ValueError(
                f"targets: got {len(targets)} targets for a batch of {batch} images (expected one per image, "
                f"or a list of {batch} lists of T targets); grad-cam would silently return zero maps here"
            )
        if all(isinstance(t, (int, np.integer)) for t in targets) or all(
                isinstance(t, (list, tuple)) and all(isinstance(u, (int, np.integer)) for u in t) for t in targets):
            try:
                arr = np.asarray(targets, dtype=np.int32)
            except ValueError as e:
                raise ValueError(f"targets: every image needs the same number of targets ({e})") from None
            return normalize_targets(ClassifierOutputTarget(arr), batch)
        nested = all(isinstance(t, (list, tuple)) for t in targets)
        rows = [tuple(t) for t in targets] if nested else [(t,) for t in targets]
        if len({len(r) for r in rows}) != 1 or len(rows[0]) == 0:
            raise ValueError(f"targets: every image needs the same (non-zero) number of targets, got "
                             f"{[len(r) for r in rows]}")
        flat = [u for r in rows for u in r]
        if all(isinstance(u, Target) for u in flat):
            tv = len(rows[0])
            stacked = _stack_targets(flat, "targets")
            stacked = jax.tree.map(lambda v: v.reshape((batch, tv) + v.shape[1:]), stacked)
            if not nested:
                stacked = jax.tree.map(lambda v: v[:, 0], stacked)
            return normalize_targets(stacked, batch)
        if all(callable(u) for u in flat):
            return PreparedTargets(None, CallableGrid(tuple(rows), nested), len(rows[0]), nested)
        raise TypeError(f"targets: expected Target objects, class indices or callables, got "
                        f"{sorted({type(u).__name__ for u in flat})}")
    raise TypeError(
        f"targets: expected None, class indices, a Target, a callable or a list of them, got {type(targets).__name__}"
    )
