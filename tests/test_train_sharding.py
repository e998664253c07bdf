"""Data parallelism: 8 forced CPU devices give the loss trajectory of 1 device for the same global batch.

The 8-device run is a subprocess (XLA_FLAGS must be set before JAX starts); the 1-device run is in-process.
BatchNorm statistics over the sharded global batch are what makes the two agree: per-device statistics
(batch 4 per device here) would change every loss after the first step by far more than the tolerance.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from train import Config, train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = dict(model="resnet10", width=4, batch_size=32, num_steps=6, log_every=1, checkpoint_every=0,
            warmup_steps=1, learning_rate=0.1, cam_images=0, progress=False)


def _env(devices, **extra):
    return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
                JAX_DEFAULT_MATMUL_PRECISION="highest", PYTHONPATH=ROOT, **extra)


def _run_cli(args, devices):
    return subprocess.run([sys.executable, "-m", "train", "run", *args], cwd=ROOT, env=_env(devices),
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("one")
    return train_and_evaluate(Config(**ARGS), str(workdir)), _losses(workdir)


def _cli_args(workdir, **overrides):
    out = ["--workdir", str(workdir)]
    for k, v in {**ARGS, **overrides}.items():
        out += [f"--{k}" if v is not False else f"--no-{k}"] + ([] if isinstance(v, bool) else [str(v)])
    return out


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r["loss"] for r in map(json.loads, f) if r["split"] == "train"]


def test_eight_devices_match_one_device(tmp_path, one_device):
    one, l1 = one_device
    proc = _run_cli(_cli_args(tmp_path / "eight"), devices=8)
    assert proc.returncode == 0, proc.stderr[-3000:]
    eight = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert one["devices"] == 1 and eight["devices"] == 8
    l8 = _losses(tmp_path / "eight")
    assert len(l1) == len(l8) == 6
    assert l1[-1] < l1[0]
    # summation order differs across devices: float32 round-off only
    np.testing.assert_allclose(l8, l1, rtol=2e-5)
    np.testing.assert_allclose(eight["val_loss"], one["val_loss"], rtol=1e-4)


def test_batch_not_divisible_by_devices_fails_before_compiling(tmp_path):
    proc = _run_cli(_cli_args(tmp_path / "w", batch_size=12), devices=8)
    assert proc.returncode == 2
    assert "batch_size 12 is not divisible by the number of devices 8" in proc.stderr
    assert not (tmp_path / "w").exists()  # nothing was written, let alone compiled


@pytest.mark.slow
def test_two_processes_match_one_device(tmp_path, one_device):
    """Multi-host on one machine: two CPU processes with 2 devices each (jax.distributed via the environment
    variables the CLI reads), each feeding half of the global batch, follow the 1-device trajectory."""
    one, l1 = one_device
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, "-m", "train", "run", *_cli_args(tmp_path / "multi")], cwd=ROOT,
                              env=_env(2, JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2",
                                       JAX_PROCESS_ID=str(i)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    summary = json.loads(outs[0][0][outs[0][0].index("{"):])
    assert summary["processes"] == 2 and summary["devices"] == 4
    np.testing.assert_allclose(_losses(tmp_path / "multi"), l1, rtol=2e-5)
    assert sorted(os.listdir(tmp_path / "multi" / "checkpoints")) == ["6"]
