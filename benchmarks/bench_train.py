"""Training-step throughput: ResNet-18 + CBAM at 64x64, batch 64 -- Flax jitted step vs PyTorch.

Flax: the training application's own jitted step (``train.train.Functions.train_step``: forward, loss,
backward, SGD-nesterov with masked weight decay, BatchNorm statistics update, buffer donation) on
``flax_attn.models`` ResNet-18 with the official CBAM block (``attn="cbam_official"``, torchvision stem,
width 64). PyTorch: ``torch_ref.resnet.cbam_resnet18`` (the same architecture and block) with a standard
eager training step (``zero_grad``, forward, ``cross_entropy``, ``backward``, ``SGD(nesterov).step``).
Both use float32, 3 input channels, 10 classes. The candidates are timed round-robin so that machine noise
hits them alike; the table reports the median step time.

    python benchmarks/bench_train.py [--repeats 5] [--batch 64] [--sizes 64,96]     # Flax vs PyTorch
    python benchmarks/bench_train.py --xla-variants [--sizes 64]   # XLA:CPU options side by side (Flax only)
    python benchmarks/bench_train.py --main-job                    # CBAM step / plain step, Flax and PyTorch

``--xla-variants`` runs one worker process per candidate (``XLA_FLAGS`` is read once per process, so every
candidate needs its own), each holding its compiled step; the parent asks them for one step in turn, so the
candidates are still interleaved. ``--main-job`` times the main job's configuration (``train.main_job``:
width 8, CIFAR stem, 48x48, batch 32) with and without CBAM, and the same network in PyTorch (built here
from ``torch_ref``'s block and the official CBAM, since ``torch_ref.resnet`` is torchvision-width only).

Everything runs with the training application's process defaults (``train/xla_flags.py``: XLA:CPU flags unless
the environment sets ``XLA_FLAGS`` or ``FLAX_ATTN_NO_XLA_DEFAULTS=1``; the glibc allocator settings unless
``FLAX_ATTN_NO_MALLOC_TUNING=1``), for Flax and PyTorch alike (one process).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import train.xla_flags  # noqa: F401,I001  (process defaults: XLA flags, allocator; before JAX starts threads)

import jax
import numpy as np
from _timing import interleaved_medians, machine_description

#: candidates of ``--xla-variants``: name -> (XLA_FLAGS, compute dtype, jax_default_matmul_precision, extra
#: environment). Every candidate runs without the training application's defaults (``FLAX_ATTN_NO_XLA_DEFAULTS``,
#: ``FLAX_ATTN_NO_MALLOC_TUNING``) unless its environment turns one back on; "xla default" is plain XLA with
#: glibc's default allocator settings, "malloc tuned" the allocator settings of ``train/xla_flags.py``.
_PLAIN = {"FLAX_ATTN_NO_XLA_DEFAULTS": "1", "FLAX_ATTN_NO_MALLOC_TUNING": "1"}
_TUNED = {"FLAX_ATTN_NO_XLA_DEFAULTS": "1", "FLAX_ATTN_NO_MALLOC_TUNING": "0"}
XLA_VARIANTS: dict[str, tuple[str, str, str, dict[str, str]]] = {
    "xla default": ("", "float32", "", _PLAIN),
    "malloc tuned": ("", "float32", "", _TUNED),
    "xla default (2nd process)": ("", "float32", "", _PLAIN),
    "malloc tuned (2nd process)": ("", "float32", "", _TUNED),
    "malloc tuned, 1 arena": ("", "float32", "", {**_TUNED, "MALLOC_ARENA_MAX": "1"}),
    "onednn": ("--xla_cpu_use_onednn=true", "float32", "", _PLAIN),
    "onednn without ynn dot": ("--xla_cpu_use_onednn=true --xla_cpu_experimental_ynn_fusion_type=-dot", "float32", "",
                               _PLAIN),
    "no ynn dot": ("--xla_cpu_experimental_ynn_fusion_type=-dot", "float32", "", _PLAIN),
    "ynn +eltwise+reduce": ("--xla_cpu_experimental_ynn_fusion_type=+eltwise,+reduce", "float32", "", _PLAIN),
    "xnn dot+eltwise+reduce": ("--xla_cpu_experimental_xnn_fusion_type=dot,eltwise,reduce", "float32", "", _PLAIN),
    "xnn graph greedy": ("--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY", "float32", "",
                         _PLAIN),
    "no xnnpack": ("--xla_cpu_use_xnnpack=false", "float32", "", _PLAIN),
    "matmul precision bf16": ("", "float32", "bfloat16", _PLAIN),
    "bf16 compute": ("", "bfloat16", "", _PLAIN),
}


def flax_step(batch: int, size: int, compute_dtype: str = "float32", *, attn: str = "cbam_official", width: int = 64,
              stem: str = "torchvision"):
    from train.config import Config
    from train.train import Functions, make_mesh

    cfg = Config(model="resnet18", attn=attn, width=width, stem=stem, batch_size=batch,
                 learning_rate=0.05, weight_decay=5e-4, compute_dtype=compute_dtype)
    fns = Functions(cfg, num_classes=10, in_chans=3, mesh=make_mesh())
    box = {"state": fns.init()}
    rng = np.random.default_rng(0)
    x = jax.device_put(rng.random((batch, size, size, 3), np.float32), fns.batch_sharding)
    y = jax.device_put(rng.integers(0, 10, batch).astype(np.int32), fns.batch_sharding)

    def step():
        box["state"], m = fns.train_step(box["state"], x, y)
        jax.block_until_ready(m["loss"])

    return step


def _torch_train_step(model, batch: int, size: int):
    import torch

    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": 5e-4}, {"params": no_decay, "weight_decay": 0.0}],
                          lr=0.05, momentum=0.9, nesterov=True)
    x = torch.rand(batch, 3, size, size)
    y = torch.randint(0, 10, (batch,))

    def step():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        loss.item()

    return step


def torch_step(batch: int, size: int):
    import torch

    from torch_ref.resnet import cbam_resnet18

    torch.manual_seed(0)
    return _torch_train_step(cbam_resnet18(num_classes=10), batch, size)


def torch_small_resnet18(width: int, *, cbam: bool, num_classes: int = 10):
    """ResNet-18 with the CIFAR stem (3x3/1 conv, no max-pool) at stage width ``width``, plain or with the
    official CBAM (``torch_ref``) in every block: the PyTorch twin of the main job's network. The channel MLP's
    hidden width is ``max(1, C // 16)`` as in ``flax_attn``'s ``cbam_official`` preset."""
    import torch
    from torch import nn
    from torchvision.models import resnet as tv_resnet

    from torch_ref.official_cbam import CBAM

    class Block(tv_resnet.BasicBlock):
        def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample=None):
            super().__init__(inplanes, planes, stride, downsample)
            self.cbam = CBAM(planes, min(16, planes)) if cbam else None

        def forward(self, x):
            out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
            if self.cbam is not None:
                out = self.cbam(out)
            return self.relu(out + (x if self.downsample is None else self.downsample(x)))

    layers: list[nn.Module] = [nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
    inplanes = width
    for i in range(4):
        planes, stride = width * 2**i, 1 if i == 0 else 2
        ds = None
        if stride != 1 or inplanes != planes:
            ds = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
        layers += [Block(inplanes, planes, stride, ds), Block(planes, planes)]
        inplanes = planes
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(inplanes, num_classes)]
    torch.manual_seed(0)
    return nn.Sequential(*layers)


