"""Building blocks shared by the backbones: containers whose attribute paths mirror ``torch.nn.Sequential``,
torch-initialised convolutions and linears, torch-semantics pooling, dropout and stochastic depth.

Everything here is channels-last (NHWC). Padding is always explicit ``((p, p), (p, p))`` so strided
convolutions and pools match PyTorch on odd sizes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, overload

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flax_attn.layers import create_attn
from flax_attn.layers._functional import Dtype, max_pool, resolve_activation
from flax_attn.layers.norm import BatchNorm
from flax_attn.layers.registry import AttnFactory, AttnSpec
from flax_attn.layers.specs import BlockSpec, CBAMSpec, ChannelSpec, SpatialSpec

__all__ = ["AttnSpec", "Dtype"]  # re-exported: the one attention-argument type and dtype alias of the models

Initializer = Callable[..., jax.Array]

# ---------------------------------------------------------------------------------------------- initialisers
#: ``nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu")`` (torchvision ResNet / MobileNet /
#: EfficientNet convs; RegNet's ``normal(0, sqrt(2 / fan_out))`` is the same law). Untruncated, like torch.
kaiming_normal_fan_out: Initializer = jax.nn.initializers.variance_scaling(2.0, "fan_out", "normal")
#: torch's default ``nn.Linear``/``nn.Conv2d`` weight init: ``kaiming_uniform_(a=sqrt(5))`` = U(+-1/sqrt(fan_in)).
torch_default_kernel: Initializer = jax.nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
zeros: Initializer = jax.nn.initializers.zeros


def normal(std: float) -> Initializer:
    """``nn.init.normal_(w, 0, std)``."""
    return jax.nn.initializers.normal(std)


def uniform_symmetric(bound: float) -> Initializer:
    """``nn.init.uniform_(w, -bound, bound)``."""

    def init(key: jax.Array, shape: Sequence[int], dtype: Dtype = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


# ------------------------------------------------------------------------------------------------ containers
class Sequential(nnx.List):
    """A callable list of modules: ``Sequential([a, b])(x) == b(a(x))``.

    Unlike :class:`flax.nnx.Sequential` the children sit directly under integer keys, so parameter paths
    read ``features.3.block.0.0.kernel`` exactly like the ``torch.nn.Sequential`` they mirror, and
    ``model.features[-1]`` is the last child.
    """

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self:
            x = layer(x)
        return x


class NamedSequential(nnx.Module):
    """A callable, ordered collection of named modules (``torch.nn.Sequential(OrderedDict(...))``).

    Names may contain characters Python identifiers cannot (torchvision's RegNet calls its blocks
    ``block1-0``); children are attributes, reachable with ``getattr(seq, "block1-0")`` or ``seq["block1-0"]``.
    """

    def __init__(self, items: Iterable[tuple[str, nnx.Module]]):
        names = []
        for name, module in items:
            setattr(self, name, module)
            names.append(name)
        self._names = tuple(names)

    def names(self) -> tuple[str, ...]:
        """Child names in call order."""
        return self._names

    def __getitem__(self, key: str | int) -> nnx.Module:
        if isinstance(key, int):
            return getattr(self, self._names[key])
        if key not in self._names:
            raise KeyError(f"no child {key!r}: expected one of {self._names}")
        return getattr(self, key)

    def __len__(self) -> int:
        return len(self._names)

    def __call__(self, x: jax.Array) -> jax.Array:
        for name in self._names:
            x = getattr(self, name)(x)
        return x


class Activation(nnx.Module):
    """A parameter-free module wrapping an elementwise function (``nn.ReLU``, ``nn.Hardswish``, ...)."""

    def __init__(self, fn: Callable[[jax.Array], jax.Array], name: str | None = None):
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "activation")

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fn(x)


def act_module(name: str) -> Activation:
    """The activation ``name`` of the package's one table (:func:`flax_attn.layers._functional.resolve_activation`)."""
    return Activation(resolve_activation(name), name)


