"""Per-detection CAMs on YOLOv5s: flax_attn's one compiled call vs the article's loop (CPU, same weights, same run).

The article's ``yolov5_heatmap`` loop on the YOLOv5 7.0 package model: one forward with grad-cam's
``ActivationsAndGradients`` hooks on ``model.model[-2]`` (layer 23), then per detection ``zero_grad`` + one
``backward(retain_graph=True)`` + XGradCAM's ``get_cam_weights`` + ReLU + ``cv2.resize`` + min-max (PNG
drawing left out); batches run image by image, as the script does. Ours: ``DetectionCAM(model, ["model.23"],
method="xgradcam")(x, max_detections=K)``, one jitted call for the whole batch (compilation excluded and
reported). "forward" is one plain jitted forward of the same Flax model, timed alternately with our call.
``conf_threshold=0`` so that all ``K`` slots are valid in both (``int(N * 0.02) = 504 >= K``).

``--against REV`` also times the ``DetectionCAM`` of ``flax_attn/cam/detection.py`` as it was at git revision
``REV`` (loaded from ``git show``, the rest of the library as checked out), alternately with ours and the forward
in the same run, and checks that both give the same maps (a before/after of an optimisation, under the same
load). ``--loop-repeats 0`` skips the article's loop (minutes at 640x640).

Usage: ``python benchmarks/bench_detect.py [--size 640] [--batches 1 4] [--k 20] [--repeats 3] [--loop-repeats 1]
[--against REV]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from benchmarks._timing import format_table, machine_description  # noqa: E402


def article_loop(pm, tensor, k, method_cls):
    import cv2
    import torch
    from pytorch_grad_cam.activations_and_gradients import ActivationsAndGradients

    maps = []  # per image {prediction row: map}
    for b in range(tensor.shape[0]):  # the script handles one image
        x = tensor[b:b + 1]
        grads = ActivationsAndGradients(pm, [pm.model[-2]], reshape_transform=None)
        result = grads(x)
        activations = grads.activations[0].cpu().detach().numpy()
        logits_ = result[0][..., 4:]
        _, indices = torch.sort(logits_[..., 0], descending=True)
        post_result = logits_[0][indices[0]]
        maps.append({})
        for i in range(min(int(post_result.size(0) * 0.02), k)):
            pm.zero_grad()
            post_result[i, 0].backward(retain_graph=True)
            g = grads.gradients[0]
            w = method_cls.get_cam_weights(method_cls, None, None, None, activations, g.numpy())
            m = np.squeeze(np.maximum(np.sum(w.reshape(w.shape + (1, 1)) * activations, axis=1), 0))
            m = cv2.resize(m, (x.size(3), x.size(2)))
            mn, mx = m.min(), m.max()
            maps[-1][int(indices[0, i])] = m if mx == mn else (m - mn) / (mx - mn)
        grads.release()
    return maps


def _module_at(rev):
    """``flax_attn/cam/detection.py`` as of git revision ``rev``, imported as a separate module."""
    import importlib.util
    import subprocess
    import tempfile

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    src = subprocess.run(["git", "show", f"{rev}:flax_attn/cam/detection.py"], cwd=root, check=True,
                         capture_output=True, text=True).stdout
    path = os.path.join(tempfile.mkdtemp(), "detection_at_rev.py")
    with open(path, "w") as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location("detection_at_rev", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=640)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--loop-repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--against", default=None, help="git revision whose detection.py is timed alongside")
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import torch
    from flax import nnx
    from pytorch_grad_cam import XGradCAM

    import flax_attn.cam as fc
    from flax_attn.convert import from_yolov5
    from parity_tests.yolo_ref import package_model

    torch.set_num_threads(args.threads)
    pm = package_model("yolov5s", nc=80, seed=0)
    model = from_yolov5("yolov5s", pm.state_dict())
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    cam = fc.DetectionCAM(model, ["model.23"], method="xgradcam")
    old_cam = None if args.against is None else _module_at(args.against).DetectionCAM(model, ["model.23"],
                                                                                       method="xgradcam")
    rows = []
    for b in args.batches:
        rs = np.random.RandomState(b)
        x = rs.rand(b, args.size, args.size, 3).astype(np.float32)
        xj = jnp.asarray(x)
        xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
        t0 = time.perf_counter()
        jax.block_until_ready(cam(xj, max_detections=args.k, conf_threshold=0.0))
        first = time.perf_counter() - t0
        jax.block_until_ready(fwd(state, xj))
        if old_cam is not None:
            old = jax.block_until_ready(old_cam(xj, max_detections=args.k, conf_threshold=0.0))
        c_t, f_t, o_t = [], [], []
        for _ in range(args.repeats):  # alternately: the ratio sees the same machine load
            t0 = time.perf_counter()
            jax.block_until_ready(fwd(state, xj))
            f_t.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            res = jax.block_until_ready(cam(xj, max_detections=args.k, conf_threshold=0.0))
            c_t.append(time.perf_counter() - t0)
            if old_cam is not None:
                t0 = time.perf_counter()
                jax.block_until_ready(old_cam(xj, max_detections=args.k, conf_threshold=0.0))
                o_t.append(time.perf_counter() - t0)
        same = "" if old_cam is None else (
            "identical" if all(np.array_equal(np.asarray(getattr(res, f)), np.asarray(getattr(old, f)))
                               for f in ("cams", "indices", "zero_grad", "constant"))
            else f"max abs {float(np.abs(np.asarray(res.cams) - np.asarray(old.cams)).max()):.1e}")
        l_t = [float("nan")]
        for _ in range(args.loop_repeats):
            t0 = time.perf_counter()
            maps = article_loop(pm, xt, args.k, XGradCAM)
            l_t.append(time.perf_counter() - t0)
        # compared by prediction row (random weights saturate objectness: ties may order rows differently)
        diffs = [float(np.abs(np.asarray(res.cams[i, s]) - maps[i][int(res.indices[i, s])]).max())
                 for i in range(b) for s in range(args.k) if args.loop_repeats and int(res.indices[i, s]) in maps[i]]
        diff = max(diffs) if diffs else float("nan")
        c, f, loop = statistics.median(c_t), statistics.median(f_t), statistics.median(l_t[-args.loop_repeats:])
        row = [str(b), str(args.k), f"{loop:.2f}", f"{c:.3f}", f"{loop / c:.0f}x", f"{f:.3f}", f"{c / f:.2f}x",
               f"{first:.1f}", f"{diff:.1e}"]
        if old_cam is not None:
            row += [f"{statistics.median(o_t) / f:.2f}x", same]
        rows.append(row)
        print(f"  batch {b}: loop {loop:.2f} s, ours {c:.3f} s, forward {f:.3f} s", file=sys.stderr, flush=True)
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())  # the ratios are side by side; absolute times are not
    print(f"YOLOv5s (random weights) {args.size}x{args.size}, layer 23, XGradCAM, conf; {machine_description()}; "
          f"load average at the end {load}")
    head = ["batch", "K/image", "article loop s", "flax_attn s", "speed-up", "forward s", "CAM / forward",
            "first call s", "max abs diff"]
    if args.against is not None:
        head += [f"CAM / forward at {args.against}", f"maps vs {args.against}"]
    print(format_table(head, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
