"""The score family: ScoreCAM (grad-cam 1.5.7), SS-CAM, IS-CAM and SmoothGradCAM++ (torchcam 0.5.0).

ScoreCAM-like methods weight each channel ``A_c`` of a target layer by the model's score on the input masked
by that channel (upsampled to the input size and min-max normalised), softmax-ed over the channels:

* :class:`ScoreCAM` (Wang et al. 2020, "Score-CAM: Score-Weighted Visual Explanations for Convolutional Neural
  Networks", arXiv:1910.01279), exactly as ``pytorch_grad_cam.ScoreCAM``: ``UpsamplingBilinear2d``
  (align_corners=True) upsampling, then per-channel min-max ``(u - min) / (max - min + 1e-8)``, then
  ``softmax_c(score(x * u_c))``.
* :class:`SSCAM` (Wang et al. 2020, "SS-CAM: Smoothed Score-CAM for Sharper Visual Feature Localization",
  arXiv:2006.14255) and :class:`ISCAM` (Naidu et al. 2020, "IS-CAM: Integrated Score-CAM for axiomatic-based
  explanations", arXiv:2010.03023) as ``torchcam.methods.SSCAM`` / ``ISCAM``: per-channel min-max at the
  layer's resolution (eps 1e-8), then bilinear upsampling with half-pixel centres (``F.interpolate``,
  align_corners=False); SS-CAM adds Gaussian noise ``N(0, std^2)`` to the upsampled mask (``num_samples``
  draws), IS-CAM scales the masked input by the cumulative coefficients ``sum_{j<=i} j / N``; the weights are
  ``softmax_c(mean_i(score_i - baseline))``. torchcam's baseline score is a per-image constant and softmax is
  shift-invariant, so it is not computed (one forward pass fewer, same weights).

Every masked input of every image, channel and sample is scored inside ONE jitted call: the ``S * B * C``
masked images are formed chunk by chunk (``batch_size`` images a chunk, mask upsampling included, so the
``(S * B * C, H, W, 3)`` tensor never exists) by one ``jax.lax.map`` over the chunks; the scores of all
``T`` targets of an image come from the same forward pass. ``batch_size`` changes memory and speed, never
the result (up to float32 summation order inside the model).

* :class:`SmoothGradCAMpp` (Omeiza et al. 2019, "Smooth Grad-CAM++: An Enhanced Inference Level Visualization
  Technique for Deep Convolutional Neural Network Models", arXiv:1908.01224) as ``torchcam.methods.
  SmoothGradCAMpp``: gradients of the target at ``num_samples`` noisy inputs ``x + N(0, std^2)`` (one batch
  of ``num_samples * B`` images, one ``jax.vjp``); ``alpha = mean(g^2) / (2 mean(g^2) + sum_ij(mean(g^3) A)
  + 1e-8)`` with the clean activations ``A``; channel weights ``sum_ij alpha * relu(g)``. torchcam's hooks
  keep overwriting the stored activation and gradient with each noisy forward pass, so its weights use the
  LAST noisy sample's gradient ``g`` and its map ``sum_c w_c A_c`` the LAST noisy sample's activations; we
  reproduce that (the clean activations enter only through ``alpha``), as parity demands.

Noise comes from a ``jax.random`` key (``key=``; the classes derive one from ``seed`` and the call count, as
:class:`~flax_attn.cam.RandomCAM`), never from torch's generator: the parity tests feed OUR noise to torchcam.

What the classes return is what every CAM of :mod:`flax_attn.cam` returns: the raw map ``sum_c w_c A_c``
(``raw``), then ReLU, per-map min-max (eps 1e-7), bilinear resize to the input size (half-pixel centres, as
grad-cam's ``cv2.resize``) and layer aggregation. torchcam instead returns ``relu(raw)`` min-max normalised
with eps 1e-8 at the LAYER's resolution (its users resize afterwards); compare ``raw`` (or
``scale_cam(relu(raw))``) with torchcam's maps, not the resized ``cam``.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from flax_attn.cam import api as _api
from flax_attn.cam.api import BaseCAM
from flax_attn.cam.engine import CamResult, _default_target, _gradients, _scores, preflight
from flax_attn.cam.methods import get_method
from flax_attn.cam.postprocess import aggregate_layers, first_component_projection, resize_maps, scale_cam
from flax_attn.cam.taps import Tap, make_tap, structural_key
from flax_attn.cam.targets import CallableGrid, PreparedTargets, Target

__all__ = ["ISCAM", "SSCAM", "ScoreCAM", "SmoothGradCAMpp", "is_cam", "score_cam", "smooth_gradcampp", "ss_cam"]

#: the normalisation epsilon of grad-cam's ScoreCAM masks and of torchcam's ``_normalize``
MASK_EPS = 1e-8


# ------------------------------------------------------------------------------------------------------
# argument checks
# ------------------------------------------------------------------------------------------------------

def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected a positive integer, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name}: expected an integer >= 1, got {value}")
    return int(value)


def _positive_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name}: expected a positive real number, got {type(value).__name__} {value!r}")
    if not math.isfinite(float(value)) or value <= 0:
        raise ValueError(f"{name}: expected a finite number > 0, got {value}")
    return float(value)


def _check_key(name: str, key: Any) -> jax.Array:
    if key is None:
        raise ValueError(f"{name} is random: pass key=jax.random.key(...)")
    if not isinstance(key, jax.Array):
        raise TypeError(f"key: expected a jax.random key, got {type(key).__name__}")
    return key


# ------------------------------------------------------------------------------------------------------
# interpolation (torch's bilinear, both corner conventions) and normalisation
# ------------------------------------------------------------------------------------------------------

def interpolation_matrix(n_in: int, n_out: int, *, align_corners: bool) -> np.ndarray:
    """``(n_out, n_in)`` matrix of 1-D linear interpolation as torch computes it (``F.interpolate`` with a
    given size; ``align_corners=True`` is ``nn.UpsamplingBilinear2d``); applied along each spatial axis it
    is torch's bilinear (trilinear) resize.

    Example:
        >>> interpolation_matrix(2, 3, align_corners=True).tolist()
        [[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]]
    """
    dst = np.arange(n_out, dtype=np.float64)
    if align_corners:
        src = dst * ((n_in - 1) / (n_out - 1)) if n_out > 1 else np.zeros(n_out)
    else:
        src = np.maximum((dst + 0.5) * (n_in / n_out) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    lam = src - i0
    m = np.zeros((n_out, n_in))
    np.add.at(m, (np.arange(n_out), i0), 1.0 - lam)
    np.add.at(m, (np.arange(n_out), i1), lam)
    return m


def _resize_torch(maps: jax.Array, size: tuple[int, ...], align_corners: bool) -> jax.Array:
    """torch's bilinear resize of the trailing ``len(size)`` axes of ``maps`` (separable matrices)."""
    nd = len(size)
    lead = maps.ndim - nd
    for i, n_out in enumerate(size):
        ax = lead + i
        m = jnp.asarray(interpolation_matrix(maps.shape[ax], n_out, align_corners=align_corners), maps.dtype)
        maps = jnp.moveaxis(jnp.tensordot(maps, m, axes=([ax], [1]), precision=jax.lax.Precision.HIGHEST), -1, ax)
    return maps


