"""Checkpoints of a run: orbax for the arrays, a SHA-256 manifest per checkpoint for their integrity.

Orbax (0.12.8) writes each checkpoint into a temporary folder and renames it to ``checkpoints/<step>`` when
complete, so a checkpoint cut short by a kill is never seen; it has no checksum of its own. After orbax has
finished a checkpoint, :func:`write_checksums` stores ``SHA256SUMS.json`` (the SHA-256 and size of every
file of the step folder) inside that folder, written to a temporary name and renamed, so the manifest is
either absent or complete. On restore, :func:`restore_newest_good` verifies the manifest before orbax reads
anything and, by default, falls back to the newest checkpoint that verifies and restores cleanly.

A checkpoint without a manifest (written by an older version, or a run killed in the moment between orbax
finishing and the manifest being written) is restored *unverified*, with a warning: orbax still detects a
truncated or missing file then, but not flipped bytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from typing import Any

import jax

log = logging.getLogger("train")

CHECKSUM_FILE = "SHA256SUMS.json"
CORRUPT_DIR = "corrupt_checkpoints"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the step and the file."""


def atomic_write(path: str, text: str) -> None:
    """Writes ``text`` to ``path`` through a temporary file in the same folder and a rename (never half a file)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def step_dirs(root: str) -> dict[int, str]:
    """``{step: folder}`` of every finished step folder under ``root`` (orbax's temporary folders excluded)."""
    if not os.path.isdir(root):
        return {}
    return {int(e.name): e.path for e in os.scandir(root) if e.is_dir() and e.name.isdigit()}


def _files(step_dir: str) -> list[str]:
    out = []
    for dirpath, _, names in os.walk(step_dir):
        for n in names:
            rel = os.path.relpath(os.path.join(dirpath, n), step_dir)
            if not rel.startswith(CHECKSUM_FILE):
                out.append(rel)
    return sorted(out)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_checksums(step_dir: str) -> None:
    """Stores the SHA-256 and size of every file of a finished checkpoint in ``step_dir/SHA256SUMS.json``."""
    sums = {rel: {"sha256": _sha256(os.path.join(step_dir, rel)), "size": os.path.getsize(os.path.join(step_dir, rel))}
            for rel in _files(step_dir)}
    atomic_write(os.path.join(step_dir, CHECKSUM_FILE), json.dumps({"files": sums}, indent=1, sort_keys=True))


def verify_checksums(step: int, step_dir: str) -> bool:
    """True if the manifest of ``step_dir`` matches its files, False if there is no manifest.

    Raises:
        CheckpointError: naming the step and the first file that is missing, has another size or other bytes
            (or saying that the folder is empty or the manifest unreadable).
    """
    if not _files(step_dir):
        raise CheckpointError(f"checkpoint step {step}: the folder {step_dir} holds no checkpoint files")
    path = os.path.join(step_dir, CHECKSUM_FILE)
    if not os.path.isfile(path):
        return False
    try:
        with open(path) as f:
            sums = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint step {step}: unreadable checksum file {path} ({e})") from None
    for rel, want in sorted(sums.items()):
        p = os.path.join(step_dir, rel)
        if not os.path.isfile(p):
            raise CheckpointError(f"checkpoint step {step}: file {p} is missing")
        size = os.path.getsize(p)
        if size != want["size"]:
            raise CheckpointError(f"checkpoint step {step}: file {p} has {size} bytes, {want['size']} were written")
        if _sha256(p) != want["sha256"]:
            raise CheckpointError(f"checkpoint step {step}: file {p} does not match its SHA-256 checksum "
                                  f"(its bytes changed after it was written)")
    return True


def newest_verified_step(root: str) -> int | None:
    """The newest checkpoint under ``root`` whose manifest verifies (None if there is none)."""
    for step, d in sorted(step_dirs(root).items(), reverse=True):
        try:
            if verify_checksums(step, d):
                return step
        except CheckpointError:
            continue
    return None


def newest_candidate_step(root: str) -> int | None:
    """The newest checkpoint under ``root`` whose manifest verifies or that has none (the one a resume tries
    first, before orbax reads it); None if there is none."""
    for step, d in sorted(step_dirs(root).items(), reverse=True):
        try:
            verify_checksums(step, d)
        except CheckpointError:
            continue
        return step
    return None


def _short(e: BaseException, limit: int = 400) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:limit]}{' ...' if len(text) > limit else ''}"


