"""Operating-system faults and files: clean errors, nothing incomplete left where a user would read it.

Covers NUL bytes / over-long names / symlink loops in data paths, a disk filling up at a generated
offset while records or an export are written (fault injection), partial folders of killed runs,
refused pickles, unique ids, and commands that read a run directory without changing it.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import adapt.fileio
import formatters
from adapt.checkpoints.pickles import load_safely
from adapt.cli import main
from adapt.errors import AdaptError
from formatters.base import run

REPO = Path(__file__).resolve().parents[1]
SLOW = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                         HealthCheck.too_slow])
HOSTILE_PATHS = ["a\x00b.png", "x" * 300 + ".png", "d/" * 2100 + "x.png", "loop/x.png", "../up.png", "/etc/hosts"]


def _source(folder: Path, image_paths: list[str], ids: list[str] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(folder / "a.png")
    if not (folder / "loop").is_symlink():
        os.symlink("loop", folder / "loop")  # loop -> loop: resolving loop/x.png never ends
    ids = ids or [f"r{i}" for i in range(len(image_paths))]
    rows = [{"id": ident, "image": p, "conversations": [{"from": "human", "value": "<image>\nq"},
                                                         {"from": "gpt", "value": "a"}]}
            for ident, p in zip(ids, image_paths, strict=True)]
    path = folder / "ann.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def _tree(folder: Path) -> dict[str, str]:
    """Every entry under `folder` (hidden ones included) with its content hash: byte-identical or not."""
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        out[rel] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return out


@SLOW
@given(st.lists(st.sampled_from(HOSTILE_PATHS + ["a.png"]), min_size=1, max_size=6))
def test_hostile_image_paths_are_located_skips(tmp_path_factory, paths):
    folder = tmp_path_factory.mktemp("p")
    source = _source(folder / "src", paths)
    report = run(formatters.get("general"), source, folder / "out", progress=False)
    bad = [i + 1 for i, p in enumerate(paths) if p != "a.png"]
    assert report.written == len(paths) - len(bad)
    assert [s.row for s in report.skips] == bad and all(s.path == str(source) for s in report.skips)


@SLOW
@given(ids=st.lists(st.sampled_from(["good", "good#2", "good#3", "x", "x#2#2", ""]), min_size=1, max_size=8))
def test_ids_stay_unique_and_every_rename_is_reported(tmp_path_factory, ids):
    folder = tmp_path_factory.mktemp("i")
    source = _source(folder / "src", ["a.png"] * len(ids), ids)
    report = run(formatters.get("general"), source, folder / "out", progress=False)
    written = [json.loads(line)["id"] for line in (folder / "out" / "records.jsonl").read_text().splitlines()]
    assert len(set(written)) == len(written) == len(ids)
    changed = sum(1 for before, after in zip(ids, written, strict=True) if before and before != after)
    assert report.stats.get("duplicate_ids_renamed", 0) == changed
    assert sorted(report.stats.get("renamed_ids", {}).values()) == sorted(
        after for before, after in zip(ids, written, strict=True) if before and before != after)


def test_issue_ids_good_good3_good(tmp_path):
    source = _source(tmp_path / "src", ["a.png"] * 3, ["good", "good#3", "good"])
    report = run(formatters.get("general"), source, tmp_path / "out", progress=False)
    written = [json.loads(line)["id"] for line in (tmp_path / "out" / "records.jsonl").read_text().splitlines()]
    assert written == ["good", "good#3", "good#2"] and report.stats["renamed_ids"] == {"good (record 3)": "good#2"}


class _FillingDisk(io.TextIOWrapper):
    """A file whose disk fills after `budget` bytes: the write that crosses it raises ENOSPC."""

    budget = 0

    def write(self, text: str) -> int:
        _FillingDisk.budget -= len(text.encode())
        if _FillingDisk.budget < 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(text)


def _fill_disk_after(monkeypatch, budget: int) -> None:
    real_fdopen = os.fdopen

    def fdopen(fd, mode="r", *args, **kwargs):
        handle = real_fdopen(fd, mode, *args, **kwargs)
        if "b" in mode:
            return handle
        return _FillingDisk(handle.detach(), encoding=kwargs.get("encoding") or "utf-8")

    _FillingDisk.budget = budget
    monkeypatch.setattr(adapt.fileio.os, "fdopen", fdopen)


@SLOW
@given(budget=st.integers(0, 3000))
def test_disk_full_while_formatting_leaves_nothing_that_looks_complete(tmp_path_factory, capsys, budget):
    folder = tmp_path_factory.mktemp("enospc")
    source = _source(folder / "src", ["a.png"] * 8)
    with pytest.MonkeyPatch.context() as patch:
        _fill_disk_after(patch, budget)
        code = main(["format", "general", "--input", str(source), "--output", str(folder / "out")])
    err = capsys.readouterr().err
    if code == 0:  # the budget sufficed: a complete output
        assert (folder / "out" / "report.json").is_file()
        return
    assert code == 2 and "No space left on device" in err and "Traceback" not in err
    assert sorted(p.name for p in folder.iterdir()) == ["src"]  # no output, no hidden partial


def test_disk_full_while_exporting_leaves_nothing(tiny, tmp_path, monkeypatch):
    from adapt.checkpoints import export

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(export, "write_processor_configs", full)
    with pytest.raises(OSError):
        export.export_model(tiny.model, tiny.tokenizer, tiny.template, tmp_path / "exported")
    assert list(tmp_path.iterdir()) == []


KILLED_RUN = """
import os, signal, sys
import formatters
from formatters.base import run
from formatters.general import GENERAL

