"""Generates docs/img/detection_cams.png, the README's per-detection CAM example (run from a checkout).

A YOLOv5n with RANDOM weights (no checkpoint is downloaded: the picture shows the mechanics, not what a
trained detector looks at) on a synthetic letterboxed image; ``detection_cams`` at the three neck outputs
(``model.17/20/23``, so detections of every stride get a map) with XGradCAM and ``backward_type="conf"``,
then ``plot_detection_grid`` (box and ``"{name} {conf:.2f}"`` label in the class colour on each overlay).

    python docs/make_detection_figure.py [--out docs/img/detection_cams.png]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import flax_attn.cam as fc  # noqa: E402
from flax_attn.models import create_model, letterbox  # noqa: E402


def synthetic_image(seed: int = 0) -> np.ndarray:
    """A 240x320 uint8 'scene': smooth background and a few coloured rectangles and discs."""
    rs = np.random.RandomState(seed)
    h, w = 240, 320
    yy, xx = np.mgrid[:h, :w]
    img = np.stack([90 + 60 * np.sin(xx / 40.0), 110 + 50 * np.cos(yy / 30.0), 120 + 0 * xx], -1)
    for _ in range(5):
        y0, x0 = rs.randint(0, h - 60), rs.randint(0, w - 80)
        img[y0:y0 + rs.randint(30, 60), x0:x0 + rs.randint(40, 80)] = rs.randint(0, 255, 3)
        cy, cx, r = rs.randint(30, h - 30), rs.randint(30, w - 30), rs.randint(10, 30)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rs.randint(0, 255, 3)
    return np.clip(img, 0, 255).astype(np.uint8)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="detection CAM figure for the README")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "img",
                                                 "detection_cams.png"))
    args = p.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    names = [f"class{i}" for i in range(80)]
    model = create_model("yolov5n", num_classes=80, rngs=nnx.Rngs(0))
    model.eval()
    img = np.asarray(letterbox(jnp.asarray(synthetic_image()), 320)[0]).astype(np.float32) / 255.0
    pred = model(jnp.asarray(img)[None])
    thr = float(jnp.sort(pred[0, :, 4])[-8])  # random weights: take the 8 most confident predictions
    res = fc.detection_cams(model, jnp.asarray(img)[None], ["model.17", "model.20", "model.23"],
                            method="xgradcam", conf_threshold=thr, ratio=0.02, max_detections=8)
    fig = fc.plot_detection_grid(img, res, names, cols=4, max_panels=8)
    fig.suptitle("YOLOv5n, RANDOM weights: XGradCAM per detection (layers 17+20+23), one compiled call",
                 fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    fig.savefig(args.out, dpi=80)
    print(f"wrote {args.out}; valid {int(res.valid.sum())}, zero-grad {int(res.zero_grad.sum())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