def restore_newest_good(root: str, restore: Callable[[int], Any], *, fallback: bool = True
                        ) -> tuple[Any, int | None, list[tuple[int, str]]]:
    """Restores the newest checkpoint under ``root`` that verifies and restores cleanly.

    ``restore(step)`` reads one checkpoint (orbax). Returns ``(state, step, bad)`` with ``bad`` the
    ``(step, reason)`` of every newer checkpoint that was passed over; ``(None, None, [])`` if there is none.

    Raises:
        CheckpointError: the newest checkpoint is bad and ``fallback`` is False, or no checkpoint is usable.
    """
    bad: list[tuple[int, str]] = []
    steps = sorted(step_dirs(root).items(), reverse=True)
    for step, d in steps:
        try:
            verified = verify_checksums(step, d)
            try:
                state = restore(step)
            except Exception as e:  # orbax / tensorstore raise many types; all mean "this checkpoint is unusable"
                raise CheckpointError(f"checkpoint step {step} in {d} does not restore: {_short(e)}") from None
        except CheckpointError as e:
            if not fallback:
                raise CheckpointError(f"{e} (strict checkpoints: without --strict_checkpoints the run falls "
                                      f"back to the newest checkpoint that restores cleanly)") from None
            log.warning("%s", e)
            bad.append((step, str(e)))
            continue
        if not verified:
            log.warning("checkpoint step %d has no checksum file (written by an older version, or the run was "
                        "stopped before it was written): restored without verifying its bytes", step)
        if bad:
            log.warning("RESUMING FROM AN OLDER CHECKPOINT: step %d, the newest one that restores cleanly; "
                        "passed over: %s", step, ", ".join(str(s) for s, _ in bad))
        return state, step, bad
    if bad:
        raise CheckpointError(f"no checkpoint in {root} restores cleanly: " + "; ".join(r for _, r in bad) +
                              ". Start a fresh run in another --workdir")
    return None, None, []


def move_aside(workdir: str, root: str, steps: list[int]) -> list[str]:
    """Moves the step folders ``steps`` from ``root`` to ``workdir/corrupt_checkpoints/`` (kept for inspection,
    out of orbax's way so that the resumed run can write those steps again). Returns the new paths."""
    out: list[str] = []
    if not steps:
        return out
    if jax.process_index() == 0:
        dest_root = os.path.join(workdir, CORRUPT_DIR)
        os.makedirs(dest_root, exist_ok=True)
        for step in steps:
            dest, n = os.path.join(dest_root, str(step)), 1
            while os.path.exists(dest):
                dest, n = os.path.join(dest_root, f"{step}.{n}"), n + 1
            shutil.move(os.path.join(root, str(step)), dest)
            out.append(dest)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("train.checkpoints.move_aside")
    return out


class RunCheckpoints:
    """The checkpoints a run writes: orbax saves (asynchronous), then the checksum file of each finished one."""

    def __init__(self, mngr: Any, root: str):
        self.mngr, self.root = mngr, root
        self.unsummed: list[int] = []  # saved steps whose checksum file is not written yet

    def save(self, step: int, tree: Any) -> None:
        import orbax.checkpoint as ocp

        self.finish()
        self.mngr.save(step, args=ocp.args.StandardSave(tree))
        self.unsummed.append(step)

    def poll(self) -> None:
        """Writes the pending checksum files if orbax has finished (never waits)."""
        if self.unsummed and not self.mngr.is_saving_in_progress():
            self.finish()

    def finish(self) -> None:
        """Waits for orbax, then writes the checksum file of each checkpoint it finished (process 0)."""
        self.mngr.wait_until_finished()
        for step in self.unsummed:
            d = os.path.join(self.root, str(step))
            if jax.process_index() == 0 and os.path.isdir(d):
                write_checksums(d)
        self.unsummed.clear()

    def last_good(self) -> str:
        """A sentence naming the newest checkpoint whose checksum verifies (after the pending saves finish)."""
        self.finish()
        good = newest_verified_step(self.root)
        if good is None:
            return f"No checkpoint in {self.root} verifies"
        return f"The last good checkpoint (checksum verified) is step {good} in {self.root}"
