"""KPCA-CAM, FEM and DeepFeatureFactorization: flax_attn.cam vs pytorch_grad_cam 1.5.7, same weights, CPU.

torchvision ResNet-50 (random weights, randomised BatchNorm statistics) at ``layer4`` (2048 channels), a batch
of images: median wall time of one call (the first, compiling call of ours excluded and reported
separately), the speed-up, and the max |diff| of the maps (DFF: of the concept scores through ``fc``,
relative). Both sides are timed alternately in the same run; torch uses ``--threads`` threads.

Usage: ``python benchmarks/bench_cam_factorization.py [--batch 2] [--size 224] [--repeats 3] [--components 5]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--components", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")

    import jax
    import jax.numpy as jnp
    import pytorch_grad_cam as pgc
    import torch
    import torchvision
    from pytorch_grad_cam.feature_factorization.deep_feature_factorization import DeepFeatureFactorization as GcDFF

    import flax_attn.cam as fc
    from flax_attn.convert import from_torchvision

    jax.config.update("jax_default_matmul_precision", "highest")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tm = torchvision.models.resnet50(num_classes=1000)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in tm.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    tm.eval()
    fm = from_torchvision("resnet50", tm.state_dict())
    x = np.random.RandomState(0).randn(args.batch, args.size, args.size, 3).astype(np.float32)
    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    xj = jnp.asarray(x)
    k = args.components

    def ours_kpca():
        return np.asarray(fc.KPCA_CAM(fm, ["layer4"])(xj))

    def theirs_kpca():
        c = pgc.KPCA_CAM(tm, [tm.layer4])
        out = c(xt, None)
        c.activations_and_grads.release()
        return out

    def ours_fem():
        return np.asarray(fc.FEM(fm, ["layer4"])(xj))

    def theirs_fem():
        c = pgc.FEM(tm, [tm.layer4])
        out = c(xt, None)
        c.activations_and_grads.release()
        return out

    def ours_dff():
        return np.asarray(fc.DeepFeatureFactorization(fm, "layer4", computation_on_concepts="fc")(xj, k)[2])

    def theirs_dff():
        d = GcDFF(tm, tm.layer4, computation_on_concepts=tm.fc)
        out = d(xt, k)[2]
        d.activations_and_grads.release()
        return out

    rows = []
    for name, ours, theirs, measure in [
        ("KPCA_CAM (sigmoid)", ours_kpca, theirs_kpca, "max abs"),
        ("FEM (k=2)", ours_fem, theirs_fem, "max abs"),
        (f"DeepFeatureFactorization (k={k})", ours_dff, theirs_dff, "rel"),
    ]:
        t0 = time.perf_counter()
        a = ours()
        first = time.perf_counter() - t0
        b = theirs()
        to, tt = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            ours()
            to.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            theirs()
            tt.append(time.perf_counter() - t0)
        if measure == "rel":
            diff = float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b))
        else:
            diff = float(np.abs(a.astype(np.float64) - b).max())
        mo, mt = statistics.median(to), statistics.median(tt)
        rows.append((name, mt, mo, mt / mo, first, f"{diff:.1e} ({measure})"))

    load = os.getloadavg()
    print(f"ResNet-50 layer4, batch {args.batch}, {args.size}x{args.size}, torch threads {args.threads}, "
          f"jax {jax.__version__} ({jax.default_backend()}), load average {load[0]:.1f}")
    print("| method | grad-cam s | flax_attn s | speed-up | our first call s | diff |")
    print("|---|---:|---:|---:|---:|---|")
    for name, mt, mo, r, first, diff in rows:
        print(f"| {name} | {mt:.3f} | {mo:.3f} | {r:.2f}x | {first:.1f} | {diff} |")


if __name__ == "__main__":
    main()
