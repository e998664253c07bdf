"""A plain PyTorch YOLOv5 (v7.0 architecture: the v6.0 backbone and head), with an attention slot.

Our own code, written from the architecture description (Jocher et al., ultralytics/yolov5 v7.0: the
configs' depth/width multiples, ``Conv`` = Conv2d without bias + BatchNorm2d(eps 1e-3, momentum 0.03) +
SiLU, ``C3``, ``Bottleneck``, ``SPPF``, nearest upsampling, ``Concat``, ``Detect`` with the v6/v7 decoding).
It is not the YOLOv5 package (AGPL), which the parity suite only uses as a test-time reference. The
parameter names are the package's (``model.0.conv.weight`` ... ``model.24.m.2.bias``, buffer
``model.24.anchors``), so a package ``state_dict`` loads here with ``strict=True`` when ``attn`` is None.

The attention slot is that of :class:`flax_attn.models.YOLOv5`: ``attn`` after each backbone C3
(``model.2/4/6/8.attn``, on the C3 output) and/or before SPPF (``model.9.attn``, on its input); blocks by
name from :mod:`torch_ref` (the PyTorch twins of the Flax registry names) or any callable
``attn(channels) -> nn.Module``.

Outputs: ``eval()`` -> decoded predictions ``(B, N, 5 + nc)`` (the package's ``model(x)[0]``);
``train()`` -> list of the three raw maps ``(B, na, ny, nx, 5 + nc)``. Never imports JAX.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from torch_ref.blocks import CBAM, ChannelAttention, SpatialAttention, SqueezeExcite
from torch_ref.official_cbam import CBAM as OfficialCBAM
from torch_ref.se_layer import SELayer

CONFIGS: dict[str, tuple[float, float]] = {
    "yolov5n": (0.33, 0.25),
    "yolov5s": (0.33, 0.50),
    "yolov5m": (0.67, 0.75),
    "yolov5l": (1.0, 1.0),
    "yolov5x": (1.33, 1.25),
}
ANCHORS = ((10, 13, 16, 30, 33, 23), (30, 61, 62, 45, 59, 119), (116, 90, 156, 198, 373, 326))
STRIDES = (8, 16, 32)
BACKBONE_C3_LAYERS = (2, 4, 6, 8)

#: attention names -> torch twins of the Flax registry entries of the same name
ATTENTIONS: dict[str, Callable[..., nn.Module]] = {
    "se": SqueezeExcite,
    "cam": ChannelAttention,
    "channel_attention": ChannelAttention,
    "sam": SpatialAttention,
    "spatial_attention": SpatialAttention,
    "cbam": CBAM,
    "cbam_official": OfficialCBAM,
    "se_classic": SELayer,
}


def make_attn(attn: str | Callable[..., nn.Module] | None, channels: int, **kwargs: Any) -> nn.Module | None:
    """``None`` -> no block; a name of :data:`ATTENTIONS` -> that block; a callable -> ``attn(channels, **kw)``."""
    if attn is None:
        return None
    if isinstance(attn, str):
        if attn not in ATTENTIONS:
            raise ValueError(f"unknown attention {attn!r}: expected one of {sorted(ATTENTIONS)} or a callable")
        return ATTENTIONS[attn](channels, **kwargs)
    if callable(attn):
        return attn(channels, **kwargs)
    raise TypeError(f"attn must be None, a name or a callable, got {type(attn).__name__}")


def make_divisible(x: float, divisor: int = 8) -> int:
    return int(math.ceil(x / divisor) * divisor)


class Conv(nn.Module):
    """Conv2d(bias=False, padding k // 2 unless given) -> BatchNorm2d(eps 1e-3, momentum 0.03) -> SiLU."""

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1, p: int | None = None):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, k // 2 if p is None else p, bias=False)
        self.bn = nn.BatchNorm2d(c2, eps=1e-3, momentum=0.03)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    """1x1 ``cv1`` -> 3x3 ``cv2``, plus the input when ``shortcut`` and the widths agree."""

    def __init__(self, c1: int, c2: int, shortcut: bool = True, e: float = 0.5):
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c_, c2, 3, 1)
        self.add = shortcut and c1 == c2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C3(nn.Module):
    """``cv3(cat(m(cv1(x)), cv2(x)))`` with ``n`` bottlenecks in ``m``; then ``attn`` when given."""

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = True, e: float = 0.5, *,
                 attn: Any = None, attn_kwargs: dict[str, Any] | None = None):
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c1, c_, 1, 1)
        self.cv3 = Conv(2 * c_, c2, 1)
        self.m = nn.Sequential(*(Bottleneck(c_, c_, shortcut, 1.0) for _ in range(n)))
        block = make_attn(attn, c2, **(attn_kwargs or {}))
        if block is not None:
            self.attn = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))
        return self.attn(y) if hasattr(self, "attn") else y


