"""The main job (``python -m train``): ResNet baseline vs +SE vs +CBAM on cluttered digits, one table."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from train.config import Config

#: defaults of the main job: about a minute and a half per model on an idle 2-core CPU. A 48x48 canvas, a
#: narrow ResNet-18 (width 8, CIFAR stem: the layer4 map is 6x6) and 300 steps of 32 images reach ~80 %
#: validation accuracy; a 64x64 canvas or width 16 costs 2-3x more per image.
MAIN_JOB_CONFIG = Config(
    dataset="cluttered_digits", model="resnet18", width=8, image_size=48, clutter=4, cluttered_train=4000,
    cluttered_val=500, num_steps=300, batch_size=32, learning_rate=0.05, warmup_steps=20, log_every=25,
    checkpoint_every=100,
)
MAIN_JOB_ATTNS = ("none", "se", "cbam_official", "cbam")
#: table names of the attention blocks (others are shown upper-cased)
DISPLAY_NAMES = {"se": "SE", "cbam": "CBAM (paper eq.: no BN in the spatial gate)",
                 "cbam_official": "CBAM (official code: BN in the spatial gate)"}


def display_name(model: str, attn: str) -> str:
    return model if attn == "none" else f"{model} + {DISPLAY_NAMES.get(attn, attn.upper())}"


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A markdown table of run summaries."""
    def f(v: Any, fmt: str) -> str:
        return "n/a" if v is None else format(v, fmt)

    lines = ["| model | val accuracy | pointing game | CAM energy in box | params | train images/s |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        name = display_name(r["model"], r["attn"])
        lines.append(f"| {name} | {f(r['val_accuracy'], '.3f')} | {f(r.get('pointing_game'), '.3f')} | "
                     f"{f(r.get('energy_in_box'), '.3f')} | {r['params']:,} | {f(r['images_per_sec'], '.0f')} |")
    return "\n".join(lines)


def run_main_job(base: Config = MAIN_JOB_CONFIG, workdir: str = "runs/main",
                 attns: Sequence[str] = MAIN_JOB_ATTNS, *, strict_checkpoints: bool = False
                 ) -> tuple[list[dict[str, Any]], str]:
    """Trains ``base`` once per attention block in ``attns`` (each in ``workdir/<attn>``, resumable), prints
    one table and writes a combined CAM figure ``workdir/cam_comparison.png``. Returns (summaries, figure path).
    ``strict_checkpoints`` is passed to :func:`train.train.train_and_evaluate`.
    """
    from train.cam import save_cam_grid
    from train.data import load_dataset
    from train.train import train_and_evaluate

    rows = []
    for attn in attns:
        cfg = base.replace(attn=attn)
        print(f"== {cfg.model} attn={attn} on {cfg.dataset}: {cfg.num_steps} steps of {cfg.batch_size} ==",
              flush=True)
        rows.append(train_and_evaluate(cfg, os.path.join(workdir, attn), strict_checkpoints=strict_checkpoints))
    figure = ""
    if base.cam_images:
        _, val = load_dataset(base)
        k = min(base.cam_images, len(val))
        cam_rows = []
        for r, attn in zip(rows, attns):
            z = np.load(os.path.join(workdir, attn, "cams.npz"))
            cam_rows.append((attn if attn != "none" else r["model"], z["cam_pred"][:k], z["pred"][:k]))
        figure = save_cam_grid(os.path.join(workdir, "cam_comparison.png"), cam_rows, val.images[:k],
                               val.labels[:k], val.class_names, None if val.boxes is None else val.boxes[:k])
    table = format_table(rows)
    print()
    print(table)
    if rows and rows[0].get("box_area_fraction") is not None:
        print(f"\n(chance level: a random point / a uniform map lands "
              f"{rows[0]['box_area_fraction']:.3f} in the box; Grad-CAM of the true class at layer4, "
              f"{base.cluttered_val} validation images)")
    if figure:
        print(f"CAM figures: {os.path.abspath(figure)} (rows: image with its box, then each model's Grad-CAM "
              f"of its predicted class); per run: {os.path.abspath(workdir)}/<attn>/cam.png")
    with open(os.path.join(workdir, "results.md"), "w") as fh:
        fh.write(table + "\n")
    return rows, figure
