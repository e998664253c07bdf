"""Training application: learning, exact resumption, NaN handling, CLI errors, localisation scores.

Every run here is tiny (8x8 digits, a ResNet of width 4, a few dozen steps) so the file runs in well under
a minute of CPU time; the multi-device comparison lives in test_train_sharding.py.
"""

import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import train.checkpoints as ckpt_lib
import train.data as data_lib
from train import CheckpointError, Config, NonFiniteLossError, ResumeError, train_and_evaluate
from train.__main__ import main as cli_main
from train.cam import localisation_scores

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: most tests share this config's compiled functions (one compile for the file): only num_steps, the model,
#: the data and the optimisation enter the cache key (train.train.get_functions)
TINY = Config(model="resnet10", width=4, batch_size=32, num_steps=24, log_every=1, checkpoint_every=8,
              warmup_steps=2, learning_rate=0.1, progress=False, cam_images=0)


def _records(workdir, split="train"):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["split"] == split]


def _restore_raw(workdir, step):
    path = os.path.join(workdir, "checkpoints", str(step), "default")
    return ocp.StandardCheckpointer().restore(path)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One uninterrupted TINY run (checkpoints 8, 16, 24), shared read-only: tests copy it before touching it."""
    workdir = str(tmp_path_factory.mktemp("finished") / "run")
    summary = train_and_evaluate(TINY, workdir)
    return workdir, summary


def test_loss_decreases_and_model_learns(finished_run):
    workdir, summary = finished_run
    losses = [r["loss"] for r in _records(workdir)]
    assert len(losses) == 24
    assert np.mean(losses[-4:]) < 0.6 * np.mean(losses[:4]), losses
    assert summary["val_accuracy"] > 0.6  # chance is 0.1
    assert summary["params"] > 0 and summary["images_per_sec"] > 0 and summary["compile_seconds"] > 0
    assert _records(workdir, "summary")[0]["val_accuracy"] == summary["val_accuracy"]


@pytest.fixture
def train_log():
    """The records of the ``train`` logger (whatever handlers the CLI installed on it)."""
    records = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    logger = logging.getLogger("train")
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.INFO)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(old)


def _messages(records, level=logging.WARNING):
    return "\n".join(r.getMessage() for r in records if r.levelno >= level)


def _copy(run, dest):
    shutil.copytree(run, dest)
    return str(dest)


def _hashes(root):
    out = {}
    for dirpath, _, names in os.walk(root):
        for n in names:
            p = os.path.join(dirpath, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def _assert_same_state(a, b):
    flat_a, flat_b = jax.tree.leaves_with_path(a), jax.tree.leaves_with_path(b)
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b] and len(flat_a) > 10
    for (path, x), (_, y) in zip(flat_a, flat_b):
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


_KILL_SCRIPT = """
import json, sys, time
sys.path.insert(0, {root!r})
import train.data as data_lib
real = data_lib.device_batches

def slow(*args, **kwargs):  # a step every 0.25 s, so that the kill lands mid-run
    for item in real(*args, **kwargs):
        time.sleep(0.25)
        yield item

