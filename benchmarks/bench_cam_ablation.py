"""AblationCAM (and FullGrad): flax_attn.cam vs pytorch_grad_cam 1.5.7 on the same torchvision ResNet weights.

Median wall time of one call for a batch of images, both frameworks timed in the same run (torch with
``torch.set_num_threads(--threads)``), the speed-up, and the max |diff| of the normalised maps. Ours: one jitted
call (first, compiling call reported separately); the ablated passes run only the network downstream of the
tapped layer, in chunks of ``--batch-size`` inside one ``lax.map``. grad-cam: its ``AblationCAM`` re-runs the
whole network for every chunk of ``--batch-size`` channels, with a host round trip per chunk.

The issue's setting is ``--model resnet50 --layer layer4 --batch 2 --size 224`` (4096 ablated passes for
grad-cam: long on a CPU); reduced runs change ``--size``/``--batch``. Random weights (no download).

Usage: ``python benchmarks/bench_cam_ablation.py [--model resnet50] [--layer layer4] [--batch 2] [--size 224]
[--batch-size 32] [--ratio 1.0] [--repeats 2] [--fullgrad]``
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from benchmarks._timing import format_table, machine_description


def _timed(fn, repeats: int) -> tuple[float, float, object]:
    t0 = time.perf_counter()
    out = fn()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return first, float(np.median(times)) if times else first, out  # repeats=0: the first call is the figure


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet50", choices=["resnet18", "resnet34", "resnet50"])
    p.add_argument("--layer", default="layer4")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32, help="AblationCAM batch_size (both sides)")
    p.add_argument("--ours-batch-size", type=int, default=None, help="our batch_size if different")
    p.add_argument("--ratio", type=float, default=1.0, help="ratio_channels_to_ablate")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--gc-repeats", type=int, default=1, help="grad-cam calls timed (1: its only call; torch has no "
                   "compilation, only a warm-up of a few ms)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--fullgrad", action="store_true", help="also time FullGrad")
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import pytorch_grad_cam as pgc
    import torch
    import torchvision
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    import flax_attn.cam as fc
    from flax_attn.convert import from_torchvision

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tm = getattr(torchvision.models, args.model)().eval()
    with torch.no_grad():
        for m in tm.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    fm = from_torchvision(args.model, tm.state_dict())
    x = np.random.RandomState(0).randn(args.batch, args.size, args.size, 3).astype(np.float32)
    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    classes = [int(c) for c in (np.arange(args.batch) * 7 + 1) % 1000]
    layer = tm
    for part in args.layer.split("."):
        layer = getattr(layer, part)

    rows = []
    ours_bs = args.ours_batch_size or args.batch_size
    cam = fc.AblationCAM(fm, [args.layer], batch_size=ours_bs, ratio_channels_to_ablate=args.ratio)
    first, ours_t, ours = _timed(lambda: jax.block_until_ready(cam(jnp.asarray(x), classes)), args.repeats)
    gc = pgc.AblationCAM(tm, [layer], batch_size=args.batch_size, ratio_channels_to_ablate=args.ratio)
    _, gc_t, ref = _timed(lambda: gc(xt, [ClassifierOutputTarget(c) for c in classes]), args.gc_repeats - 1)
    rows.append(["AblationCAM", f"{gc_t:.2f}", f"{ours_t:.2f}", f"{first:.2f}", f"{gc_t / ours_t:.1f}x",
                 f"{np.abs(np.asarray(ours) - ref).max():.1e}"])
    if args.fullgrad:
        fg = fc.FullGrad(fm, target_layers=[])
        first, ours_t, ours = _timed(lambda: jax.block_until_ready(fg(jnp.asarray(x), classes)), args.repeats)
        gfg = pgc.FullGrad(tm, [])
        _, gc_t, ref = _timed(lambda: gfg(xt, [ClassifierOutputTarget(c) for c in classes]), args.gc_repeats - 1)
        rows.append(["FullGrad", f"{gc_t:.2f}", f"{ours_t:.2f}", f"{first:.2f}", f"{gc_t / ours_t:.1f}x",
                     f"{np.abs(np.asarray(ours) - ref).max():.1e}"])

    load = os.getloadavg()
    print(f"{args.model} {args.layer}, batch {args.batch}, {args.size}x{args.size}, batch_size {args.batch_size} "
          f"(ours {ours_bs}), ratio {args.ratio}; {machine_description()}; load average {load[0]:.1f}")
    print(format_table(["method", "grad-cam s", "ours s", "ours first call s", "speed-up", "max |diff|"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
