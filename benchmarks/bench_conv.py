"""The convolutions of the ResNet-18 training step, one by one: forward, backward-input and backward-filter
timed separately for XLA's convolution (``lax.conv_general_dilated`` and its JAX transposes), the im2col +
matmul formulation, and PyTorch (oneDNN: ``F.conv2d`` and ``torch.ops.aten.convolution_backward``).

Every distinct convolution of ResNet-18 at the given input size and batch (torchvision stem), NHWC / HWIO for
JAX, NCHW for torch; float32; median of interleaved repeats. The table says, per layer and part, which
formulation is fastest here, which is what ``flax_attn.models._common._small_map_conv`` should pick.

Usage: python benchmarks/bench_conv.py [--size 64] [--batch 64] [--repeats 7] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import train.xla_flags  # noqa: F401,I001  (the training application's process defaults: allocator settings)
from _timing import format_table, interleaved_medians, machine_description


def resnet18_convs(size: int) -> list[tuple[str, int, int, int, int, int]]:
    """(name, input side, in channels, out channels, kernel, stride) of every distinct conv."""
    s = (size + 2 * 3 - 7) // 2 + 1  # stem conv output
    s = (s + 2 - 3) // 2 + 1  # max-pool
    out = [("conv1 7x7/2", size, 3, 64, 7, 2)]
    c = 64
    for i, planes in enumerate((64, 128, 256, 512)):
        stride = 1 if i == 0 else 2
        if stride == 2:
            out.append((f"layer{i + 1}.0.conv1 3x3/2", s, c, planes, 3, 2))
            out.append((f"layer{i + 1}.0.downsample 1x1/2", s, c, planes, 1, 2))
            s = (s + 2 - 3) // 2 + 1
        out.append((f"layer{i + 1} 3x3/1 (x{3 if stride == 2 else 4})", s, planes, planes, 3, 1))
        c = planes
    return out


def im2col_conv(x, w, stride, pad):
    kh, kw, ci, co = w.shape
    xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    ho = (xp.shape[1] - kh) // stride + 1
    wo = (xp.shape[2] - kw) // stride + 1
    cols = jnp.concatenate([xp[:, i: i + (ho - 1) * stride + 1: stride, j: j + (wo - 1) * stride + 1: stride, :]
                            for i in range(kh) for j in range(kw)], axis=-1)
    return jnp.dot(cols, w.reshape(kh * kw * ci, co))


def lax_conv(x, w, stride, pad):
    return jax.lax.conv_general_dilated(x, w, (stride, stride), ((pad, pad), (pad, pad)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def jax_parts(conv, x, w, stride, pad):
    dy = jnp.full(jax.eval_shape(lambda a, b: conv(a, b, stride, pad), x, w).shape, 0.01, x.dtype)
    fwd = jax.jit(lambda a, b: conv(a, b, stride, pad))
    bwd_in = jax.jit(lambda a, b, g: jax.vjp(lambda u: conv(u, b, stride, pad), a)[1](g)[0])
    bwd_w = jax.jit(lambda a, b, g: jax.vjp(lambda u: conv(a, u, stride, pad), b)[1](g)[0])
    return {"fwd": lambda: fwd(x, w).block_until_ready(),
            "bwd-input": lambda: bwd_in(x, w, dy).block_until_ready(),
            "bwd-filter": lambda: bwd_w(x, w, dy).block_until_ready()}


def torch_parts(x, w, stride, pad):
    import torch

    xt = torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))
    wt = torch.from_numpy(np.ascontiguousarray(np.transpose(w, (3, 2, 0, 1))))
    with torch.no_grad():
        y = torch.nn.functional.conv2d(xt, wt, None, stride, pad)
    dy = torch.full_like(y, 0.01)
    bw = torch.ops.aten.convolution_backward

    def part(mask):
        def run():
            with torch.no_grad():
                bw(dy, xt, wt, None, [stride] * 2, [pad] * 2, [1, 1], False, [0, 0], 1, mask)
        return run

    def fwd():
        with torch.no_grad():
            torch.nn.functional.conv2d(xt, wt, None, stride, pad)
    return {"fwd": fwd, "bwd-input": part([True, False, False]), "bwd-filter": part([False, True, False])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default="", help="substring of the layer names to run")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    print(f"machine: {machine_description()}; ResNet-18 convs at {args.size}x{args.size}, batch {args.batch}")
    rng = np.random.default_rng(0)
    rows = []
    for name, side, ci, co, k, s in resnet18_convs(args.size):
        if args.only and args.only not in name:
            continue
        x = rng.standard_normal((args.batch, side, side, ci), np.float32)
        w = (rng.standard_normal((k, k, ci, co), np.float32) * 0.05).astype(np.float32)
        pad = (k - 1) // 2
        xj, wj = jnp.asarray(x), jnp.asarray(w)
        cands = {}
        for tag, parts in (("lax", jax_parts(lax_conv, xj, wj, s, pad)), ("im2col", jax_parts(im2col_conv, xj, wj, s, pad)),
                           ("torch", torch_parts(x, w, s, pad))):
            for part, fn in parts.items():
                cands[(tag, part)] = fn
        t = interleaved_medians(cands, repeats=args.repeats)
        for part in ("fwd", "bwd-input", "bwd-filter"):
            ms = {tag: t[(tag, part)] * 1e3 for tag in ("lax", "im2col", "torch")}
            best = min(("lax", "im2col"), key=ms.__getitem__)
            rows.append([name, f"{side}x{side} {ci}->{co}", part, f"{ms['lax']:.2f}", f"{ms['im2col']:.2f}",
                         f"{ms['torch']:.2f}", best, f"{ms['torch'] / ms[best]:.2f}x"])
        print(format_table(["conv", "input", "part", "lax ms", "im2col ms", "torch ms", "best jax", "torch / best"],
                           rows[-3:]), flush=True)
    print()
    print(format_table(["conv", "input", "part", "lax ms", "im2col ms", "torch ms", "best jax", "torch / best"], rows))


if __name__ == "__main__":
    main()