def dying(source, out, report, **options):
    yield from GENERAL.generate(source, out, report, **options)
    os.kill(os.getpid(), signal.SIGKILL)

run(formatters.base.Formatter("general", dying, GENERAL.image_root), sys.argv[1], sys.argv[2], progress=False)
"""


def test_partial_folder_of_a_killed_format_is_removed_by_the_next_run(tmp_path):
    source = _source(tmp_path / "src", ["a.png"] * 2)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    child = subprocess.run([sys.executable, "-c", KILLED_RUN, str(source), str(out)], env=env, cwd=REPO,
                           capture_output=True, timeout=120)
    assert child.returncode == -9
    left = [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    assert len(left) == 1 and left[0].endswith(".partial") and not out.exists()
    foreign = tmp_path / ".out.someone-else.partial"  # not adapt's naming: never touched
    foreign.mkdir()
    live = tmp_path / f".out.adapt-{os.getpid()}-x.partial"  # a live process's partial: never touched
    live.mkdir()
    assert main(["format", "general", "--input", str(source), "--output", str(out)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([".out.someone-else.partial", live.name, "out", "src"])


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_refused_pickle_names_the_file_and_never_advises_unsafe_loading(tmp_path):
    path = tmp_path / "optimizer.pt"
    torch.save({"state": _Payload()}, path)
    with pytest.raises(AdaptError) as caught:
        load_safely(path)
    message = str(caught.value)
    assert str(path) in message and "refused to load this pickle file" in message
    assert "weights_only" not in message and "posix.system" in message


def test_model_folder_with_a_code_carrying_bin_is_refused_by_name(tiny, tmp_path, capsys):
    from adapt.checkpoints import models

    folder = tmp_path / "model"
    tiny.model.save_pretrained(folder)
    tiny.tokenizer.save_pretrained(folder)
    state = {k: v.contiguous() for k, v in tiny.model.state_dict().items()}
    torch.save({**state, "extra": _Payload()}, folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    with pytest.raises(AdaptError) as caught:
        models.load(str(folder))
    assert "pytorch_model.bin" in str(caught.value) and "weights_only" not in str(caught.value)


def _run_dir(tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "checkpoint-2").mkdir(parents=True)  # killed while saving: no marker
    (run_dir / "checkpoints" / "checkpoint-2" / "model.safetensors").write_bytes(b"half")
    (run_dir / "config.yaml").write_text("run:\n  domain: driving\n")
    return run_dir


@pytest.mark.parametrize("command", [["export", "{run}", "--out", "{tmp}/exported"], ["eval", "{run}"]])
def test_commands_that_read_a_run_leave_it_byte_identical(tmp_path, capsys, command):
    run_dir = _run_dir(tmp_path)
    before = _tree(run_dir)
    argv = [part.format(run=run_dir, tmp=tmp_path) for part in command]
    assert main(argv) == 2
    assert "no complete checkpoint" in capsys.readouterr().err
    assert _tree(run_dir) == before


def test_empty_input_warns(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["format", "general", "--input", str(empty), "--output", str(tmp_path / "out")]) == 0
    assert "warning: no records written" in capsys.readouterr().err


def test_general_accepts_a_formatted_folder(tmp_path):
    source = _source(tmp_path / "src", ["a.png"] * 2)
    first = run(formatters.get("general"), source, tmp_path / "first", progress=False)
    again = run(formatters.get("general"), tmp_path / "first", tmp_path / "again", progress=False)
    assert first.written == again.written == 2 and again.skipped == 0


def test_unexpected_exception_is_exit_3_with_a_saved_traceback(tmp_path, capsys, monkeypatch):
    import formatters.base

    def broken(*args, **kwargs):
        raise ZeroDivisionError("simulated bug")

    monkeypatch.setenv("ADAPT_CRASH_DIR", str(tmp_path / "crash"))
    monkeypatch.setattr(formatters.base, "run", broken)
    assert main(["format", "general", "--input", "x", "--output", "y"]) == 3
    err = capsys.readouterr().err
    saved = list((tmp_path / "crash").iterdir())
    assert "Traceback" not in err and "simulated bug" in err and str(saved[0]) in err
    assert "ZeroDivisionError" in saved[0].read_text() and "Traceback" in saved[0].read_text()
