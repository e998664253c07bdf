"""YOLOv5 (ultralytics/yolov5 v7.0 and ``torch_ref.yolo``) weights <-> :class:`flax_attn.models.YOLOv5`.

The Flax model mirrors the PyTorch module names (``model.0.conv.weight`` <-> ``model.0.conv.kernel``,
``model.24.m.0.weight`` <-> ``model.24.m.0.kernel``, ``model.24.anchors`` <-> ``model.24.anchors``), so
the conversion is the rule table of :mod:`flax_attn.convert` with the identity key map ``"yolov5"``; the
attention blocks of a YOLOv5 + attention model (``model.{2,4,6,8}.attn``, ``model.9.attn``) bring their
presets' maps along automatically. The ``anchors`` buffer (stride units, as PyTorch stores it after model
construction, autoanchor-adjusted in trained checkpoints) is loaded and exported like any other variable.

A ``yolov5s.pt`` checkpoint is a pickled model; with the YOLOv5 package importable (it holds the classes)::

    ckpt = torch.load("yolov5s.pt", map_location="cpu", weights_only=False)
    state_dict = ckpt["model"].float().state_dict()

torch is imported only by :func:`to_yolov5`; :func:`from_yolov5` accepts torch tensors or numpy arrays.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx

from flax_attn.convert._keymap import KeyMap, register_key_map
from flax_attn.convert._nnx import nnx_to_numpy, nnx_to_torch, torch_to_nnx

#: identity names: the Flax paths are the PyTorch ones
YOLOV5_KEY_MAP: KeyMap = register_key_map("yolov5", KeyMap(name="yolov5"))

_HEAD = "model.24.m.0.weight"
_ANCHORS = "model.24.anchors"
_STEM = "model.0.conv.weight"


def _infer_kwargs(state_dict: Mapping[str, Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    na = int(np.shape(state_dict[_ANCHORS])[1]) if _ANCHORS in state_dict else 3
    if "num_classes" not in kwargs and _HEAD in state_dict:
        out = int(np.shape(state_dict[_HEAD])[0])
        if out % na or out // na <= 5:
            raise ValueError(f"state_dict[{_HEAD!r}] has {out} output channels: expected na * (5 + nc) with "
                             f"na = {na} anchors per level")
        kwargs["num_classes"] = out // na - 5
    if "in_chans" not in kwargs and _STEM in state_dict:
        kwargs["in_chans"] = int(np.shape(state_dict[_STEM])[1])
    return kwargs


def from_yolov5(
    name: str | nnx.Module,
    state_dict: Mapping[str, Any],
    *,
    strict: bool = True,
    cast: bool = False,
    **model_kwargs: Any,
) -> nnx.Module:
    """An eval-mode :class:`flax_attn.models.YOLOv5` holding the weights of a YOLOv5 ``state_dict``.

    ``name``: ``"yolov5n"`` .. ``"yolov5x"`` (or a built Flax YOLOv5 to load into). ``num_classes`` and
    ``in_chans`` are read from the checkpoint unless given (``model.24.m.0.weight`` has
    ``3 * (5 + nc)`` rows); other keywords (``attn``, ``attn_positions``, ...) go to
    :func:`flax_attn.models.create_model`. The model is built abstractly (no random initialisation) and
    filled; strict: a missing or unexpected key or a shape / dtype mismatch raises one
    :class:`~flax_attn.convert.ConversionError` listing them all, and nothing is loaded. A half-precision
    checkpoint needs ``cast=True`` (or ``.float()`` before ``state_dict()``).

    Example:
        >>> from flax_attn.models import create_model
        >>> sd = to_yolov5_numpy(create_model("yolov5n", num_classes=2))
        >>> model = from_yolov5("yolov5n", sd)
        >>> model.num_classes, model.model[24].anchors.shape
        (2, (3, 3, 2))
    """
    from flax_attn.models import create_model
    from flax_attn.models.yolo import YOLOv5

    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping of tensors (model.state_dict()), got {type(state_dict).__name__}")
    if isinstance(name, nnx.Module):
        if not isinstance(name, YOLOv5):
            raise TypeError(f"name must be a YOLOv5 variant name or a flax_attn YOLOv5 model, got {type(name).__name__}")
        torch_to_nnx(name, state_dict, key_map=YOLOV5_KEY_MAP, strict=strict, cast=cast)
        name.eval()
        return name
    if not isinstance(name, str) or not name.lower().startswith("yolov5"):
        raise ValueError(f"name must be one of 'yolov5n', 'yolov5s', 'yolov5m', 'yolov5l', 'yolov5x', got {name!r}")
    kwargs = _infer_kwargs(state_dict, dict(model_kwargs))
    model = nnx.eval_shape(lambda: create_model(name, jit=False, rngs=nnx.Rngs(0), **kwargs))
    torch_to_nnx(model, state_dict, key_map=YOLOV5_KEY_MAP, strict=strict, cast=cast)
    abstract = [".".join(map(str, p)) for p, v in nnx.iter_graph(model)
                if isinstance(v, nnx.Variable) and isinstance(v.get_value(), jax.ShapeDtypeStruct)]
    if abstract:  # only reachable with strict=False
        raise ValueError(f"state_dict left {len(abstract)} variables unset (e.g. {abstract[:5]}); build the model "
                         "with create_model() and load with strict=False into it instead")
    model.eval()
    return model


def to_yolov5(model: nnx.Module) -> dict[str, Any]:
    """The ``state_dict`` (torch tensors) of a Flax YOLOv5 for the YOLOv5 package's ``Model`` (or
    ``torch_ref.yolo.YOLOv5`` with the same attention): ``load_state_dict(sd, strict=True)`` is clean and a
    round trip is bit exact (``anchors`` and ``num_batches_tracked`` included).

    Example:
        >>> from flax_attn.models import create_model
        >>> sd = to_yolov5(create_model("yolov5n"))
        >>> tuple(sd["model.24.anchors"].shape), tuple(sd["model.24.m.0.weight"].shape)
        ((3, 3, 2), (255, 64, 1, 1))
    """
    _check(model)
    return nnx_to_torch(model, key_map=YOLOV5_KEY_MAP)


def to_yolov5_numpy(model: nnx.Module) -> dict[str, np.ndarray]:
    """Like :func:`to_yolov5` with numpy arrays (no torch needed)."""
    _check(model)
    return nnx_to_numpy(model, key_map=YOLOV5_KEY_MAP)


def _check(model: Any) -> None:
    from flax_attn.models.yolo import YOLOv5

    if not isinstance(model, YOLOv5):
        raise TypeError(f"model must be a flax_attn.models.YOLOv5, got {type(model).__name__}")


__all__ = ["YOLOV5_KEY_MAP", "from_yolov5", "to_yolov5", "to_yolov5_numpy"]
