"""AblationCAM (Desai & Ramaswamy, WACV 2020): a channel's weight is the relative drop of the target score when
the channel is ablated, ``w_c = (y - y_c) / y``; the map is ``sum_c w_c A_c`` (grad-cam 1.5.7's
``AblationCAM``).

On the device, batched and jitted: the ablated activations are built directly (no forward pass of the network
upstream of the tapped layer: the tap *replaces* the layer's output, see :mod:`flax_attn.cam.taps`, and XLA
removes the dead upstream computation), chunks of ``batch_size`` (image, channel) pairs go through ONE
``lax.map`` inside the compiled function, and all targets of an image are scored from the same ablated outputs.

grad-cam's rules, reproduced:

* ablation value (``AblationLayer``): ``0`` where the image's activation minimum is exactly ``0``, otherwise
  ``min - 1e7``. grad-cam's in-place loop makes the ``i``-th member of a chunk ablate to ``min - (i + 1) * 1e7``
  when the minimum is not 0 (its result can then depend on ``batch_size``, unless a ReLU downstream clips
  both values to 0); we use ``min - 1e7`` for every
  channel, which is grad-cam's result with ``batch_size=1``;
* ``ratio_channels_to_ablate < 1`` (``AblationLayer.activations_to_be_ablated``): a binary mask
  ``|EigenCAM| > 0.01`` (after min-max), channel scores ``sum(mask * n_c) / sum(n_c)`` with ``n_c`` the channel's
  min-max scaled ``|A_c|``, and the ``k = int(C * ratio)`` highest and ``k`` lowest scored channels are
  ablated; the others keep the original score (weight 0). For ``ratio > 0.5`` the two lists overlap and
  grad-cam's ``assemble_ablation_scores`` then gives every channel after the first duplicate the original
  score (a bookkeeping bug); we ablate the union, i.e. every channel;
* weights ``(y - y_c) / y`` and the map ``sum_c w_c A_c`` (``eigen_smooth``: first principal component of
  ``w * A``), then ReLU, min-max, resize and the layer mean as every CAM.

Cost: ``B * C_ablated / batch_size`` chunks of the downstream network per target layer; memory: one chunk.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from flax_attn.cam.api import _COMPILED, _OUTPUT_SHAPES, BaseCAM, _aval, _Entry
from flax_attn.cam.engine import CamResult, _default_target, preflight
from flax_attn.cam.methods import CamMethod
from flax_attn.cam.postprocess import aggregate_layers, first_component_projection, resize_maps, scale_cam
from flax_attn.cam.taps import Tap, structural_key
from flax_attn.cam.targets import CallableGrid, PreparedTargets, Target

__all__ = ["ABLATION_VALUE", "AblationCAM", "ablation_cam", "channels_to_ablate"]

#: grad-cam's offset below the activation minimum for ablated channels when the minimum is not 0
ABLATION_VALUE = 1e7


def _check_options(batch_size: Any, ratio: Any) -> tuple[int, float]:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < float(ratio) <= 1.0:
        raise ValueError(f"ratio_channels_to_ablate: expected a number in (0, 1], got {ratio!r}")
    return batch_size, float(ratio)


def _objectiveness_mask(a: jax.Array, threshold: float = 0.01) -> jax.Array:
    """grad-cam's ``objectiveness_mask_from_svd`` for one image ``(*spatial, C)``: ``|EigenCAM|`` min-max > 0.01."""
    p = jnp.abs(first_component_projection(a))
    p = p - jnp.min(p)
    p = p / jnp.max(p)
    return (p > threshold).astype(a.dtype)


