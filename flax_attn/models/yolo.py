"""YOLOv5 (v7.0: the v6.0 backbone and head) in NNX, channels-last, with an optional attention slot.

Architecture (Jocher et al., ultralytics/yolov5 v7.0 ``models/yolov5{n,s,m,l,x}.yaml``), written from its
description: ``Conv`` = Conv2d without bias + BatchNorm (eps 1e-3, torch momentum 0.03) + SiLU; ``C3`` = CSP
block with ``n`` bottlenecks; ``SPPF`` = three chained 5x5 max pools (stride 1, padding 2); nearest x2
upsampling; channel concatenation; ``Detect`` = one 1x1 conv per level (strides 8 / 16 / 32) and the v6/v7
box decoding ``xy = (2 sigmoid - 0.5 + grid) * stride``, ``wh = (2 sigmoid)^2 * anchor``.

Module paths are the PyTorch ones: ``model.0`` ... ``model.24`` (``model.23`` is the last C3, ``model.24``
the Detect head with ``model.24.m.0`` .. ``model.24.m.2``), so a YOLOv5 ``state_dict`` maps onto the Flax
variables name for name (:func:`flax_attn.convert.from_yolov5`) and CAM target paths read as in PyTorch
(``target_layers=["model.23"]`` is the article's ``model.model[-2]``).

Modes: ``model.eval()`` returns the decoded predictions ``(B, N, 5 + nc)`` (``N = 3 * sum(H_i * W_i)``,
columns ``x, y, w, h`` in input pixels, objectness, class probabilities; all sigmoid-activated), exactly the
PyTorch model's ``model(x)[0]``; ``model.train()`` returns the three raw per-level maps
``(B, 3, H / s, W / s, 5 + nc)`` for ``s = 8, 16, 32`` (the PyTorch training output, what a loss needs).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flax_attn.layers.norm import BatchNorm
from flax_attn.models._common import (
    Dtype,
    MaxPool2d,
    Sequential,
    make_attn,
    torch_default_kernel,
    uniform_symmetric,
)

#: ``name -> (depth_multiple, width_multiple)`` of the official configs
YOLOV5_CONFIGS: dict[str, tuple[float, float]] = {
    "yolov5n": (0.33, 0.25),
    "yolov5s": (0.33, 0.50),
    "yolov5m": (0.67, 0.75),
    "yolov5l": (1.0, 1.0),
    "yolov5x": (1.33, 1.25),
}
#: default anchors in pixels, ``(w, h)`` pairs per level (P3/8, P4/16, P5/32)
YOLOV5_ANCHORS: tuple[tuple[float, ...], ...] = (
    (10, 13, 16, 30, 33, 23),
    (30, 61, 62, 45, 59, 119),
    (116, 90, 156, 198, 373, 326),
)
YOLOV5_STRIDES: tuple[int, int, int] = (8, 16, 32)
#: layer indices where ``attn_positions=("c3",)`` puts a block (the backbone C3s: after P2, P3, P4, P5)
BACKBONE_C3_LAYERS: tuple[int, ...] = (2, 4, 6, 8)
ATTN_POSITIONS: tuple[str, ...] = ("c3", "sppf")

BN_EPS = 1e-3
BN_MOMENTUM = 0.97  # torch momentum 0.03


class Buffer(nnx.BatchStat):
    """A non-trained tensor kept in the state dict (a torch ``register_buffer``), e.g. Detect's ``anchors``.

    A :class:`flax.nnx.BatchStat` subclass, so conversion and ``nnx.state(model, nnx.BatchStat)`` carry it,
    while optimisers over ``nnx.Param`` leave it alone.
    """


def _make_divisible(x: float, divisor: int = 8) -> int:
    return int(math.ceil(x / divisor) * divisor)


def _depth(n: int, gd: float) -> int:
    return max(round(n * gd), 1) if n > 1 else n


class Conv(nnx.Module):
    """YOLOv5 ``Conv``: ``conv`` (Conv2d, no bias, padding ``k // 2`` unless given) -> ``bn`` -> SiLU.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> Conv(3, 8, 3, 2, rngs=nnx.Rngs(0))(jnp.ones((1, 8, 8, 3))).shape
        (1, 4, 4, 8)
    """

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1, p: int | None = None, *,
                 dtype: Dtype | None = None, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        p = k // 2 if p is None else p
        self.conv = nnx.Conv(c1, c2, (k, k), strides=(s, s), padding=((p, p), (p, p)), use_bias=False,
                             kernel_init=torch_default_kernel, dtype=dtype, param_dtype=param_dtype,
                             precision=None, rngs=rngs)
        self.bn = BatchNorm(c2, momentum=BN_MOMENTUM, epsilon=BN_EPS, dtype=dtype, param_dtype=param_dtype,
                            rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.silu(self.bn(self.conv(x)))


class C3Bottleneck(nnx.Module):
    """YOLOv5 ``Bottleneck``: ``cv1`` (1x1) -> ``cv2`` (3x3), plus the input when ``shortcut`` and c1 == c2."""

    def __init__(self, c1: int, c2: int, shortcut: bool = True, e: float = 0.5, *, dtype: Dtype | None = None,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        c_ = int(c2 * e)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.cv1 = Conv(c1, c_, 1, 1, **kw)
        self.cv2 = Conv(c_, c2, 3, 1, **kw)
        self.add = shortcut and c1 == c2

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C3(nnx.Module):
    """YOLOv5 ``C3`` (CSP bottleneck, 3 convs): ``cv3(concat(m(cv1(x)), cv2(x)))``, then ``attn`` if any.

    ``attn`` (a block of :func:`flax_attn.create_attn`, or ``None``) is the attention slot after the block;
    its variables live at ``<path>.attn``.
    """

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = True, e: float = 0.5, *,
                 attn: Any = None, attn_kwargs: dict[str, Any] | None = None, dtype: Dtype | None = None,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        c_ = int(c2 * e)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.cv1 = Conv(c1, c_, 1, 1, **kw)
        self.cv2 = Conv(c1, c_, 1, 1, **kw)
        self.cv3 = Conv(2 * c_, c2, 1, 1, **kw)
        self.m = Sequential([C3Bottleneck(c_, c_, shortcut, 1.0, **kw) for _ in range(n)])
        self.attn = make_attn(attn, c2, dtype=dtype, param_dtype=param_dtype, rngs=rngs, **(attn_kwargs or {}))

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.cv3(jnp.concatenate([self.m(self.cv1(x)), self.cv2(x)], axis=-1))
        return y if self.attn is None else self.attn(y)


class SPPF(nnx.Module):
    """YOLOv5 ``SPPF``: ``cv1`` -> three chained ``k x k`` max pools (stride 1, padding ``k // 2``) ->
    ``cv2`` over the concatenation of the four maps. ``attn`` (optional) runs on the *input*, before ``cv1``
    (the "attention before SPPF" variant); its variables live at ``<path>.attn``."""

    def __init__(self, c1: int, c2: int, k: int = 5, *, attn: Any = None, attn_kwargs: dict[str, Any] | None = None,
                 dtype: Dtype | None = None, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        c_ = c1 // 2
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.attn = make_attn(attn, c1, dtype=dtype, param_dtype=param_dtype, rngs=rngs, **(attn_kwargs or {}))
        self.cv1 = Conv(c1, c_, 1, 1, **kw)
        self.cv2 = Conv(c_ * 4, c2, 1, 1, **kw)
        self.m = MaxPool2d(k, 1, k // 2)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.attn is not None:
            x = self.attn(x)
        x = self.cv1(x)
        y1 = self.m(x)
        y2 = self.m(y1)
        return self.cv2(jnp.concatenate([x, y1, y2, self.m(y2)], axis=-1))


class Upsample(nnx.Module):
    """``nn.Upsample(scale_factor=2, mode="nearest")`` on NHWC."""

    def __init__(self, scale_factor: int = 2):
        self.scale_factor = scale_factor

    def __call__(self, x: jax.Array) -> jax.Array:
        s = self.scale_factor
        return jnp.repeat(jnp.repeat(x, s, axis=1), s, axis=2)


class Concat(nnx.Module):
    """YOLOv5 ``Concat``: concatenation along the channel axis (the last one, channels-last)."""

    def __call__(self, xs: Sequence[jax.Array]) -> jax.Array:
        return jnp.concatenate(list(xs), axis=-1)


class Detect(nnx.Module):
    """YOLOv5 ``Detect`` head: ``m.i`` = 1x1 conv (with bias) to ``na * (5 + nc)`` channels per level.

    ``anchors`` (a :class:`Buffer`, shape ``(nl, na, 2)``) holds the anchors in *stride units*, as the
    PyTorch buffer does after model construction (pixels / stride); checkpoints with their own (autoanchor)
    anchors bring them along. Training mode (``deterministic=False``) returns the raw maps
    ``(B, na, ny, nx, no)`` per level; eval mode the decoded ``(B, N, no)``.
    """

    def __init__(self, nc: int, ch: Sequence[int], *, anchors: Sequence[Sequence[float]] = YOLOV5_ANCHORS,
                 strides: Sequence[int] = YOLOV5_STRIDES, dtype: Dtype | None = None,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        self.nc = nc
        self.no = nc + 5
        self.nl = len(anchors)
        self.na = len(anchors[0]) // 2
        self.stride = tuple(float(s) for s in strides)
        a = np.asarray(anchors, np.float32).reshape(self.nl, self.na, 2)
        self.anchors = Buffer(jnp.asarray(a / np.asarray(self.stride, np.float32)[:, None, None]))
        convs = []
        for c, s in zip(ch, self.stride):
            conv = nnx.Conv(c, self.no * self.na, (1, 1), use_bias=True, kernel_init=torch_default_kernel,
                            bias_init=_detect_bias_init(c, self.na, nc, s), dtype=dtype, param_dtype=param_dtype,
                            precision=None, rngs=rngs)
            convs.append(conv)
        self.m = Sequential(convs)
        self.deterministic = False

    def __call__(self, xs: Sequence[jax.Array]) -> tuple[jax.Array, ...] | jax.Array:
        raw, out = [], []
        for i in range(self.nl):
            y = self.m[i](xs[i])
            b, ny, nx, _ = y.shape
            y = jnp.transpose(y.reshape(b, ny, nx, self.na, self.no), (0, 3, 1, 2, 4))  # (b, na, ny, nx, no)
            raw.append(y)
            if self.deterministic:
                out.append(self._decode(y, i).reshape(b, self.na * ny * nx, self.no))
        if not self.deterministic:
            return tuple(raw)
        return jnp.concatenate(out, axis=1)

    def _decode(self, y: jax.Array, i: int) -> jax.Array:
        _, _, ny, nx, _ = y.shape
        dt = y.dtype
        stride = self.stride[i]
        yv, xv = jnp.meshgrid(jnp.arange(ny, dtype=dt), jnp.arange(nx, dtype=dt), indexing="ij")
        grid = jnp.stack((xv, yv), -1) - 0.5                                     # (ny, nx, 2)
        anchor_grid = (self.anchors[...][i].astype(dt) * stride).reshape(1, self.na, 1, 1, 2)
        s = jax.nn.sigmoid(y)
        xy = (s[..., :2] * 2 + grid) * stride
        wh = (s[..., 2:4] * 2) ** 2 * anchor_grid
        return jnp.concatenate([xy, wh, s[..., 4:]], axis=-1)


def _detect_bias_init(fan_in: int, na: int, nc: int, stride: float):
    """torch's default conv bias ``U(+-1/sqrt(fan_in))`` plus YOLOv5's ``_initialize_biases`` priors
    (objectness ``log(8 / (640 / s)^2)``, classes ``log(0.6 / (nc - 0.99999))``)."""
    base = uniform_symmetric(1.0 / math.sqrt(fan_in))
    prior = np.zeros((na, nc + 5), np.float32)
    prior[:, 4] = math.log(8 / (640 / stride) ** 2)
    prior[:, 5:] = math.log(0.6 / (nc - 0.99999))

    def init(key: jax.Array, shape: Sequence[int], dtype: Dtype = jnp.float32) -> jax.Array:
        return base(key, shape, dtype) + jnp.asarray(prior.reshape(-1), dtype)

    return init


def _attn_layers(attn: Any, attn_positions: Sequence[str | int] | str | None) -> frozenset[int]:
    """Layer indices that get an attention block (``9`` = before SPPF)."""
    if attn is None:
        if attn_positions not in (None, (), []):
            raise ValueError(f"attn_positions={attn_positions!r} needs an attention block: pass attn=")
        return frozenset()
    positions = ("c3",) if attn_positions is None else attn_positions
    if isinstance(positions, (str, int)):
        positions = (positions,)
    out: set[int] = set()
    for p in positions:
        if p == "c3":
            out.update(BACKBONE_C3_LAYERS)
        elif p == "sppf":
            out.add(9)
        elif isinstance(p, int) and not isinstance(p, bool) and p in BACKBONE_C3_LAYERS + (9,):
            out.add(p)
        else:
            raise ValueError(f"attn_positions: unknown position {p!r}; expected a subset of {ATTN_POSITIONS} "
                             f"or layer indices from {BACKBONE_C3_LAYERS + (9,)} (9 = before SPPF)")
    if not out:
        raise ValueError("attn_positions is empty while attn is given: expected e.g. ('c3',) or ('sppf',)")
    return frozenset(out)


class YOLOv5(nnx.Module):
    """YOLOv5 v7.0 (n / s / m / l / x) detector, channels-last, with PyTorch module paths ``model.0..24``.

    Args:
        variant: ``"yolov5n"``, ``"yolov5s"``, ``"yolov5m"``, ``"yolov5l"`` or ``"yolov5x"`` (or a
            ``(depth_multiple, width_multiple)`` pair).
        num_classes: number of classes ``nc`` (80 for COCO); predictions have ``5 + nc`` columns.
        in_chans: input channels (3).
        anchors: per-level anchors in pixels (default :data:`YOLOV5_ANCHORS`).
        attn: attention slot (``None``: exact YOLOv5; a registered name such as ``"cbam"``, ``"se"``,
            ``"cbam_official"``; or a callable ``attn(channels, rngs=...)``).
        attn_positions: where the blocks go (only with ``attn``): ``"c3"`` after each backbone C3
            (``model.2/4/6/8.attn``, applied to the C3 output), ``"sppf"`` before SPPF (``model.9.attn``,
            applied to its input), or layer indices from ``(2, 4, 6, 8, 9)``. Default ``("c3",)``.
        attn_kwargs: keywords for every attention block.

    Input: ``(B, H, W, in_chans)`` with ``H`` and ``W`` multiples of 32 (letterbox first, see
    :func:`flax_attn.models.letterbox`). Output: see the module docstring (eval: decoded ``(B, N, 5 + nc)``;
    train: three raw maps). Under ``jax.jit`` a new input shape or a mode change recompiles.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax_attn.models import create_model
        >>> model = create_model("yolov5n", num_classes=3)
        >>> model.eval()
        >>> model(jnp.ones((1, 64, 96, 3))).shape                 # 3 * (8*12 + 4*6 + 2*3) predictions
        (1, 378, 8)
    """

    def __init__(self, variant: str | tuple[float, float] = "yolov5s", *, num_classes: int = 80, in_chans: int = 3,
                 anchors: Sequence[Sequence[float]] = YOLOV5_ANCHORS, attn: Any = None,
                 attn_positions: Sequence[str | int] | str | None = None, attn_kwargs: dict[str, Any] | None = None,
                 dtype: Dtype | None = None, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        if isinstance(variant, str):
            if variant.lower() not in YOLOV5_CONFIGS:
                raise ValueError(f"unknown YOLOv5 variant {variant!r}: expected one of {sorted(YOLOV5_CONFIGS)}")
            gd, gw = YOLOV5_CONFIGS[variant.lower()]
        else:
            gd, gw = (float(v) for v in variant)
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if not isinstance(in_chans, int) or in_chans < 1:
            raise ValueError(f"in_chans must be a positive int, got {in_chans!r}")
        anchors = tuple(tuple(float(v) for v in a) for a in anchors)
        if len(anchors) != 3 or len({len(a) for a in anchors}) != 1 or len(anchors[0]) % 2:
            raise ValueError(f"anchors: expected 3 levels of (w, h) pairs, the same count per level, got {anchors}")
        self.variant = variant if isinstance(variant, str) else f"yolov5({gd},{gw})"
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.attn_layers = tuple(sorted(_attn_layers(attn, attn_positions)))
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)

        def ch(c: int) -> int:
            return _make_divisible(c * gw, 8)

        def n(k: int) -> int:
            return _depth(k, gd)

        def a(i: int) -> dict[str, Any]:
            return dict(attn=attn, attn_kwargs=attn_kwargs) if i in self.attn_layers else {}

        c64, c128, c256, c512, c1024 = ch(64), ch(128), ch(256), ch(512), ch(1024)
        layers: list[nnx.Module] = [
            Conv(in_chans, c64, 6, 2, 2, **kw),                       # 0  P1/2
            Conv(c64, c128, 3, 2, **kw),                              # 1  P2/4
            C3(c128, c128, n(3), **a(2), **kw),                       # 2
            Conv(c128, c256, 3, 2, **kw),                             # 3  P3/8
            C3(c256, c256, n(6), **a(4), **kw),                       # 4
            Conv(c256, c512, 3, 2, **kw),                             # 5  P4/16
            C3(c512, c512, n(9), **a(6), **kw),                       # 6
            Conv(c512, c1024, 3, 2, **kw),                            # 7  P5/32
            C3(c1024, c1024, n(3), **a(8), **kw),                     # 8
            SPPF(c1024, c1024, 5, **a(9), **kw),                      # 9
            Conv(c1024, c512, 1, 1, **kw),                            # 10
            Upsample(2),                                              # 11
            Concat(),                                                 # 12 cat backbone P4
            C3(c512 * 2, c512, n(3), False, **kw),                    # 13
            Conv(c512, c256, 1, 1, **kw),                             # 14
            Upsample(2),                                              # 15
            Concat(),                                                 # 16 cat backbone P3
            C3(c256 * 2, c256, n(3), False, **kw),                    # 17 (P3/8-small)
            Conv(c256, c256, 3, 2, **kw),                             # 18
            Concat(),                                                 # 19 cat head P4
            C3(c256 * 2, c512, n(3), False, **kw),                    # 20 (P4/16-medium)
            Conv(c512, c512, 3, 2, **kw),                             # 21
            Concat(),                                                 # 22 cat head P5
            C3(c512 * 2, c1024, n(3), False, **kw),                   # 23 (P5/32-large)
            Detect(num_classes, (c256, c512, c1024), anchors=anchors, **kw),  # 24
        ]
        self.model = Sequential(layers)

    # ``from`` of every layer (-1: previous output), as in the YAML configs
    FROM: tuple[int | tuple[int, ...], ...] = (
        -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, (-1, 6), -1, -1, -1, (-1, 4), -1, -1, (-1, 14), -1, -1,
        (-1, 10), -1, (17, 20, 23))
    SAVE: frozenset[int] = frozenset({4, 6, 10, 14, 17, 20, 23})

    @property
    def detect(self) -> Detect:
        """The Detect head (``model.24``)."""
        return self.model[24]

    @property
    def stride(self) -> tuple[float, ...]:
        return self.model[24].stride

    def __call__(self, x: jax.Array) -> jax.Array | tuple[jax.Array, ...]:
        check_yolo_input(x, self.in_chans)
        saved: dict[int, jax.Array] = {}
        for i in range(len(self.model)):
            f = self.FROM[i]
            inp: jax.Array | list[jax.Array]
            if isinstance(f, tuple):
                inp = [x if j == -1 else saved[j] for j in f]
            else:
                inp = x
            x = self.model[i](inp)
            if i in self.SAVE:
                saved[i] = x
        return x


def check_yolo_input(x: Any, in_chans: int = 3) -> None:
    """Raises a clear error unless ``x`` is ``(B, H, W, in_chans)`` with ``H``, ``W`` multiples of 32."""
    shape = getattr(x, "shape", None)
    if shape is None:
        raise TypeError(f"YOLOv5 expects an array of shape (B, H, W, {in_chans}), got {type(x).__name__}")
    shape = tuple(shape)
    if len(shape) != 4:
        raise ValueError(f"YOLOv5 expects a channels-last batch (B, H, W, {in_chans}), got shape {shape}")
    if shape[-1] != in_chans:
        hint = ": did you pass NCHW? the Flax models are channels-last" if shape[1] == in_chans else ""
        raise ValueError(f"YOLOv5 expects {in_chans} input channels (B, H, W, {in_chans}), got shape {shape}{hint}")
    h, w = shape[1], shape[2]
    if h % 32 or w % 32 or h == 0 or w == 0:
        raise ValueError(f"YOLOv5 input sides must be positive multiples of 32 (the largest stride), got H={h}, "
                         f"W={w} in shape {shape}: letterbox the image (flax_attn.models.letterbox) first")


def yolov5_num_params(model: nnx.Module) -> int:
    """Number of trainable parameters (``nnx.Param`` elements), as YOLOv5's summary counts them; works on an
    abstract (``nnx.eval_shape``) model.

    Example:
        >>> from flax import nnx
        >>> m = nnx.eval_shape(lambda: YOLOv5("yolov5s", rngs=nnx.Rngs(0)))
        >>> yolov5_num_params(m)
        7235389
    """
    return int(sum(math.prod(v.shape) for v in jax.tree.leaves(nnx.state(model, nnx.Param))))


__all__ = [
    "ATTN_POSITIONS",
    "BACKBONE_C3_LAYERS",
    "C3",
    "SPPF",
    "YOLOV5_ANCHORS",
    "YOLOV5_CONFIGS",
    "YOLOV5_STRIDES",
    "Buffer",
    "C3Bottleneck",
    "Concat",
    "Conv",
    "Detect",
    "Upsample",
    "YOLOv5",
    "check_yolo_input",
    "yolov5_num_params",
]
