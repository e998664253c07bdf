"""torchvision (and ``torch_ref.resnet``) models <-> :mod:`flax_attn.models`: strict, both ways.

The Flax backbones mirror torchvision's module names, so the conversion is the rule table of
:mod:`flax_attn.convert` plus the attention blocks' preset maps (found automatically) and one rename: the
attention block of a ResNet block lives at ``layerX.Y.attn`` in Flax and at ``layerX.Y.se`` (the article's
``SELayer``, preset ``se_classic``) or ``layerX.Y.cbam`` (the official CBAM, preset ``cbam_official``) in
``torch_ref.resnet`` / the official code. Other attention blocks keep the name ``attn``.

torch is imported only by :func:`to_torch`; :func:`from_torchvision` accepts torch tensors or numpy arrays.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flax_attn.convert._keymap import KeyMap
from flax_attn.convert._nnx import nnx_to_numpy, nnx_to_torch, torch_to_nnx

#: torch module name of a ResNet block's attention, by preset (others: ``attn``)
RESNET_ATTN_TORCH_NAMES = {"se_classic": "se", "cbam_official": "cbam"}

# family -> (state_dict key of the classifier weight, key of the first conv weight)
_HEAD_AND_STEM = {
    "resnet": ("fc.weight", "conv1.weight"),
    "mobilenet": ("classifier.3.weight", "features.0.0.weight"),
    "efficientnet": ("classifier.1.weight", "features.0.0.weight"),
    "vgg": ("classifier.6.weight", "features.0.weight"),
    "regnet": ("fc.weight", "stem.0.weight"),
}


def _family(name: str) -> str:
    for fam in ("mobilenet", "efficientnet", "vgg", "regnet"):
        if name.startswith(fam):
            return fam
    if "resne" in name:  # resnet*, se_resnet*, cbam_resnet*, resnext*, wide_resnet*
        return "resnet"
    raise ValueError(f"no torchvision mapping for model {name!r}")


def torchvision_key_map(model: nnx.Module) -> KeyMap:
    """The key map between ``model`` (a :mod:`flax_attn.models` backbone) and its torchvision twin.

    Identity names except a ResNet block's attention (``layerX.Y.attn`` -> ``layerX.Y.se`` / ``.cbam``
    for the ``se_classic`` / ``cbam_official`` presets); preset maps nest automatically.

    Example:
        >>> from flax_attn.models import create_model
        >>> km = torchvision_key_map(create_model("cbam_resnet18", num_classes=10))
        >>> km.torch_key("layer1.0.attn.channel.fc1.kernel")
        'layer1.0.cbam.ChannelGate.mlp.1.weight'
    """
    from flax_attn.models.resnet import ResNet

    renames: dict[str, str] = {}
    if isinstance(model, ResNet):
        for s in range(1, 5):
            for i, block in enumerate(getattr(model, f"layer{s}")):
                torch_name = RESNET_ATTN_TORCH_NAMES.get(getattr(block.attn, "preset", None))
                if block.attn is not None and torch_name is not None:
                    renames[f"layer{s}.{i}.attn"] = f"layer{s}.{i}.{torch_name}"
    return KeyMap(renames, name="torchvision")


def _materialize_rng_state(model: nnx.Module, seed: int) -> None:
    """Gives abstract (``nnx.eval_shape``) RNG streams of ``model`` (dropout, stochastic depth) real keys."""
    base = jax.random.key(seed)
    i = 0
    for _, node in nnx.iter_graph(model):
        if isinstance(node, nnx.RngState) and isinstance(node.get_value(), jax.ShapeDtypeStruct):
            sds = node.get_value()
            if jax.dtypes.issubdtype(sds.dtype, jax.dtypes.prng_key):
                node.set_value(jax.random.fold_in(base, i))
                i += 1
            else:
                node.set_value(jnp.zeros(sds.shape, sds.dtype))


def _infer_kwargs(name: str, state_dict: Mapping[str, Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    head, stem = _HEAD_AND_STEM[_family(name)]
    if "num_classes" not in kwargs and head in state_dict:
        kwargs["num_classes"] = int(np.shape(state_dict[head])[0])
    if "in_chans" not in kwargs and stem in state_dict:
        kwargs["in_chans"] = int(np.shape(state_dict[stem])[1])
    if _family(name) == "resnet" and stem in state_dict:
        shape = np.shape(state_dict[stem])
        kwargs.setdefault("width", int(shape[0]))
        if shape[-1] == 3:
            kwargs.setdefault("stem", "cifar")
    return kwargs


def from_torchvision(
    name: str | nnx.Module,
    state_dict: Mapping[str, Any],
    *,
    strict: bool = True,
    seed: int = 0,
    **model_kwargs: Any,
) -> nnx.Module:
    """A :mod:`flax_attn.models` backbone holding the weights of a torchvision (or ``torch_ref.resnet``)
    ``state_dict``.

    ``name`` is a registered model name (``"resnet50"``, ``"cbam_resnet50"``, ``"mobilenet_v3_large"``,
    ``"efficientnet_b0"``, ``"vgg16"``, ``"regnet_y_800mf"``, ...) or an already built Flax model to load
    into. ``num_classes``, ``in_chans`` (and a ResNet's ``width`` / ``stem``) are read from the checkpoint
    unless given; other keywords go to :func:`flax_attn.models.create_model`. The model is built abstractly
    (no random initialisation) and then filled, so every variable comes from ``state_dict``; conversion is
    strict (a missing or unexpected key or a shape mismatch raises :class:`ConversionError` listing them all).
    Dropout / stochastic-depth streams get keys from ``seed``. The model is returned in eval mode.

    Example:
        >>> import torchvision
        >>> tv = torchvision.models.resnet18(num_classes=10)
        >>> model = from_torchvision("resnet18", tv.state_dict())
        >>> model.fc.kernel.shape
        (512, 10)
    """
    from flax_attn.models import create_model

    if isinstance(name, nnx.Module):
        model = torch_to_nnx(name, state_dict, key_map=torchvision_key_map(name), strict=strict)
        model.eval()
        return model
    if not isinstance(name, str):
        raise TypeError(f"name must be a model name or an nnx.Module, got {type(name).__name__}")
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping of tensors (model.state_dict()), got {type(state_dict).__name__}")
    kwargs = _infer_kwargs(name.lower(), state_dict, dict(model_kwargs))
    model = nnx.eval_shape(lambda: create_model(name, jit=False, rngs=nnx.Rngs(seed), **kwargs))
    _materialize_rng_state(model, seed)
    torch_to_nnx(model, state_dict, key_map=torchvision_key_map(model), strict=strict)
    abstract = [".".join(map(str, p)) for p, v in nnx.iter_graph(model)
                if isinstance(v, nnx.Variable) and isinstance(v.get_value(), jax.ShapeDtypeStruct)]
    if abstract:  # only reachable with strict=False: refuse to hand back uninitialised variables
        raise ValueError(f"state_dict left {len(abstract)} variables unset (e.g. {abstract[:5]}); "
                         "build the model with create_model() and load with strict=False into it instead")
    model.eval()
    return model


def to_torch(model: nnx.Module) -> dict[str, Any]:
    """The ``state_dict`` (torch tensors) of ``model`` for its torchvision / ``torch_ref.resnet`` twin;
    ``twin.load_state_dict(to_torch(model))`` is strict-clean.

    Example:
        >>> import torchvision
        >>> from flax_attn.models import create_model
        >>> sd = to_torch(create_model("resnet18", num_classes=10))
        >>> torchvision.models.resnet18(num_classes=10).load_state_dict(sd)
        <All keys matched successfully>
    """
    return nnx_to_torch(model, key_map=torchvision_key_map(model))


def to_numpy(model: nnx.Module) -> dict[str, np.ndarray]:
    """Like :func:`to_torch` with numpy arrays (no torch needed)."""
    return nnx_to_numpy(model, key_map=torchvision_key_map(model))


__all__ = ["RESNET_ATTN_TORCH_NAMES", "from_torchvision", "to_numpy", "to_torch", "torchvision_key_map"]
