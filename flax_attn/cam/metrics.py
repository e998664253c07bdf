"""Faithfulness metrics of CAMs, on the device: confidence change, ROAD, deletion / insertion curves.

Names, constructors and call signatures are grad-cam 1.5.7's (``pytorch_grad_cam.metrics``), so users switch
by changing imports::

    from flax_attn.cam import ROADCombined, ClassifierOutputTarget
    scores = ROADCombined(percentiles=[20, 40, 60, 80])(x, cams, targets, model)      # (B,)

``input_tensor``: channels-last images ``(B, H, W, C)``; ``cams``: ``(B, H, W)`` maps (grad-cam's numpy
array, or our CAM output); ``targets``: as for the CAM classes (a list of ``B`` targets, class indices
``(B,)`` / ``(B, T)``, a batched :class:`~flax_attn.cam.Target`, callables; ``None`` = arg-max class of the
unperturbed output); ``model``: a ``flax.nnx.Module`` (run in eval mode on a copy), a ``(linen_module,
variables)`` pair, a :class:`~flax_attn.cam.Tap`, or a plain function ``images -> outputs``. Scores are
``(B,)`` float32 (``(B, T)`` with 2-D targets), returned as ``jax.Array``.

Every call is one ``jax.jit``-compiled function (compiled functions are shared by every metric object in
one module-level LRU cache keyed by the model structure, the metric and its options, the kind of targets and
the input shapes; new weights, images, cams or class indices never recompile). All perturbed images of a
call (every percentile, MoRF and LeRF, every deletion step) are built and scored on the device, the model
forward in chunks of ``batch_size`` images (``None``: all at once).

**ROAD** (Rong et al. 2022, "A Consistent and Efficient Evaluation Strategy for Attribution Methods",
arXiv:2202.00449): pixels whose cam is at or above the ``percentile``-th percentile (MoRF; LeRF: of
``1 - cam``) are replaced by grad-cam's ``NoisyLinearImputer``: each removed pixel equals the weighted mean
of its 8 neighbours (weights 1/6 edge, 1/12 diagonal; neighbours outside the image drop out and the centre
weight shrinks accordingly), known neighbours enter the right-hand side; then ``noise * N(0, 1)`` is added to
the removed pixels (noise 0.01). The threshold is numpy's ``np.percentile`` (linear interpolation, replicated
bit for bit in float32). The sparse system (symmetric positive definite on the removed pixels) is solved on
the device by a matrix-free, batched conjugate gradient in float32 (one system per image, percentile and
channel; stopping rule ``||r|| <= tol * ||b||``, default ``tol=1e-6``, at most ``maxiter`` iterations,
default ``4 * (H + W) + 100``); grad-cam solves it with scipy's sparse LU in float64 on the CPU. Where nothing
is kept (``percentile=0`` of MoRF, a constant cam) the system is singular: grad-cam's ``spsolve`` fails,
here the removed pixels become ``0 + noise``. The noise is ``jax.random.normal(key, (P, B, H, W, C))`` for the
``P`` percentiles of one metric (``ROADCombined``: LeRF with ``fold_in(key, 0)``, MoRF with
``fold_in(key, 1)``); ``key=None`` draws a fresh key from ``seed`` and the call count (grad-cam draws
``torch.randn`` every call). ``percentile="auto"`` (grad-cam's Otsu threshold) is not supported.

**Deletion / insertion** (Petsiuk et al. 2018, "RISE", arXiv:1806.07421, its ``CausalMetric``): pixels
are ranked by decreasing cam (ties: lower flat index first) and modified ``step`` at a time (default: the
image width, RISE's 224 on 224x224). Deletion replaces them by ``baseline`` (default zeros), insertion starts
from ``baseline`` (default a Gaussian blur of the image) and puts them back; the target score is recorded
before the first and after every step (``n = ceil(H * W / step)`` steps, ``n + 1`` scores) and the AUC is
RISE's ``(sum(s) - s[0] / 2 - s[-1] / 2) / n`` (trapezoid rule on ``[0, 1]``). RISE scores the softmax
probability: pass :class:`~flax_attn.cam.ClassifierOutputSoftmaxTarget` for its numbers.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flax_attn.cam.api import _LRU
from flax_attn.cam.engine import _default_target, _per_target, _scores, preflight
from flax_attn.cam.taps import FunctionTap, Tap, _KeyedStatic, make_tap, structural_key
from flax_attn.cam.targets import CallableGrid, PreparedTargets

__all__ = [
    "NEIGHBOR_WEIGHTS",
    "CamMultImageConfidenceChange",
    "DeletionCurve",
    "DropInConfidence",
    "IncreaseInConfidence",
    "InsertionCurve",
    "PerturbationConfidenceMetric",
    "ROADCombined",
    "ROADLeastRelevantFirst",
    "ROADLeastRelevantFirstAverage",
    "ROADMostRelevantFirst",
    "ROADMostRelevantFirstAverage",
    "gaussian_blur",
    "metric_cache_info",
    "noisy_linear_impute",
    "percentile_threshold",
    "road_keep_mask",
]

#: grad-cam's ``neighbors_weights`` of the noisy linear imputer: ((row offset, column offset), weight)
NEIGHBOR_WEIGHTS: tuple[tuple[tuple[int, int], float], ...] = (
    ((1, 1), 1 / 12), ((0, 1), 1 / 6), ((-1, 1), 1 / 12), ((1, -1), 1 / 12),
    ((0, -1), 1 / 6), ((-1, -1), 1 / 12), ((1, 0), 1 / 6), ((-1, 0), 1 / 6),
)

_DEFAULT_PERCENTILES = (10, 20, 30, 40, 50, 60, 70, 80, 90)

# ------------------------------------------------------------------------------------------------------
# input checks
# ------------------------------------------------------------------------------------------------------


def _check_percentile(p: Any, who: str) -> float:
    if isinstance(p, str):
        raise ValueError(f"{who}: percentile={p!r} (grad-cam's Otsu threshold) is not supported; expected a "
                         "number in [0, 100]")
    if isinstance(p, bool) or not isinstance(p, (int, float, np.integer, np.floating)):
        raise TypeError(f"{who}: expected a percentile in [0, 100] (a number), got {type(p).__name__}")
    if not (0 <= float(p) <= 100):
        raise ValueError(f"{who}: percentile out of range: got {p}, expected a number in [0, 100]")
    return float(p)


def _check_percentiles(ps: Any, who: str) -> tuple[float, ...]:
    if isinstance(ps, (str, int, float, np.integer, np.floating)) or not isinstance(ps, Sequence | np.ndarray):
        raise TypeError(f"{who}: expected a sequence of percentiles in [0, 100], got {ps!r}")
    out = tuple(_check_percentile(p, who) for p in ps)
    if not out:
        raise ValueError(f"{who}: expected at least one percentile, got an empty sequence")
    return out


def _check_positive_int(v: Any, name: str, *, allow_none: bool = True) -> int | None:
    if v is None and allow_none:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
        raise ValueError(f"{name}: expected a positive integer{' or None' if allow_none else ''}, got {v!r}")
    return int(v)


def _check_cams(cams: Any, x: jax.Array) -> jax.Array:
    if not hasattr(cams, "shape"):
        cams = np.asarray(cams)
    if cams.ndim != 3 or tuple(cams.shape) != tuple(x.shape[:3]):
        extra = ""
        if cams.ndim == 4 and tuple(cams.shape[:1]) + tuple(cams.shape[2:]) == tuple(x.shape[:3]):
            extra = " (one map per image: pick one target of a (B, T, H, W) CAM, e.g. cams[:, 0])"
        raise ValueError(f"cams: expected one map per image of shape {tuple(x.shape[:3])} (B, H, W) for images "
                         f"{tuple(x.shape)} (B, H, W, C), got {tuple(cams.shape)}{extra}")
    if not jnp.issubdtype(cams.dtype, jnp.floating):
        raise TypeError(f"cams: expected floating-point maps, got dtype {cams.dtype}")
    return jnp.asarray(cams, x.dtype)


def _check_images_2d(x: Any) -> jax.Array:
    from flax_attn.cam.engine import check_images

    x = check_images(x)
    if x.ndim != 4:
        raise ValueError(f"input_tensor: expected channels-last images (B, H, W, C), got shape {tuple(x.shape)}")
    return x


# ------------------------------------------------------------------------------------------------------
# thresholds and the noisy linear imputer (pure functions, usable inside jit)
# ------------------------------------------------------------------------------------------------------


def _lerp_params(n: int, percentiles: Sequence[float]) -> tuple[np.ndarray, ...]:
    """numpy's ``linear`` percentile of ``n`` sorted values as (lo, hi, t, 1 - t, t >= 0.5) per percentile,
    computed on the host in float64 exactly as ``np.percentile`` does for a Python-number ``q``."""
    lo_l, hi_l, t_l, up_l = [], [], [], []
    for p in percentiles:
        vi = (n - 1) * np.true_divide(p, 100)  # numpy: virtual index (float64), then floor / clip / gamma
        if vi >= n - 1:
            lo = hi = n - 1
            gamma = float(vi - (-1))  # numpy sets both indices to -1; the lerp of equal ends is exact
        else:
            lo = max(int(np.floor(vi)), 0)
            hi, gamma = lo + 1, float(vi - lo)
        lo_l.append(lo)
        hi_l.append(hi)
        t_l.append(gamma)
        up_l.append(gamma >= 0.5)
    t = np.asarray(t_l, np.float64)
    return (np.asarray(lo_l, np.int32), np.asarray(hi_l, np.int32), t.astype(np.float32),
            (1 - t).astype(np.float32), np.asarray(up_l, bool))


def _threshold_sorted(s: jax.Array, lo: Any, hi: Any, t: Any, omt: Any, upper: Any) -> jax.Array:
    """numpy's two-sided lerp on sorted rows ``s`` ``(N, n)``: ``b - (b - a)(1 - t)`` if ``t >= 0.5``, else
    ``a + (b - a) t`` (float32, as numpy on float32 data)."""
    a = jnp.take(s, lo, axis=1)
    b = jnp.take(s, hi, axis=1)
    diff = b - a
    return jnp.where(upper, b - diff * omt.astype(s.dtype), a + diff * t.astype(s.dtype))


def percentile_threshold(values: jax.Array, percentile: float) -> jax.Array:
    """``np.percentile(values[i], percentile)`` for every leading index, float32 bit for bit as numpy's
    ``linear`` method on float32 data with a Python-number ``q`` (sort, then numpy's two-sided lerp).

    ``values``: ``(N, ...)``; returns ``(N,)``. ``percentile``: a Python number in [0, 100].

    Example:
        >>> import jax.numpy as jnp
        >>> percentile_threshold(jnp.arange(5.0)[None], 30).tolist()
        [1.2000000476837158]
    """
    p = _check_percentile(percentile, "percentile_threshold")
    flat = values.reshape(values.shape[0], -1)
    lo, hi, t, omt, up = _lerp_params(flat.shape[1], [p])
    return _threshold_sorted(jnp.sort(flat, axis=-1), lo[0], hi[0], t[0], omt[0], up[0])


def road_keep_mask(cams: jax.Array, percentile: float, *, most_relevant_first: bool = True) -> jax.Array:
    """grad-cam's binary mask of the pixels ROAD keeps: ``cam < np.percentile(cam, p)`` (MoRF) or
    ``1 - cam < np.percentile(1 - cam, p)`` (LeRF). ``cams``: ``(N, H, W)``; returns a boolean ``(N, H, W)``.

    Example:
        >>> import jax.numpy as jnp
        >>> road_keep_mask(jnp.arange(4.0).reshape(1, 2, 2), 50).astype(int).tolist()
        [[[1, 1], [0, 0]]]
    """
    m = cams if most_relevant_first else 1 - cams
    thr = percentile_threshold(m, percentile)
    return m < thr.reshape((-1,) + (1,) * (m.ndim - 1))


def _shift(x: jax.Array, di: int, dj: int) -> jax.Array:
    """``y[:, i, j] = x[:, i + di, j + dj]`` (zero outside the image); ``x``: ``(N, H, W, ...)``."""
    h, w = x.shape[1], x.shape[2]
    pad = [(0, 0), (max(-di, 0), max(di, 0)), (max(-dj, 0), max(dj, 0))] + [(0, 0)] * (x.ndim - 3)
    xp = jnp.pad(x, pad)
    i0, j0 = max(di, 0), max(dj, 0)
    return jax.lax.slice_in_dim(jax.lax.slice_in_dim(xp, i0, i0 + h, axis=1), j0, j0 + w, axis=2)


def _neighbour_sum(x: jax.Array) -> jax.Array:
    out = None
    for (di, dj), wgt in NEIGHBOR_WEIGHTS:
        term = _shift(x, di, dj) * jnp.asarray(wgt, x.dtype)
        out = term if out is None else out + term
    assert out is not None
    return out


def _batched_cg(apply_a: Callable[[jax.Array], jax.Array], b: jax.Array, *, tol: float, maxiter: int) -> jax.Array:
    """Conjugate gradient on many independent SPD systems at once: ``b`` is ``(N, H, W, C)``, one system per
    ``(n, c)`` (scalars reduce over H, W). A system stops updating once ``||r|| <= tol * ||b||``."""
    axes = (1, 2)

    def dot(u, v):
        return jnp.sum(u * v, axis=axes, keepdims=True)

    thresh = (tol * tol) * dot(b, b)
    x0 = jnp.zeros_like(b)
    rs0 = dot(b, b)

    def cond(state):
        k, _, _, _, rs = state
        return (k < maxiter) & jnp.any(rs > thresh)

    def body(state):
        k, x, r, p, rs = state
        active = rs > thresh
        ap = apply_a(p)
        pap = dot(p, ap)
        alpha = jnp.where(active, rs / jnp.where(active, pap, 1), 0)
        x = x + alpha * p
        r = r - alpha * ap
        rs_new = dot(r, r)
        beta = jnp.where(active, rs_new / jnp.where(active, rs, 1), 0)
        p = jnp.where(active, r + beta * p, p)
        return k + 1, x, r, p, jnp.where(active, rs_new, rs)

    _, x, _, _, _ = jax.lax.while_loop(cond, body, (jnp.asarray(0), x0, b, b, rs0))
    return x


def noisy_linear_impute(images: jax.Array, keep: jax.Array, *, noise: float = 0.01, key: jax.Array | None = None,
                        noise_values: jax.Array | None = None, tol: float = 1e-6,
                        maxiter: int | None = None) -> jax.Array:
    """grad-cam's ``NoisyLinearImputer`` for a batch, solved on the device (see the module docstring).

    ``images``: ``(N, H, W, C)``; ``keep``: ``(N, H, W)``, true (or > 0.5) where the pixel is known, false where
    it is imputed. The removed pixels solve ``x_i = sum_j w_ij v_j / sum_j w_ij`` over the in-image neighbours
    ``j`` (``v_j`` the image where known, the unknown ``x_j`` otherwise) by batched conjugate gradient; then
    ``noise * noise_values`` (default ``jax.random.normal(key, images.shape)``; no noise without a key) is
    added to the removed pixels only.

    Example:
        >>> import jax.numpy as jnp
        >>> img = jnp.arange(9.0).reshape(1, 3, 3, 1)
        >>> keep = jnp.ones((1, 3, 3), bool).at[0, 1, 1].set(False)
        >>> round(float(noisy_linear_impute(img, keep, noise=0.0)[0, 1, 1, 0]), 4)
        4.0
    """
    if images.ndim != 4:
        raise ValueError(f"images: expected (N, H, W, C), got shape {tuple(images.shape)}")
    if tuple(keep.shape) != tuple(images.shape[:3]):
        raise ValueError(f"keep: expected a mask of shape {tuple(images.shape[:3])} (N, H, W), got "
                         f"{tuple(keep.shape)}")
    dtype = images.dtype
    h, w = images.shape[1], images.shape[2]
    maxiter = 4 * (h + w) + 100 if maxiter is None else int(maxiter)
    known = (keep > 0.5 if jnp.issubdtype(keep.dtype, jnp.floating) else keep.astype(bool))[..., None]
    u = (~known).astype(dtype)  # 1 on the removed pixels
    ones = jnp.ones((1, h, w, 1), dtype)
    diag = _neighbour_sum(ones)  # sum of the in-image neighbour weights (grad-cam's sum_neighbors)
    rhs = u * _neighbour_sum((1 - u) * images)

    def apply_a(v):
        return u * (diag * v - _neighbour_sum(u * v)) + (1 - u) * v

    sol = _batched_cg(apply_a, rhs, tol=tol, maxiter=maxiter)
    out = jnp.where(known, images, sol)
    if noise_values is None and key is not None and noise != 0:
        noise_values = jax.random.normal(key, images.shape, dtype)
    if noise_values is not None and noise != 0:
        out = out + u * (jnp.asarray(noise, dtype) * noise_values.astype(dtype))
    return out


def _gaussian_kernel(klen: int, sigma: float) -> np.ndarray:
    r = np.arange(klen, dtype=np.float64) - (klen - 1) / 2
    k = np.exp(-0.5 * (r / sigma) ** 2)
    return (k / k.sum()).astype(np.float32)


def gaussian_blur(images: jax.Array, *, klen: int = 11, sigma: float = 5.0) -> jax.Array:
    """Per-channel Gaussian blur with a normalised ``klen``-tap kernel, zero padding ``klen // 2`` (RISE's
    insertion substrate; RISE builds its 11x11 kernel with scipy's ``gaussian_filter`` of a delta, whose
    reflected tails differ slightly: pass that as ``baseline=`` for its exact numbers).

    Example:
        >>> import jax.numpy as jnp
        >>> gaussian_blur(jnp.ones((1, 16, 16, 3))).shape
        (1, 16, 16, 3)
    """
    k = jnp.asarray(_gaussian_kernel(klen, sigma), images.dtype)
    c = images.shape[-1]
    pad = klen // 2
    out = images
    for axis in (1, 2):
        shape = (klen, 1, 1, 1) if axis == 1 else (1, klen, 1, 1)
        kern = jnp.broadcast_to(k.reshape(shape), shape[:3] + (c,))  # depthwise: one kernel per channel
        out = jax.lax.conv_general_dilated(out, kern, (1, 1), [(pad, pad) if a == axis else (0, 0)
                                                                             for a in (1, 2)],
                                           dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c,
                                           precision=jax.lax.Precision.HIGHEST)
    return out


# ------------------------------------------------------------------------------------------------------
# the shared jitted pipeline
# ------------------------------------------------------------------------------------------------------

_COMPILED = _LRU(32)


def metric_cache_info() -> tuple[int, int, int]:
    """``(hits, misses, traces)`` of the shared metric compile cache (traces = compilations).

    Example:
        >>> len(metric_cache_info())
        3
    """
    return _COMPILED.hits, _COMPILED.misses, _COMPILED.traces


def _identity(x: jax.Array) -> jax.Array:
    return x


class _ForwardStatic:
    """The hashable half of a model split for the metrics' jit cache (hash computed once)."""

    def __init__(self, kind: str, structure: Any):
        self.kind, self.structure = kind, structure
        self._hash = hash((kind, structure))

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: Any) -> bool:
        return self is other or (isinstance(other, _ForwardStatic) and self._hash == other._hash
                                 and self.kind == other.kind and self.structure == other.structure)