def _minmax(maps: jax.Array, spatial_ndim: int) -> jax.Array:
    axes = tuple(range(maps.ndim - spatial_ndim, maps.ndim))
    maps = maps - jnp.min(maps, axis=axes, keepdims=True)
    return maps / (jnp.max(maps, axis=axes, keepdims=True) + MASK_EPS)


def _layer_key(key: jax.Array, layer: int) -> jax.Array:
    return jax.random.fold_in(key, layer)


def _ss_noise(layer_key: jax.Array, sample: jax.Array, pair: jax.Array, size: tuple[int, ...], std: float,
              dtype: Any) -> jax.Array:
    """SS-CAM's noise on the upsampled mask of (sample, image * C + channel): ``std * N(0, 1)`` of shape
    ``size``; a function of the indices only, so chunking (``batch_size``) cannot change it."""
    k = jax.random.fold_in(jax.random.fold_in(layer_key, sample), pair)
    return std * jax.random.normal(k, size, dtype)


def _smooth_noise(key: jax.Array, num_samples: int, shape: tuple[int, ...], std: float, dtype: Any) -> jax.Array:
    """SmoothGradCAM++'s input noise ``(num_samples, *x.shape)``: ``std * N(0, 1)``."""
    return std * jax.random.normal(key, (num_samples,) + tuple(shape), dtype)


