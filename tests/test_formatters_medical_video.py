"""Medical and video formatters end to end on small fixtures in the real release formats.

Expected values are reasoned from the fixture definitions (formatters/synthetic/*) and the
published rules (DICOM PS3.3 C.11.2 windowing, InternVL's segment sampling), not read back from
the code under test.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

import formatters
from adapt.data.video import (
    TooFewFrames,
    expand_video_placeholder,
    frame_files,
    read_frame_folder,
    read_video_frames,
    segment_frame_indices,
    video_prompt,
)
from adapt.errors import AdaptError
from formatters.base import run
from formatters.medical import parse_window, render_dicom
from formatters.synthetic import medical as med
from formatters.synthetic import video as vid


def _run(kind: str, source: Path, out: Path, **options) -> tuple[list[dict], dict, object]:
    report = run(formatters.get(kind), source, out, progress=False, **options)
    records = [json.loads(line) for line in (out / "records.jsonl").read_text(encoding="utf-8").splitlines()]
    meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    return records, meta, report


def _human(record: dict) -> str:
    return record["conversations"][0]["value"]


def _answer(record: dict) -> str:
    return record["conversations"][1]["value"]


# ---------------------------------------------------------------------------------------- VQA-RAD


def test_vqa_rad_records_answer_types_and_skips(tmp_path):
    source = med.write_vqa_rad(tmp_path / "rad").parent  # the folder: the json is found by its release name
    records, meta, report = _run("vqa-rad", source, tmp_path / "out")
    assert [r["meta"]["qid"] for r in records] == [1, 2, 3, 4]
    assert [r["meta"]["answer_type"] for r in records] == ["closed", "closed", "open", "open"]  # source labels
    assert _answer(records[3]) == records[3]["meta"]["answer"] == "2"  # int answer in the json
    assert records[0]["meta"]["choices"] == ["yes", "no"] and "choices" not in records[1]["meta"]
    assert _human(records[0]) == "<image>\nIs there a pneumothorax?"
    assert records[0]["meta"]["task"] == "vqa" and records[0]["meta"]["domain"] == "medical"
    root = Path(meta["vqa-rad"]["root"])
    assert root.name == "VQA_RAD Image Folder" and (root / records[0]["image"]).is_file()
    assert report.read == 6 and report.written == 4
    assert sorted(report.reasons()) == ["image not found", "missing field(s)"]
    test_only, _, _ = _run("vqa-rad", source, tmp_path / "test", split="test")
    assert [r["meta"]["qid"] for r in test_only] == [3, 4]  # phrase_type test_*


# ------------------------------------------------------------------------------------------ SLAKE


def test_slake_english_by_default_and_other_languages(tmp_path):
    source = med.write_slake(tmp_path / "slake")
    records, meta, report = _run("slake", source, tmp_path / "en")
    assert [_answer(r) for r in records] == ["CT", "Yes"]
    assert {r["meta"]["lang"] for r in records} == {"en"}
    assert [r["meta"]["answer_type"] for r in records] == ["open", "closed"]
    assert records[0]["image"] == "xmlab0/source.jpg" and meta["slake"]["root"].endswith("imgs")
    assert report.stats["other_language_rows"] == 2 and list(report.reasons()) == ["image not found"]
    chinese, _, _ = _run("slake", source, tmp_path / "zh", lang="zh")
    assert [_answer(r) for r in chinese] == ["CT", "是"]
    test_all, _, _ = _run("slake", source, tmp_path / "test", split="test", lang="all")
    assert [r["meta"]["split"] for r in test_all] == ["test", "test"] and len({r["id"] for r in test_all}) == 2


# ---------------------------------------------------------------------------------------- PMC-VQA


@pytest.mark.parametrize("answer_column", ["Answer", "Anwser"])
def test_pmc_vqa_both_spellings(tmp_path, answer_column):
    csv_path = med.write_pmc_vqa(tmp_path / "pmc", answer_column=answer_column)
    records, _, report = _run("pmc-vqa", csv_path, tmp_path / "out")
    assert [_answer(r) for r in records] == ["B", "C", "D"]  # label B, label C, answer text = choice D
    first = records[0]
    assert _human(first) == ("<image>\nWhat imaging modality was used?\nA. CT\nB. MRI\nC. X-ray\nD. Ultrasound\n"
                             "Answer with the option's letter from the given choices directly.")
    assert first["meta"]["choices"] == ["A", "B", "C", "D"] and first["meta"]["answer_text"] == "MRI"
    assert records[2]["meta"]["options"]["D"] == "Calcification"
    assert {r["meta"]["answer_type"] for r in records} == {"closed"}
    assert [s.row for s in report.skips] == [5, 6]  # answer matching no choice; missing figure
    assert sorted(report.reasons()) == ["answer matches no single choice", "image not found"]


def test_pmc_vqa_without_answer_column_is_a_user_error(tmp_path):
    csv_path = med.write_pmc_vqa(tmp_path / "pmc", answer_column="Solution")
    with pytest.raises(AdaptError, match="Answer"):
        _run("pmc-vqa", csv_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------- PathVQA


def test_pathvqa_pickle_needs_explicit_opt_in(tmp_path):
    pkl = med.write_pathvqa_pickle(tmp_path / "pv")
    with pytest.raises(AdaptError, match="arbitrary code") as caught:
        _run("pathvqa", pkl, tmp_path / "refused")
    assert "allow_pickle=True" in str(caught.value) and str(pkl) in str(caught.value)
    assert not (tmp_path / "refused").exists()
    with pytest.raises(AdaptError, match="arbitrary code"):  # a truthy string is not an explicit opt-in
        _run("pathvqa", pkl.parents[2], tmp_path / "refused2", allow_pickle="yes")
    records, meta, _ = _run("pathvqa", pkl, tmp_path / "ok", allow_pickle=True)
    assert [(r["image"], _answer(r), r["meta"]["answer_type"]) for r in records] == [
        ("train_0000.jpg", "yes", "closed"), ("train_0001.jpg", "neutrophils", "open")]
    assert Path(meta["pathvqa"]["root"]) == (pkl.parents[2] / "images" / "train").resolve()


def test_pathvqa_parquet_mirror_writes_pngs(tmp_path):
    pytest.importorskip("pyarrow.parquet", reason="pyarrow does not import here (pyarrow 26 needs numpy 2)",
                        exc_type=ImportError)
    source = med.write_pathvqa_parquet(tmp_path / "pq")
    records, meta, report = _run("pathvqa", source, tmp_path / "out")
    assert [_answer(r) for r in records] == ["yes", "hematoxylin and eosin", "no"]  # struct, struct, binary
    assert [r["meta"]["answer_type"] for r in records] == ["closed", "open", "closed"]
    assert meta["pathvqa"]["root"] == "." and list(report.reasons()) == ["corrupt image bytes"]
    png = Image.open(tmp_path / "out" / records[0]["image"])
    assert png.format == "PNG" and png.mode == "RGB"
    assert np.array_equal(np.asarray(png), np.asarray(med._picture(30)))  # lossless copy of the PNG row
    test_split, _, _ = _run("pathvqa", source, tmp_path / "test", split="test")
    assert [_answer(r) for r in test_split] == ["liver"]


# ------------------------------------------------------------------------------------------ DICOM


@pytest.fixture(scope="module")
def dicom_dir(tmp_path_factory):
    return med.write_dicom_folder(tmp_path_factory.mktemp("dicom"))


def _grey_of_hu(image: np.ndarray, hu: int) -> int:
    """The grey level the CT fixture's pixels of value `hu` rendered to (all of them must agree)."""
    levels = set(image[..., 0][np.equal(med.CT_HU, hu)].tolist())
    assert len(levels) == 1
    return levels.pop()


