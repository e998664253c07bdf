"""Training application: learning, exact resumption, NaN handling, CLI errors, localisation scores.

Every run here is tiny (8x8 digits, a ResNet of width 4, a few dozen steps) so the file runs in well under
a minute of CPU time; the multi-device comparison lives in test_train_sharding.py.
"""

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import train.data as data_lib
from train import Config, NonFiniteLossError, train_and_evaluate
from train.__main__ import main as cli_main
from train.cam import localisation_scores

TINY = Config(model="resnet10", width=4, batch_size=32, num_steps=12, log_every=1, checkpoint_every=4,
              warmup_steps=2, learning_rate=0.1, progress=False, cam_images=0)


def _records(workdir, split="train"):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["split"] == split]


def _restore_raw(workdir, step):
    path = os.path.join(workdir, "checkpoints", str(step), "default")
    return ocp.StandardCheckpointer().restore(path)


def test_loss_decreases_and_model_learns(tmp_path):
    cfg = TINY.replace(num_steps=40, log_every=10, checkpoint_every=0, cam_images=4)
    summary = train_and_evaluate(cfg, str(tmp_path))
    losses = [r["loss"] for r in _records(tmp_path)]
    assert len(losses) == 4
    assert losses[-1] < 0.5 * losses[0], losses
    assert summary["val_accuracy"] > 0.6  # chance is 0.1
    assert summary["params"] > 0 and summary["images_per_sec"] > 0
    assert os.path.isfile(summary["cam_figure"])
    assert _records(tmp_path, "summary")[0]["val_accuracy"] == summary["val_accuracy"]
    assert os.listdir(tmp_path / "checkpoints") == ["40"]  # checkpoint_every=0: the final one only


def test_kill_and_resume_equals_uninterrupted(tmp_path, monkeypatch):
    full = str(tmp_path / "full")
    train_and_evaluate(TINY, full)

    # interrupted between the checkpoints of steps 4 and 8, as if the process were killed after step 6
    real_batches = data_lib.device_batches

    def dying_batches(*args, **kwargs):
        for item in real_batches(*args, **kwargs):
            if item[0] == 6:
                raise KeyboardInterrupt("simulated kill")
            yield item

    part = str(tmp_path / "part")
    monkeypatch.setattr(data_lib, "device_batches", dying_batches)
    with pytest.raises(KeyboardInterrupt):
        train_and_evaluate(TINY, part)
    monkeypatch.setattr(data_lib, "device_batches", real_batches)
    ckpt_dir = os.path.join(part, "checkpoints")
    assert sorted(os.listdir(ckpt_dir)) == ["4"]
    # a half-written checkpoint (orbax writes into a temporary folder, renamed when complete) is ignored
    os.makedirs(os.path.join(ckpt_dir, "8.orbax-checkpoint-tmp", "default"))
    summary = train_and_evaluate(TINY, part)
    assert summary["resumed_from"] == 4

    a, b = _restore_raw(full, 12), _restore_raw(part, 12)
    flat_a, flat_b = jax.tree.leaves_with_path(a), jax.tree.leaves_with_path(b)
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b] and len(flat_a) > 10
    for (path, x), (_, y) in zip(flat_a, flat_b):
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))
    losses_full = {r["step"]: r["loss"] for r in _records(full)}
    losses_part = {r["step"]: r["loss"] for r in _records(part)}
    assert all(losses_part[s] == losses_full[s] for s in range(5, 13))
    # the kept checkpoints are the last keep_checkpoints ones
    assert sorted(int(s) for s in os.listdir(os.path.join(full, "checkpoints"))) == [4, 8, 12]


def test_nan_in_data_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    real_load = data_lib.load_dataset
    cfg = TINY.replace(log_every=5, checkpoint_every=3, num_steps=20)
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
    with pytest.raises(NonFiniteLossError, match=f"at step {nan_step} "):
        train_and_evaluate(cfg, str(tmp_path))
    good = (nan_step // 3) * 3  # the state after `good` steps never saw the poisoned batch
    steps = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit())
    assert steps[-1] == good
    restored = _restore_raw(tmp_path, good)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(restored))
    assert all(np.isfinite(r["loss"]) for r in _records(tmp_path))


@pytest.mark.parametrize("argv, message", [
    (["run", "--workdir", "w", "--model", "resnet999"], "unknown model 'resnet999'"),
    (["run", "--workdir", "w", "--attn", "nope"], "unknown attn 'nope'"),
    (["run", "--workdir", "w", "--dataset", "mnist"], "unknown dataset 'mnist'"),
    (["run", "--workdir", "w", "--dataset", "folder", "--data_dir", "/no/such/folder"], "does not exist"),
    (["run", "--workdir", "w", "--num_steps", "0"], "num_steps must be >= 1"),
    (["run", "--workdir", "w", "--batch_size", "many"], "invalid int value"),
    (["run", "--workdir", "w", "--optimizer", "lion"], "unknown optimizer 'lion'"),
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
    code = cli_main(["run", "--workdir", str(tmp_path / "w"), "--dataset", "folder", "--data_dir",
                     str(tmp_path / "data"), "--image_size", "8", "--in_chans", "1", "--model", "resnet10",
                     "--width", "4", "--batch_size", "8", "--num_steps", "3", "--cam_images", "2",
                     "--no-progress"])
    assert code == 0
    out = capsys.readouterr().out
    assert "skipped 1 unreadable image" in out and "corrupt.jpg" in out
    summary = json.loads(out[out.index("{"):])
    assert summary["steps"] == 3 and os.path.isfile(summary["cam_figure"])


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


def test_bfloat16_compute_keeps_float32_parameters(tmp_path):
    cfg = TINY.replace(num_steps=3, checkpoint_every=0, compute_dtype="bfloat16")
    train_and_evaluate(cfg, str(tmp_path))
    restored = _restore_raw(tmp_path, 3)
    assert {x.dtype for x in jax.tree.leaves(restored["params"])} == {np.dtype("float32")}
    assert all(np.isfinite(r["loss"]) for r in _records(tmp_path))
