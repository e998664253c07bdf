"""The Flax side of every benchmark on one accelerator, in one table (``benchmarks/gpu.sh`` runs it).

Parts (``--parts``, default all):

* ``blocks``: SE and CBAM (default presets), forward and forward+backward (input and parameter gradients);
* ``cam``: Grad-CAM at ``layer4`` of a ResNet-50 (one forward, one vmapped backward, 5 targets per image);
* ``models``: inference of ResNet-50, CBAM-ResNet-50 and MobileNetV3-Large;
* ``train``: the training application's jitted step (``train.train.Functions.train_step``) of ResNet-18 +
  CBAM (official), 224x224, batch 128 (the figures users train at);

each in float32 and bfloat16 compute (parameters float32). Sizes: ``--size gpu`` (the default on an
accelerator) or ``--size cpu-small`` (the default on a CPU backend: tiny shapes, so that the whole suite runs
in seconds and is tested in CI by ``tests/test_gpu_suite.py``). Every row is a jitted call timed after its
compiling call (reported separately), median of ``--repeats``; ``--json PATH`` also writes the rows.

    bash benchmarks/gpu.sh                    # on a GPU machine: the full suite (sized for < 8 min; not yet run on one)
    python benchmarks/gpu_suite.py --size cpu-small --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import train.xla_flags  # noqa: F401  (XLA:CPU defaults of the training application; no-op elsewhere)

PARTS = ("blocks", "cam", "models", "train")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

#: shapes per size: blocks (N, H, W, C); cam/models (batch, side); train (batch, side, width)
SIZES: dict[str, dict[str, Any]] = {
    "gpu": {"blocks": (128, 56, 56, 256), "cam": (32, 224), "models": (128, 224), "train": (128, 224, 64),
            "cam_model": "resnet50", "models_list": ("resnet50", "cbam_resnet50", "mobilenet_v3_large")},
    "cpu-small": {"blocks": (2, 8, 8, 32), "cam": (2, 32), "models": (2, 32), "train": (4, 16, 8),
                  "cam_model": "resnet18", "models_list": ("resnet18", "cbam_resnet18")},
}


@dataclass
class Row:
    part: str
    name: str
    shape: str
    dtype: str
    compile_s: float
    ms: float
    per_s: float
    unit: str


def _time(fn: Callable[[], Any], repeats: int) -> tuple[float, float]:
    """(first call seconds, median later call seconds); ``fn`` returns arrays to block on."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times)


def bench_blocks(cfg: dict[str, Any], dtype: str, repeats: int) -> list[Row]:
    from flax_attn.layers import CBAM, SqueezeExcite

    n, h, w, c = cfg["blocks"]
    dt = DTYPES[dtype]
    x = jnp.asarray(np.random.default_rng(0).standard_normal((n, h, w, c), np.float32)).astype(dt)
    rows = []
    for name, make in (("SE", SqueezeExcite), ("CBAM", CBAM)):
        mod = make(c, dtype=dt, rngs=nnx.Rngs(0))
        mod.eval()
        graphdef, state = nnx.split(mod)
        fwd = jax.jit(lambda s, x, g=graphdef: nnx.merge(g, s)(x))
        grad = jax.jit(jax.grad(lambda s, x, g=graphdef: jnp.sum(nnx.merge(g, s)(x).astype(jnp.float32) ** 2),
                                argnums=(0, 1)))
        for pass_name, f in (("forward", fwd), ("fwd+bwd", grad)):
            first, t = _time(lambda f=f, state=state: f(state, x), repeats)
            rows.append(Row("blocks", f"{name} {pass_name}", f"{n}x{h}x{w}x{c}", dtype, first, 1e3 * t,
                            x.nbytes / t / 1e9, "GB/s of input"))
    return rows


