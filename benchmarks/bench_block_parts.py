"""Forward + backward of the parts of a CBAM training step that XLA:CPU's generic lowering made expensive, each
next to the formulation the package uses now: the max derivatives and the spatial gate's 7x7 convolution.

Two kinds of max appear in a CBAM-ResNet training step and both need PyTorch's derivative (the whole gradient
to one arg-max element):

* CBAM's global max pools: over the spatial axes (channel gate) and over the channels (spatial gate),
  ``flax_attn.layers._functional._max_reduce``;
* the torchvision stem's 3x3 / 2 max-pool (and VGG's 2x2, YOLOv5 SPPF's 5x5 / 1),
  ``flax_attn.layers._functional.max_pool``.

Candidates, each jitted as ``grad(sum(f(x) * w))`` (forward and backward, one program):

* ``gather``: the previous rule of ``_max_reduce``: arg-max, then ``take_along_axis`` for the value and the
  tangent (its transpose is a scatter-add), axes moved last by a transpose;
* ``one-hot`` (current): arg-max, tangent ``sum(where(iota == argmax, t, 0))`` (transpose: an elementwise
  select), contiguous axes merged by a reshape;
* ``jnp.max``: JAX's own rule (mask ``x == max``, gradient split over ties; not exact under jit, see
  ``_max_reduce``), for scale;
* pools: ``xla`` (``lax.reduce_window``, JAX's ``select_and_gather_add`` / ``select_and_scatter_add``) against
  ``max_pool`` (one pass over the window's strided views, backward a sum of strided pads).

and the spatial gate's convolution (2 pooled channels in, 1 out): ``lax`` (``lax.conv_general_dilated``) against
``gate_conv`` (one matmul against the kernel's banded matrices, ``flax_attn.layers._functional.gate_conv``).

Usage: python benchmarks/bench_block_parts.py [--repeats 20]
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import train.xla_flags  # noqa: F401,I001  (the training application's process defaults)
from _timing import format_table, interleaved_medians, machine_description

from flax_attn.layers._functional import _max_reduce, gate_conv, max_pool


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _max_last_gather(x, n_reduced):
    return jnp.max(x, axis=tuple(range(x.ndim - n_reduced, x.ndim)))


@_max_last_gather.defjvp
def _max_last_gather_jvp(n_reduced, primals, tangents):
    (x,), (t,) = primals, tangents
    lead = x.shape[: x.ndim - n_reduced]
    flat = lead + (math.prod(x.shape[x.ndim - n_reduced:]),)
    idx = jnp.argmax(x.reshape(flat), axis=-1, keepdims=True)
    out = jnp.take_along_axis(x.reshape(flat), idx, axis=-1)[..., 0]
    return out, jnp.take_along_axis(t.reshape(flat), idx, axis=-1)[..., 0]


def max_gather(x, axes):
    """The previous ``_max_reduce`` (before this benchmark was written)."""
    rest = tuple(d for d in range(x.ndim) if d not in axes)
    moved = jnp.transpose(x, rest + axes) if rest + axes != tuple(range(x.ndim)) else x
    return _max_last_gather(moved, len(axes))


def xla_pool(x, k, s, p):
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, k, k, 1), (1, s, s, 1), ((0, 0), (p, p), (p, p), (0, 0)))


def _grad_fn(f, x):
    w = jax.random.normal(jax.random.key(1), jax.eval_shape(f, x).shape, x.dtype)
    g = jax.jit(jax.grad(lambda v: jnp.sum(f(v) * w)))

    def run():
        g(x).block_until_ready()
    return run, g


def _time_equal_grads(cands: dict, x: jax.Array, same: tuple[str, str], repeats: int) -> dict[str, float]:
    """Median fwd+bwd time of each candidate at ``x``, after checking that the two named in ``same`` give
    bit-identical gradients."""
    fns, grads = {}, {}
    for name, f in cands.items():
        fns[name], grads[name] = _grad_fn(f, x)
    np.testing.assert_array_equal(np.asarray(grads[same[0]](x)), np.asarray(grads[same[1]](x)))
    return interleaved_medians(fns, repeats=repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    print(f"machine: {machine_description()}")
    rng = np.random.default_rng(0)
    rows = []
    reductions = [  # (what, shape, axes)
        ("main job layer1 CBAM, channel gate (max over H, W)", (32, 48, 48, 8), (1, 2)),
        ("main job layer1 CBAM, spatial gate (max over C)", (32, 48, 48, 8), (3,)),
        ("ResNet-18 64x64 layer1 CBAM, channel gate", (64, 16, 16, 64), (1, 2)),
        ("ResNet-18 64x64 layer1 CBAM, spatial gate", (64, 16, 16, 64), (3,)),
    ]
    for what, shape, axes in reductions:
        x = jnp.asarray(rng.standard_normal(shape, np.float32))
        cands = {"gather": lambda v, a=axes: max_gather(v, a), "one-hot": lambda v, a=axes: _max_reduce(v, a),
                 "jnp.max": lambda v, a=axes: jnp.max(v, axis=a)}
        t = _time_equal_grads(cands, x, ("gather", "one-hot"), args.repeats)
        rows.append([what, str(shape), f"{t['gather'] * 1e3:.2f}", f"{t['one-hot'] * 1e3:.2f}",
                     f"{t['jnp.max'] * 1e3:.2f}", f"{t['gather'] / t['one-hot']:.2f}x"])
    print(format_table(["max reduction", "input", "gather ms", "one-hot ms", "jnp.max ms", "gather / one-hot"],
                       rows))
    rows = []
    pools = [("ResNet stem 3x3/2 pad 1 at 64x64", (64, 32, 32, 64), 3, 2, 1),
             ("ResNet stem 3x3/2 pad 1 at 96x96", (64, 48, 48, 64), 3, 2, 1),
             ("VGG 2x2/2", (8, 56, 56, 128), 2, 2, 0),
             ("YOLOv5s SPPF 5x5/1 pad 2 at 640", (4, 20, 20, 256), 5, 1, 2)]
    for what, shape, k, s, p in pools:
        x = jnp.asarray(rng.standard_normal(shape, np.float32))
        cands = {"xla": lambda v, k=k, s=s, p=p: xla_pool(v, k, s, p),
                 "max_pool": lambda v, k=k, s=s, p=p: max_pool(v, (k, k), (s, s), ((p, p), (p, p)))}
        t = _time_equal_grads(cands, x, ("xla", "max_pool"), args.repeats)
        rows.append([what, str(shape), f"{t['xla'] * 1e3:.2f}", f"{t['max_pool'] * 1e3:.2f}",
                     f"{t['xla'] / t['max_pool']:.2f}x"])
    print(format_table(["max pool (fwd+bwd)", "input", "xla ms", "max_pool ms", "xla / max_pool"], rows))
    rows = []
    gates = [("main job layer1 (48x48 CIFAR stem)", (32, 48, 48, 2)), ("main job layer2", (32, 24, 24, 2)),
             ("main job layer3", (32, 12, 12, 2)), ("ResNet-18 64x64 layer1", (64, 16, 16, 2)),
             ("ResNet-18 224x224 layer1", (32, 56, 56, 2)), ("112x112 map (lax path: wider than 64)", (8, 112, 112, 2))]
    dn = ("NHWC", "HWIO", "NHWC")
    for what, shape in gates:
        x = jnp.asarray(rng.standard_normal(shape, np.float32))
        k = jnp.asarray(rng.standard_normal((7, 7, 2, 1), np.float32))
        pad = ((3, 3), (3, 3))
        dnums = jax.lax.conv_dimension_numbers(shape, k.shape, dn)
        w = jnp.asarray(rng.standard_normal(shape[:3] + (1,), np.float32))
        convs = {"lax": lambda v, u, p=pad, d=dnums: jax.lax.conv_general_dilated(v, u, (1, 1), p, dimension_numbers=d),
                 "gate_conv": lambda v, u, p=pad, d=dnums: gate_conv(v, u, (1, 1), p, dimension_numbers=d)}
        fns, grads = {}, {}
        for name, conv in convs.items():
            # x, k and the cotangent are arguments: with constants XLA would fold the whole (linear) gradient
            g = jax.jit(jax.grad(lambda v, u, c, conv=conv: jnp.sum(conv(v, u) * c), argnums=(0, 1)))
            grads[name] = g(x, k, w)
            fns[name] = lambda g=g, x=x, k=k, w=w: jax.block_until_ready(g(x, k, w))
        for a, b in zip(grads["lax"], grads["gate_conv"]):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5 * float(jnp.abs(a).max()))
        t = interleaved_medians(fns, repeats=args.repeats)
        rows.append([what, str(shape), f"{t['lax'] * 1e3:.2f}", f"{t['gate_conv'] * 1e3:.2f}",
                     f"{t['lax'] / t['gate_conv']:.2f}x"])
    print(format_table(["7x7 gate conv, 2 -> 1 (fwd + both gradients)", "input", "lax ms", "gate_conv ms",
                        "lax / gate_conv"], rows))


if __name__ == "__main__":
    main()
