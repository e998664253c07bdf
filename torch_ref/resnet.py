"""SE-ResNet and CBAM-ResNet in PyTorch: torchvision ResNets with the attention block inserted.

* SE-ResNet: the source article's ``SELayer`` (:mod:`torch_ref.se_layer`) as ``layerX.Y.se``;
* CBAM-ResNet: the official CBAM (:mod:`torch_ref.official_cbam`, Jongchan/attention-module) as
  ``layerX.Y.cbam`` (the official code's module name).

Both sit after the last BatchNorm of the residual branch, before the addition (BasicBlock: after ``bn2``,
Bottleneck: after ``bn3``), as in the papers and the official code. Everything else is torchvision's ResNet
(module names, ResNet v1.5 stride placement, initialisation), so ``torchvision.models.resnet50()`` weights
load into ``cbam_resnet50()`` with ``strict=False`` and only the attention keys missing.

Initialisation: torchvision's, plus the official CBAM code's one deviation that concerns the block: the
spatial gate's BatchNorm weight starts at 0 (``if 'SpatialGate' in key: ... = 0``).

The ground truth for :mod:`flax_attn.models.resnet` in the parity suite. Never imports JAX.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchvision.models import resnet as tv_resnet

from torch_ref.official_cbam import CBAM
from torch_ref.se_layer import SELayer

ATTENTIONS = ("se", "cbam")
DEPTHS: dict[int, tuple[type, list[int]]] = {
    18: (tv_resnet.BasicBlock, [2, 2, 2, 2]),
    34: (tv_resnet.BasicBlock, [3, 4, 6, 3]),
    50: (tv_resnet.Bottleneck, [3, 4, 6, 3]),
    101: (tv_resnet.Bottleneck, [3, 4, 23, 3]),
    152: (tv_resnet.Bottleneck, [3, 8, 36, 3]),
}


def _make_attn(kind: str, channels: int, reduction: int) -> nn.Module:
    if kind == "se":
        return SELayer(channels, reduction)
    if kind == "cbam":
        return CBAM(channels, reduction)
    raise ValueError(f"unknown attention {kind!r}: expected one of {ATTENTIONS}")


class _AttnMixin:
    attn_kind: str

    def _attn(self, out: torch.Tensor) -> torch.Tensor:
        return getattr(self, self.attn_kind)(out)


class AttnBasicBlock(tv_resnet.BasicBlock):
    """torchvision ``BasicBlock`` + attention after ``bn2``."""

    def __init__(self, *args: Any, attn: str, reduction: int = 16, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.attn_kind = attn
        self.add_module(attn, _make_attn(attn, self.bn2.num_features, reduction))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = getattr(self, self.attn_kind)(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


class AttnBottleneck(tv_resnet.Bottleneck):
    """torchvision ``Bottleneck`` + attention after ``bn3``."""

    def __init__(self, *args: Any, attn: str, reduction: int = 16, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.attn_kind = attn
        self.add_module(attn, _make_attn(attn, self.bn3.num_features, reduction))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out = getattr(self, self.attn_kind)(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


def attn_resnet(depth: int, attn: str, *, num_classes: int = 1000, reduction: int = 16,
                zero_init_residual: bool = False, in_chans: int = 3) -> tv_resnet.ResNet:
    """A torchvision ResNet-``depth`` whose residual blocks carry ``attn`` (``"se"`` or ``"cbam"``).

    Example:
        >>> model = attn_resnet(18, "cbam", num_classes=10)
        >>> model(torch.randn(2, 3, 64, 64)).shape
        torch.Size([2, 10])
    """
    if depth not in DEPTHS:
        raise ValueError(f"unknown ResNet depth {depth}: expected one of {sorted(DEPTHS)}")
    if attn not in ATTENTIONS:
        raise ValueError(f"unknown attention {attn!r}: expected one of {ATTENTIONS}")
    base, layers = DEPTHS[depth]
    block = AttnBasicBlock if base is tv_resnet.BasicBlock else AttnBottleneck

    class _Block(block):  # torchvision calls block(inplanes, planes, stride, downsample, groups, ...)
        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, attn=attn, reduction=reduction, **kwargs)

    _Block.__name__ = block.__name__
    model = tv_resnet.ResNet(_Block, layers, num_classes=num_classes, zero_init_residual=zero_init_residual)
    if in_chans != 3:
        model.conv1 = nn.Conv2d(in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    if attn == "cbam":  # the official code's init of the spatial gate's BatchNorm
        for name, param in model.named_parameters():
            if "SpatialGate" in name and name.endswith("bn.weight"):
                with torch.no_grad():
                    param.zero_()
    return model


def se_resnet18(**kwargs: Any) -> tv_resnet.ResNet:
    return attn_resnet(18, "se", **kwargs)


def se_resnet34(**kwargs: Any) -> tv_resnet.ResNet:
    return attn_resnet(34, "se", **kwargs)


def se_resnet50(**kwargs: Any) -> tv_resnet.ResNet:
    return attn_resnet(50, "se", **kwargs)


def se_resnet101(**kwargs: Any) -> tv_resnet.ResNet:
    return attn_resnet(101, "se", **kwargs)


def se_resnet152(**kwargs: Any) -> tv_resnet.ResNet:
    return attn_resnet(152, "se", **kwargs)


def cbam_resnet18(**kwargs: Any) -> tv_resnet.ResNet:
    return attn_resnet(18, "cbam", **kwargs)


def cbam_resnet34(**kwargs: Any) -> tv_resnet.ResNet:
    return attn_resnet(34, "cbam", **kwargs)


def cbam_resnet50(**kwargs: Any) -> tv_resnet.ResNet:
    return attn_resnet(50, "cbam", **kwargs)


def cbam_resnet101(**kwargs: Any) -> tv_resnet.ResNet:
    return attn_resnet(101, "cbam", **kwargs)


def cbam_resnet152(**kwargs: Any) -> tv_resnet.ResNet:
    return attn_resnet(152, "cbam", **kwargs)


__all__ = [
    "AttnBasicBlock", "AttnBottleneck", "attn_resnet",
    "se_resnet18", "se_resnet34", "se_resnet50", "se_resnet101", "se_resnet152",
    "cbam_resnet18", "cbam_resnet34", "cbam_resnet50", "cbam_resnet101", "cbam_resnet152",
]