def iscam_coefficients(num_samples: int) -> np.ndarray:
    """IS-CAM's input scales ``c_i = sum_{j=1..i} j / N`` for ``i = 1..N``, accumulated as torchcam does.

    Example:
        >>> iscam_coefficients(4).tolist()
        [0.25, 0.75, 1.5, 2.5]
    """
    out, c = [], 0.0
    for i in range(num_samples):
        c += (i + 1) / num_samples
        out.append(c)
    return np.asarray(out)


# ------------------------------------------------------------------------------------------------------
# scores of arbitrary rows of images against their own image's targets
# ------------------------------------------------------------------------------------------------------

def _row_scores(out: Any, b_idx: jax.Array, target: Target | None, grid: CallableGrid | None, t: int) -> jax.Array:
    """``(rows, T)``: row ``r`` of the model output scored by the targets of image ``b_idx[r]``."""
    if grid is not None:  # callables cannot be gathered by a traced index: score with all B, then select
        cols = []
        for ti in range(t):
            per_image = []
            for row in grid.rows:
                f = row[ti]

                def one(o, f=f):
                    v = jnp.asarray(f(o))
                    if v.size != 1:
                        raise ValueError(f"a target callable must return a scalar per image, got shape {v.shape}")
                    return v.reshape(())

                per_image.append(jax.vmap(one)(out))
            cols.append(jnp.take_along_axis(jnp.stack(per_image), b_idx[None], axis=0)[0])
        return jnp.stack(cols, axis=-1)
    assert target is not None
    tg = jax.tree.map(lambda v: jnp.asarray(v)[b_idx], target)  # leaves (rows, T, ...)
    if not jax.tree.leaves(tg):
        return jnp.broadcast_to(_scores(tg, out)[:, None], (b_idx.shape[0], t))
    return jax.vmap(lambda tcol: _scores(tcol, out), in_axes=1, out_axes=1)(tg)


def _resolve_target(tap: Tap, x: jax.Array, prepared: PreparedTargets, output: Any, name: str):
    target, grid = prepared.target, prepared.grid
    if target is None and grid is None:
        target, _, _ = _default_target(jax.lax.stop_gradient(output)).broadcast(x.shape[0])
    if target is not None and not target.scalar:
        raise ValueError(f"{name}: {type(target).__name__} returns a vector; {name} scores masked inputs with a "
                         "scalar per image (e.g. ClassifierOutputTarget)")
    return target, grid


# ------------------------------------------------------------------------------------------------------
# the score family
# ------------------------------------------------------------------------------------------------------

