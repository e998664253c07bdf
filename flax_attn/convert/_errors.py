"""The exception and warning of every conversion (no imports from the rest of the package)."""

from __future__ import annotations

from collections.abc import Iterable

#: how many problems a :class:`ConversionError` message lists (all of them are on ``.problems``)
MAX_LISTED = 20


class ConversionError(ValueError):
    """A conversion found problems; ``problems`` lists every one of them.

    Raised once per conversion with *all* the problems found (missing variables, unexpected checkpoint
    keys, shape or dtype mismatches, unsupported layers), never after a partial load: when it is raised
    the target module or variables are unchanged. The message lists the first ``MAX_LISTED`` (20)
    problems and says how many more there are; ``problems`` holds the full list. ``hints`` are diagnoses
    of the whole set (a ``module.`` prefix to strip, a checkpoint of another architecture and the
    registered model it matches); they come first in the message.

    Example:
        >>> err = ConversionError(["missing: fc1.kernel", "unexpected: checkpoint key 'fc.weight'"])
        >>> isinstance(err, ValueError), len(err.problems)
        (True, 2)
    """

    def __init__(self, problems: Iterable[str], *, header: str = "weight conversion failed",
                 hints: Iterable[str] = ()):
        self.problems: list[str] = list(problems)
        self.hints: list[str] = list(hints)
        self.header = header
        n = len(self.problems)
        kinds = _kinds(self.problems) if n > MAX_LISTED else ""
        lines = [f"{header} ({n} problem{'s' * (n != 1)}{kinds}):"]
        lines += [f"  {h}" for h in self.hints]
        lines += [f"  - {p}" for p in self.problems[:MAX_LISTED]]
        if n > MAX_LISTED:
            lines.append(f"  ... and {n - MAX_LISTED} more (all {n} are listed on this exception's .problems)")
        super().__init__("\n".join(lines))

    def with_hints(self, *hints: str) -> ConversionError:
        """A copy of this error with ``hints`` added after the existing ones."""
        return ConversionError(self.problems, header=self.header, hints=[*self.hints, *hints])

    def __reduce__(self):  # picklable (pytest-xdist, multiprocessing) with its problem list intact
        return (_rebuild_conversion_error, (self.problems, self.header, self.hints))


def _kinds(problems: list[str]) -> str:
    """``": 52 missing, 36 unexpected"``: the problems counted by kind (for messages that list only some)."""
    counts: dict[str, int] = {}
    for p in problems:
        kind = next((k for k in ("missing", "unexpected", "shape mismatch", "dtype mismatch") if p.startswith(k)),
                    "other")
        counts[kind] = counts.get(kind, 0) + 1
    return ": " + ", ".join(f"{v} {k}" for k, v in counts.items())


def _rebuild_conversion_error(problems: list[str], header: str, hints: Iterable[str] = ()) -> ConversionError:
    return ConversionError(problems, header=header, hints=hints)


class ConversionWarning(UserWarning):
    """Issued by ``strict=False`` conversions that skipped missing variables or unexpected keys."""