def bench_cam(cfg: dict[str, Any], dtype: str, repeats: int) -> list[Row]:
    import flax_attn.cam as fc
    from flax_attn.models import create_model

    b, s = cfg["cam"]
    model = create_model(cfg["cam_model"], num_classes=1000, dtype=DTYPES[dtype], rngs=nnx.Rngs(0))
    model.eval()
    x = jnp.asarray(np.random.default_rng(0).standard_normal((b, s, s, 3), np.float32))
    targets = jnp.asarray(np.random.default_rng(1).integers(0, 1000, (b, 5)))
    cam = fc.GradCAM(model, target_layers=["layer4"])
    first, t = _time(lambda: cam(x, targets), repeats)
    return [Row("cam", f"GradCAM {cfg['cam_model']} layer4, 5 targets", f"{b}x{s}x{s}", dtype, first, 1e3 * t,
                b / t, "images/s")]


def bench_models(cfg: dict[str, Any], dtype: str, repeats: int) -> list[Row]:
    from flax_attn.models import create_model

    b, s = cfg["models"]
    x = jnp.asarray(np.random.default_rng(0).standard_normal((b, s, s, 3), np.float32)).astype(DTYPES[dtype])
    rows = []
    for name in cfg["models_list"]:
        model = create_model(name, num_classes=1000, dtype=DTYPES[dtype], rngs=nnx.Rngs(0))
        model.eval()
        graphdef, state = nnx.split(model)
        fwd = jax.jit(lambda s, x, g=graphdef: nnx.merge(g, s)(x))
        first, t = _time(lambda fwd=fwd, state=state: fwd(state, x), repeats)
        rows.append(Row("models", f"{name} inference", f"{b}x{s}x{s}", dtype, first, 1e3 * t, b / t, "images/s"))
    return rows


def bench_train(cfg: dict[str, Any], dtype: str, repeats: int) -> list[Row]:
    from bench_train import flax_step

    b, s, width = cfg["train"]
    t0 = time.perf_counter()
    step = flax_step(b, s, dtype, attn="cbam_official", width=width)
    step()
    first = time.perf_counter() - t0
    _, t = _time(lambda: step(), repeats)
    return [Row("train", f"ResNet-18 + CBAM (official) train step, width {width}", f"{b}x{s}x{s}", dtype, first,
                1e3 * t, b / t, "images/s")]


BENCHES = {"blocks": bench_blocks, "cam": bench_cam, "models": bench_models, "train": bench_train}


def format_rows(rows: list[Row]) -> str:
    from _timing import format_table

    return format_table(["part", "benchmark", "shape", "dtype", "compile s", "ms", "throughput"],
                        [[r.part, r.name, r.shape, r.dtype, f"{r.compile_s:.1f}", f"{r.ms:.2f}",
                          f"{r.per_s:,.1f} {r.unit}"] for r in rows])


def main(argv: list[str] | None = None) -> list[Row]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default=None,
                   help="shapes: gpu (default on an accelerator) or cpu-small (default on a CPU backend)")
    p.add_argument("--cpu-small", action="store_const", const="cpu-small", dest="size", help="= --size cpu-small")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {PARTS}")
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated subset of float32,bfloat16")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default="", help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    dtypes = [s.strip() for s in args.dtypes.split(",") if s.strip()]
    bad = [x for x in parts if x not in PARTS] + [x for x in dtypes if x not in DTYPES]
    if bad or not parts or not dtypes:
        p.error(f"unknown or empty --parts/--dtypes {bad}: expected parts from {PARTS}, dtypes from {list(DTYPES)}")
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    backend = jax.default_backend()
    size = args.size or ("cpu-small" if backend == "cpu" else "gpu")
    devices = jax.devices()
    print(f"backend {backend}: {len(devices)} x {devices[0].device_kind}; jax {jax.__version__}; size {size}; "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}", flush=True)
    t0 = time.perf_counter()
    rows: list[Row] = []
    for part in parts:
        for dtype in dtypes:
            rows.extend(BENCHES[part](SIZES[size], dtype, args.repeats))
            print(f"  {part} {dtype} done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    print(format_rows(rows))
    print(f"total {time.perf_counter() - t0:.0f} s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"backend": backend, "size": size, "rows": [asdict(r) for r in rows]}, fh, indent=1)
    return rows


if __name__ == "__main__":
    main()
