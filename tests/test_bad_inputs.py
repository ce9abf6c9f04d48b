"""The bad-input matrix: every kind of broken input a user can hand us, driven through the path a user
takes (`adapt format` / `adapt run` in process, two of them as real subprocesses), with its outcome.

Each case must end in one of two ways, never in a traceback or a record that disagrees with its image:
  * a counted skip: `report.json` of the formatter output (or the `Report` / `TrainResult.dropped`)
    lists the row with its file and row (or sample id) and a specific reason, and the good rows
    around it are written correctly;
  * a clean exit code 2: one `adapt: error:` message naming the file (and row) with a hint on what
    to do.
Every test appends its (area, case, outcome) row to `BAD_INPUT_MATRIX`; `tests/conftest.py` prints
the table at the end of the session.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from adapt.cli import main
from adapt.data import mixing
from adapt.data import records as rec
from adapt.errors import AdaptError, Report
from formatters.synthetic import sources as syn

REPO = Path(__file__).resolve().parents[1]
BAD_INPUT_MATRIX: list[tuple[str, str, str]] = []  # (area, case, outcome), printed by conftest
GOOD_BOX = (8, 8, 40, 30)  # the red patch of the good image every general fixture carries
# Real-data flags whose source does not exist: a config check that is missing fails fast (at
# formatting, with another message) instead of running the demo.
NO_DEMO = ("--data", "general=/nonexistent/rows.jsonl", "--general-ratio", "0", "--no-export")


def note(area: str, case: str, outcome: str, *temp: Path) -> None:
    """Add a matrix row; temporary folders become <tmp> so the table reads."""
    for folder in temp:
        for prefix in {str(folder.resolve()), str(folder)}:
            outcome = outcome.replace(prefix, "<tmp>")
    BAD_INPUT_MATRIX.append((area, case, " ".join(outcome.split())))


# ----------------------------------------------------------------------------------------- drivers


def cli(capsys, *argv: str | Path) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def user_error(capsys, *argv: str | Path, expect: tuple[str, ...], hint: bool = True) -> str:
    """Run the CLI, require a clean exit 2 whose message contains `expect` (and a hint); return it."""
    code, out, err = cli(capsys, *argv)
    assert code == 2, f"expected exit 2, got {code}\nstdout: {out}\nstderr: {err}"
    assert "Traceback" not in out + err
    assert err.count("adapt: error:") == 1, err
    err = err[err.index("adapt: error: ") :]  # after any progress bar of the model loader
    for fragment in expect:
        assert fragment in err, f"{fragment!r} not in {err!r}"
    if hint:
        assert "\n  hint: " in err, f"no hint on what to do: {err!r}"
    return "exit 2: " + err.removeprefix("adapt: error: ").strip()


def format_cli(
    capsys, kind: str, source: Path, out: Path, *options: str
) -> tuple[dict, list[dict], Path, str]:
    """`adapt format KIND` in process: (report.json, records re-validated against their files, image
    root, stdout)."""
    argv = ["format", kind, "--input", source, "--output", out]
    for option in options:
        argv += ["--opt", option]
    code, stdout, err = cli(capsys, *argv)
    assert code == 0, err
    assert "Traceback" not in stdout + err
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    records = [json.loads(line) for line in (out / "records.jsonl").read_text(encoding="utf-8").splitlines()]
    meta_root = next(iter(json.loads((out / "meta.json").read_text(encoding="utf-8")).values()))["root"]
    root = out if meta_root == "." else Path(meta_root)
    for record in records:
        assert rec.problems(record, root=root, check_files=True) == [], record
    assert report["written"] == len(records)
    return report, records, root, stdout


def the_skip(report: dict, stdout: str, where: str, reason: str, *, skipped: int = 1) -> str:
    """The one skip line of the report that starts with `where` (file:row) and carries `reason`."""
    assert report["skipped"] == skipped, report["skips"]
    lines = [s for s in report["skips"] if s.startswith(where) and reason in s]
    assert len(lines) == 1, f"no skip at {where} with {reason!r} in {report['skips']}"
    assert f"skipped {lines[0]}" in stdout, "the CLI must print the skip"
    return "counted skip: " + lines[0]


# ---------------------------------------------------------------------------------- general rows


def _conv(question: str, answer: str, role: str = "gpt") -> list[dict[str, str]]:
    return [{"from": "human", "value": question}, {"from": role, "value": answer}]


def general_source(tmp_path: Path, bad: dict | bytes) -> Path:
    """`ann.jsonl`: line 1 a good row (red patch at GOOD_BOX), line 2 the bad row; images under images/."""
    root = tmp_path / "src"
    (root / "images").mkdir(parents=True)
    syn.paint((64, 48), [("red", GOOD_BOX)]).save(root / "images" / "good.png")
    good = {
        "id": "good",
        "image": "images/good.png",
        "conversations": _conv("<image>\nWhat colour is the patch?", "red"),
    }
    lines = [json.dumps(good).encode(), bad if isinstance(bad, bytes) else json.dumps(bad).encode()]
    (root / "ann.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return root / "ann.jsonl"


def bad_image_row(name: str) -> dict:
    return {"id": "bad", "image": name, "conversations": _conv("<image>\nWhat colour is the patch?", "blue")}


def check_general(capsys, tmp_path: Path, source: Path, reason: str) -> str:
    """Format the two-row source; the good row is written (on its own image), the bad one skipped."""
    report, records, root, stdout = format_cli(capsys, "general", source, tmp_path / "out")
    assert report["read"] == 2 and [r["id"] for r in records] == ["good"]
    assert syn.colour_box(Image.open(root / records[0]["image"]), "red") == list(GOOD_BOX)
    return the_skip(report, stdout, f"{source}:2", reason)


def with_image_bytes(tmp_path: Path, name: str, data: bytes) -> Path:
    source = general_source(tmp_path, bad_image_row(f"images/{name}"))
    (source.parent / "images" / name).write_bytes(data)
    return source


def _png_bytes() -> bytes:
    import io

    buffer = io.BytesIO()
    syn.paint((64, 48), [("blue", (4, 4, 60, 44))]).save(buffer, format="PNG")
    return buffer.getvalue()


def test_corrupt_png(capsys, tmp_path):
    source = with_image_bytes(tmp_path, "bad.png", b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    note(
        "formatting",
        "corrupt PNG (garbage after the signature)",
        check_general(capsys, tmp_path, source, "corrupt image"),
        tmp_path,
    )


def test_truncated_png(capsys, tmp_path):
    data = _png_bytes()
    source = with_image_bytes(tmp_path, "cut.png", data[: len(data) // 2])
    note("formatting", "truncated PNG", check_general(capsys, tmp_path, source, "corrupt image"), tmp_path)


def test_truncated_jpeg_in_class_folder(capsys, tmp_path):
    source = syn.write_class_folders(tmp_path / "aid", per_class=1)
    good = (source / "river" / "river_000.jpg").read_bytes()
    (source / "river" / "river_001.jpg").write_bytes(good[: len(good) // 2])
    report, records, root, stdout = format_cli(capsys, "classification", source, tmp_path / "out")
    assert report["read"] == 5 and len(records) == 4
    for record in records:  # each written image shows its class colour
        colour = syn.LAND_COVER[record["meta"]["label"]]
        assert syn.colour_box(Image.open(root / record["image"]), colour) is not None
    outcome = the_skip(report, stdout, str(source / "river" / "river_001.jpg"), "image file is truncated")
    note("formatting", "truncated JPEG", outcome, tmp_path)


def test_corrupt_jpeg_bytes_in_grounding_rows(capsys, tmp_path):
    source = syn.write_grounding_rows(tmp_path / "g", n_images=1)
    (source.parent / "images" / "noise.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8)
    with open(source, "a", encoding="utf-8") as handle:
        handle.write(
            json.dumps({"image": "images/noise.jpg", "expression": "a car", "box": [1, 1, 9, 9]}) + "\n"
        )
    report, records, root, stdout = format_cli(capsys, "grounding", source, tmp_path / "out")
    assert len(records) == 2
    _boxes_on_paint(records, root)
    note(
        "formatting",
        "corrupt JPEG (noise after the SOI marker)",
        the_skip(report, stdout, f"{source}:3", "corrupt image"),
        tmp_path,
    )


def test_zero_byte_image(capsys, tmp_path):
    source = with_image_bytes(tmp_path, "empty.png", b"")
    note(
        "formatting",
        "zero-byte image file",
        check_general(capsys, tmp_path, source, "corrupt image"),
        tmp_path,
    )


def test_missing_image_file(capsys, tmp_path):
    source = general_source(tmp_path, bad_image_row("images/ghost.png"))
    outcome = check_general(capsys, tmp_path, source, "file not found: images/ghost.png")
    note("formatting", "missing image file", outcome, tmp_path)


def test_image_path_with_dotdot_escapes_root(capsys, tmp_path):
    (tmp_path / "outside.png").write_bytes(_png_bytes())  # exists, so only confinement can refuse it
    source = general_source(tmp_path, bad_image_row("../outside.png"))
    note(
        "formatting",
        "image path escaping the root with ../",
        check_general(capsys, tmp_path, source, "escapes the data root"),
        tmp_path,
    )


def test_absolute_image_path(capsys, tmp_path):
    (tmp_path / "outside.png").write_bytes(_png_bytes())
    source = general_source(tmp_path, bad_image_row(str(tmp_path / "outside.png")))
    note(
        "formatting",
        "absolute image path",
        check_general(capsys, tmp_path, source, "absolute path"),
        tmp_path,
    )


def test_symlink_pointing_out_of_root(capsys, tmp_path):
    secret = tmp_path / "elsewhere" / "secret.png"
    secret.parent.mkdir()
    secret.write_bytes(_png_bytes())
    source = general_source(tmp_path, bad_image_row("images/link.png"))
    (source.parent / "images" / "link.png").symlink_to(secret)
    note(
        "formatting",
        "symlink inside the root pointing out of it",
        check_general(capsys, tmp_path, source, "escapes the data root"),
        tmp_path,
    )


def test_wrong_placeholder_count(capsys, tmp_path):
    source = general_source(
        tmp_path,
        {
            "id": "bad",
            "image": "images/good.png",
            "conversations": _conv("<image>\n<image>\nWhat colour is the patch?", "red"),
        },
    )
    note(
        "formatting",
        "two <image> placeholders for one image",
        check_general(capsys, tmp_path, source, "2 <image> placeholder(s) for 1 image(s)"),
        tmp_path,
    )


def test_empty_answer(capsys, tmp_path):
    source = general_source(
        tmp_path,
        {"id": "bad", "image": "images/good.png", "conversations": _conv("<image>\nWhat colour?", "  ")},
    )
    note("formatting", "empty answer", check_general(capsys, tmp_path, source, "empty answer"), tmp_path)


def test_unknown_role(capsys, tmp_path):
    source = general_source(
        tmp_path,
        {
            "id": "bad",
            "image": "images/good.png",
            "conversations": _conv("<image>\nWhat colour?", "red", "assistant"),
        },
    )
    note(
        "formatting",
        "unknown role ('assistant')",
        check_general(capsys, tmp_path, source, "unknown role 'assistant'"),
        tmp_path,
    )


def test_non_utf8_line(capsys, tmp_path):
    line = json.dumps({"id": "bad", "conversations": _conv("Caf\u00e9?", "yes")}, ensure_ascii=False)
    source = general_source(tmp_path, line.encode("latin-1"))
    note(
        "formatting",
        "non-UTF-8 JSONL line (latin-1)",
        check_general(capsys, tmp_path, source, "not valid UTF-8"),
        tmp_path,
    )


def test_malformed_jsonl_line(capsys, tmp_path):
    source = general_source(tmp_path, b'{"id": "bad", "image": "images/good.png", "conversations": [')
    note(
        "formatting",
        "malformed JSONL line",
        check_general(capsys, tmp_path, source, "malformed JSON"),
        tmp_path,
    )


def test_strict_turns_a_skip_into_exit_2_without_traceback(tmp_path):
    """A real subprocess: the user sees one message with file:line and a hint, no traceback."""
    source = general_source(tmp_path, bad_image_row("images/ghost.png"))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "adapt.cli",
            "format",
            "general",
            "--input",
            str(source),
            "--output",
            str(tmp_path / "out"),
            "--strict",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert (
        f"adapt: error: {source}:2: " in result.stderr and "file not found: images/ghost.png" in result.stderr
    )
    assert "hint: fix the row, or run without --strict" in result.stderr
    assert not (tmp_path / "out").exists()  # nothing that looks complete is left behind
    message = result.stderr[result.stderr.index("adapt: error: ") :].removeprefix("adapt: error: ")
    note("formatting", "any bad row under --strict (subprocess)", "exit 2: " + message, tmp_path)


# ----------------------------------------------------------------------------------------- boxes


def _boxes_on_paint(records: list[dict], root: Path) -> None:
    """Every written box covers the painted object of its expression's colour (found independently)."""
    for record in records:
        image = Image.open(root / record["image"])
        colour = syn.OBJECTS[record["meta"]["category"]]
        for box in record["meta"]["boxes_px"]:
            found = syn.colour_box(image, colour, near=box)
            assert found is not None and all(abs(a - b) <= 1 for a, b in zip(found, box)), (
                record["id"],
                box,
                found,
            )