# --------------------------------------------------------------------------------------------------
# XLA:CPU variants: one worker process per candidate, interleaved by the parent
# --------------------------------------------------------------------------------------------------


def _worker(args: argparse.Namespace) -> None:
    """Compiles one step, prints ``ready``, then times one step per line read from stdin."""
    t0 = time.perf_counter()
    step = flax_step(args.batch, int(args.sizes.split(",")[0]), args.worker_dtype)
    step()
    print(json.dumps({"ready": time.perf_counter() - t0}), flush=True)
    for line in sys.stdin:
        if line.strip() != "step":
            break
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t = time.perf_counter()
        step()
        t = time.perf_counter() - t
        print(json.dumps({"t": t, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0}), flush=True)


def run_variants(variants: dict[str, tuple[str, str, str, dict[str, str]]], *, batch: int, size: int, repeats: int,
                 warmup: int) -> dict[str, tuple[float, float]]:
    """Median step time of each candidate, measured round-robin across worker processes (started one at a
    time, so that their compilations do not overlap the timing)."""
    procs = {}
    for name, (flags, dtype, precision, extra_env) in variants.items():
        env = dict(os.environ, XLA_FLAGS=flags, **extra_env)
        if precision:
            env["JAX_DEFAULT_MATMUL_PRECISION"] = precision
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--batch", str(batch), "--sizes", str(size),
               "--worker-dtype", dtype]
        p = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = p.stdout.readline() if p.stdout else ""
        if not line:
            raise RuntimeError(f"variant {name!r} ({flags!r}) did not start (exit code {p.wait()})")
        procs[name] = p
    times: dict[str, list[float]] = {k: [] for k in procs}
    faults: dict[str, list[float]] = {k: [] for k in procs}
    try:
        for r in range(warmup + repeats):
            for name, p in procs.items():
                assert p.stdin is not None and p.stdout is not None
                p.stdin.write("step\n")
                p.stdin.flush()
                rec = json.loads(p.stdout.readline())
                if r >= warmup:
                    times[name].append(rec["t"])
                    faults[name].append(rec["faults"])
    finally:
        for p in procs.values():
            if p.stdin:
                p.stdin.close()
            p.wait()
    return {k: (statistics.median(v), statistics.median(faults[k])) for k, v in times.items()}


