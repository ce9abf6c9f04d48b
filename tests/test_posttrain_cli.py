"""`adapt dpo` and `adapt grpo` as a user runs them: one output folder with the report (before and
after), the checkpoints and an export that reloads."""

from __future__ import annotations

import json

import pytest
from test_preference import _pairs
from test_rl import _choice_rows
from transformers import AutoModelForImageTextToText

from adapt.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def _jsonl(path, entries):
    path.write_text("".join(json.dumps(record) + "\n" for record, _ in entries))
    return path


def test_adapt_dpo_from_pairs(tmp_path, capsys):
    pairs = _jsonl(tmp_path / "data" / "pairs.jsonl", _pairs(tmp_path / "data", 4))
    held = _jsonl(tmp_path / "data" / "held.jsonl", _pairs(tmp_path / "data", 2, offset=50))
    out = tmp_path / "dpo"
    code = main(["dpo", "--model", "tiny", "--pairs", str(pairs), "--heldout-pairs", str(held), "--out", str(out),
                 "--opt", "max_steps=2", "--opt", "max_tiles=1", "--opt", "per_device_train_batch_size=2", "--opt", "loss=mpo",
                 "--quiet"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == 2 and report["pairs"] == {"train": 4, "heldout": 2}
    assert report["before"]["preference"]["pairs"] == report["after"]["preference"]["pairs"] == 2
    assert AutoModelForImageTextToText.from_pretrained(out / "export") is not None
    text = capsys.readouterr().out  # the trainer's log lines, then the summary
    printed = json.loads(text[text.rindex('{\n  "before"'):])
    assert printed["after"] == report["after"]["preference"]


def test_adapt_dpo_refuses_bad_options(tmp_path, capsys):
    assert main(["dpo", "--model", "tiny", "--pairs", "x.jsonl", "--out", str(tmp_path), "--opt", "loss=kto"]) == 2
    assert "unknown preference loss 'kto'" in capsys.readouterr().err
    assert main(["dpo", "--model", "tiny", "--pairs", "x.jsonl", "--out", str(tmp_path), "--opt",
                 "per_device_train_batch_size=0"]) == 2  # ranges are declared on the config and checked
    assert "per_device_train_batch_size" in capsys.readouterr().err
    assert main(["grpo", "--model", "tiny", "--data", "x.jsonl", "--out", str(tmp_path), "--opt", "epochs=2"]) == 2
    assert "unknown option(s): epochs" in capsys.readouterr().err  # TrainingArguments names: num_train_epochs
    assert main(["dpo", "--model", "tiny", "--out", str(tmp_path)]) == 2
    assert "either --pairs" in capsys.readouterr().err


def test_adapt_grpo_with_lora_on_records(tmp_path):
    data = _jsonl(tmp_path / "data" / "records.jsonl", _choice_rows(tmp_path / "data", 4))
    out = tmp_path / "grpo"
    code = main(["grpo", "--model", "tiny", "--data", str(data), "--out", str(out), "--opt", "max_steps=1",
                 "--opt", "max_tiles=1", "--opt", "generations=2", "--opt", "prompts_per_step=2",
                 "--opt", "max_new_tokens=4", "--opt", "mode=lora", "--opt", "lora_r=4", "--quiet"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == 1 and report["prompts"] == {"train": 3, "heldout": 1}
    assert set(report["before"]["greedy"]) == {"task", "format", "reward"}
    assert (out / "export" / "config.json").is_file()