def test_normalized_box_in_a_pixel_field(capsys, tmp_path):
    instances = syn.write_coco(tmp_path / "coco", n_images=2)
    coco = json.loads(instances.read_text())
    coco["annotations"][-1]["bbox"] = [0.25, 0.3, 0.2, 0.15]  # COCO bbox is pixels: this is a 0..1 box
    instances.write_text(json.dumps(coco))
    report, records, root, stdout = format_cli(
        capsys, "grounding", instances, tmp_path / "out", "images=train2014"
    )
    _boxes_on_paint(records, root)
    assert all(max(box) > 1 for r in records for box in r["meta"]["boxes_px"])
    outcome = the_skip(report, stdout, f"{instances}:{len(coco['annotations'])}", "box_format='xywh_norm'")
    note("formatting", "0..1 box in a pixel field (COCO bbox)", outcome, tmp_path)


def _grounding_with(tmp_path: Path, row: dict) -> Path:
    source = syn.write_grounding_rows(tmp_path / "g", n_images=1)  # lines 1-2 good, images 160x100
    with open(source, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(row) + "\n")
    return source


def test_box_outside_the_image(capsys, tmp_path):
    source = _grounding_with(
        tmp_path, {"image": "images/scene_0.png", "expression": "off the edge", "box": [150, 10, 400, 50]}
    )
    report, records, root, stdout = format_cli(capsys, "grounding", source, tmp_path / "out")
    assert len(records) == 2
    _boxes_on_paint(records, root)
    note(
        "formatting",
        "box outside the image",
        the_skip(report, stdout, f"{source}:3", "outside the 160x100 image"),
        tmp_path,
    )