data_lib.device_batches = slow
from train import Config, train_and_evaluate
train_and_evaluate(Config.from_dict(json.loads(sys.argv[1])), sys.argv[2])
"""


@pytest.mark.slow  # a second process compiles the step
def test_sigkill_and_resume_equals_uninterrupted(tmp_path, finished_run, train_log):
    finished_run = finished_run[0]
    """A real process killed with SIGKILL mid-run (after checkpoint 8, before 16), then resumed, reaches the
    uninterrupted run's state bit for bit, and metrics.jsonl holds each step once."""
    script = tmp_path / "kill_me.py"
    script.write_text(_KILL_SCRIPT.format(root=ROOT))
    part = str(tmp_path / "part")
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_DEFAULT_MATMUL_PRECISION="highest", PYTHONPATH=ROOT)
    env.pop("XLA_FLAGS", None)
    proc = subprocess.Popen([sys.executable, str(script), TINY.to_json(), part], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    sums = os.path.join(part, "checkpoints", "8", "SHA256SUMS.json")
    deadline = time.monotonic() + 300
    while not os.path.isfile(sums) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, err.decode()[-3000:]
    assert sorted(os.listdir(os.path.join(part, "checkpoints"))) == ["8"]
    logged = [r["step"] for r in _records(part)]
    assert logged and logged[-1] > 8  # steps after the checkpoint were logged: the resume must drop them
    # a half-written checkpoint (orbax writes into a temporary folder, renamed when complete) is ignored
    os.makedirs(os.path.join(part, "checkpoints", "16.orbax-checkpoint-tmp", "default"))

    summary = train_and_evaluate(TINY, part)
    assert summary["resumed_from"] == 8 and summary["steps"] == 24
    assert "restored without verifying" not in _messages(train_log)  # checkpoint 8 had its checksum
    _assert_same_state(_restore_raw(finished_run, 24), _restore_raw(part, 24))
    records = _records(part)
    assert [r["step"] for r in records] == list(range(1, 25))  # each step once, in order
    losses_full = {r["step"]: r["loss"] for r in _records(finished_run)}
    assert all(r["loss"] == losses_full[r["step"]] for r in records)
    assert sorted(int(s) for s in os.listdir(os.path.join(finished_run, "checkpoints"))) == [8, 16, 24]
    for s in (8, 16, 24):
        assert ckpt_lib.verify_checksums(s, os.path.join(finished_run, "checkpoints", str(s)))


def test_resume_with_another_config_is_refused_and_changes_nothing(tmp_path, finished_run, capsys):
    finished_run = finished_run[0]
    work = _copy(finished_run, tmp_path / "w")
    before = _hashes(work)
    with pytest.raises(ResumeError) as e:
        train_and_evaluate(TINY.replace(width=8, dataset="cluttered_digits", image_size=16, cluttered_train=64,
                                        cluttered_val=16, num_steps=20), work)
    msg = str(e.value)
    assert "width 4 -> 8" in msg and "dataset 'digits' -> 'cluttered_digits'" in msg and "another --workdir" in msg
    assert "num_steps" not in msg.split("(only")[0]  # a loop setting is not among the refused fields
    with pytest.raises(ResumeError, match="learning_rate 0.1 -> 0.2"):  # same shapes, other optimisation
        train_and_evaluate(TINY.replace(learning_rate=0.2), work)
    with pytest.raises(ResumeError, match="num_steps 8 is smaller than the step 24 of the checkpoint"):
        train_and_evaluate(TINY.replace(num_steps=8), work)
    assert _hashes(work) == before
    # the CLI: one line, exit code 2, and still nothing written
    with pytest.raises(SystemExit) as e:
        cli_main(["run", "--workdir", work, *_tiny_flags(), "--attn", "se"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "attn 'none' -> 'se'" in err and err.strip().count("\n") == 0, err
    assert _hashes(work) == before


def test_resume_with_changed_loop_settings_is_recorded(tmp_path, finished_run, train_log):
    finished_run = finished_run[0]
    work = _copy(finished_run, tmp_path / "w")
    cfg = TINY.replace(num_steps=24, log_every=3, keep_checkpoints=2)  # nothing left to train: no compile
    summary = train_and_evaluate(cfg, work)
    assert summary["resumed_from"] == 24 and summary["steps"] == 24
    assert "log_every 1 -> 3" in _messages(train_log)
    with open(os.path.join(work, "config.json")) as f:
        assert Config.from_dict(json.load(f)) == cfg
    with open(os.path.join(work, "config_history.jsonl")) as f:
        history = [json.loads(line) for line in f]
    assert history[0] == {"start_step": 0, "resumed": False, "changed": {}, "passed_over_checkpoints": []}
    assert history[1]["start_step"] == 24 and history[1]["changed"] == {"log_every": [1, 3],
                                                                         "keep_checkpoints": [3, 2]}


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _zero(path):
    with open(path, "r+b") as f:
        f.write(b"\0" * os.path.getsize(path))


def _flip(path):
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x10]))


def _largest_data_file(step_dir):
    files = [os.path.join(d, n) for d, _, ns in os.walk(os.path.join(step_dir, "default", "ocdbt.process_0"))
             for n in ns]
    return max(files, key=os.path.getsize)


