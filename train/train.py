"""``train_and_evaluate(config, workdir)``: jitted, data-parallel training with exact resumption.

Shape of a run, top to bottom in :func:`train_and_evaluate`:

1. everything that can refuse the run happens before anything is written: the config checks (names, folder,
   batch vs devices, before anything compiles), the data, the comparison with the workdir's stored config
   (only the loop settings ``RESUMABLE_FIELDS`` may change) and the choice of the checkpoint to resume (the
   newest one whose SHA-256 manifest verifies and that orbax restores; corrupt newer ones are set aside);
2. the :class:`TrainState` ``(step, params, model_state, opt_state)`` is built inside ``jax.jit`` directly
   replicated on a mesh over all devices (``Mesh(devices, ("data",))``); batches are sharded along
   ``"data"``. BatchNorm's batch mean/variance are plain ``jnp.mean`` over the global (sharded) batch, so XLA
   inserts the cross-device reductions: the statistics are those of the global batch, as on one device;
3. the train step is one jitted function that donates the state; metrics stay on the device and are fetched
   only every ``log_every`` steps (the only host syncs in the loop), where a non-finite loss stops the run
   naming the first bad step, before any checkpoint of the bad state can be written; a :class:`Meter` keeps
   the timings (the compiling first step apart, evaluations left out);
4. orbax checkpoints every ``checkpoint_every`` steps and at the end (keep the last N), each followed by its
   checksum file as soon as orbax has finished it (:class:`train.checkpoints.RunCheckpoints`). Orbax writes
   into a temporary folder and renames it when complete, so a half-written checkpoint is never seen. The
   data order is a function of ``(seed, step)``, so resumption is exact.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from typing import TYPE_CHECKING, Any, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from train import checkpoints as ckpt
from train import data as data_lib
from train.cam import grad_cam, localisation_scores, save_cam_grid
from train.config import RESUMABLE_FIELDS, Config, config_changes
from train.models import build_model, check_model_names

#: compiler options of the one-time initialisation (as ``flax_attn.models.create_model``'s): LLVM level 0
_INIT_COMPILER_OPTIONS: dict[str, str | bool] = {"xla_backend_optimization_level": "0"}

PIXEL_MEAN, PIXEL_STD = 0.5, 0.5
log = logging.getLogger("train")


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or inf; the message names the step."""


@struct.dataclass
class TrainState:
    """Everything a training step reads and writes (a pytree, replicated over the mesh)."""

    step: jax.Array  #: optimisation steps done (int32 scalar)
    params: Any  #: ``nnx.State`` of the model's ``nnx.Param`` variables
    model_state: Any  #: the other model variables (BatchNorm statistics)
    opt_state: Any  #: optax state of ``params``

    def as_dict(self) -> dict[str, Any]:
        """The checkpoint layout: ``{"step", "params", "model_state", "opt_state"}``."""
        return {"step": self.step, "params": self.params, "model_state": self.model_state,
                "opt_state": self.opt_state}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainState:
        return cls(step=d["step"], params=d["params"], model_state=d["model_state"], opt_state=d["opt_state"])

    if TYPE_CHECKING:  # added by flax.struct.dataclass (dataclasses.replace)
        def replace(self, **updates: Any) -> TrainState: ...


