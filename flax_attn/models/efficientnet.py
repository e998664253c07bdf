"""EfficientNet B0-B7 (Tan & Le, ICML 2019), torchvision-compatible (``torchvision.models.efficientnet``).

Module tree: ``features.0`` stem, ``features.1`` ... ``features.7`` stages of ``MBConv`` blocks
(``features.s.i.block.j``: expand / depthwise / SE / project), ``features.8`` last 1x1 conv,
``classifier.1`` linear. SE: torchvision's ``SqueezeExcitation(C_exp, max(1, C_in // 4), SiLU)`` (the
``se_efficientnet`` preset). Stochastic depth (``"row"`` mode, linearly increasing with the block index) and
classifier dropout act in training mode only. BatchNorm: torch defaults for B0-B4, eps 1e-3 / torch
momentum 0.01 for B5-B7, as torchvision builds them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from flax_attn.layers import make_divisible
from flax_attn.models._common import (
    AttnSpec,
    Dropout,
    Dtype,
    Sequential,
    StochasticDepth,
    check_image,
    conv_norm_act,
    linear,
    make_attn,
    uniform_symmetric,
    zeros,
)


@dataclass(frozen=True)
class MBConvConfig:
    """One stage of the paper's table 1 (torchvision's ``MBConvConfig``), already width/depth scaled."""

    expand_ratio: float
    kernel: int
    stride: int
    input_channels: int
    out_channels: int
    num_layers: int


@dataclass(frozen=True)
class EfficientNetConfig:
    """Scaling coefficients of one EfficientNet variant (torchvision's ``efficientnet_bX`` functions)."""

    width_mult: float
    depth_mult: float
    dropout: float
    bn_eps: float = 1e-5
    bn_momentum: float = 0.9  # Flax convention (torch 0.1)

    def stages(self) -> list[MBConvConfig]:
        adj = lambda c: make_divisible(c * self.width_mult, 8)  # noqa: E731
        depth = lambda n: int(math.ceil(n * self.depth_mult))  # noqa: E731
        base = [(1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2), (6, 3, 2, 40, 80, 3),
                (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4), (6, 3, 1, 192, 320, 1)]
        return [MBConvConfig(e, k, s, adj(i), adj(o), depth(n)) for e, k, s, i, o, n in base]


EFFICIENTNET_CONFIGS: dict[str, EfficientNetConfig] = {
    "efficientnet_b0": EfficientNetConfig(1.0, 1.0, 0.2),
    "efficientnet_b1": EfficientNetConfig(1.0, 1.1, 0.2),
    "efficientnet_b2": EfficientNetConfig(1.1, 1.2, 0.3),
    "efficientnet_b3": EfficientNetConfig(1.2, 1.4, 0.3),
    "efficientnet_b4": EfficientNetConfig(1.4, 1.8, 0.4),
    "efficientnet_b5": EfficientNetConfig(1.6, 2.2, 0.4, bn_eps=1e-3, bn_momentum=0.99),
    "efficientnet_b6": EfficientNetConfig(1.8, 2.6, 0.5, bn_eps=1e-3, bn_momentum=0.99),
    "efficientnet_b7": EfficientNetConfig(2.0, 3.1, 0.5, bn_eps=1e-3, bn_momentum=0.99),
}


class MBConv(nnx.Module):
    """torchvision's ``MBConv``: ``block`` = [expand 1x1], depthwise kxk, SE, project 1x1; residual with
    stochastic depth when the shape is kept."""

    def __init__(self, cnf: MBConvConfig, *, stochastic_depth_prob: float, attn: AttnSpec, bn_eps: float,
                 bn_momentum: float, dtype: Dtype | None, param_dtype: Dtype, rngs: nnx.Rngs):
        if cnf.stride not in (1, 2):
            raise ValueError(f"illegal stride value {cnf.stride}: expected 1 or 2")
        kw = dict(bn_eps=bn_eps, bn_momentum=bn_momentum, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.use_res_connect = cnf.stride == 1 and cnf.input_channels == cnf.out_channels
        expanded = make_divisible(cnf.input_channels * cnf.expand_ratio, 8)
        layers: list[nnx.Module] = []
        if expanded != cnf.input_channels:
            layers.append(conv_norm_act(cnf.input_channels, expanded, 1, act="silu", **kw))
        layers.append(conv_norm_act(expanded, expanded, cnf.kernel, stride=cnf.stride, groups=expanded,
                                    act="silu", **kw))
        if attn is not None:
            extra: dict[str, Any] = {"squeeze_from": cnf.input_channels} if attn == "se_efficientnet" else {}
            layers.append(make_attn(attn, expanded, dtype=dtype, param_dtype=param_dtype, rngs=rngs, **extra))
        layers.append(conv_norm_act(expanded, cnf.out_channels, 1, act=None, **kw))
        self.block = Sequential(layers)
        self.stochastic_depth = StochasticDepth(stochastic_depth_prob, rngs=rngs)
        self.out_channels = cnf.out_channels

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.block(x)
        if self.use_res_connect:
            y = self.stochastic_depth(y) + x
        return y


class EfficientNet(nnx.Module):
    """EfficientNet (B0-B7) with torchvision's parameter names, channels-last input.

    Args:
        arch: ``"efficientnet_b0"`` ... ``"efficientnet_b7"``, or ``config=EfficientNetConfig(...)``.
        num_classes, in_chans: head size and input channels.
        dropout: classifier dropout (default: the variant's); stochastic_depth_prob: 0.2 as torchvision.
            Both act in training mode only and draw from the ``dropout`` (or ``default``) stream of the
            ``rngs`` given here.
        attn: attention block of each MBConv (default ``"se_efficientnet"``; ``None`` drops it).
        dtype, param_dtype, rngs: as usual.

    Named intermediates: ``features`` (the article's Grad-CAM layer), ``features[-1]``.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> model = EfficientNet("efficientnet_b0", num_classes=10, rngs=nnx.Rngs(0))
        >>> model.eval()
        >>> model(jnp.ones((1, 64, 64, 3))).shape
        (1, 10)
    """

    def __init__(
        self,
        arch: str = "efficientnet_b0",
        *,
        num_classes: int = 1000,
        in_chans: int = 3,
        dropout: float | None = None,
        stochastic_depth_prob: float = 0.2,
        attn: AttnSpec = "se_efficientnet",
        config: EfficientNetConfig | None = None,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if config is None:
            if arch not in EFFICIENTNET_CONFIGS:
                raise ValueError(f"unknown EfficientNet arch {arch!r}: expected one of {sorted(EFFICIENTNET_CONFIGS)}")
            config = EFFICIENTNET_CONFIGS[arch]
        dropout = config.dropout if dropout is None else dropout
        stages = config.stages()
        bn: dict[str, Any] = dict(bn_eps=config.bn_eps, bn_momentum=config.bn_momentum)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.num_classes = num_classes
        self.in_chans = in_chans
        layers: list[nnx.Module] = [conv_norm_act(in_chans, stages[0].input_channels, 3, stride=2, act="silu",
                                                  **bn, **kw)]
        total = sum(s.num_layers for s in stages)
        block_id = 0
        for cnf in stages:
            stage = []
            for i in range(cnf.num_layers):
                c = cnf if i == 0 else MBConvConfig(cnf.expand_ratio, cnf.kernel, 1, cnf.out_channels,
                                                    cnf.out_channels, cnf.num_layers)
                sd = stochastic_depth_prob * float(block_id) / total
                stage.append(MBConv(c, stochastic_depth_prob=sd, attn=attn, **bn, **kw))
                block_id += 1
            layers.append(Sequential(stage))
        last_in = stages[-1].out_channels
        last_out = 4 * last_in
        layers.append(conv_norm_act(last_in, last_out, 1, act="silu", **bn, **kw))
        self.features = Sequential(layers)
        self.num_features = last_out
        bound = 1.0 / math.sqrt(num_classes)
        self.classifier = Sequential([
            Dropout(dropout, rngs=rngs),
            linear(last_out, num_classes, kernel_init=uniform_symmetric(bound), bias_init=zeros, **kw),
        ])

    def forward_features(self, x: jax.Array) -> jax.Array:
        check_image(x, self.in_chans, type(self).__name__)
        return self.features(x)

    def forward_head(self, x: jax.Array) -> jax.Array:
        return self.classifier(jnp.mean(x, axis=(1, 2)))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.forward_head(self.forward_features(x))


__all__ = ["EFFICIENTNET_CONFIGS", "EfficientNet", "EfficientNetConfig", "MBConv", "MBConvConfig"]
