"""Pure-function math shared by the NNX blocks (:mod:`flax_attn.layers`) and their Linen twins.

Everything here is channels-last (``(N, *spatial, C)``), free of module state and traceable under
``jax.jit``/``jax.grad``/``jax.vmap``. The NNX and Linen modules only own parameters; the arithmetic is
written once, here, so the two APIs cannot drift apart.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array
ActivationLike = str | Callable[[Array], Array]
#: a dtype as Flax takes it (``jnp.float32``, ``"bfloat16"``, a NumPy dtype ...); the one alias of the package
Dtype = Any

# --------------------------------------------------------------------------------------------------
# activations and gates
# --------------------------------------------------------------------------------------------------


def _gelu_exact(x: Array) -> Array:
    # torch.nn.GELU() is the exact (erf) form; jax.nn.gelu defaults to the tanh approximation.
    return jax.nn.gelu(x, approximate=False)


def _identity(x: Array) -> Array:
    return x


def _hard_swish(x: Array) -> Array:
    # torch.nn.Hardswish evaluates x * relu6(x + 3) / 6 in this order; jax.nn.hard_swish is x * (relu6(x + 3) / 6)
    return x * jnp.clip(x + 3.0, 0.0, 6.0) / 6.0


_ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "relu": jax.nn.relu,
    "relu6": jax.nn.relu6,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": _gelu_exact,
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "hard_swish": _hard_swish,
    "leaky_relu": lambda x: jax.nn.leaky_relu(x, 0.01),  # torch default negative_slope
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    # torch.nn.Hardsigmoid: relu6(x + 3) / 6 (jax.nn.hard_sigmoid is the same formula)
    "hard_sigmoid": jax.nn.hard_sigmoid,
    "identity": _identity,
}


def resolve_activation(act: ActivationLike, *, argname: str = "act") -> Callable[[Array], Array]:
    """Turns an activation name (``"relu"``, ``"silu"``, ``"hard_sigmoid"`` ...) or a callable into a callable.

    The one activation/gate table of the package (blocks and backbones). The names follow PyTorch
    semantics (``"gelu"`` is the exact erf form, as ``torch.nn.GELU()``; ``"hard_swish"`` rounds as
    ``torch.nn.Hardswish``).

    >>> float(resolve_activation("hard_sigmoid")(jnp.asarray(0.0)))
    0.5
    """
    if callable(act):
        return act
    if isinstance(act, str):
        key = act.lower().replace("-", "_")
        if key in _ACTIVATIONS:
            return _ACTIVATIONS[key]
        raise ValueError(
            f"unknown {argname} {act!r}: expected a callable or one of {sorted(_ACTIVATIONS)}"
        )
    raise TypeError(f"{argname} must be a string or a callable, got {type(act).__name__}")


# --------------------------------------------------------------------------------------------------
# widths
# --------------------------------------------------------------------------------------------------


def make_divisible(
    value: float, divisor: int = 8, min_value: int | None = None, round_limit: float = 0.9
) -> int:
    """Rounds ``value`` to the nearest multiple of ``divisor`` (torchvision's ``_make_divisible``,
    timm's ``make_divisible``): never below ``min_value`` (default ``divisor``) and never more than
    ``1 - round_limit`` below ``value``.

    >>> make_divisible(18, 8)   # MobileNetV3: 72 channels // 4 -> 24
    24
    """
    if divisor < 1:
        raise ValueError(f"divisor must be >= 1, got {divisor}")
    min_value = min_value or divisor
    new_value = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if new_value < round_limit * value:
        new_value += divisor
    return int(new_value)


def hidden_width(
    channels: int,
    *,
    reduction: float = 16,
    hidden_channels: int | None = None,
    divisor: int | None = None,
    round_limit: float = 0.0,
    min_hidden: int = 1,
) -> int:
    """Hidden width of a channel-attention MLP.

    * ``hidden_channels`` given: used as is (it must be >= 1).
    * ``divisor=None`` (default): ``max(min_hidden, channels // reduction)``, the floor rule of the SE
      paper's code, the source article's ``SELayer`` and the official CBAM code.
    * ``divisor=d``: ``make_divisible(channels / reduction, d, min_value=min_hidden or d, round_limit)``,
      the rule of timm (``rd_divisor``, ``round_limit=0``) and torchvision (``round_limit=0.9``).
    """
    if channels < 1:
        raise ValueError(f"channels must be >= 1, got {channels}")
    if hidden_channels is not None:
        if int(hidden_channels) < 1:
            raise ValueError(f"hidden_channels must be >= 1, got {hidden_channels}")
        return int(hidden_channels)
    if not reduction > 0:
        raise ValueError(f"reduction must be > 0, got {reduction}")
    if divisor is None:
        return max(int(min_hidden), int(channels // reduction))
    return make_divisible(channels / reduction, divisor, min_value=min_hidden if min_hidden > 1 else None,
                          round_limit=round_limit)


# --------------------------------------------------------------------------------------------------
# input validation
# --------------------------------------------------------------------------------------------------


def _layout(spatial_dims: int | None) -> str:
    names = {1: "(N, L, C)", 2: "(N, H, W, C)", 3: "(N, D, H, W, C)"}
    if spatial_dims is None:
        return "(N, L, C), (N, H, W, C) or (N, D, H, W, C)"
    return names.get(spatial_dims, f"(N, {spatial_dims} spatial dims..., C)")


def check_input(x: Any, channels: int, who: str, spatial_dims: int | None = None) -> None:
    """Raises a clear error unless ``x`` is a channels-last feature map with ``channels`` channels.

    ``spatial_dims=None`` accepts 1 to 3 spatial dimensions; an int requires exactly that many.
    """
    shape = getattr(x, "shape", None)
    if shape is None:
        raise TypeError(f"{who} expects an array, got {type(x).__name__}")
    ndim = len(shape)
    ok_rank = (3 <= ndim <= 5) if spatial_dims is None else ndim == spatial_dims + 2
    if not ok_rank:
        raise ValueError(
            f"{who} expects a channels-last input of shape {_layout(spatial_dims)} with C={channels}, "
            f"got rank {ndim} shape {tuple(shape)}"
        )
    if shape[-1] != channels:
        hint = ": did you pass channels-first (NCHW) data?" if ndim > 2 and shape[1] == channels else ""
        raise ValueError(
            f"{who} expects channels-last input with {channels} channels (last axis), got shape "
            f"{tuple(shape)}{hint}"
        )
    if not jnp.issubdtype(getattr(x, "dtype", jnp.float32), jnp.floating):
        raise TypeError(f"{who} expects a floating-point input, got dtype {x.dtype}")
    if 0 in tuple(shape[1:-1]):
        raise ValueError(
            f"{who} expects every spatial size >= 1 (global pools have no value over an empty map), got shape "
            f"{tuple(shape)}; an empty batch (N = 0) is fine"
        )


def spatial_axes(x: Array) -> tuple[int, ...]:
    return tuple(range(1, x.ndim - 1))


# --------------------------------------------------------------------------------------------------
# channel pooling (squeeze): (N, *spatial, C) -> (N, C)
# --------------------------------------------------------------------------------------------------

POOL_TYPES: tuple[str, ...] = ("avg", "max", "lp", "lse")
_POOL_ALIASES = {"mean": "avg", "avg": "avg", "max": "max", "lp": "lp", "lse": "lse"}


def normalize_pool_types(pool_types: str | Sequence[str], argname: str = "pool_types") -> tuple[str, ...]:
    """Validates a channel-pool list: a non-empty sequence of ``avg``/``max``/``lp``/``lse`` (``mean`` = ``avg``)."""
    if isinstance(pool_types, str):
        pool_types = (pool_types,)
    pool_types = tuple(pool_types)
    return _normalize_names(pool_types, _POOL_ALIASES,
                            f"{argname} must be a non-empty sequence drawn from {POOL_TYPES}, got ()",
                            f"unknown pool type {{!r}} in {argname}: expected one of {POOL_TYPES}")


def _normalize_names(values: Sequence[Any], aliases: dict[str, str], empty: str, unknown: str) -> tuple[str, ...]:
    """``values`` mapped through ``aliases`` (case-insensitive); ``empty``/``unknown`` (a ``{!r}`` template) are
    the error messages."""
    if not values:
        raise ValueError(empty)
    out = []
    for v in values:
        key = aliases.get(v.lower()) if isinstance(v, str) else None
        if key is None:
            raise ValueError(unknown.format(v))
        out.append(key)
    return tuple(out)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _max_axis(x: Array, axis: int) -> Array:
    """Max over one axis; its derivative is routed to one arg-max element (see :func:`_max_reduce`)."""
    return jnp.max(x, axis=axis)


@_max_axis.defjvp
def _max_axis_jvp(axis: int, primals: tuple[Array], tangents: tuple[Array]) -> tuple[Array, Array]:
    (x,), (t,) = primals, tangents
    idx = jnp.argmax(x, axis=axis, keepdims=True)
    # a one-hot select, not a gather: its transpose (the backward pass) is an elementwise select that XLA fuses
    # into the consumer, where a gather's transpose is a scatter-add (serial on XLA:CPU)
    hit = jax.lax.broadcasted_iota(idx.dtype, x.shape, axis) == idx
    return jnp.max(x, axis=axis), jnp.sum(jnp.where(hit, t, jnp.zeros((), t.dtype)), axis=axis)


def _max_reduce(x: Array, axis: int | tuple[int, ...], scale: Array | None = None, keepdims: bool = False) -> Array:
    """``max(x * scale)`` over ``axis``, differentiated like ``torch.max(dim)``/``F.max_pool2d``: the
    gradient goes to one arg-max element.

    Why not ``jnp.max``: its derivative is the mask ``operand == max``, and under ``jax.jit`` XLA:CPU may
    recompute the operand (say the BatchNorm output feeding the block) in another fusion with different
    rounding, so the mask misses the maximum and the gradient silently becomes zero (seen in a jitted
    CBAM-ResNet-18 training step: 10-20 % gradient error; optimisation barriers do not help, XLA:CPU expands
    them before fusion). Here the arg-max is an integer computed once and the derivative is the one-hot
    ``iota == argmax``, so exactly one element receives each output's gradient whatever rounding the operand
    gets. Without differentiation the forward pass is a plain fast ``jnp.max``; the arg-max is paid only under
    ``jax.grad``/``jax.jvp``. Ties (measure zero for real inputs) go to the first index, as in PyTorch's
    ``max(dim)``; ``torch.amax`` would split them.

    Contiguous axes (the spatial axes of a channels-last map, or the channel axis) are merged by a reshape, not
    moved by a transpose, so no copy of the map is made.
    """
    if scale is not None:
        x = x * scale
    axes = sorted({a % x.ndim for a in ((axis,) if isinstance(axis, int) else axis)})
    if axes != list(range(axes[0], axes[-1] + 1)):  # not contiguous: move them together first
        rest = [d for d in range(x.ndim) if d not in axes]
        x = jnp.transpose(x, rest + axes)
        axes = list(range(len(rest), x.ndim))
    a0 = axes[0]
    merged = x.reshape(x.shape[:a0] + (math.prod(x.shape[a0:axes[-1] + 1]),) + x.shape[axes[-1] + 1:])
    out = _max_axis(merged, a0)
    if keepdims:
        out = jnp.expand_dims(out, tuple(axes))
    return out


def _window_views(xp: Array, window: Sequence[int], strides: Sequence[int], out_spatial: Sequence[int]
                  ) -> list[Array]:
    """The strided views ``xp[:, i::s, j::s, ...]`` (one per window offset, row-major) of a padded
    channels-last map, each of the output's spatial shape."""
    nd = len(window)
    views = []
    for offs in itertools.product(*(range(k) for k in window)):
        start = (0,) + tuple(offs) + (0,)
        limit = (xp.shape[0],) + tuple(o + (n - 1) * s + 1 for o, n, s in zip(offs, out_spatial, strides)) + (
            xp.shape[-1],)
        views.append(jax.lax.slice(xp, start, limit, (1,) + tuple(strides) + (1,)))
    assert len(views) == math.prod(window) and all(v.ndim == nd + 2 for v in views)
    return views


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3))
def max_pool(x: Array, window: tuple[int, ...], strides: tuple[int, ...], padding: tuple[tuple[int, int], ...]
             ) -> Array:
    """``torch.nn.functional.max_pool{1,2,3}d`` (floor mode, ``-inf`` padding) on a channels-last map, with
    PyTorch's derivative: each output's gradient goes to the first arg-max of its window (row-major scan).

    ``window``/``strides`` per spatial axis, ``padding`` a ``(lo, hi)`` pair per spatial axis. The forward pass
    is XLA's ``reduce_window``; the derivative compares the ``prod(window)`` strided views of the input in one
    pass (an integer arg-max per output, so exactly one element is hit whatever rounding the operand gets) and
    its backward is a sum of strided pads, where XLA's own max-pool derivative is a ``select_and_scatter``
    (a variadic reduce-window forward and a scatter backward, several times slower on XLA:CPU).

    >>> import jax.numpy as jnp
    >>> max_pool(jnp.arange(16.0).reshape(1, 4, 4, 1), (2, 2), (2, 2), ((0, 0), (0, 0)))[0, :, :, 0]
    Array([[ 5.,  7.],
           [13., 15.]], dtype=float32)
    """
    pads = ((0, 0),) + tuple(padding) + ((0, 0),)
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1,) + tuple(window) + (1,), (1,) + tuple(strides) + (1,),
                                 pads)


