"""Shared helpers of the parity suite: error measures, layout moves, random weights and BN statistics.

Import from any parity test: ``from parity_tests._utils import rel_err, assert_close, randomize_module_``.

* :func:`rel_err` is the project's measure ``||a - b|| / ||b||`` (float64, ``b`` is the reference);
  :func:`assert_close` fails with the relative and max-abs errors and the shapes in the message.
* :func:`to_channels_last` / :func:`to_channels_first` move the channel axis of N-D arrays
  (``(N, C, *spatial)`` <-> ``(N, *spatial, C)``); :func:`to_numpy` takes torch tensors, JAX arrays, numpy.
* :func:`randomize_module_` draws every floating parameter of a torch module afresh (never the default
  init) and randomises every BatchNorm's running statistics and ``num_batches_tracked`` (never identity:
  mean ~ N(0, 0.5^2), var ~ U(0.5, 2)). :func:`randomize_bn_stats_` does the BatchNorm part only.
* :func:`build_flax` builds an NNX module abstractly (``nnx.eval_shape``) and fills it with zeros held in
  host memory: no initialiser runs, so no per-shape XLA compilation (eager init costs ~1 s of CPU per block
  configuration). Use it when every variable is then loaded from a torch ``state_dict``.
* :func:`random_input` draws a float32 NCHW input from a continuous distribution (no zeros; ties in a
  ``max`` have probability ~0, which matters because frameworks route tie gradients differently).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import torch
from torch import nn

__all__ = [
    "assert_close",
    "build_flax",
    "max_abs",
    "random_input",
    "randomize_bn_stats_",
    "randomize_module_",
    "rel_err",
    "to_channels_first",
    "to_channels_last",
    "to_numpy",
]

_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def to_numpy(x: Any) -> np.ndarray:
    """A numpy copy of a torch tensor (detached, on CPU), a JAX array or anything ``np.asarray`` takes."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def to_channels_last(x: Any) -> np.ndarray:
    """``(N, C, *spatial)`` -> ``(N, *spatial, C)`` (NCHW -> NHWC, also 1-D and 3-D)."""
    return np.moveaxis(to_numpy(x), 1, -1)


def to_channels_first(x: Any) -> np.ndarray:
    """``(N, *spatial, C)`` -> ``(N, C, *spatial)`` (NHWC -> NCHW, also 1-D and 3-D)."""
    return np.moveaxis(to_numpy(x), -1, 1)


def rel_err(a: Any, b: Any) -> float:
    """``||a - b|| / ||b||`` in float64 (``b`` is the reference); 0 when both are zero."""
    a64 = to_numpy(a).astype(np.float64)
    b64 = to_numpy(b).astype(np.float64)
    if a64.shape != b64.shape:
        raise AssertionError(f"shape mismatch: {a64.shape} vs reference {b64.shape}")
    num = np.linalg.norm((a64 - b64).ravel())
    den = np.linalg.norm(b64.ravel())
    if den == 0.0:
        return float(num)
    return float(num / den)


def max_abs(a: Any, b: Any) -> float:
    """Largest absolute elementwise difference."""
    return float(np.max(np.abs(to_numpy(a).astype(np.float64) - to_numpy(b).astype(np.float64)), initial=0.0))


def assert_close(actual: Any, reference: Any, tol: float = 1e-5, what: str = "value") -> None:
    """Fails unless ``rel_err(actual, reference) <= tol``; the message says what, how far, and the shapes."""
    a, b = to_numpy(actual), to_numpy(reference)
    if a.shape != b.shape:
        raise AssertionError(f"{what}: shape {a.shape} != reference shape {b.shape}")
    if not np.all(np.isfinite(a)):
        raise AssertionError(f"{what}: non-finite values in the result")
    err = rel_err(a, b)
    if not err <= tol:
        raise AssertionError(f"{what}: rel err {err:.3e} > {tol:.0e} (max abs {max_abs(a, b):.3e}, shape {a.shape})")


def randomize_bn_stats_(module: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """Random running mean / variance / ``num_batches_tracked`` for every BatchNorm in ``module``."""
    g = generator if generator is not None else torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, _BN_TYPES) and m.track_running_stats:
                m.running_mean.copy_(0.5 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + 1.5 * torch.rand(m.running_var.shape, generator=g))
                m.num_batches_tracked.fill_(int(torch.randint(1, 1000, (1,), generator=g)))
    return module


def randomize_module_(module: nn.Module, seed: int = 0, scale: float = 0.5) -> nn.Module:
    """Fresh random values for every floating parameter (weights ~ N(0, scale^2 / fan_in) * sqrt(3),
    biases and BN affine ~ N(0, scale^2) around their usual centre) and random BatchNorm statistics.

    The draw is far from any default init (BN weight is ``1 + N(0, scale^2)``, not 1; biases are not 0).
    """
    g = torch.Generator().manual_seed(seed)
    bn_params = {id(p) for m in module.modules() if isinstance(m, _BN_TYPES) for p in m.parameters(recurse=False)}
    bn_weights = {id(m.weight) for m in module.modules() if isinstance(m, _BN_TYPES) and m.weight is not None}
    with torch.no_grad():
        for p in module.parameters():
            if not p.is_floating_point():
                continue
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype)
            if id(p) in bn_params:
                p.copy_((1.0 if id(p) in bn_weights else 0.0) + scale * noise)
            elif p.ndim >= 2:
                fan_in = int(np.prod(p.shape[1:]))
                p.copy_(noise * (3.0 ** 0.5) / max(1, fan_in) ** 0.5)
            else:
                p.copy_(scale * noise)
    return randomize_bn_stats_(module, g)


def random_input(shape: tuple[int, ...], seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A random float input of ``shape`` (channels-first), ``N(0.1, 1)`` so that no value is 0."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) + 0.1).to(dtype)


def build_flax(factory: Callable[[], Any]) -> Any:
    """``factory()`` (an NNX module constructor call) built abstractly, every variable set to zeros.

    For parity tests that overwrite all variables with ``torch_to_nnx(..., strict=True)`` right after.
    """
    from flax import nnx

    abstract = nnx.eval_shape(factory)
    graphdef, state = nnx.split(abstract)
    state = jax.tree.map(lambda s: jax.device_put(np.zeros(s.shape, s.dtype)), state)
    return nnx.merge(graphdef, state)
