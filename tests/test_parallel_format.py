"""Parallel formatting (`formatters.base.run(..., num_proc=N)`): the output is the same bytes as one
process's, for any number of processes, bad rows included; strict runs fail on the first bad row
in file order; a dead worker leaves nothing behind; tiny inputs start no worker.

The real thresholds keep inputs this small in one process (starting a worker costs about a second),
so `eager` gives each formatter a worker for every unit of work.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from adapt.errors import AdaptError, Report
from formatters import base
from formatters.base import Formatter, run
from formatters.classification import CLASSIFICATION
from formatters.driving import DRIVING
from formatters.synthetic.nuscenes import write_drivelm, write_nuscenes


def eager(formatter: Formatter) -> Formatter:
    def plan(*args, **kwargs):
        return dataclasses.replace(formatter.plan(*args, **kwargs), min_per_process=1)

    return dataclasses.replace(formatter, plan=plan)


def files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_same_output(formatter: Formatter, source: Path, tmp_path: Path, num_proc: int,
                       **options) -> tuple[dict[str, bytes], Report]:
    one = run(formatter, source, tmp_path / "one", progress=False, num_proc=1, **options)
    many = run(eager(formatter), source, tmp_path / "many", progress=False, num_proc=num_proc, **options)
    assert many.timing["workers"] == num_proc and "workers" not in one.timing
    expected, got = files(tmp_path / "one"), files(tmp_path / "many")
    assert sorted(got) == sorted(expected)
    for name in expected:
        assert got[name] == expected[name], name
    assert one.to_dict() == many.to_dict()
    return expected, many


@pytest.fixture(scope="module")
def nuscenes(tmp_path_factory) -> Path:
    """Good samples, then (in a second scene) one sample each without a camera, with a corrupt and a
    missing camera file (skipped while stitching, in a worker) and with a degenerate box."""
    root = write_nuscenes(tmp_path_factory.mktemp("ns") / "good", n_scenes=2, samples_per_scene=4, seed=0)
    bad = write_nuscenes(tmp_path_factory.mktemp("ns") / "bad", n_scenes=1, samples_per_scene=5, seed=1,
                         drop_camera="CAM_BACK", corrupt_camera="CAM_FRONT_LEFT",
                         missing_camera_file="CAM_BACK_RIGHT", degenerate_box=True)
    write_drivelm(root.parent / "drivelm.json", root, unknown_frame=True, bad_tag=True)
    return root, bad


def test_driving_output_is_byte_identical_with_three_processes(nuscenes, tmp_path):
    good, _ = nuscenes
    out, _ = assert_same_output(DRIVING, good, tmp_path, 3)
    assert sum(name.endswith(".jpg") for name in out) == 8


def test_bad_samples_are_merged_in_order(nuscenes, tmp_path):
    _, bad = nuscenes
    assert_same_output(DRIVING, bad, tmp_path, 3)
    report = run(eager(DRIVING), bad, tmp_path / "again", progress=False, num_proc=3)
    expected = ["sample lacks camera(s) CAM_BACK", "annotation ", "corrupt camera image", "camera image not found"]
    # planning skips (a missing camera, a degenerate box) first, then the stitching skips of the
    # workers (one sample each), in sample order
    assert len(report.skips) == len(expected)
    assert all(skip.reason.startswith(start) for skip, start in zip(report.skips, expected)), report.skips
    assert report.timing["workers"] == 3 and report.written > 0


def test_drivelm_output_is_byte_identical(nuscenes, tmp_path):
    good, _ = nuscenes
    assert_same_output(DRIVING, good, tmp_path / "qa", 2, drivelm=str(good.parent / "drivelm.json"))
    assert_same_output(DRIVING, good, tmp_path / "frame", 2, drivelm=str(good.parent / "drivelm.json"), per="frame")


def test_strict_fails_on_the_first_bad_row_in_order(tmp_path):
    """Samples 1 (corrupt) and 2 (missing) fall in different workers: the error names sample 1,
    whichever worker stops first, and nothing is left in place."""
    root = write_nuscenes(tmp_path / "ns", n_scenes=1, samples_per_scene=5, seed=1,
                          corrupt_camera="CAM_FRONT_LEFT", missing_camera_file="CAM_BACK_RIGHT")
    with pytest.raises(AdaptError) as one:
        run(DRIVING, root, tmp_path / "one", progress=False, strict=True, num_proc=1)
    with pytest.raises(AdaptError) as many:
        run(eager(DRIVING), root, tmp_path / "many", progress=False, strict=True, num_proc=3)
    assert "corrupt camera image" in str(many.value) and str(many.value) == str(one.value)
    assert many.value.path == one.value.path and many.value.hint == one.value.hint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ns"]


def _dying_work(context, units, out, report):
    """A worker that is killed after its first unit (as the OOM killer would)."""
    yield from DRIVING.work(context, units[:1], out, report)
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_killed_worker_leaves_nothing(nuscenes, tmp_path):
    good, _ = nuscenes
    dying = eager(dataclasses.replace(DRIVING, work=_dying_work))
    with pytest.raises(AdaptError, match="worker process died"):
        run(dying, good, tmp_path / "out", progress=False, num_proc=2)
    assert list(tmp_path.iterdir()) == []


def test_tiny_inputs_start_no_worker(nuscenes, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a worker pool was started for a tiny input")

    monkeypatch.setattr(base, "ProcessPoolExecutor", refuse)
    _, bad = nuscenes
    report = run(DRIVING, bad, tmp_path / "out", progress=False, num_proc=8)
    assert report.written > 0 and "workers" not in report.timing


def test_classification_output_is_byte_identical(tmp_path):
    """A label file whose rows fall in three workers: an EXIF-rotated image used by the first and the
    last row (its normalisation counted once, as one process counts it), a corrupt and a missing
    image, an unknown label and a row without a label, each a skip at its row."""
    folder = tmp_path / "src"
    (folder / "img").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (20 + i, 30, 3), dtype=np.uint8)).save(folder / "img" / f"{i}.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    Image.fromarray(rng.integers(0, 256, (16, 40, 3), dtype=np.uint8)).save(folder / "img" / "turned.jpg", exif=exif)
    (folder / "img" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    rows = [("img/turned.jpg", "cat"), ("img/0.png", "dog"), ("img/1.png", "cat"), ("img/broken.png", "dog"),
            ("img/2.png", "bird"), ("img/missing.png", "cat"), ("img/3.png", ""), ("img/4.png", "dog"),
            ("img/5.png", "cat"), ("./img/turned.jpg", "dog")]
    (folder / "labels.csv").write_text("image,label\n" + "".join(f"{i},{label}\n" for i, label in rows))
    options = {"classes": ["cat", "dog"], "shuffle": True}
    _, report = assert_same_output(CLASSIFICATION, folder / "labels.csv", tmp_path / "csv", 3, **options)
    assert report.stats["images_normalized"] == {"EXIF orientation 6 applied": 1}
    assert report.written == 6 and [skip.row for skip in report.skips] == [5, 6, 7, 8]


def test_class_folders_output_is_byte_identical(tmp_path):
    rng = np.random.default_rng(1)
    for label in ("forest", "river", "desert"):
        (tmp_path / "src" / label).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(tmp_path / "src" / label / f"{i}.jpg")
    (tmp_path / "src" / "river" / "notes.txt").write_text("not an image")
    (tmp_path / "src" / "desert" / "2.jpg").write_bytes(b"not a jpeg")
    _, report = assert_same_output(CLASSIFICATION, tmp_path / "src", tmp_path / "out", 2, max_choices=2)
    assert report.written == 11 and report.skipped == 1 and report.stats["ignored_files"] == 1


def test_num_proc_on_the_command_line(nuscenes, tmp_path, monkeypatch, capsys):
    from adapt import api
    from adapt.cli import main

    _, bad = nuscenes
    assert main(["format", "driving", "--input", str(bad), "--output", str(tmp_path / "out"), "--num-proc", "1"]) == 0
    assert files(tmp_path / "out") == files(run_to(tmp_path / "ref", bad, num_proc=2))
    with pytest.raises(SystemExit) as exited:
        main(["format", "driving", "--input", str(bad), "--output", str(tmp_path / "o2"), "--num-proc", "0"])
    assert exited.value.code == 2 and "--num-proc: expected a whole number >= 1, got '0'" in capsys.readouterr().err
    seen = {}

    def fake_run(config, **kwargs):
        seen["num_proc"] = config.num_proc
        raise AdaptError("stop here")

    monkeypatch.setattr(api, "run", fake_run)
    assert main(["run", "--domain", "driving", "--num-proc", "3"]) == 2
    assert seen == {"num_proc": 3}


def run_to(out: Path, source: Path, **options) -> Path:
    run(DRIVING, source, out, progress=False, **options)
    return out


def test_one_progress_bar_counts_every_record(nuscenes, tmp_path):
    import io

    from tqdm import tqdm

    good, _ = nuscenes
    for num_proc in (1, 2):
        bar = tqdm(file=io.StringIO(), mininterval=0)
        report = run(eager(DRIVING), good, tmp_path / f"out{num_proc}", progress=bar, num_proc=num_proc)
        assert bar.n == report.written > 0


def test_dicom_output_is_byte_identical(tmp_path):
    """Every file of the DICOM fixture twice (a file rendered by two workers, replaced atomically) and
    a row without a label: the same PNGs, records and skips as one process."""
    import csv

    from formatters.medical import DICOM
    from formatters.synthetic.medical import write_dicom_folder

    folder = write_dicom_folder(tmp_path / "dicom")
    with open(folder / "labels.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    with open(folder / "twice.csv", "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([rows[0], *rows[1:], ("ct.dcm", ""), *rows[1:]])
    out, report = assert_same_output(DICOM, folder, tmp_path / "out", 3, labels=str(folder / "twice.csv"))
    assert report.written == 10 and report.skipped == 7
    assert sorted(name for name in out if name.endswith(".png")) == [
        f"images/{name}.png" for name in ("cr", "ct", "mr_multiframe", "mr_voilut", "us_rgb")]


@pytest.mark.parametrize("extract", [False, True])
def test_video_output_is_byte_identical(tmp_path, extract):
    """Clips, a frame folder, a short, a broken and a missing clip over three workers, with the clips
    kept or their frames extracted as JPEGs."""
    from formatters.synthetic.video import write_video_dataset
    from formatters.video import VIDEO

    folder = write_video_dataset(tmp_path / "video")
    out, report = assert_same_output(VIDEO, folder, tmp_path / "out", 3, extract_frames=extract)
    assert report.written == 3 and report.skipped == 3
    assert sum(name.endswith(".jpg") for name in out) == (24 if extract else 0)


@pytest.fixture
def grounding_rows(tmp_path) -> Path:
    """Plain grounding rows over four images shared by several rows (one EXIF-rotated, used first and
    last), with reader skips (a malformed line, a row without a box) among check skips (a box
    outside the image, a missing image, an empty expression)."""
    import json

    folder = tmp_path / "g"
    folder.mkdir()
    rng = np.random.default_rng(2)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rng.integers(0, 256, (80, 60, 3), dtype=np.uint8)).save(folder / "turned.jpg", exif=exif)
    rows = [{"image": "turned.jpg", "expression": "a car", "box": [1, 2, 30, 40]},
            {"image": "0.png", "expression": "a tree", "box": [0.1, 0.1, 0.5, 0.5]},
            "{broken",
            {"image": "1.png", "expression": "a sign", "box": [5, 5, 200, 20]},
            {"image": "2.png", "expression": "a road"},
            {"image": "ghost.png", "expression": "a cat", "box": [1, 1, 5, 5]},
            {"image": "0.png", "expression": "", "box": [1, 1, 5, 5]},
            {"image": "1.png", "expression": "a bus", "boxes": [[1, 1, 20, 20], [30, 30, 50, 50]]},
            {"image": "./turned.jpg", "expression": "a bike", "box": [3, 3, 9, 9]}]
    (folder / "rows.jsonl").write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return folder / "rows.jsonl"


def test_grounding_and_region_output_is_byte_identical(grounding_rows, tmp_path):
    from formatters.grounding import GROUNDING
    from formatters.region import REGION

    _, report = assert_same_output(GROUNDING, grounding_rows, tmp_path / "grounding", 3)
    assert report.written == 4 and [skip.row for skip in report.skips] == [3, 4, 5, 6, 7]
    assert report.stats["images_normalized"] == {"EXIF orientation 6 applied": 1}
    assert_same_output(REGION, grounding_rows, tmp_path / "region", 3)


def test_grounding_strict_stops_on_the_first_bad_line(grounding_rows, tmp_path):
    """Line 3 (malformed, found while reading) comes before line 4 (box outside the image, found while
    checking, in another worker): the error names line 3, as one pass over the file does."""
    from formatters.grounding import GROUNDING

    with pytest.raises(AdaptError) as one:
        run(GROUNDING, grounding_rows, tmp_path / "one", progress=False, strict=True, num_proc=1)
    with pytest.raises(AdaptError) as many:
        run(eager(GROUNDING), grounding_rows, tmp_path / "many", progress=False, strict=True, num_proc=3)
    assert str(many.value) == str(one.value) and f"{grounding_rows}:3:" in str(one.value)


def test_general_output_is_byte_identical(tmp_path, monkeypatch):
    """An InternVL meta file of two datasets read in 600-byte ranges by three processes: bad rows in
    file order, a repeated id renamed once, a 16-bit image counted for each row using it, paths rebased."""
    from formatters import general

    monkeypatch.setattr(general, "UNIT_BYTES", 600)
    rng = np.random.default_rng(3)
    for name in ("a", "b"):
        (tmp_path / "data" / name).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).save(tmp_path / "data" / name / "x.png")
    Image.fromarray(np.full((8, 8), 40000, np.uint16)).save(tmp_path / "data" / "a" / "deep.png")
    (tmp_path / "data" / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")

    def row(i: int, image: str | None, ident: str | None = None) -> str:
        record = {"id": ident or f"r{i}", "conversations": [{"from": "human", "value": f"question {i}?"},
                                                             {"from": "gpt", "value": f"answer {i}"}]}
        if image:
            record["image"] = image
            record["conversations"][0]["value"] = "<image>\n" + record["conversations"][0]["value"]
        return json.dumps(record)

    lines = []
    for i in range(60):
        image = ["x.png", "deep.png", None, "broken.png" if i == 19 else "x.png"][i % 4]
        lines.append(row(i, image, ident="dup" if i in (5, 41) else None))
    lines[9] = "{not json"
    lines[30] = row(30, "../b/x.png")  # escapes its dataset root
    lines[44] = row(44, "missing.png")
    (tmp_path / "data" / "a" / "a.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "data" / "b" / "b.jsonl").write_text("\n".join(row(i, "x.png") for i in range(25)) + "\n")
    (tmp_path / "meta.json").write_text(json.dumps({
        "a": {"root": str(tmp_path / "data" / "a"), "annotation": str(tmp_path / "data" / "a" / "a.jsonl")},
        "b": {"root": str(tmp_path / "data" / "b"), "annotation": str(tmp_path / "data" / "b" / "b.jsonl")}}))
    out, report = assert_same_output(general.GENERAL, tmp_path / "meta.json", tmp_path, 3)
    assert len(general._plan_rows(tmp_path / "meta.json", tmp_path, Report()).units) > 6
    assert [s.row for s in report.skips] == [10, 20, 31, 45]
    deep = sum('"deep.png"' in line for line in lines)
    assert deep == 14 and report.stats["images_normalized"] == {"16-bit image scaled by 65535/255": deep}
    records = [json.loads(line) for line in out["records.jsonl"].decode().splitlines()]
    assert len(records) == 60 - 4 + 25 and records[0]["image"] == "a/x.png" and records[-1]["id"] == "b/r24"
    assert [r["id"] for r in records if r["id"].startswith("a/dup")] == ["a/dup", "a/dup#2"]
    # distinct string ids: the parts are concatenated as written, no record is parsed again
    monkeypatch.setattr(base, "_read_part", lambda path: pytest.fail("read back although every id is distinct"))
    (tmp_path / "meta_b.json").write_text(json.dumps({"b": {"root": str(tmp_path / "data" / "b"),
                                                            "annotation": str(tmp_path / "data" / "b" / "b.jsonl")}}))
    got = run(eager(general.GENERAL), tmp_path / "meta_b.json", tmp_path / "b_only", progress=False, num_proc=3)
    assert got.written == 25 and got.timing["workers"] == 3
