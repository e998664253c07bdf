"""grad-cam-style classes: ``GradCAM(model, target_layers=[...])(x, targets)`` -> ``(B, H, W)`` maps.

Each call is ``jax.jit``-compiled and cached. Recompilation happens when any of these change: the input
shape or dtype; the model's structure (its ``nnx.graphdef``; new parameter VALUES never recompile); the
kind of ``targets`` (``None`` / class indices / a Target class / callables), the number of targets per image
or the target class; new callable objects (a fresh ``lambda`` every call recompiles every call); the flags
``aug_smooth``, ``eigen_smooth``, ``return_raw``; FinerCAM's options. Class indices, masks and other target
values are traced arguments: changing them does not recompile.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from flax_attn.cam.engine import CamResult, _check_input, compute_cam_normalized
from flax_attn.cam.methods import CamMethod, finer_cam, get_method
from flax_attn.cam.targets import normalize_targets
from flax_attn.cam.taps import make_tap

__all__ = [
    "BaseCAM",
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
]


class BaseCAM:
    """A CAM method bound to a model and its target layers; calls are jitted and cached per input shape.

    ``model``: a ``flax.nnx.Module`` (``target_layers`` = attribute paths such as ``"layer4"``,
    ``"layer4.1"``, ``"features.-1"``), a ``(flax.linen.Module, variables)`` pair (module paths), a
    ``(features, head)`` pair of functions, or a :class:`~flax_attn.cam.Tap`. The model is run in eval mode
    on a copy (NNX) and is never modified. ``tap_kwargs`` go to the tap (e.g. ``apply_kwargs`` for Linen).
    ``reshape_transform`` maps tapped activations to channels-last maps (grad-cam's option, e.g. ViT
    tokens). ``with GradCAM(...) as cam:`` works as in grad-cam (nothing to release).

    Call: ``cam(input_tensor, targets=None, *, aug_smooth=False, eigen_smooth=False, return_raw=False,
    key=None)``: ``input_tensor`` channels-last ``(B, H, W, C)``; ``targets`` as in grad-cam (a list of ``B``
    targets) or class indices ``(B,)`` / ``(B, T)`` or a batched Target; returns the normalised maps
    ``(B, H, W)`` (``(B, T, H, W)`` for 2-D targets) as a ``jax.Array``, or a
    :class:`~flax_attn.cam.CamResult` with ``return_raw=True``. ``num_traces`` counts compilations.

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
        self._out_shapes: dict[Any, Any] = {}
        self._jitted = jax.jit(
            self._impl,
            static_argnames=("static", "method", "grid", "t", "has_t", "eigen_smooth", "aug_smooth", "return_raw"),
        )

    def _impl(self, dynamic, x, target, key, *, static, method, grid, t, has_t, eigen_smooth, aug_smooth,
              return_raw):
        self.num_traces += 1
        tap = self.tap.rebuild(static, dynamic)
        res = compute_cam_normalized(tap, x, target, grid, t, has_t, method=method, eigen_smooth=eigen_smooth,
                                     aug_smooth=aug_smooth, key=key, reshape_transform=self.reshape_transform)
        return res if return_raw else res.cam

    def _run(self, method: CamMethod, input_tensor, targets, *, aug_smooth, eigen_smooth, return_raw, key):
        x = _check_input(input_tensor)
        target, grid, t, has_t = normalize_targets(targets, x.shape[0])
        static, dynamic = self.tap.split()
        if target is not None:
            ck = (static, x.shape, x.dtype)
            if ck not in self._out_shapes:
                tap = self.tap
                self._out_shapes[ck] = jax.eval_shape(lambda: tap.run(x)[0])
            out = self._out_shapes[ck]
            if hasattr(out, "shape"):
                target.validate(tuple(out.shape[1:]))
        if method.needs_key and key is None:
            key = jax.random.fold_in(jax.random.key(self._seed), self._calls)
        self._calls += 1
        return self._jitted(dynamic, x, target, key, static=static, method=method, grid=grid, t=t, has_t=has_t,
                            eigen_smooth=bool(eigen_smooth), aug_smooth=bool(aug_smooth),
                            return_raw=bool(return_raw))

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


def _cam_class(name: str, method: str, doc: str) -> type[BaseCAM]:
    cls = type(name, (BaseCAM,), {"method_name": method, "__doc__": doc + "\n\n    See :class:`BaseCAM`."})
    cls.__module__ = __name__
    return cls


GradCAM = _cam_class("GradCAM", "gradcam", "Grad-CAM (Selvaraju et al. 2017): channel weights = mean gradient.")
HiResCAM = _cam_class("HiResCAM", "hirescam", "HiResCAM (Draelos & Carin 2020): sum_c grad * A.")
GradCAMElementWise = _cam_class("GradCAMElementWise", "gradcamelementwise",
                                "Element-wise Grad-CAM (grad-cam library): sum_c relu(grad * A).")
GradCAMPlusPlus = _cam_class("GradCAMPlusPlus", "gradcam++",
                             "Grad-CAM++ (Chattopadhyay et al. 2018), grad-cam's formula with eps 1e-6.")
XGradCAM = _cam_class("XGradCAM", "xgradcam", "XGrad-CAM (Fu et al. 2020): weights sum(grad * A) / sum(A).")
LayerCAM = _cam_class("LayerCAM", "layercam", "LayerCAM (Jiang et al. 2021): sum_c relu(grad) * A.")
EigenCAM = _cam_class("EigenCAM", "eigencam",
                      "Eigen-CAM (Muhammad & Yeasin 2020): first principal component of A (gradient-free).")
EigenGradCAM = _cam_class("EigenGradCAM", "eigengradcam", "First principal component of grad * A.")
ShapleyCAM = _cam_class("ShapleyCAM", "shapleycam",
                        "ShapleyCAM (arXiv:2501.06261): weights mean(grad - 0.5 * H A), H A by jax.jvp of the "
                        "gradient (forward-over-reverse Hessian-vector product).")
RandomCAM = _cam_class("RandomCAM", "randomcam",
                       "Random channel weights ~ U(-1, 1) per image, target and layer (a sanity baseline). The "
                       "key is ``key=`` or derived from ``seed`` and the call count.")


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

    method_name = "gradcam"

    def __init__(self, model: Any, target_layers: Any = None, *, base_method: str | type[BaseCAM] = "gradcam",
                 reshape_transform: Callable | None = None, seed: int = 0, **tap_kwargs: Any):
        super().__init__(model, target_layers, reshape_transform=reshape_transform, seed=seed, **tap_kwargs)
        self.base_method = base_method.method_name if isinstance(base_method, type) else base_method
        self._finer: dict[Any, CamMethod] = {}

    def __call__(self, input_tensor: jax.Array, targets: Any = None, *, eigen_smooth: bool = False,
                 alpha: float = 1.0, comparison_categories: Any = None, target_idx: int | None = None,
                 aug_smooth: bool = False, return_raw: bool = False,
                 key: jax.Array | None = None) -> jax.Array | CamResult:
        comp = None if comparison_categories is None else tuple(int(c) for c in comparison_categories)
        ck = (float(alpha), comp, target_idx)
        if ck not in self._finer:
            self._finer[ck] = finer_cam(base_method=self.base_method, alpha=alpha, comparison_categories=comp,
                                        target_idx=target_idx)
        return self._run(self._finer[ck], input_tensor, targets, aug_smooth=aug_smooth,
                         eigen_smooth=eigen_smooth, return_raw=return_raw, key=key)
