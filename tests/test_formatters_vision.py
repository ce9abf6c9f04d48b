"""End-to-end tests of the vision formatters on synthetic sources in the real formats.

Every formatter runs through `formatters.base.run`; records are checked against what is painted in
their images (found independently with `colour_box`), against the source annotations, and the
error paths (unknown label, boxes outside / of zero area / in 0..1, corrupt / missing images,
malformed rows) are counted skips that name the file and row, or an `AdaptError` under strict mode.
"""

from __future__ import annotations

import csv
import json
import pickle
import shutil
import string
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import formatters
from adapt.data import boxes as bx
from adapt.data import records as rec
from adapt.errors import AdaptError, Report
from formatters.base import run
from formatters.synthetic import sources as syn

CLASSES = sorted(syn.LAND_COVER)


def format_records(kind: str, source: Path, out: Path, **options) -> tuple[Report, list[dict], Path]:
    """Run a formatter; return its report, its records (each re-validated) and their image root."""
    report = run(formatters.get(kind), source, out, progress=False, **options)
    records = [json.loads(line) for line in (out / "records.jsonl").read_text(encoding="utf-8").splitlines()]
    meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    root_text = next(iter(meta.values()))["root"]
    root = out if root_text == "." else Path(root_text)
    for record in records:
        assert rec.problems(record, root=root, check_files=True) == []
        assert {"task", "source", "domain"} <= record["meta"].keys()
    assert len({r["id"] for r in records}) == len(records), "ids must be unique"
    assert report.written == len(records)
    saved = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert (saved["written"], saved["skipped"]) == (report.written, report.skipped)
    return report, records, root


def answer(record: dict) -> str:
    return record["conversations"][-1]["value"]


def question(record: dict) -> str:
    return record["conversations"][0]["value"]


def skips_by_row(report: Report) -> dict[int | None, str]:
    return {s.row: s.reason for s in report.skips}


# --------------------------------------------------------------------------------------------------
# Classification
# --------------------------------------------------------------------------------------------------

