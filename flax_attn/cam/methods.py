"""CAM methods: each one is a small function of (activations, gradients) for ONE example and ONE target.

``cam_image(ctx) -> raw map`` receives a :class:`CamInputs` with channels-last ``acts`` ``(*spatial, C)``,
``grads`` (same shape, ``None`` for gradient-free methods), ``hvp`` (Hessian-vector product, ShapleyCAM
only), ``key`` (RandomCAM only) and ``eigen_smooth``; the engine (:mod:`flax_attn.cam.engine`) vmaps it over
images and targets, then applies ReLU, min-max and resize. Formulas follow ``pytorch_grad_cam`` 1.5.7
exactly (eps values, zero-gradient handling); new methods (ScoreCAM, AblationCAM, FullGrad later) plug in
with :func:`register_method`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from flax_attn.cam.postprocess import first_component_projection

__all__ = ["KPCA_KERNELS", "CamInputs", "CamMethod", "fem", "get_method", "kernel_pca_projection", "kpca_cam",
           "list_methods", "register_method"]


class CamInputs(NamedTuple):
    """Inputs of a method for one example and one target (channels-last, no batch axis)."""

    acts: jax.Array
    grads: jax.Array | None
    hvp: jax.Array | None
    key: jax.Array | None
    eigen_smooth: bool


@dataclasses.dataclass(frozen=True)
class CamMethod:
    """A CAM method: ``cam_image`` plus what the engine must compute for it.

    Example:
        >>> get_method("gradcam").uses_gradients
        True
    """

    name: str
    cam_image: Callable[[CamInputs], jax.Array]
    uses_gradients: bool = True
    needs_hvp: bool = False
    needs_key: bool = False
    default_targets: Callable[..., Any] | None = None  # output -> Target; None: arg-max class
    options: tuple[tuple[str, Any], ...] = ()


_METHODS: dict[str, CamMethod] = {}


def register_method(method: CamMethod) -> CamMethod:
    """Adds a method to the registry (name lower-case, unique).

    Example:
        >>> m = CamMethod("my_mean_cam", lambda c: c.acts.mean(-1), uses_gradients=False)
        >>> register_method(m).name in list_methods()
        True
    """
    key = method.name.lower()
    if key in _METHODS and _METHODS[key] is not method:
        raise ValueError(f"CAM method {method.name!r} is already registered")
    _METHODS[key] = method
    return method


def list_methods() -> list[str]:
    """Names of the registered methods, every one of them accepted by :func:`get_method`.

    Example:
        >>> {"gradcam++", "finercam"} <= set(list_methods())
        True
    """
    return sorted(_METHODS)


def get_method(name: str | CamMethod, **options: Any) -> CamMethod:
    """A registered method by name (case-insensitive); ``options`` go to methods that take some (FinerCAM, KPCA-CAM, FEM).

    Example:
        >>> get_method("GradCAM").name
        'gradcam'
    """
    if isinstance(name, CamMethod):
        if options:
            raise ValueError(f"options {sorted(options)} given with a CamMethod instance")
        return name
    if not isinstance(name, str):
        raise TypeError(f"method: expected a name or a CamMethod, got {type(name).__name__}")
    key = name.lower()
    if key not in _METHODS:
        raise ValueError(f"unknown CAM method {name!r}; available: {list_methods()}")
    if key == "finercam" and options:
        return finer_cam(**options)
    if options and key in _OPTION_FACTORIES:  # KPCA-CAM, FEM (defined below)
        allowed = sorted(_OPTION_FACTORIES[key].__kwdefaults__ or ())
        if set(options) - set(allowed):
            raise ValueError(f"method {name!r} takes the options {allowed}, got {sorted(options)}")
        return _OPTION_FACTORIES[key](**options)
    if options:
        raise ValueError(f"method {name!r} takes no options, got {sorted(options)}")
    return _METHODS[key]


def _spatial_axes(a: jax.Array) -> tuple[int, ...]:
    return tuple(range(a.ndim - 1))


def _grads(c: CamInputs) -> jax.Array:
    # the engine computes gradients for every method with ``uses_gradients`` (the only ones that read them)
    assert c.grads is not None, "CamInputs.grads is None: the method must have uses_gradients=True"
    return c.grads


def _hvp(c: CamInputs) -> jax.Array:
    assert c.hvp is not None, "CamInputs.hvp is None: the method must have needs_hvp=True"
    return c.hvp


def _key(c: CamInputs) -> jax.Array:
    assert c.key is not None, "CamInputs.key is None: the method must have needs_key=True"
    return c.key


def _weighted(weighted: jax.Array, eigen_smooth: bool) -> jax.Array:
    return first_component_projection(weighted) if eigen_smooth else jnp.sum(weighted, axis=-1)


def channel_weights_method(name: str, weights: Callable[[CamInputs], jax.Array], **kw: Any) -> CamMethod:
    """A method of the form ``sum_c w_c A_c`` (``eigen_smooth``: first component of ``w * A``)."""

    def cam_image(c: CamInputs) -> jax.Array:
        return _weighted(weights(c) * c.acts, c.eigen_smooth)

    return CamMethod(name, cam_image, **kw)


def _gradcam_w(c: CamInputs) -> jax.Array:
    g = _grads(c)
    return jnp.mean(g, axis=_spatial_axes(g))


def _gradcampp_w(c: CamInputs) -> jax.Array:
    g, a = _grads(c), c.acts
    ax = _spatial_axes(a)
    g2 = g**2
    g3 = g2 * g
    sum_a = jnp.sum(a, axis=ax, keepdims=True)
    aij = g2 / (2 * g2 + sum_a * g3 + 1e-6)
    aij = jnp.where(g != 0, aij, 0)
    return jnp.sum(jnp.maximum(g, 0) * aij, axis=ax)


def _xgradcam_w(c: CamInputs) -> jax.Array:
    ax = _spatial_axes(c.acts)
    sum_a = jnp.sum(c.acts, axis=ax, keepdims=True)
    return jnp.sum(_grads(c) * c.acts / (sum_a + 1e-7), axis=ax)


def _shapley_w(c: CamInputs) -> jax.Array:
    g = _grads(c)
    return jnp.mean(g - 0.5 * _hvp(c), axis=_spatial_axes(g))


def _random_w(c: CamInputs) -> jax.Array:
    return jax.random.uniform(_key(c), (c.acts.shape[-1],), c.acts.dtype, minval=-1.0, maxval=1.0)


GRADCAM = register_method(channel_weights_method("gradcam", _gradcam_w))
GRADCAMPP = register_method(channel_weights_method("gradcam++", _gradcampp_w))
XGRADCAM = register_method(channel_weights_method("xgradcam", _xgradcam_w))
SHAPLEYCAM = register_method(channel_weights_method("shapleycam", _shapley_w, needs_hvp=True))
RANDOMCAM = register_method(channel_weights_method("randomcam", _random_w, uses_gradients=False, needs_key=True))
HIRESCAM = register_method(CamMethod("hirescam", lambda c: _weighted(_grads(c) * c.acts, c.eigen_smooth)))
GRADCAM_ELEMENTWISE = register_method(
    CamMethod("gradcamelementwise", lambda c: _weighted(jnp.maximum(_grads(c) * c.acts, 0), c.eigen_smooth))
)
LAYERCAM = register_method(CamMethod("layercam", lambda c: _weighted(jnp.maximum(_grads(c), 0) * c.acts, c.eigen_smooth)))
EIGENCAM = register_method(
    CamMethod("eigencam", lambda c: first_component_projection(c.acts), uses_gradients=False)
)
EIGENGRADCAM = register_method(CamMethod("eigengradcam", lambda c: first_component_projection(_grads(c) * c.acts)))


def finer_default_targets(output: jax.Array, *, alpha: float = 1.0,
                          comparison_categories: tuple[int, ...] | None = None,
                          target_idx: int | None = None):
    """FinerCAM's default targets for ``(B, K)`` logits: the main class (arg-max, or ``target_idx``) against
    the classes whose logits are closest to it (ranks ``comparison_categories``, default ``(1, 2, 3)``
    clamped to ``K - 1``), exactly as grad-cam 1.5.7's ``FinerCAM.forward``.

    Example:
        >>> import jax.numpy as jnp
        >>> t = finer_default_targets(jnp.array([[3.0, 1.0, 2.9, 0.0]]))
        >>> t.main_category.tolist(), t.comparison_categories.tolist()
        ([0], [[2, 1, 3]])
    """
    from flax_attn.cam.targets import FinerWeightedTarget

    if output.ndim != 2:
        raise ValueError(f"FinerCAM default targets need (B, K) logits, got output shape {output.shape}")
    k = output.shape[-1]
    if comparison_categories is None:
        comp = (1, 2, 3)[: max(k - 1, 0)]
    else:
        comp = tuple(c for c in comparison_categories if c < k)
    if not comp:
        raise ValueError(f"FinerCAM: no comparison category left for a model with {k} classes")
    ref = jnp.max(output, axis=-1) if target_idx is None else output[:, target_idx]
    order = jnp.argsort(jnp.abs(output - ref[:, None]), axis=-1)
    return FinerWeightedTarget(order[:, 0], order[:, jnp.asarray(comp)], jnp.full((output.shape[0],), alpha, output.dtype))


def finer_cam(*, base_method: str | CamMethod = "gradcam", alpha: float = 1.0,
              comparison_categories: tuple[int, ...] | None = None, target_idx: int | None = None) -> CamMethod:
    """FinerCAM (arXiv:2501.11309): a base method (default GradCAM) whose default target contrasts the
    predicted class with its most similar classes (:func:`finer_default_targets`).

    Example:
        >>> finer_cam(alpha=0.5).name
        'finercam'
    """
    base = get_method(base_method)
    comp = None if comparison_categories is None else tuple(int(c) for c in comparison_categories)
    defaults = FinerDefaultTargets(float(alpha), comp, None if target_idx is None else int(target_idx))
    return dataclasses.replace(
        base, name="finercam", default_targets=defaults,
        options=(("base", base.name), ("alpha", defaults.alpha), ("comparison_categories", comp),
                 ("target_idx", defaults.target_idx)),
    )


@dataclasses.dataclass(frozen=True)
class FinerDefaultTargets:
    """:func:`finer_default_targets` with its options bound, equal (and hashing equal) by value: two
    FinerCAM methods with the same options are the same jit cache key."""

    alpha: float = 1.0
    comparison_categories: tuple[int, ...] | None = None
    target_idx: int | None = None

    def __call__(self, output: jax.Array) -> Any:
        return finer_default_targets(output, alpha=self.alpha, comparison_categories=self.comparison_categories,
                                     target_idx=self.target_idx)


FINERCAM = register_method(finer_cam())


# ------------------------------------------------------------------------------------------------------
# KPCA-CAM and FEM (gradient-free, as grad-cam 1.5.7's KPCA_CAM and FEM)
# ------------------------------------------------------------------------------------------------------

#: the kernels of scikit-learn's ``KernelPCA`` that KPCA-CAM accepts (``"precomputed"`` has no meaning here)
KPCA_KERNELS = ("linear", "poly", "rbf", "sigmoid", "cosine")


def _kernel_matrix(x: jax.Array, kernel: str, gamma: float, coef0: float, degree: float) -> jax.Array:
    """scikit-learn's ``pairwise_kernels(x, metric=kernel, gamma=..., coef0=..., degree=...)`` of ``(N, C)``."""
    if kernel == "cosine":  # sklearn.preprocessing.normalize: rows of norm 0 stay 0
        n = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
        x = x / jnp.where(n == 0, 1, n)
        return x @ x.T
    if kernel == "rbf":  # euclidean_distances: xx + yy - 2 x.y, clipped at 0, exact zeros on the diagonal
        sq = jnp.sum(x * x, axis=-1)
        d2 = jnp.maximum(sq[:, None] + sq[None, :] - 2 * (x @ x.T), 0)
        d2 = jnp.where(jnp.eye(x.shape[0], dtype=bool), 0, d2)
        return jnp.exp(-gamma * d2)
    k = x @ x.T
    if kernel == "linear":
        return k
    if kernel == "poly":
        return (gamma * k + coef0) ** degree
    return jnp.tanh(gamma * k + coef0)  # sigmoid


