"""ROADCombined of flax_attn.cam vs pytorch_grad_cam 1.5.7 on the same ResNet weights, one run, side by side.

grad-cam: ``ROADCombined(percentiles)(x, cams, targets, model)``: per percentile, LeRF and MoRF, per image,
scipy's sparse LU (``spsolve``, float64, CPU) of the noisy-linear-imputation system, then one torch forward
per percentile and order. Ours: one jitted call: every (order, percentile, image) system solved at once by a
batched float32 conjugate gradient on the device, all perturbed images scored in one forward (or chunks of
``--batch-size``). Both sides impute WITHOUT noise here (grad-cam's ``torch.randn_like`` patched to zeros,
ours ``noise=0``), so that the scores can be compared ("max abs diff"); the noise costs nothing on either
side. Weights: torchvision's random init with randomised BatchNorm statistics; cams: smooth random maps.
The first (compiling) call of ours is reported separately and excluded from the median.

Usage: ``python benchmarks/bench_cam_metrics.py [--model resnet18] [--batch 8] [--size 224]
[--percentiles 10,20,...,90] [--repeats 1] [--threads 2] [--tol 1e-6]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout


def smooth_cams(b: int, size: int, seed: int) -> np.ndarray:
    import cv2

    rng = np.random.default_rng(seed)
    out = np.stack([cv2.resize(rng.random((7, 7)).astype(np.float32), (size, size), interpolation=cv2.INTER_LINEAR)
                    for _ in range(b)])
    out += 1e-4 * rng.random(out.shape).astype(np.float32)  # no exact ties at a threshold
    lo, hi = out.min((1, 2), keepdims=True), out.max((1, 2), keepdims=True)
    return ((out - lo) / (hi - lo)).astype(np.float32)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18", help="a torchvision ResNet name (resnet18, resnet50, ...)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--percentiles", default="10,20,30,40,50,60,70,80,90")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--tol", type=float, default=1e-6, help="our conjugate-gradient tolerance ||r|| <= tol ||b||")
    p.add_argument("--batch-size", type=int, default=None, help="our forward chunk (default: all images at once)")
    p.add_argument("--skip-gradcam", action="store_true", help="time ours only")
    args = p.parse_args(argv)

    import jax
    import torch
    import torchvision
    from pytorch_grad_cam.metrics import road as groad
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget as GTarget

    import flax_attn.cam as fc
    from benchmarks._timing import machine_description
    from flax_attn.convert import from_torchvision

    jax.config.update("jax_default_matmul_precision", "highest")
    torch.set_num_threads(args.threads)
    percentiles = [float(v) if "." in v else int(v) for v in args.percentiles.split(",")]

    torch.manual_seed(0)
    tm = torchvision.models.get_model(args.model, num_classes=1000)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in tm.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
    tm.eval()
    fm = from_torchvision(args.model, tm.state_dict())

    rng = np.random.default_rng(0)
    x = rng.normal(0.0, 1.0, (args.batch, args.size, args.size, 3)).astype(np.float32)
    cams = smooth_cams(args.batch, args.size, 1)
    classes = [int(c) for c in rng.integers(0, 1000, args.batch)]
    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))

    print(f"# {machine_description()}; load average {os.getloadavg()[0]:.1f}")
    print(f"# {args.model}, batch {args.batch}, {args.size}x{args.size}, percentiles {percentiles}, "
          f"{2 * len(percentiles) * args.batch} imputed images per call, tol {args.tol:g}")

    ours = fc.ROADCombined(percentiles, noise=0.0, tol=args.tol, batch_size=args.batch_size)
    targets = [fc.ClassifierOutputTarget(c) for c in classes]

    def run_ours():
        return np.asarray(jax.block_until_ready(ours(x, cams, targets, fm)))

    t0 = time.perf_counter()
    o = run_ours()
    first = time.perf_counter() - t0
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        o = run_ours()
        times.append(time.perf_counter() - t0)
    t_ours = statistics.median(times)

    t_ref, diff = float("nan"), float("nan")
    if not args.skip_gradcam:
        real = groad.torch.randn_like
        groad.torch.randn_like = torch.zeros_like  # noise-free on both sides: comparable scores
        try:
            gtargets = [GTarget(c) for c in classes]
            ref_times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                ref = groad.ROADCombined(percentiles)(xt, cams, gtargets, tm)
                ref_times.append(time.perf_counter() - t0)
            t_ref = statistics.median(ref_times)
            diff = float(np.abs(o - ref).max())
        finally:
            groad.torch.randn_like = real

    print(f"# load average after the run {os.getloadavg()[0]:.1f}")
    print()
    print("| implementation | ROADCombined s | speed-up | first call s | max abs diff (scores) |")
    print("|---|---:|---:|---:|---:|")
    print(f"| grad-cam 1.5.7 (scipy spsolve, torch {args.threads} threads) | {t_ref:.2f} |  |  |  |")
    print(f"| flax_attn (jit, batched CG, {jax.default_backend()}) | {t_ours:.2f} | {t_ref / t_ours:.2f}x | "
          f"{first:.1f} | {diff:.1e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