def channels_to_ablate(a: jax.Array, ratio_channels_to_ablate: float = 1.0) -> jax.Array:
    """The channels AblationCAM ablates for ONE image ``(*spatial, C)`` (grad-cam's ``activations_to_be_ablated``).

    ``1.0``: every channel in order; otherwise the ``k = int(C * ratio)`` channels whose min-max scaled ``|A_c|``
    lies most inside the EigenCAM mask, then the ``k`` that lie least inside (``2k`` channels; all ``C`` when
    ``2k >= C``, see the module docstring). The count is static (it depends only on ``C`` and ``ratio``).

    Example:
        >>> import jax
        >>> channels_to_ablate(jax.random.normal(jax.random.key(0), (4, 4, 10)), 0.2).shape
        (4,)
    """
    c = a.shape[-1]
    if ratio_channels_to_ablate == 1.0:
        return jnp.arange(c)
    k = int(c * ratio_channels_to_ablate)
    if 2 * k >= c:
        return jnp.arange(c)
    mask = _objectiveness_mask(a)
    flat = jnp.abs(a.reshape(-1, c))
    n = flat - jnp.min(flat, axis=0)
    n = n / jnp.max(n, axis=0)
    scores = jnp.sum(mask.reshape(-1, 1) * n, axis=0) / jnp.sum(n, axis=0)
    order = jnp.argsort(scores)
    return jnp.concatenate([order[::-1][:k], order[:k]])


def _score_fn(output: Any, target: Target | None, grid: CallableGrid | None) -> Callable[[Any, jax.Array], jax.Array]:
    """``scores(out_rows, image_index) -> (N, T)``: the targets of image ``image_index[n]`` on ``out_rows[n]``."""
    if grid is not None:
        rows = grid.rows

        def grid_scores(out, bidx):
            cols = []
            for t in range(grid.num_targets):
                per_image = jnp.stack([_scalar(jax.vmap(row[t])(out), f"target [{b}][{t}]")
                                       for b, row in enumerate(rows)])  # (B, N)
                cols.append(jnp.take_along_axis(per_image, bidx[None], axis=0)[0])
            return jnp.stack(cols, axis=1)

        return grid_scores
    assert target is not None
    if not target.scalar:
        raise ValueError(f"{type(target).__name__} returns a vector, not a scalar: AblationCAM needs one score per "
                         "image and target, as in grad-cam")

    def tree_scores(out, bidx):
        tg = jax.tree.map(lambda v: jnp.asarray(v)[bidx], target)  # (N, T, ...)
        if not jax.tree.leaves(tg):  # a target without array fields (SoftmaxOutputTarget): T = 1
            return _scalar(jax.vmap(target)(out), type(target).__name__)[:, None]
        s = jax.vmap(lambda tcol: jax.vmap(lambda t, o: t(o))(tcol, out), in_axes=1, out_axes=1)(tg)
        return _scalar(s, type(target).__name__, ndim=2)

    return tree_scores


def _scalar(s: jax.Array, what: str, ndim: int = 1) -> jax.Array:
    if s.ndim != ndim:
        raise ValueError(f"{what} must return a scalar per image, got per-image shape {s.shape[ndim:]}")
    return s


def ablation_cam(tap: Tap, x: jax.Array, targets: Any = None, *, batch_size: int = 32,
                 ratio_channels_to_ablate: float = 1.0, eigen_smooth: bool = False) -> CamResult:
    """Functional AblationCAM: traceable (use it inside your own ``jax.jit``); see the module docstring.

    Args:
      tap: the model and its target layers (:func:`flax_attn.cam.make_tap`); every tap of this package works
        (the ablated forward uses ``tap.run(x, replace=...)``).
      x: channels-last images ``(B, H, W, C)``.
      targets: as for :func:`flax_attn.cam.compute_cam` (scalar targets); ``None``: arg-max class.
      batch_size: (image, channel) pairs per ablated forward pass (memory, not results).
      ratio_channels_to_ablate: fraction in ``(0, 1]``, see :func:`channels_to_ablate`.
      eigen_smooth: first principal component of ``w * A`` instead of the channel sum.

    Returns:
      :class:`~flax_attn.cam.CamResult`: ``cam`` ``(B, H, W)`` (``(B, T, H, W)`` for 2-D targets), ``raw`` per
      layer ``sum_c w_c A_c``, ``output``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from flax_attn.cam import FunctionTap
        >>> w = jax.random.normal(jax.random.key(0), (4, 3))
        >>> tap = FunctionTap(jnp.tanh, lambda a: jax.nn.relu(a).mean((1, 2)) @ w)
        >>> ablation_cam(tap, jax.random.normal(jax.random.key(1), (2, 5, 6, 4)), [0, 2], batch_size=3).cam.shape
        (2, 5, 6)
    """
    batch_size, ratio = _check_options(batch_size, ratio_channels_to_ablate)
    x, prepared = preflight(tap, x, targets)
    return _ablation_prepared(tap, x, prepared, batch_size=batch_size, ratio=ratio, eigen_smooth=eigen_smooth)


