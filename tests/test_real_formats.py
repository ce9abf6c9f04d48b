"""Formatters on real public annotation files (../shared/realdata, see its SOURCES.md; skipped when absent).

The annotation files are copied into tmp_path next to images synthesised at the names they give;
nothing from realdata is stored in the project.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import formatters
from adapt.data.records import read_meta
from adapt.errors import AdaptError
from formatters.base import run

REALDATA = Path(__file__).resolve().parents[1].parent / "shared" / "realdata"


def real(rel: str) -> Path:
    path = REALDATA / rel
    if not path.exists():
        pytest.skip(f"{path} is absent")
    return path


def image(path: Path, size=(64, 48)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), 120, np.uint8)).save(path)


def _jsonl(out: Path) -> list[dict]:
    files = list(out.glob("*.jsonl"))
    assert len(files) == 1, files
    return [json.loads(line) for line in files[0].read_text(encoding="utf-8").splitlines()]


def test_pmc_vqa_second_release_csv_with_bare_letter_answers(tmp_path):
    for name in ("test_2.csv", "test.csv"):
        shutil.copy(real(f"pmc_vqa/{name}"), tmp_path / name)
    image(tmp_path / "images" / "PMC8253867_Fig2_41.jpg")
    for name in ("test_2.csv", "test.csv"):
        report = run(formatters.get("pmc-vqa"), tmp_path / name, tmp_path / f"out-{name}", progress=False)
        assert report.skipped == 0 and report.written == 1, report.to_dict()
        record = _jsonl(tmp_path / f"out-{name}")[0]
        assert record["meta"]["answer"] == "B"
        assert record["meta"]["answer_text"] == "Left Anterior Descending Coronary Artery"
        assert "B. Left Anterior Descending Coronary Artery" in record["conversations"][0]["value"]


def test_rsvqa_removed_question_stubs_are_not_broken_rows(tmp_path):
    source = tmp_path / "rsvqa"
    shutil.copytree(real("rsvqa"), source)
    images = json.loads((source / "LR_split_train_images.json").read_text())["images"]
    for item in images:
        if item.get("active"):
            image(source / "Images_LR" / f"{item['id']}.tif", (256, 256))
    report = run(formatters.get("rsvqa"), source, tmp_path / "out", progress=False, strict=True)
    questions = json.loads((source / "LR_split_train_questions.json").read_text())["questions"]
    stubs = sum(q.get("active") is False and "img_id" not in q for q in questions)
    assert stubs >= 1 and report.skipped == 0
    assert report.stats["inactive_questions"] >= stubs
    assert report.written == sum(bool(q.get("active")) for q in questions)


def test_medmnist_label_names_file_is_read_from_the_working_directory(tmp_path, monkeypatch):
    names = json.loads(real("medmnist/pathmnist_label.json").read_text())
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    np.savez(data / "pathmnist.npz", train_images=rng.integers(0, 255, (4, 28, 28, 3), dtype=np.uint8),
             train_labels=np.array([[0], [3], [8], [5]]))
    work = tmp_path / "work"
    (work / "labels").mkdir(parents=True)
    shutil.copy(real("medmnist/pathmnist_label.json"), work / "labels" / "pathmnist_label.json")
    monkeypatch.chdir(work)
    report = run(formatters.get("medmnist"), data / "pathmnist.npz", tmp_path / "out", progress=False,
                 label_names="labels/pathmnist_label.json")
    records = _jsonl(tmp_path / "out")
    assert report.written == 4
    assert [r["meta"]["answer"].split(". ", 1)[1] for r in records] == [names[k] for k in ("0", "3", "8", "5")]


def _internvl_checkout(tmp_path: Path) -> Path:
    """InternVL's layout: internvl_chat/shell/data/coco_caption.json naming data/coco/... from internvl_chat/."""
    chat = tmp_path / "InternVL" / "internvl_chat"
    (chat / "shell" / "data").mkdir(parents=True)
    shutil.copy(real("internvl_chat/coco_caption.json"), chat / "shell" / "data" / "coco_caption.json")
    annotation = chat / "data" / "coco" / "annotations" / "coco_karpathy_train_567k.jsonl"
    annotation.parent.mkdir(parents=True)
    shutil.copy(real("internvl_chat/coco_karpathy_train_567k.jsonl"), annotation)
    image(chat / "data" / "coco" / "train2014" / "COCO_train2014_000000581857.jpg", (640, 427))
    return chat


