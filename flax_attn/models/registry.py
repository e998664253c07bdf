"""Model registry: ``create_model("cbam_resnet50", num_classes=10)``, ``list_models("resnet*")``."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from functools import partial
from typing import Any, Literal

import jax
from flax import nnx

from flax_attn.models.efficientnet import EFFICIENTNET_CONFIGS, EfficientNet
from flax_attn.models.mobilenetv3 import MobileNetV3
from flax_attn.models.regnet import REGNET_CONFIGS, RegNet
from flax_attn.models.resnet import ResNet
from flax_attn.models.vgg import VGG, VGG_ARCHS
from flax_attn.models.yolo import YOLOV5_CONFIGS, YOLOv5

ModelFactory = Callable[..., nnx.Module]

RESNET_DEPTHS: dict[int, tuple[Literal["basic", "bottleneck"], tuple[int, int, int, int]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}

#: attention presets of the named attention ResNets (the torch_ref.resnet twins)
RESNET_ATTN_PRESETS = {"se": "se_classic", "cbam": "cbam_official"}

_MODELS: dict[str, ModelFactory] = {}


def register_model(name: str, factory: ModelFactory, *, overwrite: bool = False) -> None:
    """Registers ``factory(*, rngs, **kwargs) -> nnx.Module`` under ``name``."""
    key = name.lower()
    if key in _MODELS and not overwrite:
        raise ValueError(f"model {name!r} is already registered (pass overwrite=True to replace it)")
    _MODELS[key] = factory


def list_models(pattern: str | None = None) -> list[str]:
    """Registered model names, optionally filtered by a glob ``pattern`` (``"*resnet*"``).

    Example:
        >>> "cbam_resnet50" in list_models("cbam_*")
        True
    """
    names = sorted(_MODELS)
    return names if pattern is None else [n for n in names if fnmatch.fnmatch(n, pattern)]


def create_model(name: str, *, rngs: nnx.Rngs | None = None, jit: bool = True, **kwargs: Any) -> nnx.Module:
    """Builds the registered model ``name``; keywords go to the model class.

    Common keywords: ``num_classes``, ``in_chans``, ``dtype``, ``param_dtype``, ``rngs`` (default
    ``nnx.Rngs(0)``; its ``dropout`` stream, or ``default``, drives dropout / stochastic depth in training
    mode). ``jit=True`` (default) runs the constructor under :func:`flax.nnx.jit`: one compiled
    initialisation instead of one per parameter shape (the same draws, up to float rounding).
    ResNets also take ``attn``, ``attn_kwargs``, ``width``, ``stem``, ``zero_init_residual``;
    ``se_resnet*`` / ``cbam_resnet*`` fix ``attn`` to ``"se_classic"`` / ``"cbam_official"``.

    Example:
        >>> import jax.numpy as jnp
        >>> model = create_model("resnet18", num_classes=10, in_chans=1, attn="cbam", width=16, stem="cifar")
        >>> model.eval()
        >>> model(jnp.ones((2, 28, 28, 1))).shape
        (2, 10)
    """
    if not isinstance(name, str):
        raise TypeError(f"model name must be a string, got {type(name).__name__}")
    key = name.lower()
    if key not in _MODELS:
        raise ValueError(f"unknown model {name!r}: expected one of {list_models()}")
    factory = _MODELS[key]
    rngs = nnx.Rngs(0) if rngs is None else rngs
    if not isinstance(rngs, nnx.Rngs):
        raise TypeError(f"rngs must be an nnx.Rngs, got {type(rngs).__name__}")
    if not jit:
        return factory(rngs=rngs, **kwargs)
    return _jitted_init(factory, rngs, kwargs)


# Initialisation runs once, so its compilation is all that matters: XLA:CPU's default LLVM optimisation of
# the hundreds of small random-number kernels of a model's init takes 3-6x longer than at level 0 (YOLOv5n:
# 27 s vs ~6 s on a quiet 2-core Xeon) and gains nothing at run time. The draws are the same bits; only
# the scaling arithmetic may round differently (measured: <= 4e-9 on YOLOv5n's parameters).
_INIT_COMPILER_OPTIONS: dict[str, str | bool] = {"xla_backend_optimization_level": "0"}


def _jitted_init(factory: Callable[..., nnx.Module], rngs: nnx.Rngs, kwargs: dict[str, Any]) -> nnx.Module:
    """``factory(rngs=rngs, **kwargs)`` as one compiled computation (``rngs`` advances as in eager)."""
    rgraph, rstate = nnx.split(rngs)
    if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(rstate)):  # inside a transform
        return nnx.jit(lambda r: factory(rngs=r, **kwargs))(rngs)
    graphdef: list[Any] = []

    def init(rs: Any) -> tuple[Any, Any]:
        r = nnx.merge(rgraph, rs)
        g, state = nnx.split(factory(rngs=r, **kwargs))
        graphdef.append(g)
        return state, nnx.state(r)

    compiled = jax.jit(init).lower(rstate).compile(compiler_options=_INIT_COMPILER_OPTIONS)
    state, new_rstate = compiled(rstate)
    nnx.update(rngs, new_rstate)
    return nnx.merge(graphdef[0], state)


def _resnet(depth: int, attn_kind: str | None = None, **kwargs: Any) -> ResNet:
    block, layers = RESNET_DEPTHS[depth]
    if attn_kind is not None:
        preset = RESNET_ATTN_PRESETS[attn_kind]
        given = kwargs.pop("attn", preset)
        if given != preset:
            raise ValueError(f"{attn_kind}_resnet{depth} uses attn={preset!r}; got attn={given!r} "
                             f"(use create_model('resnet{depth}', attn=...) for another block)")
        kwargs["attn"] = preset
    return ResNet(block, layers, **kwargs)


for _depth in RESNET_DEPTHS:
    register_model(f"resnet{_depth}", partial(_resnet, _depth))
    for _kind in RESNET_ATTN_PRESETS:
        register_model(f"{_kind}_resnet{_depth}", partial(_resnet, _depth, _kind))
register_model("resnext50_32x4d", partial(_resnet, 50, groups=32, width_per_group=4))
register_model("resnext101_32x8d", partial(_resnet, 101, groups=32, width_per_group=8))
register_model("wide_resnet50_2", partial(_resnet, 50, width_per_group=128))
register_model("wide_resnet101_2", partial(_resnet, 101, width_per_group=128))
for _arch in ("mobilenet_v3_large", "mobilenet_v3_small"):
    register_model(_arch, partial(MobileNetV3, _arch))
for _arch in EFFICIENTNET_CONFIGS:
    register_model(_arch, partial(EfficientNet, _arch))
for _arch in VGG_ARCHS:
    register_model(_arch, partial(VGG, _arch))
for _arch in REGNET_CONFIGS:
    register_model(_arch, partial(RegNet, _arch))
for _arch in YOLOV5_CONFIGS:
    register_model(_arch, partial(YOLOv5, _arch))
