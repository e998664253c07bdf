"""The shared CAM pipeline, a pure function usable inside ``jax.jit`` / ``jax.grad`` / ``jax.vmap``.

One forward pass per call (``jax.vjp`` over the tap probes), then the gradients of ALL targets at once by
``jax.vmap`` over the output cotangents (ShapleyCAM: ``jax.jvp`` of the gradient, vmapped over targets),
then per layer: method -> raw map -> ReLU -> per-map min-max (eps 1e-7) -> bilinear resize to the input
size; layers are aggregated as grad-cam does (``scale(mean_l(max(cam_l, 0)))``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from flax_attn.cam.methods import CamInputs, CamMethod, get_method
from flax_attn.cam.postprocess import aggregate_layers, resize_maps, scale_cam
from flax_attn.cam.taps import Tap
from flax_attn.cam.targets import CallableGrid, ClassifierOutputTarget, PreparedTargets, Target, normalize_targets

__all__ = ["AUG_TRANSFORMS", "CamResult", "check_images", "compute_cam", "compute_cam_prepared", "preflight"]

#: grad-cam's default test-time augmentations (ttach ``Compose([HorizontalFlip(), Multiply([0.9, 1, 1.1])])``,
#: in ttach's order): (horizontal flip, factor).
AUG_TRANSFORMS: tuple[tuple[bool, float], ...] = tuple((f, m) for f in (False, True) for m in (0.9, 1.0, 1.1))


class CamResult(NamedTuple):
    """``cam``: normalised maps ``(B, H, W)`` (``(B, T, H, W)`` for 2-D targets); ``raw``: per target layer,
    the method's map before ReLU/min-max/resize, ``(B, h_l, w_l)`` (or ``(B, T, h_l, w_l)``; with
    ``aug_smooth`` a leading axis of 6 augmentations); ``output``: the model output (``(6, B, ...)`` with
    ``aug_smooth``)."""

    cam: jax.Array
    raw: list[jax.Array]
    output: Any


def _default_target(output: jax.Array) -> Target:
    if output.ndim != 2:
        raise ValueError(
            f"targets=None picks the arg-max class of (B, K) logits, but the model output has shape "
            f"{output.shape}: pass targets explicitly (e.g. SemanticSegmentationTarget)"
        )
    return ClassifierOutputTarget(jnp.argmax(output, axis=-1)[:, None])


def _scores(tcol: Any, output: jax.Array) -> jax.Array:
    """Per-image scalar scores ``(B,)`` of one target column (pytree sliced at t, or B callables)."""
    if isinstance(tcol, tuple):  # B callables
        vals = [jnp.asarray(f(output[b])) for b, f in enumerate(tcol)]
        for v in vals:
            if v.size != 1:
                raise ValueError(f"a target callable must return a scalar per image, got shape {v.shape}")
        return jnp.stack([v.reshape(()) for v in vals])
    if not tcol.scalar:
        raise ValueError(
            f"{type(tcol).__name__} returns a vector, not a scalar: it can only be used with gradient-free "
            "methods (e.g. EigenCAM), as in grad-cam"
        )
    s = jax.vmap(lambda t, o: t(o))(tcol, output)
    if s.ndim != 1:
        raise ValueError(f"{type(tcol).__name__} must return a scalar per image, got shape {s.shape[1:]}")
    return s


def _per_target(fn, target: Target | None, grid: CallableGrid | None):
    """``fn(column)`` for every target column, stacked on a leading T axis (vmap for pytree targets)."""
    if grid is not None:
        outs = [fn(tuple(row[t] for row in grid.rows)) for t in range(grid.num_targets)]
        return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)
    if not jax.tree.leaves(target):  # a target without array fields (e.g. SoftmaxOutputTarget)
        return jax.tree.map(lambda v: v[None], fn(target))
    return jax.vmap(fn, in_axes=1)(target)


def _gradients(tap: Tap, x, method: CamMethod, target, grid):
    """One forward pass; returns (output, acts, grads (T,B,...) per layer or None, hvp or None, scores (T, B)
    or None)."""
    shapes = jax.eval_shape(lambda: tap.run(x))[1]
    zeros = [jnp.zeros(s.shape, s.dtype) for s in shapes]

    def fwd(probes):
        return tap.run(x, probes)

    if not method.uses_gradients and not method.needs_hvp:
        output, acts = fwd(None)  # targets are not used by gradient-free methods
        return output, acts, None, None, None

    output, vjp_fn, acts = jax.vjp(fwd, zeros, has_aux=True)
    if target is None and grid is None:
        target = (method.default_targets or _default_target)(jax.lax.stop_gradient(output))
        target, _, _ = target.broadcast(output.shape[0])
    # everything below stays differentiable (jax.grad of a CAM w.r.t. inputs or parameters is exact,
    # second-order terms of non-linear targets included)
    if not method.needs_hvp:
        def grads_for(tcol):
            ct, s = jax.grad(lambda o: (jnp.sum(sc := _scores(tcol, o)), sc), has_aux=True)(output)
            return vjp_fn(ct)[0], s

        grads, scores = _per_target(grads_for, target, grid)
        return output, acts, grads, None, scores

    def grads_hvp_for(tcol):
        def loss(probes):
            return jnp.sum(_scores(tcol, fwd(probes)[0]))

        gs, hs = [], []
        s = _scores(tcol, output)
        for i in range(len(zeros)):
            def grad_i(p_i, i=i):
                probes = list(zeros)
                probes[i] = p_i
                return jax.grad(loss)(probes)[i]

            g, h = jax.jvp(grad_i, (zeros[i],), (acts[i],))
            gs.append(g)
            hs.append(h)
        return gs, hs, s

    grads, hvps, scores = _per_target(grads_hvp_for, target, grid)
    return output, acts, grads, hvps, scores


def _cam_single_view(tap, x, method, target, grid, t, eigen_smooth, key, reshape_transform=None):
    output, acts, grads, hvps, scores = _gradients(tap, x, method, target, grid)
    # a NaN score (an out-of-range class that could only be checked under tracing, or a NaN output) makes
    # the maps of that image and target NaN: its gradient alone would be zero and look like a result
    poison = None if scores is None else jnp.where(jnp.isnan(jnp.moveaxis(scores, 0, 1)), jnp.nan, 0.0)
    if reshape_transform is not None:  # e.g. ViT tokens (B, N, C) -> (B, h, w, C), as grad-cam's option
        acts = [reshape_transform(a) for a in acts]
        grads = None if grads is None else [jax.vmap(reshape_transform)(g) for g in grads]
        hvps = None if hvps is None else [jax.vmap(reshape_transform)(h) for h in hvps]
    size = x.shape[1:-1]
    b = x.shape[0]
    raws, cams = [], []
    for li, a in enumerate(acts):
        g = None if grads is None else jnp.moveaxis(grads[li], 0, 1)  # (B, T, ...)
        h = None if hvps is None else jnp.moveaxis(hvps[li], 0, 1)
        keys = None
        if method.needs_key:  # compute_cam_prepared has checked that a key was given
            keys = jax.random.split(jax.random.fold_in(key, li), (b, t))

        def one(a1, g1, h1, k1):
            return method.cam_image(CamInputs(a1, g1, h1, k1, eigen_smooth))

        per_target = tuple(0 if v is not None else None for v in (g, h, keys))
        if any(ax is not None for ax in per_target):
            inner = jax.vmap(one, in_axes=(None,) + per_target)
            raw = jax.vmap(inner, in_axes=(0,) + per_target)(a, g, h, keys)
        else:  # gradient-free and deterministic: one map per image, shared by its targets
            raw = jax.vmap(lambda a1: one(a1, None, None, None))(a)[:, None]
            raw = jnp.broadcast_to(raw, (b, t) + raw.shape[2:])
        if poison is not None:
            raw = raw + poison.astype(raw.dtype).reshape(poison.shape + (1,) * (raw.ndim - 2))
        raws.append(raw)
        spatial = raw.ndim - 2
        cams.append(resize_maps(scale_cam(jnp.maximum(raw, 0), spatial_ndim=spatial), size))
    cam = aggregate_layers(cams, spatial_ndim=len(size))
    return cam, raws, output


def compute_cam(
    tap: Tap,
    x: jax.Array,
    targets: Any = None,
    *,
    method: str | CamMethod = "gradcam",
    eigen_smooth: bool = False,
    aug_smooth: bool = False,
    key: jax.Array | None = None,
    reshape_transform: Callable[[jax.Array], jax.Array] | None = None,
) -> CamResult:
    """Functional CAM: traceable, differentiable, usable inside your own ``jax.jit``/``jax.grad``.

    Args:
      tap: how to run the model and read the target layers (:func:`flax_attn.cam.make_tap`).
      x: channels-last images ``(B, H, W, C)`` (3-D: ``(B, H, W, D, C)``).
      targets: see :func:`flax_attn.cam.targets.normalize_targets`; ``None``: arg-max class per image.
      method: a registered method name (``"gradcam"``, ``"gradcam++"``, ``"hirescam"``, ``"xgradcam"``,
        ``"layercam"``, ``"gradcamelementwise"``, ``"eigencam"``, ``"eigengradcam"``, ``"shapleycam"``,
        ``"finercam"``, ``"randomcam"``) or a :class:`CamMethod`.
      eigen_smooth: replace the channel sum by the first principal component (grad-cam's option).
      aug_smooth: average over grad-cam's 6 test-time augmentations (flip x {0.9, 1, 1.1}), de-augmented.
        The 6 views run as ONE batch of ``6B`` images (the model runs in eval mode, so images are
        independent).
      key: PRNG key, required by random methods (RandomCAM).
      reshape_transform: maps a tapped activation ``(B, ...)`` to channels-last maps ``(B, *spatial, C)``
        (grad-cam's option, e.g. for transformer tokens); applied to activations and gradients alike.

    Returns:
      :class:`CamResult` (normalised ``cam``, per-layer ``raw`` maps, model ``output``).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from flax_attn.cam import FunctionTap
        >>> w = jax.random.normal(jax.random.key(0), (4, 3))
        >>> tap = FunctionTap(lambda x: jnp.tanh(x), lambda a: a.mean((1, 2)) @ w)
        >>> compute_cam(tap, jax.random.normal(jax.random.key(1), (2, 5, 6, 4))).cam.shape
        (2, 5, 6)
    """
    method = get_method(method)
    x, prepared = preflight(tap, x, targets)
    return compute_cam_prepared(tap, x, prepared, method=method, eigen_smooth=eigen_smooth, aug_smooth=aug_smooth,
                                key=key, reshape_transform=reshape_transform)


def check_images(x: Any) -> jax.Array:
    """``x`` as a floating-point, channels-last, non-empty image batch ``(B, *spatial, C)``, or a clear error.

    Example:
        >>> check_images(jnp.ones((1, 4, 4, 3))).shape
        (1, 4, 4, 3)
    """
    if not hasattr(x, "ndim") or x.ndim < 3:
        raise ValueError(f"x: expected channels-last images (B, H, W, C), got {getattr(x, 'shape', type(x))}")
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"x: expected a floating-point image batch, got dtype {x.dtype}")
    if x.shape[0] == 0:
        raise ValueError(f"x: empty batch, got shape {x.shape}: a CAM needs at least one image (B >= 1)")
    if 0 in x.shape[1:]:
        raise ValueError(f"x: expected non-empty images (B, H, W, C) with H, W, C >= 1, got shape {x.shape}")
    return x


_check_input = check_images  # former private name, still imported by flax_attn.cam.detection


def preflight(tap: Tap, x: Any, targets: Any, *,
              output_struct: Callable[[jax.Array], Any] | None = None) -> tuple[jax.Array, PreparedTargets]:
    """What every CAM entry point checks before computing: the images (:func:`check_images`), the targets
    (:func:`~flax_attn.cam.targets.normalize_targets`), and concrete class indices against the model's
    output shape (``output_struct(x)``, default ``jax.eval_shape`` of the tap; the class API passes a cached
    one). Traced class indices are checked inside the computation instead (NaN maps).

    Example:
        >>> from flax_attn.cam import FunctionTap
        >>> tap = FunctionTap(jnp.tanh, lambda a: a.mean((1, 2)))
        >>> x, p = preflight(tap, jnp.ones((2, 3, 3, 4)), [1, 3])
        >>> p.target.category.shape
        (2, 1)
    """
    x = check_images(x)
    prepared = normalize_targets(targets, x.shape[0])
    if prepared.target is not None:
        out = (output_struct or (lambda x: jax.eval_shape(lambda: tap.run(x)[0])))(x)
        if hasattr(out, "shape"):
            prepared.target.validate(tuple(out.shape[1:]))
    return x, prepared


def compute_cam_prepared(tap: Tap, x: jax.Array, prepared: PreparedTargets, *, method: CamMethod,
                         eigen_smooth: bool = False, aug_smooth: bool = False, key: jax.Array | None = None,
                         reshape_transform: Callable | None = None) -> CamResult:
    """:func:`compute_cam` after :func:`preflight` (the jitted class API calls this inside its jit).

    Example:
        >>> from flax_attn.cam import FunctionTap, get_method
        >>> tap = FunctionTap(jnp.tanh, lambda a: a.mean((1, 2)))
        >>> x, p = preflight(tap, jnp.ones((2, 3, 3, 4)), [1, 3])
        >>> compute_cam_prepared(tap, x, p, method=get_method("gradcam")).cam.shape
        (2, 3, 3)
    """
    target, grid, t, has_t = prepared
    b = x.shape[0]
    if method.needs_key and key is None:
        raise ValueError(f"method {method.name!r} is random: pass key=jax.random.key(...)")

    if not aug_smooth:
        cam, raws, output = _cam_single_view(tap, x, method, target, grid, t, eigen_smooth, key, reshape_transform)
    else:
        n = len(AUG_TRANSFORMS)
        views = [(jnp.flip(x, axis=2) if flip else x) * jnp.asarray(m, x.dtype) if m != 1.0
                 else (jnp.flip(x, axis=2) if flip else x) for flip, m in AUG_TRANSFORMS]
        xa = jnp.concatenate(views, axis=0)
        ta = None if target is None else jax.tree.map(lambda v: jnp.concatenate([v] * n, axis=0), target)
        ga = None if grid is None else CallableGrid(grid.rows * n, grid.has_target_axis)
        cam, raws, output = _cam_single_view(tap, xa, method, ta, ga, t, eigen_smooth, key, reshape_transform)
        cam = cam.reshape((n, b) + cam.shape[1:])
        cam = jnp.stack([jnp.flip(c, axis=3) if flip else c for c, (flip, _) in zip(cam, AUG_TRANSFORMS)])
        cam = jnp.mean(cam, axis=0)
        raws = [r.reshape((n, b) + r.shape[1:]) for r in raws]
        output = jax.tree.map(lambda o: o.reshape((n, b) + o.shape[1:]), output)
    if not has_t:
        cam = cam[:, 0]
        raws = [r[:, :, 0] if aug_smooth else r[:, 0] for r in raws]
    return CamResult(cam, raws, output)
