"""torchvision (and ``torch_ref.resnet``) models <-> :mod:`flax_attn.models`: strict, both ways.

The Flax backbones mirror torchvision's module names, so the conversion is the rule table of
:mod:`flax_attn.convert` plus the attention blocks' preset maps (found automatically) and one rename: the
attention block of a ResNet block lives at ``layerX.Y.attn`` in Flax and at ``layerX.Y.se`` (the article's
``SELayer``, preset ``se_classic``) or ``layerX.Y.cbam`` (the official CBAM, preset ``cbam_official``) in
``torch_ref.resnet`` / the official code. Other attention blocks keep the name ``attn``.

torch is imported only by :func:`to_torchvision`; :func:`from_torchvision` accepts torch tensors or numpy
arrays. A checkpoint whose keys are not the model's gets a diagnosis: the registered model(s) whose key set
is exactly the checkpoint's, found by comparing block counts first (read from the model configs, no model
is built) and then the full key sets of the few candidates left (built abstractly once, cached).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flax_attn.convert._errors import ConversionError
from flax_attn.convert._keymap import NBT, KeyMap
from flax_attn.convert._nnx import _plan, nnx_to_numpy, nnx_to_torch, torch_to_nnx

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
    for the ``se_classic`` / ``cbam_official`` presets). The attention blocks' preset maps are nested by
    the conversion itself (see :func:`flax_attn.convert.module_key_map` for the map a conversion uses).

    Example:
        >>> from flax_attn.convert import module_key_map
        >>> from flax_attn.models import create_model
        >>> model = create_model("cbam_resnet18", num_classes=10)
        >>> torchvision_key_map(model).torch_key("layer1.0.attn.channel.fc1.kernel")
        'layer1.0.cbam.channel.fc1.weight'
        >>> module_key_map(model, torchvision_key_map(model)).torch_key("layer1.0.attn.channel.fc1.kernel")
        'layer1.0.cbam.ChannelGate.mlp.1.weight'
    """
    from flax_attn.models.resnet import ResNet

    renames: dict[str, str] = {}
    if isinstance(model, ResNet):
        for s in range(1, 5):
            for i, block in enumerate(getattr(model, f"layer{s}")):
                preset = getattr(block.attn, "preset", None)
                torch_name = RESNET_ATTN_TORCH_NAMES.get(preset) if isinstance(preset, str) else None
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
    strip_prefix: str | None = None,
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
    ``strip_prefix="module."`` removes a ``DataParallel`` / DDP prefix from the keys first. When the
    checkpoint's keys are not the model's, the error names the registered model(s) whose keys they are
    (``"resnet34"`` for a ResNet-34 checkpoint loaded as ``"resnet18"``), or says that none has them.

    Example:
        >>> import torchvision
        >>> tv = torchvision.models.resnet18(num_classes=10)
        >>> model = from_torchvision("resnet18", tv.state_dict())
        >>> model.fc.kernel.shape
        (512, 10)
    """
    from flax_attn.models import create_model

    if isinstance(name, nnx.Module):
        model = _load(name, state_dict, strict=strict, strip_prefix=strip_prefix)
        model.eval()
        return model
    if not isinstance(name, str):
        raise TypeError(f"name must be a model name or an nnx.Module, got {type(name).__name__}")
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping of tensors (model.state_dict()), got {type(state_dict).__name__}")
    sizes: Mapping[str, Any]
    if strip_prefix is not None:  # the checkpoint's own names decide num_classes / in_chans / width below
        p = strip_prefix if isinstance(strip_prefix, str) and strip_prefix.endswith(".") else f"{strip_prefix}."
        sizes = {k.removeprefix(p) if isinstance(k, str) else k: v for k, v in state_dict.items()}
    else:
        sizes = state_dict
    kwargs = _infer_kwargs(name.lower(), sizes, dict(model_kwargs))
    model = nnx.eval_shape(lambda: create_model(name, jit=False, rngs=nnx.Rngs(seed), **kwargs))
    _materialize_rng_state(model, seed)
    _load(model, state_dict, strict=strict, strip_prefix=strip_prefix)
    abstract = [".".join(map(str, p)) for p, v in nnx.iter_graph(model)
                if isinstance(v, nnx.Variable) and isinstance(v.get_value(), jax.ShapeDtypeStruct)]
    if abstract:  # only reachable with strict=False: refuse to hand back uninitialised variables
        raise ValueError(f"state_dict left {len(abstract)} variables unset (e.g. {abstract[:5]}); "
                         "build the model with create_model() and load with strict=False into it instead")
    model.eval()
    return model


def to_torchvision(model: nnx.Module) -> dict[str, Any]:
    """The ``state_dict`` (torch tensors) of ``model`` for its torchvision / ``torch_ref.resnet`` twin;
    ``twin.load_state_dict(to_torchvision(model))`` is strict-clean.

    Example:
        >>> import torchvision
        >>> from flax_attn.models import create_model
        >>> sd = to_torchvision(create_model("resnet18", num_classes=10))
        >>> torchvision.models.resnet18(num_classes=10).load_state_dict(sd)
        <All keys matched successfully>
    """
    return nnx_to_torch(model, key_map=torchvision_key_map(model))


def to_torchvision_numpy(model: nnx.Module) -> dict[str, np.ndarray]:
    """Like :func:`to_torchvision` with numpy arrays (no torch needed).

    Example:
        >>> from flax_attn.models import create_model
        >>> sd = to_torchvision_numpy(create_model("resnet18", num_classes=10))
        >>> sd["fc.weight"].shape, sd["bn1.num_batches_tracked"].dtype
        ((10, 512), dtype('int64'))
    """
    return nnx_to_numpy(model, key_map=torchvision_key_map(model))


# --------------------------------------------------------------------------------------------------
# which registered model does a checkpoint belong to?
# --------------------------------------------------------------------------------------------------


def _load(model: nnx.Module, state_dict: Mapping[str, Any], *, strict: bool, strip_prefix: str | None) -> nnx.Module:
    try:
        return torch_to_nnx(model, state_dict, key_map=torchvision_key_map(model), strict=strict,
                            strip_prefix=strip_prefix)
    except ConversionError as e:
        if not any(p.startswith(("missing:", "unexpected:")) for p in e.problems):
            raise  # only shapes / dtypes: the architecture is right
        keys = {k for k in state_dict if isinstance(k, str)}
        if strip_prefix is not None:
            p = strip_prefix if strip_prefix.endswith(".") else f"{strip_prefix}."
            keys = {k.removeprefix(p) for k in keys}
        raise e.with_hints(_architecture_hint(keys)) from None


def _family_of_checkpoint(keys: set[str]) -> str | None:
    for fam, (head, stem) in _HEAD_AND_STEM.items():
        if head in keys and stem in keys:
            return fam
    for fam, (_, stem) in _HEAD_AND_STEM.items():  # a headless checkpoint: the stem decides
        if stem in keys:
            return fam
    return None


def _count_blocks(keys: set[str], pattern: str) -> tuple[int, ...]:
    """Per stage (sorted by stage number), the number of distinct block indices matched by ``pattern``."""
    blocks: dict[int, set[str]] = {}
    rx = re.compile(pattern)
    for k in keys:
        m = rx.match(k)
        if m:
            blocks.setdefault(int(m.group(1)), set()).add(m.group(2))
    return tuple(len(blocks[s]) for s in sorted(blocks))


def _resnet_attn_kind(keys: set[str]) -> str | None:
    for kind, torch_name in (("se", "se"), ("cbam", "cbam")):
        if any(re.match(rf"layer\d\.\d+\.{torch_name}\.", k) for k in keys):
            return kind
    return None


def _checkpoint_signature(family: str, keys: set[str]) -> tuple | None:
    """Block structure read from the checkpoint's keys (``None``: no cheap signature for this family)."""
    if family == "resnet":
        block = "bottleneck" if any(re.match(r"layer1\.0\.conv3\.", k) for k in keys) else "basic"
        return (block, _resnet_attn_kind(keys), _count_blocks(keys, r"layer(\d)\.(\d+)\."))
    if family == "efficientnet":
        return _count_blocks(keys, r"features\.(\d+)\.(\d+)\.block\.")
    if family == "regnet":
        return _count_blocks(keys, r"trunk_output\.block(\d+)\.block\d+-(\d+)\.")
    return None