def test_official_internvl_meta_file_resolves_from_the_working_directory(tmp_path, monkeypatch):
    chat = _internvl_checkout(tmp_path)
    meta = chat / "shell" / "data" / "coco_caption.json"
    monkeypatch.chdir(chat)  # where InternVL's training script runs
    (spec,) = read_meta(meta)
    assert spec.resolved_from == "working directory"
    assert Path(spec.annotation).resolve() == (chat / "data/coco/annotations/coco_karpathy_train_567k.jsonl").resolve()
    report = run(formatters.get("general"), meta, tmp_path / "out", progress=False)
    assert report.written == 2 and report.skipped == 0
    assert report.stats["meta_paths_relative_to"] == {"coco_karpathy_train_567k": "working directory"}


def test_meta_file_falls_back_to_its_own_folder_and_names_both_when_lost(tmp_path, monkeypatch):
    chat = _internvl_checkout(tmp_path)
    beside = chat / "beside.json"
    shutil.copy(chat / "shell" / "data" / "coco_caption.json", beside)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    (spec,) = read_meta(beside)
    assert spec.resolved_from == "meta file folder"
    with pytest.raises(AdaptError, match="neither in the working directory"):
        read_meta(chat / "shell" / "data" / "coco_caption.json")


def _slake(tmp_path: Path) -> Path:
    source = tmp_path / "slake"
    source.mkdir()
    shutil.copy(real("slake/train.json"), source / "train.json")
    for row in json.loads((source / "train.json").read_text(encoding="utf-8")):
        if not (source / "imgs" / row["img_name"]).exists():
            image(source / "imgs" / row["img_name"])
    return source


def test_slake_chinese_closed_questions_get_choices_like_english_ones(tmp_path):
    source = _slake(tmp_path)
    run(formatters.get("slake"), source, tmp_path / "out", progress=False, lang="all")
    records = _jsonl(tmp_path / "out")
    closed = [r for r in records if r["meta"]["answer_type"] == "closed"]
    zh_yes_no = [r for r in closed if r["meta"]["lang"] == "zh" and r["meta"]["answer"] in ("包含", "不是")]
    en_yes_no = [r for r in closed if r["meta"]["lang"] == "en" and r["meta"]["answer"].lower() in ("yes", "no")]
    assert zh_yes_no and en_yes_no
    assert all(r["meta"]["choices"] == ["yes", "no"] for r in en_yes_no)
    for record in zh_yes_no:
        choices = record["meta"]["choices"]
        assert len(choices) == 2 and record["meta"]["answer"] in choices
    assert {tuple(r["meta"]["choices"]) for r in zh_yes_no} == {("包含", "不包含"), ("是", "不是")}
    organ = [r for r in closed if r["meta"]["lang"] == "zh" and r["meta"]["answer"] == "肝脏"]
    assert organ and all("choices" not in r["meta"] for r in organ)  # not a yes/no answer


def test_skip_rows_are_one_based_everywhere(tmp_path):
    source = _slake(tmp_path)
    report = run(formatters.get("slake"), source, tmp_path / "slake-out", progress=False)
    rows = json.loads((source / "train.json").read_text(encoding="utf-8"))
    empty = [n for n, row in enumerate(rows, start=1) if not row["answer"].strip()]
    assert empty and [s.row for s in report.skips] == empty  # the release's row with an empty answer

    rad = tmp_path / "rad"
    rad.mkdir()
    (first,) = json.loads(real("vqa_rad/VQA_RAD Dataset Public.json").read_text(encoding="utf-8"))
    (rad / "VQA_RAD Dataset Public.json").write_text(json.dumps([first, {**first, "image_name": "missing.jpg"}]))
    image(rad / "images" / first["image_name"])
    report = run(formatters.get("vqa-rad"), rad, tmp_path / "rad-out", progress=False)
    assert [s.row for s in report.skips] == [2]


def test_official_internvl_meta_formats_the_same_in_parallel(tmp_path, monkeypatch):
    """InternVL's real meta file and annotation excerpt, its rows shared out one per worker process
    (a 1-byte range, a worker per unit): the same files as one process writes."""
    import dataclasses

    from formatters import general

    chat = _internvl_checkout(tmp_path)
    monkeypatch.chdir(chat)
    monkeypatch.setattr(general, "UNIT_BYTES", 1)
    meta = chat / "shell" / "data" / "coco_caption.json"

    def eager(*args, **kwargs):
        return dataclasses.replace(general.GENERAL.plan(*args, **kwargs), min_per_process=1)

    one = run(general.GENERAL, meta, tmp_path / "one", progress=False, num_proc=1)
    two = run(dataclasses.replace(general.GENERAL, plan=eager), meta, tmp_path / "two", progress=False, num_proc=2)
    assert two.timing["workers"] == 2 and one.written == two.written == 2
    for name in ("records.jsonl", "meta.json", "report.json"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
