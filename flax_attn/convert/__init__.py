"""PyTorch / safetensors <-> Flax weight conversion: a fixed layout rule table plus per-model key maps.

Layout rules (DESIGN.md "Weight layout rules"), applied to every ``nnx.Param`` / ``nnx.BatchStat``
(Linen: the ``params`` / ``batch_stats`` collections):

=================================  ==============================  ==========================================
Flax variable                      PyTorch key                     layout
=================================  ==============================  ==========================================
``a.b.kernel`` (2-D, Dense)        ``a.b.weight`` (Linear)         ``(in, out)`` <-> ``(out, in)``; a torch
                                                                   1x1 conv ``(out, in, 1, 1)`` is accepted
                                                                   on import and written on export where
                                                                   the key map marks it (``conv1x1``)
``a.b.kernel`` (n+2-D, Conv)       ``a.b.weight`` (ConvNd)         ``(*k, in/g, out)`` <-> ``(out, in/g, *k)``
``a.b.scale`` / ``bias``           ``a.b.weight`` / ``bias``       same shape
``a.b.mean`` / ``var``             ``running_mean``/``running_var`` same shape
``a.b.num_batches_tracked``        ``num_batches_tracked``         int32 <-> int64, same value
``a.b.embedding``                  ``a.b.weight`` (Embedding)      same shape
anything else                      same name                       same shape
=================================  ==============================  ==========================================

Module paths are renamed by a :class:`KeyMap` (``{flax_prefix: torch_prefix}`` renames, ``conv1x1`` marks,
``nested`` sub-maps under a prefix); ``key_map=None`` uses the map registered for ``module.preset``
(presets of :func:`flax_attn.create_attn` are registered, see ``flax_attn/convert/_presets.py``) or
identity. In NNX modules, sub-modules that record a ``preset`` get their map at their path automatically,
so a model map embeds block maps without listing them; ``nnx.Sequential``'s ``layers`` component is
dropped (``features.0.kernel`` <-> ``features.0.weight``, as torch's ``nn.Sequential``). Model maps:
``register_key_map("my_resnet", KeyMap({...}, nested={"layer1.0.attn": "cbam_official"}))``.

Strictness: every missing variable, unexpected key, shape mismatch and dtype mismatch is collected and
raised together as one :class:`ConversionError` (a ``ValueError``) before anything is written;
``strict=False`` downgrades missing/unexpected keys to a :class:`ConversionWarning`. Dtypes are kept: a
checkpoint dtype other than the variable's is an error unless ``cast=True``. A torch BatchNorm's
``num_batches_tracked`` missing from an old checkpoint leaves the Flax counter unchanged; a Flax BatchNorm
without a counter (``flax.nnx.BatchNorm``) drops it on import and exports ``0``.

torch is imported only inside the functions that make or read torch tensors; ``nnx_to_numpy``,
``linen_to_numpy`` and the safetensors helpers never need it.

Example:
    >>> import numpy as np
    >>> from flax import nnx
    >>> from flax_attn import create_attn
    >>> from flax_attn.convert import nnx_to_numpy, torch_to_nnx
    >>> a = create_attn("cbam_timm", 32, rngs=nnx.Rngs(0))
    >>> b = torch_to_nnx(create_attn("cbam_timm", 32, rngs=nnx.Rngs(1)), nnx_to_numpy(a))
    >>> bool(np.array_equal(a.spatial.conv.kernel[...], b.spatial.conv.kernel[...]))
    True
"""

# The implementation modules are private (``_keymap``: key maps and their registry; ``_rules``: the layout rule
# engine; ``_nnx`` / ``_linen``: front ends; ``_torchvision``: torchvision models; ``_presets``: the attention
# presets' maps, registered on import). Everything public is imported here, and only from here.
from flax_attn.convert import _presets  # noqa: F401  (registers the preset key maps)
from flax_attn.convert._errors import ConversionError, ConversionWarning
from flax_attn.convert._keymap import KeyMap, get_key_map, list_key_maps, register_key_map
from flax_attn.convert._linen import (
    linen_to_numpy,
    linen_to_torch,
    linen_variables_to_nnx,
    nnx_to_linen_variables,
    torch_to_linen,
)
from flax_attn.convert._nnx import module_key_map, nnx_to_numpy, nnx_to_torch, torch_to_nnx
from flax_attn.convert._safetensors import load_safetensors, save_safetensors
from flax_attn.convert._torchvision import (
    closest_registered_models,
    from_torchvision,
    to_torchvision,
    to_torchvision_numpy,
    torchvision_key_map,
)

__all__ = [
    "ConversionError",
    "ConversionWarning",
    "KeyMap",
    "closest_registered_models",
    "from_torchvision",
    "get_key_map",
    "linen_to_numpy",
    "linen_to_torch",
    "linen_variables_to_nnx",
    "list_key_maps",
    "load_safetensors",
    "module_key_map",
    "nnx_to_linen_variables",
    "nnx_to_numpy",
    "nnx_to_torch",
    "register_key_map",
    "save_safetensors",
    "to_torchvision",
    "to_torchvision_numpy",
    "torch_to_linen",
    "torch_to_nnx",
    "torchvision_key_map",
]

# YOLOv5 key maps (flax_attn/convert/_yolo.py) are exported below this line.
from flax_attn.convert._yolo import YOLOV5_KEY_MAP, from_yolov5, to_yolov5, to_yolov5_numpy

__all__ += ["YOLOV5_KEY_MAP", "from_yolov5", "to_yolov5", "to_yolov5_numpy"]
