"""User-facing errors and the skip report that every data step fills in.

A user error (bad file, bad row, bad flag) is an `AdaptError`: the CLI prints its message, which
names the file and row and says what to do, and exits with code 2, never with a traceback.
A bad *row* in a dataset is usually not fatal: it is counted in a `Report` with its reason, unless
the run is strict, in which case the first skip becomes an `AdaptError`.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError


class AdaptError(Exception):
    """An error the user can fix; its text names the file/row and the fix."""

    def __init__(self, message: str, *, path: str | Path | None = None, row: int | None = None,
                 hint: str | None = None) -> None:
        self.message, self.path, self.row, self.hint = message, path, row, hint
        super().__init__(str(self))

    def __str__(self) -> str:
        where = ""
        if self.path is not None:
            where = f"{self.path}:{self.row}: " if self.row is not None else f"{self.path}: "
        text = f"{where}{self.message}"
        return f"{text}\n  hint: {self.hint}" if self.hint else text

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled with its parts, so an error raised in a worker process (parallel formatting)
        reaches the parent with its file, row and hint, not as one flattened string."""
        return _rebuild_error, (type(self), self.message, self.path, self.row, self.hint)


def _rebuild_error(cls: type[AdaptError], message: str, path: str | Path | None, row: int | None,
                   hint: str | None) -> AdaptError:
    err = cls.__new__(cls)
    AdaptError.__init__(err, message, path=path, row=row, hint=hint)
    return err


def field_path(value: Any, loc: tuple[int | str, ...], prefix: str = "") -> str:
    """A pydantic error location as the path a user reads (conversations[2].value, train.seed):
    parts that are not keys or indexes of `value` (the names of union branches) are left out."""
    out = prefix
    for part in loc:
        if isinstance(value, list) and isinstance(part, int) and 0 <= part < len(value):
            out, value = f"{out}[{part}]", value[part]
        elif isinstance(value, dict):
            out, value = f"{out}.{part}" if out else str(part), value.get(part)
    return out or "value"


def validation_problems(value: Any, error: ValidationError, prefix: str = "") -> list[str]:
    """One sentence per wrong field of `value`: its path, what was expected and what was found."""
    seen: dict[str, str] = {}
    for item in error.errors(include_url=False):
        where = field_path(value, item["loc"], prefix)
        if where not in seen:  # a union reports each branch; the first says enough
            if item["type"] == "missing":
                shown = "missing"
            elif item["type"] == "extra_forbidden":
                shown = "not an accepted key"
            else:
                shown = f"got {json.dumps(item.get('input'), default=str)[:60]}"
            seen[where] = f"{where}: {item['msg'][0].lower()}{item['msg'][1:]} ({shown})"
    # a union reports its outer branch too (image: not a string) when the list branch found the real fault
    return [text for where, text in seen.items()
            if not any(other.startswith((f"{where}[", f"{where}.")) for other in seen)]


def validation_error(error: ValidationError, value: Any, *, path: str | Path | None = None, prefix: str = "",
                     hint: str | None = None) -> AdaptError:
    """A pydantic ValidationError as the user error the CLI prints (file, key path, accepted values)."""
    return AdaptError("; ".join(validation_problems(value, error, prefix)), path=path, hint=hint)


@dataclass
class Skip:
    reason: str
    path: str | None = None
    row: int | None = None
    id: str | None = None

    def __str__(self) -> str:
        where = f"{self.path}:{self.row}" if self.row is not None else (self.path or "?")
        ident = f" [{self.id}]" if self.id else ""
        return f"{where}{ident}: {self.reason}"


@dataclass
class Report:
    """Counts what a step read, wrote and skipped (with why), so no sample is lost silently."""

    name: str = ""
    strict: bool = False
    read: int = 0
    written: int = 0
    skips: list[Skip] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    # seconds per step and worker processes used, for benchmarks; not saved, so that report.json
    # describes the data only and is the same bytes for every run over the same input
    timing: dict[str, float] = field(default_factory=dict)

    def skip(self, reason: str, *, path: str | Path | None = None, row: int | None = None,
             id: str | None = None) -> None:
        """Record a skipped row; under `strict` this raises instead."""
        if self.strict:
            raise AdaptError(f"{reason}" + (f" (id {id})" if id else ""), path=path, row=row,
                             hint="fix the row, or run without --strict to skip and count such rows")
        self.skips.append(Skip(reason, str(path) if path is not None else None, row, id))

    def warn(self, message: str) -> None:
        """Something the user must hear although nothing failed (an empty input, a converted image)."""
        if message not in self.warnings:
            self.warnings.append(message)

    @property
    def skipped(self) -> int:
        return len(self.skips)

    def reasons(self) -> Counter:
        """Skip counts per reason, with the variable part (paths, numbers) left in: short lists read best."""
        return Counter(s.reason.split(":")[0] for s in self.skips)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "read": self.read, "written": self.written, "skipped": self.skipped,
            "skip_reasons": dict(self.reasons()), "skips": [str(s) for s in self.skips[:1000]],
            "stats": self.stats, "warnings": self.warnings,
        }

    def summary(self) -> str:
        line = f"{self.name or 'report'}: read {self.read}, wrote {self.written}, skipped {self.skipped}"
        if self.skips:
            line += " (" + ", ".join(f"{k}: {v}" for k, v in self.reasons().most_common(5)) + ")"
        return line

    def save(self, path: str | Path) -> None:
        from adapt.fileio import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, ensure_ascii=False))


def os_error_message(err: OSError) -> str:
    """One line for a failure of the machine rather than of adapt (disk full, name too long, loop)."""
    where = f"{err.filename}: " if err.filename else ""
    advice = {28: " (the disk is full: free space, then run again; nothing incomplete was left in place)"}
    return f"{where}{err.strerror or err}{advice.get(err.errno or 0, '')}"


def save_traceback(command: list[str]) -> Path:
    """Write the current exception's traceback where a user can attach it to a bug report."""
    import os
    import tempfile
    import time
    import traceback

    folder = Path(os.environ.get("ADAPT_CRASH_DIR") or tempfile.gettempdir())
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"adapt-crash-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.txt"
    path.write_text(f"command: adapt {' '.join(command)}\n\n{traceback.format_exc()}", encoding="utf-8")
    return path