def test_dicom_ct_uses_rescale_and_file_window(dicom_dir):
    rgb = render_dicom(dicom_dir / "ct.dcm")
    assert rgb.shape == (4, 5, 3) and rgb.dtype == np.uint8
    assert np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])
    # Window 40/400, DICOM LINEAR: y = ((x - 39.5) / 399 + 0.5) * 255, clipped. With the 0.5 slope applied:
    assert _grey_of_hu(rgb, -1000) == 0 and _grey_of_hu(rgb, -160) == 0  # at or below 39.5 - 199.5
    assert _grey_of_hu(rgb, 40) == 128  # 127.82
    assert _grey_of_hu(rgb, 140) == 192  # 191.73
    assert _grey_of_hu(rgb, 0) == 102  # 102.26
    assert _grey_of_hu(rgb, 1000) == 255 and _grey_of_hu(rgb, 400) == 255


def test_dicom_chosen_window_overrides_the_file(dicom_dir):
    lung = render_dicom(dicom_dir / "ct.dcm", window="lung")  # center -600, width 1500
    assert _grey_of_hu(lung, -600) == 128  # ((-600 + 600.5) / 1499 + 0.5) * 255 = 127.58
    assert _grey_of_hu(lung, -1000) == 60  # 59.54
    explicit = render_dicom(dicom_dir / "ct.dcm", window=(0, 2000))
    assert _grey_of_hu(explicit, 0) == 128 and _grey_of_hu(explicit, -1000) == 0
    assert parse_window("40,400") == (40.0, 400.0) and parse_window("bone") == (400.0, 1800.0)
    with pytest.raises(AdaptError, match="preset"):
        parse_window("sideways")