def _model_signature(name: str, family: str) -> tuple | None:
    """The same block structure from a registered model's configuration (no model is built)."""
    if family == "resnet":
        from flax_attn.models.registry import RESNET_ATTN_PRESETS, RESNET_DEPTHS

        m = re.search(r"resne(?:xt|t)(\d+)", name)
        if m is None or int(m.group(1)) not in RESNET_DEPTHS:
            return None
        kind = next((k for k in RESNET_ATTN_PRESETS if name.startswith(f"{k}_")), None)
        block, layers = RESNET_DEPTHS[int(m.group(1))]
        return (block, kind, tuple(layers))
    if family == "efficientnet":
        from flax_attn.models.efficientnet import EFFICIENTNET_CONFIGS

        cfg = EFFICIENTNET_CONFIGS.get(name)
        return None if cfg is None else tuple(s.num_layers for s in cfg.stages())
    if family == "regnet":
        from flax_attn.models.regnet import REGNET_CONFIGS, regnet_block_params

        regnet_cfg = REGNET_CONFIGS.get(name)
        return None if regnet_cfg is None else tuple(p[2] for p in regnet_block_params(regnet_cfg))
    return None


@functools.cache
def _registered_key_set(name: str) -> frozenset[str]:
    """The torch keys (without ``num_batches_tracked``) of registered model ``name`` with default options,
    from an abstract build (no initialisation); cached per process."""
    from flax_attn.models import create_model

    model = nnx.eval_shape(lambda: create_model(name, jit=False))
    slots, _, _ = _plan(model, torchvision_key_map(model))
    return frozenset(s.torch_key for s in slots if not s.is_nbt)


