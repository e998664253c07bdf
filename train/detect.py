"""``python -m train detect``: train YOLOv5 (with or without attention) on digit scenes or a YOLO folder.

The loop is the classification loop's shape (:mod:`train.train`) with YOLOv5 7.0's training recipe:

* **loss**: :func:`flax_attn.models.yolo_loss.yolov5_loss` (the package's ``ComputeLoss``: ``(lbox + lobj +
  lcls) * B``) with the gains scaled as ``train.py`` does (:meth:`YOLOv5LossHyp.scaled`), back-propagated as
  is; the gradient's global norm clipped to 10 (``clip_grad_norm_(max_norm=10)``);
* **SGD as YOLOv5's** ``smart_optimizer``: Nesterov momentum 0.937 (torch's formula: ``d = g + wd * p``,
  ``buf = m * buf + d``, ``p -= lr * (d + m * buf)``), weight decay 5e-4 on weights only (conv and dense
  kernels: never on BatchNorm scales or any bias), three groups: biases, BatchNorm scales, weights;
* **warm-up** over ``max(round(warmup_epochs * nb), 100)`` iterations (``nb`` = steps per epoch): the bias
  group's lr falls linearly from ``warmup_bias_lr`` (0.1) to ``lr0 * lf(epoch)``, the others rise from 0,
  momentum rises from 0.8 to 0.937; after it ``lr = lr0 * lf(epoch)``, ``lf`` cosine (``one_cycle``) or linear
  down to ``lrf`` per *epoch* as YOLOv5's ``LambdaLR``;
* **EMA** of every float variable (parameters and BatchNorm statistics) as ``ModelEMA``:
  ``decay = 0.9999 * (1 - exp(-updates / 2000))``, updated after every step; evaluation and CAMs use the EMA;
* **augmentation** on the device, a pure function of ``(seed, step)``: horizontal / vertical flips with
  probabilities ``fliplr`` / ``flipud`` (YOLOv5's default ``fliplr`` is 0.5; digits are not mirror-symmetric,
  so our default is 0) and a scale jitter ``U(1 - scale, 1 + scale)`` about the image centre (bilinear,
  boxes scaled and clipped, dropped as ``box_candidates`` does: under 2 px or under 10 % of their scaled area
  left). No mosaic. Inputs are square and letterboxed (scenes are generated square; folder images are
  letterboxed when loaded);
* **evaluation**: the EMA model's decoded predictions, :func:`flax_attn.models.non_max_suppression`
  (``conf_thres`` 0.001, ``iou_thres`` 0.6 as ``val.py``) and COCO mAP@0.5 / mAP@0.5:0.95
  (:func:`flax_attn.models.yolo_metrics.detection_map`).

What differs from YOLOv5's ``train.py``: no gradient accumulation to a nominal batch of 64 (``nbs``), so the
weight decay is not rescaled by ``batch_size * accumulate / 64``; steps, not epochs, set the run length (the
schedule's epochs are ``ceil(num_steps / nb)``); no AMP, no autoanchor, no mosaic/HSV/perspective.

Runs are resumable exactly like classification runs (orbax checkpoints with SHA-256 manifests; the data order
and the augmentation are functions of ``(seed, step)``); ``stop_at`` stops a run early without changing its
schedule (what a killed run does), so the same workdir can be continued later.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import math
import os
import time
import typing
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from flax_attn.models import YOLOv5, non_max_suppression, yolov5_num_params
from flax_attn.models.yolo_loss import YOLOv5LossHyp, yolov5_loss
from train import checkpoints as ckpt
from train import data as data_lib
from train.config import ConfigIO
from train.detect_data import DetectionDataset, SceneSpec, load_digit_scenes, load_yolo_folder
from train.train import (
    Meter,
    MetricsWriter,
    NonFiniteLossError,
    ResumeError,
    _last_summary,
    _read_stored_config,
    _record_start,
    check_resume,
    checkpoint_manager,
    make_mesh,
)

log = logging.getLogger("train")

DETECT_DATASETS = ("scenes", "yolo_folder")
LR_SCHEDULES = ("cosine", "linear")
#: the layers whose CAMs explain detections of every stride (P3/8, P4/16, P5/32 heads' inputs)
CAM_LAYERS = ("model.17", "model.20", "model.23")


@dataclass(frozen=True)
class DetectConfig(ConfigIO):
    """Everything that defines a detection training run (plain data, JSON-serialisable, hashable).

    Example:
        >>> cfg = DetectConfig(width=0.125, attn="cbam", num_steps=300)
        >>> cfg.replace(batch_size=16).batch_size
        16
    """

    # model
    depth: float = field(default=0.33, metadata={"help": "YOLOv5 depth_multiple (0.33 = n and s)"})
    width: float = field(default=0.25, metadata={"help": "YOLOv5 width_multiple (0.25 = yolov5n, 0.5 = s)"})
    attn: str = field(default="none", metadata={"help": "attention block: none, cbam, se, cbam_official, ..."})
    attn_positions: str = field(default="c3", metadata={
        "help": "comma-separated: c3 (after each backbone C3), sppf (before SPPF) or layer indices 2,4,6,8,9"})
    # data
    dataset: str = field(default="scenes", metadata={"help": "scenes (generated digit scenes) or yolo_folder"})
    data_dir: str = field(default="", metadata={"help": "yolo_folder: root with images/ and labels/"})
    image_size: int = field(default=96, metadata={"help": "square input side (a multiple of 32)"})
    in_chans: int = field(default=0, metadata={"help": "yolo_folder: 1 (grey) or 3 (RGB); 0 = 1 for scenes, 3 "
                                                       "for folders"})
    num_train: int = field(default=2000, metadata={"help": "scenes: training images"})
    num_val: int = field(default=200, metadata={"help": "scenes: validation images"})
    clutter: int = field(default=6, metadata={"help": "scenes: clutter fragments per image"})
    val_fraction: float = field(default=0.2, metadata={"help": "source digits (scenes) or images (flat folder) "
                                                                "held out for validation"})
    data_seed: int = field(default=0, metadata={"help": "seed of the split and of the generated scenes"})
    max_boxes: int = field(default=0, metadata={"help": "object slots per image (0 = the most in any image)"})
    # optimisation (YOLOv5 hyp.scratch-low)
    lr0: float = field(default=0.01, metadata={"help": "initial learning rate"})
    lrf: float = field(default=0.01, metadata={"help": "final learning rate = lr0 * lrf"})
    schedule: str = field(default="cosine", metadata={"help": "cosine (YOLOv5 --cos-lr) or linear (its default)"})
    momentum: float = field(default=0.937, metadata={"help": "SGD Nesterov momentum"})
    weight_decay: float = field(default=5e-4, metadata={"help": "on conv/dense weights only"})
    warmup_epochs: float = field(default=3.0, metadata={"help": "warm-up epochs (at least warmup_min_steps)"})
    warmup_min_steps: int = field(default=100, metadata={"help": "YOLOv5's minimum of 100 warm-up iterations"})
    warmup_momentum: float = field(default=0.8, metadata={"help": "momentum at the start of the warm-up"})
    warmup_bias_lr: float = field(default=0.1, metadata={"help": "bias learning rate at the start of the warm-up"})
    grad_clip_norm: float = field(default=10.0, metadata={"help": "clip the gradient's global norm (0 = off)"})
    ema: bool = field(default=True, metadata={"help": "evaluate an EMA of the weights (YOLOv5 ModelEMA)"})
    fliplr: float = field(default=0.0, metadata={"help": "horizontal flip probability (YOLOv5: 0.5)"})
    flipud: float = field(default=0.0, metadata={"help": "vertical flip probability"})
    scale: float = field(default=0.25, metadata={"help": "scale jitter: zoom by U(1 - scale, 1 + scale)"})
    batch_size: int = field(default=32, metadata={"help": "global batch (split over all devices and hosts)"})
    num_steps: int = field(default=300, metadata={"help": "optimisation steps"})
    seed: int = field(default=0, metadata={"help": "seed of initialisation, data order and augmentation"})
    # loop
    stop_at: int = field(default=0, metadata={"help": "stop after this step (0 = num_steps): a resumable early stop"})
    log_every: int = field(default=20, metadata={"help": "steps between metric logs (the only host syncs)"})
    eval_every: int = field(default=0, metadata={"help": "steps between mAP evaluations (0 = at the end only)"})
    checkpoint_every: int = field(default=100, metadata={"help": "steps between checkpoints (0 = end only)"})
    keep_checkpoints: int = field(default=3, metadata={"help": "keep the last N checkpoints"})
    prefetch: int = field(default=2, metadata={"help": "batches placed on the devices ahead of the step"})
    progress: bool = field(default=True, metadata={"help": "show a tqdm progress bar"})
    conf_thres: float = field(default=0.001, metadata={"help": "NMS confidence threshold for mAP (val.py)"})
    iou_thres: float = field(default=0.6, metadata={"help": "NMS IoU threshold for mAP (val.py)"})
    max_det: int = field(default=100, metadata={"help": "detections kept per image for mAP"})
    cam_images: int = field(default=4, metadata={"help": "validation scenes with per-detection CAM figures"})
    cam_conf: float = field(default=0.25, metadata={"help": "confidence threshold of the CAM figures' NMS"})

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            v, tp = getattr(self, f.name), hints[f.name]
            if tp is bool:
                ok = isinstance(v, bool)
            elif tp is int:
                ok = isinstance(v, int) and not isinstance(v, bool)
            elif tp is float:
                ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            else:
                ok = isinstance(v, str)
            if not ok:
                raise TypeError(f"{f.name} must be a {'finite ' if tp is float else ''}{tp.__name__}, got {v!r}")
        for name, allowed in (("dataset", DETECT_DATASETS), ("schedule", LR_SCHEDULES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}: expected one of {allowed}")
        for name in ("batch_size", "num_steps", "log_every", "keep_checkpoints", "prefetch", "num_train",
                     "num_val", "max_det"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("stop_at", "eval_every", "checkpoint_every", "clutter", "max_boxes", "cam_images",
                     "warmup_min_steps", "in_chans"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.image_size < 32 or self.image_size % 32:
            raise ValueError(f"image_size must be a positive multiple of 32 (YOLOv5's largest stride), got "
                             f"{self.image_size}")
        if self.in_chans not in (0, 1, 3):
            raise ValueError(f"in_chans must be 0, 1 or 3, got {self.in_chans}")
        if not (0.0 < self.depth <= 2.0 and 0.0 < self.width <= 2.0):
            raise ValueError(f"depth and width multiples must be in (0, 2], got {self.depth}, {self.width}")
        for name in ("fliplr", "flipud", "conf_thres", "iou_thres", "cam_conf", "val_fraction", "lrf"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0.0 <= self.scale < 1.0:
            raise ValueError(f"scale must be in [0, 1), got {self.scale}")
        for name in ("lr0", "weight_decay", "warmup_epochs", "warmup_bias_lr", "grad_clip_norm"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("momentum", "warmup_momentum"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.stop_at > self.num_steps:
            raise ValueError(f"stop_at {self.stop_at} is past num_steps {self.num_steps}")
        if self.dataset == "yolo_folder" and not self.data_dir:
            raise ValueError("dataset='yolo_folder' needs data_dir (a folder with images/ and labels/)")
        if self.attn == "none" and self.attn_positions not in ("", "c3"):
            raise ValueError(f"attn_positions={self.attn_positions!r} needs an attention block: pass --attn")

    @property
    def positions(self) -> tuple[str | int, ...]:
        return tuple(int(p) if p.strip().isdigit() else p.strip() for p in self.attn_positions.split(",")
                     if p.strip())

    @property
    def last_step(self) -> int:
        """The step this invocation trains up to (``stop_at`` or ``num_steps``)."""
        return self.stop_at or self.num_steps


#: fields a resumed run may change (they steer the loop, not the model, the data or the optimisation)
DETECT_RESUMABLE_FIELDS: frozenset[str] = frozenset(
    {"stop_at", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints", "prefetch", "progress",
     "conf_thres", "iou_thres", "max_det", "cam_images", "cam_conf"})


def add_detect_arguments(parser: argparse.ArgumentParser, defaults: DetectConfig | None = None) -> None:
    """``--<field>`` for every :class:`DetectConfig` field (booleans also get ``--no-<field>``)."""
    defaults = defaults or DetectConfig()
    hints = typing.get_type_hints(DetectConfig)
    group = parser.add_argument_group("config (every DetectConfig field)")
    for f in dataclasses.fields(DetectConfig):
        tp, default = hints[f.name], getattr(defaults, f.name)
        help_text = f"{f.metadata.get('help', '')} (default: {default!r})"
        if tp is bool:
            group.add_argument("--" + f.name, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        else:
            group.add_argument("--" + f.name, type=tp, default=default, metavar=tp.__name__.upper(), help=help_text)


def detect_config_from_args(args: argparse.Namespace) -> DetectConfig:
    return DetectConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(DetectConfig)})


# --------------------------------------------------------------------------------------------------
# data, model
# --------------------------------------------------------------------------------------------------

def load_detection_data(config: DetectConfig) -> tuple[DetectionDataset, DetectionDataset]:
    """The fixed (train, validation) split of ``config`` with the same number of object slots in both."""
    if config.dataset == "scenes":
        spec = SceneSpec(num_train=config.num_train, num_val=config.num_val, canvas=config.image_size,
                         clutter=config.clutter, val_fraction=config.val_fraction, seed=config.data_seed)
        tr, va = load_digit_scenes(spec)
    else:
        tr, va = load_yolo_folder(config.data_dir, image_size=config.image_size, in_chans=config.in_chans or 3,
                                  val_fraction=config.val_fraction, seed=config.data_seed,
                                  max_boxes=config.max_boxes)
    m = config.max_boxes or max(tr.max_boxes, va.max_boxes)
    return tr.pad_to(m), va.pad_to(m)


def build_detector(config: DetectConfig, *, num_classes: int, in_chans: int, rngs: nnx.Rngs) -> YOLOv5:
    """The YOLOv5 of ``config`` (``variant=(depth, width)``, the attention slot from ``attn`` / positions)."""
    attn = None if config.attn == "none" else config.attn
    return YOLOv5((config.depth, config.width), num_classes=num_classes, in_chans=in_chans, attn=attn,
                  attn_positions=config.positions if attn else None, rngs=rngs)


def check_detect_config(config: DetectConfig) -> None:
    """Errors bad input can cause, raised before any data is generated or anything compiled."""
    from flax_attn.layers import list_attn

    if config.attn != "none" and config.attn.lower().replace("-", "_") not in list_attn():
        raise ValueError(f"unknown attn {config.attn!r}: expected 'none' or one of {list_attn()}")
    if config.attn != "none":
        from flax_attn.models.yolo import _attn_layers

        _attn_layers(config.attn, config.positions)
    if config.dataset == "yolo_folder" and not os.path.isdir(os.path.join(config.data_dir, "images")):
        raise FileNotFoundError(f"data_dir {config.data_dir!r}: expected a YOLO folder with images/ and labels/")
    n = jax.device_count()
    if config.batch_size % n:
        raise ValueError(f"batch_size {config.batch_size} is not divisible by the number of devices {n} "
                         f"(the global batch is split evenly over all devices)")


# --------------------------------------------------------------------------------------------------
# optimiser: YOLOv5's SGD groups, warm-up, LambdaLR and ModelEMA
# --------------------------------------------------------------------------------------------------

def _path_names(tree: Any) -> Any:
    """The variable name of every leaf (``"kernel"``, ``"bias"``, ``"scale"``, ...): the last string key of
    its path (an ``nnx.State`` leaf's path ends in the attribute ``.value`` after the name)."""
    def name(path, _):
        keys = [k.key for k in path if isinstance(getattr(k, "key", None), str)]
        return keys[-1] if keys else ""

    return jax.tree_util.tree_map_with_path(name, tree)


def param_groups(params: Any) -> Any:
    """Per leaf: 0 = bias group (every ``bias``: conv, BatchNorm, dense), 1 = BatchNorm scales (no decay),
    2 = weights (kernels, with decay): YOLOv5's ``smart_optimizer`` groups ``g[2]``, ``g[1]``, ``g[0]``."""
    names = _path_names(params)
    return jax.tree.map(lambda n, p: 0 if n == "bias" else (2 if p.ndim > 1 else 1), names, params)


def _one_cycle(x: jax.Array, lrf: float, epochs: int) -> jax.Array:
    return ((1 - jnp.cos(x * math.pi / epochs)) / 2) * (lrf - 1) + 1


def lr_momentum(config: DetectConfig, steps_per_epoch: int, step: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(bias lr, other lr, momentum)`` used by the update at iteration ``step`` (0-based), as YOLOv5's
    ``train.py`` sets them (warm-up interpolation, then ``LambdaLR`` per epoch)."""
    nb = steps_per_epoch
    epochs = max(1, -(-config.num_steps // nb))
    step = jnp.asarray(step, jnp.float32)
    epoch = jnp.floor(step / nb)
    if config.schedule == "cosine":
        lf = _one_cycle(epoch, config.lrf, epochs)
    else:
        lf = (1 - epoch / epochs) * (1.0 - config.lrf) + config.lrf
    lr = config.lr0 * lf
    nw = max(round(config.warmup_epochs * nb), config.warmup_min_steps)
    t = jnp.clip(step / nw, 0.0, 1.0)
    warm = step <= nw
    bias_lr = jnp.where(warm, config.warmup_bias_lr + t * (lr - config.warmup_bias_lr), lr)
    other_lr = jnp.where(warm, t * lr, lr)
    mom = jnp.where(warm, config.warmup_momentum + t * (config.momentum - config.warmup_momentum), config.momentum)
    return bias_lr, other_lr, mom


def ema_decay(updates: jax.Array) -> jax.Array:
    """``ModelEMA``'s decay after ``updates`` updates: ``0.9999 * (1 - exp(-updates / 2000))``."""
    return 0.9999 * (1 - jnp.exp(-jnp.asarray(updates, jnp.float32) / 2000.0))


@struct.dataclass
class DetectState:
    """Everything a detection training step reads and writes (a pytree, replicated over the mesh)."""

    step: jax.Array
    params: Any
    model_state: Any  #: BatchNorm statistics and the Detect anchors
    momentum: Any  #: SGD momentum buffers, one per parameter
    ema_params: Any
    ema_state: Any

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("step", "params", "model_state", "momentum", "ema_params",
                                              "ema_state")}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DetectState:
        return cls(**d)

    if TYPE_CHECKING:
        def replace(self, **updates: Any) -> DetectState: ...


# --------------------------------------------------------------------------------------------------
# augmentation (on the device)
# --------------------------------------------------------------------------------------------------

def augment(key: jax.Array, x: jax.Array, boxes: jax.Array, valid: jax.Array, *, fliplr: float, flipud: float,
            scale: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Random flips and a scale jitter about the centre, per image; boxes follow (see the module docstring)."""
    b, h, w, _ = x.shape
    k1, k2, k3 = jax.random.split(key, 3)
    if fliplr > 0:
        f = jax.random.uniform(k1, (b,)) < fliplr
        x = jnp.where(f[:, None, None, None], x[:, :, ::-1], x)
        boxes = jnp.where(f[:, None, None], jnp.stack([w - boxes[..., 2], boxes[..., 1], w - boxes[..., 0],
                                                       boxes[..., 3]], -1), boxes)
    if flipud > 0:
        f = jax.random.uniform(k2, (b,)) < flipud
        x = jnp.where(f[:, None, None, None], x[:, ::-1], x)
        boxes = jnp.where(f[:, None, None], jnp.stack([boxes[..., 0], h - boxes[..., 3], boxes[..., 2],
                                                       h - boxes[..., 1]], -1), boxes)
    if scale > 0:
        s = jax.random.uniform(k3, (b,), minval=1 - scale, maxval=1 + scale)
        c = jnp.array([h / 2, w / 2], x.dtype)

        def zoom(img, si):
            return jax.image.scale_and_translate(img, img.shape, (0, 1), jnp.stack([si, si]), c * (1 - si),
                                                 method="linear", antialias=False)

        x = jax.vmap(zoom)(x, s.astype(x.dtype))
        cxy = jnp.array([w / 2, h / 2, w / 2, h / 2], boxes.dtype)
        scaled = (boxes - cxy) * s[:, None, None] + cxy
        clipped = jnp.clip(scaled, 0, jnp.array([w, h, w, h], boxes.dtype))
        ww, hh = clipped[..., 2] - clipped[..., 0], clipped[..., 3] - clipped[..., 1]
        area0 = (scaled[..., 2] - scaled[..., 0]) * (scaled[..., 3] - scaled[..., 1])
        valid = valid & (ww > 2) & (hh > 2) & (ww * hh / (area0 + 1e-16) > 0.1)
        boxes = clipped
    return x, boxes, valid


def yolo_targets(boxes: jax.Array, classes: jax.Array, size: tuple[int, int]) -> jax.Array:
    """``(B, M, 5)`` rows ``[class, cx, cy, w, h]`` normalised by ``size = (h, w)`` from xyxy pixels."""
    h, w = size
    cx = (boxes[..., 0] + boxes[..., 2]) / 2 / w
    cy = (boxes[..., 1] + boxes[..., 3]) / 2 / h
    bw = (boxes[..., 2] - boxes[..., 0]) / w
    bh = (boxes[..., 3] - boxes[..., 1]) / h
    return jnp.stack([classes.astype(boxes.dtype), cx, cy, bw, bh], -1)


# --------------------------------------------------------------------------------------------------
# the jitted functions
# --------------------------------------------------------------------------------------------------

class DetectFunctions:
    """Graph definitions and the jitted init / train / predict functions of a detection run."""

    def __init__(self, config: DetectConfig, *, num_classes: int, in_chans: int, steps_per_epoch: int,
                 mesh: jax.sharding.Mesh):
        self.config, self.num_classes, self.in_chans = config, num_classes, in_chans
        self.steps_per_epoch = steps_per_epoch
        self.hyp = YOLOv5LossHyp.scaled(num_classes, config.image_size)
        self.replicated = NamedSharding(mesh, P())
        self.batch_sharding = NamedSharding(mesh, P("data"))
        abstract = nnx.eval_shape(self.new_model)
        abstract.train()
        self.train_graphdef = nnx.graphdef(abstract)
        abstract.eval()
        self.eval_graphdef = nnx.graphdef(abstract)
        self.num_params = yolov5_num_params(abstract)
        self.train_step = jax.jit(self._train_step, donate_argnums=(0,),
                                  out_shardings=(self.replicated, self.replicated))
        self.predict = jax.jit(self._predict, out_shardings=self.replicated)

    def new_model(self) -> YOLOv5:
        return build_detector(self.config, num_classes=self.num_classes, in_chans=self.in_chans,
                              rngs=nnx.Rngs(self.config.seed))

    def init(self) -> DetectState:
        """The initial state, replicated over the mesh. Built eagerly, not under ``jax.jit``: XLA:CPU takes
        minutes to compile YOLOv5's initialisation, the eager one takes about a second."""
        _, params, model_state = cast("tuple[nnx.GraphDef, nnx.State, nnx.State]",
                                      nnx.split(self.new_model(), nnx.Param, ...))
        copy = lambda t: jax.tree.map(lambda a: jnp.array(a, copy=True), t)  # noqa: E731  # no shared buffers
        state = DetectState(step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
                            momentum=jax.tree.map(jnp.zeros_like, params), ema_params=copy(params),
                            ema_state=copy(model_state))
        return jax.device_put(state, self.replicated)

    def eval_model(self, state: DetectState, *, ema: bool | None = None) -> YOLOv5:
        """The eval-mode model of ``state`` (the EMA weights unless ``ema=False`` or the run has no EMA)."""
        use_ema = self.config.ema if ema is None else ema
        p, s = (state.ema_params, state.ema_state) if use_ema else (state.params, state.model_state)
        return nnx.merge(self.eval_graphdef, p, s)

    def _train_step(self, state: DetectState, x: jax.Array, boxes: jax.Array, classes: jax.Array,
                    valid: jax.Array):
        cfg = self.config
        key = jax.random.fold_in(jax.random.key(cfg.seed), state.step)
        x, boxes, valid = augment(key, x, boxes, valid, fliplr=cfg.fliplr, flipud=cfg.flipud, scale=cfg.scale)
        targets = yolo_targets(boxes, classes, (x.shape[1], x.shape[2]))

        def loss_fn(params):
            model = nnx.merge(self.train_graphdef, params, state.model_state, copy=True)
            preds = model(x)
            loss, parts = yolov5_loss(preds, targets, valid, anchors=model.model[24].anchors[...], hyp=self.hyp)
            return loss, (parts, nnx.state(model, nnx.Not(nnx.Param)))

        (loss, (parts, model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        if cfg.grad_clip_norm > 0:  # torch.nn.utils.clip_grad_norm_(max_norm=10)
            norm = jnp.sqrt(sum(jnp.sum(g.astype(jnp.float32) ** 2) for g in jax.tree.leaves(grads)))
            factor = jnp.minimum(1.0, cfg.grad_clip_norm / (norm + 1e-6))
            grads = jax.tree.map(lambda g: g * factor, grads)
        bias_lr, other_lr, mom = lr_momentum(cfg, self.steps_per_epoch, state.step)
        groups = param_groups(state.params)

        def sgd(p, g, buf, group):
            d = g + cfg.weight_decay * p if group == 2 else g
            buf = mom * buf + d
            lr = bias_lr if group == 0 else other_lr
            return p - lr * (d + mom * buf), buf

        out = jax.tree.map(sgd, state.params, grads, state.momentum, groups)
        params = jax.tree.map(lambda o: o[0], out, is_leaf=lambda o: isinstance(o, tuple))
        momentum = jax.tree.map(lambda o: o[1], out, is_leaf=lambda o: isinstance(o, tuple))
        d = ema_decay(state.step + 1)
        ema = lambda e, v: d * e + (1 - d) * v if jnp.issubdtype(v.dtype, jnp.floating) else v  # noqa: E731
        new = state.replace(step=state.step + 1, params=params, model_state=model_state, momentum=momentum,
                            ema_params=jax.tree.map(ema, state.ema_params, params),
                            ema_state=jax.tree.map(ema, state.ema_state, model_state))
        metrics = {"loss": loss, "box": parts[0], "obj": parts[1], "cls": parts[2], "lr": other_lr}
        return new, metrics

    def _predict(self, state: DetectState, x: jax.Array):
        model = self.eval_model(state)
        det = non_max_suppression(cast(jax.Array, model(x)), self.config.conf_thres, self.config.iou_thres,
                                  max_det=self.config.max_det)
        return det.boxes, det.scores, det.classes, det.valid


@functools.lru_cache(maxsize=4)
def _cached_functions(config: DetectConfig, num_classes: int, in_chans: int, steps_per_epoch: int,
                      devices: tuple) -> DetectFunctions:
    return DetectFunctions(config, num_classes=num_classes, in_chans=in_chans, steps_per_epoch=steps_per_epoch,
                           mesh=make_mesh())


#: loop-only fields that the jitted training function never reads (reset in the cache key)
_LOOP_ONLY = ("stop_at", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints", "prefetch",
              "progress", "cam_images", "cam_conf")


def get_detect_functions(config: DetectConfig, *, num_classes: int, in_chans: int,
                         steps_per_epoch: int) -> DetectFunctions:
    default = DetectConfig()
    key = config.replace(**{k: getattr(default, k) for k in _LOOP_ONLY})
    return _cached_functions(key, num_classes, in_chans, steps_per_epoch, tuple(jax.devices()))


# --------------------------------------------------------------------------------------------------
# batches, evaluation
# --------------------------------------------------------------------------------------------------

def _put(sharding, *arrays: np.ndarray) -> list[jax.Array]:
    return [jax.make_array_from_process_local_data(sharding, a) for a in arrays]


def detection_batches(ds: DetectionDataset, *, batch_size: int, seed: int, start_step: int, stop_step: int,
                      sharding, prefetch: int = 2) -> Iterator[tuple[int, list[jax.Array]]]:
    """``(step, [images, boxes, classes, valid])`` as global arrays sharded over the batch axis; the order is
    :func:`train.data.batch_indices` (a pure function of ``(seed, step)``)."""
    import collections

    nproc, pid = jax.process_count(), jax.process_index()
    if batch_size % nproc:
        raise ValueError(f"batch_size {batch_size} is not divisible by the number of processes {nproc}")
    local = batch_size // nproc
    queue: collections.deque = collections.deque()
    for step in range(start_step, stop_step):
        idx = data_lib.batch_indices(len(ds), batch_size, seed, step)[pid * local:(pid + 1) * local]
        queue.append((step, _put(sharding, ds.images[idx], ds.boxes[idx], ds.classes[idx], ds.valid[idx])))
        if len(queue) > prefetch:
            yield queue.popleft()
    while queue:
        yield queue.popleft()


def predict_dataset(fns: DetectFunctions, state: DetectState, ds: DetectionDataset, batch_size: int
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """NMS detections ``(boxes (N, K, 4), scores (N, K), classes (N, K), valid (N, K))`` of the whole set."""
    n = len(ds)
    nproc, pid = jax.process_count(), jax.process_index()
    local = batch_size // nproc
    outs = []
    for start in range(0, n, batch_size):
        idx = np.minimum(np.arange(start, start + batch_size), n - 1)[pid * local:(pid + 1) * local]
        (x,) = _put(fns.batch_sharding, ds.images[idx])
        outs.append(jax.device_get(fns.predict(state, x)))
    cat = [np.concatenate([o[k] for o in outs])[:n] for k in range(4)]
    return cat[0], cat[1], cat[2], cat[3]


def evaluate_map(fns: DetectFunctions, state: DetectState, ds: DetectionDataset, batch_size: int) -> dict[str, float]:
    """COCO mAP@0.5 and mAP@0.5:0.95 of the (EMA) model on ``ds``."""
    from flax_attn.models.yolo_metrics import detection_map

    boxes, scores, classes, valid = predict_dataset(fns, state, ds, batch_size)
    dets = [(b[v], s[v], c[v]) for b, s, c, v in zip(boxes, scores, classes, valid)]
    gts = [(b[v], c[v]) for b, c, v in zip(ds.boxes, ds.classes, ds.valid)]
    res = detection_map(dets, gts, num_classes=len(ds.class_names), max_dets=fns.config.max_det)
    return {"map50": float(res.map50), "map": float(res.map50_95)}


# --------------------------------------------------------------------------------------------------
# train logging
# --------------------------------------------------------------------------------------------------

def _log_train(pending: list[tuple[int, dict[str, jax.Array]]], step_done: int, *, meter: Meter,
               writer: MetricsWriter, bar: Any, saver: ckpt.RunCheckpoints) -> None:
    if not pending:
        return
    fetched = jax.device_get([m for _, m in pending])
    for (s, _), m in zip(pending, fetched):
        if not np.isfinite(m["loss"]):
            raise NonFiniteLossError(f"non-finite training loss ({m['loss']}) at step {s} (0-based; the batch of "
                                     f"that step); stopping. {saver.last_good()}")
    mean = {k: float(np.mean([m[k] for m in fetched])) for k in ("loss", "box", "obj", "cls")}
    ips = meter.interval_rate()
    writer.write(split="train", step=step_done, images_per_sec=ips, learning_rate=float(fetched[-1]["lr"]), **mean)
    if bar is not None:
        bar.set_postfix(loss=f"{mean['loss']:.3f}", box=f"{mean['box']:.4f}", obj=f"{mean['obj']:.4f}",
                        cls=f"{mean['cls']:.4f}", img_s=f"{ips:.0f}")


# --------------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------------

def train_detector(config: DetectConfig, workdir: str, *, strict_checkpoints: bool = False,
                   data: tuple[DetectionDataset, DetectionDataset] | None = None) -> dict[str, Any]:
    """Trains ``config`` in ``workdir`` (resuming from its newest good checkpoint) and returns the summary
    (``map50``, ``map``, ``params``, ``images_per_sec``, the final loss terms, ...).

    Writes ``config.json``, ``config_history.jsonl``, ``metrics.jsonl`` (train records with the loss terms
    and images/s; eval records with mAP; a summary) and ``checkpoints/`` (orbax + SHA-256 manifests). A run
    with ``stop_at`` stops there after a checkpoint and reports ``stopped_at`` (no final evaluation); run the
    same config without it to finish. ``data`` (the output of :func:`load_detection_data`) skips reloading.

    Example:
        >>> summary = train_detector(DetectConfig(width=0.125, num_steps=50), "/tmp/det")  # doctest: +SKIP
        >>> summary["map50"]  # doctest: +SKIP
    """
    import orbax.checkpoint as ocp

    check_detect_config(config)
    train_ds, val_ds = data if data is not None else load_detection_data(config)
    if len(train_ds) < config.batch_size:
        raise data_lib.DataError(f"batch_size {config.batch_size} is larger than the training set "
                                 f"({len(train_ds)} images)")
    stored = _read_stored_config(workdir, DetectConfig, "detection config")
    changes = check_resume(stored, config, workdir, DETECT_RESUMABLE_FIELDS)
    ckpt_root = os.path.abspath(os.path.join(workdir, "checkpoints"))

    nb = len(train_ds) // config.batch_size
    fns = get_detect_functions(config, num_classes=len(train_ds.class_names), in_chans=train_ds.images.shape[-1],
                               steps_per_epoch=nb)
    state = fns.init()
    mngr = checkpoint_manager(workdir, config.keep_checkpoints) if os.path.isdir(ckpt_root) else None
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state.as_dict())

    def restore(s: int) -> DetectState:
        assert mngr is not None
        return DetectState.from_dict(mngr.restore(s, args=ocp.args.StandardRestore(abstract)))

    restored, restored_step, bad = ckpt.restore_newest_good(ckpt_root, restore, fallback=not strict_checkpoints)
    if restored is not None:
        state = restored
    start = int(jax.device_get(state.step))
    if restored_step is not None and start != restored_step:
        raise ckpt.CheckpointError(f"checkpoint step {restored_step} in {ckpt_root} holds the state of step {start}")
    stop = config.last_step
    if start > stop:
        raise ResumeError(f"{workdir} is at step {start}, past the requested stop {stop}")

    os.makedirs(workdir, exist_ok=True)
    moved = ckpt.move_aside(workdir, ckpt_root, [s for s, _ in bad])
    if moved:
        log.warning("moved the corrupt checkpoint(s) to %s", ", ".join(moved))
    if mngr is not None and bad:
        mngr.close()
        mngr = None
    if mngr is None:
        mngr = checkpoint_manager(workdir, config.keep_checkpoints)
    writer = MetricsWriter(workdir)
    if jax.process_index() == 0:
        _record_start(workdir, config, start=start, resumed=restored is not None, changes=changes,
                      passed_over=[s for s, _ in bad], metrics_path=writer.path)
    if train_ds.skipped:
        log.warning("skipped %d unreadable image(s):\n  %s", len(train_ds.skipped), "\n  ".join(train_ds.skipped))

    name = f"yolov5({config.depth},{config.width})+{config.attn}"
    bar = None
    if config.progress and jax.process_index() == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=stop, initial=start, desc=name, unit="step", dynamic_ncols=True)
    saver = ckpt.RunCheckpoints(mngr, ckpt_root)
    meter = Meter(config.batch_size)
    pending: list[tuple[int, dict[str, jax.Array]]] = []
    try:
        for step, batch in detection_batches(train_ds, batch_size=config.batch_size, seed=config.seed,
                                             start_step=start, stop_step=stop, sharding=fns.batch_sharding,
                                             prefetch=config.prefetch):
            state, metrics = fns.train_step(state, *batch)
            pending.append((step, metrics))
            meter.step_done(metrics)
            done = step + 1
            if bar is not None:
                bar.update(1)
            saver.poll()
            is_last = done == stop
            want_ckpt = is_last or (config.checkpoint_every and done % config.checkpoint_every == 0)
            want_eval = config.eval_every and done % config.eval_every == 0 and done != config.num_steps
            if done % config.log_every == 0 or want_ckpt or want_eval or is_last:
                _log_train(pending, done, meter=meter, writer=writer, bar=bar, saver=saver)
                pending = []
            if want_eval:
                t0 = time.perf_counter()
                writer.write(split="eval", step=done, **evaluate_map(fns, state, val_ds, config.batch_size))
                meter.exclude(time.perf_counter() - t0)
            if want_ckpt:
                saver.save(done, state.as_dict())
    finally:
        saver.finish()
        if bar is not None:
            bar.close()
    meter.stop()
    if start < stop and mngr.latest_step() != stop:
        raise RuntimeError(f"final checkpoint missing (latest {mngr.latest_step()})")

    summary: dict[str, Any] = {
        "model": name, "attn": config.attn, "width": config.width, "depth": config.depth,
        "dataset": config.dataset, "steps": config.num_steps, "resumed_from": start, "params": fns.num_params,
        "images_per_sec": meter.images_per_sec(), "compile_seconds": meter.compile_seconds,
        "devices": jax.device_count(), "processes": jax.process_count(),
    }
    if stop < config.num_steps:
        summary["stopped_at"] = stop
        mngr.close()
        return summary
    summary.update(evaluate_map(fns, state, val_ds, config.batch_size))
    if not meter.trained:
        previous = _last_summary(writer.path)
        summary["images_per_sec"] = previous.get("images_per_sec")
        summary["compile_seconds"] = previous.get("compile_seconds")
    if config.cam_images and jax.process_index() == 0:
        summary.update(detection_cam_figures(fns, state, val_ds, os.path.join(workdir, "cams"),
                                             num_images=config.cam_images, conf=config.cam_conf))
    writer.write(split="summary", step=config.num_steps, **summary)
    mngr.close()
    return summary


# --------------------------------------------------------------------------------------------------
# per-detection CAMs
# --------------------------------------------------------------------------------------------------

def energy_in_boxes(cams: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Fraction of each map's mass inside its own xyxy box (pixel ``(r, c)`` is inside when its centre
    ``(c + 0.5, r + 0.5)`` is): ``cams (K, H, W)`` non-negative, ``boxes (K, 4)``; NaN for an all-zero map."""
    cams = np.asarray(cams, np.float64)
    _, h, w = cams.shape
    yc, xc = np.arange(h)[None, :, None] + 0.5, np.arange(w)[None, None, :] + 0.5
    b = np.asarray(boxes, np.float64)
    inside = ((xc >= b[:, 0, None, None]) & (xc < b[:, 2, None, None])
              & (yc >= b[:, 1, None, None]) & (yc < b[:, 3, None, None]))
    total = cams.sum((1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, (cams * inside).sum((1, 2)) / total, np.nan)


def detection_cam_figures(fns: DetectFunctions, state: DetectState, ds: DetectionDataset, out_dir: str, *,
                          num_images: int, conf: float = 0.25, method: str = "xgradcam",
                          layers: Sequence[str] = CAM_LAYERS, max_detections: int = 12) -> dict[str, Any]:
    """Per-detection CAMs (``flax_attn.cam.detection_cams``, NMS at IoU 0.45 and ``conf``, objectness as the
    target, ``layers`` = every stride) of the first ``num_images`` validation scenes: one PNG per kept detection
    (``<out_dir>/<image>/<slot>.png``: CAM overlay, box, label) and a grid per image (``<image>_grid.png``).
    Returns ``cam_energy_in_box`` (mean over the kept detections with a non-constant map of the fraction of
    CAM mass inside the detection's own box), its chance level (the mean box area / image area),
    ``cam_detections`` and ``cam_figures``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from flax_attn.cam import detection_cams, plot_detection_grid, save_detection_cams

    model = fns.eval_model(state)
    k = min(num_images, len(ds))
    x = jnp.asarray(ds.images[:k])
    res = detection_cams(model, x, list(layers), method=method, backward_type="conf", conf_threshold=conf,
                         nms_iou=0.45, max_detections=max_detections)
    res = jax.device_get(res)
    os.makedirs(out_dir, exist_ok=True)
    img = ds.images[:k]
    rgb = np.repeat(img, 3, axis=-1) if img.shape[-1] == 1 else img
    energies, chance, figures = [], [], []
    h, w = img.shape[1:3]
    for i in range(k):
        keep = res.valid[i] & ~res.constant[i]
        if keep.any():
            energies.extend(energy_in_boxes(res.cams[i][keep], res.boxes[i][keep]).tolist())
            bx = np.clip(res.boxes[i][keep], 0, [w, h, w, h])
            chance.extend(((bx[:, 2] - bx[:, 0]) * (bx[:, 3] - bx[:, 1]) / (h * w)).tolist())
        save_detection_cams(os.path.join(out_dir, str(i)), rgb[i], res, ds.class_names, index=i)
        if res.valid[i].any():
            fig = plot_detection_grid(rgb[i], res, ds.class_names, index=i, cols=6, cell_size=2.0)
            path = os.path.join(out_dir, f"{i}_grid.png")
            fig.savefig(path, dpi=80)
            plt.close(fig)
            figures.append(path)
    e = np.asarray(energies, np.float64)
    return {"cam_energy_in_box": float(np.nanmean(e)) if e.size else None,
            "cam_energy_chance": float(np.mean(chance)) if chance else None,
            "cam_detections": int(e.size), "cam_figures": figures}


# --------------------------------------------------------------------------------------------------
# the demo: without attention vs CBAM, one table
# --------------------------------------------------------------------------------------------------

#: the detection demo: a width-1/8 YOLOv5n (depth 0.33) on 96x96 scenes, a few minutes per model on 2 cores.
#: A few-minute schedule, so not YOLOv5's: lr0 0.05 (YOLOv5: 0.01) and 50 warm-up steps (YOLOv5: >= 100). After
#: 300 steps no detection scores 0.25 (obj x cls), so the CAM figures take NMS detections down to 0.01.
DEMO_CONFIG = DetectConfig(width=0.125, image_size=96, num_train=2000, num_val=200, num_steps=300,
                           batch_size=32, lr0=0.05, warmup_epochs=0.0, warmup_min_steps=50, log_every=20,
                           checkpoint_every=100, cam_images=4, cam_conf=0.01)
DEMO_ATTNS = ("none", "cbam")


def format_detect_table(rows: Sequence[dict[str, Any]]) -> str:
    def f(v: Any, fmt: str) -> str:
        return "n/a" if v is None else format(v, fmt)

    lines = ["| model | mAP@0.5 | mAP@0.5:0.95 | CAM energy in own box (chance) | detections explained | params "
             "| train images/s |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {f(r.get('map50'), '.3f')} | {f(r.get('map'), '.3f')} | "
                     f"{f(r.get('cam_energy_in_box'), '.3f')} ({f(r.get('cam_energy_chance'), '.3f')}) | "
                     f"{r.get('cam_detections', 0)} | {r['params']:,} | {f(r.get('images_per_sec'), '.0f')} |")
    return "\n".join(lines)


def run_detect_demo(base: DetectConfig = DEMO_CONFIG, workdir: str = "runs/detect",
                    attns: Sequence[str] = DEMO_ATTNS, *, strict_checkpoints: bool = False) -> list[dict[str, Any]]:
    """Trains ``base`` once per attention block (``workdir/<attn>``, resumable) on the same data, prints one
    table and writes it to ``workdir/results.md``; the CAM figures are in ``workdir/<attn>/cams/``."""
    data = load_detection_data(base)
    rows = []
    for attn in attns:
        cfg = base.replace(attn=attn)
        print(f"== YOLOv5 (depth {cfg.depth}, width {cfg.width}) attn={attn}: {cfg.num_steps} steps of "
              f"{cfg.batch_size} at {cfg.image_size}x{cfg.image_size} ==", flush=True)
        rows.append(train_detector(cfg, os.path.join(workdir, attn), strict_checkpoints=strict_checkpoints,
                                   data=data))
    table = format_detect_table(rows)
    print()
    print(table)
    print(f"\n(mAP: COCO-style on {len(data[1])} validation scenes, EMA weights; CAM: XGradCAM of each kept "
          f"detection's objectness at {', '.join(CAM_LAYERS)}, NMS at conf {base.cam_conf}, first "
          f"{base.cam_images} validation scenes; chance = mean box area / image area)")
    for r, attn in zip(rows, attns):
        if r.get("cam_figures"):
            print(f"CAM figures ({attn}): {os.path.abspath(os.path.join(workdir, attn, 'cams'))}")
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "results.md"), "w") as fh:
        fh.write(table + "\n")
    return rows


__all__ = [
    "DEMO_CONFIG",
    "DetectConfig",
    "DetectFunctions",
    "DetectState",
    "augment",
    "detection_cam_figures",
    "ema_decay",
    "energy_in_boxes",
    "evaluate_map",
    "load_detection_data",
    "lr_momentum",
    "param_groups",
    "run_detect_demo",
    "train_detector",
]
