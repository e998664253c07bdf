"""VGG (Simonyan & Zisserman, ICLR 2015), torchvision-compatible: ``vgg11`` ... ``vgg19`` and ``_bn`` variants.

Module tree as ``torchvision.models.vgg``: ``features.i`` (convs, BatchNorms, ReLUs and max-pools, with
torchvision's indices), 7x7 adaptive average pool, ``classifier.0`` / ``.3`` / ``.6`` linears (ReLU and dropout
between). ``features`` is the article's Grad-CAM layer for ``vgg16`` (the output of the last max-pool).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from flax_attn.layers.norm import BatchNorm
from flax_attn.models._common import (
    Activation,
    Dropout,
    Dtype,
    MaxPool2d,
    Sequential,
    adaptive_avg_pool2d,
    check_image,
    conv2d,
    linear,
    normal,
    zeros,
)

#: torchvision's ``cfgs``: conv widths, ``"M"`` = 2x2 max-pool.
VGG_CONFIGS: dict[str, list[int | str]] = {
    "A": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "B": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "D": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "E": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}
VGG_ARCHS: dict[str, tuple[str, bool]] = {
    "vgg11": ("A", False), "vgg13": ("B", False), "vgg16": ("D", False), "vgg19": ("E", False),
    "vgg11_bn": ("A", True), "vgg13_bn": ("B", True), "vgg16_bn": ("D", True), "vgg19_bn": ("E", True),
}


class VGG(nnx.Module):
    """VGG with torchvision's parameter names, channels-last input.

    Args:
        arch: ``"vgg11"``, ``"vgg13"``, ``"vgg16"``, ``"vgg19"`` (+ ``"_bn"``), or ``config=`` / ``batch_norm=``.
        num_classes, in_chans: head size and input channels.
        dropout: classifier dropout, 0.5 (training mode only; ``dropout`` or ``default`` stream of ``rngs``).
        dtype, param_dtype, rngs: as usual.

    Initialisation as torchvision: convs kaiming-normal fan-out with zero bias, BatchNorm 1/0, linears
    ``N(0, 0.01)`` with zero bias. Any input of at least 32x32 works (the 7x7 adaptive pool is exact).

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> model = VGG("vgg11", num_classes=10, rngs=nnx.Rngs(0))
        >>> model.eval()
        >>> model(jnp.ones((1, 32, 32, 3))).shape
        (1, 10)
    """

    def __init__(
        self,
        arch: str = "vgg16",
        *,
        num_classes: int = 1000,
        in_chans: int = 3,
        dropout: float = 0.5,
        config: list[int | str] | None = None,
        batch_norm: bool | None = None,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if config is None:
            if arch not in VGG_ARCHS:
                raise ValueError(f"unknown VGG arch {arch!r}: expected one of {sorted(VGG_ARCHS)}")
            letter, bn_default = VGG_ARCHS[arch]
            config = VGG_CONFIGS[letter]
            batch_norm = bn_default if batch_norm is None else batch_norm
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.num_classes = num_classes
        self.in_chans = in_chans
        layers: list[nnx.Module] = []
        c = in_chans
        for v in config:
            if v == "M":
                layers.append(MaxPool2d(2, 2))
                continue
            layers.append(conv2d(c, int(v), 3, padding=1, bias=True, **kw))
            if batch_norm:
                layers.append(BatchNorm(int(v), **kw))
            layers.append(Activation(jax.nn.relu, "relu"))
            c = int(v)
        self.features = Sequential(layers)
        self.num_features = c
        lin = dict(kernel_init=normal(0.01), bias_init=zeros, **kw)
        self.classifier = Sequential([
            linear(c * 7 * 7, 4096, **lin), Activation(jax.nn.relu, "relu"), Dropout(dropout, rngs=rngs),
            linear(4096, 4096, **lin), Activation(jax.nn.relu, "relu"), Dropout(dropout, rngs=rngs),
            linear(4096, num_classes, **lin),
        ])

    def forward_features(self, x: jax.Array) -> jax.Array:
        check_image(x, self.in_chans, type(self).__name__)
        return self.features(x)

    def forward_head(self, x: jax.Array) -> jax.Array:
        x = adaptive_avg_pool2d(x, 7)
        # torch.flatten of an NCHW map: channel-major order, so the first Linear's rows match torchvision
        x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)
        return self.classifier(x)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.forward_head(self.forward_features(x))


__all__ = ["VGG", "VGG_ARCHS", "VGG_CONFIGS"]