def closest_registered_models(keys: set[str]) -> tuple[str | None, list[str]]:
    """``(family, names)``: the checkpoint's model family and the registered models of that family whose
    torch key set (``num_batches_tracked`` aside) is exactly ``keys``; candidates are narrowed by their block
    counts first, so only models with the checkpoint's block structure are built (abstractly, cached).

    Example:
        >>> from flax_attn.models import create_model
        >>> keys = set(to_torchvision_numpy(create_model("resnet18", num_classes=10)))
        >>> closest_registered_models(keys)
        ('resnet', ['resnet18'])
    """
    from flax_attn.models import list_models

    family = _family_of_checkpoint(keys)
    if family is None:
        return None, []
    target = frozenset(k for k in keys if not k.endswith(f".{NBT}"))
    signature = _checkpoint_signature(family, keys)
    found = []
    for name in list_models():
        try:
            if _family(name) != family:
                continue
        except ValueError:
            continue
        if signature is not None and _model_signature(name, family) != signature:
            continue
        if _registered_key_set(name) == target:
            found.append(name)
    return family, found


def _architecture_hint(keys: set[str]) -> str:
    family, names = closest_registered_models(keys)
    if names:
        shapes = " (their shapes decide which)" if len(names) > 1 else ""
        listed = ", ".join(repr(n) for n in names)
        return (f"hint: registered model{'s' * (len(names) > 1)} with exactly these keys: {listed}{shapes}; "
                f"load with from_torchvision({names[0]!r}, state_dict)")
    if family is None:
        return "hint: the checkpoint's keys match no registered torchvision model family (stem and head keys unknown)"
    signature = _checkpoint_signature(family, keys)
    blocks = f" with blocks per stage {signature[-1] if family == 'resnet' else signature}" if signature else ""
    return (f"hint: no registered model has exactly the checkpoint's keys (they look like a checkpoint of the "
            f"{family} family{blocks}); the architecture is probably not one of flax_attn.models.list_models()")


__all__ = ["RESNET_ATTN_TORCH_NAMES", "closest_registered_models", "from_torchvision", "to_torchvision",
           "to_torchvision_numpy", "torchvision_key_map"]