class Meter:
    """Wall-clock bookkeeping of the loop: the first step (it includes compilation) is timed apart, and the time
    spent in evaluations is left out of the training throughput."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self.started = time.perf_counter()
        self.first_done: float | None = None
        self.compile_seconds: float | None = None
        self.images = 0  # images of the steps after the first
        self.excluded = 0.0  # seconds spent outside training (evaluations)
        self.interval_start, self.interval_images = self.started, 0
        self.stopped: float | None = None

    def step_done(self, metrics: Any) -> None:
        if self.first_done is None:
            # the first step includes compilation: wait for it once so that images/s measures steady state
            jax.block_until_ready(metrics)
            self.first_done = time.perf_counter()
            self.compile_seconds = self.first_done - self.started
            self.interval_start, self.interval_images = self.first_done, 0
        else:
            self.interval_images += self.batch_size
            self.images += self.batch_size

    def interval_rate(self) -> float:
        """Images/s since the previous call (or the first step), and starts the next interval."""
        now = time.perf_counter()
        rate = self.interval_images / max(now - self.interval_start, 1e-9)
        self.interval_start, self.interval_images = now, 0
        return rate

    def exclude(self, seconds: float) -> None:
        self.excluded += seconds
        self.interval_start += seconds

    def stop(self) -> None:
        self.stopped = time.perf_counter()

    @property
    def trained(self) -> bool:
        return self.first_done is not None

    def images_per_sec(self) -> float | None:
        if self.first_done is None or self.stopped is None:
            return None
        seconds = self.stopped - self.first_done - self.excluded
        return self.images / seconds if seconds > 0 and self.images else None


# --------------------------------------------------------------------------------------------------
# checks, mesh, optimiser
# --------------------------------------------------------------------------------------------------

def check_config(config: Config) -> None:
    """Every error that bad input can cause, raised before any data is generated or anything compiled."""
    check_model_names(config)
    if config.dataset == "folder":
        data_lib.check_folder(config.data_dir)
    n = jax.device_count()
    if config.batch_size % n:
        raise ValueError(f"batch_size {config.batch_size} is not divisible by the number of devices {n} "
                         f"(the global batch is split evenly over all devices)")
    if config.dataset == "digits" and config.image_size and config.image_size < 4:
        raise ValueError(f"image_size must be >= 4, got {config.image_size}")


def make_mesh() -> jax.sharding.Mesh:
    return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(AxisType.Auto,))


def learning_rate_schedule(config: Config) -> optax.Schedule:
    """Linear warm-up from 0 to ``learning_rate``, then cosine to 0, step decay, or constant."""
    warm = min(config.warmup_steps, config.num_steps)
    rest = max(config.num_steps - warm, 1)
    if config.schedule == "cosine":
        main = optax.cosine_decay_schedule(config.learning_rate, rest)
    elif config.schedule == "step":
        bounds = {max(int(round(m * config.num_steps)) - warm, 1): config.step_factor
                  for m in config.step_milestones}
        main = optax.piecewise_constant_schedule(config.learning_rate, bounds)
    else:
        main = optax.constant_schedule(config.learning_rate)
    if warm == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, config.learning_rate, warm), main], [warm])


def decay_mask(params: Any) -> Any:
    """Weight decay applies to conv and dense kernels only (ndim > 1): never to BatchNorm scales/biases or biases."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(config: Config) -> optax.GradientTransformation:
    lr = learning_rate_schedule(config)
    parts = [optax.clip_by_global_norm(config.grad_clip_norm)] if config.grad_clip_norm > 0 else []
    if config.optimizer == "sgd":
        if config.weight_decay > 0:
            parts.append(optax.add_decayed_weights(config.weight_decay, mask=decay_mask))
        parts.append(optax.sgd(lr, momentum=config.momentum or None, nesterov=config.nesterov and config.momentum > 0))
    else:
        parts.append(optax.adamw(lr, b1=config.momentum, weight_decay=config.weight_decay, mask=decay_mask))
    return optax.chain(*parts)


# --------------------------------------------------------------------------------------------------
# the model as pure functions
# --------------------------------------------------------------------------------------------------