class _ModelTap(Tap):
    """A whole-model forward (no target layers): an NNX module (eval mode, on a copy) or a Linen
    ``(module, variables)`` pair; ``run(x)`` returns ``(output, [])``."""

    layers: tuple[str, ...] = ()

    def __init__(self, static: _ForwardStatic, dynamic: Any):
        self.static, self.dynamic = static, dynamic

    @classmethod
    def of(cls, model: Any) -> _ModelTap:
        if isinstance(model, nnx.Module):
            graphdef, state = nnx.split(model)
            return cls(_ForwardStatic("nnx", graphdef), state)
        module, variables = model
        return cls(_ForwardStatic("linen", module), variables)

    def run(self, x: jax.Array, probes: Any = None, **kwargs: Any) -> tuple[Any, list[jax.Array]]:
        if self.static.kind == "nnx":
            work = nnx.merge(self.static.structure, self.dynamic)
            work.eval()
            return work(x), []
        return self.static.structure.apply(self.dynamic, x), []

    def split(self) -> tuple[Any, Any]:
        return self.static, self.dynamic

    def rebuild(self, static: Any, dynamic: Any) -> Tap:
        return _ModelTap(static, dynamic)


def _model_tap(model: Any) -> Tap:
    if isinstance(model, Tap):
        return model
    if isinstance(model, nnx.Module):
        return _ModelTap.of(model)
    if isinstance(model, tuple) and len(model) == 2:
        import flax.linen as nn

        if isinstance(model[0], nn.Module):
            return _ModelTap.of(model)
        return make_tap(model, None)
    if callable(model):
        return FunctionTap(_identity, model, name="input")
    raise TypeError("model: expected a flax.nnx.Module, a (flax.linen.Module, variables) pair, a Tap or a "
                    f"function images -> outputs; got {type(model).__name__}")


