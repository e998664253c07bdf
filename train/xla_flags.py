"""XLA:CPU defaults of the training application and the benchmarks, set only where the user has not.

Imported first thing by ``python -m train`` (before JAX initialises its backend: XLA reads ``XLA_FLAGS`` once).
"""

from __future__ import annotations

import os

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


apply_defaults()