@pytest.mark.parametrize("damage", ["truncated data file", "zeroed data file", "flipped bytes",
                                    "truncated _METADATA", "empty step folder"])
def test_corrupt_newest_checkpoint_falls_back_to_a_good_one(tmp_path, finished_run, train_log, damage):
    finished_run = finished_run[0]
    work = _copy(finished_run, tmp_path / "w")
    step_dir = os.path.join(work, "checkpoints", "24")
    if damage == "empty step folder":
        shutil.rmtree(step_dir)
        os.makedirs(step_dir)
        culprit = step_dir
    elif damage == "truncated _METADATA":
        culprit = os.path.join(step_dir, "default", "_METADATA")
        _truncate(culprit)
    else:
        culprit = _largest_data_file(step_dir)
        {"truncated data file": _truncate, "zeroed data file": _zero, "flipped bytes": _flip}[damage](culprit)
    before = _hashes(work)
    with pytest.raises(CheckpointError, match="checkpoint step 24") as e:
        train_and_evaluate(TINY, work, strict_checkpoints=True)
    assert culprit in str(e.value) and _hashes(work) == before

    summary = train_and_evaluate(TINY, work)
    warned = _messages(train_log)
    assert "checkpoint step 24" in warned and culprit in warned and "RESUMING FROM AN OLDER CHECKPOINT: step 16" in warned
    assert summary["resumed_from"] == 16
    assert os.path.isdir(os.path.join(work, "corrupt_checkpoints", "24"))
    _assert_same_state(_restore_raw(finished_run, 24), _restore_raw(work, 24))  # retrained from a good state
    assert [r["step"] for r in _records(work)] == list(range(1, 25))


def test_unverified_checkpoint_without_checksum_is_restored_with_a_warning(tmp_path, finished_run, train_log):
    finished_run = finished_run[0]
    work = _copy(finished_run, tmp_path / "w")
    os.remove(os.path.join(work, "checkpoints", "24", "SHA256SUMS.json"))  # as written by an older version
    assert ckpt_lib.newest_verified_step(os.path.join(work, "checkpoints")) == 16
    summary = train_and_evaluate(TINY, work)
    assert summary["resumed_from"] == 24 and "step 24 has no checksum file" in _messages(train_log)


def _tiny_flags():
    return ["--model", "resnet10", "--width", "4", "--batch_size", "32", "--num_steps", "24", "--log_every", "1",
            "--checkpoint_every", "8", "--warmup_steps", "2", "--learning_rate", "0.1", "--no-progress",
            "--cam_images", "0"]


def test_nan_in_data_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    real_load = data_lib.load_dataset
    cfg = TINY.replace(log_every=5, checkpoint_every=3)  # same compiled functions as TINY
    train_ds, _ = real_load(cfg)
    # the first step (>= 4) whose batch holds image `bad`
    bad = int(data_lib.batch_indices(len(train_ds), cfg.batch_size, cfg.seed, 7)[3])
    nan_step = next(s for s in range(cfg.num_steps)
                    if bad in data_lib.batch_indices(len(train_ds), cfg.batch_size, cfg.seed, s))
    assert 4 <= nan_step <= 7

    def poisoned(config):
        tr, va = real_load(config)
        images = tr.images.copy()
        images[bad, 2, 3, 0] = np.nan
        return type(tr)(images, tr.labels, tr.class_names, tr.boxes), va

    monkeypatch.setattr(data_lib, "load_dataset", poisoned)
    with pytest.raises(NonFiniteLossError, match=f"at step {nan_step} ") as e:
        train_and_evaluate(cfg, str(tmp_path))
    good = (nan_step // 3) * 3  # the state after `good` steps never saw the poisoned batch
    steps = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit())
    assert steps[-1] == good
    assert f"last good checkpoint (checksum verified) is step {good} in" in str(e.value)
    assert ckpt_lib.verify_checksums(good, str(tmp_path / "checkpoints" / str(good)))
    restored = _restore_raw(tmp_path, good)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(restored))
    assert all(np.isfinite(r["loss"]) for r in _records(tmp_path))
    # bytes flipped in that checkpoint after the fact: it no longer counts as good
    _flip(_largest_data_file(str(tmp_path / "checkpoints" / str(good))))
    assert ckpt_lib.newest_verified_step(str(tmp_path / "checkpoints")) == (steps[-2] if len(steps) > 1 else None)


