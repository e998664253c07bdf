"""Data parallelism: 8 forced CPU devices, and 2 processes x 2 devices, give the 1-device loss trajectory.

The 8-device run is a subprocess (XLA_FLAGS must be set before JAX starts); the 1-device run is in-process.
BatchNorm statistics over the sharded global batch are what makes the two agree: per-device statistics
(batch 4 per device here) would change every loss, the first included, by far more than the tolerance.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np

from train import Config, train_and_evaluate
from train.checkpoints import verify_checksums

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = dict(model="resnet10", width=4, batch_size=32, num_steps=6, log_every=1, checkpoint_every=0,
            warmup_steps=1, learning_rate=0.1, cam_images=0, progress=False)


def _env(devices, **extra):
    return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
                JAX_DEFAULT_MATMUL_PRECISION="highest", PYTHONPATH=ROOT, **extra)


def _run_cli(args, devices):
    return subprocess.run([sys.executable, "-m", "train", "run", *args], cwd=ROOT, env=_env(devices),
                          capture_output=True, text=True, timeout=600)


def _cli_args(workdir, **overrides):
    out = ["--workdir", str(workdir)]
    for k, v in {**ARGS, **overrides}.items():
        out += [f"--{k}" if v is not False else f"--no-{k}"] + ([] if isinstance(v, bool) else [str(v)])
    return out


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r["loss"] for r in map(json.loads, f) if r["split"] == "train"]


def test_eight_devices_and_two_processes_match_one_device(tmp_path):
    """Same global batch, same seed: (a) one process with 8 devices, (b) two processes with 2 devices each
    (multi-host on one machine: jax.distributed from the environment variables the CLI reads, each process
    feeding half of every global batch) follow the loss trajectory of one device."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "train", "run"]
    eight = subprocess.Popen(cmd + _cli_args(tmp_path / "eight"), cwd=ROOT, env=_env(8), text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    multi = [subprocess.Popen(cmd + _cli_args(tmp_path / "multi"), cwd=ROOT, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE,
                              env=_env(2, JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2",
                                       JAX_PROCESS_ID=str(i))) for i in range(2)]
    one = train_and_evaluate(Config(**ARGS), str(tmp_path / "one"))
    l1 = _losses(tmp_path / "one")
    assert len(l1) == 6 and l1[-1] < l1[0]
    outs = {}
    for name, p in (("eight", eight), ("multi0", multi[0]), ("multi1", multi[1])):
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, f"{name}: {err[-3000:]}"
        outs[name] = out
    s8 = json.loads(outs["eight"][outs["eight"].index("{"):])
    s2 = json.loads(outs["multi0"][outs["multi0"].index("{"):])
    assert one["devices"] == 1 and s8["devices"] == 8
    assert s2["processes"] == 2 and s2["devices"] == 4
    # summation order differs across devices: float32 round-off only
    np.testing.assert_allclose(_losses(tmp_path / "eight"), l1, rtol=2e-5)
    np.testing.assert_allclose(_losses(tmp_path / "multi"), l1, rtol=2e-5)
    np.testing.assert_allclose(s8["val_loss"], one["val_loss"], rtol=1e-4)
    np.testing.assert_allclose(s2["val_loss"], one["val_loss"], rtol=1e-4)
    assert sorted(os.listdir(tmp_path / "multi" / "checkpoints")) == ["6"]
    # the checksum file is written once (process 0) after orbax finished the collective checkpoint
    assert verify_checksums(6, str(tmp_path / "multi" / "checkpoints" / "6"))


def test_batch_not_divisible_by_devices_fails_before_compiling(tmp_path):
    proc = _run_cli(_cli_args(tmp_path / "w", batch_size=12), devices=8)
    assert proc.returncode == 2
    assert "batch_size 12 is not divisible by the number of devices 8" in proc.stderr
    assert not (tmp_path / "w").exists()  # nothing was written, let alone compiled