def _ablation_prepared(tap: Tap, x: jax.Array, prepared: PreparedTargets, *, batch_size: int, ratio: float,
                       eigen_smooth: bool) -> CamResult:
    target, grid, t, has_t = prepared
    output, acts = tap.run(x)
    if target is None and grid is None:
        target, _, _ = _default_target(output).broadcast(x.shape[0])
    scores = _score_fn(output, target, grid)
    b = x.shape[0]
    orig = scores(output, jnp.arange(b))  # (B, T)
    poison = jnp.where(jnp.isnan(orig), jnp.nan, 0.0)  # an out-of-range traced class: NaN maps (as the engine)
    raws, cams = [], []
    for layer, a in zip(tap.layers, acts):
        a = jax.lax.stop_gradient(a)
        c = a.shape[-1]
        idx = jax.vmap(lambda ab: channels_to_ablate(ab, ratio))(a)  # (B, m)
        m = idx.shape[1]
        axes = tuple(range(1, a.ndim))
        amin = jnp.min(a, axis=axes)
        value = jnp.where(amin == 0, jnp.zeros_like(amin), amin - jnp.asarray(ABLATION_VALUE, a.dtype))
        full = jnp.broadcast_to(orig[:, None, :], (b, c, t))
        if m:
            bidx = jnp.repeat(jnp.arange(b), m)
            cidx = idx.reshape(-1)
            n = b * m
            chunks = math.ceil(n / batch_size)
            pad = chunks * batch_size - n
            bch = jnp.concatenate([bidx, jnp.zeros((pad,), bidx.dtype)]).reshape(chunks, batch_size)
            cch = jnp.concatenate([cidx, jnp.zeros((pad,), cidx.dtype)]).reshape(chunks, batch_size)

            def ablated_scores(bc, layer=layer, a=a, value=value, c=c):
                bi, ci = bc
                ab = a[bi]
                hit = jax.nn.one_hot(ci, c, dtype=bool).reshape((batch_size,) + (1,) * (a.ndim - 2) + (c,))
                ab = jnp.where(hit, value[bi].reshape((batch_size,) + (1,) * (a.ndim - 1)), ab)
                out, _ = tap.run(x[bi], replace={layer: ab})
                return scores(out, bi)

            new = jax.lax.map(ablated_scores, (bch, cch)).reshape(chunks * batch_size, t)[:n]
            full = full.at[bidx, cidx].set(new)
        w = (orig[:, None, :] - full) / orig[:, None, :]  # (B, C, T)
        if eigen_smooth:
            raw = jax.vmap(lambda ab, wb: jax.vmap(lambda wt: first_component_projection(wt * ab))(wb.T))(a, w)
        else:
            raw = jnp.einsum("b...c,bct->bt...", a, w, precision=jax.lax.Precision.HIGHEST)
        raw = raw + poison.astype(raw.dtype).reshape(poison.shape + (1,) * (raw.ndim - 2))
        raws.append(raw)
        cams.append(resize_maps(scale_cam(jnp.maximum(raw, 0), spatial_ndim=raw.ndim - 2), x.shape[1:-1]))
    cam = aggregate_layers(cams, spatial_ndim=x.ndim - 2)
    if not has_t:
        cam = cam[:, 0]
        raws = [r[:, 0] for r in raws]
    return CamResult(cam, raws, output)


# ------------------------------------------------------------------------------------------------------
# class API (jitted, the shared compile cache of flax_attn.cam.api)
# ------------------------------------------------------------------------------------------------------

def _jitted(tap: Tap, static: Any, name: str, options: tuple, prepared: PreparedTargets, x: jax.Array,
            impl_fn: Callable[..., Any], return_raw: bool):
    """One compiled function per (structure, method options, target kind, input signature) in the shared
    CAM cache; ``impl_fn(tap, x, prepared) -> CamResult`` runs inside ``jax.jit``."""
    grid = prepared.grid
    target_sig = None if prepared.target is None else (
        jax.tree.structure(prepared.target), tuple(_aval(v) for v in jax.tree.leaves(prepared.target)))
    key = (static, name, options, None if grid is None else structural_key(grid), prepared.num_targets,
           prepared.has_target_axis, target_sig, _aval(x), return_raw)

    def make():
        t, has_t = prepared.num_targets, prepared.has_target_axis
        entry = _Entry()

        def impl(dynamic, x, target):
            _COMPILED.traces += 1
            res = impl_fn(entry.tap().rebuild(static, dynamic), x, PreparedTargets(target, grid, t, has_t))
            return res if return_raw else res.cam

        entry.fn = jax.jit(impl)
        return entry

    entry = _COMPILED.get(key, make)
    entry.tap = weakref.ref(tap)
    return entry.fn


