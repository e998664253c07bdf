"""The YOLOv5 7.0 package (``pip install --no-deps yolov5==7.0.14``, AGPL, test-only) as a parity reference.

Never vendored, never imported by ``flax_attn``: only the parity suite builds the package's
``yolov5.models.yolo.Model`` from the YAML configs it ships (offline: ``YOLO_OFFLINE=1`` is set before the
import, the package would otherwise try to reach the network for fonts / updates).

* :func:`package_model` builds ``Model("<package>/models/<name>.yaml", nc=...)`` in eval mode, with every
  floating parameter drawn afresh (:func:`parity_tests._utils.randomize_module_`) and random BatchNorm
  statistics drawn *around the statistics the network actually produces* (:func:`calibrate_bn_`): each
  BN's running mean/var are set from its input on one random calibration batch, then the mean is shifted
  by ``0.3 std N(0, 1)`` and the variance scaled by ``U(0.6, 1.4)`` (per channel, never identity).
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
    """Random BatchNorm statistics around those each BN sees (see the module docstring); eval mode.

    One eval-mode forward pass of a random batch with a pre-hook on every BatchNorm2d that, just before the
    layer runs, sets its running mean / variance from its actual input (per channel), then shifts the mean
    by ``0.3 std N(0, 1)`` and scales the variance by ``U(0.6, 1.4)``. Every BN therefore sees the
    *perturbed* output of the layers before it, so the perturbations do not compound over depth (setting
    all statistics from one training-mode pass and perturbing afterwards lets the eval activations grow
    ~1000x by layer 23, and the float32 reference becomes ill-conditioned again). Works on any torch module
    with BatchNorm2d layers; ``num_batches_tracked`` keeps its (random) value.
    """
    g = torch.Generator().manual_seed(seed + 1)

    def pre_hook(bn: torch.nn.BatchNorm2d, args: tuple[torch.Tensor, ...]) -> None:
        x = args[0].detach()
        mean = x.mean(dim=(0, 2, 3))
        var = x.var(dim=(0, 2, 3), unbiased=False).clamp_min(1e-6)
        bn.running_mean.copy_(mean + 0.3 * var.sqrt() * torch.randn(mean.shape, generator=g).to(mean.dtype))
        bn.running_var.copy_(var * (0.6 + 0.8 * torch.rand(var.shape, generator=g)).to(var.dtype))

    handles = [m.register_forward_pre_hook(pre_hook) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    model.eval()
    try:
        with torch.no_grad():
            model(torch.randn(shape, generator=g))
    finally:
        for h in handles:
            h.remove()
    return model


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