@pytest.mark.parametrize("argv, message", [
    (["run", "--workdir", "w", "--model", "resnet999"], "unknown model 'resnet999'"),
    (["run", "--workdir", "w", "--attn", "nope"], "unknown attn 'nope'"),
    (["run", "--workdir", "w", "--dataset", "mnist"], "unknown dataset 'mnist'"),
    (["run", "--workdir", "w", "--dataset", "folder", "--data_dir", "/no/such/folder"], "does not exist"),
    (["run", "--workdir", "w", "--num_steps", "0"], "num_steps must be >= 1"),
    (["run", "--workdir", "w", "--batch_size", "many"], "invalid int value"),
    (["run", "--workdir", "w", "--optimizer", "lion"], "unknown optimizer 'lion'"),
    (["run", "--workdir", "w", "--learning_rate", "nan"], "learning_rate must be a finite number >= 0, got nan"),
    (["run", "--workdir", "w", "--learning_rate", "-0.1"], "learning_rate must be a finite number >= 0"),
    (["run", "--workdir", "w", "--weight_decay", "inf"], "weight_decay must be a finite number >= 0, got inf"),
    (["run", "--workdir", "w", "--momentum", "1.0"], "momentum must be in [0, 1)"),
    (["run", "--workdir", "w", "--step_factor", "0"], "step_factor must be a finite number > 0"),
    (["run", "--workdir", "w", "--val_fraction", "nan"], "val_fraction must be in (0, 1)"),
    (["run", "--model", "resnet18"], "--workdir"),
    (["--no-such-flag"], "unrecognized arguments"),
    (["main", "--attns", "none,bogus"], "unknown attn 'bogus'"),
])
def test_cli_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_help_lists_every_config_field(capsys):
    with pytest.raises(SystemExit):
        cli_main(["run", "--help"])
    out = capsys.readouterr().out
    import dataclasses

    for f in dataclasses.fields(Config):
        assert f"--{f.name}" in out


def test_cli_run_on_an_image_folder(tmp_path, capsys):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        os.makedirs(tmp_path / "data" / c)
        for i in range(10):
            # class a: dark images, class b: bright ones
            arr = rng.integers(0, 100, (9, 7)) + (150 if c == "b" else 0)
            Image.fromarray(arr.astype(np.uint8)).save(tmp_path / "data" / c / f"{i}.png")
    (tmp_path / "data" / "a" / "corrupt.jpg").write_bytes(b"\xff\xd8 truncated")
    flags = ["--dataset", "folder", "--data_dir", str(tmp_path / "data"), "--image_size", "8", "--in_chans", "1",
             "--model", "resnet10", "--width", "4", "--batch_size", "8", "--num_steps", "3", "--cam_images", "2",
             "--no-progress"]
    code = cli_main(["run", "--workdir", str(tmp_path / "w"), *flags])
    assert code == 0
    captured = capsys.readouterr()
    assert "skipped 1 unreadable image" in captured.err and "corrupt.jpg" in captured.err
    summary = json.loads(captured.out)
    assert summary["steps"] == 3 and os.path.isfile(summary["cam_figure"])

    # data errors found before training: one line, exit code 2, nothing written (not even the workdir)
    os.makedirs(tmp_path / "data" / "c")  # an empty class folder: found by the check before loading
    (tmp_path / "data" / "d").mkdir()
    (tmp_path / "data" / "d" / "x.png").write_bytes(b"not a png")  # a class without a readable image
    for argv, message in ((flags, "class folder(s) ['c'] hold no image files"),
                          (flags, "class folder(s) ['d'] hold no readable image"),
                          ([*flags, "--drop_empty_classes", "--batch_size", "64"],
                           "batch_size 64 is larger than the training set")):
        with pytest.raises(SystemExit) as e:
            cli_main(["run", "--workdir", str(tmp_path / "w2"), *argv])
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if "error:" in line]
        assert e.value.code == 2 and len(errors) == 1 and message in errors[0], err  # one line
        assert "Traceback" not in err and all(line.startswith(("WARNING", "python -m train run: error"))
                                              for line in err.splitlines()), err
        if (tmp_path / "data" / "c").exists():
            os.rmdir(tmp_path / "data" / "c")
        assert not (tmp_path / "w2").exists()


