"""grad-cam-style classes: ``GradCAM(model, target_layers=[...])(x, targets)`` -> ``(B, H, W)`` maps.

Each call is ``jax.jit``-compiled. Compiled functions live in ONE module-level LRU cache shared by every CAM
object (:func:`compile_cache_info`, :func:`set_compile_cache_size`; default size
:data:`DEFAULT_COMPILE_CACHE_SIZE` entries, the least recently used one is dropped beyond that, so memory
stays bounded whatever the calls). Its key is the model's structure (an NNX ``graphdef``, a Linen module
and its options, or the structural key of a ``(features, head)`` pair), the target layers, the method and
its options, the flags ``aug_smooth``, ``eigen_smooth``, ``return_raw``, the kind of ``targets`` and the
shapes and dtypes of the input and of the target values. So a new CAM object on the same model does not
recompile; new parameter VALUES, new class indices, masks and other target values never recompile; a
callable target (or ``reshape_transform``) is keyed by :func:`~flax_attn.cam.taps.structural_key`: the same
``lambda`` source with the same closure values (e.g. rebuilt every call) hits the cache, a different one
compiles once more.
"""

from __future__ import annotations

import collections
import threading
import weakref
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import jax

from flax_attn.cam.engine import CamResult, compute_cam_prepared, preflight
from flax_attn.cam.methods import CamMethod, finer_cam, get_method
from flax_attn.cam.taps import make_tap, structural_key
from flax_attn.cam.targets import PreparedTargets

__all__ = [
    "DEFAULT_COMPILE_CACHE_SIZE",
    "FEM",
    "KPCA_CAM",
    "BaseCAM",
    "CacheInfo",
    "EigenCAM",
    "EigenGradCAM",
    "FinerCAM",
    "GradCAM",
    "GradCAMElementWise",
    "GradCAMPlusPlus",
    "HiResCAM",
    "LayerCAM",
    "RandomCAM",
    "ShapleyCAM",
    "XGradCAM",
    "clear_compile_cache",
    "compile_cache_info",
    "set_compile_cache_size",
]

#: entries of the shared CAM compile cache (one compiled function per model structure x method x options x
#: shapes); a few MiB each for small models
DEFAULT_COMPILE_CACHE_SIZE = 32


class CacheInfo(NamedTuple):
    """Counters of the shared CAM compile cache (as ``functools.lru_cache``'s ``cache_info``)."""

    hits: int
    misses: int
    traces: int
    size: int
    maxsize: int


class _LRU:
    def __init__(self, maxsize: int):
        self.maxsize = maxsize
        self.data: collections.OrderedDict[Any, Any] = collections.OrderedDict()
        self.hits = self.misses = self.traces = 0
        self.lock = threading.Lock()

    def get(self, key: Any, make: Callable[[], Any]) -> Any:
        with self.lock:
            if key in self.data:
                self.hits += 1
                self.data.move_to_end(key)
                return self.data[key]
            self.misses += 1
        value = make()
        with self.lock:
            self.data[key] = value
            self.data.move_to_end(key)
            while len(self.data) > self.maxsize:
                self.data.popitem(last=False)
        return value


_COMPILED = _LRU(DEFAULT_COMPILE_CACHE_SIZE)
_OUTPUT_SHAPES = _LRU(4 * DEFAULT_COMPILE_CACHE_SIZE)  # eval_shape of the model per (structure, input aval)


def compile_cache_info() -> CacheInfo:
    """Hits, misses, traces (compilations), current size and maximum size of the shared CAM compile cache.

    Example:
        >>> compile_cache_info().maxsize >= 1
        True
    """
    c = _COMPILED
    return CacheInfo(c.hits, c.misses, c.traces, len(c.data), c.maxsize)


def set_compile_cache_size(maxsize: int) -> None:
    """Sets the number of compiled CAM functions kept (least recently used dropped first; default
    :data:`DEFAULT_COMPILE_CACHE_SIZE`).

    Example:
        >>> set_compile_cache_size(DEFAULT_COMPILE_CACHE_SIZE)
    """
    if isinstance(maxsize, bool) or not isinstance(maxsize, int) or maxsize < 1:
        raise ValueError(f"maxsize: expected an integer >= 1, got {maxsize!r}")
    for c, n in ((_COMPILED, maxsize), (_OUTPUT_SHAPES, 4 * maxsize)):
        with c.lock:
            c.maxsize = n
            while len(c.data) > n:
                c.data.popitem(last=False)


