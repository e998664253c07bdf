"""Detector training-step throughput: YOLOv5n at 128x128, batch 32 -- our jitted step vs the YOLOv5 package.

Flax: the detection application's own jitted step (``train.detect.DetectFunctions.train_step``: on-device
scale jitter, forward, :func:`flax_attn.models.yolo_loss.yolov5_loss`, backward, gradient clipping at norm
10, YOLOv5's three-group SGD-Nesterov with warm-up lr/momentum, ModelEMA update, buffer donation).
PyTorch: the YOLOv5 7.0 package's ``Model(yolov5n.yaml)`` in train mode with its ``ComputeLoss`` and an eager
step as ``train.py`` does it (``zero_grad``, forward, loss, ``backward``, ``clip_grad_norm_(10)``,
``SGD(nesterov)`` over the same three groups, ``step``; no AMP, no EMA). Both: float32, 3 input channels,
10 classes, the same random targets (4 boxes per image). Median step time, one block per candidate (the
PyTorch block first; see main() for why not round-robin).

    YOLO_OFFLINE=1 python benchmarks/bench_train_detect.py [--repeats 5] [--batch 32] [--size 128]

The YOLOv5 package is AGPL and test-only: this script imports it only to measure it (``make install-test``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys

os.environ.setdefault("YOLO_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax
import numpy as np
import torch
from _timing import machine_description, median_time

NC = 10


def _targets(batch: int, size: int, per_image: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    wh = rng.uniform(0.08, 0.3, (batch, per_image, 2))
    cxy = rng.uniform(0.2, 0.8, (batch, per_image, 2))
    cls = rng.integers(0, NC, (batch, per_image))
    xyxy = np.concatenate([cxy - wh / 2, cxy + wh / 2], -1) * size
    return xyxy.astype(np.float32), cls.astype(np.int32), np.concatenate([cls[..., None], cxy, wh], -1)


def flax_step(batch: int, size: int):
    from train.detect import DetectConfig, DetectFunctions
    from train.train import make_mesh

    cfg = DetectConfig(depth=0.33, width=0.25, image_size=size, batch_size=batch, num_steps=1000)
    fns = DetectFunctions(cfg, num_classes=NC, in_chans=3, steps_per_epoch=100, mesh=make_mesh())
    box = {"state": fns.init()}
    rng = np.random.default_rng(0)
    boxes, classes, _ = _targets(batch, size)
    put = lambda a: jax.device_put(a, fns.batch_sharding)  # noqa: E731
    args = (put(rng.random((batch, size, size, 3), np.float32)), put(boxes), put(classes),
            put(np.ones(classes.shape, bool)))

    def step():
        box["state"], m = fns.train_step(box["state"], *args)
        jax.block_until_ready(m["loss"])

    return step, fns.num_params


def torch_step(batch: int, size: int):
    import warnings

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        import yolov5
        from yolov5.models.yolo import Model
        from yolov5.utils.loss import ComputeLoss

        torch.manual_seed(0)
        model = Model(os.path.join(os.path.dirname(yolov5.__file__), "models", "yolov5n.yaml"), ch=3, nc=NC)
    model.train()
    nl = 3
    model.hyp = {"box": 0.05 * 3 / nl, "obj": 1.0 * (size / 640) ** 2 * 3 / nl, "cls": 0.5 * NC / 80 * 3 / nl,
                 "cls_pw": 1.0, "obj_pw": 1.0, "anchor_t": 4.0, "fl_gamma": 0.0, "label_smoothing": 0.0}
    loss_fn = ComputeLoss(model)
    g_bias, g_bn, g_w = [], [], []
    for mod in model.modules():
        for name, p in mod.named_parameters(recurse=False):
            if name == "bias":
                g_bias.append(p)
            elif name == "weight" and isinstance(mod, torch.nn.BatchNorm2d):
                g_bn.append(p)
            else:
                g_w.append(p)
    opt = torch.optim.SGD(g_bias, lr=0.01, momentum=0.937, nesterov=True)
    opt.add_param_group({"params": g_w, "weight_decay": 5e-4})
    opt.add_param_group({"params": g_bn, "weight_decay": 0.0})
    x = torch.rand(batch, 3, size, size)
    _, _, rows = _targets(batch, size)
    t = torch.tensor(np.concatenate([np.repeat(np.arange(batch), rows.shape[1])[:, None],
                                     rows.reshape(-1, 5)], 1), dtype=torch.float32)

    def step():
        opt.zero_grad(set_to_none=True)
        loss, _ = loss_fn(model(x), t)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=10.0)
        opt.step()
        loss.item()

    return step, sum(p.numel() for p in model.parameters())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch intra-op threads")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {machine_description()}")
    print(f"YOLOv5n, {NC} classes, {args.size}x{args.size}, batch {args.batch}, float32; train step = forward + "
          f"YOLOv5 loss + backward + SGD update; median of {args.repeats} steps, one block per candidate\n")
    # one block per candidate, torch first: interleaved with the jitted step (as bench_train.py times), the
    # torch step measured 9.6 s against 0.27 s alone (at loads 3.3-4.1 and 2.6: the load's share and that of
    # XLA's worker threads after each jitted call were not separated); the eager step is very load-sensitive
    t_step, t_params = torch_step(args.batch, args.size)
    med = {"torch": median_time(t_step, repeats=args.repeats, warmup=args.warmup)}
    f_step, f_params = flax_step(args.batch, args.size)
    med["flax"] = median_time(f_step, repeats=args.repeats, warmup=args.warmup)
    print("| implementation | params | step time (ms) | images/s | speed vs YOLOv5 package |")
    print("|---|---:|---:|---:|---:|")
    print(f"| Flax (jax.jit step, train.detect) | {f_params:,} | {1e3 * med['flax']:.0f} | "
          f"{args.batch / med['flax']:.0f} | {med['torch'] / med['flax']:.2f}x |")
    print(f"| YOLOv5 7.0 package (eager, ComputeLoss, SGD) | {t_params:,} | {1e3 * med['torch']:.0f} | "
          f"{args.batch / med['torch']:.0f} | 1.00x |", flush=True)


if __name__ == "__main__":
    main()
