"""Atomic writes and confined paths.

Everything `adapt` writes that a later step trusts (records, reports, manifests, exports) is written
to a temporary sibling and renamed into place, so a killed process never leaves a file or folder
that looks complete. Paths read from data files are resolved inside their declared root, so a
dataset row cannot make us read `../../etc/passwd` or follow a symlink out of the root.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from adapt.errors import AdaptError


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator:
    """Open a temp file beside `path`; on clean exit fsync and rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
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
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def resolve_inside(root: str | Path, relative: str | Path) -> Path:
    """Resolve `relative` against `root` (symlinks followed) and refuse anything that lands outside."""
    root_resolved = Path(root).resolve()
    rel = Path(relative)
    if rel.is_absolute():
        raise AdaptError(f"absolute path {str(relative)!r} is not allowed in data files",
                         hint=f"write paths relative to the data root {root_resolved}")
    target = (root_resolved / rel).resolve()
    if target != root_resolved and root_resolved not in target.parents:
        raise AdaptError(f"path {str(relative)!r} escapes the data root {root_resolved}",
                         hint="keep images inside the dataset root (no '..', no symlinks pointing out)")
    return target