class Functions:
    """Graph definitions (train and eval mode) and the jitted init / train / eval / CAM functions of a run."""

    def __init__(self, config: Config, *, num_classes: int, in_chans: int, mesh: jax.sharding.Mesh):
        self.config, self.num_classes, self.in_chans = config, num_classes, in_chans
        self.tx = make_optimizer(config)
        self.replicated = NamedSharding(mesh, P())
        self.batch_sharding = NamedSharding(mesh, P("data"))
        abstract = nnx.eval_shape(self._new_model)
        abstract.train()
        self.train_graphdef = nnx.graphdef(abstract)
        abstract.eval()
        self.eval_graphdef = nnx.graphdef(abstract)
        self._init_jit = jax.jit(self._init, out_shardings=self.replicated)
        self._init_compiled: Any = None
        self.train_step = jax.jit(self._train_step, donate_argnums=(0,),
                                  out_shardings=(self.replicated, self.replicated))
        self.eval_step = jax.jit(self._eval_step, out_shardings=self.replicated)
        self.cam_step = jax.jit(self._cam_step, out_shardings=self.replicated)
        self.cam_pred_step = jax.jit(self._cam_pred_step, out_shardings=self.replicated)

    def init(self) -> TrainState:
        """The initial training state, replicated over the mesh: one computation compiled at XLA's optimisation
        level 0 (it runs once; LLVM's optimisation of its many small random-number kernels took most of the
        init time, 13-15 s for the main job's network on 2 cores, and buys nothing at run time)."""
        if self._init_compiled is None:
            self._init_compiled = self._init_jit.lower().compile(compiler_options=_INIT_COMPILER_OPTIONS)
        return self._init_compiled()

    def _new_model(self) -> nnx.Module:
        return build_model(self.config, num_classes=self.num_classes, in_chans=self.in_chans,
                           rngs=nnx.Rngs(self.config.seed))

    def _init(self) -> TrainState:
        # two filters: exactly two states (flax types the tail as a variadic tuple)
        _, params, model_state = cast("tuple[nnx.GraphDef, nnx.State, nnx.State]",
                                      nnx.split(self._new_model(), nnx.Param, ...))
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
                          opt_state=self.tx.init(params))

    def merged(self, state: TrainState, *, train: bool) -> nnx.Module:
        return nnx.merge(self.train_graphdef if train else self.eval_graphdef, state.params, state.model_state)

    @staticmethod
    def prepare(x: jax.Array, dtype: Any) -> jax.Array:
        return ((x - PIXEL_MEAN) / PIXEL_STD).astype(dtype)

    @property
    def compute_dtype(self) -> Any:
        return jnp.bfloat16 if self.config.compute_dtype == "bfloat16" else jnp.float32

    def _train_step(self, state: TrainState, x: jax.Array, y: jax.Array):
        def loss_fn(params, model_state):
            model = nnx.merge(self.train_graphdef, params, model_state, copy=True)
            logits = model(self.prepare(x, self.compute_dtype)).astype(jnp.float32)
            targets = optax.smooth_labels(jax.nn.one_hot(y, self.num_classes), self.config.label_smoothing)
            loss = optax.softmax_cross_entropy(logits, targets).mean()
            return loss, (logits, nnx.state(model, nnx.Not(nnx.Param)))

        (loss, (logits, model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, state.model_state)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "correct": (jnp.argmax(logits, -1) == y).sum()}
        return state.replace(step=state.step + 1, params=params, model_state=model_state,
                             opt_state=opt_state), metrics

    def _eval_step(self, state: TrainState, x: jax.Array, y: jax.Array, mask: jax.Array):
        model = self.merged(state, train=False)
        logits = model(self.prepare(x, self.compute_dtype)).astype(jnp.float32)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        return {"loss_sum": (loss * mask).sum(), "correct": ((jnp.argmax(logits, -1) == y) * mask).sum(),
                "count": mask.sum()}

    def _cam_step(self, state: TrainState, x: jax.Array, y: jax.Array):
        """Grad-CAM of the true class ``y`` (for the localisation scores)."""
        return grad_cam(self.merged(state, train=False), self.prepare(x, self.compute_dtype), y)[0]

    def _cam_pred_step(self, state: TrainState, x: jax.Array):
        """Grad-CAM of the predicted class and the prediction (for the figures)."""
        cam, logits = grad_cam(self.merged(state, train=False), self.prepare(x, self.compute_dtype))
        return cam, jnp.argmax(logits, -1)


@functools.lru_cache(maxsize=4)
def _cached_functions(config: Config, num_classes: int, in_chans: int, devices: tuple) -> Functions:
    return Functions(config, num_classes=num_classes, in_chans=in_chans, mesh=make_mesh())


#: loop settings that the jitted functions never read (they are reset in the cache key, so that a run resumed
#: with other logging or checkpoint intervals reuses the compiled functions)
_LOOP_ONLY_FIELDS = ("log_every", "eval_every", "checkpoint_every", "keep_checkpoints", "prefetch", "progress",
                     "cam_images")


