"""Training-step throughput: ResNet-18 + CBAM at 64x64, batch 64 -- Flax jitted step vs PyTorch.

Flax: the training application's own jitted step (``train.train.Functions.train_step``: forward, loss,
backward, SGD-nesterov with masked weight decay, BatchNorm statistics update, buffer donation) on
``flax_attn.models`` ResNet-18 with the official CBAM block (``attn="cbam_official"``, torchvision stem,
width 64). PyTorch: ``torch_ref.resnet.cbam_resnet18`` (the same architecture and block) with a standard
eager training step (``zero_grad``, forward, ``cross_entropy``, ``backward``, ``SGD(nesterov).step``).
Both use float32, 3 input channels, 10 classes. Every candidate runs in its own worker process holding its
built (compiled) step; the parent asks them for one step in turn (round-robin, so that machine noise hits them
alike) and reports the median step time.

    python benchmarks/bench_train.py [--repeats 5] [--batch 64] [--sizes 64,96]     # Flax vs PyTorch
    python benchmarks/bench_train.py --xla-variants [--sizes 64]   # XLA:CPU options side by side (Flax only)
    python benchmarks/bench_train.py --main-job                    # CBAM step / plain step, Flax and PyTorch

``--xla-variants`` compares Flax candidates with different XLA_FLAGS / allocator settings (read once per
process, hence the workers). ``--main-job`` times the main job's configuration (``train.main_job``:
width 8, CIFAR stem, 48x48, batch 32) with and without CBAM, and the same network in PyTorch (built here
from ``torch_ref``'s block and the official CBAM, since ``torch_ref.resnet`` is torchvision-width only).

The Flax workers run with the training application's process defaults (``train/xla_flags.py``: XLA:CPU flags
unless the environment sets ``XLA_FLAGS`` or ``FLAX_ATTN_NO_XLA_DEFAULTS=1``; the glibc allocator settings
unless ``FLAX_ATTN_NO_MALLOC_TUNING=1``); the PyTorch workers with glibc's defaults, what a PyTorch user runs
(PyTorch's eager step is slower under the Flax side's allocator settings: the Flax vs PyTorch table also shows
PyTorch with them).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

# FLAX_ATTN_BENCH_ROOT: import flax_attn / train / torch_ref from another checkout (``--against``'s workers)
sys.path.insert(0, os.environ.get("FLAX_ATTN_BENCH_ROOT") or os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import train.xla_flags  # noqa: F401,I001  (process defaults: XLA flags, allocator; before JAX starts threads)

import jax
import numpy as np
from _timing import machine_description

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
    "malloc tuned with 1 arena": ("", "float32", "", {**_TUNED, "MALLOC_ARENA_MAX": "1"}),
    "onednn": ("--xla_cpu_use_onednn=true", "float32", "", _PLAIN),
    "onednn without ynn dot": ("--xla_cpu_use_onednn=true --xla_cpu_experimental_ynn_fusion_type=-dot", "float32", "",
                               _PLAIN),
    "no ynn dot": ("--xla_cpu_experimental_ynn_fusion_type=-dot", "float32", "", _PLAIN),
    "ynn +eltwise+reduce": ("--xla_cpu_experimental_ynn_fusion_type=+eltwise,+reduce", "float32", "", _PLAIN),
    "no ynn reduce": ("--xla_cpu_experimental_ynn_fusion_type=-reduce", "float32", "", _TUNED),
    "no ynn dot and no ynn reduce": ("--xla_cpu_experimental_ynn_fusion_type=-dot,-reduce", "float32", "", _TUNED),
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


def _make_step(spec: dict) -> Callable[[], None]:
    """The step function of a worker spec: ``{"framework": "flax", "batch", "size", "dtype", "attn", "width",
    "stem"}`` or ``{"framework": "torch", "batch", "size", "model": "cbam_resnet18" | "small_plain" |
    "small_cbam", "width", "threads"}``."""
    if spec["framework"] == "torch":
        import torch

        torch.set_num_threads(spec.get("threads", 2))
        if spec["model"] == "cbam_resnet18":
            return torch_step(spec["batch"], spec["size"])
        model = torch_small_resnet18(spec["width"], cbam=spec["model"] == "small_cbam")
        return _torch_train_step(model, spec["batch"], spec["size"])
    return flax_step(spec["batch"], spec["size"], spec.get("dtype", "float32"), attn=spec.get("attn", "cbam_official"),
                     width=spec.get("width", 64), stem=spec.get("stem", "torchvision"))


def _worker(spec_json: str) -> None:
    """Builds one step (and compiles it), prints ``ready``, then times one step per line read from stdin."""
    t0 = time.perf_counter()
    step = _make_step(json.loads(spec_json))
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


#: seconds between resuming a stopped worker and timing its step
PAUSE = 0.1


def run_workers(candidates: dict[str, tuple[dict, dict[str, str]]], *, repeats: int, warmup: int
                ) -> dict[str, tuple[float, float]]:
    """Median step time and minor page faults per step of each candidate ``name -> (spec, environment)``, each
    in its own process, measured round-robin (the processes are started one at a time, so that their
    compilations do not overlap the timing). Every worker but the one being timed is stopped (SIGSTOP): idle
    JAX and PyTorch processes keep threads spinning or polling, which slowed the timed one by up to 1.5x."""
    procs = {}
    try:
        for name, (spec, extra_env) in candidates.items():
            env = dict(os.environ, **extra_env)
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
            p = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            procs[name] = p
            line = p.stdout.readline() if p.stdout else ""
            if not line:
                raise RuntimeError(f"candidate {name!r} ({spec}, {extra_env}) did not start (exit code {p.wait()})")
            os.kill(p.pid, signal.SIGSTOP)
        times: dict[str, list[float]] = {k: [] for k in procs}
        faults: dict[str, list[float]] = {k: [] for k in procs}
        for r in range(warmup + repeats):
            for name, p in procs.items():
                assert p.stdin is not None and p.stdout is not None
                os.kill(p.pid, signal.SIGCONT)
                time.sleep(PAUSE)
                p.stdin.write("step\n")
                p.stdin.flush()
                rec = json.loads(p.stdout.readline())
                os.kill(p.pid, signal.SIGSTOP)
                if r >= warmup:
                    times[name].append(rec["t"])
                    faults[name].append(rec["faults"])
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.kill(p.pid, signal.SIGCONT)
            if p.stdin:
                p.stdin.close()
            p.wait()
    return {k: (statistics.median(v), statistics.median(faults[k])) for k, v in times.items()}


def run_variants(variants: dict[str, tuple[str, str, str, dict[str, str]]], *, batch: int, size: int, repeats: int,
                 warmup: int) -> dict[str, tuple[float, float]]:
    """:func:`run_workers` for XLA:CPU variants of the Flax step (XLA_FLAGS, dtype, matmul precision, env)."""
    cands = {}
    for name, (flags, dtype, precision, extra_env) in variants.items():
        env = dict(extra_env, XLA_FLAGS=flags)
        if precision:
            env["JAX_DEFAULT_MATMUL_PRECISION"] = precision
        cands[name] = ({"framework": "flax", "batch": batch, "size": size, "dtype": dtype}, env)
    return run_workers(cands, repeats=repeats, warmup=warmup)


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
    p.add_argument("--against", default="", metavar="DIR",
                   help="also time the Flax step of another checkout (e.g. a git worktree of an older commit), "
                        "in its own worker with that checkout's process defaults")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker is not None:
        _worker(args.worker)
        return
    import torch

    torch.set_num_threads(args.threads)
    print(f"machine: {machine_description()}; {_load()}")
    print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    if args.xla_variants is not None:
        names = [n.strip() for n in args.xla_variants.split(",") if n.strip()]
        unknown = [n for n in names if n not in XLA_VARIANTS]
        assert not any("," in n for n in XLA_VARIANTS), "variant names are comma-separated on the command line"
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
    # each candidate in its own process: Flax with the training application's process defaults, PyTorch with
    # glibc's defaults (what a PyTorch user runs; PyTorch's eager step is slower under our allocator settings,
    # so it is also shown with them for reference)
    torch_env = {"FLAX_ATTN_NO_MALLOC_TUNING": "1"}
    torch_tuned = {"FLAX_ATTN_NO_MALLOC_TUNING": "0"}
    if args.main_job:
        from train.main_job import MAIN_JOB_CONFIG as M

        b, s, w = M.batch_size, M.image_size, M.width
        flax = {"framework": "flax", "batch": b, "size": s, "width": w, "stem": M.stem}
        tch = {"framework": "torch", "batch": b, "size": s, "width": w, "threads": args.threads}
        cands = {
            "Flax plain": ({**flax, "attn": "none"}, {}),
            "Flax CBAM (official)": ({**flax, "attn": "cbam_official"}, {}),
            "Flax CBAM (paper)": ({**flax, "attn": "cbam"}, {}),
            "PyTorch plain": ({**tch, "model": "small_plain"}, torch_env),
            "PyTorch CBAM (official)": ({**tch, "model": "small_cbam"}, torch_env),
        }
        if args.against:
            old = {"FLAX_ATTN_BENCH_ROOT": os.path.abspath(args.against)}
            cands["Flax plain at --against"] = ({**flax, "attn": "none"}, old)
            cands["Flax CBAM (official) at --against"] = ({**flax, "attn": "cbam_official"}, old)
            cands["Flax CBAM (paper) at --against"] = ({**flax, "attn": "cbam"}, old)
        med = run_workers(cands, repeats=args.repeats, warmup=args.warmup)
        print(f"\nmain job configuration: ResNet-18 width {w}, {M.stem} stem, {s}x{s}, batch {b}, float32; median of "
              f"{args.repeats} interleaved steps, one process per candidate; {_load()} at the end\n")
        print("| implementation | step ms | images/s | / plain (same framework) |")
        print("|---|---:|---:|---:|")
        for name, (t, _) in med.items():
            plain = med[("Flax plain" if name.startswith("Flax") else "PyTorch plain")
                        + (" at --against" if name.endswith(" at --against") else "")][0]
            print(f"| {name} | {1e3 * t:.1f} | {b / t:.0f} | {t / plain:.2f}x |")
        return
    print(f"ResNet-18 + CBAM (official block), 3 input channels, batch {args.batch}, float32, train step = "
          f"forward + backward + SGD update; median of {args.repeats} interleaved steps, one process per "
          f"candidate\n")
    print("| input | implementation | step time (ms) | images/s | Flax / this |")
    print("|---|---|---:|---:|---:|")
    for size in (int(v) for v in args.sizes.split(",")):
        tch = {"framework": "torch", "batch": args.batch, "size": size, "model": "cbam_resnet18",
               "threads": args.threads}
        cands = {
            "Flax (jax.jit, donated state)": ({"framework": "flax", "batch": args.batch, "size": size}, {}),
            "PyTorch eager (torch_ref), glibc malloc defaults": (tch, torch_env),
            "PyTorch eager, with the Flax side's malloc settings": (tch, torch_tuned),
        }
        if args.against:
            cands["Flax at --against"] = ({"framework": "flax", "batch": args.batch, "size": size},
                                          {"FLAX_ATTN_BENCH_ROOT": os.path.abspath(args.against)})
        med = run_workers(cands, repeats=args.repeats, warmup=args.warmup)
        flax_t = med["Flax (jax.jit, donated state)"][0]
        for name, (t, _) in med.items():
            ratio = "" if name == "Flax (jax.jit, donated state)" else f"{t / flax_t:.2f}x"
            print(f"| {size}x{size} | {name} | {1e3 * t:.1f} | {args.batch / t:.0f} | {ratio} |", flush=True)
    print(f"\n({_load()} at the end)")

if __name__ == "__main__":
    main()