def kernel_pca_projection(a: jax.Array, kernel: str = "sigmoid", gamma: float | None = None, *,
                          coef0: float = 1.0, degree: float = 3.0) -> jax.Array:
    """grad-cam's ``get_2d_projection_kernel`` for ONE channels-last map ``(*spatial, C)``: scikit-learn's
    ``KernelPCA(n_components=1, kernel=kernel, gamma=gamma).fit_transform`` of the centred positions.

    Steps, as scikit-learn 1.x: NaNs -> 0; the ``(N, C)`` matrix of positions is centred over positions;
    ``gamma=None`` means ``1 / C``; the kernel matrix is centred (``KernelCenterer``: ``K - 1K/N - K1/N +
    1K1/N^2``); its top eigenpair ``(lam, v)`` by ``eigh`` (scikit-learn's ``"auto"`` solver uses ARPACK
    above 200 positions, which converges to the same pair); the SIGN is fixed as ``svd_flip`` does: the
    entry of largest magnitude of ``v`` is made positive (the first such entry on ties); the projection is
    ``v * sqrt(lam)`` (``lam`` clipped at 0: scikit-learn raises if the top eigenvalue is negative, which a
    non-PSD sigmoid kernel can produce; we return zeros there). Use :func:`jax.vmap` for batches.

    Example:
        >>> import jax
        >>> kernel_pca_projection(jax.random.normal(jax.random.key(0), (5, 6, 8))).shape
        (5, 6)
    """
    a = jnp.where(jnp.isnan(a), 0, a)
    spatial = a.shape[:-1]
    flat = a.reshape(-1, a.shape[-1])
    flat = flat - jnp.mean(flat, axis=0)
    g = 1.0 / flat.shape[-1] if gamma is None else gamma
    k = _kernel_matrix(flat, kernel, g, coef0, degree)
    k = k - jnp.mean(k, axis=0, keepdims=True) - jnp.mean(k, axis=1, keepdims=True) + jnp.mean(k)
    k = (k + k.T) / 2  # exactly symmetric for eigh (it reads one triangle)
    lam, vecs = jnp.linalg.eigh(k)
    v = vecs[:, -1]
    v = v * jnp.sign(v[jnp.argmax(jnp.abs(v))])
    return (v * jnp.sqrt(jnp.maximum(lam[-1], 0))).reshape(spatial)


