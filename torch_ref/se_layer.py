"""The Squeeze-and-Excitation layer of the source article, as printed there (PyTorch, NCHW, 2-D only).

Hu et al., "Squeeze-and-Excitation Networks", CVPR 2018. The article's ``SELayer`` is the widely copied
``moskomule/senet.pytorch`` layer: global average pool, a bias-free bottleneck MLP held in an
``nn.Sequential`` called ``fc`` (``fc.0`` and ``fc.2`` are the two ``nn.Linear``), a sigmoid, and a
channel-wise rescale of the input. Its Flax twin is ``flax_attn.create_attn("se_classic", C)``.

Note (kept from the article): ``channel // reduction`` is 0 for ``channel < reduction``; PyTorch then
builds zero-width Linear layers and the gate is a constant ``sigmoid(0) = 0.5``. The Flax preset keeps a
width of at least 1 instead, so compare the two only for ``channel >= reduction``.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["SELayer"]


class SELayer(nn.Module):
    """``y = x * sigmoid(W2 relu(W1 avgpool(x)))`` with bias-free ``W1: C -> C // r``, ``W2: C // r -> C``.

    Example:
        >>> import torch
        >>> SELayer(64)(torch.randn(2, 64, 7, 9)).shape
        torch.Size([2, 64, 7, 9])
    """

    def __init__(self, channel: int, reduction: int = 16):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(
            nn.Linear(channel, channel // reduction, bias=False),
            nn.ReLU(inplace=True),
            nn.Linear(channel // reduction, channel, bias=False),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, _, _ = x.size()
        y = self.avg_pool(x).view(b, c)
        y = self.fc(y).view(b, c, 1, 1)
        return x * y.expand_as(x)