class MaxPool2d(nnx.Module):
    """``torch.nn.MaxPool2d(kernel_size, stride, padding)`` (floor mode): padding is ``-inf``."""

    def __init__(self, kernel_size: int, stride: int | None = None, padding: int = 0):
        self.kernel_size = kernel_size
        self.stride = kernel_size if stride is None else stride
        self.padding = padding

    def __call__(self, x: jax.Array) -> jax.Array:
        k, s, p = self.kernel_size, self.stride, self.padding
        # pads are -inf like torch; the derivative is torch's first-arg-max rule without XLA's select_and_scatter
        return max_pool(x, (k, k), (s, s), ((p, p), (p, p)))


def _adaptive_matrix(size_in: int, size_out: int) -> np.ndarray:
    """Row ``i`` averages ``x[floor(i*L/n) : ceil((i+1)*L/n)]``, torch's adaptive pooling bins."""
    m = np.zeros((size_out, size_in), np.float32)
    for i in range(size_out):
        start = (i * size_in) // size_out
        end = -((-(i + 1) * size_in) // size_out)
        m[i, start:end] = 1.0 / (end - start)
    return m


def adaptive_avg_pool2d(x: jax.Array, output_size: int | tuple[int, int]) -> jax.Array:
    """``torch.nn.functional.adaptive_avg_pool2d`` on an NHWC map (exact bins, any input size)."""
    oh, ow = (output_size, output_size) if isinstance(output_size, int) else output_size
    h, w = x.shape[1], x.shape[2]
    if (oh, ow) == (1, 1):
        return jnp.mean(x, axis=(1, 2), keepdims=True)
    if h % oh == 0 and w % ow == 0:
        n, _, _, c = x.shape
        return jnp.mean(x.reshape(n, oh, h // oh, ow, w // ow, c), axis=(2, 4))
    mh = jnp.asarray(_adaptive_matrix(h, oh), x.dtype)
    mw = jnp.asarray(_adaptive_matrix(w, ow), x.dtype)
    return jnp.einsum("ih,jw,nhwc->nijc", mh, mw, x, precision=jax.lax.Precision.HIGHEST)


class Dropout(nnx.Dropout):
    """``nn.Dropout(p)``: active in training mode only (``model.train()``), scaled by ``1 / (1 - p)``.

    Randomness comes from the ``dropout`` stream of the ``rngs`` given to the model's constructor
    (or its ``default`` stream: ``nnx.Rngs(0)`` is enough), or from ``rngs=`` at call time.
    """


class StochasticDepth(nnx.Module):
    """``torchvision.ops.StochasticDepth(p, "row")``: in training mode each sample's residual branch is zeroed
    with probability ``p`` and the survivors are scaled by ``1 / (1 - p)``; identity in eval mode.

    Randomness: the ``dropout`` stream (or ``default``) of the constructor's ``rngs``.
    """

    def __init__(self, p: float, *, rngs: nnx.Rngs | None, deterministic: bool = False):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"stochastic depth probability must be in [0, 1], got {p}")
        self.p = p
        self.deterministic = deterministic
        self.rngs = rngs["dropout"].fork() if (rngs is not None and p > 0.0) else nnx.data(None)

    def __call__(self, x: jax.Array, *, deterministic: bool | None = None,
                 rngs: nnx.Rngs | None = None) -> jax.Array:
        det = self.deterministic if deterministic is None else deterministic
        if det or self.p == 0.0:
            return x
        stream = rngs["dropout"] if rngs is not None else self.rngs
        if stream is None:
            raise ValueError("StochasticDepth in training mode needs rngs: build the model with rngs=nnx.Rngs(...) "
                             "or pass rngs= when calling it")
        survival = 1.0 - self.p
        keep = jax.random.bernoulli(stream(), survival, (x.shape[0],) + (1,) * (x.ndim - 1))
        noise = keep.astype(x.dtype)
        if survival > 0.0:
            noise = noise / survival
        return x * noise


# ----------------------------------------------------------------------------------------------- conv layers
#: strided convolutions over maps up to this size take the im2col path of :func:`_small_map_conv`
STRIDED_IM2COL_MAX_MAP = 24


def _small_map_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                    dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
                    preferred_element_type=None, **kwargs):
    """``lax.conv_general_dilated`` that computes convolutions over maps *smaller than the kernel* as im2col
    + one matmul.

    XLA:CPU (jaxlib 0.10.2) falls off a cliff there: a 3x3, 512->512 convolution with padding 1 over a 2x2
    map (ResNet's ``layer4`` at 64x64 input) takes ~600 ms for a batch of 32, against 5 ms as the identical
    im2col product (same sums, relative difference ~5e-7) and 12 ms over a 3x3 map. Strided convolutions over
    maps up to :data:`STRIDED_IM2COL_MAX_MAP` take the same path (their XLA:CPU backward is slow). Every other case, and
    anything this path does not cover (groups, input dilation, string padding, NHWC/HWIO not in use), goes
    to ``lax.conv_general_dilated`` unchanged.
    """
    nd = lhs.ndim - 2
    dil = tuple(rhs_dilation or (1,) * nd)
    eff_kernel = [(k - 1) * d + 1 for k, d in zip(rhs.shape[:nd], dil)]
    plain = (
        nd == 2 and feature_group_count == 1 and batch_group_count == 1 and preferred_element_type is None
        and not kwargs.get("out_sharding") and all(v == 1 for v in (lhs_dilation or (1,) * nd))
        and not isinstance(padding, str)
        and dimension_numbers == jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC"))
    )
    # strided convs (ResNet's first block of a stage and its 1x1 downsample) over maps of <= 24: XLA's strided conv
    # and its backward are slower there (fwd + both gradients): 3x3 256->512 over 4x4 18x, 3x3 over 6..24 1.1-1.5x,
    # the 1x1 downsamples 1.4-2.3x (benchmarks/bench_conv.py at 64x64 and 96x96, benchmarks/RESULTS.md)
    strided_small = (any(s > 1 for s in (window_strides or ()))
                     and all(size <= STRIDED_IM2COL_MAX_MAP for size in lhs.shape[1:3]))
    if not plain or (not strided_small and all(size >= k for size, k in zip(lhs.shape[1:3], eff_kernel))):
        return jax.lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
            dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
            batch_group_count=batch_group_count, precision=precision,
            preferred_element_type=preferred_element_type, **kwargs)
    (p0, p1), (q0, q1) = padding
    xp = jnp.pad(lhs, ((0, 0), (p0, p1), (q0, q1), (0, 0)))
    (kh, kw), (sh, sw), (dh, dw) = rhs.shape[:2], window_strides, dil
    ho = (xp.shape[1] - eff_kernel[0]) // sh + 1
    wo = (xp.shape[2] - eff_kernel[1]) // sw + 1
    cols = jnp.concatenate(
        [xp[:, i * dh: i * dh + (ho - 1) * sh + 1: sh, j * dw: j * dw + (wo - 1) * sw + 1: sw, :]
         for i in range(kh) for j in range(kw)], axis=-1)
    return jnp.dot(cols, rhs.reshape(kh * kw * rhs.shape[2], rhs.shape[3]), precision=precision)