def clear_compile_cache() -> None:
    """Drops every compiled CAM function (and resets the counters).

    Example:
        >>> clear_compile_cache(); compile_cache_info().size
        0
    """
    for c in (_COMPILED, _OUTPUT_SHAPES):
        with c.lock:
            c.data.clear()
            c.hits = c.misses = c.traces = 0


def _aval(v: Any) -> Any:
    return (tuple(v.shape), str(v.dtype)) if hasattr(v, "shape") and hasattr(v, "dtype") else structural_key(v)


def _compiled(tap: Any, static: Any, method: CamMethod, prepared: PreparedTargets, x: jax.Array, has_key: bool,
              *, eigen_smooth: bool, aug_smooth: bool, return_raw: bool, reshape_transform: Callable | None):
    """The shared jitted function for this structure and these options (one input signature per entry)."""
    grid = prepared.grid
    target_sig = None if prepared.target is None else (
        jax.tree.structure(prepared.target), tuple(_aval(v) for v in jax.tree.leaves(prepared.target)))
    key = (static, method, None if grid is None else structural_key(grid), prepared.num_targets,
           prepared.has_target_axis, target_sig, _aval(x), has_key, eigen_smooth, aug_smooth, return_raw,
           structural_key(reshape_transform))

    def make():
        t, has_t = prepared.num_targets, prepared.has_target_axis
        entry = _Entry()

        def impl(dynamic, x, target, rng):
            _COMPILED.traces += 1
            tap = entry.tap()  # the calling object's tap; the entry itself never keeps a model alive
            res = compute_cam_prepared(tap.rebuild(static, dynamic), x, PreparedTargets(target, grid, t, has_t),
                                       method=method, eigen_smooth=eigen_smooth, aug_smooth=aug_smooth, key=rng,
                                       reshape_transform=reshape_transform)
            return res if return_raw else res.cam

        entry.fn = jax.jit(impl)
        return entry

    entry = _COMPILED.get(key, make)
    entry.tap = weakref.ref(tap)
    return entry.fn


class _Entry:
    fn: Callable[..., Any]
    tap: Callable[[], Any]


class BaseCAM:
    """A CAM method bound to a model and its target layers; calls are jitted, compiled functions shared.

    ``model``: a ``flax.nnx.Module`` (``target_layers`` = attribute paths such as ``"layer4"``,
    ``"layer4.1"``, ``"features.-1"``, or the submodule objects themselves, grad-cam's
    ``[model.layer4]``), a ``(flax.linen.Module, variables)`` pair (module paths), a ``(features, head)``
    pair of functions, or a :class:`~flax_attn.cam.Tap`. The model is run in eval mode on a copy (NNX) and
    is never modified. ``tap_kwargs`` go to the tap (e.g. ``apply_kwargs={"train": False}`` for Linen).
    ``reshape_transform`` maps tapped activations to channels-last maps (grad-cam's option, e.g. ViT
    tokens). ``with GradCAM(...) as cam:`` works as in grad-cam (nothing to release).

    Call: ``cam(input_tensor, targets=None, *, aug_smooth=False, eigen_smooth=False, return_raw=False,
    key=None)``: ``input_tensor`` channels-last ``(B, H, W, C)``; ``targets`` as in grad-cam (a list of ``B``
    targets) or class indices ``(B,)`` / ``(B, T)`` or a batched Target; returns the normalised maps
    ``(B, H, W)`` (``(B, T, H, W)`` for 2-D targets) as a ``jax.Array``, or a
    :class:`~flax_attn.cam.CamResult` with ``return_raw=True``. ``num_traces`` counts the compilations this
    object's calls caused (0 when another object with the same model structure compiled them first); see
    the module docstring for what recompiles.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from flax import nnx
        >>> class Net(nnx.Module):
        ...     def __init__(self, rngs):
        ...         self.features = nnx.Conv(3, 8, (3, 3), rngs=rngs)
        ...         self.head = nnx.Linear(8, 4, rngs=rngs)
        ...     def __call__(self, x):
        ...         return self.head(jax.nn.relu(self.features(x)).mean((1, 2)))
        >>> cam = GradCAM(Net(nnx.Rngs(0)), target_layers=["features"])
        >>> cam(jnp.ones((2, 16, 12, 3)) * jnp.arange(12.0)[:, None], targets=None).shape
        (2, 16, 12)
    """

    method_name: ClassVar[str] = ""

    def __init__(self, model: Any, target_layers: Any = None, *, reshape_transform: Callable | None = None,
                 seed: int = 0, **tap_kwargs: Any):
        self.tap = make_tap(model, target_layers, **tap_kwargs)
        self.reshape_transform = reshape_transform
        self.target_layers = self.tap.layers
        self.method: CamMethod = get_method(self.method_name)
        self.num_traces = 0
        self._seed = seed
        self._calls = 0

    def _run(self, method: CamMethod, input_tensor, targets, *, aug_smooth, eigen_smooth, return_raw, key):
        tap = self.tap
        static, dynamic = tap.split()

        def output_struct(x):
            return _OUTPUT_SHAPES.get((static, _aval(x)), lambda: jax.eval_shape(lambda: tap.run(x)[0]))

        x, prepared = preflight(tap, input_tensor, targets, output_struct=output_struct)
        if method.needs_key and key is None:
            key = jax.random.fold_in(jax.random.key(self._seed), self._calls)
        self._calls += 1
        fn = _compiled(tap, static, method, prepared, x, key is not None, eigen_smooth=bool(eigen_smooth),
                       aug_smooth=bool(aug_smooth), return_raw=bool(return_raw),
                       reshape_transform=self.reshape_transform)
        before = _COMPILED.traces
        out = fn(dynamic, x, prepared.target, key)
        self.num_traces += _COMPILED.traces - before
        return out

    def __call__(self, input_tensor: jax.Array, targets: Any = None, *, aug_smooth: bool = False,
                 eigen_smooth: bool = False, return_raw: bool = False,
                 key: jax.Array | None = None) -> jax.Array | CamResult:
        return self._run(self.method, input_tensor, targets, aug_smooth=aug_smooth, eigen_smooth=eigen_smooth,
                         return_raw=return_raw, key=key)

    def __enter__(self) -> BaseCAM:  # grad-cam's ``with GradCAM(...) as cam:``; there are no hooks to release
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(target_layers={list(self.target_layers)})"


