"""Every command over a corpus of broken inputs: a clean exit (0 with counted skips, or 2 with a message),
never a traceback and never exit 3 (the guard's "bug in adapt").

The corpus is built from kinds of damage (missing, empty, garbage bytes, wrong JSON shape, bad rows,
unreadable images, hostile names and paths) crossed with every formatter kind and every command.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import formatters
from adapt.cli import main

REPO = Path(__file__).resolve().parents[1]


def _missing(d: Path) -> Path:
    return d / "does-not-exist"


def _empty_file(d: Path) -> Path:
    (d / "empty.jsonl").write_text("")
    return d / "empty.jsonl"


def _empty_folder(d: Path) -> Path:
    (d / "empty").mkdir()
    return d / "empty"


def _garbage_file(d: Path) -> Path:
    (d / "garbage.json").write_bytes(bytes(range(256)) * 4)
    return d / "garbage.json"


def _wrong_json_shape(d: Path) -> Path:
    (d / "shape.json").write_text(json.dumps({"rows": [1, "two", None]}))
    return d / "shape.json"


def _bad_rows(d: Path) -> Path:
    lines = ["{", "[]", "null", json.dumps({"id": 1, "image": 5, "question": ["x"], "answer": {"a": 1}}),
             json.dumps({"image": "../../etc/passwd", "expression": "<image>", "box": ["a", 1, 2, 3]})]
    (d / "rows.jsonl").write_text("\n".join(lines) + "\n")
    return d / "rows.jsonl"


def _folder_of_broken_things(d: Path) -> Path:
    root = d / "broken"
    (root / "<ref>cls</ref>").mkdir(parents=True)
    (root / "<ref>cls</ref>" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnope")
    (root / "plain").mkdir()
    Image.fromarray(np.full((4, 4), 65535, np.uint16)).save(root / "plain" / "deep.png")
    os.symlink("loop", root / "loop")
    for name in ("labels.csv", "train.json", "annotations.json", "meta.json", "records.jsonl", "refs(unc).p"):
        (root / name).write_text("not,what,you\x00expect\n")
    return root


def _symlink_loop(d: Path) -> Path:
    os.symlink("loop", d / "loop")
    return d / "loop" / "x.json"


def _long_name(d: Path) -> Path:
    return d / ("n" * 400 + ".json")


INPUTS: dict[str, Callable[[Path], Path]] = {
    "missing": _missing, "empty file": _empty_file, "empty folder": _empty_folder, "garbage bytes": _garbage_file,
    "wrong JSON shape": _wrong_json_shape, "bad rows": _bad_rows, "broken folder": _folder_of_broken_things,
    "symlink loop": _symlink_loop, "over-long name": _long_name,
}
OPTION_SETS = [[], ["--strict"], ["--opt", "nonsense=1"]]


def _call(argv: list[str], capsys) -> tuple[int, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.mark.parametrize("kind", [pytest.param(k, marks=pytest.mark.slow) if k == "driving" else k
                                  for k in sorted(formatters.REGISTRY)])
def test_format_over_the_broken_corpus(kind, tmp_path, capsys):
    outcomes = {}
    for name, make in INPUTS.items():
        for options in OPTION_SETS:
            case = tmp_path / f"{name.replace(' ', '-')}{len(outcomes)}"
            case.mkdir()
            code, text = _call(["format", kind, "--input", str(make(case)), "--output", str(case / "out"), *options],
                               capsys)
            outcomes[f"{name} {' '.join(options)}"] = code
            assert code in (0, 2) and "Traceback" not in text, f"{kind} / {name} {options}: exit {code}\n{text[-2000:]}"
            if code == 2:
                assert not (case / "out").exists() and not list(case.glob(".out.*"))
    assert len(outcomes) == len(INPUTS) * len(OPTION_SETS)


def _run_dirs(root: Path) -> dict[str, Path]:
    cases = {}
    for name, files in {
        "empty": {}, "garbage config": {"config.yaml": "run: [1, 2"}, "config not a mapping": {"config.yaml": "- 1\n"},
        "config with wrong types": {"config.yaml": "run:\n  domain: 5\n  seed: x\n"},
        "no checkpoint": {"config.yaml": "run:\n  domain: driving\n"},
        "half checkpoint": {"config.yaml": "run:\n  domain: driving\n", "checkpoints/checkpoint-1/model.safetensors": "x"},
        "marked garbage checkpoint": {"config.yaml": "run:\n  domain: driving\n",
                                      "checkpoints/checkpoint-1/adapt-complete.json": "{}",
                                      "checkpoints/checkpoint-1/config.json": "{not json",
                                      "checkpoints/checkpoint-1/model.safetensors": "garbage"},
    }.items():
        folder = root / name.replace(" ", "-")
        folder.mkdir(parents=True)
        for rel, text in files.items():
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            (folder / rel).write_text(text)
        cases[name] = folder
    cases["missing"] = root / "nope"
    return cases


@pytest.mark.slow
@pytest.mark.parametrize("command", ["eval", "export", "convert", "run-resume"])
def test_run_commands_over_broken_run_directories(command, tmp_path, capsys):
    for name, folder in _run_dirs(tmp_path / "runs").items():
        if command == "run-resume" and "checkpoint" in name:
            continue  # a valid run without a complete checkpoint resumes from the start: that is training
        out = tmp_path / f"out-{command}-{name.replace(' ', '-')}"
        argv = {"eval": ["eval", str(folder)], "export": ["export", str(folder), "--out", str(out)],
                "convert": ["convert", str(folder), str(out)], "run-resume": ["run", "--resume", str(folder)]}[command]
        code, text = _call(argv, capsys)
        assert code == 2 and "Traceback" not in text, f"{command} / {name}: exit {code}\n{text[-2000:]}"
        assert not out.exists()


@pytest.mark.slow
def test_run_with_broken_data_sources(tmp_path, capsys):
    garbage = _garbage_file(tmp_path)
    for data in (f"general={garbage}", f"grounding={tmp_path / 'nope'}", "nonsense", f"vqa-rad={tmp_path}?x=1",
                 f"general={_long_name(tmp_path)}"):
        code, text = _call(["run", "--domain", "driving", "--data", data, "--runs-dir", str(tmp_path / "runs"),
                            "--no-export", "--quiet"], capsys)
        assert code == 2 and "Traceback" not in text, f"{data}: exit {code}\n{text[-2000:]}"


def test_a_real_subprocess_prints_no_traceback(tmp_path):
    """The same contract through the console entry point (imports, argument parsing, exit code)."""
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result = subprocess.run([sys.executable, "-m", "adapt.cli", "format", "general", "--input",
                             str(_garbage_file(tmp_path)), "--output", str(tmp_path / "o")],
                            capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr + result.stdout