def _score_weights(tap: Tap, x: jax.Array, acts: jax.Array, target: Target | None, grid: CallableGrid | None,
                   t: int, *, variant: str, batch_size: int, num_samples: int, std: float,
                   layer_key: jax.Array | None) -> jax.Array:
    """Channel weights ``(B, C, T)`` of one layer (``acts``: ``(B, *s, C)``)."""
    b, c = acts.shape[0], acts.shape[-1]
    size = tuple(x.shape[1:-1])
    nd = len(size)
    maps = jnp.moveaxis(acts, -1, 1)  # (B, C, *s)
    if variant != "scorecam":  # torchcam: min-max at the layer's resolution, then upsample
        maps = _minmax(maps, nd)
    n = num_samples
    total = n * b * c
    coeffs = jnp.asarray(iscam_coefficients(n), x.dtype) if variant == "iscam" else None

    def chunk(ix):
        ix = jnp.where(ix < total, ix, 0)  # the padded tail of the last chunk repeats entry 0 (discarded)
        s, p = ix // (b * c), ix % (b * c)
        bi, ci = p // c, p % c
        m = maps[bi, ci]  # (rows, *s)
        if variant == "scorecam":
            m = _minmax(_resize_torch(m, size, align_corners=True), nd)
        else:
            m = _resize_torch(m, size, align_corners=False)
        if variant == "sscam":
            assert layer_key is not None
            m = m + jax.vmap(lambda s1, p1: _ss_noise(layer_key, s1, p1, size, std, m.dtype))(s, p)
        xin = x[bi] * m[..., None]
        if coeffs is not None:
            xin = coeffs[s].reshape((-1,) + (1,) * (xin.ndim - 1)) * xin
        out = tap.run(xin)[0]
        return _row_scores(out, bi, target, grid, t)

    n_chunks = -(-total // batch_size)
    idx = jnp.arange(n_chunks * batch_size, dtype=jnp.int32).reshape(n_chunks, batch_size)
    scores = jax.lax.map(chunk, idx).reshape(-1, t)[:total].reshape(n, b, c, t)
    return jax.nn.softmax(jnp.mean(scores, axis=0), axis=1)


def _combine(weights: jax.Array, acts: jax.Array, eigen_smooth: bool) -> jax.Array:
    """Raw maps ``(B, T, *s)`` from weights ``(B, C, T)`` and activations ``(B, *s, C)``."""
    nd = acts.ndim - 2
    w = jnp.moveaxis(weights, 1, -1).reshape(weights.shape[0], weights.shape[2], *(1,) * nd, weights.shape[1])
    weighted = w * acts[:, None]  # (B, T, *s, C)
    if eigen_smooth:
        return jax.vmap(jax.vmap(first_component_projection))(weighted)
    return jnp.sum(weighted, axis=-1)


def _finish(raws: list[jax.Array], size: tuple[int, ...], has_t: bool, output: Any) -> CamResult:
    cams = [resize_maps(scale_cam(jnp.maximum(r, 0), spatial_ndim=r.ndim - 2), size) for r in raws]
    cam = aggregate_layers(cams, spatial_ndim=len(size))
    if not has_t:
        cam, raws = cam[:, 0], [r[:, 0] for r in raws]
    return CamResult(cam, raws, output)


def _score_family_prepared(tap: Tap, x: jax.Array, prepared: PreparedTargets, *, variant: str, batch_size: int,
                           num_samples: int = 1, std: float = 0.0, key: jax.Array | None = None,
                           eigen_smooth: bool = False, reshape_transform: Callable | None = None) -> CamResult:
    name = _NAMES[variant]
    output, acts = tap.run(x)
    target, grid = _resolve_target(tap, x, prepared, output, name)
    if reshape_transform is not None:
        acts = [reshape_transform(a) for a in acts]
    raws = []
    for li, a in enumerate(acts):
        if a.ndim < 3:
            raise ValueError(f"{name}: target layer {tap.layers[li]!r} gives activations of shape {a.shape}, "
                             "expected channels-last maps (B, *spatial, C) (use reshape_transform for tokens)")
        lk = None if key is None else _layer_key(key, li)
        w = _score_weights(tap, x, a, target, grid, prepared.num_targets, variant=variant, batch_size=batch_size,
                           num_samples=num_samples, std=std, layer_key=lk)
        raws.append(_combine(w, a, eigen_smooth))
    return _finish(raws, tuple(x.shape[1:-1]), prepared.has_target_axis, output)


def _smooth_prepared(tap: Tap, x: jax.Array, prepared: PreparedTargets, *, num_samples: int, std: float,
                     key: jax.Array, eigen_smooth: bool = False,
                     reshape_transform: Callable | None = None) -> CamResult:
    name = "SmoothGradCAMpp"
    output, acts = tap.run(x)
    target, grid = _resolve_target(tap, x, prepared, output, name)
    n, b = num_samples, x.shape[0]
    noisy = (x[None] + _smooth_noise(key, n, x.shape, std, x.dtype)).reshape((n * b,) + x.shape[1:])
    tn = None if target is None else jax.tree.map(lambda v: jnp.concatenate([v] * n, axis=0), target)
    gn = None if grid is None else CallableGrid(grid.rows * n, grid.has_target_axis)
    _, nacts, grads, _, scores = _gradients(tap, noisy, get_method("gradcam"), tn, gn)
    assert grads is not None and scores is not None
    if reshape_transform is not None:
        acts = [reshape_transform(a) for a in acts]
        nacts = [reshape_transform(a) for a in nacts]
        grads = [jax.vmap(reshape_transform)(g) for g in grads]
    t = prepared.num_targets
    poison = jnp.where(jnp.any(jnp.isnan(scores.reshape(t, n, b)), axis=1).T, jnp.nan, 0.0)  # (B, T)
    raws = []
    for a, na, g in zip(acts, nacts, grads):
        g = g.reshape((t, n, b) + g.shape[2:])
        g2, g3 = jnp.mean(g**2, axis=1), jnp.mean(g**3, axis=1)  # (T, B, *s, C)
        spatial = tuple(range(2, g2.ndim - 1))
        alpha = g2 / (2 * g2 + jnp.sum(g3 * a[None], axis=spatial, keepdims=True) + MASK_EPS)
        w = jnp.sum(alpha * jnp.maximum(g[:, -1], 0), axis=spatial)  # (T, B, C)
        last = na.reshape((n, b) + na.shape[1:])[-1]
        raw = _combine(jnp.moveaxis(w, 0, -1), last, eigen_smooth)
        raws.append(raw + poison.astype(raw.dtype).reshape(poison.shape + (1,) * (raw.ndim - 2)))
    return _finish(raws, tuple(x.shape[1:-1]), prepared.has_target_axis, output)


_NAMES = {"scorecam": "ScoreCAM", "sscam": "SSCAM", "iscam": "ISCAM", "smoothgradcampp": "SmoothGradCAMpp"}


def _compute_prepared(variant: str, tap: Tap, x: jax.Array, prepared: PreparedTargets, **kw: Any) -> CamResult:
    if variant == "smoothgradcampp":
        kw.pop("batch_size", None)
        return _smooth_prepared(tap, x, prepared, **kw)
    return _score_family_prepared(tap, x, prepared, variant=variant, **kw)


# ------------------------------------------------------------------------------------------------------
# functional API
# ------------------------------------------------------------------------------------------------------

def score_cam(tap: Tap, x: jax.Array, targets: Any = None, *, batch_size: int = 16, eigen_smooth: bool = False,
              reshape_transform: Callable[[jax.Array], jax.Array] | None = None) -> CamResult:
    """Functional ScoreCAM (grad-cam 1.5.7's numerics), traceable under your own ``jax.jit``.

    ``batch_size`` masked images per forward pass (grad-cam's default 16); ``targets`` as in
    :func:`~flax_attn.cam.compute_cam` (scalar targets only). Returns a :class:`~flax_attn.cam.CamResult`.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from flax_attn.cam import FunctionTap
        >>> w = jax.random.normal(jax.random.key(0), (4, 3))
        >>> tap = FunctionTap(lambda x: jnp.tanh(x[:, ::2, ::2]), lambda a: a.mean((1, 2)) @ w)
        >>> score_cam(tap, jax.random.normal(jax.random.key(1), (2, 6, 6, 4)), [0, 2], batch_size=3).cam.shape
        (2, 6, 6)
    """
    bs = _positive_int("batch_size", batch_size)
    x, prepared = preflight(tap, x, targets)
    return _score_family_prepared(tap, x, prepared, variant="scorecam", batch_size=bs, eigen_smooth=eigen_smooth,
                                  reshape_transform=reshape_transform)


def ss_cam(tap: Tap, x: jax.Array, targets: Any = None, *, key: jax.Array, batch_size: int = 32,
           num_samples: int = 35, std: float = 2.0, eigen_smooth: bool = False,
           reshape_transform: Callable[[jax.Array], jax.Array] | None = None) -> CamResult:
    """Functional SS-CAM (torchcam 0.5.0's ``SSCAM`` numerics and defaults); noise from ``key``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from flax_attn.cam import FunctionTap
        >>> tap = FunctionTap(lambda x: jnp.tanh(x[:, ::2, ::2]), lambda a: a.mean((1, 2)))
        >>> x = jax.random.normal(jax.random.key(1), (1, 6, 6, 4))
        >>> ss_cam(tap, x, [1], key=jax.random.key(0), num_samples=3).raw[0].shape
        (1, 3, 3)
    """
    bs, n = _positive_int("batch_size", batch_size), _positive_int("num_samples", num_samples)
    sd, key = _positive_float("std", std), _check_key("SSCAM", key)
    x, prepared = preflight(tap, x, targets)
    return _score_family_prepared(tap, x, prepared, variant="sscam", batch_size=bs, num_samples=n, std=sd, key=key,
                                  eigen_smooth=eigen_smooth, reshape_transform=reshape_transform)


def is_cam(tap: Tap, x: jax.Array, targets: Any = None, *, batch_size: int = 32, num_samples: int = 10,
           eigen_smooth: bool = False, reshape_transform: Callable[[jax.Array], jax.Array] | None = None) -> CamResult:
    """Functional IS-CAM (torchcam 0.5.0's ``ISCAM`` numerics and defaults; deterministic).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from flax_attn.cam import FunctionTap
        >>> tap = FunctionTap(lambda x: jnp.tanh(x[:, ::2, ::2]), lambda a: a.mean((1, 2)))
        >>> is_cam(tap, jax.random.normal(jax.random.key(1), (1, 6, 6, 4)), [1], num_samples=2).cam.shape
        (1, 6, 6)
    """
    bs, n = _positive_int("batch_size", batch_size), _positive_int("num_samples", num_samples)
    x, prepared = preflight(tap, x, targets)
    return _score_family_prepared(tap, x, prepared, variant="iscam", batch_size=bs, num_samples=n,
                                  eigen_smooth=eigen_smooth, reshape_transform=reshape_transform)


def smooth_gradcampp(tap: Tap, x: jax.Array, targets: Any = None, *, key: jax.Array, num_samples: int = 4,
                     std: float = 0.3, eigen_smooth: bool = False,
                     reshape_transform: Callable[[jax.Array], jax.Array] | None = None) -> CamResult:
    """Functional SmoothGradCAM++ (torchcam 0.5.0's ``SmoothGradCAMpp`` numerics and defaults); input noise
    from ``key``. The ``num_samples`` noisy copies run as one batch of ``num_samples * B`` images.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from flax_attn.cam import FunctionTap
        >>> w = jax.random.normal(jax.random.key(0), (4, 3))
        >>> tap = FunctionTap(lambda x: jnp.tanh(x), lambda a: (a**2).mean((1, 2)) @ w)
        >>> smooth_gradcampp(tap, jnp.ones((2, 5, 5, 4)), [0, 1], key=jax.random.key(2)).cam.shape
        (2, 5, 5)
    """
    n, sd = _positive_int("num_samples", num_samples), _positive_float("std", std)
    key = _check_key("SmoothGradCAMpp", key)
    x, prepared = preflight(tap, x, targets)
    return _smooth_prepared(tap, x, prepared, num_samples=n, std=sd, key=key, eigen_smooth=eigen_smooth,
                            reshape_transform=reshape_transform)


# ------------------------------------------------------------------------------------------------------
# class API (shares the compile cache of flax_attn.cam.api)
# ------------------------------------------------------------------------------------------------------

def _compiled(tap: Tap, static: Any, variant: str, options: tuple[tuple[str, Any], ...], prepared: PreparedTargets,
              x: jax.Array, has_key: bool, *, eigen_smooth: bool, return_raw: bool,
              reshape_transform: Callable | None):
    grid = prepared.grid
    target_sig = None if prepared.target is None else (
        jax.tree.structure(prepared.target), tuple(_api._aval(v) for v in jax.tree.leaves(prepared.target)))
    ckey = ("score-family", static, variant, options, None if grid is None else structural_key(grid),
            prepared.num_targets, prepared.has_target_axis, target_sig, _api._aval(x), has_key, eigen_smooth,
            return_raw, structural_key(reshape_transform))

    def make():
        t, has_t = prepared.num_targets, prepared.has_target_axis
        entry = _api._Entry()

        def impl(dynamic, x, target, rng):
            _api._COMPILED.traces += 1
            tap = entry.tap()
            res = _compute_prepared(variant, tap.rebuild(static, dynamic), x, PreparedTargets(target, grid, t, has_t),
                                    key=rng, eigen_smooth=eigen_smooth, reshape_transform=reshape_transform,
                                    **dict(options))
            return res if return_raw else res.cam

        entry.fn = jax.jit(impl)
        return entry

    entry = _api._COMPILED.get(ckey, make)
    entry.tap = weakref.ref(tap)
    return entry.fn


class _ScoreFamilyCAM(BaseCAM):
    """Shared class machinery of the score family (see :class:`ScoreCAM`)."""

    variant: ClassVar[str] = ""
    needs_key: ClassVar[bool] = False

    def __init__(self, model: Any, target_layers: Any = None, *, reshape_transform: Callable | None = None,
                 seed: int = 0, **tap_kwargs: Any):
        self.tap = make_tap(model, target_layers, **tap_kwargs)
        self.reshape_transform = reshape_transform
        self.target_layers = self.tap.layers
        self.num_traces = 0
        self._seed = seed
        self._calls = 0
        self._options: tuple[tuple[str, Any], ...] = ()

    def __call__(self, input_tensor: jax.Array, targets: Any = None, *, eigen_smooth: bool = False,  # type: ignore[override]
                 return_raw: bool = False, key: jax.Array | None = None) -> jax.Array | CamResult:
        tap = self.tap
        static, dynamic = tap.split()

        def output_struct(x):
            return _api._OUTPUT_SHAPES.get((static, _api._aval(x)), lambda: jax.eval_shape(lambda: tap.run(x)[0]))

        x, prepared = preflight(tap, input_tensor, targets, output_struct=output_struct)
        if self.needs_key:
            if key is None:
                key = jax.random.fold_in(jax.random.key(self._seed), self._calls)
            key = _check_key(type(self).__name__, key)
        else:
            key = None
        self._calls += 1
        fn = _compiled(tap, static, self.variant, self._options, prepared, x, key is not None,
                       eigen_smooth=bool(eigen_smooth), return_raw=bool(return_raw),
                       reshape_transform=self.reshape_transform)
        before = _api._COMPILED.traces
        out = fn(dynamic, x, prepared.target, key)
        self.num_traces += _api._COMPILED.traces - before
        return out

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in self._options)
        return f"{type(self).__name__}(target_layers={list(self.target_layers)}, {opts})"


