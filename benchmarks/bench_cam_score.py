"""ScoreCAM: flax_attn.cam (one jitted call, masked inputs scored by ``lax.map`` over chunks) vs
pytorch_grad_cam 1.5.7 (a Python loop of ``batch_size`` forward passes per image) on the same weights.

A torchvision ResNet (random weights, randomised BatchNorm statistics), converted with
``flax_attn.convert.from_torchvision``; both sides use the same ``batch_size`` (grad-cam's default 16) and
score ``B * C`` masked images (``C`` = channels of the target layer: 512 for ResNet-18 ``layer4``, 2048 for
ResNet-50 ``layer4``). Median wall time of one CAM call over ``--repeats`` calls (round-robin, so machine
load hits both alike); our first (compiling) call is reported separately; "max abs diff" compares the
normalised maps. The issue's setting is the default (ResNet-50, layer4, batch 2, 224x224: 4096 forward
passes per side); pass smaller ``--model/--layer/--size/--batch`` on a loaded machine.

Usage: ``python benchmarks/bench_cam_score.py [--model resnet50] [--layer layer4] [--batch 2] [--size 224]
[--batch-size 16] [--repeats 1] [--threads 2]``
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from benchmarks._timing import interleaved_medians, machine_description


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet50", help="torchvision ResNet name (resnet18, resnet34, resnet50, ...)")
    p.add_argument("--layer", default="layer4", help="target layer path (layer4, layer3, layer4.1, ...)")
    p.add_argument("--batch", type=int, default=2, help="images per call")
    p.add_argument("--size", type=int, default=224, help="square input size")
    p.add_argument("--batch-size", type=int, default=16, help="masked images per forward pass (both sides)")
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    a = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import pytorch_grad_cam as pgc
    import pytorch_grad_cam.score_cam as gc_score
    import torch
    import torchvision
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    import flax_attn.cam as fc
    from flax_attn.convert import from_torchvision

    torch.set_num_threads(a.threads)
    gc_score.tqdm.tqdm = lambda it, *_, **__: it  # grad-cam's progress bar off (not part of the method)

    torch.manual_seed(0)
    tm = torchvision.models.get_model(a.model, num_classes=a.classes)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in tm.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    tm.eval()
    fm = from_torchvision(a.model, tm.state_dict())
    x = np.random.RandomState(0).randn(a.batch, a.size, a.size, 3).astype(np.float32)
    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    classes = list(range(a.batch))

    layer = tm
    for part in a.layer.split("."):
        layer = layer[int(part)] if part.isdigit() else getattr(layer, part)
    gcam = pgc.ScoreCAM(tm, [layer])
    gcam.batch_size = a.batch_size
    ours = fc.ScoreCAM(fm, [a.layer], batch_size=a.batch_size)
    xj = jnp.asarray(x)
    channels = ours.tap.run(xj[:1])[1][0].shape[-1]

    def run_ours():
        return np.asarray(jax.block_until_ready(ours(xj, classes)))

    def run_gc():
        return gcam(xt, [ClassifierOutputTarget(c) for c in classes])

    t0 = time.perf_counter()
    first_out = run_ours()
    first = time.perf_counter() - t0
    diff = float(np.abs(first_out - run_gc()).max())
    med = interleaved_medians({"grad-cam": run_gc, "ours": run_ours}, repeats=a.repeats, warmup=0)
    print(f"# ScoreCAM {a.model} {a.layer} ({channels} channels), batch {a.batch}, {a.size}x{a.size}, "
          f"batch_size {a.batch_size}: {a.batch * channels} masked forward passes per call")
    print(f"# {machine_description()}; load average {os.getloadavg()[0]:.1f}")
    print("| model | layer | C | batch | size | grad-cam s | flax_attn s | speed-up | first call s | max abs diff |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {a.model} | {a.layer} | {channels} | {a.batch} | {a.size} | {med['grad-cam']:.2f} | {med['ours']:.2f} | "
          f"{med['grad-cam'] / med['ours']:.2f}x | {first:.1f} | {diff:.1e} |")
    gcam.activations_and_grads.release()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