@max_pool.defjvp
def _max_pool_jvp(window: tuple[int, ...], strides: tuple[int, ...], padding: tuple[tuple[int, int], ...],
                  primals: tuple[Array], tangents: tuple[Array]) -> tuple[Array, Array]:
    (x,), (t,) = primals, tangents
    pads = ((0, 0),) + tuple(padding) + ((0, 0),)
    out_spatial = [(n + lo + hi - k) // s + 1 for n, (lo, hi), k, s in zip(x.shape[1:-1], padding, window, strides)]
    xs = _window_views(jnp.pad(x, pads, constant_values=-jnp.inf), window, strides, out_spatial)
    best, arg = xs[0], jnp.zeros(xs[0].shape, jnp.int32)
    for j, v in enumerate(xs[1:], 1):
        # strictly greater: the first maximum of the scan keeps the gradient (PyTorch's rule); NaN wins like torch
        upd = (v > best) | jnp.isnan(v)
        best, arg = jnp.where(upd, v, best), jnp.where(upd, j, arg)
    ts = _window_views(jnp.pad(t, pads), window, strides, out_spatial)
    zero = jnp.zeros((), t.dtype)
    t_out = sum((jnp.where(arg == j, v, zero) for j, v in enumerate(ts[1:], 1)), jnp.where(arg == 0, ts[0], zero))
    return best, t_out


def global_pool(x: Array, kind: str, scale: Array | None = None) -> Array:
    """Global pooling over the spatial axes of a channels-last map: ``(N, *spatial, C) -> (N, C)``.

    ``lp`` is the L2 pool of ``torch.nn.functional.lp_pool2d(x, 2, kernel=(H, W))``:
    ``sqrt(mean(x**2) * H * W)``, computed in that order as torch does; ``lse`` is log-sum-exp.

    ``scale`` (shape ``(N, *spatial, 1)``, e.g. a spatial attention map) pools ``x * scale`` without
    materialising the product: the average becomes one contraction, the other pools fuse the product into
    the reduction. Same value as ``global_pool(x * scale, kind)`` up to float rounding.
    """
    axes = spatial_axes(x)
    if scale is not None and kind == "avg":
        n = math.prod(x.shape[a] for a in axes)
        # explicit sizes, not -1: reshape cannot infer a dimension of an empty batch
        flat = x.reshape(x.shape[0], n, x.shape[-1])
        return jnp.einsum("npc,np->nc", flat, scale.reshape(x.shape[0], n)) / n
    if kind == "max":
        return _max_reduce(x, axes, scale)
    if scale is not None:
        x = x * scale
    if kind == "avg":
        return jnp.mean(x, axis=axes)
    if kind == "lp":
        n = math.prod(x.shape[a] for a in axes)
        return jnp.sqrt(jnp.mean(jnp.square(x), axis=axes) * n)
    if kind == "lse":
        return jax.nn.logsumexp(x, axis=axes)
    raise ValueError(f"unknown pool type {kind!r}: expected one of {POOL_TYPES}")


def channel_logits(
    x: Array,
    pool_types: Sequence[str],
    pool_fusion: str,
    mlp: Callable[[Array], Array],
    scale: Array | None = None,
) -> Array:
    """CBAM's channel logits ``sum_p mlp(pool_p(x))`` (``pool_fusion="sum"``) or ``mlp(mean_p pool_p(x))``
    (``"mean"``), shape ``(N, C)``; the pools run through the shared ``mlp`` in one stacked call.

    ``scale`` pools ``x * scale`` without forming it (see :func:`global_pool`).
    """
    pooled = [global_pool(x, p, scale) for p in pool_types]
    if pool_fusion == "mean" and len(pooled) > 1:
        pooled = [sum(pooled[1:], pooled[0]) / len(pooled)]
    z = mlp(jnp.stack(pooled, axis=0))  # (P, N, C)
    return jnp.sum(z, axis=0) if z.shape[0] > 1 else z[0]


def apply_arrangement(
    x: Array,
    arrangement: str,
    channel_map: Callable[..., Array],
    spatial_map: Callable[..., Array],
) -> Array:
    """Combines CBAM's two attention maps; ``channel_map(x, scale=None)`` / ``spatial_map(x, scale=None)``.

    The sequential arrangements never materialise the intermediate ``x * M(x)``: the second map pools ``x``
    with the first applied on the fly, and the output is formed once (same numbers as ``spatial(channel(x))``
    up to float rounding; one fewer read and write of the feature map).
    """
    if arrangement == "channel_first":
        mc = channel_map(x)
        ms = spatial_map(x, scale=mc)
        return (x.astype(mc.dtype) * mc) * ms
    if arrangement == "spatial_first":
        ms = spatial_map(x)
        mc = channel_map(x, scale=ms)
        return (x.astype(ms.dtype) * ms) * mc
    mc = channel_map(x)
    ms = spatial_map(x)
    x = x.astype(mc.dtype)
    if arrangement == "parallel":
        return x * mc * ms
    return x * mc + x * ms


# --------------------------------------------------------------------------------------------------
# spatial compression: (N, *spatial, C) -> (N, *spatial, K)
# --------------------------------------------------------------------------------------------------

_COMPRESS_ALIASES = {"max": "max", "mean": "mean", "avg": "mean"}


def normalize_compress(compress: str | Sequence[str]) -> str | tuple[str, ...]:
    """``"conv"`` (learned 1x1 convolution) or a non-empty concat order drawn from ``max``/``mean``."""
    if isinstance(compress, str):
        if compress.lower() == "conv":
            return "conv"
        compress = (compress,)
    return _normalize_names(tuple(compress), _COMPRESS_ALIASES,
                            "compress must be 'conv' or a non-empty sequence of 'max'/'mean', got ()",
                            "unknown spatial compression {!r}: expected 'conv' or a sequence of 'max'/'mean'")


def channel_compress(x: Array, order: Sequence[str], fusion: str = "concat", scale: Array | None = None) -> Array:
    """Pools over the channel axis and concatenates in ``order`` (``fusion="concat"``, CBAM), or averages
    the pooled maps into one channel (``fusion="mean"``, timm's LightSpatialAttn).

    ``scale`` (shape ``(N, 1, ..., 1, C)``, e.g. a channel attention map) compresses ``x * scale`` without
    materialising the product (the mean is one contraction, the max fuses the product into the reduction):
    this is what keeps CBAM's forward pass near its memory-bandwidth floor.
    """
    def pooled(kind: str) -> Array:
        if kind == "max":
            return _max_reduce(x, -1, scale, keepdims=True)
        if scale is None:
            xs = x
        elif kind == "mean":
            flat = x.reshape(x.shape[0], math.prod(x.shape[1:-1]), x.shape[-1])
            s = scale.reshape(x.shape[0], x.shape[-1])
            return (jnp.einsum("npc,nc->np", flat, s) / x.shape[-1]).reshape(x.shape[:-1] + (1,))
        else:
            xs = x * scale
        return jnp.mean(xs, axis=-1, keepdims=True)

    maps = [pooled(k) for k in order]
    if fusion == "concat":
        return maps[0] if len(maps) == 1 else jnp.concatenate(maps, axis=-1)
    if fusion == "mean":
        return sum(maps[1:], maps[0]) / len(maps) if len(maps) > 1 else maps[0]
    raise ValueError(f"unknown compress_fusion {fusion!r}: expected 'concat' or 'mean'")


#: the banded-matmul path of :func:`gate_conv` is taken up to this map width (the matmul's work grows with the
#: width; measured 2.2-2.8x faster forward + backward than XLA:CPU's convolution from 8 to 56, 1.5x at 112:
#: benchmarks/RESULTS.md, issue #13 section)
BANDED_CONV_MAX_WIDTH = 64


def _band(v: Array, n_out: int) -> Array:
    """Banded (Toeplitz) matrices from the last axis of ``v`` (``(..., K)``): shape ``(..., n_out + K - 1, n_out)``
    with ``T[..., r + j, r] = v[..., j]`` and zeros elsewhere. Built with concatenate / tile / slice / reshape only,
    so its derivative is as cheap (a sum of the band's diagonals)."""
    k = v.shape[-1]
    row = jnp.concatenate([v, jnp.zeros(v.shape[:-1] + (n_out,), v.dtype)], axis=-1)  # length n_out + k
    flat = jnp.tile(row, (1,) * (v.ndim - 1) + (n_out,))[..., : n_out * (n_out + k - 1)]
    # row r of the (n_out, n_out + k - 1) view starts r places before the tile's start: [r, c] = v[c - r]
    return jnp.swapaxes(flat.reshape(v.shape[:-1] + (n_out, n_out + k - 1)), -1, -2)


def gate_conv(lhs: Array, rhs: Array, window_strides: Sequence[int], padding: Any, lhs_dilation: Any = None,
              rhs_dilation: Any = None, dimension_numbers: Any = None, feature_group_count: int = 1,
              precision: Any = None, **kwargs: Any) -> Array:
    """``lax.conv_general_dilated`` for the spatial gate's convolution (a few channels in, one out): a 2-D,
    stride-1 convolution to one output channel over a map at most :data:`BANDED_CONV_MAX_WIDTH` wide is
    computed as ONE matmul against banded matrices of the kernel, everything else goes to
    ``lax.conv_general_dilated`` unchanged.

    Why: XLA:CPU's convolution vectorises over channels, and this one has 2 in and 1 out, so the 7x7 conv of
    CBAM's spatial gate cost ~16 % of the main job's CBAM training step. As a matmul, row ``(n, h)`` of the
    input with its ``kh`` row shifts side by side (``(N*H, kh * (W + kw - 1) * C)``) times the stacked
    banded kernel matrices (``(kh * (W + kw - 1) * C, W)``) is the output row; more multiply-adds (zeros in
    the band), but at matmul speed: 2.2-2.8x faster forward + backward. Same sums in another order (outputs
    within ~3e-7 relative, gradients ~4e-6 of their largest entry).
    """
    nd = lhs.ndim - 2
    plain = (
        nd == 2 and rhs.shape[-1] == 1 and feature_group_count == 1 and not kwargs.get("out_sharding")
        and kwargs.get("preferred_element_type") is None
        and all(v == 1 for v in (window_strides or (1,) * nd))
        and all(v == 1 for v in (lhs_dilation or (1,) * nd)) and all(v == 1 for v in (rhs_dilation or (1,) * nd))
        and not isinstance(padding, str) and lhs.shape[2] <= BANDED_CONV_MAX_WIDTH
        and dimension_numbers == jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC"))
    )
    if plain:
        (p0, p1), (q0, q1) = padding
        kh, kw, c = rhs.shape[:3]
        n, h, w = lhs.shape[:3]
        ho, wo = h + p0 + p1 - kh + 1, w + q0 + q1 - kw + 1
        plain = ho >= 1 and wo >= 1 and n > 0
    if not plain:
        return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                                            rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                                            feature_group_count=feature_group_count, precision=precision, **kwargs)
    xp = jnp.pad(lhs, ((0, 0), (p0, p1), (q0, q1), (0, 0)))
    wp = wo + kw - 1  # padded columns that reach an output (a larger right pad is cut)
    rows = jnp.concatenate([xp[:, i: i + ho, :wp, :] for i in range(kh)], axis=-1)  # (N, Ho, Wp, kh * C)
    # bands[(col, i, c), out_col] = rhs[i, col - out_col, c, 0]
    bands = _band(jnp.transpose(rhs[..., 0], (0, 2, 1)), wo)  # (kh, C, Wp, Wo)
    bands = jnp.transpose(bands, (2, 0, 1, 3)).reshape(wp * kh * c, wo)
    out = jnp.dot(rows.reshape(n * ho, wp * kh * c), bands.astype(rows.dtype), precision=precision)
    return out.reshape(n, ho, wo, 1)