def get_functions(config: Config, *, num_classes: int, in_chans: int) -> Functions:
    """The jitted functions of ``config``, reused by later runs of the same config in this process (a resumed
    run, a repeated test) so that they compile once."""
    default = Config()
    key = config.replace(**{k: getattr(default, k) for k in _LOOP_ONLY_FIELDS})
    return _cached_functions(key, num_classes, in_chans, tuple(jax.devices()))


# --------------------------------------------------------------------------------------------------
# evaluation, CAMs, logging helpers
# --------------------------------------------------------------------------------------------------

def _padded_batches(ds: data_lib.Dataset, batch_size: int, sharding, limit: int | None = None):
    """Fixed-order batches over a dataset, the last one padded (mask 0), each process feeding its share."""
    n = len(ds) if limit is None else min(limit, len(ds))
    nproc, pid = jax.process_count(), jax.process_index()
    local = batch_size // nproc
    for start in range(0, n, batch_size):
        idx = np.arange(start, start + batch_size)
        mask = (idx < n).astype(np.float32)
        idx = np.minimum(idx, n - 1)[pid * local:(pid + 1) * local]
        mask = mask[pid * local:(pid + 1) * local]
        put = functools.partial(jax.make_array_from_process_local_data, sharding)
        yield put(ds.images[idx]), put(ds.labels[idx]), put(mask), idx, mask


def evaluate(fns: Functions, state: TrainState, ds: data_lib.Dataset, batch_size: int) -> dict[str, float]:
    totals = None
    for x, y, m, _, _ in _padded_batches(ds, batch_size, fns.batch_sharding):
        out = fns.eval_step(state, x, y, m)
        totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
    totals = jax.device_get(totals)
    return {"loss": float(totals["loss_sum"] / totals["count"]),
            "accuracy": float(totals["correct"] / totals["count"])}


def compute_cams(fns: Functions, state: TrainState, ds: data_lib.Dataset, batch_size: int, *,
                 num_true: int, num_pred: int) -> dict[str, np.ndarray]:
    """Grad-CAM maps of the true class for the first ``num_true`` images, and of the predicted class (with the
    predictions) for the first ``num_pred``."""
    outs: dict[str, list[np.ndarray]] = {"cam_true": [], "cam_pred": [], "pred": []}
    for x, y, _, _, mask in _padded_batches(ds, batch_size, fns.batch_sharding, num_true):
        outs["cam_true"].append(np.asarray(jax.device_get(fns.cam_step(state, x, y)))[mask > 0])
    for x, _, _, _, mask in _padded_batches(ds, batch_size, fns.batch_sharding, num_pred):
        cam, pred = jax.device_get(fns.cam_pred_step(state, x))
        outs["cam_pred"].append(cam[mask > 0])
        outs["pred"].append(pred[mask > 0])
    return {k: np.concatenate(v) if v else np.zeros((0,)) for k, v in outs.items()}