class SPPF(nn.Module):
    """``cv1`` -> 3 chained max pools (k, stride 1, padding k // 2) -> ``cv2`` on the 4 maps; ``attn`` on the input."""

    def __init__(self, c1: int, c2: int, k: int = 5, *, attn: Any = None, attn_kwargs: dict[str, Any] | None = None):
        super().__init__()
        c_ = c1 // 2
        block = make_attn(attn, c1, **(attn_kwargs or {}))
        if block is not None:
            self.attn = block
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c_ * 4, c2, 1, 1)
        self.m = nn.MaxPool2d(kernel_size=k, stride=1, padding=k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "attn"):
            x = self.attn(x)
        x = self.cv1(x)
        y1 = self.m(x)
        y2 = self.m(y1)
        return self.cv2(torch.cat((x, y1, y2, self.m(y2)), 1))


class Concat(nn.Module):
    def forward(self, xs: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.cat(list(xs), 1)


class Detect(nn.Module):
    """1x1 conv ``m.i`` per level; ``anchors`` buffer ``(nl, na, 2)`` in stride units; v6/v7 decoding."""

    def __init__(self, nc: int, ch: Sequence[int], anchors: Sequence[Sequence[float]] = ANCHORS,
                 strides: Sequence[int] = STRIDES):
        super().__init__()
        self.nc, self.no = nc, nc + 5
        self.nl, self.na = len(anchors), len(anchors[0]) // 2
        self.stride = torch.tensor([float(s) for s in strides])
        a = torch.tensor(anchors, dtype=torch.float32).view(self.nl, -1, 2)
        self.register_buffer("anchors", a / self.stride.view(-1, 1, 1))
        self.m = nn.ModuleList(nn.Conv2d(c, self.no * self.na, 1) for c in ch)
        with torch.no_grad():  # objectness and class priors (8 objects per 640 image; p = 0.6 / nc)
            for conv, s in zip(self.m, strides):
                b = conv.bias.view(self.na, -1)
                b[:, 4] += math.log(8 / (640 / s) ** 2)
                b[:, 5:] += math.log(0.6 / (nc - 0.99999))

    def forward(self, xs: Sequence[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        raw, out = [], []
        for i in range(self.nl):
            y = self.m[i](xs[i])
            bs, _, ny, nx = y.shape
            y = y.view(bs, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2).contiguous()
            raw.append(y)
            if not self.training:
                gy, gx = torch.meshgrid(torch.arange(ny, dtype=y.dtype), torch.arange(nx, dtype=y.dtype),
                                        indexing="ij")
                grid = torch.stack((gx, gy), 2) - 0.5
                stride = float(self.stride[i])
                anchor_grid = (self.anchors[i].to(y.dtype) * stride).view(1, self.na, 1, 1, 2)
                s = y.sigmoid()
                xy = (s[..., :2] * 2 + grid) * stride
                wh = (s[..., 2:4] * 2) ** 2 * anchor_grid
                out.append(torch.cat((xy, wh, s[..., 4:]), -1).view(bs, -1, self.no))
        return raw if self.training else torch.cat(out, 1)


class YOLOv5(nn.Module):
    """YOLOv5 v7.0 ``variant`` ("yolov5n" .. "yolov5x") with ``num_classes`` classes; ``attn`` slot (see the
    module docstring), ``attn_positions``: ``"c3"``, ``"sppf"`` or indices from ``(2, 4, 6, 8, 9)``.

    Example:
        >>> m = YOLOv5("yolov5n", num_classes=3).eval()
        >>> m(torch.rand(1, 3, 64, 96)).shape
        torch.Size([1, 378, 8])
    """

    FROM = (-1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, (-1, 6), -1, -1, -1, (-1, 4), -1, -1, (-1, 14),
            -1, -1, (-1, 10), -1, (17, 20, 23))
    SAVE = frozenset({4, 6, 10, 14, 17, 20, 23})

    def __init__(self, variant: str = "yolov5s", num_classes: int = 80, in_chans: int = 3, *,
                 anchors: Sequence[Sequence[float]] = ANCHORS, attn: Any = None,
                 attn_positions: Sequence[str | int] | str | None = None, attn_kwargs: dict[str, Any] | None = None):
        super().__init__()
        if variant not in CONFIGS:
            raise ValueError(f"unknown variant {variant!r}: expected one of {sorted(CONFIGS)}")
        gd, gw = CONFIGS[variant]
        where: set[int] = set()
        if attn is not None:
            positions = ("c3",) if attn_positions is None else attn_positions
            for p in (positions,) if isinstance(positions, (str, int)) else positions:
                if p == "c3":
                    where.update(BACKBONE_C3_LAYERS)
                elif p == "sppf":
                    where.add(9)
                elif p in BACKBONE_C3_LAYERS + (9,):
                    where.add(int(p))
                else:
                    raise ValueError(f"attn_positions: unknown position {p!r}")

        def ch(c: int) -> int:
            return make_divisible(c * gw, 8)

        def n(k: int) -> int:
            return max(round(k * gd), 1) if k > 1 else k

        def a(i: int) -> dict[str, Any]:
            return dict(attn=attn, attn_kwargs=attn_kwargs) if i in where else {}

        c64, c128, c256, c512, c1024 = ch(64), ch(128), ch(256), ch(512), ch(1024)
        up = nn.Upsample(scale_factor=2, mode="nearest")
        self.model = nn.Sequential(
            Conv(in_chans, c64, 6, 2, 2), Conv(c64, c128, 3, 2), C3(c128, c128, n(3), **a(2)),
            Conv(c128, c256, 3, 2), C3(c256, c256, n(6), **a(4)),
            Conv(c256, c512, 3, 2), C3(c512, c512, n(9), **a(6)),
            Conv(c512, c1024, 3, 2), C3(c1024, c1024, n(3), **a(8)), SPPF(c1024, c1024, 5, **a(9)),
            Conv(c1024, c512, 1, 1), up, Concat(), C3(c512 * 2, c512, n(3), False),
            Conv(c512, c256, 1, 1), nn.Upsample(scale_factor=2, mode="nearest"), Concat(),
            C3(c256 * 2, c256, n(3), False),
            Conv(c256, c256, 3, 2), Concat(), C3(c256 * 2, c512, n(3), False),
            Conv(c512, c512, 3, 2), Concat(), C3(c512 * 2, c1024, n(3), False),
            Detect(num_classes, (c256, c512, c1024), anchors),
        )
        self.attn_layers = tuple(sorted(where))

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        saved: dict[int, torch.Tensor] = {}
        for i, layer in enumerate(self.model):
            f = self.FROM[i]
            x = layer([x if j == -1 else saved[j] for j in f] if isinstance(f, tuple) else x)
            if i in self.SAVE:
                saved[i] = x
        return x


__all__ = ["ANCHORS", "ATTENTIONS", "C3", "CONFIGS", "Concat", "Conv", "Detect", "SPPF", "YOLOv5", "make_attn"]
