"""Deep Feature Factorization (Collins et al. 2018, arXiv:1806.10206) in JAX, as grad-cam 1.5.7's
``DeepFeatureFactorization``, ``dff`` and ``show_factorization_on_image``.

The activations of one layer over the whole batch, ``(C, B*h*w)`` with each channel shifted by its minimum,
are factorised as ``W H`` with ``W >= 0`` ``(C, k)`` (the concepts, shifted back by the channel minima) and
``H >= 0`` ``(k, B*h*w)`` (one heatmap per concept and image). grad-cam calls scikit-learn's
``NMF(n_components, init="random", random_state=0)``; :func:`nmf` is that solver in JAX, step for step:

* the same initial point: scikit-learn's ``init="random"`` draws ``|N(0, 1)| * sqrt(mean(X) / k)`` with
  ``numpy.random.RandomState(random_state)``, ``H`` first then ``W``; the normal draws depend only on the
  shapes, so they are drawn on the host with numpy at trace time and enter the computation as constants;
* the same solver: coordinate descent (``solver="cd"``, Cichocki & Phan's HALS), components updated in order
  (``shuffle=False``), ``W`` then ``H`` per iteration, each coordinate ``w = max(w - grad / hess, 0)``;
* the same stopping rule: the sum of absolute projected gradients relative to the first iteration's,
  ``<= tol`` (``1e-4``), at most ``max_iter`` (200) iterations, in one ``lax.while_loop``.

So the factorisation, its reconstruction error ``||X - WH||_F`` and the concept scores through the
classifier head agree with grad-cam's up to floating-point rounding (the parity tests measure it).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from flax_attn.cam.engine import check_images
from flax_attn.cam.postprocess import resize_maps, scale_cam
from flax_attn.cam.taps import make_tap, structural_key

__all__ = ["DFFResult", "DeepFeatureFactorization", "NMFResult", "dff", "nmf", "show_factorization_on_image"]


class NMFResult(NamedTuple):
    """``W`` ``(n_samples, k)``, ``H`` ``(k, n_features)`` (scikit-learn's ``fit_transform`` result and
    ``components_``), ``reconstruction_err`` = ``||X - W H||_F`` (scikit-learn's ``reconstruction_err_``),
    ``n_iter`` (``n_iter_``)."""

    W: jax.Array
    H: jax.Array
    reconstruction_err: jax.Array
    n_iter: jax.Array


class DFFResult(NamedTuple):
    """:class:`DeepFeatureFactorization` with ``return_raw=True``: ``concepts`` ``(C, k)``, ``explanations``
    ``(B, k, H, W)`` (min-max scaled, input size), ``concept_outputs`` (the head on the concepts, ``None``
    without a head), ``raw_explanations`` ``(B, k, h, w)`` (``H`` of the NMF), ``reconstruction_err`` and
    ``n_iter`` of the NMF."""

    concepts: jax.Array
    explanations: jax.Array
    concept_outputs: Any
    raw_explanations: jax.Array
    reconstruction_err: jax.Array
    n_iter: jax.Array


def _positive_int(name: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"{name}: expected an integer >= 1, got {v!r}")
    return int(v)


def _check_nmf_options(n_components: Any, tol: Any, max_iter: Any, random_state: Any, init: Any) -> tuple[int, float, int]:
    k = _positive_int("n_components", n_components)
    m = _positive_int("max_iter", max_iter)
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol >= 0:
        raise ValueError(f"tol: expected a number >= 0, got {tol!r}")
    if init != "random":
        raise ValueError(f"init: only scikit-learn's 'random' initialisation (grad-cam's) is implemented, got {init!r}")
    if isinstance(random_state, bool) or not isinstance(random_state, (int, np.integer)) or random_state < 0:
        raise ValueError(f"random_state: expected an integer seed >= 0 (numpy's RandomState), got {random_state!r}")
    return k, float(tol), m


def _cd_half_step(w: jax.Array, hht: jax.Array, xht: jax.Array) -> tuple[jax.Array, jax.Array]:
    """scikit-learn's ``_update_cdnmf_fast``: components in order, every row of ``w`` at once (the rows are
    independent given the component); returns the updated ``w`` and the summed |projected gradient|."""

    def body(t, carry):
        w, viol = carry
        grad = w @ hht[t] - xht[:, t]
        wt = w[:, t]
        pg = jnp.where(wt == 0, jnp.minimum(grad, 0), grad)
        hess = hht[t, t]
        new = jnp.where(hess != 0, jnp.maximum(wt - grad / jnp.where(hess != 0, hess, 1), 0), wt)
        return w.at[:, t].set(new), viol + jnp.sum(jnp.abs(pg))

    return jax.lax.fori_loop(0, w.shape[1], body, (w, jnp.zeros((), w.dtype)))


def nmf(x: jax.Array, n_components: int, *, init: str = "random", random_state: int = 0, tol: float = 1e-4,
        max_iter: int = 200) -> NMFResult:
    """Non-negative matrix factorisation ``x ~= W H`` as scikit-learn's ``NMF(n_components, init="random",
    random_state=random_state, tol=tol, max_iter=max_iter)`` (its defaults: coordinate descent, Frobenius
    loss, no regularisation), traceable under ``jax.jit`` (the shapes and options are static; the initial
    draws are numpy's, made at trace time). ``x``: ``(n_samples, n_features)``, non-negative.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> x = jnp.abs(jax.random.normal(jax.random.key(0), (6, 20)))
        >>> r = nmf(x, 3)
        >>> r.W.shape, r.H.shape, bool(r.reconstruction_err < jnp.linalg.norm(x))
        ((6, 3), (3, 20), True)
    """
    k, tol, max_iter = _check_nmf_options(n_components, tol, max_iter, random_state, init)
    x = jnp.asarray(x)
    if x.ndim != 2 or 0 in x.shape:
        raise ValueError(f"x: expected a non-empty (n_samples, n_features) matrix, got shape {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"x: expected a floating-point matrix, got dtype {x.dtype}")
    if not isinstance(x, jax.core.Tracer) and bool(jnp.any(x < 0)):
        raise ValueError(f"x: NMF needs non-negative values, got a minimum of {float(jnp.min(x))}")
    n, f = x.shape
    rng = np.random.RandomState(int(random_state))
    h0 = rng.standard_normal(size=(k, f)).astype(x.dtype)
    w0 = rng.standard_normal(size=(n, k)).astype(x.dtype)
    avg = jnp.sqrt(jnp.mean(x) / k)
    w, ht = jnp.abs(avg * w0), jnp.abs(avg * h0).T

    def step(w, ht):
        w, v1 = _cd_half_step(w, ht.T @ ht, x @ ht)
        ht, v2 = _cd_half_step(ht, w.T @ w, x.T @ w)
        return w, ht, v1 + v2

    w, ht, v_init = step(w, ht)

    def cond(s):
        return (s[3] < max_iter) & ~s[4]

    def body(s):
        w, ht, _, it, _ = s
        w, ht, v = step(w, ht)
        return w, ht, v, it + 1, v / v_init <= tol

    done0 = (v_init == 0) | (tol >= 1)
    w, ht, _, n_iter, _ = jax.lax.while_loop(cond, body, (w, ht, v_init, jnp.ones((), jnp.int32), done0))
    h = ht.T
    err = jnp.sqrt(jnp.sum(jnp.square(x - w @ h)))
    return NMFResult(w, h, err, n_iter)


def _dff(acts: jax.Array, k: int, **nmf_kw: Any) -> tuple[jax.Array, jax.Array, NMFResult]:
    c = acts.shape[-1]
    spatial = acts.shape[1:-1]
    flat = jnp.moveaxis(jnp.where(jnp.isnan(acts), 0, acts), -1, 0).reshape(c, -1)  # (C, B*h*w), grad-cam's order
    offset = jnp.min(flat, axis=-1)
    res = nmf(flat - offset[:, None], k, **nmf_kw)
    concepts = res.W + offset[:, None]
    explanations = jnp.moveaxis(res.H.reshape((k, acts.shape[0]) + spatial), 0, 1)
    return concepts, explanations, res


def dff(activations: jax.Array, n_components: int = 5, *, random_state: int = 0, tol: float = 1e-4,
        max_iter: int = 200) -> tuple[jax.Array, jax.Array]:
    """grad-cam's ``dff`` on CHANNELS-LAST activations ``(B, *spatial, C)``: NaNs -> 0, each channel shifted
    by its minimum over the batch, :func:`nmf` of the ``(C, B*h*w)`` matrix; returns the concepts ``(C, k)``
    (``W`` plus the channel minima) and the raw explanations ``(B, k, *spatial)`` (``H``). Traceable.

    Example:
        >>> import jax
        >>> concepts, expl = dff(jax.random.normal(jax.random.key(0), (2, 4, 5, 8)), n_components=3)
        >>> concepts.shape, expl.shape
        ((8, 3), (2, 3, 4, 5))
    """
    a = check_images(activations)
    concepts, explanations, _ = _dff(a, _positive_int("n_components", n_components), random_state=random_state,
                                     tol=tol, max_iter=max_iter)
    return concepts, explanations


class DeepFeatureFactorization:
    """Deep Feature Factorization (Collins et al. 2018) as grad-cam's class: ``DeepFeatureFactorization(model,
    target_layer, computation_on_concepts=model.fc)(x, n_components=16)`` -> ``(concepts, explanations,
    concept_outputs)`` (``(concepts, explanations)`` without a head).

    ``model`` and ``target_layer`` as in :class:`~flax_attn.cam.BaseCAM` (an NNX module and ONE layer path or
    submodule, a ``(module, variables)`` Linen pair, a ``(features, head)`` pair with ``target_layer=None``,
    a :class:`~flax_attn.cam.Tap`). ``computation_on_concepts``: a callable mapping the ``(k, C)`` concept
    embeddings to scores, e.g. the classifier ``model.fc`` (an ``nnx.Linear``), or, for an NNX model, the
    path of such a submodule (``"fc"``); it runs on float32 concepts as in grad-cam. The forward pass, the
    NMF (:func:`nmf`, grad-cam's scikit-learn defaults, one factorisation over the whole batch) and the
    min-max scaling and resize of the heatmaps run in one jitted function, shared through the CAM compile
    cache (recompiled for a new model structure, input shape, ``n_components`` or NMF option); the head runs
    after it, eagerly, as grad-cam's does. Returns ``jax.Array`` s: ``concepts`` ``(C, k)``,
    ``explanations`` ``(B, k, H, W)`` (grad-cam: a list of ``B`` arrays ``(k, H, W)``), ``concept_outputs``
    ``(k, ...)``; ``return_raw=True`` gives a :class:`DFFResult` (reconstruction error and iterations too).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> w = jax.random.normal(jax.random.key(0), (4, 3))
        >>> d = DeepFeatureFactorization((jnp.tanh, lambda a: a.mean((1, 2)) @ w), None,
        ...                              computation_on_concepts=lambda c: c @ w)
        >>> concepts, expl, scores = d(jax.random.normal(jax.random.key(1), (2, 6, 7, 4)), n_components=2)
        >>> concepts.shape, expl.shape, scores.shape
        ((4, 2), (2, 2, 6, 7), (2, 3))
    """

    def __init__(self, model: Any, target_layer: Any = None, reshape_transform: Callable | None = None,
                 computation_on_concepts: Callable[[jax.Array], Any] | str | None = None, *, random_state: int = 0,
                 tol: float = 1e-4, max_iter: int = 200, **tap_kwargs: Any):
        if isinstance(target_layer, (list, tuple)):
            if len(target_layer) != 1:
                raise ValueError(f"target_layer: DeepFeatureFactorization factorises ONE layer, got {list(target_layer)}")
            target_layer = target_layer[0]
        self.tap = make_tap(model, None if target_layer is None else [target_layer], **tap_kwargs)
        self.target_layers = self.tap.layers
        if len(self.target_layers) != 1:
            raise ValueError(f"target_layer: DeepFeatureFactorization factorises ONE layer, the model taps "
                             f"{list(self.target_layers)}")
        self.reshape_transform = reshape_transform
        if isinstance(computation_on_concepts, str):
            from flax import nnx

            from flax_attn.cam.taps import _resolve

            if not isinstance(model, nnx.Module):
                raise TypeError(f"computation_on_concepts={computation_on_concepts!r}: a path needs an NNX model, "
                                f"got {type(model).__name__}; pass the head callable itself")
            computation_on_concepts = _resolve(model, computation_on_concepts)[2]
        if computation_on_concepts is not None and not callable(computation_on_concepts):
            raise TypeError(f"computation_on_concepts: expected a callable (k, C) -> scores or a submodule path, "
                            f"got {type(computation_on_concepts).__name__}")
        self.computation_on_concepts = computation_on_concepts
        _check_nmf_options(1, tol, max_iter, random_state, "random")
        self.random_state, self.tol, self.max_iter = int(random_state), float(tol), int(max_iter)
        self.num_traces = 0

    def _compiled(self, static: Any, x: jax.Array, k: int):
        import weakref

        from flax_attn.cam.api import _COMPILED, _aval, _Entry

        key = ("deep_feature_factorization", static, _aval(x), k, self.random_state, self.tol, self.max_iter,
               structural_key(self.reshape_transform))
        reshape = self.reshape_transform
        opts = {"random_state": self.random_state, "tol": self.tol, "max_iter": self.max_iter}

        def make():
            entry = _Entry()

            def impl(dynamic, x):
                _COMPILED.traces += 1
                tap = entry.tap()  # the calling object's tap; the cache never keeps a model alive
                _, (acts,) = tap.rebuild(static, dynamic).run(x)
                if reshape is not None:
                    acts = reshape(acts)
                if acts.ndim < 3:
                    raise ValueError(f"the target layer gave activations of shape {acts.shape}: expected "
                                     "channels-last maps (B, h, w, C) (use reshape_transform for tokens)")
                concepts, raw, res = _dff(acts, k, **opts)
                expl = resize_maps(scale_cam(raw, spatial_ndim=raw.ndim - 2), x.shape[1:-1])
                return concepts, expl, raw, res.reconstruction_err, res.n_iter

            entry.fn = jax.jit(impl)
            return entry

        entry = _COMPILED.get(key, make)
        entry.tap = weakref.ref(self.tap)
        return entry.fn

    def __call__(self, input_tensor: jax.Array, n_components: int = 16, *,
                 return_raw: bool = False) -> tuple[Any, ...] | DFFResult:
        x = check_images(input_tensor)
        k = _positive_int("n_components", n_components)
        static, dynamic = self.tap.split()
        fn = self._compiled(static, x, k)
        from flax_attn.cam.api import _COMPILED

        before = _COMPILED.traces
        concepts, expl, raw, err, n_iter = fn(dynamic, x)
        self.num_traces += _COMPILED.traces - before
        outputs = None
        if self.computation_on_concepts is not None:
            outputs = self.computation_on_concepts(concepts.T.astype(jnp.float32))
        if return_raw:
            return DFFResult(concepts, expl, outputs, raw, err, n_iter)
        return (concepts, expl) if outputs is None else (concepts, expl, outputs)

    def __enter__(self) -> DeepFeatureFactorization:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def __repr__(self) -> str:
        return f"DeepFeatureFactorization(target_layer={self.target_layers[0]!r})"


# ------------------------------------------------------------------------------------------------------
# figure helper
# ------------------------------------------------------------------------------------------------------

def _round_half_even_u8(v: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(v), 0, 255).astype(np.uint8)  # cv::saturate_cast<uchar>(float): cvRound


def _rgb_to_hsv_u8(rgb: np.ndarray) -> np.ndarray:
    """OpenCV's ``cvtColor(RGB2HSV)`` on uint8 (hue range 180, 12-bit fixed-point tables)."""
    shift = 12
    i = np.arange(256, dtype=np.float64)
    with np.errstate(divide="ignore"):
        sdiv = np.where(i > 0, np.rint((255 << shift) / np.maximum(i, 1)), 0).astype(np.int64)
        hdiv = np.where(i > 0, np.rint((180 << shift) / (6.0 * np.maximum(i, 1))), 0).astype(np.int64)
    r, g, b = (rgb[..., j].astype(np.int64) for j in range(3))
    v = np.maximum(np.maximum(r, g), b)
    diff = v - np.minimum(np.minimum(r, g), b)
    s = (diff * sdiv[v] + (1 << (shift - 1))) >> shift
    h = np.where(v == r, g - b, np.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = (h * hdiv[diff] + (1 << (shift - 1))) >> shift
    h = np.where(h < 0, h + 180, h)
    return np.stack([h, s, v], axis=-1).astype(np.uint8)


def _hsv_to_rgb_u8(hsv: np.ndarray) -> np.ndarray:
    """OpenCV's ``cvtColor(HSV2RGB)`` on uint8 (hue range 180) as its vectorised loop computes it: float32
    arithmetic, sector by truncation, the result times 255 TRUNCATED to uint8. (OpenCV's scalar tail,
    the last ``n mod 4*lanes`` pixels of a continuous image, rounds instead; those can differ by 1.)"""
    f32 = np.float32
    h = hsv[..., 0].astype(f32) * f32(6.0 / 180.0)
    s = hsv[..., 1].astype(f32) * f32(1.0 / 255.0)
    v = hsv[..., 2].astype(f32) * f32(1.0 / 255.0)
    pre = np.trunc(h)
    h = h - pre
    one = f32(1)
    t0, t1 = v, v * (one - s)
    # 1 - s*h as one fused multiply-add (OpenCV's AVX2 build contracts it): the float32 product is exact in
    # float64, so the float64 difference rounded to float32 is the FMA's result
    s64 = s.astype(np.float64)
    t2 = v * (1.0 - s64 * h.astype(np.float64)).astype(f32)
    t3 = v * (1.0 - s64 * (one - h).astype(np.float64)).astype(f32)
    sec = pre - np.trunc(pre * f32(1.0 / 6.0)) * f32(6)
    b = np.select([sec < 2, sec == 2, sec == 3, sec == 4], [t1, t3, t0, t0], t2)
    g = np.select([sec < 1, sec == 1, sec == 2, sec == 3], [t3, t0, t0, t2], t1)
    r = np.select([sec < 1, sec == 1, sec == 2, sec == 3, sec == 4], [t0, t2, t1, t1, t3], t0)
    rgb = np.stack([r, g, b], axis=-1).astype(f32) * f32(255)
    return np.clip(np.trunc(rgb), 0, 255).astype(np.uint8)


def _default_colors(n: int) -> list[np.ndarray]:
    try:
        import matplotlib
    except ImportError as e:  # pragma: no cover - matplotlib is optional
        raise ImportError("show_factorization_on_image: the default colours are matplotlib's 'gist_rainbow'; "
                          "install matplotlib or pass colors=[...]") from e
    cmap = matplotlib.colormaps["gist_rainbow"]
    return [np.array(cmap(i)) for i in np.arange(0, 1, 1.0 / n)]


def _legend(result: np.ndarray, colors: Sequence[np.ndarray], labels: Sequence[str], n: int) -> np.ndarray:
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    px = 1 / plt.rcParams["figure.dpi"]
    fig = plt.figure(figsize=(result.shape[1] * px, result.shape[0] * px))
    with plt.rc_context({"legend.fontsize": int(14 * result.shape[0] / 256 / max(1, n / 6))}):
        lw = 5 * result.shape[0] / 256
        lines = [Line2D([0], [0], color=tuple(float(c) for c in colors[i]), lw=lw) for i in range(n)]  # type: ignore[arg-type]
        plt.legend(lines, list(labels), mode="expand", fancybox=True, shadow=True)
        with warnings.catch_warnings():  # "Tight layout not applied" on small images, as grad-cam warns
            warnings.simplefilter("ignore", UserWarning)
            plt.tight_layout(pad=0, w_pad=0, h_pad=0)
        plt.axis("off")
        fig.canvas.draw()
        data = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()  # type: ignore[attr-defined]
    plt.close(fig=fig)
    if data.shape[:2] != result.shape[:2]:
        data = np.asarray(jax.image.resize(data.astype(np.float32), result.shape[:2] + (3,), "linear"))
        data = _round_half_even_u8(data)
    return np.hstack((result, data))


def show_factorization_on_image(img: Any, explanations: Any, colors: Sequence[Any] | None = None,
                                image_weight: float = 0.5, concept_labels: Sequence[str] | None = None) -> np.ndarray:
    """grad-cam's ``show_factorization_on_image``: one colour per concept (default matplotlib's
    ``gist_rainbow`` at ``i / k``), each pixel coloured by its strongest concept with the colour's HSV
    value set to ``uint8(255 * explanation)`` (OpenCV's uint8 HSV round trip, reproduced exactly in
    numpy), blended ``img * image_weight + mask * (1 - image_weight)`` -> ``uint8``; with
    ``concept_labels`` a matplotlib legend is appended on the right, as grad-cam's.

    ``img``: ``(H, W, 3)`` floats in [0, 1]; ``explanations``: ``(k, H, W)`` in [0, 1] (one image of
    :class:`DeepFeatureFactorization`'s ``explanations``; not modified, unlike grad-cam's). Host numpy.

    Example:
        >>> import numpy as np
        >>> e = np.stack([np.eye(4), 1 - np.eye(4)])
        >>> out = show_factorization_on_image(np.zeros((4, 4, 3)), e, colors=[(1, 0, 0), (0, 0, 1)])
        >>> out[0, 0].tolist(), out[0, 1].tolist()
        ([127, 0, 0], [0, 0, 127])
    """
    img = np.asarray(img)
    if not np.issubdtype(img.dtype, np.floating):
        raise TypeError(f"img: expected floats in [0, 1] (grad-cam's np.array(img) / 255), got dtype {img.dtype}")
    expl = np.array(explanations, np.float32)  # a copy
    if expl.ndim != 3:
        raise ValueError(f"explanations: expected (k, H, W) maps of one image, got shape {expl.shape}")
    if img.ndim != 3 or img.shape[-1] != 3 or img.shape[:2] != expl.shape[1:]:
        raise ValueError(f"img: expected (H, W, 3) with H, W = {expl.shape[1:]} (the explanations'), got {img.shape}")
    if not 0.0 <= float(image_weight) <= 1.0:
        raise ValueError(f"image_weight should be in the range [0, 1], got {image_weight}")
    n = expl.shape[0]
    colors = _default_colors(n) if colors is None else [np.asarray(c, np.float64) for c in colors]
    if len(colors) < n:
        raise ValueError(f"colors: expected {n} colours (one per concept), got {len(colors)}")
    if concept_labels is not None and len(concept_labels) != n:
        raise ValueError(f"concept_labels: expected {n} labels (one per concept), got {len(concept_labels)}")
    best = expl.argmax(axis=0)
    mask = np.zeros(img.shape, np.float32)
    for i in range(n):
        e = np.where(best == i, expl[i], np.float32(0))
        hsv = _rgb_to_hsv_u8((np.asarray(colors[i][:3], np.float64) * 255).astype(np.uint8))  # one pixel, as cv2
        hsv = np.broadcast_to(hsv, img.shape).copy()
        hsv[..., 2] = (255 * e).astype(np.uint8)
        mask += _hsv_to_rgb_u8(hsv).astype(np.float32) / 255
    result = ((img * image_weight + mask * (1 - image_weight)) * 255).astype(np.uint8)  # truncation, as grad-cam
    if concept_labels is not None:
        result = _legend(result, colors, concept_labels, n)
    return result
