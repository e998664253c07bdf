"""A small NNX ResNet with an attention slot, used until ``flax_attn.models.create_model`` lands.

Same layout and parameter names as torchvision's ResNet-18 (``conv1``, ``bn1``, ``layer1.0.conv1`` ...,
``fc``), channels-last, CIFAR stem (3x3 conv, stride 1, no max-pool), the attention block after the second
BatchNorm of each residual branch (where the SE and CBAM papers put it).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from flax_attn.layers import BatchNorm, create_attn


class BasicBlock(nnx.Module):
    def __init__(self, cin: int, cout: int, stride: int, attn: str | None, *, dtype: Any, param_dtype: Any,
                 rngs: nnx.Rngs):
        kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.conv1 = nnx.Conv(cin, cout, (3, 3), strides=stride, padding=((1, 1), (1, 1)), **kw)
        self.bn1 = BatchNorm(cout, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.conv2 = nnx.Conv(cout, cout, (3, 3), padding=((1, 1), (1, 1)), **kw)
        self.bn2 = BatchNorm(cout, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.attn = create_attn(attn, cout, dtype=dtype, param_dtype=param_dtype, rngs=rngs) if attn else None
        if stride != 1 or cin != cout:
            self.downsample = nnx.Sequential(
                nnx.Conv(cin, cout, (1, 1), strides=stride, padding=((0, 0), (0, 0)), **kw),
                BatchNorm(cout, dtype=dtype, param_dtype=param_dtype, rngs=rngs),
            )
        else:
            self.downsample = None

    def __call__(self, x: jax.Array) -> jax.Array:
        out = jax.nn.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.attn is not None:
            out = self.attn(out)
        shortcut = x if self.downsample is None else self.downsample(x)
        return jax.nn.relu(out + shortcut)


class ResNet(nnx.Module):
    def __init__(self, layers: tuple[int, ...], *, num_classes: int, in_chans: int, attn: str | None,
                 width: int, dtype: Any = None, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(in_chans, width, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, dtype=dtype,
                              param_dtype=param_dtype, rngs=rngs)
        self.bn1 = BatchNorm(width, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        cin = width
        stages = []
        for i, n in enumerate(layers):
            cout = width * 2**i
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(cin, cout, 2 if (i > 0 and j == 0) else 1, attn, dtype=dtype,
                                         param_dtype=param_dtype, rngs=rngs))
                cin = cout
            stages.append(nnx.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nnx.Linear(cin, num_classes, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def forward_features(self, x: jax.Array) -> jax.Array:
        x = jax.nn.relu(self.bn1(self.conv1(x)))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward_head(self, x: jax.Array) -> jax.Array:
        return self.fc(x.mean(axis=(1, 2)))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.forward_head(self.forward_features(x))


def create_model(name: str, *, num_classes: int, in_chans: int, attn: str | None = None, width: int = 16,
                 dtype: Any = None, param_dtype: Any = jnp.float32, rngs: nnx.Rngs, **_: Any) -> nnx.Module:
    layers = {"resnet10": (1, 1, 1, 1), "resnet18": (2, 2, 2, 2)}[name]
    return ResNet(layers, num_classes=num_classes, in_chans=in_chans, attn=attn, width=width, dtype=dtype,
                  param_dtype=param_dtype, rngs=rngs)
