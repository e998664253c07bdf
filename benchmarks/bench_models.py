"""Forward throughput (images/s) of Flax backbones vs their torchvision twins, same weights, same batch.

    python benchmarks/bench_models.py                 # ResNet-50, MobileNetV3-Large, CBAM-ResNet-50

Batch 8 at 224x224 in eval mode (inference), float32. Flax: ``nnx.jit`` of ``model(x)`` on NHWC input
(the graph is split once outside the timed loop, as a serving loop would); torch: ``torch.inference_mode``
on NCHW input with its default thread count. Candidates are timed round-robin (``interleaved_medians``)
so load from other processes hits them alike; each figure is a median.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torchvision
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _timing import format_table, interleaved_medians, machine_description  # noqa: E402

import torch_ref.resnet as tr  # noqa: E402
from flax_attn.convert import from_torchvision  # noqa: E402

MODELS = {
    "resnet50": lambda: torchvision.models.resnet50(),
    "mobilenet_v3_large": lambda: torchvision.models.mobilenet_v3_large(),
    "cbam_resnet50": lambda: tr.cbam_resnet50(),
}


def bench(names: list[str], batch: int, size: int, repeats: int) -> tuple[list[list[str]], dict]:
    rows, raw = [], {}
    rng = np.random.RandomState(0)
    x = rng.randn(batch, 3, size, size).astype(np.float32)
    xt = torch.from_numpy(x)
    xj = jax.device_put(jnp.asarray(x.transpose(0, 2, 3, 1)))
    for name in names:
        tm = MODELS[name]().eval()
        model = from_torchvision(name, tm.state_dict())
        graphdef, state = nnx.split(model)

        @jax.jit
        def fwd(state, x, graphdef=graphdef):
            return nnx.merge(graphdef, state)(x)

        t0 = time.perf_counter()
        out = fwd(state, xj).block_until_ready()
        compile_s = time.perf_counter() - t0
        with torch.inference_mode():
            ref = tm(xt).numpy()
        err = float(np.linalg.norm(np.asarray(out) - ref) / np.linalg.norm(ref))

        def run_torch():
            with torch.inference_mode():
                tm(xt)

        times = interleaved_medians({"flax": lambda: fwd(state, xj).block_until_ready(), "torch": run_torch},
                                    repeats=repeats, warmup=2)
        f_ips, t_ips = batch / times["flax"], batch / times["torch"]
        raw[name] = dict(flax=f_ips, torch=t_ips, compile_s=compile_s, rel_err=err)
        rows.append([name, f"{f_ips:.1f}", f"{t_ips:.1f}", f"{f_ips / t_ips:.2f}x", f"{compile_s:.1f}",
                     f"{err:.1e}"])
        print(rows[-1], flush=True)
    return rows, raw


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    rows, _ = bench(args.models, args.batch, args.size, args.repeats)
    header = ["model", "Flax img/s", "torch img/s", "Flax/torch", "jit compile s", "logits rel. err"]
    table = format_table(header, rows)
    text = (f"# Backbone forward throughput (bench_models.py)\n\n"
            f"Machine: {machine_description()}\n\n"
            f"Eval mode, float32, batch {args.batch}, {args.size}x{args.size}, median of {args.repeats} "
            f"round-robin runs; same weights on both sides (logits rel. err. is Flax vs torch).\n\n{table}\n")
    print(text)


if __name__ == "__main__":
    main()