def test_localisation_scores():
    cams = np.zeros((3, 6, 5))
    cams[0, 1, 1] = 1.0  # peak inside the box, all energy inside
    cams[1, 5, 4] = 1.0  # peak outside
    cams[1, 2, 2] = 0.5  # a third of the energy inside
    cams[2] = 1.0 + np.arange(30).reshape(6, 5) / 100  # uniform-ish, maximum in the last pixel (outside)
    boxes = np.array([[0, 0, 3, 3]] * 3)
    s = localisation_scores(cams, boxes)
    assert s["pointing_game"] == pytest.approx(1 / 3)
    inside2 = cams[2, :3, :3].sum() / cams[2].sum()
    assert s["energy_in_box"] == pytest.approx((1 + 1 / 3 + inside2) / 3)
    assert s["box_area_fraction"] == pytest.approx(9 / 30)


def test_main_job_table_lists_every_run():
    from train.main_job import format_table

    rows = [dict(model="resnet18", attn="none", val_accuracy=0.8123, pointing_game=0.9, energy_in_box=0.35,
                 params=1234567, images_per_sec=150.4),
            dict(model="resnet18", attn="cbam", val_accuracy=0.8, pointing_game=None, energy_in_box=None,
                 params=1250000, images_per_sec=None)]
    table = format_table(rows).splitlines()
    assert table[0].startswith("| model | val accuracy | pointing game | CAM energy in box | params |")
    assert table[2] == "| resnet18 | 0.812 | 0.900 | 0.350 | 1,234,567 | 150 |"
    assert table[3].startswith("| resnet18 + CBAM (paper eq.") and table[3].endswith(" | 0.800 | n/a | n/a | 1,250,000 | n/a |")


def test_schedules_and_weight_decay_mask():
    from flax import nnx

    from train.models import build_model
    from train.train import decay_mask, learning_rate_schedule

    step = learning_rate_schedule(Config(num_steps=100, warmup_steps=10, learning_rate=0.1, schedule="step",
                                         step_milestones=(0.5, 0.75)))
    for t, want in ((0, 0.0), (5, 0.05), (10, 0.1), (49, 0.1), (50, 0.01), (74, 0.01), (75, 0.001), (99, 0.001)):
        assert float(step(t)) == pytest.approx(want, rel=1e-5, abs=1e-8), t
    cos = learning_rate_schedule(Config(num_steps=100, warmup_steps=10, learning_rate=0.1))
    assert float(cos(10)) == pytest.approx(0.1) and float(cos(55)) == pytest.approx(0.05, rel=1e-4)
    assert float(cos(100)) == pytest.approx(0.0, abs=1e-7)

    model = nnx.eval_shape(lambda: build_model(TINY.replace(attn="cbam_official"), num_classes=10, in_chans=1,
                                               rngs=nnx.Rngs(0)))
    mask = decay_mask(nnx.state(model, nnx.Param))
    flat = {jax.tree_util.keystr(p).removesuffix('.value'): m for p, m in jax.tree.leaves_with_path(mask)}
    decayed = sorted(k for k, m in flat.items() if m)
    assert decayed and all(k.endswith("['kernel']") for k in decayed)  # convs, fc, attention MLPs
    assert not any(m for k, m in flat.items() if k.endswith("['scale']") or k.endswith("['bias']"))
    assert any("bn" in k and k.endswith("['scale']") for k in flat)  # BatchNorm params exist and are skipped


@pytest.mark.slow  # its own compile, in bfloat16 (slow on XLA:CPU)
def test_bfloat16_compute_keeps_float32_parameters(tmp_path):
    cfg = TINY.replace(num_steps=3, checkpoint_every=0, compute_dtype="bfloat16")
    train_and_evaluate(cfg, str(tmp_path))
    restored = _restore_raw(tmp_path, 3)
    assert {x.dtype for x in jax.tree.leaves(restored["params"])} == {np.dtype("float32")}
    assert all(np.isfinite(r["loss"]) for r in _records(tmp_path))