class GradCAM(BaseCAM):
    """Grad-CAM (Selvaraju et al. 2017): channel weights = mean gradient. See :class:`BaseCAM`.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> w = jax.random.normal(jax.random.key(0), (4, 3))
        >>> GradCAM((jnp.tanh, lambda a: a.mean((1, 2)) @ w))(jnp.ones((1, 5, 5, 4)), [2]).shape
        (1, 5, 5)
    """

    method_name = "gradcam"


class HiResCAM(BaseCAM):
    """HiResCAM (Draelos & Carin 2020): ``sum_c grad * A``. See :class:`BaseCAM` (example in :class:`GradCAM`)."""

    method_name = "hirescam"


class GradCAMElementWise(BaseCAM):
    """Element-wise Grad-CAM (grad-cam library): ``sum_c relu(grad * A)``. See :class:`BaseCAM`."""

    method_name = "gradcamelementwise"


class GradCAMPlusPlus(BaseCAM):
    """Grad-CAM++ (Chattopadhyay et al. 2018), grad-cam's formula with eps 1e-6. See :class:`BaseCAM`."""

    method_name = "gradcam++"


class XGradCAM(BaseCAM):
    """XGrad-CAM (Fu et al. 2020): weights ``sum(grad * A) / sum(A)``. See :class:`BaseCAM`."""

    method_name = "xgradcam"


class LayerCAM(BaseCAM):
    """LayerCAM (Jiang et al. 2021): ``sum_c relu(grad) * A``. See :class:`BaseCAM`."""

    method_name = "layercam"


class EigenCAM(BaseCAM):
    """Eigen-CAM (Muhammad & Yeasin 2020): first principal component of ``A`` (gradient-free). See
    :class:`BaseCAM`."""

    method_name = "eigencam"


class EigenGradCAM(BaseCAM):
    """First principal component of ``grad * A``. See :class:`BaseCAM`."""

    method_name = "eigengradcam"


class ShapleyCAM(BaseCAM):
    """ShapleyCAM (arXiv:2501.06261): weights ``mean(grad - 0.5 * H A)``, ``H A`` by ``jax.jvp`` of the gradient
    (forward-over-reverse Hessian-vector product). See :class:`BaseCAM`."""

    method_name = "shapleycam"


class RandomCAM(BaseCAM):
    """Random channel weights ~ U(-1, 1) per image, target and layer (a sanity baseline). The key is ``key=``
    or derived from ``seed`` and the call count. See :class:`BaseCAM`."""

    method_name = "randomcam"


