"""Training configuration: one frozen dataclass, every field settable from the command line.

``Config`` holds *what* to train; it is plain data (JSON-serialisable, hashable) and carries no state.
``train_and_evaluate(config, workdir)`` is a pure function of it (plus the workdir's checkpoints).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Self, cast

DATASETS = ("digits", "cluttered_digits", "folder")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "step", "constant")
COMPUTE_DTYPES = ("float32", "bfloat16")


class ConfigIO:
    """``replace`` / ``to_dict`` / ``from_dict`` / ``to_json`` of the frozen config dataclasses (:class:`Config`,
    ``train.detect.DetectConfig``): tuples are stored as JSON lists and read back as tuples, unknown fields
    are refused."""

    def replace(self, **changes: Any) -> Self:
        return dataclasses.replace(cast(Any, self), **changes)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in dataclasses.fields(cast(Any, self))}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Self:
        names = {f.name for f in dataclasses.fields(cast(Any, cls))}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown config fields {unknown}: expected some of {sorted(names)}")
        fields: dict[str, Any] = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()}
        return cls(**fields)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


@dataclass(frozen=True)
class Config(ConfigIO):
    """Everything that defines a training run. Defaults: a tiny run on scikit-learn's digits (seconds on a CPU).

    Example:
        >>> cfg = Config(dataset="cluttered_digits", attn="cbam", num_steps=300)
        >>> cfg.replace(batch_size=32).batch_size
        32
    """

    # model
    model: str = field(default="resnet18", metadata={"help": "backbone name (flax_attn.models)"})
    attn: str = field(default="none", metadata={"help": "attention block in every residual block: none, se, "
                                                         "cbam or any flax_attn.layers.list_attn() name"})
    width: int = field(default=16, metadata={"help": "channels of the first stage (64 = torchvision)"})
    stem: str = field(default="cifar", metadata={"help": "cifar (3x3 conv, stride 1) or torchvision (7x7/2 + pool)"})
    zero_init_residual: bool = field(default=False, metadata={"help": "zero-init the last BN of each block"})
    compute_dtype: str = field(default="float32", metadata={"help": "float32 or bfloat16 (params stay float32)"})
    # data
    dataset: str = field(default="digits", metadata={"help": "digits, cluttered_digits or folder"})
    data_dir: str = field(default="", metadata={"help": "root of an image folder (one sub-folder per class)"})
    image_size: int = field(default=0, metadata={"help": "input side in pixels; 0 = the dataset's own "
                                                          "(digits 8, cluttered_digits 64, folder 64)"})
    in_chans: int = field(default=0, metadata={"help": "folder only: 1 (grey) or 3 (RGB); 0 = 3"})
    val_fraction: float = field(default=0.2, metadata={"help": "fraction held out for validation"})
    data_seed: int = field(default=0, metadata={"help": "seed of the train/val split and of generated data"})
    drop_empty_classes: bool = field(default=False, metadata={
        "help": "folder only: train without class folders that hold no readable image (default: refuse)"})
    cluttered_train: int = field(default=4000, metadata={"help": "cluttered_digits: training images"})
    cluttered_val: int = field(default=1000, metadata={"help": "cluttered_digits: validation images"})
    clutter: int = field(default=8, metadata={"help": "cluttered_digits: clutter fragments per image"})
    # optimisation
    optimizer: str = field(default="sgd", metadata={"help": "sgd (momentum, nesterov) or adamw"})
    learning_rate: float = field(default=0.05, metadata={"help": "peak learning rate (for the global batch)"})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum / AdamW beta1"})
    nesterov: bool = field(default=True, metadata={"help": "SGD: Nesterov momentum"})
    weight_decay: float = field(default=5e-4, metadata={"help": "decoupled for adamw; skips BatchNorm and biases"})
    schedule: str = field(default="cosine", metadata={"help": "cosine, step or constant (all after warm-up)"})
    warmup_steps: int = field(default=10, metadata={"help": "linear warm-up steps from 0"})
    step_milestones: tuple[float, ...] = field(default=(0.5, 0.75), metadata={
        "help": "step schedule: fractions of num_steps where the rate is multiplied by step_factor"})
    step_factor: float = field(default=0.1, metadata={"help": "step schedule decay factor"})
    label_smoothing: float = field(default=0.0, metadata={"help": "label smoothing alpha"})
    grad_clip_norm: float = field(default=0.0, metadata={"help": "clip the global gradient norm (0 = off)"})
    batch_size: int = field(default=64, metadata={"help": "global batch (split over all devices and hosts)"})
    num_steps: int = field(default=100, metadata={"help": "optimisation steps"})
    seed: int = field(default=0, metadata={"help": "seed of initialisation and data order"})
    # loop
    log_every: int = field(default=20, metadata={"help": "steps between metric logs (the only host syncs)"})
    eval_every: int = field(default=0, metadata={"help": "steps between evaluations (0 = at the end only)"})
    checkpoint_every: int = field(default=50, metadata={"help": "steps between checkpoints (0 = end only)"})
    keep_checkpoints: int = field(default=3, metadata={"help": "keep the last N checkpoints"})
    prefetch: int = field(default=2, metadata={"help": "batches placed on the devices ahead of the step"})
    progress: bool = field(default=True, metadata={"help": "show a tqdm progress bar"})
    # results
    cam_images: int = field(default=8, metadata={"help": "validation images in the CAM figure (0 = none)"})

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            v, tp = getattr(self, f.name), hints[f.name]
            if tp is bool:
                ok = isinstance(v, bool)
            elif tp is int:
                ok = isinstance(v, int) and not isinstance(v, bool)
            elif tp is float:
                ok = isinstance(v, (int, float)) and not isinstance(v, bool)
            elif tp is str:
                ok = isinstance(v, str)
            else:  # tuple[float, ...]
                ok = isinstance(v, tuple) and all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in v)
            if not ok:
                raise TypeError(f"{f.name} must be {getattr(tp, '__name__', str(tp))}, got {v!r} "
                                f"({type(v).__name__})")
        for name, allowed in (("dataset", DATASETS), ("optimizer", OPTIMIZERS), ("schedule", SCHEDULES),
                              ("compute_dtype", COMPUTE_DTYPES), ("stem", ("cifar", "torchvision"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}: expected one of {allowed}")
        positive = ("width", "batch_size", "num_steps", "log_every", "keep_checkpoints", "prefetch",
                    "cluttered_train", "cluttered_val")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("image_size", "eval_every", "checkpoint_every", "warmup_steps", "clutter", "cam_images",
                     "in_chans"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.in_chans not in (0, 1, 3):
            raise ValueError(f"in_chans must be 0, 1 or 3, got {self.in_chans}")
        # written as `not (lo <= x ...)` so that NaN fails every range check
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        for name in ("learning_rate", "weight_decay", "grad_clip_norm"):
            v = getattr(self, name)
            if not (v >= 0.0 and math.isfinite(v)):
                raise ValueError(f"{name} must be a finite number >= 0, got {v}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1) (SGD momentum / AdamW beta1), got {self.momentum}")
        if not (self.step_factor > 0.0 and math.isfinite(self.step_factor)):
            raise ValueError(f"step_factor must be a finite number > 0, got {self.step_factor}")
        if not all(0.0 < m < 1.0 for m in self.step_milestones):
            raise ValueError(f"step_milestones must be fractions in (0, 1), got {self.step_milestones}")
        if self.dataset == "folder" and not self.data_dir:
            raise ValueError("dataset='folder' needs data_dir (a folder with one sub-folder per class)")



#: the fields a resumed run may change: they steer the loop (how long, how often to log, evaluate and
#: checkpoint, the figure), not the model, the data or the optimisation. Changing ``num_steps`` recomputes
#: the learning-rate schedule for the new length (a resumed cosine schedule is not the one a fresh run of
#: the new length would follow).
RESUMABLE_FIELDS: frozenset[str] = frozenset(
    {"num_steps", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints", "prefetch", "progress",
     "cam_images"})


def config_changes(old: Config, new: Config) -> dict[str, tuple[Any, Any]]:
    """``{field: (old value, new value)}`` for every field that differs between two configs."""
    a, b = old.to_dict(), new.to_dict()
    return {k: (a[k], b[k]) for k in a if a[k] != b[k]}


# --------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------

def _parse_float_tuple(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def add_config_arguments(parser: argparse.ArgumentParser, defaults: Config | None = None) -> None:
    """Adds ``--<field>`` for every :class:`Config` field (booleans also get ``--no-<field>``)."""
    defaults = defaults or Config()
    hints = typing.get_type_hints(Config)
    group = parser.add_argument_group("config (every Config field)")
    for f in dataclasses.fields(Config):
        tp = hints[f.name]
        default = getattr(defaults, f.name)
        help_text = f"{f.metadata.get('help', '')} (default: {default!r})"
        flag = "--" + f.name
        if tp is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        elif tp == tuple[float, ...]:
            group.add_argument(flag, type=_parse_float_tuple, default=default, metavar="A,B,...", help=help_text)
        else:
            group.add_argument(flag, type=tp, default=default, metavar=tp.__name__.upper(), help=help_text)


def config_from_args(args: argparse.Namespace) -> Config:
    return Config(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Config)})