def _load() -> str:
    a, b, c = os.getloadavg()
    return f"load average {a:.1f} {b:.1f} {c:.1f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--sizes", default="64,96", help="comma-separated input sides")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch intra-op threads")
    p.add_argument("--xla-variants", nargs="?", const=",".join(XLA_VARIANTS), default=None, metavar="NAMES",
                   help=f"compare XLA:CPU options (comma-separated subset of {list(XLA_VARIANTS)}; default all)")
    p.add_argument("--main-job", action="store_true", help="CBAM step / plain step in the main job's configuration")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker-dtype", default="float32", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        _worker(args)
        return
    import torch

    torch.set_num_threads(args.threads)
    print(f"machine: {machine_description()}; {_load()}")
    print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    if args.xla_variants is not None:
        names = [n.strip() for n in args.xla_variants.split(",") if n.strip()]
        unknown = [n for n in names if n not in XLA_VARIANTS]
        if unknown:
            p.error(f"unknown --xla-variants {unknown}: expected some of {list(XLA_VARIANTS)}")
        chosen = {n: XLA_VARIANTS[n] for n in names}
        from train.xla_flags import DEFAULT_FLAGS

        if DEFAULT_FLAGS:
            chosen["train/ defaults"] = (" ".join(f"{k}={v}" for k, v in DEFAULT_FLAGS.items()), "float32", "", {})
        for size in (int(v) for v in args.sizes.split(",")):
            med = run_variants(chosen, batch=args.batch, size=size, repeats=args.repeats, warmup=args.warmup)
            base = med[names[0]][0]
            print(f"\nResNet-18 + CBAM (official), batch {args.batch}, {size}x{size}, Flax train step; median of "
                  f"{args.repeats} interleaved steps; {_load()} at the end\n")
            print("| variant | XLA_FLAGS / setting | step ms | vs first | minor page faults per step |")
            print("|---|---|---:|---:|---:|")
            for name, (t, nf) in med.items():
                flags, dtype, prec, extra = chosen[name]
                tuned = extra.get("FLAX_ATTN_NO_MALLOC_TUNING", "0") == "0"
                arenas = f" (MALLOC_ARENA_MAX={extra['MALLOC_ARENA_MAX']})" if "MALLOC_ARENA_MAX" in extra else ""
                setting = " ".join(s for s in (flags, f"compute {dtype}" if dtype != "float32" else "",
                                               f"matmul precision {prec}" if prec else "",
                                               f"malloc tuned{arenas}" if tuned else "") if s) or "-"
                print(f"| {name} | `{setting}` | {1e3 * t:.0f} | {base / t:.2f}x | {nf:,.0f} |", flush=True)
        return
    if args.main_job:
        from train.main_job import MAIN_JOB_CONFIG as M

        b, s, w = M.batch_size, M.image_size, M.width
        fns = {
            "Flax plain": flax_step(b, s, attn="none", width=w, stem=M.stem),
            "Flax CBAM (official)": flax_step(b, s, attn="cbam_official", width=w, stem=M.stem),
            "Flax CBAM (paper)": flax_step(b, s, attn="cbam", width=w, stem=M.stem),
            "PyTorch plain": _torch_train_step(torch_small_resnet18(w, cbam=False), b, s),
            "PyTorch CBAM (official)": _torch_train_step(torch_small_resnet18(w, cbam=True), b, s),
        }
        med = interleaved_medians(fns, repeats=args.repeats, warmup=args.warmup)
        print(f"\nmain job configuration: ResNet-18 width {w}, {M.stem} stem, {s}x{s}, batch {b}, float32; median of "
              f"{args.repeats} interleaved steps; {_load()} at the end\n")
        print("| implementation | step ms | images/s | / plain (same framework) |")
        print("|---|---:|---:|---:|")
        for name, t in med.items():
            plain = med["Flax plain"] if name.startswith("Flax") else med["PyTorch plain"]
            print(f"| {name} | {1e3 * t:.1f} | {b / t:.0f} | {t / plain:.2f}x |")
        return
    print(f"ResNet-18 + CBAM (official block), 3 input channels, batch {args.batch}, float32, train step = "
          f"forward + backward + SGD update; median of {args.repeats} interleaved steps\n")
    print("| input | implementation | step time (ms) | images/s | Flax / PyTorch |")
    print("|---|---|---:|---:|---:|")
    for size in (int(v) for v in args.sizes.split(",")):
        fns = {
            "Flax (jax.jit, donated state)": flax_step(args.batch, size),
            "PyTorch eager (torch_ref)": torch_step(args.batch, size),
        }
        med = interleaved_medians(fns, repeats=args.repeats, warmup=args.warmup)
        names = list(med)
        for name, t in med.items():
            ratio = f"{med[names[1]] / med[names[0]]:.2f}x" if name == names[0] else ""
            print(f"| {size}x{size} | {name} | {1e3 * t:.1f} | {args.batch / t:.0f} | {ratio} |", flush=True)
    print(f"\n({_load()} at the end)")


if __name__ == "__main__":
    main()
