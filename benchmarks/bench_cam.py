"""flax_attn.cam vs pytorch_grad_cam 1.5.7 on the same ResNet-50 weights (CPU by default).

For GradCAM, GradCAM++ and LayerCAM, with 1 and 5 targets per image, at the last stage (``layer4``) and a
middle stage (``layer3``): median wall time of one CAM call for a batch of images (grad-cam needs one call
per target column; ours computes all targets from one forward pass), the speed-up, and our CAM time over
one plain jitted forward pass of the same model. Both frameworks are timed in the same run; torch uses
``torch.set_num_threads(2)`` (``--threads``). Our timings include the per-call ``nnx.split`` of the model
and the argument handling; the first (compiling) call is excluded and reported separately. "forward" is
one jitted plain forward pass of the same Flax model, timed alternately with the CAM calls (so the ratio
sees the same machine load); "max abs diff" compares our normalised maps with grad-cam's (deep float32
networks accumulate ~1e-4 logit differences between frameworks, which min-max scaling can amplify).

Usage: ``python benchmarks/bench_cam.py [--batch 8] [--size 224] [--repeats 3] [--markdown out.md]``
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

def lscpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown CPU"


def median_time(fn, repeats: int, warmup: int = 1):
    """(first call seconds or None, median seconds over ``repeats`` further calls, last result)."""
    first = None
    for i in range(warmup):
        t0 = time.perf_counter()
        out = fn()
        if i == 0:
            first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times), out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--gc-repeats", type=int, default=2, help="timed grad-cam calls (after a torch warm-up)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--targets", type=int, nargs="+", default=[1, 5])
    p.add_argument("--layers", nargs="+", default=["layer4", "layer3"])
    p.add_argument("--methods", nargs="+", default=["GradCAM", "GradCAMPlusPlus", "LayerCAM"])
    p.add_argument("--markdown", default=None, help="also write the table (and machine) to this file")
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import pytorch_grad_cam as pgc
    import torch
    import torchvision
    from flax import nnx
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget as GcTarget

    import flax_attn.cam as fc
    from flax_attn.convert import from_torchvision

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tv = torchvision.models.resnet50(weights=None).eval()
    with torch.no_grad():  # random BatchNorm statistics (never identity)
        for m in tv.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    model = from_torchvision("resnet50", tv.state_dict())

    rs = np.random.RandomState(0)
    x = rs.randn(args.batch, args.size, args.size, 3).astype(np.float32)
    x_t = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    x_j = jnp.asarray(x)
    classes = rs.randint(0, 1000, size=(args.batch, max(args.targets)))

    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    _, fwd_s, _ = median_time(lambda: jax.block_until_ready(fwd(state, x_j)), args.repeats)
    nnx_fwd = nnx.jit(lambda m, x: m(x))
    _, nnx_fwd_s, _ = median_time(lambda: jax.block_until_ready(nnx_fwd(model, x_j)), args.repeats)
    with torch.no_grad():
        _, torch_fwd_s, _ = median_time(lambda: tv(x_t), args.repeats)
    with torch.no_grad():
        check = np.abs(np.asarray(fwd(state, x_j)) - tv(x_t).numpy()).max()
        tv(x_t)  # torch warm-up before the grad-cam timings

    rows = []
    for layer in args.layers:
        for name in args.methods:
            for t in args.targets:
                ours = getattr(fc, name)(model, target_layers=[layer])
                tgt = jnp.asarray(classes[:, :t]) if t > 1 else jnp.asarray(classes[:, 0])
                # forward and CAM timed alternately, so that their ratio sees the same machine load
                t0 = time.perf_counter()
                jax.block_until_ready(ours(x_j, tgt))
                first = time.perf_counter() - t0
                f_times, c_times = [], []
                for _ in range(args.repeats):
                    f_times.append(median_time(lambda: jax.block_until_ready(fwd(state, x_j)), 1, 0)[1])
                    _, c, got = median_time(lambda: jax.block_until_ready(ours(x_j, tgt)), 1, 0)
                    c_times.append(c)
                ours_s, fwd_here = statistics.median(c_times), statistics.median(f_times)
                gc = getattr(pgc, name)(tv, target_layers=[getattr(tv, layer)])

                def run_gc():
                    return [gc(x_t, [GcTarget(int(c)) for c in classes[:, j]]) for j in range(t)]

                _, gc_s, ref = median_time(run_gc, args.gc_repeats, warmup=0)
                ref = np.stack(ref, axis=1)
                got = np.asarray(got).reshape(ref.shape)
                rows.append((layer, name, t, gc_s, ours_s, gc_s / ours_s, fwd_here, ours_s / fwd_here,
                             first, float(np.abs(got - ref).max())))
                gc.activations_and_grads.release()
                print(f"  {layer} {name} T={t}: grad-cam {gc_s * 1e3:.0f} ms, ours {ours_s * 1e3:.0f} ms",
                      file=sys.stderr, flush=True)

    head = (f"ResNet-50 (torchvision weights, random), batch {args.batch}, {args.size}x{args.size}, "
            f"{lscpu_model()}, {os.cpu_count()} cores, torch {args.threads} threads, jax {jax.__version__} "
            f"({jax.default_backend()}), torch {torch.__version__}, grad-cam 1.5.7\n"
            f"plain forward: flax jax.jit on split state {fwd_s * 1e3:.0f} ms, flax nnx.jit(model) "
            f"{nnx_fwd_s * 1e3:.0f} ms, torch {torch_fwd_s * 1e3:.0f} ms (max |logit diff| {check:.1e}); "
            f"median of {args.repeats} calls after a compiling one (grad-cam: {args.gc_repeats} calls)\n")
    lines = ["| target layer | method | targets/image | grad-cam ms | flax_attn.cam ms | speed-up "
             "| forward ms | CAM / forward | first call s | max abs diff |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for layer, name, t, g, o, sp, fw, rf, first, diff in rows:
        lines.append(f"| {layer} | {name} | {t} | {g * 1e3:.0f} | {o * 1e3:.0f} | {sp:.1f}x | {fw * 1e3:.0f} | "
                     f"{rf:.2f}x | {first:.1f} | {diff:.1e} |")
    table = head + "\n" + "\n".join(lines) + "\n"
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
