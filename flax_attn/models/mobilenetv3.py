"""MobileNetV3 (Howard et al., ICCV 2019), torchvision-compatible: ``mobilenet_v3_large``, ``mobilenet_v3_small``.

Module tree as ``torchvision.models.mobilenetv3``: ``features.0`` stem (``0`` conv, ``1`` BN, ``2`` act),
``features.i.block.j`` inverted residuals (expand / depthwise / SE / project), ``features.-1`` last 1x1
conv, ``classifier.0`` / ``classifier.3`` linears. SE: torchvision's ``SqueezeExcitation`` with a
hard-sigmoid gate and width ``make_divisible(C // 4, 8)`` (the ``se_mobilenetv3`` preset). BatchNorm: eps 1e-3,
torch momentum 0.01 (Flax 0.99).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import nnx

from flax_attn.layers import make_divisible
from flax_attn.models._common import (
    AttnSpec,
    Dropout,
    Dtype,
    Sequential,
    act_module,
    check_image,
    conv_norm_act,
    linear,
    make_attn,
    normal,
    zeros,
)


@dataclass(frozen=True)
class InvertedResidualConfig:
    """One row of the paper's tables 1/2 (torchvision's ``InvertedResidualConfig``), widths before ``width_mult``."""

    input_channels: int
    kernel: int
    expanded_channels: int
    out_channels: int
    use_se: bool
    activation: Literal["RE", "HS"]
    stride: int
    dilation: int = 1

    def scaled(self, width_mult: float) -> InvertedResidualConfig:
        adj = lambda c: make_divisible(c * width_mult, 8)  # noqa: E731
        return InvertedResidualConfig(adj(self.input_channels), self.kernel, adj(self.expanded_channels),
                                      adj(self.out_channels), self.use_se, self.activation, self.stride,
                                      self.dilation)


def mobilenet_v3_config(arch: str, *, reduced_tail: bool = False,
                        dilated: bool = False) -> tuple[list[InvertedResidualConfig], int]:
    """torchvision's ``_mobilenet_v3_conf``: (block rows, last_channel before width scaling)."""
    rd = 2 if reduced_tail else 1
    d = 2 if dilated else 1
    c = InvertedResidualConfig
    if arch == "mobilenet_v3_large":
        rows = [
            c(16, 3, 16, 16, False, "RE", 1), c(16, 3, 64, 24, False, "RE", 2), c(24, 3, 72, 24, False, "RE", 1),
            c(24, 5, 72, 40, True, "RE", 2), c(40, 5, 120, 40, True, "RE", 1), c(40, 5, 120, 40, True, "RE", 1),
            c(40, 3, 240, 80, False, "HS", 2), c(80, 3, 200, 80, False, "HS", 1),
            c(80, 3, 184, 80, False, "HS", 1), c(80, 3, 184, 80, False, "HS", 1),
            c(80, 3, 480, 112, True, "HS", 1), c(112, 3, 672, 112, True, "HS", 1),
            c(112, 5, 672, 160 // rd, True, "HS", 2, d),
            c(160 // rd, 5, 960 // rd, 160 // rd, True, "HS", 1, d),
            c(160 // rd, 5, 960 // rd, 160 // rd, True, "HS", 1, d),
        ]
        return rows, 1280 // rd
    if arch == "mobilenet_v3_small":
        rows = [
            c(16, 3, 16, 16, True, "RE", 2), c(16, 3, 72, 24, False, "RE", 2), c(24, 3, 88, 24, False, "RE", 1),
            c(24, 5, 96, 40, True, "HS", 2), c(40, 5, 240, 40, True, "HS", 1), c(40, 5, 240, 40, True, "HS", 1),
            c(40, 5, 120, 48, True, "HS", 1), c(48, 5, 144, 48, True, "HS", 1),
            c(48, 5, 288, 96 // rd, True, "HS", 2, d),
            c(96 // rd, 5, 576 // rd, 96 // rd, True, "HS", 1, d),
            c(96 // rd, 5, 576 // rd, 96 // rd, True, "HS", 1, d),
        ]
        return rows, 1024 // rd
    raise ValueError(f"unknown MobileNetV3 arch {arch!r}: expected 'mobilenet_v3_large' or 'mobilenet_v3_small'")


class InvertedResidual(nnx.Module):
    """torchvision's MobileNetV3 ``InvertedResidual``: ``block`` = [expand], depthwise, [SE], project."""

    def __init__(self, cnf: InvertedResidualConfig, *, attn: AttnSpec = "se_mobilenetv3", bn_momentum: float,
                 bn_eps: float, dtype: Dtype | None, param_dtype: Dtype, rngs: nnx.Rngs):
        if cnf.stride not in (1, 2):
            raise ValueError(f"illegal stride value {cnf.stride}: expected 1 or 2")
        kw = dict(bn_momentum=bn_momentum, bn_eps=bn_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.use_res_connect = cnf.stride == 1 and cnf.input_channels == cnf.out_channels
        act = "hard_swish" if cnf.activation == "HS" else "relu"
        layers: list[nnx.Module] = []
        if cnf.expanded_channels != cnf.input_channels:
            layers.append(conv_norm_act(cnf.input_channels, cnf.expanded_channels, 1, act=act, **kw))
        stride = 1 if cnf.dilation > 1 else cnf.stride
        layers.append(conv_norm_act(cnf.expanded_channels, cnf.expanded_channels, cnf.kernel, stride=stride,
                                    dilation=cnf.dilation, groups=cnf.expanded_channels, act=act, **kw))
        if cnf.use_se and attn is not None:
            layers.append(make_attn(attn, cnf.expanded_channels, dtype=dtype, param_dtype=param_dtype, rngs=rngs))
        layers.append(conv_norm_act(cnf.expanded_channels, cnf.out_channels, 1, act=None, **kw))
        self.block = Sequential(layers)
        self.out_channels = cnf.out_channels

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.block(x)
        return y + x if self.use_res_connect else y


class MobileNetV3(nnx.Module):
    """MobileNetV3 with torchvision's parameter names, channels-last input.

    Args:
        arch: ``"mobilenet_v3_large"`` or ``"mobilenet_v3_small"`` (or pass ``config=(rows, last_channel)``).
        num_classes, in_chans: head size and input channels.
        width_mult, reduced_tail, dilated: torchvision's options.
        dropout: classifier dropout (train mode only; randomness from ``rngs``' ``dropout``/``default``
            stream, or ``rngs=`` passed at call time is not supported: build with the rngs you want).
        attn: the attention block of SE rows (default ``"se_mobilenetv3"``: torchvision's; ``None`` drops SE).
        dtype, param_dtype, rngs: as usual.

    Named intermediates: ``features`` (``features[-1]`` is the last conv, the article's Grad-CAM layer).

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> model = MobileNetV3("mobilenet_v3_small", num_classes=10, rngs=nnx.Rngs(0))
        >>> model.eval()
        >>> model(jnp.ones((1, 64, 64, 3))).shape
        (1, 10)
    """

    def __init__(
        self,
        arch: str = "mobilenet_v3_large",
        *,
        num_classes: int = 1000,
        in_chans: int = 3,
        width_mult: float = 1.0,
        reduced_tail: bool = False,
        dilated: bool = False,
        dropout: float = 0.2,
        attn: AttnSpec = "se_mobilenetv3",
        config: tuple[list[InvertedResidualConfig], int] | None = None,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        rows, last_channel = config if config is not None else mobilenet_v3_config(
            arch, reduced_tail=reduced_tail, dilated=dilated)
        rows = [r.scaled(width_mult) for r in rows]
        last_channel = make_divisible(last_channel * width_mult, 8)
        bn: dict[str, Any] = dict(bn_momentum=0.99, bn_eps=1e-3)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.num_classes = num_classes
        self.in_chans = in_chans
        layers: list[nnx.Module] = [conv_norm_act(in_chans, rows[0].input_channels, 3, stride=2,
                                                  act="hard_swish", **bn, **kw)]
        for cnf in rows:
            layers.append(InvertedResidual(cnf, attn=attn, **bn, **kw))
        last_in = rows[-1].out_channels
        last_out = 6 * last_in
        layers.append(conv_norm_act(last_in, last_out, 1, act="hard_swish", **bn, **kw))
        self.features = Sequential(layers)
        self.num_features = last_out
        lin = dict(kernel_init=normal(0.01), bias_init=zeros, **kw)
        self.classifier = Sequential([
            linear(last_out, last_channel, **lin),
            act_module("hard_swish"),
            Dropout(dropout, rngs=rngs),
            linear(last_channel, num_classes, **lin),
        ])

    def forward_features(self, x: jax.Array) -> jax.Array:
        check_image(x, self.in_chans, type(self).__name__)
        return self.features(x)

    def forward_head(self, x: jax.Array) -> jax.Array:
        return self.classifier(jnp.mean(x, axis=(1, 2)))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.forward_head(self.forward_features(x))


__all__ = ["InvertedResidual", "InvertedResidualConfig", "MobileNetV3", "mobilenet_v3_config"]