class ScoreCAM(_ScoreFamilyCAM):
    """Score-CAM (Wang et al. 2020, arXiv:1910.01279) with grad-cam 1.5.7's numerics: channel weights
    ``softmax_c(score(x * minmax(up(A_c))))``, ``up`` = ``UpsamplingBilinear2d`` (align_corners=True).

    ``batch_size`` masked images per forward pass (default 16, as grad-cam); all ``B * C`` of them are scored
    in one jitted call (``jax.lax.map`` over chunks). Call: ``cam(x, targets=None, *, eigen_smooth=False,
    return_raw=False)`` -> ``(B, H, W)`` maps (``(B, T, H, W)`` for 2-D targets: T targets cost no extra
    forward pass). Recompiles on a new ``batch_size`` (and what :class:`~flax_attn.cam.BaseCAM` lists).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> w = jax.random.normal(jax.random.key(0), (4, 3))
        >>> cam = ScoreCAM((lambda x: jnp.tanh(x[:, ::2, ::2]), lambda a: a.mean((1, 2)) @ w), batch_size=4)
        >>> cam(jax.random.normal(jax.random.key(1), (2, 6, 6, 4)), [2, 0]).shape
        (2, 6, 6)
    """

    variant = "scorecam"

    def __init__(self, model: Any, target_layers: Any = None, batch_size: int = 16, *,
                 reshape_transform: Callable | None = None, **tap_kwargs: Any):
        super().__init__(model, target_layers, reshape_transform=reshape_transform, **tap_kwargs)
        self.batch_size = _positive_int("batch_size", batch_size)
        self._options = (("batch_size", self.batch_size),)


