"""ResNet (He et al., CVPR 2016) with an attention slot: SE-ResNet (Hu et al.) and CBAM-ResNet (Woo et al.).

The module tree mirrors ``torchvision.models.resnet`` (``conv1``, ``bn1``, ``layer1.0.conv1``, ...,
``layer2.0.downsample.0``, ``fc``), so torchvision checkpoints convert by the rule table of
:mod:`flax_attn.convert`. The attention block of each residual block sits at ``layerX.Y.attn``, after the
last BatchNorm of the residual branch and before the addition (BasicBlock: after ``bn2``; Bottleneck:
after ``bn3``), where both papers place it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, Protocol

import jax
import jax.numpy as jnp
from flax import nnx

from flax_attn.layers.norm import BatchNorm
from flax_attn.models._common import (
    AttnSpec,
    Dtype,
    MaxPool2d,
    Sequential,
    check_image,
    conv2d,
    linear,
    make_attn,
)


def _zero_spatial_bn(attn: nnx.Module | None) -> None:
    """The official CBAM code initialises the spatial gate's BatchNorm weight to 0 (its ResNet ``__init__``:
    ``if 'SpatialGate' in key: state_dict()[key][...] = 0``), so each spatial gate starts at sigmoid(0)=1/2."""
    spatial = getattr(attn, "spatial", None)
    bn = getattr(spatial, "bn", None)
    if isinstance(bn, BatchNorm) and bn.scale is not None and getattr(attn, "preset", None) == "cbam_official":
        bn.scale[...] = jnp.zeros_like(bn.scale[...])


class BasicBlock(nnx.Module):
    """torchvision's ``BasicBlock`` (3x3 -> 3x3, expansion 1) with ``attn`` after ``bn2``."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, *, stride: int = 1, downsample: bool = False,
                 groups: int = 1, base_width: int = 64, dilation: int = 1, attn: AttnSpec = None,
                 attn_kwargs: dict[str, Any] | None = None, dtype: Dtype | None = None,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        if groups != 1 or base_width != 64:
            raise ValueError(f"BasicBlock only supports groups=1 and base_width=64, got {groups}, {base_width}")
        if dilation > 1:
            raise ValueError(f"BasicBlock does not support dilation > 1, got {dilation}")
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.conv1 = conv2d(inplanes, planes, 3, stride=stride, **kw)
        self.bn1 = BatchNorm(planes, **kw)
        self.conv2 = conv2d(planes, planes, 3, **kw)
        self.bn2 = BatchNorm(planes, **kw)
        self.attn = make_attn(attn, planes, **kw, **(attn_kwargs or {}))
        self.downsample = Sequential([conv2d(inplanes, planes, 1, stride=stride, padding=0, **kw),
                                      BatchNorm(planes, **kw)]) if downsample else None

    def last_bn(self) -> BatchNorm:
        return self.bn2

    def __call__(self, x: jax.Array) -> jax.Array:
        identity = x
        out = jax.nn.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.attn is not None:
            out = self.attn(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        return jax.nn.relu(out + identity)


class Bottleneck(nnx.Module):
    """torchvision's ``Bottleneck`` (1x1 -> 3x3 (stride here, "ResNet v1.5") -> 1x1, expansion 4) with ``attn``
    after ``bn3``."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, *, stride: int = 1, downsample: bool = False,
                 groups: int = 1, base_width: int = 64, dilation: int = 1, attn: AttnSpec = None,
                 attn_kwargs: dict[str, Any] | None = None, dtype: Dtype | None = None,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        width = int(planes * (base_width / 64.0)) * groups
        out = planes * self.expansion
        self.conv1 = conv2d(inplanes, width, 1, padding=0, **kw)
        self.bn1 = BatchNorm(width, **kw)
        self.conv2 = conv2d(width, width, 3, stride=stride, groups=groups, dilation=dilation, **kw)
        self.bn2 = BatchNorm(width, **kw)
        self.conv3 = conv2d(width, out, 1, padding=0, **kw)
        self.bn3 = BatchNorm(out, **kw)
        self.attn = make_attn(attn, out, **kw, **(attn_kwargs or {}))
        self.downsample = Sequential([conv2d(inplanes, out, 1, stride=stride, padding=0, **kw),
                                      BatchNorm(out, **kw)]) if downsample else None

    def last_bn(self) -> BatchNorm:
        return self.bn3

    def __call__(self, x: jax.Array) -> jax.Array:
        identity = x
        out = jax.nn.relu(self.bn1(self.conv1(x)))
        out = jax.nn.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.attn is not None:
            out = self.attn(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        return jax.nn.relu(out + identity)


class BlockClass(Protocol):
    """A residual block class (``BasicBlock``, ``Bottleneck`` or a user one): ``expansion`` (output channels
    per ``planes``) and ``block(inplanes, planes, *, stride, downsample, groups, base_width, attn,
    attn_kwargs, dtype, param_dtype, rngs)``."""

    expansion: int

    def __call__(self, *args: Any, **kwargs: Any) -> nnx.Module: ...


BLOCKS: dict[str, BlockClass] = {"basic": BasicBlock, "bottleneck": Bottleneck}


class ResNet(nnx.Module):
    """ResNet with an attention slot, torchvision-compatible parameter names, channels-last input.

    Args:
        block: ``"basic"`` (ResNet-18/34) or ``"bottleneck"`` (ResNet-50/101/152), or the block class.
        layers: blocks per stage, e.g. ``(2, 2, 2, 2)`` for ResNet-18.
        num_classes: size of the ``fc`` output (``0``: no head, ``__call__`` returns pooled features).
        in_chans: input channels (torchvision: 3).
        attn: attention block in every residual block: ``None``, a registered name (``"se"``, ``"cbam"``,
            ``"se_classic"``, ``"cbam_official"``, ... see :func:`flax_attn.layers.list_attn`) or a callable
            ``attn(channels, *, rngs, **attn_kwargs) -> nnx.Module``.
        attn_kwargs: extra keywords for the attention block (e.g. ``{"reduction": 8}``).
        width: stage-1 width (torchvision: 64); stages use ``width * (1, 2, 4, 8)``.
        stem: ``"torchvision"`` (7x7/2 conv + 3x3/2 max-pool) or ``"cifar"`` (3x3/1 conv, no pool) for
            small images.
        zero_init_residual: zero the last BatchNorm gamma of each residual branch (Goyal et al.).
        groups, width_per_group: ResNeXt / Wide ResNet options (torchvision's names).
        dtype, param_dtype: computation and parameter dtypes.
        rngs: ``nnx.Rngs`` for the initialisation.

    Initialisation: torchvision's (convs kaiming-normal fan-out, BatchNorm 1/0, ``fc`` torch default); with
    ``attn="cbam_official"`` the spatial gate's BatchNorm gamma starts at 0 as in the official CBAM code.

    Named intermediates (for CAMs): ``conv1``, ``layer1`` ... ``layer4``; :meth:`forward_features` returns
    the ``layer4`` map. The model is built in training mode (like torch); call ``model.eval()`` for inference.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> model = ResNet("basic", (1, 1, 1, 1), num_classes=10, attn="se", width=8, rngs=nnx.Rngs(0))
        >>> model.eval()
        >>> model(jnp.ones((2, 32, 32, 3))).shape
        (2, 10)
    """

    def __init__(
        self,
        block: Literal["basic", "bottleneck"] | BlockClass = "basic",
        layers: Sequence[int] = (2, 2, 2, 2),
        *,
        num_classes: int = 1000,
        in_chans: int = 3,
        attn: AttnSpec = None,
        attn_kwargs: dict[str, Any] | None = None,
        width: int = 64,
        stem: Literal["torchvision", "cifar"] = "torchvision",
        zero_init_residual: bool = False,
        groups: int = 1,
        width_per_group: int = 64,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        block_cls = BLOCKS.get(block) if isinstance(block, str) else block
        if block_cls is None:
            raise ValueError(f"unknown block {block!r}: expected one of {sorted(BLOCKS)} or a block class")
        if len(layers) != 4 or any((not isinstance(n, int)) or n < 1 for n in layers):
            raise ValueError(f"layers must be 4 positive ints (blocks per stage), got {tuple(layers)}")
        if stem not in ("torchvision", "cifar"):
            raise ValueError(f"unknown stem {stem!r}: expected 'torchvision' or 'cifar'")
        for name, value in (("num_classes", num_classes), ("in_chans", in_chans), ("width", width)):
            if not isinstance(value, int) or value < (0 if name == "num_classes" else 1):
                raise ValueError(f"{name} must be a {'non-negative' if name == 'num_classes' else 'positive'} "
                                 f"int, got {value!r}")
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.stem_type = stem
        if stem == "torchvision":
            self.conv1 = conv2d(in_chans, width, 7, stride=2, padding=3, **kw)
            self.maxpool: MaxPool2d | None = MaxPool2d(3, 2, 1)
        else:
            self.conv1 = conv2d(in_chans, width, 3, stride=1, padding=1, **kw)
            self.maxpool = None
        self.bn1 = BatchNorm(width, **kw)
        inplanes = width
        stages = []
        for i, n in enumerate(layers):
            planes = width * 2**i
            stride = 1 if i == 0 else 2
            blocks = []
            for j in range(n):
                needs_ds = j == 0 and (stride != 1 or inplanes != planes * block_cls.expansion)
                blocks.append(block_cls(inplanes, planes, stride=stride if j == 0 else 1, downsample=needs_ds,
                                        groups=groups, base_width=width_per_group, attn=attn,
                                        attn_kwargs=attn_kwargs, **kw))
                inplanes = planes * block_cls.expansion
            stages.append(Sequential(blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.num_features = inplanes
        self.fc = linear(inplanes, num_classes, **kw) if num_classes > 0 else None
        for stage in stages:
            for blk in stage:
                if zero_init_residual:
                    bn = blk.last_bn()
                    bn.scale[...] = jnp.zeros_like(bn.scale[...])
                _zero_spatial_bn(blk.attn)

    def forward_features(self, x: jax.Array) -> jax.Array:
        """Stem and the four stages: the ``layer4`` map ``(N, H/32, W/32, C)``."""
        check_image(x, self.in_chans, type(self).__name__)
        x = jax.nn.relu(self.bn1(self.conv1(x)))
        if self.maxpool is not None:
            x = self.maxpool(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)

    def forward_head(self, x: jax.Array) -> jax.Array:
        """Global average pool and ``fc``: ``(N, H, W, C) -> (N, num_classes)``."""
        x = jnp.mean(x, axis=(1, 2))
        return self.fc(x) if self.fc is not None else x

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.forward_head(self.forward_features(x))


__all__ = ["BasicBlock", "Bottleneck", "ResNet"]