class MetricsWriter:
    """Appends one JSON object per line to ``workdir/metrics.jsonl`` (process 0 only)."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.enabled = jax.process_index() == 0

    def write(self, **record: Any) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record, sort_keys=True) + "\n")


def _last_summary(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        return {}
    summaries = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line being appended by another process
                continue
            if record.get("split") == "summary":
                summaries.append(record)
    return summaries[-1] if summaries else {}


def count_params(params: Any) -> int:
    return int(sum(np.prod(p.shape) for p in jax.tree.leaves(params)))


# --------------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------------

def checkpoint_manager(workdir: str, keep: int):
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, "checkpoints")),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))


class ResumeError(ValueError):
    """The workdir holds a run that this config cannot resume (nothing in the workdir was changed)."""


def _read_stored_config(workdir: str, config_cls: Any = Config, what: str = "config") -> Any:
    """The ``config_cls`` stored in ``workdir/config.json`` (``None`` for a fresh workdir); shared by the
    classification and the detection runs (``what`` names the kind in the error)."""
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return config_cls.from_dict(json.load(f))
    except (OSError, ValueError, TypeError) as e:
        raise ResumeError(f"{path} is not a {what} this version can read ({e}): start a fresh run in another "
                          f"--workdir") from None


def check_resume(stored: Any, config: Any, workdir: str,
                 resumable: frozenset[str] = RESUMABLE_FIELDS) -> dict[str, tuple[Any, Any]]:
    """The changes of ``config`` against the run stored in ``workdir``; raises :class:`ResumeError` naming every
    field that would change the model, the data or the optimisation (only ``resumable`` fields may change).
    Any config with ``to_dict`` (:class:`Config`, the detection runs' ``DetectConfig``)."""
    if stored is None:
        return {}
    changes = config_changes(stored, config)
    refused = {k: v for k, v in changes.items() if k not in resumable}
    if refused:
        listed = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in sorted(refused.items()))
        raise ResumeError(
            f"{workdir} holds a run with another config: {listed}. These fields change the model, the data or "
            f"the optimisation, so its checkpoints cannot continue this config; start a fresh run in another "
            f"--workdir (only {', '.join(sorted(resumable))} may change on resume)")
    return changes


def _num_steps_error(config: Config, step: int, workdir: str) -> ResumeError:
    return ResumeError(f"num_steps {config.num_steps} is smaller than the step {step} of the checkpoint in "
                       f"{workdir}: the run is already past it; pass --num_steps {step} or more (or start a "
                       f"fresh run in another --workdir)")


def _truncate_metrics(path: str, step: int) -> int:
    """Drops the records of ``metrics.jsonl`` logged after ``step`` (a run killed after its last checkpoint logged
    them; the resumed run logs them again) and partly written lines, atomically. Returns the number dropped."""
    if not os.path.isfile(path):
        return 0
    with open(path) as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(json.dumps(record, sort_keys=True) + "\n")
    if len(kept) != len(lines):
        ckpt.atomic_write(path, "".join(kept))
    return len(lines) - len(kept)


def _log_train(pending: list[tuple[int, dict[str, jax.Array]]], step_done: int, *, meter: Meter,
               writer: MetricsWriter, lr: optax.Schedule, batch_size: int, bar: Any,
               saver: ckpt.RunCheckpoints) -> None:
    """Fetches the pending per-step metrics (a host sync), stops on a non-finite loss, logs their mean."""
    if not pending:
        return
    fetched = jax.device_get([m for _, m in pending])
    for (s, _), m in zip(pending, fetched):
        if not np.isfinite(m["loss"]):
            raise NonFiniteLossError(f"non-finite training loss ({m['loss']}) at step {s} (0-based; the batch of "
                                     f"that step); stopping. {saver.last_good()}")
    loss = float(np.mean([m["loss"] for m in fetched]))
    acc = float(np.sum([m["correct"] for m in fetched]) / (len(fetched) * batch_size))
    ips = meter.interval_rate()
    writer.write(split="train", step=step_done, loss=loss, accuracy=acc, images_per_sec=ips,
                 learning_rate=float(lr(step_done - 1)))
    if bar is not None:
        bar.set_postfix(loss=f"{loss:.3f}", acc=f"{acc:.3f}", img_s=f"{ips:.0f}")


def _record_start(workdir: str, config: Any, *, start: int, resumed: bool,
                  changes: dict[str, tuple[Any, Any]], passed_over: list[int], metrics_path: str) -> None:
    """The writes of a (re)start, each atomic: metrics beyond ``start`` dropped, ``config.json`` and one
    ``config_history.jsonl`` record (the step, the changed fields, the checkpoints passed over)."""
    dropped = _truncate_metrics(metrics_path, start)
    if dropped:
        log.info("dropped %d metrics record(s) logged after step %d (the step resumed from)", dropped, start)
    if changes:
        log.warning("resuming %s at step %d with changed loop settings: %s", workdir, start,
                    ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in sorted(changes.items())))
    ckpt.atomic_write(os.path.join(workdir, "config.json"), config.to_json())
    history = os.path.join(workdir, "config_history.jsonl")
    previous = ""
    if os.path.isfile(history):
        with open(history) as f:
            previous = f.read()
    if previous and not previous.endswith("\n"):
        previous = previous[:previous.rfind("\n") + 1]  # a partly written last line
    record = {"start_step": start, "resumed": resumed, "changed": {k: list(v) for k, v in sorted(changes.items())},
              "passed_over_checkpoints": passed_over}
    ckpt.atomic_write(history, previous + json.dumps(record, sort_keys=True) + "\n")