class SSCAM(_ScoreFamilyCAM):
    """SS-CAM (Wang et al. 2020, "Smoothed Score-CAM", arXiv:2006.14255) with torchcam 0.5.0's numerics and
    defaults: ScoreCAM whose upsampled masks get ``N(0, std^2)`` noise, scores averaged over ``num_samples``
    draws. Noise from ``key=`` or from ``seed`` and the call count. See the module docstring for torchcam's
    conventions and :class:`ScoreCAM` for the call.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> cam = SSCAM((lambda x: jnp.tanh(x[:, ::2, ::2]), lambda a: a.mean((1, 2))), num_samples=2)
        >>> cam(jax.random.normal(jax.random.key(1), (1, 6, 6, 4)), [3], key=jax.random.key(0)).shape
        (1, 6, 6)
    """

    variant = "sscam"
    needs_key = True

    def __init__(self, model: Any, target_layers: Any = None, batch_size: int = 32, num_samples: int = 35,
                 std: float = 2.0, *, reshape_transform: Callable | None = None, seed: int = 0, **tap_kwargs: Any):
        super().__init__(model, target_layers, reshape_transform=reshape_transform, seed=seed, **tap_kwargs)
        self.batch_size = _positive_int("batch_size", batch_size)
        self.num_samples = _positive_int("num_samples", num_samples)
        self.std = _positive_float("std", std)
        self._options = (("batch_size", self.batch_size), ("num_samples", self.num_samples), ("std", self.std))