@dataclasses.dataclass(frozen=True)
class _KPCAImage:
    kernel: str = "sigmoid"
    gamma: float | None = None
    coef0: float = 1.0
    degree: float = 3.0

    def __call__(self, c: CamInputs) -> jax.Array:  # eigen_smooth is ignored, as in grad-cam
        return kernel_pca_projection(c.acts, self.kernel, self.gamma, coef0=self.coef0, degree=self.degree)


def _real_option(name: str, value: Any, *, positive: bool = False, allow_none: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not abs(value) < float("inf") or (
            positive and value <= 0):
        what = "a positive number" if positive else "a finite number"
        raise ValueError(f"{name}: expected {what}{' or None' if allow_none else ''}, got {value!r}")
    return float(value)


def kpca_cam(*, kernel: str = "sigmoid", gamma: float | None = None, coef0: float = 1.0,
             degree: float = 3.0) -> CamMethod:
    """KPCA-CAM (Karmani et al. 2024, arXiv:2410.00267): the first kernel principal component of the
    activations (:func:`kernel_pca_projection`), gradient-free; grad-cam's kernel (``"sigmoid"``) and
    ``gamma`` (``None`` = ``1 / channels``); ``coef0``/``degree`` are scikit-learn's defaults.

    Example:
        >>> kpca_cam(kernel="rbf").options
        (('kernel', 'rbf'), ('gamma', None), ('coef0', 1.0), ('degree', 3.0))
    """
    if not isinstance(kernel, str) or kernel not in KPCA_KERNELS:
        raise ValueError(f"kernel: expected one of {KPCA_KERNELS} (scikit-learn's KernelPCA kernels), got {kernel!r}")
    img = _KPCAImage(kernel, _real_option("gamma", gamma, positive=True, allow_none=True),
                     _real_option("coef0", coef0) or 0.0, _real_option("degree", degree, positive=True) or 3.0)
    return CamMethod("kpcacam", img, uses_gradients=False,
                     options=(("kernel", img.kernel), ("gamma", img.gamma), ("coef0", img.coef0),
                              ("degree", img.degree)))


@dataclasses.dataclass(frozen=True)
class _FEMImage:
    k: float = 2.0

    def __call__(self, c: CamInputs) -> jax.Array:  # eigen_smooth is ignored, as in grad-cam
        a = c.acts
        ax = _spatial_axes(a)
        th = jnp.mean(a, axis=ax) + self.k * jnp.std(a, axis=ax)  # population std (numpy's ddof=0)
        w = jnp.mean((a > th).astype(a.dtype), axis=ax)
        return jnp.sum(w * a, axis=-1)


def fem(*, k: float = 2.0) -> CamMethod:
    """FEM, the Feature Explanation Method (Fuad et al. 2020, IPTA): channel weight = fraction of positions
    above the channel's ``mean + k * std`` (k-sigma rule), map ``sum_c w_c A_c``; gradient-free, 2-D and 3-D.

    Example:
        >>> fem(k=3).options
        (('k', 3.0),)
    """
    img = _FEMImage(_real_option("k", k) or 0.0)
    return CamMethod("fem", img, uses_gradients=False, options=(("k", img.k),))


KPCACAM = register_method(kpca_cam())
FEM = register_method(fem())
_OPTION_FACTORIES: dict[str, Callable[..., CamMethod]] = {"kpcacam": kpca_cam, "fem": fem}