# --------------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------------

def train_and_evaluate(config: Config, workdir: str, *, strict_checkpoints: bool = False) -> dict[str, Any]:
    """Trains ``config`` in ``workdir`` (resuming from its newest good checkpoint) and returns the final summary.

    Writes ``workdir/config.json``, ``config_history.jsonl`` (one record per start, with the changed fields),
    ``metrics.jsonl`` (train/eval/summary records), ``checkpoints/`` (orbax, one ``SHA256SUMS.json`` per step)
    and, when ``cam_images > 0``, ``cam.png``.

    Everything that can refuse a run happens before anything is written: the config checks, the data
    (:class:`train.data.DataError`), the comparison with the stored config (:class:`ResumeError`: only
    ``RESUMABLE_FIELDS`` may change, and ``num_steps`` not below the checkpoint's step) and the choice of the
    checkpoint. A corrupt newest checkpoint (checksum mismatch, a file orbax cannot read, an empty folder) is
    reported with a warning naming the step and the file, moved to ``workdir/corrupt_checkpoints/`` and the run
    resumes from the newest checkpoint that restores cleanly; with ``strict_checkpoints`` it raises
    :class:`train.checkpoints.CheckpointError` instead. Raises :class:`NonFiniteLossError` if the loss becomes
    NaN/inf (the message names the newest checkpoint whose checksum verifies).

    Example:
        >>> summary = train_and_evaluate(Config(num_steps=20, progress=False), "/tmp/run")  # doctest: +SKIP
        >>> summary["val_accuracy"]  # doctest: +SKIP
    """
    import orbax.checkpoint as ocp

    check_config(config)
    train_ds, val_ds = data_lib.load_dataset(config)
    if len(train_ds) < config.batch_size:
        raise data_lib.DataError(f"batch_size {config.batch_size} is larger than the training set "
                                 f"({len(train_ds)} images)")
    stored = _read_stored_config(workdir)  # every process: they must all refuse, or all go on
    changes = check_resume(stored, config, workdir)
    ckpt_root = os.path.abspath(os.path.join(workdir, "checkpoints"))
    newest = ckpt.newest_candidate_step(ckpt_root)  # cheap, before anything compiles
    if newest is not None and config.num_steps < newest:
        raise _num_steps_error(config, newest, workdir)

    fns = get_functions(config, num_classes=len(train_ds.class_names), in_chans=train_ds.images.shape[-1])
    state = fns.init()
    mngr = checkpoint_manager(workdir, config.keep_checkpoints) if os.path.isdir(ckpt_root) else None
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state.as_dict())

    def restore(s: int) -> TrainState:
        assert mngr is not None  # only called for a checkpoint found under ckpt_root, which then exists
        return TrainState.from_dict(mngr.restore(s, args=ocp.args.StandardRestore(abstract)))

    restored, restored_step, bad = ckpt.restore_newest_good(ckpt_root, restore, fallback=not strict_checkpoints)
    if restored is not None:
        state = restored
    start = int(jax.device_get(state.step))
    if restored_step is not None and start != restored_step:
        raise ckpt.CheckpointError(f"checkpoint step {restored_step} in {ckpt_root} holds the state of step {start}")
    if config.num_steps < start:
        raise _num_steps_error(config, start, workdir)

    # ---------------- nothing was written up to here; from here on the run owns the workdir ----------------
    os.makedirs(workdir, exist_ok=True)
    moved = ckpt.move_aside(workdir, ckpt_root, [s for s, _ in bad])
    if moved:
        log.warning("moved the corrupt checkpoint(s) to %s", ", ".join(moved))
    if mngr is not None and bad:  # orbax caches the step list: reopen it without the moved steps
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

    bar = None
    if config.progress and jax.process_index() == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.num_steps, initial=start, desc=f"{config.model}+{config.attn}", unit="step",
                   dynamic_ncols=True)

    saver = ckpt.RunCheckpoints(mngr, ckpt_root)
    lr = learning_rate_schedule(config)
    meter = Meter(config.batch_size)
    pending: list[tuple[int, dict[str, jax.Array]]] = []  # per-step metrics still on the device
    try:
        for step, x, y in data_lib.device_batches(train_ds, batch_size=config.batch_size, seed=config.seed,
                                                  start_step=start, num_steps=config.num_steps,
                                                  sharding=fns.batch_sharding, prefetch=config.prefetch):
            state, metrics = fns.train_step(state, x, y)
            pending.append((step, metrics))
            meter.step_done(metrics)
            done = step + 1
            if bar is not None:
                bar.update(1)
            saver.poll()  # orbax finished the previous save: checksum it right away
            is_last = done == config.num_steps
            want_ckpt = is_last or (config.checkpoint_every and done % config.checkpoint_every == 0)
            want_eval = config.eval_every and done % config.eval_every == 0 and not is_last
            if done % config.log_every == 0 or want_ckpt or want_eval or is_last:
                # metrics are checked before every checkpoint: a checkpoint never holds a non-finite state
                _log_train(pending, done, meter=meter, writer=writer, lr=lr, batch_size=config.batch_size,
                           bar=bar, saver=saver)
                pending = []
            if want_eval:
                t0 = time.perf_counter()
                writer.write(split="eval", step=done, **evaluate(fns, state, val_ds, config.batch_size))
                meter.exclude(time.perf_counter() - t0)
            if want_ckpt:
                saver.save(done, state.as_dict())
    finally:
        # an interrupted run (Ctrl-C, an exception) still finishes the checkpoint being written
        saver.finish()
        if bar is not None:
            bar.close()
    meter.stop()
    if mngr.latest_step() != config.num_steps and start < config.num_steps:
        raise RuntimeError(f"final checkpoint missing (latest {mngr.latest_step()})")

    # ---------------- final evaluation, CAMs, summary ----------------
    ev = evaluate(fns, state, val_ds, config.batch_size)
    summary: dict[str, Any] = {
        "model": config.model, "attn": config.attn, "dataset": config.dataset, "steps": config.num_steps,
        "resumed_from": start, "val_loss": ev["loss"], "val_accuracy": ev["accuracy"],
        "params": count_params(state.params),
        "images_per_sec": meter.images_per_sec(),
        "compile_seconds": meter.compile_seconds, "devices": jax.device_count(),
        "processes": jax.process_count(),
    }
    num_true = len(val_ds) if val_ds.boxes is not None else 0
    num_pred = min(config.cam_images, len(val_ds))
    if num_true or num_pred:
        cams = compute_cams(fns, state, val_ds, config.batch_size, num_true=num_true, num_pred=num_pred)
        if num_true:
            assert val_ds.boxes is not None  # num_true > 0 only with boxes
            summary.update(localisation_scores(cams["cam_true"], val_ds.boxes))
        if num_pred and jax.process_index() == 0:
            k = num_pred
            summary["cam_figure"] = save_cam_grid(
                os.path.join(workdir, "cam.png"), [(f"{config.model}+{config.attn}", cams["cam_pred"], cams["pred"])],
                val_ds.images[:k], val_ds.labels[:k], val_ds.class_names,
                None if val_ds.boxes is None else val_ds.boxes[:k])
            np.savez_compressed(os.path.join(workdir, "cams.npz"), cam_pred=cams["cam_pred"], pred=cams["pred"])
    if not meter.trained:  # nothing left to train: keep the throughput measured by the run that trained
        previous = _last_summary(writer.path)
        summary["images_per_sec"] = previous.get("images_per_sec")
        summary["compile_seconds"] = previous.get("compile_seconds")
    writer.write(split="summary", step=config.num_steps, **summary)
    mngr.close()
    return summary
