"""Tensor <-> numpy without importing torch unless a torch tensor is actually handled.

``bfloat16`` and the float8 types have no numpy dtype of their own; they travel as ``ml_dtypes`` arrays
(the dtypes JAX uses), bit for bit, through a same-width integer view.
"""

from __future__ import annotations

import sys
from typing import Any

import ml_dtypes
import numpy as np

# torch dtype name -> (ml_dtypes dtype, same-width integer view dtype)
_ML_DTYPES = {
    "bfloat16": (np.dtype(ml_dtypes.bfloat16), "int16"),
    "float8_e4m3fn": (np.dtype(ml_dtypes.float8_e4m3fn), "uint8"),
    "float8_e5m2": (np.dtype(ml_dtypes.float8_e5m2), "uint8"),
}


def is_torch_tensor(x: Any) -> bool:
    """True for a ``torch.Tensor`` (never imports torch: without it loaded there can be no tensor)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def tensor_to_numpy(x: Any) -> np.ndarray:
    """A torch tensor, numpy array or JAX array as a numpy array with the same dtype and values.

    A tensor without data (on the ``meta`` device) or one numpy cannot hold raises ``TypeError``.
    """
    if is_torch_tensor(x):
        import torch

        t = x.detach()
        if t.is_meta:
            raise TypeError(f"a meta tensor (shape {tuple(t.shape)}, {t.dtype}) has no data: the model was built "
                            "under torch.device('meta') or loaded with assign/mmap without materialising it; "
                            "load real weights (e.g. model.to_empty(device='cpu') and then load_state_dict) first")
        if t.device.type != "cpu":
            t = t.cpu()
        if t.is_sparse or t.layout != torch.strided:
            raise TypeError(f"sparse/non-strided tensors are not supported (layout {t.layout})")
        if t.is_quantized:
            raise TypeError(f"quantized tensors cannot be represented in Flax (dtype {t.dtype})")
        name = str(t.dtype).removeprefix("torch.")
        if name in _ML_DTYPES:
            np_dtype, view = _ML_DTYPES[name]
            return t.contiguous().view(getattr(torch, view)).numpy().view(np_dtype)
        try:
            return t.numpy()
        except TypeError as e:
            raise TypeError(f"torch dtype {t.dtype} cannot be represented as a numpy/JAX array ({e})") from None
    arr = np.asarray(x)
    if arr.dtype == object:
        raise TypeError(f"expected a tensor or an array, got {type(x).__name__}")
    return arr


def numpy_to_tensor(arr: np.ndarray):
    """A numpy array as a CPU torch tensor (copied; bfloat16/float8 via their bit patterns)."""
    import torch

    arr = np.require(arr, requirements="C")
    for name, (np_dtype, view) in _ML_DTYPES.items():
        if arr.dtype == np_dtype:
            return torch.from_numpy(arr.view(view).copy()).view(getattr(torch, name))
    return torch.from_numpy(arr.copy())
