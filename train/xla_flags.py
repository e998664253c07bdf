"""Process defaults of the training application and the benchmarks, set only where the user has not: XLA:CPU
flags and the C allocator's settings.

Imported first thing by ``python -m train`` and the benchmarks (before JAX initialises its backend: XLA reads
``XLA_FLAGS`` once, and the allocator settings must precede the backend's threads).
"""

from __future__ import annotations

import ctypes
import os
import sys

#: flags added to ``XLA_FLAGS`` unless the user's ``XLA_FLAGS`` already names them (measured in
#: benchmarks/RESULTS.md, issue #13 section, "3. XLA:CPU options side by side"). Empty: no candidate has
#: yet shown a gain on a quiet machine (oneDNN and "no YNN dot" looked 1.24x faster under load, 3 samples).
DEFAULT_FLAGS: dict[str, str] = {}


def apply_defaults(environ: dict[str, str] | None = None) -> str:
    """Adds :data:`DEFAULT_FLAGS` to ``environ["XLA_FLAGS"]`` (default ``os.environ``) for every flag the
    user has not set, and returns the resulting value. ``FLAX_ATTN_NO_XLA_DEFAULTS=1`` disables it."""
    env = os.environ if environ is None else environ
    current = env.get("XLA_FLAGS", "")
    if env.get("FLAX_ATTN_NO_XLA_DEFAULTS", "") not in ("", "0"):
        return current
    named = {tok.split("=", 1)[0] for tok in current.split()}
    extra = [f"{k}={v}" for k, v in DEFAULT_FLAGS.items() if k not in named]
    if extra:
        env["XLA_FLAGS"] = " ".join([current, *extra]).strip()
    return env.get("XLA_FLAGS", "")


#: glibc ``mallopt`` settings of :func:`tune_malloc`: parameter -> (``mallopt`` number, value, the glibc
#: environment variable that, when the user sets it, takes precedence).
MALLOC_SETTINGS: dict[str, tuple[int, int, str]] = {
    # two arenas (the sbrk heap and one mmapped heap for all other threads): with one per thread the heaps are
    # many and small; with a single one XLA's multi-threaded compiler waits on its lock (compiles 1.25x slower)
    "M_ARENA_MAX": (-8, 2, "MALLOC_ARENA_MAX"),
    "M_MMAP_MAX": (-4, 0, "MALLOC_MMAP_MAX_"),  # large blocks from the heap too, never a fresh mmap
    "M_TRIM_THRESHOLD": (-1, -1, "MALLOC_TRIM_THRESHOLD_"),  # -1: never give freed memory back to the OS
}


def tune_malloc(environ: dict[str, str] | None = None) -> list[str]:
    """Keeps the memory of freed XLA:CPU buffers in the process (glibc ``mallopt``), and returns the names of
    the settings applied (empty where none was: not glibc, ``FLAX_ATTN_NO_MALLOC_TUNING=1``, or the user set
    all of them through glibc's own ``MALLOC_*`` environment variables).

    Why: XLA:CPU allocates its temporaries afresh on every execution. With glibc's defaults every block
    above the (dynamic) mmap threshold and every per-thread arena is mmapped and given back on free, so each
    training step page-faults its whole working set in again: ~77,000 minor faults (~300 MB of zeroed
    pages) per ResNet-18 + CBAM step at 64x64, batch 64. With two arenas, no mmap and no trimming that step
    takes no fault after its first run and is ~1.2x faster (benchmarks/RESULTS.md, issue #13 section). Limit:
    a temporary larger than the second arena's heap (64 MB) allocated by an XLA worker thread is still a fresh
    mmap (at 96x96: 168,000 faults per step instead of 177,000, no measurable gain). The
    cost: the process keeps its peak heap (a freed buffer is reused, not returned), ~1.2-1.35x the peak
    resident memory of that step (1.6-1.8 GB instead of 1.35 GB). Numbers are unaffected.
    """
    env = os.environ if environ is None else environ
    if env.get("FLAX_ATTN_NO_MALLOC_TUNING", "") not in ("", "0") or not sys.platform.startswith("linux"):
        return []
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return []
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return [name for name, (param, value, env_name) in MALLOC_SETTINGS.items()
            if env_name not in env and mallopt(param, value) == 1]


#: whether JAX had been imported before these defaults were set (then XLA_FLAGS may still apply, as long as no
#: backend had started, but JAX's threads may already hold their own malloc arenas)
JAX_WAS_IMPORTED: bool = "jax" in sys.modules
apply_defaults()
#: the allocator settings applied when this module was first imported (see :func:`tune_malloc`)
MALLOC_APPLIED: list[str] = tune_malloc()
