"""Where the time of the jitted training step goes, per op class, as fractions of the step (load-robust).

Runs the training application's own jitted step (``train.train.Functions.train_step``, the same one
``bench_train.py`` times), records a few steps with ``jax.profiler.trace`` and attributes every XLA:CPU thunk
(one event per HLO instruction of the compiled program, ``hlo_op``) to an op class by reading the compiled
HLO:

* ``conv fwd`` / ``conv bwd-input`` / ``conv bwd-filter``: convolutions (and the im2col matmuls that
  ``flax_attn.models`` uses for maps smaller than the kernel), split by the JAX op that produced them
  (``transpose(jvp(...))`` = backward; bwd-filter = the output has the kernel's shape);
* ``BatchNorm``: the fusions that carry BatchNorm's moments / normalisation (fwd and bwd);
* ``CBAM pooling / gate``: the attention blocks' reductions, gates and products (fwd and bwd);
* ``arg-max gathers``: the max pools' derivative (``argmax`` / ``take_along_axis``);
* ``optimizer``: the SGD / weight-decay update;
* ``other``: loss, ReLU, residual adds, stem max-pool, copies.

Thunks may overlap on several threads, so the fractions are of the summed thunk time (``busy``); the wall
time of a step is printed too. Fractions hold up under CPU contention far better than absolute times.

    python benchmarks/profile_train.py [--size 64] [--batch 64] [--attn cbam_official] [--steps 3]
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax
import numpy as np

import train.xla_flags  # noqa: F401  (XLA:CPU defaults; read when the backend starts, after any import)

CLASSES = ("conv fwd", "conv bwd-input", "conv bwd-filter", "BatchNorm", "CBAM pooling / gate", "CBAM 7x7 conv",
           "arg-max gathers", "stem max-pool", "optimizer", "other")

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\([^)]*\)|\S+)\s+([\w\-]+)\((.*)$")


def _computations(hlo: str) -> dict[str, list[str]]:
    comps: dict[str, list[str]] = {}
    cur = None
    for line in hlo.splitlines():
        m = re.match(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
        if m and not line.startswith(" "):
            cur = m.group(1)
            comps[cur] = []
        elif cur is not None and line.strip() == "}":
            cur = None
        elif cur is not None:
            comps[cur].append(line)
    return comps


def _body(comps: dict[str, list[str]], line: str, depth: int = 0) -> list[str]:
    """The instruction line plus the lines of every computation it calls (recursively)."""
    out = [line]
    if depth > 4:
        return out
    for callee in re.findall(r"(?:calls|to_apply|body|condition|branch_computations)=\{?%?([\w.\-]+)", line):
        for sub in comps.get(callee, []):
            out.extend(_body(comps, sub, depth + 1))
    return out


def _frames(hlo: str) -> dict[str, list[str]]:
    """``stack_frame_id -> [function names, innermost first]`` from the HLO module's stack-frame tables."""
    tables: dict[str, dict[int, str]] = {"FunctionNames": {}, "FileLocations": {}, "StackFrames": {}}
    cur = None
    for line in hlo.splitlines():
        if line in tables:
            cur = line
        elif cur is not None and (m := re.match(r"^(\d+)\s+(.*)$", line)):
            tables[cur][int(m.group(1))] = m.group(2)
        elif cur is not None and not line.strip():
            cur = None
    funcs = {k: v.strip('"') for k, v in tables["FunctionNames"].items()}
    loc_func = {k: int(re.search(r"function_name_id=(\d+)", v).group(1))  # type: ignore[union-attr]
                for k, v in tables["FileLocations"].items()}
    frames = {}
    for k, v in tables["StackFrames"].items():
        m = re.search(r"file_location_id=(\d+) parent_frame_id=(\d+)", v)
        if m:
            frames[k] = (int(m.group(1)), int(m.group(2)))
    out: dict[str, list[str]] = {}
    for k in frames:
        chain, seen, f = [], set(), k
        while f in frames and f not in seen:
            seen.add(f)
            loc, parent = frames[f]
            chain.append(funcs.get(loc_func.get(loc, -1), "?"))
            f = parent
        out[str(k)] = chain
    return out


_CBAM_FUNCS = {"CBAM.__call__", "ChannelAttention.attention_map", "SpatialAttention.attention_map",
               "SqueezeExcite.__call__", "ChannelAttention.__call__", "SpatialAttention.__call__"}


def classify(lines: list[str], out_shape: str, kernel_shapes: set[tuple[int, ...]], frames: dict[str, list[str]]) -> str:
    """The op class of one HLO instruction (``lines``: it and the computations it calls)."""
    text = "\n".join(lines)
    ops = set(re.findall(r"=\s*\S+\s+([\w\-]+)\(", text))
    names = " ".join(re.findall(r'op_name="([^"]*)"', text))
    funcs = {f for i in re.findall(r"stack_frame_id=(\d+)", text) for f in frames.get(i, [])}
    backward = "transpose(" in names
    if "convolution" in ops or ("dot" in ops and funcs & {"_small_map_conv", "Conv.__call__"}):
        dims = tuple(sorted(int(d) for d in re.findall(r"\d+", out_shape.split("{")[0].split("[", 1)[-1])))
        last = re.findall(r"\d+", out_shape.split("]")[0])[-1:]
        if funcs & _CBAM_FUNCS or dims == (1, 2, 7, 7) or last in (["1"], ["2"]):
            return "CBAM 7x7 conv"
        if dims in kernel_shapes:  # the kernel's gradient (XLA often writes it in a transposed layout)
            return "conv bwd-filter"
        return "conv bwd-input" if backward else "conv fwd"
    if not funcs:
        return ""  # no source: inherits the class of its consumer (see op_classes)
    if "_max_last_jvp" in funcs:
        return "arg-max gathers"
    if "MaxPool2d.__call__" in funcs:
        return "stem max-pool"
    if funcs & _CBAM_FUNCS:
        return "CBAM pooling / gate"
    if "BatchNorm.__call__" in funcs:
        return "BatchNorm"
    if any("update" in f or f.startswith("apply_updates") for f in funcs):
        return "optimizer"
    return "other"


