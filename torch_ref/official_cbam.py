"""The official CBAM code (Jongchan Park et al., github.com/Jongchan/attention-module, ``MODELS/cbam.py``).

Woo, Park, Lee, Kweon, "CBAM: Convolutional Block Attention Module", ECCV 2018.

Reproduced with the same classes, attribute names and arithmetic as the authors' file, so that its
``state_dict`` keys (``ChannelGate.mlp.1.weight``, ``SpatialGate.spatial.conv.weight``,
``SpatialGate.spatial.bn.running_var`` ...) are those of checkpoints trained with that code:

* ``ChannelGate``: every pool in ``pool_types`` (``avg``/``max``/``lp``/``lse``) squeezes the map to
  ``(N, C)``; a shared MLP ``Flatten -> Linear(C, C // r) -> ReLU -> Linear(C // r, C)`` (with biases)
  maps each; the raw outputs are summed (so ``mlp.3.bias`` counts once per pool) and gated by a sigmoid.
  ``max`` is ``F.max_pool2d`` and ``lp`` is ``F.lp_pool2d(x, 2, (H, W))`` over the whole map; ``lse`` is
  ``logsumexp_2d``, the max-shifted log-sum-exp below.
* ``SpatialGate``: ``ChannelPool`` concatenates ``[max over C, mean over C]`` (max first, unlike the
  paper's ``[AvgPool; MaxPool]``), then ``BasicConv(2, 1, 7, padding=3, relu=False)`` = a bias-free 7x7
  conv + ``BatchNorm2d(1, eps=1e-5, momentum=0.01)``, then a sigmoid.
* ``CBAM``: channel gate, then (unless ``no_spatial``) spatial gate.

The only departure from the authors' text: ``torch.sigmoid`` instead of the deprecated alias
``F.sigmoid`` (the same function). Its Flax twin is ``flax_attn.create_attn("cbam_official", C)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BasicConv", "CBAM", "ChannelGate", "ChannelPool", "Flatten", "SpatialGate", "logsumexp_2d"]


class BasicConv(nn.Module):
    """Conv2d (no bias by default) -> optional BatchNorm2d(eps=1e-5, momentum=0.01) -> optional ReLU."""

    def __init__(self, in_planes: int, out_planes: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 dilation: int = 1, groups: int = 1, relu: bool = True, bn: bool = True, bias: bool = False):
        super().__init__()
        self.out_channels = out_planes
        self.conv = nn.Conv2d(in_planes, out_planes, kernel_size=kernel_size, stride=stride, padding=padding,
                              dilation=dilation, groups=groups, bias=bias)
        self.bn = nn.BatchNorm2d(out_planes, eps=1e-5, momentum=0.01, affine=True) if bn else None
        self.relu = nn.ReLU() if relu else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        if self.relu is not None:
            x = self.relu(x)
        return x


class Flatten(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.size(0), -1)


def logsumexp_2d(tensor: torch.Tensor) -> torch.Tensor:
    """Log-sum-exp over the spatial positions of each channel: ``(N, C, H, W) -> (N, C, 1)``."""
    tensor_flatten = tensor.view(tensor.size(0), tensor.size(1), -1)
    s, _ = torch.max(tensor_flatten, dim=2, keepdim=True)
    return s + (tensor_flatten - s).exp().sum(dim=2, keepdim=True).log()


class ChannelGate(nn.Module):
    """CBAM's channel attention as in the official code (see the module docstring)."""

    def __init__(self, gate_channels: int, reduction_ratio: int = 16, pool_types=("avg", "max")):
        super().__init__()
        self.gate_channels = gate_channels
        self.mlp = nn.Sequential(
            Flatten(),
            nn.Linear(gate_channels, gate_channels // reduction_ratio),
            nn.ReLU(),
            nn.Linear(gate_channels // reduction_ratio, gate_channels),
        )
        self.pool_types = list(pool_types)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channel_att_sum = None
        window = (x.size(2), x.size(3))
        for pool_type in self.pool_types:
            if pool_type == "avg":
                channel_att_raw = self.mlp(F.avg_pool2d(x, window, stride=window))
            elif pool_type == "max":
                channel_att_raw = self.mlp(F.max_pool2d(x, window, stride=window))
            elif pool_type == "lp":
                channel_att_raw = self.mlp(F.lp_pool2d(x, 2, window, stride=window))
            elif pool_type == "lse":
                channel_att_raw = self.mlp(logsumexp_2d(x))
            else:  # the authors' code has no else branch (a NameError or a stale value); fail clearly instead
                raise ValueError(f"unknown pool type {pool_type!r}: expected 'avg', 'max', 'lp' or 'lse'")
            channel_att_sum = channel_att_raw if channel_att_sum is None else channel_att_sum + channel_att_raw
        scale = torch.sigmoid(channel_att_sum).unsqueeze(2).unsqueeze(3).expand_as(x)
        return x * scale


class ChannelPool(nn.Module):
    """``[max over channels, mean over channels]``: ``(N, C, H, W) -> (N, 2, H, W)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((torch.max(x, 1)[0].unsqueeze(1), torch.mean(x, 1).unsqueeze(1)), dim=1)


class SpatialGate(nn.Module):
    """CBAM's spatial attention as in the official code: ChannelPool -> 7x7 conv + BN -> sigmoid."""

    def __init__(self):
        super().__init__()
        kernel_size = 7
        self.compress = ChannelPool()
        self.spatial = BasicConv(2, 1, kernel_size, stride=1, padding=(kernel_size - 1) // 2, relu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_out = self.spatial(self.compress(x))
        scale = torch.sigmoid(x_out)  # broadcast over channels
        return x * scale


class CBAM(nn.Module):
    """The official CBAM block: ``ChannelGate`` then (unless ``no_spatial``) ``SpatialGate``.

    Example:
        >>> import torch
        >>> CBAM(64)(torch.randn(2, 64, 7, 9)).shape
        torch.Size([2, 64, 7, 9])
    """

    def __init__(self, gate_channels: int, reduction_ratio: int = 16, pool_types=("avg", "max"),
                 no_spatial: bool = False):
        super().__init__()
        self.ChannelGate = ChannelGate(gate_channels, reduction_ratio, pool_types)
        self.no_spatial = no_spatial
        if not no_spatial:
            self.SpatialGate = SpatialGate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_out = self.ChannelGate(x)
        if not self.no_spatial:
            x_out = self.SpatialGate(x_out)
        return x_out