def test_dicom_monochrome1_multiframe_and_voi_lut(dicom_dir):
    cr = render_dicom(dicom_dir / "cr.dcm")[..., 0]
    # Window 2048/4096: 0 -> 0, 2048 -> 127.53, 4095 -> 255; MONOCHROME1 shows low values bright.
    assert cr.tolist() == [[255, 127, 0], [0, 127, 255]]
    # Frames of 100, 200, 300 under window 200/200: 0, 128.14 -> 128, 255; default = middle frame.
    assert set(render_dicom(dicom_dir / "mr_multiframe.dcm")[..., 0].ravel()) == {128}
    assert set(render_dicom(dicom_dir / "mr_multiframe.dcm", frame=0)[..., 0].ravel()) == {0}
    assert set(render_dicom(dicom_dir / "mr_multiframe.dcm", frame=2)[..., 0].ravel()) == {255}
    with pytest.raises(AdaptError, match="3 frames"):
        render_dicom(dicom_dir / "mr_multiframe.dcm", frame=5)
    # VOI LUT 0, 1000, 3000, 4000 over its range 0..4000: 0, 63.75, 191.25, 255 (the 1/1 window is ignored).
    assert render_dicom(dicom_dir / "mr_voilut.dcm")[..., 0].tolist() == [[0, 64], [191, 255]]
    assert np.array_equal(render_dicom(dicom_dir / "us_rgb.dcm"), med.US_RGB)  # colour passes through


def test_dicom_formatter_classification_and_skips(dicom_dir, tmp_path):
    records, meta, report = _run("dicom", dicom_dir, tmp_path / "out")
    assert [r["meta"]["file"] for r in records] == ["ct.dcm", "cr.dcm", "mr_multiframe.dcm", "mr_voilut.dcm",
                                                    "us_rgb.dcm"]
    assert meta["dicom"]["root"] == "."
    first = records[0]
    assert first["meta"]["task"] == "classification" and first["meta"]["answer_type"] == "closed"
    assert first["meta"]["choices"] == ["fracture", "normal", "tumour"] and _answer(first) == "normal"
    assert "fracture, normal, tumour" in _human(first) and first["meta"]["modality"] == "CT"
    png = Image.open(tmp_path / "out" / first["image"])
    assert png.format == "PNG" and png.mode == "RGB" and png.size == (5, 4)
    assert _grey_of_hu(np.asarray(png), 40) == 128
    skipped = {s.reason for s in report.skips}
    assert skipped == {"DICOM has no pixel data: nopixels.dcm", "not a DICOM file: not_dicom.dcm",
                       "DICOM file not found: missing.dcm"}
    with pytest.raises(AdaptError, match="nopixels.dcm"):
        _run("dicom", dicom_dir, tmp_path / "strict", strict=True)