def op_classes(compiled_text: str, kernel_shapes: set[tuple[int, ...]]) -> dict[str, str]:
    comps = _computations(compiled_text)
    frames = _frames(compiled_text)
    entry = next((k for k in comps if k.startswith("main")), None)
    entry_lines = comps[entry] if entry else [ln for v in comps.values() for ln in v]
    result: dict[str, str] = {}
    users: dict[str, list[str]] = collections.defaultdict(list)
    for line in entry_lines:
        m = _INSTR.match(line)
        if m:
            name, shape = m.group(1), m.group(2)
            result[name] = classify(_body(comps, line), shape, kernel_shapes, frames)
            for operand in re.findall(r"%([\w.\-]+)", m.group(4).split("), ")[0]):
                users[operand].append(name)
    for _ in range(8):  # instructions without source metadata (iotas, broadcasts, copies) take their user's class
        for name, cls in result.items():
            if not cls:
                result[name] = next((result[u] for u in users.get(name, []) if result.get(u)), "")
    return {k: v or "other" for k, v in result.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--attn", default="cbam_official")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--stem", default="torchvision")
    p.add_argument("--compute_dtype", default="float32")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=12, help="also list the N most expensive HLO instructions")
    p.add_argument("--hlo-out", default="", help="write the compiled HLO text here (to read the top instructions)")
    args = p.parse_args()

    from _timing import machine_description

    from train.config import Config
    from train.train import Functions, make_mesh

    cfg = Config(model="resnet18", attn=args.attn, width=args.width, stem=args.stem, batch_size=args.batch,
                 compute_dtype=args.compute_dtype)
    fns = Functions(cfg, num_classes=10, in_chans=3, mesh=make_mesh())
    state = fns.init()
    rng = np.random.default_rng(0)
    x = jax.device_put(rng.random((args.batch, args.size, args.size, 3), np.float32), fns.batch_sharding)
    y = jax.device_put(rng.integers(0, 10, args.batch).astype(np.int32), fns.batch_sharding)
    compiled = fns.train_step.lower(state, x, y).compile()
    kernels = {tuple(sorted(v.shape)) for v in jax.tree.leaves(state.params) if v.ndim == 4}
    kernels |= {tuple(sorted((int(np.prod(v.shape[:3])), v.shape[3]))) for v in jax.tree.leaves(state.params)
                if v.ndim == 4}
    classes = op_classes(compiled.as_text(), kernels)
    if args.hlo_out:
        with open(args.hlo_out, "w") as fh:
            fh.write(compiled.as_text())
    for _ in range(2):
        state, m = fns.train_step(state, x, y)
        jax.block_until_ready(m["loss"])
    logdir = tempfile.mkdtemp(prefix="profile_train_")
    t0 = time.perf_counter()
    with jax.profiler.trace(logdir):
        for _ in range(args.steps):
            state, m = fns.train_step(state, x, y)
            jax.block_until_ready(m["loss"])
    wall = (time.perf_counter() - t0) / args.steps
    path = glob.glob(os.path.join(logdir, "plugins", "profile", "*", "*.trace.json.gz"))[0]
    with gzip.open(path) as fh:
        events = json.load(fh)["traceEvents"]
    per_class: collections.Counter[str] = collections.Counter()
    per_op: collections.Counter[str] = collections.Counter()
    unknown = 0.0
    unknown_ops: collections.Counter[str] = collections.Counter()
    for e in events:
        op = (e.get("args") or {}).get("hlo_op")
        if e.get("ph") != "X" or op is None or (e.get("args") or {}).get("hlo_module", "").find("train_step") < 0:
            continue
        dur = e["dur"] / 1e3 / args.steps  # ms per step
        cls = classes.get(op)
        if cls is None:
            unknown += dur
            unknown_ops[op] += dur
            cls = "other"
        per_class[cls] += dur
        per_op[op] += dur
    busy = sum(per_class.values())
    load = os.getloadavg()
    print(f"machine: {machine_description()}; load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    print(f"ResNet-18 attn={args.attn} width {args.width} stem {args.stem}, batch {args.batch}, "
          f"{args.size}x{args.size}, {args.compute_dtype}; {args.steps} profiled steps; wall {1e3 * wall:.0f} "
          f"ms/step, summed thunk time {busy:.0f} ms/step; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}\n")
    print("| op class | ms / step (busy) | fraction |")
    print("|---|---:|---:|")
    for c in CLASSES:
        print(f"| {c} | {per_class[c]:.1f} | {100 * per_class[c] / busy:.1f} % |")
    if unknown:
        print(f"\n({unknown:.1f} ms/step of thunks not found in the entry computation, counted as other: "
              + ", ".join(f"{k} {v:.1f} ms" for k, v in unknown_ops.most_common(5)) + ")")
    print(f"\ntop {args.top} HLO instructions:")
    for op, t in per_op.most_common(args.top):
        print(f"  {t:8.1f} ms  {100 * t / busy:5.1f} %  {classes.get(op, '?'):20s} {op}")


if __name__ == "__main__":
    main()
