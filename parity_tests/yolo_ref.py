"""The YOLOv5 7.0 package (``pip install --no-deps yolov5==7.0.14``, AGPL, test-only) as a parity reference.

Never vendored, never imported by ``flax_attn``: only the parity suite builds the package's
``yolov5.models.yolo.Model`` from the YAML configs it ships (offline: ``YOLO_OFFLINE=1`` is set before the
import, the package would otherwise try to reach the network for fonts / updates).

* :func:`package_model` builds ``Model("<package>/models/<name>.yaml", nc=...)`` in eval mode, with every
  floating parameter drawn afresh (:func:`parity_tests._utils.randomize_module_`) and random BatchNorm
  statistics drawn *around the statistics the network actually produces* (:func:`calibrate_bn_`): a
  BN's running mean/var are set from one random calibration batch, then the mean is shifted by
  ``0.3 std N(0, 1)`` and the variance scaled by ``U(0.6, 1.4)`` (per channel, never identity).
  Why not purely random statistics (mean ~ N(0, 0.25), var ~ U(0.5, 2), as the backbone tests use): over
  YOLOv5's 60 conv+BN layers those let the activations grow layer after layer, and the float32 output of
  the *package itself* is then 3e-5 .. 1e-4 away from its own float64 run (measured, yolov5n 320x416),
  i.e. the reference is ill-conditioned and a 1e-5 comparison measures rounding, not the port. A trained
  network's statistics match its activations, which is what the calibrated draw reproduces.
* :func:`yolov5_available` tells whether the package imports (the tests fail, not skip, without it: it is
  in ``requirements/yolov5-test.txt`` and installed by ``make test``).
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os

import torch

from parity_tests._utils import randomize_module_

os.environ.setdefault("YOLO_OFFLINE", "1")


@functools.cache
def _package():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pkg_resources deprecation, pandas/seaborn chatter
        import yolov5
        from yolov5.models import yolo as yolo_mod
    logging.getLogger("yolov5").setLevel(logging.ERROR)
    return yolov5, yolo_mod


def yaml_path(name: str) -> str:
    """Path of the package's ``models/<name>.yaml``."""
    yolov5, _ = _package()
    return os.path.join(os.path.dirname(yolov5.__file__), "models", f"{name}.yaml")


def calibrate_bn_(model: torch.nn.Module, seed: int = 0, shape: tuple[int, ...] = (2, 3, 128, 160)) -> torch.nn.Module:
    """Random BatchNorm statistics around those of one random batch (see the module docstring); eval mode.

    Works on any torch module with BatchNorm2d layers (the package's YOLOv5, ``torch_ref.yolo.YOLOv5``).
    ``num_batches_tracked`` is left random (set by :func:`randomize_module_`).
    """
    g = torch.Generator().manual_seed(seed + 1)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    saved = [(b.momentum, b.num_batches_tracked.clone()) for b in bns]
    for b in bns:
        b.momentum = 1.0  # running stats := this batch's statistics
    model.train()
    with torch.no_grad():
        model(torch.randn(shape, generator=g))
        for b, (momentum, nbt) in zip(bns, saved):
            b.momentum = momentum
            b.num_batches_tracked.copy_(nbt)
            std = b.running_var.sqrt()
            b.running_mean.add_(0.3 * std * torch.randn(b.running_mean.shape, generator=g))
            b.running_var.mul_(0.6 + 0.8 * torch.rand(b.running_var.shape, generator=g))
    return model.eval()


def package_model(name: str = "yolov5s", *, nc: int = 80, seed: int = 0, randomize: bool = True) -> torch.nn.Module:
    """The package's YOLOv5 (eval mode, float32); random weights and calibrated-random BN statistics when
    ``randomize`` (else the package's own initialisation)."""
    _, yolo_mod = _package()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        torch.manual_seed(seed)
        model = yolo_mod.Model(yaml_path(name), ch=3, nc=nc)
    if randomize:
        randomize_module_(model, seed=seed, scale=0.5)
        calibrate_bn_(model, seed=seed)
    return model.eval()