def check_kernel_size(kernel_size: int) -> int:
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int):
        raise TypeError(f"kernel_size must be an odd int, got {kernel_size!r}")
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(
            f"kernel_size must be a positive odd int (padding (k-1)//2 keeps the map size), got {kernel_size}"
        )
    return kernel_size


def check_spatial_dims(spatial_dims: int) -> int:
    if spatial_dims not in (1, 2, 3):
        raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims!r}")
    return spatial_dims


# --------------------------------------------------------------------------------------------------
# BatchNorm with PyTorch semantics
# --------------------------------------------------------------------------------------------------


def batch_moments(x: Array) -> tuple[Array, Array, int]:
    """Per-channel mean and *biased* variance over all but the last axis, plus the element count."""
    axes = tuple(range(x.ndim - 1))
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    mean = jnp.mean(xf, axis=axes)
    var = jnp.mean(jnp.square(xf - mean), axis=axes)
    n = math.prod(x.shape[a] for a in axes)
    return mean, var, n


def running_update(running: Array, batch: Array, momentum: float) -> Array:
    """Flax-convention exponential average: ``momentum * running + (1 - momentum) * batch``.

    PyTorch writes ``(1 - m) * running + m * batch`` with ``m = 1 - momentum``; the same number.
    """
    return momentum * running + (1.0 - momentum) * batch