def conv2d(
    in_ch: int,
    out_ch: int,
    kernel_size: int,
    *,
    stride: int = 1,
    padding: int | None = None,
    dilation: int = 1,
    groups: int = 1,
    bias: bool = False,
    kernel_init: Initializer = kaiming_normal_fan_out,
    bias_init: Initializer = zeros,
    dtype: Dtype | None = None,
    param_dtype: Dtype = jnp.float32,
    rngs: nnx.Rngs,
) -> nnx.Conv:
    """``nn.Conv2d`` as an :class:`nnx.Conv` with explicit symmetric padding (default ``(k - 1) // 2 * d``)."""
    pad = (kernel_size - 1) // 2 * dilation if padding is None else padding
    return nnx.Conv(
        in_ch, out_ch, (kernel_size, kernel_size), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
        kernel_dilation=(dilation, dilation), feature_group_count=groups, use_bias=bias,
        kernel_init=kernel_init, bias_init=bias_init, dtype=dtype, param_dtype=param_dtype, precision=None,
        conv_general_dilated=_small_map_conv, rngs=rngs,
    )


def linear(
    in_features: int,
    out_features: int,
    *,
    kernel_init: Initializer | None = None,
    bias_init: Initializer | None = None,
    use_bias: bool = True,
    dtype: Dtype | None = None,
    param_dtype: Dtype = jnp.float32,
    rngs: nnx.Rngs,
) -> nnx.Linear:
    """``nn.Linear``; default init is torch's (``U(+-1/sqrt(fan_in))`` for weight and bias)."""
    bound = 1.0 / math.sqrt(in_features)
    return nnx.Linear(
        in_features, out_features, use_bias=use_bias,
        kernel_init=kernel_init or torch_default_kernel, bias_init=bias_init or uniform_symmetric(bound),
        dtype=dtype, param_dtype=param_dtype, precision=None, rngs=rngs,
    )