def _call_jitted(cam: BaseCAM, name: str, options: tuple, input_tensor: Any, targets: Any,
                 impl_fn: Callable[..., Any], return_raw: bool) -> Any:
    tap = cam.tap
    static, dynamic = tap.split()

    def output_struct(x):
        return _OUTPUT_SHAPES.get((static, _aval(x)), lambda: jax.eval_shape(lambda: tap.run(x)[0]))

    x, prepared = preflight(tap, input_tensor, targets, output_struct=output_struct)
    fn = _jitted(tap, static, name, options, prepared, x, impl_fn, bool(return_raw))
    before = _COMPILED.traces
    out = fn(dynamic, x, prepared.target)
    cam.num_traces += _COMPILED.traces - before
    return out


class AblationCAM(BaseCAM):
    """AblationCAM (Desai & Ramaswamy, WACV 2020) as grad-cam 1.5.7's ``AblationCAM`` (see the module docstring
    for its rules and where they are reproduced), batched and jitted on the device.

    ``AblationCAM(model, target_layers, *, batch_size=32, ratio_channels_to_ablate=1.0)``; ``model`` and
    ``target_layers`` as :class:`~flax_attn.cam.BaseCAM`. grad-cam's ``ablation_layer`` argument does not exist:
    the ablation is built into the tap (``replace=``); ``reshape_transform`` (ViT tokens) is not supported.
    Call: ``cam(x, targets=None, *, eigen_smooth=False, return_raw=False)``. ``batch_size`` only changes memory
    and speed, never the result; a new ``batch_size`` or ratio compiles once more.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> w = jax.random.normal(jax.random.key(0), (4, 3))
        >>> cam = AblationCAM((jnp.tanh, lambda a: jax.nn.relu(a).mean((1, 2)) @ w), batch_size=4)
        >>> cam(jax.random.normal(jax.random.key(1), (2, 5, 5, 4)), [0, 1]).shape
        (2, 5, 5)
    """

    method_name = "gradcam"  # placeholder for BaseCAM's registry lookup; AblationCAM runs its own pipeline

    def __init__(self, model: Any, target_layers: Any = None, *, batch_size: int = 32,
                 ratio_channels_to_ablate: float = 1.0, reshape_transform: Callable | None = None,
                 **tap_kwargs: Any):
        if reshape_transform is not None:
            raise ValueError("AblationCAM: reshape_transform is not supported (the ablation replaces the tapped "
                             "layer's output in its own layout); tap a layer whose output is channels-last maps")
        super().__init__(model, target_layers, **tap_kwargs)
        self.batch_size, self.ratio_channels_to_ablate = _check_options(batch_size, ratio_channels_to_ablate)
        self.method = CamMethod("ablationcam", lambda c: c.acts, uses_gradients=False)

    def __call__(self, input_tensor: jax.Array, targets: Any = None, *, aug_smooth: bool = False,
                 eigen_smooth: bool = False, return_raw: bool = False,
                 key: jax.Array | None = None) -> jax.Array | CamResult:
        if aug_smooth:
            raise ValueError("AblationCAM: aug_smooth is not supported (it would multiply the ablated passes by 6)")
        bs, ratio, es = self.batch_size, self.ratio_channels_to_ablate, bool(eigen_smooth)

        def impl(tap, x, prepared):
            return _ablation_prepared(tap, x, prepared, batch_size=bs, ratio=ratio, eigen_smooth=es)

        return _call_jitted(self, "ablationcam", (bs, ratio, es), input_tensor, targets, impl, return_raw)

    def __repr__(self) -> str:
        return (f"AblationCAM(target_layers={list(self.target_layers)}, batch_size={self.batch_size}, "
                f"ratio_channels_to_ablate={self.ratio_channels_to_ablate})")