class FinerCAM(BaseCAM):
    """FinerCAM (arXiv:2501.11309): a base method whose default target contrasts the predicted class with
    its nearest classes. Call options as grad-cam: ``alpha``, ``comparison_categories``, ``target_idx``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> w = jax.random.normal(jax.random.key(0), (4, 6))
        >>> cam = FinerCAM((jnp.tanh, lambda a: a.mean((1, 2)) @ w))
        >>> cam(jax.random.normal(jax.random.key(1), (2, 5, 5, 4)), alpha=0.5).shape
        (2, 5, 5)
    """

    method_name = "finercam"  # the registered default (alpha 1, comparison ranks 1-3); options per call

    def __init__(self, model: Any, target_layers: Any = None, *, base_method: str | type[BaseCAM] = "gradcam",
                 reshape_transform: Callable | None = None, seed: int = 0, **tap_kwargs: Any):
        super().__init__(model, target_layers, reshape_transform=reshape_transform, seed=seed, **tap_kwargs)
        self.base_method = base_method.method_name if isinstance(base_method, type) else base_method
        get_method(self.base_method)  # an unknown base method fails here, not at the first call

    def __call__(self, input_tensor: jax.Array, targets: Any = None, *, eigen_smooth: bool = False,
                 alpha: float = 1.0, comparison_categories: Any = None, target_idx: int | None = None,
                 aug_smooth: bool = False, return_raw: bool = False,
                 key: jax.Array | None = None) -> jax.Array | CamResult:
        comp = None if comparison_categories is None else tuple(int(c) for c in comparison_categories)
        method = finer_cam(base_method=self.base_method, alpha=alpha, comparison_categories=comp,
                           target_idx=target_idx)  # equal by value: same options, same compiled function
        return self._run(method, input_tensor, targets, aug_smooth=aug_smooth,
                         eigen_smooth=eigen_smooth, return_raw=return_raw, key=key)


class KPCA_CAM(BaseCAM):  # grad-cam's class name
    """KPCA-CAM (Karmani et al. 2024, arXiv:2410.00267): the first kernel principal component of the
    activations, gradient-free, with grad-cam's kernel (``"sigmoid"``) and ``gamma`` (``None``: ``1 /
    channels``); the same maps as grad-cam's scikit-learn ``KernelPCA`` (its sign convention included, see
    :func:`~flax_attn.cam.methods.kernel_pca_projection`). ``kernel``: ``"linear"``, ``"poly"``,
    ``"rbf"``, ``"sigmoid"``, ``"cosine"``; ``coef0``/``degree``: scikit-learn's defaults. Each image costs
    an ``eigh`` of an ``(h*w, h*w)`` matrix per target layer. See :class:`BaseCAM`.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> w = jax.random.normal(jax.random.key(0), (4, 3))
        >>> cam = KPCA_CAM((jnp.tanh, lambda a: a.mean((1, 2)) @ w), kernel="rbf")
        >>> cam(jax.random.normal(jax.random.key(1), (2, 5, 5, 4))).shape
        (2, 5, 5)
    """

    method_name = "kpcacam"

    def __init__(self, model: Any, target_layers: Any = None, reshape_transform: Callable | None = None,
                 kernel: str = "sigmoid", gamma: float | None = None, *, coef0: float = 1.0, degree: float = 3.0,
                 seed: int = 0, **tap_kwargs: Any):
        super().__init__(model, target_layers, reshape_transform=reshape_transform, seed=seed, **tap_kwargs)
        self.method = get_method("kpcacam", kernel=kernel, gamma=gamma, coef0=coef0, degree=degree)
        self.kernel, self.gamma = kernel, gamma


class FEM(BaseCAM):
    """FEM, the Feature Explanation Method (Fuad et al. 2020): channel weights = fraction of positions above
    ``mean + k * std`` of the channel (grad-cam's ``k=2``), map ``sum_c w_c A_c``; gradient-free. See
    :class:`BaseCAM`.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> w = jax.random.normal(jax.random.key(0), (4, 3))
        >>> FEM((jnp.tanh, lambda a: a.mean((1, 2)) @ w), k=1)(jax.random.normal(jax.random.key(1), (2, 5, 5, 4))).shape
        (2, 5, 5)
    """

    method_name = "fem"

    def __init__(self, model: Any, target_layers: Any = None, reshape_transform: Callable | None = None,
                 k: float = 2.0, *, seed: int = 0, **tap_kwargs: Any):
        super().__init__(model, target_layers, reshape_transform=reshape_transform, seed=seed, **tap_kwargs)
        self.method = get_method("fem", k=k)
        self.k = k