def test_class_folders_lettered_choices_and_corrupt_images(tmp_path):
    src = syn.write_class_folders(tmp_path / "aid", per_class=2)
    (src / "forest" / "broken.jpg").write_bytes(b"this is not a jpeg")
    good = (src / "river" / "river_000.jpg").read_bytes()
    (src / "river" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (src / "river" / "notes.txt").write_text("not an image")

    report, records, root = format_records("classification", src, tmp_path / "out")
    assert report.written == 8 and report.skipped == 2 and report.read == 10
    assert {Path(s.path).name for s in report.skips} == {"broken.jpg", "truncated.jpg"}
    assert all("corrupt image" in s.reason for s in report.skips)
    assert report.stats["ignored_files"] == 1
    for record in records:
        label = record["image"].split("/")[0]
        meta = record["meta"]
        assert meta["task"] == "classification" and meta["label"] == label
        assert meta["choices"] == CLASSES
        letter = string.ascii_uppercase[CLASSES.index(label)]
        assert answer(record) == meta["answer"] == f"{letter}. {label}" and meta["letter"] == letter
        for i, name in enumerate(CLASSES):
            assert f"\n{string.ascii_uppercase[i]}. {name}\n" in question(record)
        # the image really shows its class colour
        assert syn.colour_box(Image.open(root / record["image"]), syn.LAND_COVER[label]) is not None


def _label_csv_with_defects(tmp_path: Path) -> Path:
    path = syn.write_label_file(tmp_path / "lab", per_class=2)  # 8 rows on lines 2..9
    (path.parent / "images" / "bad.png").write_bytes(b"\x89PNG broken")
    with open(path, "a", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["images/ghost.png", "forest"])  # line 10: missing image
        writer.writerow(["images/desert_000.png", "glacier"])  # line 11: unknown label
        writer.writerow(["images/desert_001.png", ""])  # line 12: malformed (no label)
        writer.writerow(["images/bad.png", "river"])  # line 13: corrupt image
        writer.writerow(["../escape.png", "river"])  # line 14: path outside the root
    return path


def test_label_file_skips_name_file_and_row_and_strict_raises(tmp_path):
    path = _label_csv_with_defects(tmp_path)
    report, records, _ = format_records("classification", path, tmp_path / "out", classes=CLASSES)
    assert report.written == 8 and report.skipped == 5 and report.read == 13
    assert all(s.path == str(path) for s in report.skips)
    reasons = skips_by_row(report)
    assert set(reasons) == {10, 11, 12, 13, 14}
    assert "image not found" in reasons[10]
    assert "unknown label 'glacier'" in reasons[11]
    assert "lacks a value" in reasons[12]
    assert "corrupt image" in reasons[13]
    assert "escapes the data root" in reasons[14]
    for record in records:
        assert record["meta"]["label"] == Path(record["image"]).stem.rsplit("_", 1)[0]

    with pytest.raises(AdaptError) as err:
        run(formatters.get("classification"), path, tmp_path / "strict", strict=True, progress=False, classes=CLASSES)
    assert f"{path}:10:" in str(err.value) and not (tmp_path / "strict").exists()


def test_listed_shuffled_subset_and_limited_choices(tmp_path):
    path = syn.write_label_file(tmp_path / "lab", per_class=2, fmt="json")
    _, first, _ = format_records("classification", path, tmp_path / "a", choices="listed", shuffle=True, seed=3)
    _, again, _ = format_records("classification", path, tmp_path / "b", choices="listed", shuffle="true", seed="3")
    _, other, _ = format_records("classification", path, tmp_path / "c", choices="listed", shuffle=True, seed=4)
    assert first == again, "the seeded shuffle must be reproducible"
    assert [r["meta"]["choices"] for r in first] != [r["meta"]["choices"] for r in other]
    assert any(r["meta"]["choices"] != CLASSES for r in first)
    for record in first:
        assert sorted(record["meta"]["choices"]) == CLASSES and "letter" not in record["meta"]
        assert answer(record) == record["meta"]["answer"] == record["meta"]["label"]
        assert ", ".join(record["meta"]["choices"]) in question(record)

    report, subset, _ = format_records("classification", path, tmp_path / "d", subset=["river", "forest"])
    assert report.stats["outside_subset"] == 4 and len(subset) == 4
    assert all(r["meta"]["choices"] == ["forest", "river"] for r in subset)
    assert {answer(r) for r in subset} == {"A. forest", "B. river"}

    _, limited, _ = format_records("classification", path, tmp_path / "e", max_choices=2)
    for record in limited:
        choices = record["meta"]["choices"]
        assert len(choices) == 2 and record["meta"]["label"] in choices
        assert answer(record) == f"{'AB'[choices.index(record['meta']['label'])]}. {record['meta']['label']}"

    many = CLASSES + [f"class{i}" for i in range(23)]
    with pytest.raises(AdaptError, match="A-Z"):
        run(formatters.get("classification"), path, tmp_path / "f", progress=False, classes=many)
    with pytest.raises(AdaptError, match="unknown option"):
        run(formatters.get("classification"), path, tmp_path / "g", progress=False, shufle=True)


def test_medmnist_gray_and_rgb_pngs_match_the_arrays(tmp_path):
    gray, names_json = syn.write_medmnist(tmp_path / "pathmnist.npz")
    report, records, root = format_records("medmnist", gray, tmp_path / "gray", split="val", label_names=str(names_json))
    arrays = np.load(gray)
    assert report.written == len(records) == len(arrays["val_labels"]) == 3
    for i, record in enumerate(records):
        png = np.asarray(Image.open(root / record["image"]))
        assert png.shape == (28, 28) and np.array_equal(png, arrays["val_images"][i])
        label = syn.MEDMNIST_NAMES[int(arrays["val_labels"][i, 0])]
        assert record["meta"]["label"] == label and record["meta"]["domain"] == "medical"
        assert answer(record) == f"{string.ascii_uppercase[syn.MEDMNIST_NAMES.index(label)]}. {label}"

    rgb, _ = syn.write_medmnist(tmp_path / "dermamnist.npz", rgb=True)
    _, records, root = format_records("medmnist", rgb, tmp_path / "rgb", label_names=list(syn.MEDMNIST_NAMES),
                                      choices="listed")
    arrays = np.load(rgb)
    assert len(records) == 6
    for i, record in enumerate(records):
        assert np.array_equal(np.asarray(Image.open(root / record["image"])), arrays["train_images"][i])
        assert answer(record) == syn.MEDMNIST_NAMES[int(arrays["train_labels"][i, 0])]


def test_medmnist_bad_labels(tmp_path):
    images = np.zeros((3, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "odd.npz", train_images=images, train_labels=np.array([[0], [7], [1]], dtype=np.uint8))
    report, records, _ = format_records("medmnist", tmp_path / "odd.npz", tmp_path / "out", label_names=["a", "b"])
    assert len(records) == 2 and report.skipped == 1
    assert report.skips[0].row == 2 and "unknown label index 7" in report.skips[0].reason  # the second sample: rows are 1-based

    np.savez(tmp_path / "chest.npz", train_images=images, train_labels=np.zeros((3, 14), dtype=np.uint8))
    with pytest.raises(AdaptError, match="multi-label"):
        run(formatters.get("medmnist"), tmp_path / "chest.npz", tmp_path / "o2", progress=False, label_names=["a", "b"])
    with pytest.raises(AdaptError, match="label_names"):
        run(formatters.get("medmnist"), tmp_path / "odd.npz", tmp_path / "o3", progress=False)
    with pytest.raises(AdaptError, match="split=train"):
        run(formatters.get("medmnist"), tmp_path / "odd.npz", tmp_path / "o4", progress=False, split="val",
            label_names=["a", "b"])


# --------------------------------------------------------------------------------------------------
# Grounding and region
# --------------------------------------------------------------------------------------------------

def _assert_boxes_on_paint(record: dict, root: Path) -> None:
    """The 0..1000 boxes of the answer map back onto the painted pixels within one grid unit."""
    width, height = record["meta"]["image_size"]
    grid = bx.parse_boxes(answer(record))
    assert grid == record["meta"]["boxes"]
    for box, px in zip(grid, record["meta"]["boxes_px"]):
        assert box == [round(px[0] / width * 1000), round(px[1] / height * 1000),
                       round(px[2] / width * 1000), round(px[3] / height * 1000)]
        back = bx.from_grid(box, width, height)
        assert all(abs(b - p) <= max(width, height) / 1000 for b, p in zip(back, px))
    image = Image.open(root / record["image"])
    for box in grid:
        back = bx.from_grid(box, width, height)
        painted = syn.colour_box(image, syn.OBJECTS[record["meta"]["category"]], near=back)
        assert painted is not None
        assert all(abs(b - p) <= max(width, height) / 1000 for b, p in zip(back, painted))


def test_grounding_coco_boxes_round_trip_and_group(tmp_path):
    instances = syn.write_coco(tmp_path / "coco")
    coco = json.loads(instances.read_text())
    report, records, root = format_records("grounding", instances, tmp_path / "out", images="train2014")
    # one record per (image, category); image 1 has two vehicles
    assert len(records) == len({(a["image_id"], a["category_id"]) for a in coco["annotations"]}) == report.read
    for record in records:
        assert record["meta"]["task"] == "grounding"
        assert question(record).endswith(f"<ref>{record['meta']['expression']}</ref>")
        assert answer(record).startswith(f"<ref>{record['meta']['expression']}</ref><box>[[")
        _assert_boxes_on_paint(record, root)
    double = next(r for r in records if len(r["meta"]["boxes"]) == 2)
    truth = [bx.xywh_to_xyxy(a["bbox"]) for a in coco["annotations"] if a["image_id"] == 1 and a["category_id"] == 1]
    assert double["meta"]["boxes_px"] == truth and "]], [[" not in answer(double) and "], [" in answer(double)


def test_grounding_coco_rejects_normalized_bbox_in_pixel_field(tmp_path):
    instances = syn.write_coco(tmp_path / "coco", n_images=2)
    coco = json.loads(instances.read_text())
    coco["annotations"][-1]["bbox"] = [0.25, 0.3, 0.2, 0.15]
    instances.write_text(json.dumps(coco))
    report, records, _ = format_records("grounding", instances, tmp_path / "out", images="train2014")
    assert report.skipped == 1 and report.skips[0].row == len(coco["annotations"])
    assert "0..1" in report.skips[0].reason and "xywh_norm" in report.skips[0].reason
    report, converted, _ = format_records("region", instances, tmp_path / "norm", images="train2014",
                                          box_format="xywh_norm")
    assert len(converted) == 1 and report.skipped == len(coco["annotations"]) - 1  # the pixel boxes are refused
    width, height = converted[0]["meta"]["image_size"]
    assert converted[0]["meta"]["boxes_px"][0] == pytest.approx([0.25 * width, 0.3 * height, 0.45 * width, 0.45 * height])
    assert converted[0]["meta"]["boxes"] == [[250, 300, 450, 450]]
    with pytest.raises(AdaptError, match="outside 0..1"):
        run(formatters.get("region"), instances, tmp_path / "strict", progress=False, images="train2014",
            box_format="xywh_norm", strict=True)


def test_grounding_plain_rows_defects_are_counted_skips(tmp_path):
    path = syn.write_grounding_rows(tmp_path / "g")  # 4 good rows, lines 1..4, images 160x100
    (path.parent / "images" / "broken.png").write_bytes(b"nope")
    rows = [
        {"image": "images/scene_0.png", "expression": "off the edge", "box": [150, 10, 400, 50]},  # 5
        {"image": "images/scene_0.png", "expression": "a line", "box": [10, 10, 10, 40]},  # 6
        {"image": "images/ghost.png", "expression": "nothing", "box": [1, 1, 5, 5]},  # 7
        {"image": "images/broken.png", "expression": "broken", "box": [1, 1, 5, 5]},  # 8
        "{not json",  # 9
        {"image": "images/scene_0.png", "expression": "no box"},  # 10
        {"image": "images/scene_0.png", "expression": "", "box": [1, 1, 5, 5]},  # 11
    ]
    with open(path, "a", encoding="utf-8") as handle:
        for row in rows:
            handle.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    report, records, root = format_records("grounding", path, tmp_path / "out")
    assert len(records) == 4 and report.skipped == 7 and report.read == 11
    assert all(s.path == str(path) for s in report.skips)
    reasons = skips_by_row(report)
    assert "outside the 160x100 image" in reasons[5]
    assert "zero or negative area" in reasons[6]
    assert "image not found" in reasons[7]
    assert "corrupt image" in reasons[8]
    assert "malformed JSON" in reasons[9]
    assert "'box' or 'boxes'" in reasons[10]
    assert "referring expression" in reasons[11]
    for record in records:
        _assert_boxes_on_paint(record, root)
    with pytest.raises(AdaptError) as err:
        run(formatters.get("grounding"), path, tmp_path / "strict", strict=True, progress=False)
    assert f"{path}:5:" in str(err.value)


def test_grounding_normalized_boxes_are_converted_not_taken_as_pixels(tmp_path):
    path = syn.write_grounding_rows(tmp_path / "g", normalized=True)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    report, records, root = format_records("grounding", path, tmp_path / "out")
    assert len(records) == 4 and report.stats["normalized_boxes_converted"] == 4
    for row, record in zip(rows, records):
        assert record["meta"]["boxes"] == [[round(v * 1000) for v in row["box"]]]
        width, height = record["meta"]["image_size"]
        assert record["meta"]["boxes_px"][0] == pytest.approx([row["box"][0] * width, row["box"][1] * height,
                                                               row["box"][2] * width, row["box"][3] * height])
        _assert_boxes_on_paint(record, root)

    report, records, _ = format_records("grounding", path, tmp_path / "pixels", box_format="xyxy")
    assert records == [] and report.skipped == 4
    assert all("0..1" in s.reason and "xyxy_norm" in s.reason for s in report.skips)

    pixel_rows = syn.write_grounding_rows(tmp_path / "p")
    report, records, _ = format_records("grounding", pixel_rows, tmp_path / "wrong", box_format="xyxy_norm")
    assert records == [] and all("outside 0..1" in s.reason for s in report.skips)


def test_refcoco_refs_json_split_and_pickle_opt_in(tmp_path):
    syn.write_coco(tmp_path / "refcoco")
    refs_path = tmp_path / "refcoco" / "refs(unc).json"
    refs = json.loads(refs_path.read_text())
    coco = json.loads((tmp_path / "refcoco" / "instances.json").read_text())
    anns = {a["id"]: a for a in coco["annotations"]}
    report, records, root = format_records("grounding", tmp_path / "refcoco", tmp_path / "out", images="train2014",
                                           split="train")
    train = [r for r in refs if r["split"] == "train"]
    assert len(records) == sum(len(r["sentences"]) for r in train) and report.skipped == 0
    assert [r["meta"]["expression"] for r in records] == [s["sent"] for r in train for s in r["sentences"]]
    assert all(r["meta"]["source"] == "refcoco" for r in records)
    for record, (ref, _) in zip(records, [(r, s) for r in train for s in r["sentences"]]):
        assert record["meta"]["boxes_px"] == [bx.xywh_to_xyxy(anns[ref["ann_id"]]["bbox"])]
        _assert_boxes_on_paint(record, root)

    _, first_only, _ = format_records("grounding", refs_path, tmp_path / "first", images="train2014", sentences="first")
    assert len(first_only) == len(refs)

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(tmp_path / "refcoco" / "instances.json", pickled / "instances.json")
    with open(pickled / "refs(unc).p", "wb") as handle:
        pickle.dump(refs, handle)
    images = str(tmp_path / "refcoco" / "train2014")
    with pytest.raises(AdaptError, match="allow_pickle=True"):
        run(formatters.get("grounding"), pickled / "refs(unc).p", tmp_path / "p1", progress=False, images=images)
    _, from_pickle, _ = format_records("grounding", pickled / "refs(unc).p", tmp_path / "p2", images=images,
                                       allow_pickle=True, split="train")
    assert [r["conversations"] for r in from_pickle] == [r["conversations"] for r in records]


def test_dior_rsvg_splits_by_index_and_id(tmp_path):
    src = syn.write_dior_rsvg(tmp_path / "dior")
    train = [int(x) for x in (src / "train.txt").read_text().split()]
    objects = [(xml.stem, obj) for xml in sorted((src / "Annotations").glob("*.xml"))
               for obj in ET.parse(xml).getroot().findall("object")]
    report, records, root = format_records("grounding", src, tmp_path / "out", split="train")
    assert len(records) == len(train) == report.read
    for index, record in zip(train, records):
        stem, obj = objects[index]
        assert record["image"] == f"JPEGImages/{stem}.jpg"
        assert record["meta"]["expression"] == obj.findtext("description")
        assert record["meta"]["boxes_px"] == [[float(obj.findtext(f"bndbox/{t}")) for t in ("xmin", "ymin", "xmax", "ymax")]]
        _assert_boxes_on_paint(record, root)

    (src / "one_image.txt").write_text("00002\n")
    _, by_id, _ = format_records("grounding", src, tmp_path / "ids", split="one_image")
    assert {r["image"] for r in by_id} == {"JPEGImages/00002.jpg"}
    assert len(by_id) == sum(1 for stem, _ in objects if stem == "00002")

    (src / "Annotations" / "00000.xml").write_text("<annotation><object>")
    with pytest.raises(AdaptError, match="indices"):
        run(formatters.get("grounding"), src, tmp_path / "broken", progress=False, split="train")
    report, records, _ = format_records("grounding", src, tmp_path / "all")
    assert len(records) == len(objects) and report.skipped == 1
    assert report.skips[0].path.endswith("00000.xml") and "malformed XML" in report.skips[0].reason


def test_region_question_carries_the_box_and_answer_names_what_is_painted(tmp_path):
    instances = syn.write_coco(tmp_path / "coco")
    coco = json.loads(instances.read_text())
    report, records, root = format_records("region", instances, tmp_path / "out", images="train2014")
    assert len(records) == len(coco["annotations"]) == report.read
    for record in records:
        name = record["meta"]["answer"]
        box = bx.box_text(record["meta"]["boxes"])
        assert record["meta"]["task"] == "region" and name in syn.OBJECTS
        assert question(record).endswith(f"What object is in this location <box>{box}</box>?")
        assert answer(record) == f"{name}<box>{box}</box>"
        width, height = record["meta"]["image_size"]
        x1, y1, x2, y2 = bx.from_grid(record["meta"]["boxes"][0], width, height)
        pixel = Image.open(root / record["image"]).convert("RGB").getpixel((int((x1 + x2) / 2), int((y1 + y2) / 2)))
        assert pixel == syn.COLOURS[syn.OBJECTS[name]]

    src = syn.write_dior_rsvg(tmp_path / "dior")
    _, plain, _ = format_records("region", src, tmp_path / "dior_out", split="val", answer_box=False,
                                 answer_field="expression")
    assert plain and all(answer(r) == r["meta"]["expression"] and r["meta"]["expression"].startswith("the ")
                         for r in plain)


# --------------------------------------------------------------------------------------------------
# RSVQA
# --------------------------------------------------------------------------------------------------

def _true_of_image(record: dict, root: Path) -> bool:
    image = Image.open(root / record["image"]).convert("RGB")
    red = int((np.abs(np.asarray(image).astype(int) - syn.COLOURS["red"]).max(axis=-1) < 10).sum())
    buildings = red // 36
    meta = record["meta"]
    if meta["question_type"] == "presence":
        return meta["answer"] == ("yes" if syn.colour_box(image, "blue") else "no")
    if meta["question_type"] == "count":
        return meta["answer"] == str(buildings)
    return meta["answer"] == ("urban" if buildings >= 2 else "rural")


def test_rsvqa_join_by_ids_and_skips(tmp_path):
    src = syn.write_rsvqa(tmp_path / "rs")
    report, records, root = format_records("rsvqa", src, tmp_path / "out")
    # 3 train images, the last inactive; 2 of 3 questions active per image
    assert len(records) == 4 and report.stats["inactive_questions"] == 5 and report.skipped == 0
    assert all(_true_of_image(r, root) for r in records)
    for record in records:
        meta = record["meta"]
        assert meta["task"] == "vqa" and meta["source"] == "rsvqa_lr"
        assert meta["answer_type"] == ("closed" if meta["answer"] in ("yes", "no") else "open")
        assert answer(record) == meta["answer"] and question(record).startswith(f"<image>\n{meta['question']}")
    assert {r["meta"]["answer_type"] for r in records} == {"closed", "open"}

    questions_path = src / "LR_split_val_questions.json"
    data = json.loads(questions_path.read_text())
    data["questions"][0]["answers_ids"] = [999_999]  # row 1: dangling answer id
    data["questions"][2]["img_id"] = 12345  # row 3: unknown image
    questions_path.write_text(json.dumps(data))
    (src / "Images_LR" / f"{data['questions'][3]['img_id']}.tif").unlink()  # rows 4 and 6: image file gone
    report, records, root = format_records("rsvqa", src, tmp_path / "val", split="val")
    assert records == [] and report.skipped == 4
    assert all(s.path == str(questions_path) for s in report.skips)
    reasons = skips_by_row(report)
    assert "no active answer" in reasons[1] and "not in the images file" in reasons[3]
    assert "image not found" in reasons[4] and "image not found" in reasons[6]
    with pytest.raises(AdaptError, match="no active answer"):
        run(formatters.get("rsvqa"), src, tmp_path / "strict", progress=False, split="val", strict=True)

    _, presence, _ = format_records("rsvqa", src, tmp_path / "types", types="presence")
    assert [r["meta"]["question_type"] for r in presence] == ["presence", "presence"]


def test_rsvqa_hr_layout(tmp_path):
    src = syn.write_rsvqa(tmp_path / "hr", prefix="USGS", splits=("test",))
    _, records, root = format_records("rsvqa", src, tmp_path / "out", split="test")
    assert len(records) == 4 and all(r["image"].startswith("Data/") and r["meta"]["source"] == "rsvqa_hr"
                                     for r in records)
    assert all(_true_of_image(r, root) for r in records)


# --------------------------------------------------------------------------------------------------
# General instruction data
# --------------------------------------------------------------------------------------------------

def test_general_meta_file_with_two_roots(tmp_path):
    meta = syn.write_internvl_meta(tmp_path / "gen")
    with open(tmp_path / "gen" / "ds_a" / "ann.jsonl", "a", encoding="utf-8") as handle:
        handle.write("{broken\n")
    report, records, root = format_records("general", meta, tmp_path / "out")
    assert root == (tmp_path / "gen").resolve()
    assert [r["id"] for r in records] == ["ds_a/0", "ds_a/1", "ds_a/2", "ds_b/0", "ds_b/1", "ds_b/2"]
    assert records[0]["image"] == "ds_a/images/one.png" and records[4]["image"] == ["ds_b/pics/one.png", "ds_b/pics/two.png"]
    assert [r["meta"]["task"] for r in records] == ["vqa", "vqa", "text"] * 2
    assert "image" not in records[2] and records[3]["meta"]["source"] == "ds_b"
    assert report.stats["repeat_time"] == {"ds_b": 2.0}
    assert report.skipped == 1 and report.skips[0].row == 4 and report.skips[0].path.endswith("ann.jsonl")

    _, one, root = format_records("general", meta, tmp_path / "one", dataset="ds_b")
    assert root == (tmp_path / "gen" / "ds_b").resolve()
    assert [r["id"] for r in one] == ["0", "1", "2"] and one[0]["image"] == "pics/one.png"
    with pytest.raises(AdaptError, match="not in the meta file"):
        run(formatters.get("general"), meta, tmp_path / "none", progress=False, dataset="ds_c")


def test_general_llava_array_text_only_normalized_boxes_and_defects(tmp_path):
    path = syn.write_llava(tmp_path / "llava")
    original = json.loads(path.read_text())
    report, records, _ = format_records("general", path, tmp_path / "out")
    assert [r["id"] for r in records] == [str(r["id"]) for r in original]
    assert [r["meta"]["task"] for r in records] == ["vqa", "text", "vqa", "vqa", "text"]
    assert report.stats["rows_with_normalized_boxes"] == 1
    flagged = [r for r in records if r["meta"].get("normalized_boxes_in_text")]
    assert [r["id"] for r in flagged] == ["box"]
    assert flagged[0]["conversations"] == next(r for r in original if r["id"] == "box")["conversations"]

    (path.parent / "coco" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    extra = [
        {"id": "gone", "image": "coco/missing.png", "conversations": original[0]["conversations"]},  # row 6
        {"id": "bad", "image": "coco/bad.png", "conversations": original[0]["conversations"]},  # row 7
        {"id": "out", "image": "../escape.png", "conversations": original[0]["conversations"]},  # row 8
        {"id": "roles", "conversations": [{"from": "gpt", "value": "hi"}]},  # row 9
        "just a string",  # row 10
        {"id": 100, "image": "coco/a.png", "conversations": original[0]["conversations"]},  # row 11: repeated id
    ]
    path.write_text(json.dumps(original + extra))
    report, records, _ = format_records("general", path, tmp_path / "defects")
    assert len(records) == 6 and report.skipped == 5 and report.stats["duplicate_ids_renamed"] == 1
    assert records[-1]["id"] == "100#2"
    reasons = skips_by_row(report)
    assert set(reasons) == {6, 7, 8, 9, 10} and all(s.path == str(path) for s in report.skips)
    assert "file not found" in reasons[6] and "corrupt image" in reasons[7] and "escapes" in reasons[8]
    with pytest.raises(AdaptError) as err:
        run(formatters.get("general"), path, tmp_path / "strict", progress=False, strict=True)
    assert f"{path}:6:" in str(err.value)
