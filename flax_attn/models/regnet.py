"""RegNet (Radosavovic et al., CVPR 2020), torchvision-compatible: RegNetY (with SE) and RegNetX.

Module tree as ``torchvision.models.regnet``: ``stem`` (``0`` conv, ``1`` BN), ``trunk_output.blockS``
stages of ``blockS-i`` ``ResBottleneckBlock`` (``proj``, ``f.a``, ``f.b``, ``f.se``, ``f.c``), ``fc``.
Block widths come from the same quantised linear rule (:func:`regnet_block_params`), so every torchvision
RegNet width follows from its ``(depth, w_0, w_a, w_m, group_width)``. ``trunk_output`` is the article's
Grad-CAM layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flax_attn.layers import make_divisible
from flax_attn.models._common import (
    AttnSpec,
    Dtype,
    NamedSequential,
    check_image,
    conv_norm_act,
    linear,
    make_attn,
    normal,
    zeros,
)


@dataclass(frozen=True)
class RegNetConfig:
    """torchvision's ``BlockParams.from_init_params`` arguments."""

    depth: int
    w_0: int
    w_a: float
    w_m: float
    group_width: int
    se_ratio: float | None = None
    bottleneck_multiplier: float = 1.0


REGNET_CONFIGS: dict[str, RegNetConfig] = {
    "regnet_y_400mf": RegNetConfig(16, 48, 27.89, 2.09, 8, 0.25),
    "regnet_y_800mf": RegNetConfig(14, 56, 38.84, 2.4, 16, 0.25),
    "regnet_y_1_6gf": RegNetConfig(27, 48, 20.71, 2.65, 24, 0.25),
    "regnet_y_3_2gf": RegNetConfig(21, 80, 42.63, 2.66, 24, 0.25),
    "regnet_y_8gf": RegNetConfig(17, 192, 76.82, 2.19, 56, 0.25),
    "regnet_y_16gf": RegNetConfig(18, 200, 106.23, 2.48, 112, 0.25),
    "regnet_y_32gf": RegNetConfig(20, 232, 115.89, 2.53, 232, 0.25),
    "regnet_y_128gf": RegNetConfig(27, 456, 160.83, 2.52, 264, 0.25),
    "regnet_x_400mf": RegNetConfig(22, 24, 24.48, 2.54, 16),
    "regnet_x_800mf": RegNetConfig(16, 56, 35.73, 2.28, 16),
    "regnet_x_1_6gf": RegNetConfig(18, 80, 34.01, 2.25, 24),
    "regnet_x_3_2gf": RegNetConfig(25, 88, 26.31, 2.25, 48),
    "regnet_x_8gf": RegNetConfig(23, 80, 49.56, 2.88, 120),
    "regnet_x_16gf": RegNetConfig(22, 216, 55.59, 2.1, 128),
    "regnet_x_32gf": RegNetConfig(23, 320, 69.86, 2.0, 168),
}


def regnet_block_params(cfg: RegNetConfig) -> list[tuple[int, int, int, int, float]]:
    """Per stage ``(width_out, stride, depth, group_width, bottleneck_multiplier)``, computed like torchvision
    (float32 arithmetic, so quantisation ties break the same way)."""
    quant, stride = 8, 2
    if cfg.w_a < 0 or cfg.w_0 <= 0 or cfg.w_m <= 1 or cfg.w_0 % 8 != 0:
        raise ValueError(f"invalid RegNet settings {cfg}")
    f32 = np.float32
    widths_cont = np.arange(cfg.depth, dtype=f32) * f32(cfg.w_a) + f32(cfg.w_0)
    capacity = np.round(np.log(widths_cont / f32(cfg.w_0)) / f32(math.log(cfg.w_m)))
    block_widths = (np.round((f32(cfg.w_0) * np.power(f32(cfg.w_m), capacity.astype(f32))) / f32(quant))
                    * quant).astype(np.int32).tolist()
    helper = zip(block_widths + [0], [0] + block_widths, block_widths + [0], [0] + block_widths)
    splits = [w != wp or r != rp for w, wp, r, rp in helper]
    stage_widths = [w for w, t in zip(block_widths, splits[:-1]) if t]
    stage_depths = np.diff(np.array([d for d, t in enumerate(splits) if t])).astype(int).tolist()
    n = len(stage_widths)
    b = [cfg.bottleneck_multiplier] * n
    widths = [int(w * m) for w, m in zip(stage_widths, b)]
    groups = [min(cfg.group_width, wb) for wb in widths]
    ws_bot = [make_divisible(wb, g) for wb, g in zip(widths, groups)]
    stage_widths = [int(wb / m) for wb, m in zip(ws_bot, b)]
    return [(w, stride, d, g, m) for w, d, g, m in zip(stage_widths, stage_depths, groups, b)]


