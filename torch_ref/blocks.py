"""Channels-first PyTorch reference blocks: SqueezeExcite, ChannelAttention, SpatialAttention, CBAM.

These are the ground truth of the parity suite for the generic Flax blocks of ``flax_attn.layers``.
They take the SAME keyword options and have the SAME parameter names (``fc1``/``fc2`` ``nn.Linear``,
``conv``/``compress`` ``nn.Conv{1,2,3}d``, ``bn`` ``nn.BatchNorm{1,2,3}d``, ``channel.*``/``spatial.*``),
so a ``state_dict`` of these modules converts to the Flax blocks with the identity key map. The arithmetic
is written independently of ``flax_attn`` (this package never imports JAX) and as plainly as possible:

* input ``(N, C, L)``, ``(N, C, H, W)`` or ``(N, C, D, H, W)``;
* channel pools over all spatial positions: ``avg`` = mean, ``max`` = amax, ``lp`` =
  ``F.lp_pool{1,2,3}d(x, 2, kernel_size=<whole map>)`` (the L2 pool of the official CBAM code),
  ``lse`` = ``torch.logsumexp``;
* ``pool_fusion="sum"``: the MLP runs on every pooled vector and the outputs are summed (the paper);
  ``"mean"``: the pooled vectors are averaged first and the MLP runs once (timm's light variant);
* spatial compression: concat of ``max``/``mean`` over channels in the given order, or their average
  (``compress_fusion="mean"``), or a learned 1x1 conv ``compress`` (``compress="conv"``);
* ``conv``: ``kernel_size`` (odd) with padding ``(k - 1) // 2``; optional ``bn``;
* ``bn_momentum`` uses the FLAX convention (``running = m * running + (1 - m) * batch``, default 0.9) so
  that the constructor mirrors the Flax one; it is converted here to PyTorch's ``momentum = 1 - bn_momentum``
  (default 0.1, the PyTorch default).

Activation names follow PyTorch: ``gelu`` is ``nn.GELU()`` (exact erf form), ``hard_sigmoid`` is
``nn.Hardsigmoid`` (``relu6(x + 3) / 6``), ``hard_swish`` is ``nn.Hardswish``, ``leaky_relu`` uses slope 0.01.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ARRANGEMENTS",
    "CBAM",
    "ChannelAttention",
    "POOL_TYPES",
    "SpatialAttention",
    "SqueezeExcite",
    "hidden_width",
    "make_activation",
    "make_divisible",
]

POOL_TYPES = ("avg", "max", "lp", "lse")
ARRANGEMENTS = ("channel_first", "spatial_first", "parallel", "parallel_add")

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "relu6": nn.ReLU6,
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "hard_swish": nn.Hardswish,
    "leaky_relu": lambda: nn.LeakyReLU(0.01),
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "hard_sigmoid": nn.Hardsigmoid,
    "identity": nn.Identity,
}

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_LP_POOL = {1: F.lp_pool1d, 2: F.lp_pool2d, 3: F.lp_pool3d}


class _Lambda(nn.Module):
    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def make_activation(act: str | nn.Module | Callable, *, argname: str = "act") -> nn.Module:
    """An activation module from a name (``"relu"``, ``"silu"``, ``"hard_sigmoid"`` ...), a module class,
    a module instance or a plain function."""
    if isinstance(act, nn.Module):
        return act
    if isinstance(act, type) and issubclass(act, nn.Module):
        return act()
    if isinstance(act, str):
        key = act.lower().replace("-", "_")
        if key not in _ACTIVATIONS:
            raise ValueError(f"unknown {argname} {act!r}: expected a callable or one of {sorted(_ACTIVATIONS)}")
        return _ACTIVATIONS[key]()
    if callable(act):
        return _Lambda(act)
    raise TypeError(f"{argname} must be a string or a callable, got {type(act).__name__}")


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None,
                   round_limit: float = 0.9) -> int:
    """Nearest multiple of ``divisor`` to ``value`` (torchvision's ``_make_divisible`` with
    ``round_limit=0.9``, timm's ``make_divisible``): at least ``min_value`` (default ``divisor``), and
    bumped up by one ``divisor`` if rounding went below ``round_limit * value``."""
    if min_value is None or min_value == 0:
        min_value = divisor
    rounded = int(value + divisor / 2) // divisor * divisor
    new_value = max(min_value, rounded)
    if new_value < round_limit * value:
        new_value += divisor
    return int(new_value)


def hidden_width(channels: int, *, reduction: float = 16, hidden_channels: int | None = None,
                 divisor: int | None = None, round_limit: float = 0.0, min_hidden: int = 1) -> int:
    """Hidden width of the channel MLP: ``hidden_channels`` if given; else the floor rule
    ``max(min_hidden, channels // reduction)`` (SE paper code, article, official CBAM) when ``divisor`` is
    None; else ``make_divisible(channels / reduction, divisor, min_value, round_limit)`` where
    ``min_value`` is ``min_hidden`` if it is above 1 and ``divisor`` otherwise (timm / torchvision)."""
    if hidden_channels is not None:
        if hidden_channels < 1:
            raise ValueError(f"hidden_channels must be >= 1, got {hidden_channels}")
        return int(hidden_channels)
    if not reduction > 0:
        raise ValueError(f"reduction must be > 0, got {reduction}")
    if divisor is None:
        return max(int(min_hidden), int(channels // reduction))
    min_value = min_hidden if min_hidden > 1 else divisor
    return make_divisible(channels / reduction, divisor, min_value=min_value, round_limit=round_limit)


def _check_input(x: torch.Tensor, channels: int, who: str, spatial_dims: int | None = None) -> None:
    ok_rank = 3 <= x.ndim <= 5 if spatial_dims is None else x.ndim == spatial_dims + 2
    if not ok_rank or x.shape[1] != channels:
        want = "(N, C, *spatial) with 1 to 3 spatial dims" if spatial_dims is None else \
            f"(N, C) + {spatial_dims} spatial dims"
        raise ValueError(f"{who} expects channels-first input {want} and C={channels}, got {tuple(x.shape)}")


def global_pool(x: torch.Tensor, kind: str) -> torch.Tensor:
    """Pools a channels-first map over all its spatial positions: ``(N, C, *spatial) -> (N, C)``."""
    dims = tuple(range(2, x.ndim))
    if kind == "avg":
        return x.mean(dim=dims)
    if kind == "max":
        return x.amax(dim=dims)
    if kind == "lp":
        spatial = x.shape[2:]
        window = spatial[0] if len(spatial) == 1 else tuple(spatial)
        return _LP_POOL[len(spatial)](x, 2, window).flatten(1)
    if kind == "lse":
        return torch.logsumexp(x.flatten(2), dim=2)
    raise ValueError(f"unknown pool type {kind!r}: expected one of {POOL_TYPES}")


class ChannelAttention(nn.Module):
    """CBAM's channel attention: ``y = x * gate(sum_p fc2(act(fc1(pool_p(x)))))`` (``pool_fusion="sum"``),
    or ``y = x * gate(fc2(act(fc1(mean_p pool_p(x)))))`` (``pool_fusion="mean"``).

    Example:
        >>> import torch
        >>> ChannelAttention(32, reduction=8)(torch.randn(2, 32, 5, 7)).shape
        torch.Size([2, 32, 5, 7])
    """

    def __init__(self, channels: int, *, reduction: float = 16, hidden_channels: int | None = None,
                 divisor: int | None = None, round_limit: float = 0.0, min_hidden: int = 1,
                 pool_types: Sequence[str] = ("avg", "max"), pool_fusion: str = "sum", use_bias: bool = True,
                 act: str | Callable = "relu", gate: str | Callable = "sigmoid"):
        super().__init__()
        if isinstance(pool_types, str):
            pool_types = (pool_types,)
        pool_types = tuple("avg" if p == "mean" else p for p in pool_types)
        if not pool_types:
            raise ValueError(f"pool_types must be a non-empty sequence drawn from {POOL_TYPES}, got ()")
        for p in pool_types:
            if p not in POOL_TYPES:
                raise ValueError(f"unknown pool type {p!r} in pool_types: expected one of {POOL_TYPES}")
        if pool_fusion not in ("sum", "mean"):
            raise ValueError(f"unknown pool_fusion {pool_fusion!r}: expected 'sum' or 'mean'")
        self.channels = channels
        self.hidden = hidden_width(channels, reduction=reduction, hidden_channels=hidden_channels,
                                   divisor=divisor, round_limit=round_limit, min_hidden=min_hidden)
        self.pool_types = pool_types
        self.pool_fusion = pool_fusion
        self.fc1 = nn.Linear(channels, self.hidden, bias=use_bias)
        self.act = make_activation(act)
        self.fc2 = nn.Linear(self.hidden, channels, bias=use_bias)
        self.gate = make_activation(gate, argname="gate")

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-gate channel logits ``(N, C)``."""
        _check_input(x, self.channels, f"{type(self).__name__}({self.channels})")
        pooled = [global_pool(x, p) for p in self.pool_types]
        if self.pool_fusion == "mean":
            pooled = [torch.stack(pooled, dim=0).mean(dim=0)]
        out = None
        for v in pooled:
            z = self.fc2(self.act(self.fc1(v)))
            out = z if out is None else out + z
        return out

    def attention_map(self, x: torch.Tensor) -> torch.Tensor:
        """``M_c(x)`` of shape ``(N, C, 1, ..., 1)``."""
        g = self.gate(self.logits(x))
        return g.view(*g.shape, *([1] * (x.ndim - 2)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.attention_map(x)


class SqueezeExcite(ChannelAttention):
    """Squeeze-and-Excitation (Hu et al.): :class:`ChannelAttention` with a single average pool.

    Example:
        >>> import torch
        >>> SqueezeExcite(32, reduction=4)(torch.randn(2, 32, 5)).shape
        torch.Size([2, 32, 5])
    """

    def __init__(self, channels: int, *, reduction: float = 16, hidden_channels: int | None = None,
                 divisor: int | None = None, round_limit: float = 0.0, min_hidden: int = 1,
                 pool_types: Sequence[str] = ("avg",), pool_fusion: str = "sum", use_bias: bool = True,
                 act: str | Callable = "relu", gate: str | Callable = "sigmoid"):
        super().__init__(channels, reduction=reduction, hidden_channels=hidden_channels, divisor=divisor,
                         round_limit=round_limit, min_hidden=min_hidden, pool_types=pool_types,
                         pool_fusion=pool_fusion, use_bias=use_bias, act=act, gate=gate)


class SpatialAttention(nn.Module):
    """CBAM's spatial attention: ``y = x * gate(bn(conv(compress(x))))``.

    ``compress``: a concat order of ``"max"``/``"mean"`` channel pools (``compress_fusion="concat"``) or
    their average (``"mean"``), or ``"conv"``, a 1x1 conv ``C -> compress_channels`` with bias.
    ``conv`` has ``kernel_size`` (odd) and padding ``(k - 1) // 2``, bias ``conv_bias`` (default
    ``not use_bn``); ``bn`` is ``BatchNorm{d}d(1, eps=bn_eps, momentum=1 - bn_momentum)``.

    Example:
        >>> import torch
        >>> SpatialAttention(32, kernel_size=3, spatial_dims=3)(torch.randn(2, 32, 3, 4, 5)).shape
        torch.Size([2, 32, 3, 4, 5])
    """

    def __init__(self, channels: int, *, kernel_size: int = 7, spatial_dims: int = 2,
                 compress: str | Sequence[str] = ("mean", "max"), compress_fusion: str = "concat",
                 compress_channels: int = 2, use_bn: bool = False, conv_bias: bool | None = None,
                 bn_momentum: float = 0.9, bn_eps: float = 1e-5, gate: str | Callable = "sigmoid"):
        super().__init__()
        if spatial_dims not in (1, 2, 3):
            raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims!r}")
        if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd int, got {kernel_size!r}")
        if compress_fusion not in ("concat", "mean"):
            raise ValueError(f"unknown compress_fusion {compress_fusion!r}: expected 'concat' or 'mean'")
        self.channels = channels
        self.spatial_dims = spatial_dims
        self.compress_fusion = compress_fusion
        conv_cls = _CONV[spatial_dims]
        if isinstance(compress, str) and compress == "conv":
            self.compress_order = None
            self.compress = conv_cls(channels, compress_channels, kernel_size=1, bias=True)
            in_maps = compress_channels
        else:
            order = (compress,) if isinstance(compress, str) else tuple(compress)
            order = tuple("mean" if c == "avg" else c for c in order)
            if not order or any(c not in ("max", "mean") for c in order):
                raise ValueError(f"compress must be 'conv' or a non-empty sequence of 'max'/'mean', got {compress!r}")
            self.compress_order = order
            self.compress = None
            in_maps = 1 if compress_fusion == "mean" else len(order)
        if conv_bias is None:
            conv_bias = not use_bn
        self.conv = conv_cls(in_maps, 1, kernel_size=kernel_size, padding=(kernel_size - 1) // 2, bias=conv_bias)
        # Flax momentum convention in the signature; PyTorch's momentum is its complement.
        self.bn = _BN[spatial_dims](1, eps=bn_eps, momentum=1.0 - bn_momentum) if use_bn else None
        self.gate = make_activation(gate, argname="gate")

    def compressed(self, x: torch.Tensor) -> torch.Tensor:
        """The channel-compressed maps ``(N, K, *spatial)`` fed to ``conv``."""
        if self.compress is not None:
            return self.compress(x)
        maps = [x.amax(dim=1, keepdim=True) if c == "max" else x.mean(dim=1, keepdim=True)
                for c in self.compress_order]
        if self.compress_fusion == "mean":
            return torch.stack(maps, dim=0).mean(dim=0)
        return torch.cat(maps, dim=1)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-gate spatial logits ``(N, 1, *spatial)``."""
        _check_input(x, self.channels, f"SpatialAttention({self.channels})", self.spatial_dims)
        z = self.conv(self.compressed(x))
        if self.bn is not None:
            z = self.bn(z)
        return z

    def attention_map(self, x: torch.Tensor) -> torch.Tensor:
        """``M_s(x)`` of shape ``(N, 1, *spatial)``."""
        return self.gate(self.logits(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.attention_map(x)


class CBAM(nn.Module):
    """CBAM: :class:`ChannelAttention` ``channel`` and :class:`SpatialAttention` ``spatial``.

    Arrangements (CBAM paper, table 4): ``channel_first``: ``x' = x * M_c(x)``, ``y = x' * M_s(x')``;
    ``spatial_first``: ``x' = x * M_s(x)``, ``y = x' * M_c(x')``; ``parallel``: ``y = x * M_c(x) * M_s(x)``;
    ``parallel_add``: ``y = x * M_c(x) + x * M_s(x)``. ``no_spatial=True``: channel attention only.
    ``gate`` is used by both modules unless ``spatial_gate`` is given.

    Example:
        >>> import torch
        >>> CBAM(32, reduction=8, spatial_dims=1)(torch.randn(2, 32, 9)).shape
        torch.Size([2, 32, 9])
    """

    def __init__(self, channels: int, *, reduction: float = 16, hidden_channels: int | None = None,
                 divisor: int | None = None, round_limit: float = 0.0, min_hidden: int = 1,
                 pool_types: Sequence[str] = ("avg", "max"), pool_fusion: str = "sum", use_bias: bool = True,
                 act: str | Callable = "relu", gate: str | Callable = "sigmoid", kernel_size: int = 7,
                 spatial_dims: int = 2, compress: str | Sequence[str] = ("mean", "max"),
                 compress_fusion: str = "concat", compress_channels: int = 2, use_bn: bool = False,
                 conv_bias: bool | None = None, bn_momentum: float = 0.9, bn_eps: float = 1e-5,
                 spatial_gate: str | Callable | None = None, arrangement: str = "channel_first",
                 no_spatial: bool = False):
        super().__init__()
        if arrangement not in ARRANGEMENTS:
            raise ValueError(f"unknown arrangement {arrangement!r}: expected one of {ARRANGEMENTS}")
        self.arrangement = arrangement
        self.channel = ChannelAttention(
            channels, reduction=reduction, hidden_channels=hidden_channels, divisor=divisor,
            round_limit=round_limit, min_hidden=min_hidden, pool_types=pool_types, pool_fusion=pool_fusion,
            use_bias=use_bias, act=act, gate=gate)
        if no_spatial:
            self.spatial = None
        else:
            self.spatial = SpatialAttention(
                channels, kernel_size=kernel_size, spatial_dims=spatial_dims, compress=compress,
                compress_fusion=compress_fusion, compress_channels=compress_channels, use_bn=use_bn,
                conv_bias=conv_bias, bn_momentum=bn_momentum, bn_eps=bn_eps,
                gate=gate if spatial_gate is None else spatial_gate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spatial is None:
            return self.channel(x)
        if self.arrangement == "channel_first":
            return self.spatial(self.channel(x))
        if self.arrangement == "spatial_first":
            return self.channel(self.spatial(x))
        m_c = self.channel.attention_map(x)
        m_s = self.spatial.attention_map(x)
        if self.arrangement == "parallel":
            return x * m_c * m_s
        return x * m_c + x * m_s