def conv_norm_act(
    in_ch: int,
    out_ch: int,
    kernel_size: int,
    *,
    stride: int = 1,
    dilation: int = 1,
    groups: int = 1,
    act: str | None = "relu",
    bn_momentum: float = 0.9,
    bn_eps: float = 1e-5,
    kernel_init: Initializer = kaiming_normal_fan_out,
    dtype: Dtype | None = None,
    param_dtype: Dtype = jnp.float32,
    rngs: nnx.Rngs,
) -> Sequential:
    """``torchvision.ops.Conv2dNormActivation``: children ``0`` conv (no bias), ``1`` BatchNorm, ``2`` act."""
    layers: list[nnx.Module] = [
        conv2d(in_ch, out_ch, kernel_size, stride=stride, dilation=dilation, groups=groups, bias=False,
               kernel_init=kernel_init, dtype=dtype, param_dtype=param_dtype, rngs=rngs),
        BatchNorm(out_ch, momentum=bn_momentum, epsilon=bn_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs),
    ]
    if act is not None:
        layers.append(act_module(act))
    return Sequential(layers)


@overload
def make_attn(attn: None, channels: int, *, dtype: Dtype | None, param_dtype: Dtype, rngs: nnx.Rngs,
              **kwargs: Any) -> None: ...
@overload
def make_attn(attn: str | BlockSpec | AttnFactory, channels: int, *, dtype: Dtype | None, param_dtype: Dtype,
              rngs: nnx.Rngs, **kwargs: Any) -> nnx.Module: ...
@overload
def make_attn(attn: AttnSpec, channels: int, *, dtype: Dtype | None, param_dtype: Dtype, rngs: nnx.Rngs,
              **kwargs: Any) -> nnx.Module | None: ...
def make_attn(attn: AttnSpec, channels: int, *, dtype: Dtype | None, param_dtype: Dtype, rngs: nnx.Rngs,
              **kwargs: Any) -> nnx.Module | None:
    """Builds the attention block of a backbone slot: ``None`` -> no block, a registered name or a block
    spec -> the registry's block (with the model's dtypes), a callable -> ``attn(channels, rngs=rngs, **kwargs)``."""
    if attn is None:
        return None
    if isinstance(attn, (str, ChannelSpec, SpatialSpec, CBAMSpec)):
        return create_attn(attn, channels, rngs=rngs, dtype=dtype, param_dtype=param_dtype, **kwargs)
    if callable(attn):
        return attn(channels, rngs=rngs, **kwargs)
    raise TypeError(f"attn must be None, a registered attention name or a callable (or a block spec such as "
                    f"flax_attn.CBAMSpec), got {type(attn).__name__}")


def check_image(x: Any, in_chans: int, who: str) -> None:
    """Raises a clear error unless ``x`` is an NHWC batch with ``in_chans`` channels."""
    shape = getattr(x, "shape", None)
    if shape is None:
        raise TypeError(f"{who} expects a jax/numpy array of shape (N, H, W, {in_chans}), got {type(x).__name__}")
    if len(shape) != 4 or shape[-1] != in_chans:
        hint = ""
        if len(shape) == 4 and shape[1] == in_chans:
            hint = ": did you pass NCHW? the Flax models are channels-last"
        raise ValueError(f"{who} expects channels-last input (N, H, W, {in_chans}), got {tuple(shape)}{hint}")