def test_zero_area_box(capsys, tmp_path):
    source = _grounding_with(
        tmp_path, {"image": "images/scene_0.png", "expression": "a line", "box": [10, 10, 10, 40]}
    )
    report, records, root, stdout = format_cli(capsys, "grounding", source, tmp_path / "out")
    assert len(records) == 2
    _boxes_on_paint(records, root)
    note(
        "formatting",
        "zero-area box",
        the_skip(report, stdout, f"{source}:3", "zero or negative area"),
        tmp_path,
    )


# ---------------------------------------------------------------------------------------- driving


@pytest.fixture(scope="module")
def bad_nuscenes(tmp_path_factory):
    """Five samples: 0 lists five cameras, 1 has a truncated CAM_FRONT_LEFT JPEG, 2 lacks its
    CAM_BACK_RIGHT file, 3 has a zero-size box; 4 is good. Formatted once through the CLI."""
    from formatters.synthetic.nuscenes import TRUTH_FILE, write_nuscenes

    base = tmp_path_factory.mktemp("bad_nuscenes")
    root = write_nuscenes(
        base / "ns",
        n_scenes=1,
        samples_per_scene=5,
        seed=2,
        drop_camera="CAM_BACK",
        corrupt_camera="CAM_FRONT_LEFT",
        missing_camera_file="CAM_BACK_RIGHT",
        degenerate_box=True,
        distractors=False,
    )
    out = base / "out"
    assert main(["format", "driving", "--input", str(root), "--output", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    tokens = [s["token"] for s in json.loads((root / TRUTH_FILE).read_text())["samples"]]
    assert report["read"] == 5 and report["skipped"] == 4
    assert {r["meta"]["sample_token"] for r in records} == {tokens[4]}  # only the good sample is written
    for record in records:
        assert rec.problems(record, root=out, check_files=True) == []
        assert Image.open(out / record["image"]).size == (2688, 896)  # the stitched 3x2 view, whole
    return base, root, report, tokens


def _driving_skip(report: dict, token: str, reason: str) -> str:
    lines = [s for s in report["skips"] if f"[{token}]" in s]
    assert len(lines) == 1 and reason in lines[0], (reason, report["skips"])
    return "counted skip: " + lines[0]


def test_sample_with_five_cameras(bad_nuscenes):
    base, root, report, tokens = bad_nuscenes
    note(
        "formatting",
        "driving sample with 5 cameras (CAM_BACK missing)",
        _driving_skip(report, tokens[0], "lacks camera(s) CAM_BACK"),
        base,
    )


def test_corrupt_camera_jpeg(bad_nuscenes):
    base, root, report, tokens = bad_nuscenes
    note(
        "formatting",
        "driving camera JPEG truncated",
        _driving_skip(report, tokens[1], "corrupt camera image"),
        base,
    )


def test_missing_camera_file(bad_nuscenes):
    base, root, report, tokens = bad_nuscenes
    note(
        "formatting",
        "driving camera file missing",
        _driving_skip(report, tokens[2], "camera image not found"),
        base,
    )


def test_zero_size_annotation_box(bad_nuscenes):
    base, root, report, tokens = bad_nuscenes
    note(
        "formatting",
        "driving annotation with a zero-size 3D box",
        _driving_skip(report, tokens[3], "zero or invalid size"),
        base,
    )


# ------------------------------------------------------------------------------- DICOM and video


def test_dicom_without_pixel_data(capsys, tmp_path):
    from formatters.synthetic.medical import write_dicom_folder

    folder = write_dicom_folder(tmp_path / "dicom")
    report, records, root, stdout = format_cli(capsys, "dicom", folder, tmp_path / "out")
    assert report["skipped"] == 3 and len(records) == 5  # nopixels, not_dicom, missing
    assert all(Image.open(root / r["image"]).format == "PNG" for r in records)
    files = [row[0] for row in csv.reader((folder / "labels.csv").read_text().splitlines())]
    line = 1 + files.index("nopixels.dcm")  # csv line numbers count the header as line 1
    outcome = the_skip(
        report, stdout, f"{folder / 'labels.csv'}:{line}", "DICOM has no pixel data: nopixels.dcm", skipped=3
    )
    note("formatting", "DICOM without pixel data", outcome, tmp_path)


def test_video_shorter_than_the_frame_count(capsys, tmp_path):
    from formatters.synthetic.video import write_clip

    root = tmp_path / "clips"
    write_clip(root / "long.mp4", 12)
    write_clip(root / "short.mp4", 4)
    with open(root / "annotations.csv", "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows(
            [
                ("video", "question", "answer"),
                ("long.mp4", "Does it get brighter?", "yes"),
                ("short.mp4", "Does it get brighter?", "yes"),
            ]
        )
    report, records, _, stdout = format_cli(capsys, "video", root, tmp_path / "out", "num_frames=8")
    assert [r["video"] for r in records] == ["long.mp4"] and records[0]["meta"]["clip_frames"] == 12
    outcome = the_skip(
        report, stdout, f"{root / 'annotations.csv'}:3", "short.mp4 has 4 frame(s), 8 requested"
    )
    note("formatting", "video shorter than the frame count", outcome, tmp_path)


def test_frame_folder_with_a_frame_linked_out_of_root(capsys, tmp_path):
    from formatters.synthetic.video import write_clip, write_frame_folder

    root = tmp_path / "videos"
    write_clip(root / "ok.mp4", 8)
    folder = write_frame_folder(root / "frames" / "clip", 8)
    outside = write_frame_folder(tmp_path / "elsewhere", 8)
    (folder / "frame_3.png").unlink()
    (folder / "frame_3.png").symlink_to(outside / "frame_3.png")
    with open(root / "annotations.csv", "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows(
            [
                ("video", "question", "answer"),
                ("ok.mp4", "Brighter?", "yes"),
                ("frames/clip", "Brighter?", "yes"),
            ]
        )
    for extract in ("false", "true"):
        report, records, _, stdout = format_cli(
            capsys, "video", root, tmp_path / f"out-{extract}", f"extract_frames={extract}"
        )
        assert [r["meta"]["clip"] for r in records] == ["ok.mp4"]
        outcome = the_skip(
            report, stdout, f"{root / 'annotations.csv'}:3", "'frames/clip/frame_3.png' escapes"
        )
    note("formatting", "video frame folder with a frame symlinked out of the root", outcome, tmp_path)


# ------------------------------------------------------------------------------- training data


def test_training_data_too_long_or_undecodable(tmp_path, one_thread):
    """One training run over raw records: an over-long sample is dropped before training with its
    id; a truncated JPEG (its header plans fine) is replaced at build time and named in a warning."""
    import io

    from adapt.checkpoints.models import load
    from adapt.training.trainer import TrainConfig, train

    syn.paint((896, 448), [("red", (40, 40, 200, 200))]).save(tmp_path / "wide.png")  # 2x1 grid + thumbnail
    buffer = io.BytesIO()
    syn.paint((448, 448), [("blue", (40, 40, 200, 200))]).save(buffer, format="JPEG", quality=95)
    (tmp_path / "cut.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    rows = [
        {
            "id": "too-long",
            "image": "wide.png",
            "conversations": _conv("<image>\nWhat colour?", "red"),
            "meta": {"source": "demo"},
        },
        {"id": "truncated", "image": "cut.jpg", "conversations": _conv("<image>\nWhat colour?", "blue")},
        *[
            {
                "id": f"text-{i}",
                "conversations": _conv(f"Count to {i + 2}.", " ".join(map(str, range(1, i + 3)))),
            }
            for i in range(2)
        ],
    ]
    config = TrainConfig(max_length=560, max_steps=3, pack=False, dataloader_num_workers=0, save_steps=1000, logging_steps=1)
    with pytest.warns(RuntimeWarning, match="sample truncated dropped while training: .*truncated") as caught:
        result = train(
            load("tiny", seed=0),
            [(r, str(tmp_path)) for r in rows],
            config,
            tmp_path / "ckpt",
            progress=False,
        )
    assert result.samples == 3 and result.steps == 3  # the run went on over the broken image's batch
    [skip] = result.dropped.skips
    assert skip.id == "too-long" and skip.row == 0 and "exceed max_length 560" in skip.reason
    assert "raise --max-length or lower --max-tiles" in skip.reason
    note(
        "training data",
        "sample longer than the token budget",
        f"dropped before training, counted in TrainResult.dropped: {skip}",
        tmp_path,
    )
    warning = next(str(w.message) for w in caught if "dropped while training" in str(w.message))
    note(
        "training data",
        "truncated JPEG in raw training records (header plans fine)",
        f"RuntimeWarning, stand-in without supervised tokens, run continues: {warning}",
        tmp_path,
    )


# ---------------------------------------------------------------------------------------- mixing


def _domain_sources(tmp_path: Path) -> list[mixing.Source]:
    """Two good domain records (an image row and a text row)."""
    source = general_source(tmp_path, {"id": "d2", "conversations": _conv("Hi?", "Hello.")})
    return mixing.load_sources(source, kind="domain", name="domain", report=Report())


def test_ratio_outside_zero_one(capsys, tmp_path):
    domain = _domain_sources(tmp_path)
    for ratio in (1.0, -0.25):
        with pytest.raises(AdaptError, match=r"must be in \[0, 1\)"):
            mixing.mix(domain, domain, general_ratio=ratio)
    outcome = user_error(
        capsys,
        "run",
        "--general-ratio",
        "1",
        "--runs-dir",
        tmp_path / "runs",
        "--quiet",
        expect=("general_ratio: input should be less than 1 (got 1.0)",),
    )
    assert not (tmp_path / "runs").exists()  # refused before anything is written
    note("mixing", "general ratio outside [0, 1) (1.0, -0.25)", outcome, tmp_path)


def test_empty_general_pool(capsys, tmp_path):
    domain = _domain_sources(tmp_path)
    with pytest.raises(AdaptError, match="no general data was given"):
        mixing.mix(domain, [], general_ratio=0.25)
    assert len(mixing.mix(domain, [], general_ratio=0.0).entries) == 2  # domain only is fine
    outcome = user_error(
        capsys,
        "run",
        "--domain",
        "driving",
        "--data",
        f"general={tmp_path / 'src' / 'ann.jsonl'}",
        "--general-ratio",
        "0.25",
        "--runs-dir",
        tmp_path / "runs",
        "--quiet",
        "--no-export",
        expect=("no general data was given", "--general"),
    )
    note("mixing", "general ratio > 0 with an empty general pool", outcome, tmp_path)


def test_general_source_without_usable_rows(tmp_path):
    source = general_source(
        tmp_path, {"id": "bad", "image": "images/good.png", "conversations": _conv("<image>", "")}
    )
    lines = source.read_bytes().splitlines()
    source.write_bytes(lines[1] + b"\n{broken\n")  # only bad rows left: an empty answer, broken JSON
    report = Report()
    with pytest.raises(AdaptError) as err:
        mixing.load_sources(source, kind="general", report=report)
    message = str(err.value)
    assert str(source) in message and "has no usable records" in message and "hint:" in message
    assert report.skipped == 2 and {s.row for s in report.skips} == {1, 2}
    note("mixing", "general source whose every row is bad", "AdaptError: " + message, tmp_path)


def test_unknown_domain(capsys, tmp_path):
    outcome = user_error(
        capsys,
        "run",
        "--domain",
        "cooking",
        "--runs-dir",
        tmp_path / "runs",
        "--quiet",
        expect=("unknown domain 'cooking'", "driving, medical, remote_sensing"),
    )
    note("mixing", "unknown domain", outcome, tmp_path)


# --------------------------------------------------------------------------------------- configs


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_unknown_training_mode(capsys, tmp_path):
    config = _write(tmp_path / "run.yaml", "domain: driving\ntrain:\n  mode: sideways\n")
    outcome = user_error(
        capsys,
        "run",
        "--config",
        config,
        "--runs-dir",
        tmp_path / "runs",
        "--quiet",
        expect=("unknown training mode 'sideways'", "full, partial, lora"),
    )
    note("configs", "unknown training mode", outcome, tmp_path)


def test_train_option_of_the_wrong_type(capsys, tmp_path):
    from adapt import api

    _, train_config, _ = api.resolve(
        api.RunConfig(train={"pack": "false", "max_steps": "3", "learning_rate": "1e-4"})
    )
    assert (train_config.pack, train_config.max_steps, train_config.learning_rate) == (False, 3, 1e-4)
    outcome = user_error(
        capsys,
        "run",
        "--train-opt",
        "num_train_epochs=many",
        *NO_DEMO,
        "--runs-dir",
        tmp_path / "runs",
        "--quiet",
        expect=("train.num_train_epochs", "\"many\""),
    )
    note("configs", "--train-opt value of the wrong type ('false', '1e-4' are converted)", outcome, tmp_path)


def test_model_folder_without_tokenizer(capsys, tmp_path):
    from adapt.checkpoints.models import load

    model_dir = tmp_path / "model"
    load("tiny", seed=0).model.save_pretrained(model_dir)  # config + weights, no tokenizer files
    outcome = user_error(
        capsys,
        "run",
        "--model",
        model_dir,
        *NO_DEMO,
        "--runs-dir",
        tmp_path / "runs",
        "--quiet",
        expect=(str(model_dir), "tokenizer"),
    )
    note("configs", "model folder missing its tokenizer", outcome, tmp_path)


def test_original_layout_checkpoint_as_model(capsys, tmp_path):
    model_dir = tmp_path / "InternVL2-1B"
    _write(
        model_dir / "config.json",
        json.dumps(
            {
                "architectures": ["InternVLChatModel"],
                "model_type": "internvl_chat",
                "llm_config": {"model_type": "qwen2"},
                "template": "Hermes-2",
            }
        ),
    )
    outcome = user_error(
        capsys,
        "run",
        "--model",
        model_dir,
        *NO_DEMO,
        "--runs-dir",
        tmp_path / "runs",
        "--quiet",
        expect=(str(model_dir), "original OpenGVLab", f"adapt convert {model_dir}"),
    )
    note("configs", "original-layout checkpoint passed as --model", outcome, tmp_path)


def test_unknown_key_in_run_config(capsys, tmp_path):
    config = _write(tmp_path / "run.yaml", "domain: driving\nlearning_rate: 1.0e-5\n")
    outcome = user_error(
        capsys,
        "run",
        "--config",
        config,
        "--runs-dir",
        tmp_path / "runs",
        "--quiet",
        expect=(str(config), "unknown config key(s): learning_rate", "accepted:"),
    )
    note("configs", "unknown key in a run config YAML", outcome, tmp_path)


def test_unknown_key_in_domain_recipe(capsys, tmp_path):
    recipe = _write(tmp_path / "crops.yaml", "name: crops\nsourcez:\n  - {kind: classification, path: x}\n")
    outcome = user_error(
        capsys,
        "run",
        "--domain",
        recipe,
        "--runs-dir",
        tmp_path / "runs",
        "--quiet",
        expect=(str(recipe), "unknown key(s) in domain recipe: sourcez"),
    )
    note("configs", "unknown key in a domain recipe YAML", outcome, tmp_path)


def test_unknown_eval_key_in_domain_recipe(capsys, tmp_path):
    recipe = _write(tmp_path / "crops.yaml", "name: crops\neval: {holdot: 5}\n")
    outcome = user_error(
        capsys,
        "run",
        "--domain",
        recipe,
        *NO_DEMO,
        "--runs-dir",
        tmp_path / "runs",
        "--quiet",
        expect=("holdot",),
    )
    note("configs", "unknown eval key in a domain recipe", outcome, tmp_path)


def test_wrong_type_in_run_config(capsys, tmp_path):
    config = _write(tmp_path / "run.yaml", "domain: driving\ngeneral_ratio: a quarter\n")
    outcome = user_error(
        capsys,
        "run",
        "--config",
        config,
        "--runs-dir",
        tmp_path / "runs",
        "--quiet",
        expect=(str(config), "general_ratio", "\"a quarter\""),
    )
    assert not (tmp_path / "runs").exists()
    note("configs", "run config value of the wrong type", outcome, tmp_path)


def test_malformed_yaml_subprocess(tmp_path):
    config = _write(tmp_path / "run.yaml", "domain: driving\n  general_ratio: [0.25\n")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "adapt.cli",
            "run",
            "--config",
            str(config),
            "--runs-dir",
            str(tmp_path / "runs"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr + result.stdout
    assert result.stderr.startswith(f"adapt: error: {config}: config file is not valid YAML")
    assert "line 2" in result.stderr  # where in the file
    note(
        "configs",
        "malformed YAML (subprocess)",
        "exit 2: " + result.stderr.removeprefix("adapt: error: "),
        tmp_path,
    )


def test_resume_from_a_folder_with_a_broken_config(capsys, tmp_path):
    run_dir = tmp_path / "run"
    _write(run_dir / "config.yaml", "run: {domain: driving, bogus: 1}\n")
    outcome = user_error(capsys, "run", "--resume", run_dir, expect=(str(run_dir / "config.yaml"), "bogus"))
    user_error(
        capsys, "export", run_dir, "--out", tmp_path / "export", expect=(str(run_dir / "config.yaml"),)
    )
    note("configs", "--resume / export of a run whose config.yaml is damaged", outcome, tmp_path)


def test_unknown_formatter_kind(capsys, tmp_path):
    outcome = user_error(
        capsys,
        "format",
        "nuscenes",
        "--input",
        tmp_path,
        "--output",
        tmp_path / "out",
        expect=("unknown formatter kind 'nuscenes'", "driving"),
    )
    note("configs", "unknown formatter kind", outcome, tmp_path)


def test_missing_input(capsys, tmp_path):
    outcome = user_error(
        capsys,
        "format",
        "general",
        "--input",
        tmp_path / "nope.jsonl",
        "--output",
        tmp_path / "out",
        expect=(str(tmp_path / "nope.jsonl"), "input not found"),
    )
    note("configs", "formatter input that does not exist", outcome, tmp_path)
