"""Generates docs/img/cam_digits.png, the README's CAM example (run from a checkout; ~1 min on 2 CPU cores).

Trains a small CNN with a CBAM block on "cluttered digits" (scikit-learn's 8x8 digits, upscaled to 16x16
and pasted at a random place of a noisy 40x40 canvas), then explains held-out images with flax_attn.cam:
GradCAM for the predicted class and for the runner-up class (both from ONE forward pass with (B, 2)
targets) and LayerCAM for the predicted class, overlaid with ``show_cam_on_image`` via ``plot_cam_grid``.

    python docs/make_cam_figure.py [--out docs/img/cam_digits.png] [--steps 600]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import flax_attn.cam as fc  # noqa: E402
from flax_attn.layers import CBAM, BatchNorm  # noqa: E402

CANVAS = 40


def cluttered_digits(seed: int = 0):
    from sklearn.datasets import load_digits

    d = load_digits()
    rs = np.random.RandomState(seed)
    imgs = np.kron(d.images / 16.0, np.ones((2, 2)))  # 16x16
    n = len(imgs)
    x = rs.rand(n, CANVAS, CANVAS).astype(np.float32) * 0.15
    for i in range(n):  # distractor: a random crop of another digit
        j = rs.randint(n)
        r, c = rs.randint(0, CANVAS - 6, size=2)
        x[i, r:r + 6, c:c + 6] = np.maximum(x[i, r:r + 6, c:c + 6], imgs[j][5:11, 5:11] * 0.6)
    for i in range(n):
        r, c = rs.randint(0, CANVAS - 16, size=2)
        x[i, r:r + 16, c:c + 16] = np.maximum(x[i, r:r + 16, c:c + 16], imgs[i])
    return x[..., None], d.target.astype(np.int32)


class Net(nnx.Module):
    def __init__(self, *, rngs):
        self.conv1 = nnx.Conv(1, 16, (3, 3), padding=((1, 1), (1, 1)), rngs=rngs)
        self.bn1 = BatchNorm(16, rngs=rngs)
        self.conv2 = nnx.Conv(16, 32, (3, 3), strides=2, padding=((1, 1), (1, 1)), rngs=rngs)
        self.bn2 = BatchNorm(32, rngs=rngs)
        self.attn = CBAM(32, reduction=4, kernel_size=5, rngs=rngs)
        self.block3 = nnx.Sequential(
            nnx.Conv(32, 64, (3, 3), strides=2, padding=((1, 1), (1, 1)), rngs=rngs), BatchNorm(64, rngs=rngs),
            jax.nn.relu)
        self.fc = nnx.Linear(64, 10, rngs=rngs)

    def __call__(self, x):
        x = jax.nn.relu(self.bn1(self.conv1(x)))
        x = self.attn(jax.nn.relu(self.bn2(self.conv2(x))))
        x = self.block3(x)
        return self.fc(x.mean((1, 2)))


def train(x, y, steps: int, seed: int = 0) -> Net:
    model = Net(rngs=nnx.Rngs(seed))
    opt = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, xb, yb):
        def loss_fn(m):
            return optax.softmax_cross_entropy_with_integer_labels(m(xb), yb).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    rs = np.random.RandomState(seed)
    model.train()
    for i in range(steps):
        idx = rs.randint(0, len(x), 64)
        loss = step(model, opt, jnp.asarray(x[idx]), jnp.asarray(y[idx]))
        if i % 200 == 0:
            print(f"step {i}: loss {float(loss):.3f}")
    model.eval()
    return model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="CAM figure for the README")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "img", "cam_digits.png"))
    p.add_argument("--steps", type=int, default=800)
    args = p.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")

    x, y = cluttered_digits()
    n_train = 1500
    model = train(x[:n_train], y[:n_train], args.steps)
    xt, yt = jnp.asarray(x[n_train:]), y[n_train:]
    logits = model(xt)
    print(f"held-out accuracy: {float((jnp.argmax(logits, -1) == yt).mean()):.3f}")

    pick = np.arange(6)
    xs = xt[pick]
    order = jnp.argsort(-model(xs), axis=-1)
    top2 = order[:, :2]  # (B, 2): predicted class and runner-up, one forward pass
    grad = fc.GradCAM(model, target_layers=["block3"])(xs, top2)
    layer = fc.LayerCAM(model, target_layers=["attn", "block3"])(xs, top2[:, 0])
    cams = jnp.concatenate([grad, layer[:, None]], axis=1)
    imgs = np.repeat(np.asarray(xs), 3, axis=-1)
    imgs = imgs / imgs.max(axis=(1, 2, 3), keepdims=True)
    rows = [f"label {int(yt[i])}, pred {int(top2[k, 0])}" for k, i in enumerate(pick)]
    fig = fc.plot_cam_grid(imgs, cams, row_titles=rows,
                           col_titles=["image", "GradCAM\npredicted", "GradCAM\nrunner-up",
                                       "LayerCAM, 2 layers\npredicted"])
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    fig.savefig(args.out, dpi=80)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
