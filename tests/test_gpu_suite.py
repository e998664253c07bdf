"""The GPU benchmark suite (benchmarks/gpu.sh -> benchmarks/gpu_suite.py) in its CPU-sized form.

The suite is meant for an accelerator; on the CPU backend it picks tiny shapes (``--size cpu-small``) so
that the code path of every part is exercised here. Timings are not checked (a shared CI machine), only that
every row is produced, finite and positive, and that the table and the JSON agree.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import gpu_suite  # noqa: E402


def _check_rows(rows, expected_names, dtypes):
    assert [(r.name, r.dtype) for r in rows] == [(n, d) for d in dtypes for n in expected_names]
    for r in rows:
        assert math.isfinite(r.ms) and r.ms > 0, r
        assert math.isfinite(r.compile_s) and r.compile_s > 0, r
        assert r.per_s > 0, r


def test_blocks_cpu_small(tmp_path, capsys):
    out = tmp_path / "rows.json"
    rows = gpu_suite.main(["--parts", "blocks", "--repeats", "1", "--json", str(out)])  # size auto: CPU -> small
    _check_rows(rows, ["SE forward", "SE fwd+bwd", "CBAM forward", "CBAM fwd+bwd"], ["float32", "bfloat16"])
    printed = capsys.readouterr().out
    assert "size cpu-small" in printed
    assert printed.count("| blocks ") == 8
    data = json.loads(out.read_text())
    assert data["size"] == "cpu-small" and data["backend"] == "cpu"
    assert [r["name"] for r in data["rows"]] == [r.name for r in rows]
    assert all(r["shape"] == "2x8x8x32" for r in data["rows"])


def test_bad_arguments_are_named(capsys):
    with pytest.raises(SystemExit):
        gpu_suite.main(["--parts", "blocks,nope"])
    assert "nope" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gpu_suite.main(["--dtypes", "float16"])
    assert "float16" in capsys.readouterr().err


def test_gpu_sh_runs_the_driver():
    script = os.path.join(ROOT, "benchmarks", "gpu.sh")
    assert os.access(script, os.X_OK)
    res = subprocess.run(["bash", script, "--help"], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHON=sys.executable))
    assert res.returncode == 0, res.stderr
    assert "--cpu-small" in res.stdout and "--parts" in res.stdout


@pytest.mark.slow
def test_cam_models_train_cpu_small():
    """The other three parts, float32 (the compiles of a ResNet-50-free tiny suite: ~1 min on 2 idle cores)."""
    rows = gpu_suite.main(["--cpu-small", "--parts", "cam,models,train", "--dtypes", "float32", "--repeats", "1"])
    _check_rows(rows, ["GradCAM resnet18 layer4, 5 targets", "resnet18 inference", "cbam_resnet18 inference",
                       "ResNet-18 + CBAM (official) train step, width 8"], ["float32"])


def test_xla_flag_defaults_never_override_the_user(monkeypatch):
    """train/xla_flags.py (imported first by ``python -m train`` and the benchmarks) adds its defaults only
    for flags the user's XLA_FLAGS does not name, and not at all with FLAX_ATTN_NO_XLA_DEFAULTS=1."""
    import train.xla_flags as xf

    monkeypatch.setattr(xf, "DEFAULT_FLAGS", {"--xla_a": "1", "--xla_b": "x"})
    env = {"XLA_FLAGS": "--xla_b=user --other"}
    assert xf.apply_defaults(env) == "--xla_b=user --other --xla_a=1"
    assert env["XLA_FLAGS"] == "--xla_b=user --other --xla_a=1"
    assert xf.apply_defaults({}) == "--xla_a=1 --xla_b=x"
    assert xf.apply_defaults({"FLAX_ATTN_NO_XLA_DEFAULTS": "1"}) == ""
    env = {"XLA_FLAGS": "--xla_a=1 --xla_b=x"}
    assert xf.apply_defaults(env) == "--xla_a=1 --xla_b=x"  # idempotent


def test_malloc_tuning_respects_the_user_and_the_platform(monkeypatch):
    """train/xla_flags.tune_malloc applies its glibc settings (two arenas, no mmap, no trimming) unless the
    user opted out or set glibc's own MALLOC_* variable for that setting; on other C libraries it does nothing."""
    import ctypes
    import sys

    import train.xla_flags as xf

    calls: list[tuple[int, int]] = []

    class FakeLibc:
        class mallopt:  # stands in for the C function
            argtypes = restype = None

            def __new__(cls, param, value):
                calls.append((param, value))
                return 1

    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(ctypes, "CDLL", lambda name: FakeLibc)
    assert xf.tune_malloc({}) == ["M_ARENA_MAX", "M_MMAP_MAX", "M_TRIM_THRESHOLD"]
    assert calls == [(-8, 2), (-4, 0), (-1, -1)]
    calls.clear()
    assert xf.tune_malloc({"MALLOC_ARENA_MAX": "4"}) == ["M_MMAP_MAX", "M_TRIM_THRESHOLD"]
    assert (-8, 2) not in calls
    calls.clear()
    assert xf.tune_malloc({"FLAX_ATTN_NO_MALLOC_TUNING": "1"}) == [] and calls == []
    monkeypatch.setattr(sys, "platform", "darwin")
    assert xf.tune_malloc({}) == [] and calls == []


def test_malloc_tuning_takes_effect_in_a_fresh_process():
    """``import train`` applies the allocator settings first thing in a fresh process (before JAX, orbax or
    tensorstore start threads), and not with FLAX_ATTN_NO_MALLOC_TUNING=1. (Their effect, no page faults per
    training step, is measured by ``benchmarks/bench_train.py --xla-variants``: a fault count depends on which
    thread allocates, so it is not asserted here.)"""
    import os
    import subprocess
    import sys

    code = "import train, train.xla_flags as xf\nprint(xf.JAX_WAS_IMPORTED, ','.join(xf.MALLOC_APPLIED))\n"

    def run(**env: str) -> tuple[str, str]:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env=dict(os.environ, **env)).stdout.split()
        return out[0], (out[1] if len(out) > 1 else "")

    jax_first, applied = run()
    assert jax_first == "False"  # train/__init__ imports the defaults before anything imports JAX
    if sys.platform.startswith("linux"):
        assert applied == "M_ARENA_MAX,M_MMAP_MAX,M_TRIM_THRESHOLD"
    else:  # glibc settings: Linux only, elsewhere nothing is applied
        assert applied == ""
    assert run(FLAX_ATTN_NO_MALLOC_TUNING="1")[1] == ""
    assert run(MALLOC_ARENA_MAX="4")[1] == ("M_MMAP_MAX,M_TRIM_THRESHOLD" if sys.platform.startswith("linux") else "")