@dataclasses.dataclass(frozen=True)
class _Spec:
    kind: str  # "mult", "road", "curve"
    num_percentiles: int = 0
    morf: tuple[bool, ...] = ()  # one entry per ROAD run (Combined: (False, True))
    noise: float = 0.0
    tol: float = 1e-6
    maxiter: int | None = None
    step: int = 1
    deletion: bool = True
    batch_size: int | None = None


def _forward(tap: Tap, xs: jax.Array, batch_size: int | None) -> Any:
    m = xs.shape[0]
    if batch_size is None or batch_size >= m:
        return tap.run(xs)[0]
    n = -(-m // batch_size)
    pad = n * batch_size - m
    xp = jnp.concatenate([xs, jnp.zeros((pad,) + xs.shape[1:], xs.dtype)]) if pad else xs
    out = jax.lax.map(lambda c: tap.run(c)[0], xp.reshape((n, batch_size) + xs.shape[1:]))
    return jax.tree.map(lambda o: o.reshape((n * batch_size,) + o.shape[2:])[:m], out)


def _target_scores(target: Any, grid: CallableGrid | None, t: int, output: Any, reps: int) -> jax.Array:
    """Scores ``(reps, B, T)`` of ``reps`` stacked batches of outputs ``(reps * B, ...)``."""
    tt = None if target is None else jax.tree.map(lambda v: jnp.concatenate([jnp.asarray(v)] * reps, axis=0), target)
    gg = None if grid is None else CallableGrid(grid.rows * reps, grid.has_target_axis)
    s = _per_target(lambda col: _scores(col, output), tt, gg)  # (T, reps * B)
    return jnp.moveaxis(s.reshape((t, reps, -1)), 0, -1)


def _pipeline(spec: _Spec, tap: Tap, x: jax.Array, cams: jax.Array, target: Any, grid: CallableGrid | None, t: int,
              key: jax.Array | None, lerp: tuple[jax.Array, ...] | None):
    """Returns (scores before (B, T), scores of each perturbation (K, B, T), perturbed images (K, B, H, W, C))."""
    b = x.shape[0]
    out0 = _forward(tap, x, spec.batch_size)
    if target is None and grid is None:
        target = _default_target(out0)
    before = _target_scores(target, grid, t, out0, 1)[0]
    if spec.kind == "mult":
        pert = (x * cams[..., None])[None]
    elif spec.kind == "road":
        assert lerp is not None
        npc = spec.num_percentiles
        keeps = []
        for morf in spec.morf:
            m = cams if morf else 1 - cams
            srt = jnp.sort(m.reshape(b, -1), axis=-1)  # one sort per image, shared by every percentile
            thr = jax.vmap(functools.partial(_threshold_sorted, srt))(*lerp)  # (P, B)
            keeps.append((m[None] < thr[:, :, None, None]).reshape((npc * b,) + m.shape[1:]))
        nzs = []
        for r in range(len(spec.morf)):
            if key is not None:
                kr = jax.random.fold_in(key, r) if len(spec.morf) > 1 else key
                nzs.append(jax.random.normal(kr, (npc,) + x.shape, x.dtype).reshape((-1,) + x.shape[1:]))
        xs = jnp.concatenate([x] * (npc * len(spec.morf)))
        pert = noisy_linear_impute(xs, jnp.concatenate(keeps), noise=spec.noise,
                                   noise_values=jnp.concatenate(nzs) if nzs else None, tol=spec.tol,
                                   maxiter=spec.maxiter).reshape((-1,) + x.shape)
    else:
        raise AssertionError(spec.kind)
    k = pert.shape[0]
    out = _forward(tap, pert.reshape((k * b,) + x.shape[1:]), spec.batch_size)
    return before, _target_scores(target, grid, t, out, k), pert


def _curve_pipeline(spec: _Spec, tap: Tap, x: jax.Array, cams: jax.Array, baseline: jax.Array, target: Any,
                    grid: CallableGrid | None, t: int):
    """Scores ``(B, T, n + 1)`` of the deletion / insertion images after 0..n steps."""
    b, h, w, c = x.shape
    hw = h * w
    n = -(-hw // spec.step)
    order = jnp.argsort(-cams.reshape(b, hw), axis=-1, stable=True)
    rank = jnp.zeros((b, hw), jnp.int32).at[jnp.arange(b)[:, None], order].set(jnp.arange(hw, dtype=jnp.int32))
    rank = rank.reshape(b, h, w, 1)
    first, second = (x, baseline) if spec.deletion else (baseline, x)
    if target is None and grid is None:
        target = _default_target(_forward(tap, x, spec.batch_size))
    chunk = spec.batch_size if spec.batch_size is not None else (n + 1) * b
    per = max(1, chunk // b)  # steps per forward chunk
    nchunks = -(-(n + 1) // per)

    def run(ci):
        ks = ci * per + jnp.arange(per)
        imgs = jnp.where(rank[None] < (ks * spec.step)[:, None, None, None, None], second[None], first[None])
        out = tap.run(imgs.reshape((per * b, h, w, c)))[0]
        return _target_scores(target, grid, t, out, per)  # (per, B, T)

    s = jax.lax.map(run, jnp.arange(nchunks)) if nchunks > 1 else run(jnp.asarray(0))[None]
    s = s.reshape((nchunks * per,) + s.shape[2:])[: n + 1]  # (n + 1, B, T)
    return jnp.moveaxis(s, 0, -1)


def _aval(v: Any) -> Any:
    return (tuple(v.shape), str(v.dtype)) if hasattr(v, "shape") and hasattr(v, "dtype") else structural_key(v)


class _Entry:
    fn: Callable[..., Any]
    tap: Callable[[], Any]


def _compiled(tag: str, spec: _Spec, tap: Tap, static: Any, prepared: PreparedTargets, args: tuple,
              make_impl: Callable[[Callable[[], Tap], Any, Any], Callable[..., Any]]):
    target_sig = None if prepared.target is None else (
        jax.tree.structure(prepared.target), tuple(_aval(v) for v in jax.tree.leaves(prepared.target)))
    grid = prepared.grid
    gkey = None if grid is None else _KeyedStatic(structural_key(grid), grid)  # type: ignore[arg-type]
    key = (tag, spec, static, gkey, prepared.num_targets, target_sig, tuple(_aval(a) for a in args))

    def make():
        entry = _Entry()
        entry.fn = jax.jit(make_impl(lambda: entry.tap(), static, grid))
        return entry

    entry = _COMPILED.get(key, make)
    entry.tap = weakref.ref(tap)
    return entry.fn


class _MetricBase:
    """Shared call machinery: model -> tap, preflight, the jitted pipeline, per-call keys."""

    spec: _Spec
    percentiles: tuple[float, ...] = ()

    def __init__(self, *, seed: int = 0, batch_size: int | None = None):
        self._seed = int(seed)
        self._calls = 0
        self.batch_size = _check_positive_int(batch_size, "batch_size")
        self.num_traces = 0
        self._last_tap: tuple[Any, Tap] | None = None

    def _tap(self, model: Any) -> Tap:
        """The tap of ``model``, split afresh every call (an NNX model's weights may have changed in place);
        the previous static half is reused while the structure is unchanged (its hash is computed once)."""
        tap = _model_tap(model)
        if isinstance(tap, _ModelTap):
            last = self._last_tap
            if last is not None and isinstance(last[1], _ModelTap) and last[1].static == tap.static:
                tap = _ModelTap(last[1].static, tap.dynamic)
        elif self._last_tap is not None and self._last_tap[0] is model and not isinstance(model, Tap):
            tap = self._last_tap[1]  # a function / (features, head) pair: keep its cached structural key
        self._last_tap = (model, tap)
        return tap

    def _key(self, key: jax.Array | None) -> jax.Array:
        if key is None:
            key = jax.random.fold_in(jax.random.key(self._seed), self._calls)
        self._calls += 1
        return key

    def _prepare(self, input_tensor: Any, cams: Any, targets: Any, model: Any):
        tap = self._tap(model)
        x = _check_images_2d(input_tensor)
        cams_j = _check_cams(cams, x)
        x, prepared = preflight(tap, x, targets)
        return tap, x, cams_j, prepared

    def _raw(self, input_tensor: Any, cams: Any, targets: Any, model: Any, key: jax.Array | None):
        tap, x, cams_j, prepared = self._prepare(input_tensor, cams, targets, model)
        static, dynamic = tap.split()
        spec, t = self.spec, prepared.num_targets
        key = self._key(key) if spec.kind == "road" and spec.noise != 0 else None
        # the percentiles' interpolation indices and weights are arguments, not constants: new percentile
        # values (same count) reuse the compiled function
        lerp = _lerp_params(x.shape[1] * x.shape[2], self.percentiles) if spec.kind == "road" else None

        def make_impl(get_tap, static, grid):
            def impl(dynamic, x, cams, target, key, lerp):
                _COMPILED.traces += 1
                return _pipeline(spec, get_tap().rebuild(static, dynamic), x, cams, target, grid, t, key, lerp)
            return impl

        fn = _compiled("pcm", spec, tap, static, prepared, (x, cams_j, key is not None), make_impl)
        before = _COMPILED.traces
        out = fn(dynamic, x, cams_j, prepared.target, key, lerp)
        self.num_traces += _COMPILED.traces - before
        return prepared, out

    def _finish(self, prepared: PreparedTargets, s: jax.Array) -> jax.Array:
        return s if prepared.has_target_axis else s[..., 0]


class PerturbationConfidenceMetric(_MetricBase):
    """grad-cam's ``PerturbationConfidenceMetric``: target score of the perturbed images minus that of the
    originals (``return_diff=False``: the perturbed score alone). ``perturbation``: ``"mult"`` (image x cam),
    or ``("morf" | "lerf", percentile)`` for ROAD. Subclasses fix it (use those).

    Example:
        >>> import jax.numpy as jnp
        >>> m = PerturbationConfidenceMetric("mult")
        >>> m(jnp.ones((2, 4, 4, 3)), jnp.full((2, 4, 4), 0.5), [0, 1], lambda x: x.mean((1, 2))).tolist()
        [-0.5, -0.5]
    """

    def __init__(self, perturbation: Any, *, noise: float = 0.01, tol: float = 1e-6, maxiter: int | None = None,
                 seed: int = 0, batch_size: int | None = None):
        super().__init__(seed=seed, batch_size=batch_size)
        who = type(self).__name__
        if perturbation == "mult":
            self.spec = _Spec("mult", batch_size=self.batch_size)
        elif isinstance(perturbation, tuple) and len(perturbation) == 2 and perturbation[0] in ("morf", "lerf"):
            self.percentiles = (_check_percentile(perturbation[1], who),)
            self.spec = _Spec("road", 1, (perturbation[0] == "morf",), float(noise), float(tol),
                              _check_positive_int(maxiter, "maxiter"), batch_size=self.batch_size)
        else:
            raise ValueError(f"{who}: perturbation: expected 'mult' or ('morf' | 'lerf', percentile), got "
                             f"{perturbation!r}")

    def _post(self, scores: jax.Array) -> jax.Array:
        return scores

    def __call__(self, input_tensor: Any, cams: Any, targets: Any, model: Any, return_visualization: bool = False,
                 return_diff: bool = True, *, key: jax.Array | None = None) -> Any:
        prepared, (before, after, pert) = self._raw(input_tensor, cams, targets, model, key)
        s = after[0] - before if return_diff else after[0]
        s = self._post(self._finish(prepared, s))
        return (s, pert[0]) if return_visualization else s


class CamMultImageConfidenceChange(PerturbationConfidenceMetric):
    """Score of ``image * cam`` minus the score of the image (grad-cam's ``CamMultImageConfidenceChange``).

    Example:
        >>> import jax.numpy as jnp
        >>> f = lambda x: x.sum((1, 2))
        >>> CamMultImageConfidenceChange()(jnp.ones((1, 2, 2, 2)), jnp.full((1, 2, 2), 0.25), [1], f).tolist()
        [-3.0]
    """

    def __init__(self, *, batch_size: int | None = None):
        super().__init__("mult", batch_size=batch_size)


class DropInConfidence(CamMultImageConfidenceChange):
    """``max(-(score(image * cam) - score(image)), 0)`` (grad-cam's ``DropInConfidence``).

    Example:
        >>> import jax.numpy as jnp
        >>> f = lambda x: x.sum((1, 2))
        >>> DropInConfidence()(jnp.ones((1, 2, 2, 2)), jnp.full((1, 2, 2), 0.25), [1], f).tolist()
        [3.0]
    """

    def _post(self, scores: jax.Array) -> jax.Array:
        return jnp.maximum(-scores, 0)


class IncreaseInConfidence(CamMultImageConfidenceChange):
    """``1.0`` where ``score(image * cam) > score(image)``, else ``0.0`` (grad-cam's ``IncreaseInConfidence``).

    Example:
        >>> import jax.numpy as jnp
        >>> f = lambda x: x.sum((1, 2))
        >>> IncreaseInConfidence()(jnp.ones((2, 2, 2, 2)), jnp.stack([jnp.full((2, 2), 2.0),
        ...                        jnp.full((2, 2), 0.5)]), [0, 0], f).tolist()
        [1.0, 0.0]
    """

    def _post(self, scores: jax.Array) -> jax.Array:
        return (scores > 0).astype(jnp.float32)


class ROADMostRelevantFirst(PerturbationConfidenceMetric):
    """ROAD, most relevant first: impute the pixels with ``cam >= np.percentile(cam, percentile)`` and report
    the change of the target score (lower is a more faithful cam). See the module docstring for the imputer,
    the solver (``tol``, ``maxiter``) and the noise (``key``, ``seed``).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> x = jax.random.uniform(jax.random.key(0), (2, 8, 8, 3))
        >>> cams = jax.random.uniform(jax.random.key(1), (2, 8, 8))
        >>> ROADMostRelevantFirst(percentile=80)(x, cams, [0, 2], lambda x: x.mean((1, 2))).shape
        (2,)
    """

    def __init__(self, percentile: float = 80, *, noise: float = 0.01, tol: float = 1e-6, maxiter: int | None = None,
                 seed: int = 0, batch_size: int | None = None):
        super().__init__(("morf", percentile), noise=noise, tol=tol, maxiter=maxiter, seed=seed,
                         batch_size=batch_size)


class ROADLeastRelevantFirst(PerturbationConfidenceMetric):
    """ROAD, least relevant first: impute the pixels with ``1 - cam >= np.percentile(1 - cam, percentile)``
    (higher is better). See :class:`ROADMostRelevantFirst`.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> x = jax.random.uniform(jax.random.key(0), (2, 8, 8, 3))
        >>> cams = jax.random.uniform(jax.random.key(1), (2, 8, 8))
        >>> ROADLeastRelevantFirst(20)(x, cams, [0, 2], lambda x: x.mean((1, 2))).shape
        (2,)
    """

    def __init__(self, percentile: float = 20, *, noise: float = 0.01, tol: float = 1e-6, maxiter: int | None = None,
                 seed: int = 0, batch_size: int | None = None):
        super().__init__(("lerf", percentile), noise=noise, tol=tol, maxiter=maxiter, seed=seed,
                         batch_size=batch_size)


class _ROADAverage(_MetricBase):
    _runs: tuple[bool, ...] = ()

    def __init__(self, percentiles: Sequence[float] = _DEFAULT_PERCENTILES, *, noise: float = 0.01, tol: float = 1e-6,
                 maxiter: int | None = None, seed: int = 0, batch_size: int | None = None):
        super().__init__(seed=seed, batch_size=batch_size)
        self.percentiles = _check_percentiles(percentiles, type(self).__name__)
        self.spec = _Spec("road", len(self.percentiles), self._runs, float(noise), float(tol),
                          _check_positive_int(maxiter, "maxiter"), batch_size=self.batch_size)

    def _combine(self, d: jax.Array) -> jax.Array:
        return jnp.mean(d, axis=0)

    def __call__(self, input_tensor: Any, cams: Any, targets: Any, model: Any, *,
                 key: jax.Array | None = None) -> jax.Array:
        prepared, (before, after, _) = self._raw(input_tensor, cams, targets, model, key)
        return self._finish(prepared, self._combine(after - before[None]))


class ROADMostRelevantFirstAverage(_ROADAverage):
    """Mean of :class:`ROADMostRelevantFirst` over ``percentiles`` (grad-cam's default 10, 20, ..., 90), all
    percentiles imputed and scored in one jitted call.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> x = jax.random.uniform(jax.random.key(0), (2, 8, 8, 3))
        >>> cams = jax.random.uniform(jax.random.key(1), (2, 8, 8))
        >>> ROADMostRelevantFirstAverage([20, 50])(x, cams, [0, 2], lambda x: x.mean((1, 2))).shape
        (2,)
    """

    _runs = (True,)


class ROADLeastRelevantFirstAverage(_ROADAverage):
    """Mean of :class:`ROADLeastRelevantFirst` over ``percentiles``. See :class:`ROADMostRelevantFirstAverage`.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> x = jax.random.uniform(jax.random.key(0), (2, 8, 8, 3))
        >>> cams = jax.random.uniform(jax.random.key(1), (2, 8, 8))
        >>> ROADLeastRelevantFirstAverage([20, 50])(x, cams, [0, 2], lambda x: x.mean((1, 2))).shape
        (2,)
    """

    _runs = (False,)


class ROADCombined(_ROADAverage):
    """``(LeRF average - MoRF average) / 2`` over ``percentiles`` (grad-cam's ``ROADCombined``; higher is
    better); LeRF and MoRF of every percentile imputed and scored in one jitted call.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> x = jax.random.uniform(jax.random.key(0), (2, 8, 8, 3))
        >>> cams = jax.random.uniform(jax.random.key(1), (2, 8, 8))
        >>> ROADCombined([20, 50])(x, cams, [0, 2], lambda x: x.mean((1, 2))).shape
        (2,)
    """

    _runs = (False, True)

    def _combine(self, d: jax.Array) -> jax.Array:
        p = len(self.percentiles)
        return (jnp.mean(d[:p], axis=0) - jnp.mean(d[p:], axis=0)) / 2


# ------------------------------------------------------------------------------------------------------
# deletion / insertion (RISE)
# ------------------------------------------------------------------------------------------------------


class _CausalCurve(_MetricBase):
    _deletion: bool = True
    _default_baseline: str = "zeros"

    def __init__(self, step: int | None = None, *, baseline: Any = None, blur_klen: int = 11, blur_sigma: float = 5.0,
                 batch_size: int | None = None):
        super().__init__(batch_size=batch_size)
        self.step = _check_positive_int(step, "step")
        baseline = self._default_baseline if baseline is None else baseline
        if isinstance(baseline, str) and baseline not in ("zeros", "blur"):
            raise ValueError(f"baseline: expected 'zeros', 'blur', a number, an image array or a function, got "
                             f"{baseline!r}")
        self.baseline = baseline
        self.blur_klen = int(_check_positive_int(blur_klen, "blur_klen", allow_none=False) or 0)
        self.blur_sigma = float(blur_sigma)

    def _baseline(self, x: jax.Array) -> jax.Array:
        bl = self.baseline
        if isinstance(bl, str):
            return jnp.zeros_like(x) if bl == "zeros" else gaussian_blur(x, klen=self.blur_klen, sigma=self.blur_sigma)
        if callable(bl):
            out = jnp.asarray(bl(x), x.dtype)
        else:
            out = jnp.asarray(bl, x.dtype)
        try:
            return jnp.broadcast_to(out, x.shape)
        except ValueError:
            raise ValueError(f"baseline: expected an array broadcastable to the images {tuple(x.shape)}, got shape "
                             f"{tuple(out.shape)}") from None

    def __call__(self, input_tensor: Any, cams: Any, targets: Any, model: Any, *,
                 return_curves: bool = False) -> Any:
        tap, x, cams_j, prepared = self._prepare(input_tensor, cams, targets, model)
        base = self._baseline(x)
        static, dynamic = tap.split()
        step = self.step if self.step is not None else x.shape[2]
        spec = _Spec("curve", step=step, deletion=self._deletion, batch_size=self.batch_size)
        t = prepared.num_targets

        def make_impl(get_tap, static, grid):
            def impl(dynamic, x, cams, base, target):
                _COMPILED.traces += 1
                curves = _curve_pipeline(spec, get_tap().rebuild(static, dynamic), x, cams, base, target, grid, t)
                n = curves.shape[-1] - 1
                auc = (jnp.sum(curves, axis=-1) - curves[..., 0] / 2 - curves[..., -1] / 2) / n
                return auc, curves
            return impl

        fn = _compiled("curve", spec, tap, static, prepared, (x, cams_j, base), make_impl)
        before = _COMPILED.traces
        auc, curves = fn(dynamic, x, cams_j, base, prepared.target)
        self.num_traces += _COMPILED.traces - before
        if not prepared.has_target_axis:
            auc, curves = auc[:, 0], curves[:, 0]
        return (auc, curves) if return_curves else auc

    @staticmethod
    def num_steps(height: int, width: int, step: int | None = None) -> int:
        """``ceil(H * W / step)`` (default step: the width): the curve has one more point than this."""
        return math.ceil(height * width / (width if step is None else step))


class DeletionCurve(_CausalCurve):
    """RISE's deletion metric: remove the most relevant pixels first (``step`` per step) by ``baseline``
    (default zeros) and report the area under the target-score curve (lower is better). See the module
    docstring. ``return_curves=True`` also returns the ``(B, n + 1)`` scores.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> x = jax.random.uniform(jax.random.key(0), (2, 8, 8, 3))
        >>> cams = jax.random.uniform(jax.random.key(1), (2, 8, 8))
        >>> auc, curves = DeletionCurve(step=16)(x, cams, [0, 2], lambda x: x.mean((1, 2)), return_curves=True)
        >>> auc.shape, curves.shape
        ((2,), (2, 5))
    """

    _deletion = True
    _default_baseline = "zeros"


class InsertionCurve(_CausalCurve):
    """RISE's insertion metric: start from ``baseline`` (default :func:`gaussian_blur` of the image) and put
    the most relevant pixels back first (higher is better). See :class:`DeletionCurve`.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> x = jax.random.uniform(jax.random.key(0), (2, 8, 8, 3))
        >>> cams = jax.random.uniform(jax.random.key(1), (2, 8, 8))
        >>> InsertionCurve(step=16)(x, cams, [0, 2], lambda x: x.mean((1, 2))).shape
        (2,)
    """

    _deletion = False
    _default_baseline = "blur"
