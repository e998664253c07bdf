"""Times the Flax SE and CBAM blocks (jit) against torch_ref on the same CPU, in one run.

Feature map (32, 56, 56, 256) channels-last for Flax, (32, 256, 56, 56) for torch; forward and
forward+backward (gradients w.r.t. the input and every parameter); median of repeated runs after warm-up,
the two frameworks measured round-robin. The memory-bandwidth floor is measured in the same script (a large
array copy: bytes read + written per second); a block's floor is the bytes it must move at that speed:
SE 2 reads + 1 write of the input (pool, then rescale), CBAM 3 reads + 1 write (channel pool; channel gate
applied on the fly for the spatial pool; gated input re-formed for the output) forward.

Usage: python benchmarks/bench_blocks.py [--repeats 10] [--batch 32]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

# the project's process defaults (glibc allocator settings, train/xla_flags.py) for both frameworks in this process;
# FLAX_ATTN_NO_MALLOC_TUNING=1 runs both with glibc's defaults
import train.xla_flags  # noqa: E402,F401,I001
import torch_ref  # noqa: E402
from _timing import format_table, interleaved_medians, machine_description, median_time  # noqa: E402

from flax_attn.convert import torch_to_nnx  # noqa: E402
from flax_attn.layers import CBAM, SqueezeExcite  # noqa: E402


def measure_bandwidth(nbytes: int = 512 * 2**20) -> float:
    """Copy bandwidth in bytes/s (read + write), the better of numpy and XLA on this machine."""
    src = np.random.default_rng(0).standard_normal(nbytes // 4, dtype=np.float32)
    dst = np.empty_like(src)
    t_np = median_time(lambda: np.copyto(dst, src), repeats=7)
    xs = jnp.asarray(src)
    copy = jax.jit(lambda a: a + 0.0)
    t_jax = median_time(lambda: copy(xs).block_until_ready(), repeats=7)
    return 2 * nbytes / min(t_np, t_jax)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=56)
    ap.add_argument("--channels", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    n, s, c = args.batch, args.size, args.channels

    bw = measure_bandwidth()
    x_np = np.random.default_rng(1).standard_normal((n, s, s, c), dtype=np.float32)
    x_jax = jnp.asarray(x_np)
    x_t = torch.from_numpy(np.ascontiguousarray(x_np.transpose(0, 3, 1, 2)))
    ct_jax = jnp.asarray(np.random.default_rng(2).standard_normal(x_np.shape, dtype=np.float32))
    ct_t = torch.from_numpy(np.ascontiguousarray(np.asarray(ct_jax).transpose(0, 3, 1, 2)))
    in_bytes = x_np.nbytes

    blocks = {
        "SE": (lambda: torch_ref.SqueezeExcite(c), lambda: SqueezeExcite(c, rngs=nnx.Rngs(0)), 3),
        "CBAM": (lambda: torch_ref.CBAM(c), lambda: CBAM(c, rngs=nnx.Rngs(0)), 4),
    }
    rows = []
    for name, (make_t, make_f, floor_passes) in blocks.items():
        tmod = make_t().eval()
        fmod = torch_to_nnx(make_f(), tmod.state_dict())
        fmod.eval()
        graphdef, state = nnx.split(fmod)

        fwd = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x))

        def loss(st, x):
            return jnp.vdot(nnx.merge(graphdef, st)(x), ct_jax)

        fwd_bwd = jax.jit(jax.grad(loss, argnums=(0, 1)))
        params = [p for p in tmod.parameters()]

        def t_fwd():
            with torch.no_grad():
                tmod(x_t)

        def t_fwd_bwd():
            xt = x_t.detach().requires_grad_(True)
            for p in params:
                p.grad = None
            tmod(xt).backward(ct_t)

        # check the two sides compute the same thing before timing them
        y_f = np.asarray(fwd(state, x_jax))
        with torch.no_grad():
            y_t = tmod(x_t).numpy().transpose(0, 2, 3, 1)
        rel = np.linalg.norm(y_f - y_t) / np.linalg.norm(y_t)
        assert rel < 1e-5, f"{name}: Flax and torch disagree (rel err {rel:.2e})"

        for mode, jf, tf in [
            ("forward", lambda: fwd(state, x_jax).block_until_ready(), t_fwd),
            ("fwd+bwd", lambda: jax.block_until_ready(fwd_bwd(state, x_jax)), t_fwd_bwd),
        ]:
            med = interleaved_medians({"flax": jf, "torch": tf}, repeats=args.repeats)
            floor_s = floor_passes * in_bytes / bw if mode == "forward" else None
            rows.append([
                name, mode, f"{med['flax'] * 1e3:.1f}", f"{med['torch'] * 1e3:.1f}",
                f"{med['torch'] / med['flax']:.2f}x",
                f"{med['flax'] / floor_s:.2f}x" if floor_s else "-",
            ])
    print(f"machine: {machine_description()}")
    print(f"copy bandwidth (read+write): {bw / 1e9:.1f} GB/s; input {in_bytes / 2**20:.0f} MiB "
          f"({n}, {s}, {s}, {c}) float32")
    print(format_table(["block", "pass", "flax ms", "torch ms", "torch/flax", "flax/floor"], rows))


if __name__ == "__main__":
    main()
