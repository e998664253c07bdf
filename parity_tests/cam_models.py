"""Small CNNs with SE and CBAM blocks in both frameworks (same parameter names) for the CAM parity tests.

``stem`` (conv + BN + ReLU) -> ``layer1`` (conv/BN/ReLU + SE) -> ``layer2`` (stride 2, + CBAM) ->
``layer3`` (stride 2, + CBAM) -> global average pool -> ``fc`` (classifier), or, with ``seg=True``, a 1x1
conv ``cls`` on ``layer2`` (channels-last/first segmentation logits). Torch: NCHW, ``torch_ref.blocks``;
Flax: NHWC, ``flax_attn.layers`` (with the torch-semantics ``BatchNorm``). Weights are copied with
``flax_attn.convert.torch_to_nnx`` (identity names, layout rules); BatchNorm statistics are randomised.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx
from torch import nn

import torch_ref.blocks as tb
from flax_attn.convert import torch_to_nnx
from flax_attn.layers import CBAM, BatchNorm, SqueezeExcite

WIDTHS = (8, 12, 16)


class TorchBlock(nn.Module):
    def __init__(self, cin, cout, stride, attn):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.attn = tb.SqueezeExcite(cout, reduction=4) if attn == "se" else tb.CBAM(cout, reduction=4,
                                                                                          kernel_size=3)

    def forward(self, x):
        return self.attn(torch.relu(self.bn(self.conv(x))))


class TorchCamNet(nn.Module):
    def __init__(self, num_classes=6, in_chans=3, seg=False):
        super().__init__()
        w1, w2, w3 = WIDTHS
        self.seg = seg
        self.conv1 = nn.Conv2d(in_chans, w1, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w1)
        self.layer1 = TorchBlock(w1, w1, 1, "se")
        self.layer2 = TorchBlock(w1, w2, 2, "cbam")
        if seg:
            self.cls = nn.Conv2d(w2, num_classes, 1)
        else:
            self.layer3 = TorchBlock(w2, w3, 2, "cbam")
            self.fc = nn.Linear(w3, num_classes)

    def forward(self, x):
        x = self.layer2(self.layer1(torch.relu(self.bn1(self.conv1(x)))))
        if self.seg:
            return self.cls(x)
        return self.fc(self.layer3(x).mean((2, 3)))


class FlaxBlock(nnx.Module):
    def __init__(self, cin, cout, stride, attn, *, rngs):
        self.conv = nnx.Conv(cin, cout, (3, 3), strides=stride, padding=((1, 1), (1, 1)), use_bias=False,
                             rngs=rngs)
        self.bn = BatchNorm(cout, rngs=rngs)
        self.attn = (SqueezeExcite(cout, reduction=4, rngs=rngs) if attn == "se"
                     else CBAM(cout, reduction=4, kernel_size=3, rngs=rngs))

    def __call__(self, x):
        return self.attn(jnp.maximum(self.bn(self.conv(x)), 0))


class FlaxCamNet(nnx.Module):
    def __init__(self, num_classes=6, in_chans=3, seg=False, *, rngs):
        w1, w2, w3 = WIDTHS
        self.seg = seg
        self.conv1 = nnx.Conv(in_chans, w1, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, rngs=rngs)
        self.bn1 = BatchNorm(w1, rngs=rngs)
        self.layer1 = FlaxBlock(w1, w1, 1, "se", rngs=rngs)
        self.layer2 = FlaxBlock(w1, w2, 2, "cbam", rngs=rngs)
        if seg:
            self.cls = nnx.Conv(w2, num_classes, (1, 1), rngs=rngs)
        else:
            self.layer3 = FlaxBlock(w2, w3, 2, "cbam", rngs=rngs)
            self.fc = nnx.Linear(w3, num_classes, rngs=rngs)

    def __call__(self, x):
        x = self.layer2(self.layer1(jnp.maximum(self.bn1(self.conv1(x)), 0)))
        if self.seg:
            return self.cls(x)
        return self.fc(self.layer3(x).mean((1, 2)))


def randomize_(model: nn.Module, seed: int) -> nn.Module:
    """Random weights (scaled by 1/sqrt(fan-in), so activations neither vanish nor saturate the attention
    gates) and random BatchNorm affine parameters and statistics (never identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=g) * 1.5 / np.sqrt(p[0].numel()))
            elif name.endswith("bn.weight") or name.endswith("bn1.weight"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model.eval()


def make_pair(seed: int = 0, **kw) -> tuple[TorchCamNet, FlaxCamNet]:
    """A torch model with random weights and the Flax model carrying the same weights (eval mode)."""
    tm = randomize_(TorchCamNet(**kw), seed)
    fm = FlaxCamNet(**kw, rngs=nnx.Rngs(seed))
    torch_to_nnx(fm, tm.state_dict())
    fm.eval()
    return tm, fm


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))