class ISCAM(_ScoreFamilyCAM):
    """IS-CAM (Naidu et al. 2020, "Integrated Score-CAM", arXiv:2010.03023) with torchcam 0.5.0's numerics and
    defaults: ScoreCAM scores of the masked input scaled by ``sum_{j<=i} j / N``, averaged over ``i = 1..N``
    (``num_samples``). Deterministic. See :class:`ScoreCAM` for the call.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> cam = ISCAM((lambda x: jnp.tanh(x[:, ::2, ::2]), lambda a: a.mean((1, 2))), num_samples=2)
        >>> cam(jax.random.normal(jax.random.key(1), (1, 6, 6, 4)), [3]).shape
        (1, 6, 6)
    """

    variant = "iscam"

    def __init__(self, model: Any, target_layers: Any = None, batch_size: int = 32, num_samples: int = 10, *,
                 reshape_transform: Callable | None = None, **tap_kwargs: Any):
        super().__init__(model, target_layers, reshape_transform=reshape_transform, **tap_kwargs)
        self.batch_size = _positive_int("batch_size", batch_size)
        self.num_samples = _positive_int("num_samples", num_samples)
        self._options = (("batch_size", self.batch_size), ("num_samples", self.num_samples))


class SmoothGradCAMpp(_ScoreFamilyCAM):
    """Smooth Grad-CAM++ (Omeiza et al. 2019, arXiv:1908.01224) with torchcam 0.5.0's numerics and defaults
    (``num_samples=4``, ``std=0.3``): Grad-CAM++-style weights from gradients averaged over noisy inputs (see
    the module docstring for torchcam's use of the last noisy sample). Noise from ``key=`` or from ``seed``
    and the call count. Call as :class:`ScoreCAM`.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> w = jax.random.normal(jax.random.key(0), (4, 3))
        >>> cam = SmoothGradCAMpp((jnp.tanh, lambda a: (a**2).mean((1, 2)) @ w))
        >>> cam(jnp.ones((2, 5, 5, 4)), [0, 1]).shape
        (2, 5, 5)
    """

    variant = "smoothgradcampp"
    needs_key = True

    def __init__(self, model: Any, target_layers: Any = None, num_samples: int = 4, std: float = 0.3, *,
                 reshape_transform: Callable | None = None, seed: int = 0, **tap_kwargs: Any):
        super().__init__(model, target_layers, reshape_transform=reshape_transform, seed=seed, **tap_kwargs)
        self.num_samples = _positive_int("num_samples", num_samples)
        self.std = _positive_float("std", std)
        self._options = (("num_samples", self.num_samples), ("std", self.std))
