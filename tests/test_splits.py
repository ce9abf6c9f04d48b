"""Held-out splits by group: no scene, patient, video or image on both sides, none by content either."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from adapt.data.mixing import Mixture, Source, SourceUsage
from adapt.data.splits import holdout_group, split_by_group


def _qa(rid: str, image: str | None = None, **meta) -> dict:
    record = {"id": rid, "conversations": [{"from": "human", "value": f"<image>\nQ {rid}?"},
                                           {"from": "gpt", "value": f"A {rid}"}], "meta": meta}
    if image is not None:
        record["image"] = image
    return record


def _sides(train: Source, held: Source, field: str) -> tuple[set, set]:
    return {r["meta"][field] for r in train.records}, {r["meta"][field] for r in held.records}


def test_driving_samples_are_held_out_by_scene():
    # 5 scenes x 8 consecutive samples (near-duplicates), 3 DriveLM questions per sample image.
    records = [_qa(f"s{s}-{i}-{q}", f"stitched/s{s}-{i}.jpg", scene_token=f"scene{s}", sample_token=f"s{s}-{i}")
               for s in range(5) for i in range(8) for q in range(3)]
    train, held, account = split_by_group(Source("drivelm", "/x", records, "domain"), 0.2, seed=0)
    train_scenes, held_scenes = _sides(train, held, "scene_token")
    assert held_scenes and not train_scenes & held_scenes
    assert len(held.records) == 24 * len(held_scenes) and account["grouping"] == {"scene": 5}
    # before: a per-sample draw put samples of every held-out scene into training too
    rng = random.Random(0)
    per_sample = set(rng.sample(range(len(records)), 24))
    assert {records[i]["meta"]["scene_token"] for i in per_sample} & \
        {r["meta"]["scene_token"] for i, r in enumerate(records) if i not in per_sample}


def test_patient_video_and_image_groupings():
    patients = [_qa(f"p{p}-{k}", f"ct/p{p}-{k}.png", patient_id=f"P{p}") for p in range(6) for k in range(4)]
    train, held, account = split_by_group(Source("dicom", "/x", patients, "domain"), 8, seed=1)
    assert not set.intersection(*_sides(train, held, "patient_id")) and account["heldout_groups"] == {"patient": 2}

    frames = [_qa(f"v{v}-{f}", f"frames/v{v}/{f}.png", clip=f"v{v}.mp4") for v in range(4) for f in range(5)]
    train, held, account = split_by_group(Source("video", "/x", frames, "domain"), 5, seed=0)
    assert not set.intersection(*_sides(train, held, "clip")) and account["grouping"] == {"video": 4}

    questions = [_qa(f"i{i}-{q}", f"img{i}.png") for i in range(10) for q in range(3)]
    train, held, _ = split_by_group(Source("vqa", "/x", questions, "domain"), 6, seed=0)
    assert not {r["image"] for r in train.records} & {r["image"] for r in held.records}


def test_a_single_scene_source_is_split_by_the_next_grouping():
    records = [_qa(f"{i}-{q}", f"cam/{i}.jpg", scene_token="only") for i in range(6) for q in range(2)]
    train, held, account = split_by_group(Source("one", "/x", records, "domain"), 4, seed=0)
    assert held.records and train.records and account["single_group_refined"] == ["scene"]
    assert not {r["image"] for r in train.records} & {r["image"] for r in held.records}


def test_same_image_bytes_under_two_names_never_straddle(tmp_path):
    rng = np.random.default_rng(0)
    pixels = [rng.integers(0, 255, (16, 16, 3), dtype=np.uint8) for _ in range(6)]
    records = []
    for i, array in enumerate(pixels):
        for copy in ("a", "b"):  # the release ships every image twice under different names
            Image.fromarray(array).save(tmp_path / f"{copy}{i}.png")
            records.append(_qa(f"{copy}{i}", f"{copy}{i}.png"))
    train, held, account = split_by_group(Source("dup", str(tmp_path), records, "domain"), 3, seed=0)

    def digest(record):
        return (tmp_path / record["image"]).read_bytes()

    assert not {digest(r) for r in train.records} & {digest(r) for r in held.records}
    held_digests = {digest(r) for r in held.records}
    assert account["train_records_dropped_same_image"] == 2 * len(held_digests) - len(held.records) > 0


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 3)), min_size=2, max_size=40),
       st.integers(1, 10), st.integers(0, 3))
def test_groups_never_straddle_generated(pairs, n, seed):
    records = [_qa(f"r{k}", f"img{img}.png", scene_token=f"sc{scene}") for k, (scene, img) in enumerate(pairs)]
    distinct = len(records)
    train, held, _ = split_by_group(Source("gen", "/nowhere", records, "domain"), min(n, distinct), seed)
    train_keys = {holdout_group(r) for r in train.records}
    assert not train_keys & {holdout_group(r) for r in held.records} or len({s for s, _ in pairs}) == 1
    assert train.records  # one group always trains
    assert len(train.records) + len(held.records) == len(records)


def test_manifest_records_the_grouping(tmp_path):
    records = [_qa(f"s{s}-{i}", f"x{s}-{i}.png", scene_token=f"scene{s}") for s in range(3) for i in range(4)]
    train, held, account = split_by_group(Source("drive", "/x", records, "domain"), 4, seed=0)
    usage = SourceUsage(kind="domain", root="/x", weight=1.0, max_tiles=None, available=len(train.records),
                        used=len(train.records), samples=len(train.records))
    mixture = Mixture(entries=[({**r, "meta": {**r["meta"], "mix_source": "drive"}}, "/x") for r in train.records],
                      sources={"drive": usage}, requested_ratio=0.0, mix_by="samples", seed=0,
                      holdout={"drive": account})
    mixture.save(tmp_path / "mix")
    manifest = json.loads((tmp_path / "mix" / "manifest.json").read_text())
    assert manifest["holdout"]["drive"]["grouping"] == {"scene": 3}
    assert Mixture.load(tmp_path / "mix").holdout == manifest["holdout"]


def test_bad_sizes_are_refused():
    source = Source("s", "/x", [_qa(f"{i}", f"{i}.png") for i in range(5)], "domain")
    from adapt.errors import AdaptError

    for bad in (6, -1, 1.0, "3"):
        with pytest.raises(AdaptError):
            split_by_group(source, bad, seed=0)


def test_dicom_records_carry_patient_and_study_for_grouping(tmp_path):
    import formatters
    from formatters.base import run
    from formatters.synthetic.medical import write_dicom_folder

    folder = write_dicom_folder(tmp_path / "dicom")
    run(formatters.get("dicom"), folder, tmp_path / "out", progress=False)
    records = [json.loads(line) for line in (tmp_path / "out" / "records.jsonl").read_text().splitlines()]
    assert records and all(r["meta"]["patient_id"] == "ANON0001" and r["meta"]["study_uid"] for r in records)
    train, held, account = split_by_group(Source("dicom", str(tmp_path / "out"), records, "domain"), 1, seed=0)
    assert account["single_group_refined"] == ["patient"]  # one patient: split by study instead
    assert not {r["meta"]["study_uid"] for r in train.records} & {r["meta"]["study_uid"] for r in held.records}
