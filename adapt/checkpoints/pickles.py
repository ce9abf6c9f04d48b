"""Refused pickles, in adapt's words.

Checkpoint files in the pickle format (`.bin`, `.pt`, `.pth`) are only ever loaded with
`torch.load(weights_only=True)`, which refuses any Python object beyond tensors and plain data. torch's
own refusal message suggests retrying with `weights_only=False`, i.e. running whatever code the file
carries; adapt never relays that advice. It names the file and what it holds instead.
"""

from __future__ import annotations

import contextlib
import pickle
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from adapt.errors import AdaptError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
HINT = ("a checkpoint must hold plain tensors; re-save it as safetensors from code you trust, "
        "or use a checkpoint written by adapt / transformers")


def refusal(path: Path, err: BaseException) -> AdaptError:
    """adapt's message for a pickle that torch refused to load safely."""
    blocked = re.search(r"unsupported GLOBAL (\S+)", str(err))
    what = f"a Python object ({blocked.group(1)})" if blocked else "Python objects beyond tensors and plain data"
    return AdaptError(f"refused to load this pickle file: it holds {what}, and unpickling it could run code",
                      path=path, hint=HINT)


def load_safely(path: str | Path) -> Any:
    """`torch.load` that only accepts tensors and plain data; anything else is an `AdaptError`."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as err:
        raise refusal(Path(path), err) from None
    except (RuntimeError, EOFError, OSError) as err:
        raise AdaptError(f"cannot read this checkpoint file ({str(err).splitlines()[0][:200]})", path=path,
                         hint="the file is damaged or not a torch checkpoint") from None


@contextlib.contextmanager
def pickles_refused(folder: str | Path | None) -> Iterator[None]:
    """Turn a refused unpickling inside the block (the Trainer's resume, `from_pretrained`) into an
    `AdaptError` naming the refused file of `folder`."""
    try:
        yield
    except pickle.UnpicklingError as err:
        culprit = _first_refused(Path(folder)) if folder is not None else None
        raise refusal(culprit or Path(folder or "?"), err) from None


def _first_refused(folder: Path) -> Path | None:
    files = [folder] if folder.is_file() else sorted(p for p in folder.rglob("*") if p.suffix in PICKLE_SUFFIXES)
    for path in files:
        try:
            torch.load(path, weights_only=True, map_location="cpu", mmap=True)
        except pickle.UnpicklingError:
            return path
        except Exception:  # noqa: BLE001 - other damage is not what we are looking for here
            continue
    return None
