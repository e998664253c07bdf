"""Command line of the training application.

    python -m train                      # the main job: ResNet vs +SE vs +CBAM on cluttered digits
    python -m train main [--field ...]   # the same, with any Config field changed
    python -m train run --workdir DIR [--field ...]   # one run (resumes from DIR's latest checkpoint)
    python -m train detect [--field ...] # YOLOv5 without attention vs CBAM on digit scenes (train/detect.py)

Multi-host: set JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES and JAX_PROCESS_ID (or run under
SLURM / Open MPI with --distributed) on every host; each process then feeds its share of the global batch.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

import train.xla_flags  # noqa: F401  (XLA:CPU defaults, set unless the user set them; before any JAX backend)
from train.config import Config, add_config_arguments, config_from_args


def _maybe_initialize_distributed(force: bool) -> None:
    """``jax.distributed.initialize`` from the environment (before any other JAX call)."""
    if not (force or os.environ.get("JAX_COORDINATOR_ADDRESS")):
        return
    import jax

    kw: dict[str, Any] = {}
    if os.environ.get("JAX_NUM_PROCESSES"):
        kw["num_processes"] = int(os.environ["JAX_NUM_PROCESSES"])
    if os.environ.get("JAX_PROCESS_ID"):
        kw["process_id"] = int(os.environ["JAX_PROCESS_ID"])
    jax.distributed.initialize(**kw)


STRICT_HELP = ("stop on a corrupt newest checkpoint instead of resuming from the newest one that restores "
               "cleanly (the default, with a warning)")


class _StderrHandler(logging.StreamHandler):
    """A stream handler on whatever ``sys.stderr`` is at the time of each record."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _setup_logging() -> None:
    """Messages of the ``train`` logger (data, resume, checkpoints) on stderr, one line each, prefixed."""
    logger = logging.getLogger("train")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def build_parser() -> argparse.ArgumentParser:
    from train.main_job import MAIN_JOB_ATTNS, MAIN_JOB_CONFIG

    parser = argparse.ArgumentParser(prog="python -m train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    subparsers: dict[str, argparse.ArgumentParser] = {}
    parser.subparsers = subparsers  # type: ignore[attr-defined]  # ad-hoc attribute, read back by main()
    main = sub.add_parser("main", help="the main job (default): baseline vs SE vs CBAM, one table",
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    main.add_argument("--workdir", default="runs/main", help="output folder (one sub-folder per model)")
    main.add_argument("--attns", default=",".join(MAIN_JOB_ATTNS), help="comma-separated attention blocks")
    main.add_argument("--distributed", action="store_true", help="jax.distributed.initialize() (auto-detect)")
    main.add_argument("--strict_checkpoints", action="store_true", help=STRICT_HELP)
    add_config_arguments(main, MAIN_JOB_CONFIG)
    subparsers["main"] = main
    run = sub.add_parser("run", help="one training run", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    run.add_argument("--workdir", required=True, help="output folder; an existing run there is resumed")
    run.add_argument("--distributed", action="store_true", help="jax.distributed.initialize() (auto-detect)")
    run.add_argument("--strict_checkpoints", action="store_true", help=STRICT_HELP)
    add_config_arguments(run, Config())
    subparsers["run"] = run
    from train.detect import DEMO_ATTNS, DEMO_CONFIG, add_detect_arguments

    det = sub.add_parser("detect", help="YOLOv5 detection: one run per attention block, one table",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    det.add_argument("--workdir", default="runs/detect", help="output folder (one sub-folder per model)")
    det.add_argument("--attns", default=",".join(DEMO_ATTNS), help="comma-separated attention blocks")
    det.add_argument("--distributed", action="store_true", help="jax.distributed.initialize() (auto-detect)")
    det.add_argument("--strict_checkpoints", action="store_true", help=STRICT_HELP)
    add_detect_arguments(det, DEMO_CONFIG)
    subparsers["detect"] = det
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["main", *argv]
    args = parser.parse_args(argv)
    parser = parser.subparsers[args.command]  # type: ignore[attr-defined]  # set by build_parser()
    if args.command == "detect":
        return _detect(parser, args)
    try:
        config = config_from_args(args)
    except (ValueError, TypeError) as e:
        parser.error(str(e))
    _maybe_initialize_distributed(args.distributed)
    _setup_logging()
    from train.checkpoints import CheckpointError
    from train.data import DataError
    from train.train import NonFiniteLossError, ResumeError, check_config

    try:
        check_config(config)
        if args.command == "main":
            attns = [a.strip() for a in args.attns.split(",") if a.strip()]
            for a in attns:
                check_config(config.replace(attn=a))
    except (ValueError, FileNotFoundError) as e:  # names, data folder, batch vs devices: one line, rc 2
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    try:
        if args.command == "run":
            from train.train import train_and_evaluate

            summary = train_and_evaluate(config, args.workdir, strict_checkpoints=args.strict_checkpoints)
            print(json.dumps(summary, indent=2))
        else:
            from train.main_job import run_main_job

            run_main_job(config, args.workdir, attns, strict_checkpoints=args.strict_checkpoints)
    except (DataError, ResumeError, CheckpointError) as e:  # bad input found before training: one line, rc 2
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    return 0


def _detect(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """``python -m train detect``: the same error handling as the main job (bad input: one line, rc 2)."""
    from train.detect import check_detect_config, detect_config_from_args, run_detect_demo

    try:
        config = detect_config_from_args(args)
    except (ValueError, TypeError) as e:
        parser.error(str(e))
    _maybe_initialize_distributed(args.distributed)
    _setup_logging()
    from train.checkpoints import CheckpointError
    from train.data import DataError
    from train.train import NonFiniteLossError, ResumeError

    attns = [a.strip() for a in args.attns.split(",") if a.strip()]
    try:
        for a in attns:
            check_detect_config(config.replace(attn=a))
    except (ValueError, FileNotFoundError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    try:
        run_detect_demo(config, args.workdir, attns, strict_checkpoints=args.strict_checkpoints)
    except (DataError, ResumeError, CheckpointError, FileNotFoundError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
