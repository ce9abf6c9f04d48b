"""The driving formatter on a synthetic nuScenes dataset that the real devkit loads.

The fixture paints each annotated object in the camera that sees it (flat colour per category), so
every check here is against pixels: a box the formatter writes must cover the object's colour in
the stitched JPEG, a camera name must label the view that shows that camera's content.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFont

from adapt.data import boxes as bx
from adapt.data.tiling import TILE, choose_grid, count_tiles, tile_image
from adapt.errors import AdaptError
from formatters.base import run
from formatters.driving import (
    DRIVING,
    convert_tags,
    drivelm_tag_to_stitched,
    restore_tags,
    stitched_to_camera,
)
from formatters.synthetic.nuscenes import TRUTH_FILE, write_drivelm, write_nuscenes

GRID = (("CAM_FRONT_LEFT", "CAM_FRONT", "CAM_FRONT_RIGHT"), ("CAM_BACK_LEFT", "CAM_BACK", "CAM_BACK_RIGHT"))
CAMERAS = [c for row in GRID for c in row]
W, H = 2688, 896


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]


def _truth(root: Path) -> dict:
    return json.loads((root / TRUTH_FILE).read_text())


def _colour_share(image: np.ndarray, box, colour, tolerance: int = 45) -> float:
    """Share of the pixels inside the pixel box [x1, y1, x2, y2] that are `colour`."""
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    region = image[y1:y2, x1:x2].astype(int)
    assert region.size, f"empty box {box}"
    return float((np.abs(region - np.array(colour)).max(axis=2) < tolerance).mean())


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = write_nuscenes(tmp_path_factory.mktemp("nuscenes") / "nuscenes", n_scenes=2, samples_per_scene=6, seed=0)
    write_drivelm(root.parent / "drivelm.json", root, unknown_frame=True, bad_tag=True)
    return root


@pytest.fixture(scope="module")
def formatted(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("formatted") / "out"
    report = run(DRIVING, dataset, out, progress=False)
    return report, _records(out), out


# --------------------------------------------------------------------------- the synthetic dataset


def test_synthetic_dataset_is_real_nuscenes_with_painted_objects(dataset):
    from nuscenes.nuscenes import NuScenes
    from nuscenes.utils.geometry_utils import BoxVisibility, view_points
    from pyquaternion import Quaternion

    nusc = NuScenes(version="v1.0-mini", dataroot=str(dataset), verbose=False)
    assert len(nusc.sample) == 12 and len(nusc.scene) == 2 and nusc.map
    assert all(log["map_token"] for log in nusc.log) and (dataset / nusc.map[0]["filename"]).is_file()
    for cs in nusc.calibrated_sensor:
        channel = nusc.get("sensor", cs["sensor_token"])["channel"]
        rotation = Quaternion(cs["rotation"])
        axis = rotation.rotate([0.0, 0.0, 1.0])  # the optical axis in the ego frame
        assert abs(axis[2]) < 1e-6 and np.allclose(rotation.rotate([0.0, 1.0, 0.0]), [0, 0, -1])  # yaw only
        yaw = np.degrees(np.arctan2(axis[1], axis[0]))
        expected = {"CAM_FRONT": 0, "CAM_FRONT_LEFT": 55, "CAM_FRONT_RIGHT": -55, "CAM_BACK_LEFT": 110,
                    "CAM_BACK_RIGHT": -110, "CAM_BACK": 180}[channel]
        assert abs((yaw - expected + 180) % 360 - 180) < 1e-6
    truth = {s["token"]: s for s in _truth(dataset)["samples"]}
    for sample in nusc.sample:
        assert sorted(sample["data"]) == sorted(CAMERAS)
        for obj in truth[sample["token"]]["objects"]:
            seen_in = []
            for cam in CAMERAS:
                path, boxes, intrinsic = nusc.get_sample_data(sample["data"][cam], box_vis_level=BoxVisibility.ANY)
                for box in boxes:
                    if box.token == obj["annotation_token"]:
                        seen_in.append(cam)
                        uv = view_points(box.corners(), intrinsic, normalize=True)[:2]
                        assert np.allclose([*uv.min(axis=1), *uv.max(axis=1)], obj["box_px"], atol=0.02)
                        name = Path(path).name
                        assert re.fullmatch(rf"n015-[-0-9]+\+0800__{cam}__\d{{16}}\.jpg", name)
                        image = np.asarray(Image.open(path))
                        assert image.shape == (900, 1600, 3)
                        x1, y1, x2, y2 = obj["box_px"]
                        inner = [x1 + 0.3 * (x2 - x1), y1 + 0.3 * (y2 - y1), x2 - 0.3 * (x2 - x1), y2 - 0.3 * (y2 - y1)]
                        assert _colour_share(image, inner, obj["colour"]) > 0.95
            assert seen_in == [obj["camera"]]


# --------------------------------------------------------------------------- layout and tiling


def test_stitched_layout_order_labels_and_tiles(tmp_path):
    root = write_nuscenes(tmp_path / "ns", n_scenes=1, samples_per_scene=6, seed=3, distractors=False)
    colours = {cam: c for cam, c in zip(CAMERAS, [(150, 30, 30), (30, 150, 30), (30, 30, 150), (150, 150, 30),
                                                  (150, 30, 150), (30, 150, 150)])}
    for cam, colour in colours.items():  # every camera of every sample becomes one known colour
        for path in (root / "samples" / cam).glob("*.jpg"):
            Image.new("RGB", (1600, 900), colour).save(path, quality=95)
    report = run(DRIVING, root, tmp_path / "out", progress=False)
    records = _records(tmp_path / "out")
    assert report.written == len(records) and records
    assert all(count_tiles(*Image.open(tmp_path / "out" / r["image"]).size) == 13 for r in records)

    image = np.asarray(Image.open(tmp_path / "out" / records[0]["image"]).convert("RGB"))
    assert image.shape == (H, W, 3)
    font = ImageFont.load_default(size=30)
    for row, cams in enumerate(GRID):
        for col, cam in enumerate(cams):
            x0, y0 = col * 896, row * 448
            centre = image[y0 + 200:y0 + 248, x0 + 400:x0 + 496].reshape(-1, 3).mean(axis=0)
            assert np.abs(centre - colours[cam]).max() < 6, (cam, centre)
            # the label: white glyphs in the view's top-left corner; read it by matching rendered names
            strip = image[y0:y0 + 70, x0:x0 + 500].min(axis=2) > 200
            ys, xs = np.nonzero(strip)
            assert xs.size and xs.min() < 40 and ys.min() < 30, f"no label at the top-left of {cam}"
            label = strip[ys.min():ys.max() + 1, xs.min():xs.max() + 1]

            def match(name: str, label=label) -> float:
                glyphs = Image.new("L", (600, 80))
                from PIL import ImageDraw

                ImageDraw.Draw(glyphs).text((5, 5), name, font=font, fill=255)
                mask = np.asarray(glyphs) > 128
                gy, gx = np.nonzero(mask)
                crop = Image.fromarray(mask[gy.min():gy.max() + 1, gx.min():gx.max() + 1])
                scaled = np.asarray(crop.resize((label.shape[1], label.shape[0]))) > 0
                return (scaled & label).sum() / (scaled | label).sum()

            assert max(CAMERAS, key=match) == cam

    # InternVL tiles the stitched image 6x2: each 896x448 camera view is exactly two 448 tiles
    assert choose_grid(W, H) == (6, 2) and count_tiles(W, H) == 13
    tiles = tile_image(Image.fromarray(image))
    assert tiles.shape == (13, 3, TILE, TILE)
    for k in range(12):  # row-major 6x2: tiles 2c and 2c+1 of a row are camera c of that row
        cam = GRID[k // 6][(k % 6) // 2]
        body = tiles[k][:, 100:, :].reshape(3, -1).mean(axis=1)  # below the label
        assert np.abs(body - colours[cam]).max() < 6, (k, cam, body)
    # without distractors the car is the only object: the perception answers are the fixture's cameras
    truth = {s["token"]: s["main_camera"] for s in _truth(root)["samples"]}
    answers = {r["meta"]["sample_token"]: r["conversations"][-1]["value"] for r in records
               if r["meta"].get("answer_type") == "camera"}
    assert answers == truth and sorted(answers.values()) == sorted(CAMERAS)


# --------------------------------------------------------------------------- coordinates


def test_tag_and_box_conversion_both_ways():
    # by hand: CAM_FRONT is the middle of the top row; its centre is the middle of the top half
    assert drivelm_tag_to_stitched("CAM_FRONT", 800.0, 450.0) == (500, 250)
    assert drivelm_tag_to_stitched("CAM_BACK_LEFT", 0.0, 0.0) == (0, 500)
    assert drivelm_tag_to_stitched("CAM_BACK_RIGHT", 1600.0, 900.0) == (1000, 1000)
    assert convert_tags("see <c1,CAM_BACK,1088.3,497.5> and <c2,CAM_FRONT,800.0,450.0>.") == \
        f"see <c1,CAM_BACK,{round((896 + 1088.3 * 0.56) / W * 1000)},{round((448 + 497.5 * 448 / 900) / H * 1000)}>" \
        " and <c2,CAM_FRONT,500,250>."
    assert restore_tags("<c2,CAM_FRONT,500,250>") == "<c2,CAM_FRONT,800.0,450.0>"
    with pytest.raises(ValueError, match="CAM_TOP"):
        convert_tags("<c1,CAM_TOP,1.0,2.0>")
    with pytest.raises(ValueError, match="outside"):
        convert_tags("<c1,CAM_FRONT,1700.0,2.0>")

    rng = np.random.default_rng(0)
    for _ in range(300):
        cam = CAMERAS[rng.integers(6)]
        x, y = rng.uniform(0, 1600), rng.uniform(0, 900)
        back_cam, bx_, by_ = stitched_to_camera(*drivelm_tag_to_stitched(cam, x, y), cam=cam)
        # one grid unit is 2.688 x 0.896 stitched pixels = 4.8 x 1.8 camera pixels
        assert back_cam == cam and abs(bx_ - x) <= 2.4 + 1e-6 and abs(by_ - y) <= 0.9 + 1e-6
        if 10 < x < 1590:  # away from the seams the grid position alone names the camera
            assert stitched_to_camera(*drivelm_tag_to_stitched(cam, x, y))[0] == cam
        text = f"<c3,{cam},{x:.1f},{y:.1f}>"
        restored = re.fullmatch(r"<c3,(\w+),([\d.]+),([\d.]+)>", restore_tags(convert_tags(text)))
        assert restored and restored.group(1) == cam and abs(float(restored.group(2)) - x) <= 2.5

        box = sorted(rng.uniform(0, W, 2)) + sorted(rng.uniform(0, H, 2))
        box = [box[0], box[2], box[1], box[3]]
        back = bx.from_grid(bx.to_grid(box, W, H), W, H)
        assert all(abs(a - b) <= s for a, b, s in zip(box, back, (W / 1000, H / 1000) * 2))


# --------------------------------------------------------------------------- questions from annotations


def test_boxes_and_answers_land_on_the_painted_objects(dataset, formatted):
    report, records, out = formatted
    truth = {o["annotation_token"]: o for s in _truth(dataset)["samples"] for o in s["objects"]}
    kinds = Counter(r["meta"]["task"] for r in records)
    assert kinds["grounding"] >= 30 and kinds["region"] >= 30 and kinds["driving"] >= 10
    assert report.skipped == 0 and report.written == len(records)
    images: dict[str, np.ndarray] = {}
    for record in records:
        meta = record["meta"]
        assert meta["image_size"] == [W, H] and meta["domain"] == "driving" and meta["source"] == "nuscenes"
        image = images.setdefault(record["image"], np.asarray(Image.open(out / record["image"]).convert("RGB")))
        tokens = meta.get("annotation_tokens") or [meta["annotation_token"]]
        answer = record["conversations"][-1]["value"]
        for token, box_px in zip(tokens, meta["boxes_px"]):
            obj = truth[token]
            assert meta["camera"] == obj["camera"]
            col, row = next((c, r) for r, cams in enumerate(GRID) for c, cam in enumerate(cams) if cam == obj["camera"])
            assert col * 896 <= box_px[0] < box_px[2] <= (col + 1) * 896 and row * 448 <= box_px[1] < box_px[3] <= (row + 1) * 448
            assert _colour_share(image, box_px, obj["colour"]) > 0.6, (record["id"], obj["category"])
        if meta["task"] == "grounding":
            grid_boxes = bx.parse_boxes(answer)
            assert grid_boxes == meta["boxes_grid"] and bx.parse_refs(answer) == [f"the {meta['name']} in {meta['camera']}"]
            for grid_box, token in zip(grid_boxes, tokens):  # what the model is taught, back in pixels
                assert _colour_share(image, bx.from_grid(grid_box, W, H), truth[token]["colour"]) > 0.6
        elif meta["task"] == "region":
            assert answer == truth[tokens[0]]["word"]
            assert bx.parse_boxes(record["conversations"][0]["value"]) == meta["boxes_grid"]
        else:
            assert meta["answer_type"] == "camera" and answer == truth[tokens[0]]["camera"] == meta["answer"]


def test_perception_answers_are_balanced(formatted):
    _, records, _ = formatted
    answers = Counter(r["meta"]["answer"] for r in records if r["meta"].get("answer_type") == "camera")
    assert set(answers) == set(CAMERAS) and max(answers.values()) - min(answers.values()) <= 1


# --------------------------------------------------------------------------- DriveLM


def test_drivelm_records_tags_point_at_the_objects(dataset, tmp_path):
    out = tmp_path / "out"
    report = run(DRIVING, dataset, out, progress=False, drivelm=str(dataset.parent / "drivelm.json"))
    reasons = [s.reason for s in report.skips]
    assert len(reasons) == 2 and any("ffffffff" in r and "not in the nuScenes" in r for r in reasons)
    assert any("CAM_TOP" in r for r in reasons)
    records = _records(out)
    truth = {s["token"]: s for s in _truth(dataset)["samples"]}
    assert {r["meta"]["qa_type"] for r in records} == {"perception", "prediction", "planning", "behavior"}
    checked = 0
    for record in records:
        meta = record["meta"]
        assert meta["source"] == "drivelm" and meta["task"] == "driving"
        answer = record["conversations"][-1]["value"]
        assert answer == meta["answer"] and restore_tags(answer).count("<c") == meta["answer_camera_px"].count("<c")
        image = np.asarray(Image.open(out / record["image"]).convert("RGB"))
        for text, original in ((record["conversations"][0]["value"], meta["question_camera_px"]),
                               (answer, meta["answer_camera_px"])):
            assert not re.search(r"<c\d+,CAM_\w+,\d+\.\d", text)  # no camera-pixel tag left
            for ident, cam, X, Y in re.findall(r"<c(\d+),(CAM_\w+),(\d+),(\d+)>", text):
                obj = truth[meta["sample_token"]]["objects"][int(ident) - 1]
                assert cam == obj["camera"]
                px, py = int(X) / 1000 * W, int(Y) / 1000 * H
                assert _colour_share(image, [px - 2, py - 2, px + 2, py + 2], obj["colour"]) == 1.0
                checked += 1
            for restored, orig in zip(re.findall(r"<c\d+,\w+,([\d.]+),([\d.]+)>", restore_tags(text)),
                                      re.findall(r"<c\d+,\w+,([\d.]+),([\d.]+)>", original)):
                assert abs(float(restored[0]) - float(orig[0])) <= 2.5 and abs(float(restored[1]) - float(orig[1])) <= 1
    assert checked > 50

    frame_out = tmp_path / "frames"
    run(DRIVING, dataset, frame_out, progress=False, drivelm=str(dataset.parent / "drivelm.json"), per="frame")
    frames = _records(frame_out)
    assert len(frames) == 12 and sum(len(f["conversations"]) // 2 for f in frames) == len(records)


# --------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def bad_dataset(tmp_path_factory) -> Path:
    return write_nuscenes(tmp_path_factory.mktemp("bad") / "ns", n_scenes=1, samples_per_scene=5, seed=1,
                          drop_camera="CAM_BACK", corrupt_camera="CAM_FRONT_LEFT",
                          missing_camera_file="CAM_BACK_RIGHT", degenerate_box=True)


def test_bad_samples_are_skipped_with_reason(bad_dataset, tmp_path):
    report = run(DRIVING, bad_dataset, tmp_path / "out", progress=False)
    samples = _truth(bad_dataset)["samples"]
    by_id = {s.id: s.reason for s in report.skips}
    assert report.read == 5 and report.skipped == 4
    assert "lacks camera(s) CAM_BACK" in by_id[samples[0]["token"]]
    assert "corrupt camera image" in by_id[samples[1]["token"]] and "CAM_FRONT_LEFT" in by_id[samples[1]["token"]]
    assert "camera image not found" in by_id[samples[2]["token"]]
    assert "zero or invalid size" in by_id[samples[3]["token"]]
    written = {r["meta"]["sample_token"] for r in _records(tmp_path / "out")}
    assert written == {samples[4]["token"]}
    assert json.loads((tmp_path / "out" / "report.json").read_text())["skipped"] == 4


def test_strict_run_fails_cleanly(bad_dataset, tmp_path):
    with pytest.raises(AdaptError, match="lacks camera"):
        run(DRIVING, bad_dataset, tmp_path / "out", progress=False, strict=True)
    assert not (tmp_path / "out").exists()
    with pytest.raises(AdaptError, match="not in the nuScenes"):
        run(DRIVING, bad_dataset, tmp_path / "out", progress=False, strict=True,
            drivelm=str(write_drivelm(tmp_path / "d.json", bad_dataset, unknown_frame=True)))


def test_unusable_sources_and_options_are_user_errors(dataset, tmp_path):
    tables = tmp_path / "ns" / "v1.0-mini"
    tables.mkdir(parents=True)
    for table in (dataset / "v1.0-mini").glob("*.json"):
        if table.name != "map.json":
            (tables / table.name).write_bytes(table.read_bytes())
    with pytest.raises(AdaptError, match="could not load"):
        run(DRIVING, tmp_path / "ns", tmp_path / "o1", progress=False)
    with pytest.raises(AdaptError, match="v1.0-trainval"):
        run(DRIVING, dataset, tmp_path / "o2", progress=False, version="v1.0-trainval")
    with pytest.raises(AdaptError, match="unknown question"):
        run(DRIVING, dataset, tmp_path / "o3", progress=False, questions="grounding,colour")
    with pytest.raises(AdaptError, match="unknown nuScenes split"):
        run(DRIVING, dataset, tmp_path / "o4", progress=False, split="nope")
    with pytest.raises(AdaptError, match="unknown driving option"):
        run(DRIVING, dataset, tmp_path / "o5", progress=False, camras=6)
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    with pytest.raises(AdaptError, match="not valid JSON"):
        run(DRIVING, dataset, tmp_path / "o6", progress=False, drivelm=str(bad_json))
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 7))