class BottleneckTransform(NamedSequential):
    """``a`` 1x1, ``b`` 3x3 grouped (stride here), optional ``se``, ``c`` 1x1 (no activation)."""

    def __init__(self, width_in: int, width_out: int, stride: int, *, group_width: int,
                 bottleneck_multiplier: float, se_ratio: float | None, attn: AttnSpec, dtype: Dtype | None,
                 param_dtype: Dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        w_b = int(round(width_out * bottleneck_multiplier))
        g = w_b // group_width
        items: list[tuple[str, nnx.Module]] = [
            ("a", conv_norm_act(width_in, w_b, 1, **kw)),
            ("b", conv_norm_act(w_b, w_b, 3, stride=stride, groups=g, **kw)),
        ]
        if se_ratio and attn is not None:
            extra: dict[str, Any] = {"hidden_channels": int(round(se_ratio * width_in))} if attn == "se_torchvision" else {}
            items.append(("se", make_attn(attn, w_b, **kw, **extra)))
        items.append(("c", conv_norm_act(w_b, width_out, 1, act=None, **kw)))
        super().__init__(items)


class ResBottleneckBlock(nnx.Module):
    """``relu(proj(x) + f(x))`` (``proj`` only when the shape changes)."""

    def __init__(self, width_in: int, width_out: int, stride: int, **kwargs: Any):
        kw = {k: kwargs[k] for k in ("dtype", "param_dtype", "rngs")}
        self.proj = (conv_norm_act(width_in, width_out, 1, stride=stride, act=None, **kw)
                     if (width_in != width_out or stride != 1) else None)
        self.f = BottleneckTransform(width_in, width_out, stride, **kwargs)

    def __call__(self, x: jax.Array) -> jax.Array:
        shortcut = self.proj(x) if self.proj is not None else x
        return jax.nn.relu(shortcut + self.f(x))


class RegNet(nnx.Module):
    """RegNetX / RegNetY with torchvision's parameter names, channels-last input.

    Args:
        arch: a torchvision name (``"regnet_y_800mf"``, ... see :data:`REGNET_CONFIGS`) or ``config=``.
        num_classes, in_chans: head size and input channels; stem_width: 32.
        attn: attention block of RegNetY blocks (default ``"se_torchvision"`` with torchvision's width
            ``round(se_ratio * width_in)``; ``None`` drops it). Ignored for RegNetX (no ``se_ratio``).
        dtype, param_dtype, rngs: as usual.

    Initialisation as torchvision: convs ``N(0, sqrt(2 / fan_out))``, BatchNorm 1/0, ``fc`` ``N(0, 0.01)``.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> model = RegNet("regnet_y_400mf", num_classes=10, rngs=nnx.Rngs(0))
        >>> model.eval()
        >>> model(jnp.ones((1, 64, 64, 3))).shape
        (1, 10)
    """

    def __init__(
        self,
        arch: str = "regnet_y_800mf",
        *,
        num_classes: int = 1000,
        in_chans: int = 3,
        stem_width: int = 32,
        attn: AttnSpec = "se_torchvision",
        config: RegNetConfig | None = None,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if config is None:
            if arch not in REGNET_CONFIGS:
                raise ValueError(f"unknown RegNet arch {arch!r}: expected one of {sorted(REGNET_CONFIGS)}")
            config = REGNET_CONFIGS[arch]
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.stem = conv_norm_act(in_chans, stem_width, 3, stride=2, **kw)
        current = stem_width
        stages = []
        for i, (w_out, stride, depth, g, m) in enumerate(regnet_block_params(config)):
            blocks = []
            for j in range(depth):
                blocks.append((f"block{i + 1}-{j}", ResBottleneckBlock(
                    current if j == 0 else w_out, w_out, stride if j == 0 else 1, group_width=g,
                    bottleneck_multiplier=m, se_ratio=config.se_ratio, attn=attn, **kw)))
            stages.append((f"block{i + 1}", NamedSequential(blocks)))
            current = w_out
        self.trunk_output = NamedSequential(stages)
        self.num_features = current
        self.fc = linear(current, num_classes, kernel_init=normal(0.01), bias_init=zeros, **kw)

    def forward_features(self, x: jax.Array) -> jax.Array:
        check_image(x, self.in_chans, type(self).__name__)
        return self.trunk_output(self.stem(x))

    def forward_head(self, x: jax.Array) -> jax.Array:
        return self.fc(jnp.mean(x, axis=(1, 2)))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.forward_head(self.forward_features(x))


__all__ = ["REGNET_CONFIGS", "RegNet", "RegNetConfig", "regnet_block_params"]
