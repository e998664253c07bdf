"""safetensors files as numpy ``state_dict``s (works without torch: ``safetensors.numpy``)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from flax_attn.convert._arrays import tensor_to_numpy


def _safetensors_numpy():
    try:
        import safetensors.numpy as stn
    except ImportError as e:  # pragma: no cover - safetensors is in the [safetensors] / [test] extras
        raise ImportError("safetensors files need the 'safetensors' package: pip install 'flax-attn[safetensors]'"
                          ) from e
    return stn


def load_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a ``.safetensors`` file into ``{key: numpy array}`` (torch layout, dtypes kept; no torch needed).

    bfloat16 / float8 tensors come back as ``ml_dtypes`` arrays, bit for bit.

    Example:
        >>> import tempfile, os, numpy as np
        >>> p = os.path.join(tempfile.mkdtemp(), "w.safetensors")
        >>> save_safetensors({"fc.0.weight": np.ones((2, 32), np.float32)}, p)
        >>> load_safetensors(p)["fc.0.weight"].shape
        (2, 32)
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no safetensors file at {os.fspath(path)!r}")
    return dict(_safetensors_numpy().load_file(os.fspath(path)))


def save_safetensors(state_dict: Mapping[str, Any], path: str | os.PathLike, *,
                     metadata: Mapping[str, str] | None = None) -> None:
    """Writes ``{key: torch tensor or numpy/JAX array}`` to a ``.safetensors`` file (torch not needed).

    The file is what ``safetensors.torch.save_file`` would write for the same tensors, so PyTorch code
    reads it with ``safetensors.torch.load_file``. Typical use: ``save_safetensors(nnx_to_numpy(model), p)``.

    Example:
        >>> import tempfile, os, numpy as np
        >>> p = os.path.join(tempfile.mkdtemp(), "w.safetensors")
        >>> save_safetensors({"bn.num_batches_tracked": np.array(3, np.int64)}, p, metadata={"format": "pt"})
        >>> int(load_safetensors(p)["bn.num_batches_tracked"])
        3
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping {{key: array}}, got {type(state_dict).__name__}")
    arrays = {}
    for k, v in state_dict.items():
        if not isinstance(k, str):
            raise TypeError(f"safetensors keys must be strings, got {k!r}")
        try:
            arrays[k] = np.require(tensor_to_numpy(v), requirements="C")
        except TypeError as e:
            raise TypeError(f"state_dict[{k!r}]: {e}") from None
    _safetensors_numpy().save_file(arrays, os.fspath(path), metadata=dict(metadata) if metadata else None)