def unbiased(var: Array, n: int) -> Array:
    """PyTorch stores the unbiased variance ``var * n / (n - 1)`` in ``running_var``."""
    return var * (n / (n - 1)) if n > 1 else var


def train_statistics(x: Array) -> tuple[Array, Array, int]:
    """Training-mode batch moments (see :func:`batch_moments`); like PyTorch, refuses 1 value per channel."""
    mean, var, n = batch_moments(x)
    if n < 2:
        raise ValueError(
            f"BatchNorm in training mode needs more than 1 value per channel, got input shape "
            f"{tuple(x.shape)} (PyTorch raises here too)"
        )
    return mean, var, n


def updated_running_stats(
    running_mean: Array, running_var: Array, mean: Array, var: Array, n: int, momentum: float
) -> tuple[Array, Array]:
    """New running statistics after a training step, as PyTorch computes them (unbiased variance)."""
    return (jax.lax.stop_gradient(running_update(running_mean, mean, momentum)),
            jax.lax.stop_gradient(running_update(running_var, unbiased(var, n), momentum)))


def normalize(x: Array, mean: Array, var: Array, scale: Array | None, bias: Array | None, eps: float) -> Array:
    y = (x - mean) * jax.lax.rsqrt(var + eps)
    if scale is not None:
        y = y * scale
    if bias is not None:
        y = y + bias
    return y
