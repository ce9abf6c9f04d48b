"""Atomic writes and confined paths.

Everything `adapt` writes that a later step trusts (records, reports, manifests, exports) is written
to a temporary sibling and renamed into place, so a killed process never leaves a file or folder
that looks complete. Paths read from data files are resolved inside their declared root, so a
dataset row cannot make us read `../../etc/passwd` or follow a symlink out of the root.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from adapt.errors import AdaptError

PARTIAL_SUFFIX = ".partial"


def _partial_prefix(path: Path) -> str:
    """`.NAME.adapt-PID-`: hidden, and naming the process that owns it, so a later run can tell a
    partial left by a killed run (owner gone) from one a live run is still writing."""
    return f".{path.name}.adapt-{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_partials(path: str | Path) -> list[Path]:
    """Delete the hidden partial files/folders that killed adapt runs left beside `path`.

    Only names adapt itself creates (`.NAME.adapt-PID-*.partial`) whose process is gone are removed;
    anything else in the folder is never touched. Returns what was removed.
    """
    path = Path(path)
    removed = []
    pattern = re.compile(re.escape(f".{path.name}.adapt-") + r"(\d+)-[^/]*" + re.escape(PARTIAL_SUFFIX))
    for candidate in path.parent.glob(f".{glob.escape(path.name)}.adapt-*{PARTIAL_SUFFIX}") if path.parent.is_dir() else ():
        match = pattern.fullmatch(candidate.name)
        if not match or _alive(int(match.group(1))):
            continue
        if candidate.is_dir() and not candidate.is_symlink():
            shutil.rmtree(candidate, ignore_errors=True)
        else:
            candidate.unlink(missing_ok=True)
        removed.append(candidate)
    return removed


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator:
    """Open a temp file beside `path`; on clean exit fsync and rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(path)
    fd, tmp = tempfile.mkstemp(prefix=_partial_prefix(path), suffix=PARTIAL_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_write(path) as handle:
        handle.write(text)


@contextlib.contextmanager
def atomic_dir(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp folder beside `path`; on clean exit it becomes `path` in one rename."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise AdaptError("output folder already exists", path=path,
                         hint="choose another --out / --output, or pass --overwrite")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(path)
    tmp = Path(tempfile.mkdtemp(prefix=_partial_prefix(path), suffix=PARTIAL_SUFFIX, dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f"{_partial_prefix(path)}old{PARTIAL_SUFFIX}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _short(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else f"{text[:limit // 2]}...{text[-limit // 2:]} ({len(text)} characters)"


def resolve_inside(root: str | Path, relative: str | Path) -> Path:
    """Resolve `relative` against `root` (symlinks followed) and refuse anything that lands outside."""
    if "\x00" in str(relative):
        raise AdaptError(f"path {str(relative)!r} contains a NUL byte", hint="fix the path in the data file")
    root_resolved = Path(root).resolve()
    rel = Path(relative)
    if rel.is_absolute():
        raise AdaptError(f"absolute path {str(relative)!r} is not allowed in data files",
                         hint=f"write paths relative to the data root {root_resolved}")
    try:
        target = (root_resolved / rel).resolve()
        target.stat()
    except FileNotFoundError:
        pass  # a missing file is the caller's (counted) problem
    except (OSError, RuntimeError) as err:  # symlink loop, name too long, not a directory, no permission
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise AdaptError(f"path {_short(str(relative))!r} cannot be used: {reason}",
                         hint="fix the path in the data file") from None
    if target != root_resolved and root_resolved not in target.parents:
        raise AdaptError(f"path {str(relative)!r} escapes the data root {root_resolved}",
                         hint="keep images inside the dataset root (no '..', no symlinks pointing out)")
    return target


class PathMemo:
    """`resolve_inside` and the file checks of one pass over a dataset, each done once per distinct
    path: a pool names a few thousand image files in a million rows, and resolving each row's paths
    (a realpath walk, then a stat) was most of a row's cost (measured: 70% of the general formatter's
    CPU on a 64-image pool). A failed resolution is remembered too and raised again for every row."""

    def __init__(self) -> None:
        self._resolved: dict[tuple[str, str], Path | AdaptError] = {}
        self._kinds: dict[Path, tuple[bool, bool]] = {}

    def resolve(self, root: str | Path, relative: str) -> Path:
        key = (str(root), relative)
        if key not in self._resolved:
            try:
                self._resolved[key] = resolve_inside(root, relative)
            except AdaptError as err:
                self._resolved[key] = err
        found = self._resolved[key]
        if isinstance(found, AdaptError):
            raise found
        return found

    def _kind(self, path: Path) -> tuple[bool, bool]:
        if path not in self._kinds:
            self._kinds[path] = (path.exists(), path.is_file())
        return self._kinds[path]

    def exists(self, path: Path) -> bool:
        return self._kind(path)[0]

    def is_file(self, path: Path) -> bool:
        return self._kind(path)[1]