def test_dicom_formatter_question_answer_with_preset(dicom_dir, tmp_path):
    records, _, _ = _run("dicom", dicom_dir, tmp_path / "qa", labels=dicom_dir / "qa.csv", window="bone")
    assert [(r["meta"]["task"], r["meta"]["answer_type"]) for r in records] == [("vqa", "closed"), ("vqa", "open")]
    ct = np.asarray(Image.open(tmp_path / "qa" / records[0]["image"]))
    assert _grey_of_hu(ct, 400) == 128  # bone window center 400: ((400 - 399.5) / 1799 + 0.5) * 255
    with pytest.raises(AdaptError, match="unknown option"):
        _run("dicom", dicom_dir, tmp_path / "bad", windw="bone")


# ------------------------------------------------------------------------------------ video engine


def test_segment_frame_indices_middle_of_equal_segments():
    assert segment_frame_indices(24, 8) == [1, 4, 7, 10, 13, 16, 19, 22]  # segments of 3: their middles
    assert segment_frame_indices(32, 8) == [2, 6, 10, 14, 18, 22, 26, 30]  # segments of 4: upper middle
    assert segment_frame_indices(10, 3) == [1, 4, 8]  # [0,3) [3,6) [6,10)
    assert segment_frame_indices(5, 5) == [0, 1, 2, 3, 4]
    with pytest.raises(TooFewFrames):
        segment_frame_indices(4, 8)


