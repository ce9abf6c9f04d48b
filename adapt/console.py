"""What a run shows: one progress display per phase (formatting, planning, training, evaluation) and
short messages, or, when quiet, only warnings, errors and the final table. Every message also goes
to the run log (<run>/logs/run.log) once the run directory exists, so a quiet run loses nothing.

    with console.session(quiet=True):
        console.log_to(run_dir / "logs" / "run.log")
        console.say("formatting")                # run log only when quiet
        with console.phase("formatting", unit="rec") as bar: ...
        console.result(table)                     # always printed
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tqdm import tqdm
from transformers import TrainerCallback

_quiet = False
_log_file: Path | None = None


def is_main_process() -> bool:
    """True in a single process and on global rank 0 of a launch (it alone prints and writes)."""
    return int(os.environ.get("RANK", "0")) == 0


def quiet() -> bool:
    return _quiet


@contextmanager
def session(*, quiet: bool) -> Iterator[None]:
    """Quiet (or not) for the length of a run. transformers' own bars (one per weight shard loaded or
    written) never show during a run; the hub's download bars show unless quiet. Both come back after."""
    global _quiet, _log_file
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as hf_logging

    saved = _quiet, _log_file, are_progress_bars_disabled(), hf_logging.is_progress_bar_enabled()
    _quiet, _log_file = quiet, None
    hf_logging.disable_progress_bar()  # switches the hub's bars off too
    if not quiet:
        enable_progress_bars()
    try:
        yield
    except Exception as err:  # the CLI prints it; the run log keeps it beside the run's messages
        log(f"error: {err}")
        raise
    finally:
        _quiet, _log_file, hub_disabled, hf_enabled = saved
        if hf_enabled:
            hf_logging.enable_progress_bar()
        (disable_progress_bars if hub_disabled else enable_progress_bars)()


def log_to(path: Path | None) -> None:
    """Also write every message to `path` (None: stop)."""
    global _log_file
    _log_file = path
    if path is not None and is_main_process():
        path.parent.mkdir(parents=True, exist_ok=True)


def log(message: str) -> None:
    """The run log only (nothing once a failed start has removed its run directory)."""
    if _log_file is not None and _log_file.parent.is_dir() and is_main_process():
        with open(_log_file, "a", encoding="utf-8") as file:
            file.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")


def say(message: str) -> None:
    """Progress news: on the console unless quiet, always in the run log."""
    if not is_main_process():
        return
    log(message)
    if not _quiet:
        print(f"[adapt] {message}", flush=True)


def warn(message: str) -> None:
    """Something the user should act on: printed even when quiet (stderr)."""
    if is_main_process():
        log(f"warning: {message}")
        print(f"[adapt] warning: {message}", file=sys.stderr, flush=True)


def result(message: str) -> None:
    """The run's final table: printed even when quiet."""
    if is_main_process():
        log(message)
        print(f"[adapt] {message}", flush=True)


@contextmanager
def phase(name: str, *, total: int | None = None, unit: str = "it", show: bool = True) -> Iterator[tqdm]:
    """The one progress display of a phase (hidden when quiet, when not `show`, and on the other
    ranks); its duration goes to the run log."""
    bar = tqdm(total=total, desc=name, unit=unit, disable=_quiet or not show or not is_main_process(),
               dynamic_ncols=True)
    started = time.monotonic()
    try:
        yield bar
    finally:
        bar.close()
        log(f"{name} done in {time.monotonic() - started:.1f} s")


class LogToRunLog(TrainerCallback):
    """The Trainer's loss lines go to the run log (the console shows them only in its progress bar),
    and the moment the first batch is ready (wall-clock seconds: what benchmarks/prep_scale.py reads)."""

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == 0 and not getattr(self, "_started", False) and state.is_world_process_zero:
            self._started = True
            log(f"first training step: its batch is ready (unix time {time.time():.3f})")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and state.is_world_process_zero:
            log(f"step {state.global_step}: " + ", ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}"
                                                       for k, v in logs.items()))