def test_segment_frame_indices_random_stays_in_segments_and_is_seeded():
    segments = [(k * 30 // 4, (k + 1) * 30 // 4) for k in range(4)]  # [0,7) [7,15) [15,22) [22,30)
    seen: list[set[int]] = [set() for _ in segments]
    for seed in range(300):
        picks = segment_frame_indices(30, 4, random_offset=True, rng=random.Random(seed))
        assert picks == segment_frame_indices(30, 4, random_offset=True, rng=random.Random(seed))
        for k, (pick, (start, end)) in enumerate(zip(picks, segments)):
            assert start <= pick < end
            seen[k].add(pick)
    assert [len(s) for s in seen] == [end - start for start, end in segments]  # every frame reachable


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory):
    return vid.write_video_dataset(tmp_path_factory.mktemp("video"))


def test_read_video_frames_returns_the_segment_middles(video_dir):
    with av.open(str(video_dir / "clips" / "clip.mkv")) as container:
        assert container.streams.video[0].frames == 0  # no header count: counting must not rely on it
    for name in ("clip.mp4", "clip.mkv"):
        frames = read_video_frames(video_dir / "clips" / name, 8)
        assert [vid.frame_index_of(f) for f in frames] == [1, 4, 7, 10, 13, 16, 19, 22]
        assert frames[0].mode == "RGB" and frames[0].size == vid.SIZE


def test_read_video_frames_random_offset_is_seeded(video_dir):
    clip = video_dir / "clips" / "clip.mp4"
    first = [vid.frame_index_of(f) for f in read_video_frames(clip, 6, random_offset=True, seed=7)]
    again = [vid.frame_index_of(f) for f in read_video_frames(clip, 6, random_offset=True, seed=7)]
    assert first == again == segment_frame_indices(24, 6, random_offset=True, rng=random.Random(7))
    assert all(4 * k <= i < 4 * (k + 1) for k, i in enumerate(first))


def test_short_video_raises_with_counts_or_gives_all_frames(video_dir):
    short = video_dir / "clips" / "short.mp4"
    with pytest.raises(TooFewFrames) as caught:
        read_video_frames(short, 8)
    assert "short.mp4" in str(caught.value) and "4 frame" in str(caught.value) and "8 requested" in str(caught.value)
    assert isinstance(caught.value, AdaptError)
    assert [vid.frame_index_of(f) for f in read_video_frames(short, 8, allow_fewer=True)] == [0, 1, 2, 3]


def test_frame_folder_is_sorted_naturally(video_dir):
    folder = video_dir / "frames" / "clip_a"
    assert [p.name for p in frame_files(folder)][:3] == ["frame_1.png", "frame_2.png", "frame_3.png"]
    assert [vid.frame_index_of(f) for f in read_frame_folder(folder, 4)] == [1, 4, 7, 10]  # segments of 3


def test_video_prompt():
    assert video_prompt(3) == "Frame-1: <image>\nFrame-2: <image>\nFrame-3: <image>"
    assert expand_video_placeholder("<video>\nWhat happens?", 2) == "Frame-1: <image>\nFrame-2: <image>\nWhat happens?"


# --------------------------------------------------------------------------------- video formatter


def test_video_formatter_keeps_clips_and_skips_bad_ones(video_dir, tmp_path):
    records, meta, report = _run("video", video_dir, tmp_path / "out")
    assert Path(meta["video"]["root"]) == video_dir.resolve()
    mp4, mkv, folder = records
    assert mp4["video"] == "clips/clip.mp4" and _human(mp4) == "<video>\nDoes the scene get brighter?"
    assert mp4["meta"]["num_frames"] == 8 and "tiles" not in mp4["meta"] and mp4["meta"]["clip_frames"] == 24
    assert (mp4["meta"]["answer_type"], mkv["meta"]["answer_type"]) == ("closed", "open")
    assert mp4["meta"]["task"] == "video" and "image" not in mp4
    # 12 frames into 8 segments [0,1) [1,3) [3,4) [4,6) [6,7) [7,9) [9,10) [10,12): upper middles 0 2 3 5 6 8 9 11
    assert folder["image"] == [f"frames/clip_a/frame_{i + 1}.png" for i in (0, 2, 3, 5, 6, 8, 9, 11)]
    assert _human(folder).startswith(video_prompt(8) + "\n")
    reasons = {s.row: s.reason for s in report.skips}
    assert reasons[5] == "video too short: clips/short.mp4 has 4 frame(s), 8 requested"
    assert reasons[6].startswith("video unusable: clips/broken.mp4") and reasons[7] == "video not found: clips/missing.mp4"
    with pytest.raises(AdaptError, match="short.mp4 has 4 frame"):
        _run("video", video_dir, tmp_path / "strict", strict=True)


def test_video_formatter_extract_frames(video_dir, tmp_path):
    records, meta, report = _run("video", video_dir, tmp_path / "out", extract_frames=True, num_frames=4)
    assert meta["video"]["root"] == "." and report.written == 4  # short.mp4 has exactly 4 frames
    by_clip = {r["meta"]["clip"]: r for r in records}
    expected = {"clips/clip.mp4": [3, 9, 15, 21], "clips/clip.mkv": [3, 9, 15, 21],  # segments of 6
                "frames/clip_a": [1, 4, 7, 10], "clips/short.mp4": [0, 1, 2, 3]}
    for clip, indices in expected.items():
        record = by_clip[clip]
        assert _human(record).startswith("Frame-1: <image>\nFrame-2: <image>\nFrame-3: <image>\nFrame-4: <image>\n")
        shown = [vid.frame_index_of(Image.open(tmp_path / "out" / p)) for p in record["image"]]
        assert shown == indices, clip
        assert all(p.startswith("images/") and p.endswith(".jpg") for p in record["image"])


def test_video_formatter_label_rows(video_dir, tmp_path):
    records, _, _ = _run("video", video_dir, tmp_path / "out", annotations="labels.jsonl", num_frames=6)
    assert [_answer(r) for r in records] == ["walking", "running"]
    assert records[0]["meta"]["choices"] == ["running", "walking"] and records[0]["meta"]["num_frames"] == 6
    assert "Choose one of: running, walking." in _human(records[0])
