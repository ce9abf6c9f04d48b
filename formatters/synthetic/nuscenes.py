"""A small synthetic nuScenes dataset in the real on-disk layout, plus a DriveLM QA file for it.

The real devkit loads it (`NuScenes(version="v1.0-mini", dataroot=root)`): all 13 tables, a map
table whose maps cover every log, the map png, and six 1600x900 camera JPEGs per sample under
`samples/<CHANNEL>/<log>__<CHANNEL>__<timestamp>.jpg`. The camera rig copies the real one (front
camera looking forward, the others turned about the vertical axis by +-55, +-110 and 180 degrees,
real-like translations and intrinsics).

Objects are placed in 3D and *drawn*: each annotation's 3D box is projected with the devkit's own
`Box` and `view_points` and its hull is painted, flat and in one colour per category, on a
grey sky/road background. A box computed from the annotations therefore lands on painted pixels.
The placement keeps every object wholly inside exactly one camera (and away from all others), and
the camera that sees the sample's car cycles through the six cameras in seeded shuffled rounds, so
"which camera sees the car?" has balanced answers.

`synthetic_truth.json` at the root records what was painted where (for tests and DriveLM tags).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import simplejpeg
from PIL import Image, ImageDraw

from formatters.driving import convex_hull

WIDTH, HEIGHT = 1600, 900
CAMERAS = ("CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_BACK_RIGHT", "CAM_BACK", "CAM_BACK_LEFT", "CAM_FRONT_LEFT")
TRUTH_FILE = "synthetic_truth.json"

# Camera rig after the real nuScenes car: (translation in the ego frame, yaw in degrees, fx=fy, cx, cy).
RIG: dict[str, tuple[tuple[float, float, float], float, float, float, float]] = {
    "CAM_FRONT": ((1.700, 0.016, 1.511), 0.0, 1266.4, 816.3, 491.5),
    "CAM_FRONT_RIGHT": ((1.551, -0.493, 1.496), -55.0, 1260.8, 808.0, 495.3),
    "CAM_BACK_RIGHT": ((1.015, -0.481, 1.562), -110.0, 1259.5, 807.3, 501.2),
    "CAM_BACK": ((0.028, 0.003, 1.579), 180.0, 809.2, 829.2, 481.8),
    "CAM_BACK_LEFT": ((1.036, 0.485, 1.591), 110.0, 1256.7, 817.8, 452.0),
    "CAM_FRONT_LEFT": ((1.524, 0.495, 1.509), 55.0, 1272.6, 826.6, 479.8),
}
# Camera timestamps trail the sample (lidar) timestamp slightly, as on the real car (microseconds).
CAMERA_DELAY_US = {"CAM_FRONT": 12_460, "CAM_FRONT_RIGHT": 20_339, "CAM_BACK_RIGHT": 27_893,
                   "CAM_BACK": 37_525, "CAM_BACK_LEFT": 47_423, "CAM_FRONT_LEFT": 4_799}

# The 23 object categories of nuScenes with their lidarseg indices.
CATEGORIES = (
    "animal", "human.pedestrian.adult", "human.pedestrian.child", "human.pedestrian.construction_worker",
    "human.pedestrian.personal_mobility", "human.pedestrian.police_officer", "human.pedestrian.stroller",
    "human.pedestrian.wheelchair", "movable_object.barrier", "movable_object.debris",
    "movable_object.pushable_pullable", "movable_object.trafficcone", "static_object.bicycle_rack",
    "vehicle.bicycle", "vehicle.bus.bendy", "vehicle.bus.rigid", "vehicle.car", "vehicle.construction",
    "vehicle.emergency.ambulance", "vehicle.emergency.police", "vehicle.motorcycle", "vehicle.trailer",
    "vehicle.truck",
)
ATTRIBUTES = ("vehicle.moving", "vehicle.stopped", "vehicle.parked", "cycle.with_rider", "cycle.without_rider",
              "pedestrian.sitting_lying_down", "pedestrian.standing", "pedestrian.moving")
VISIBILITY = (("1", "v0-40", "visibility of whole object is between 0 and 40%"),
              ("2", "v40-60", "visibility of whole object is between 40 and 60%"),
              ("3", "v60-80", "visibility of whole object is between 60 and 80%"),
              ("4", "v80-100", "visibility of whole object is between 80 and 100%"))

# Flat paint per category: saturated, far from the grey background and from each other.
COLOURS: dict[str, tuple[int, int, int]] = {
    "vehicle.car": (215, 25, 30),
    "human.pedestrian.adult": (30, 70, 230),
    "vehicle.truck": (245, 200, 0),
    "movable_object.trafficcone": (255, 120, 0),
}


@dataclass(frozen=True)
class ObjectKind:
    category: str
    size: tuple[float, float, float]  # (w, l, h) metres, the nuScenes order
    distance: tuple[float, float]     # metres from the ego origin
    attribute: str
    word: str                         # for DriveLM descriptions


CAR = ObjectKind("vehicle.car", (1.9, 4.6, 1.6), (10.0, 16.0), "vehicle.parked", "car")
PEDESTRIAN = ObjectKind("human.pedestrian.adult", (0.65, 0.7, 1.75), (6.0, 10.0), "pedestrian.standing",
                        "pedestrian")
TRUCK = ObjectKind("vehicle.truck", (2.5, 7.0, 3.0), (14.0, 20.0), "vehicle.stopped", "truck")
CONE = ObjectKind("movable_object.trafficcone", (0.4, 0.4, 0.8), (6.0, 9.0), "", "traffic cone")

# Real mini scene names first, so the devkit's mini_train / mini_val splits apply to the fixture.
SCENE_NAMES = ("scene-0061", "scene-0103", "scene-0553", "scene-0655", "scene-0916", "scene-0757",
               "scene-0796", "scene-1077", "scene-1094", "scene-1100")


def _quaternion_yaw(yaw: float):
    from pyquaternion import Quaternion

    return Quaternion(axis=[0.0, 0.0, 1.0], angle=yaw)


def camera_rotation(yaw_deg: float):
    """Camera -> ego rotation: the optical axis (camera z) turned `yaw_deg` left of ego x."""
    from pyquaternion import Quaternion

    forward = Quaternion(0.5, -0.5, 0.5, -0.5)  # camera z -> ego x, camera x -> ego -y, camera y -> ego -z
    return _quaternion_yaw(np.radians(yaw_deg)) * forward


def intrinsic(channel: str) -> np.ndarray:
    _, _, focal, cx, cy = RIG[channel]
    return np.array([[focal, 0.0, cx], [0.0, focal, cy], [0.0, 0.0, 1.0]])


class _Tokens:
    """Seeded 32-hex tokens like the real ones (deterministic for a seed)."""

    def __init__(self, seed: int) -> None:
        self._rng = random.Random(f"tokens-{seed}")

    def __call__(self) -> str:
        return f"{self._rng.getrandbits(128):032x}"


def _background(seed: int) -> np.ndarray:
    """Sky-to-road grey gradient with mild noise, shared by every camera image (built once: fast)."""
    rows = np.linspace(0.0, 1.0, HEIGHT, dtype=np.float32)[:, None, None]
    sky_top, horizon, road = (np.array(c, dtype=np.float32) for c in ((170, 185, 200), (200, 200, 196), (92, 92, 96)))
    horizon_row = 0.52
    sky = sky_top + (horizon - sky_top) * (rows / horizon_row)
    ground = horizon + (road - horizon) * np.clip((rows - horizon_row) / (1 - horizon_row) * 3, 0, 1)
    base = np.where(rows < horizon_row, sky, ground)
    noise = np.random.default_rng(seed).normal(0.0, 4.0, (HEIGHT, WIDTH, 1)).astype(np.float32)
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def _in_camera(box_global, ego_translation, ego_rotation, channel: str):
    """The box in `channel`'s frame, moved exactly as `NuScenes.get_sample_data` moves it."""
    box = box_global.copy()
    box.translate(-np.asarray(ego_translation))
    box.rotate(ego_rotation.inverse)
    translation, yaw, *_ = RIG[channel]
    box.translate(-np.asarray(translation))
    box.rotate(camera_rotation(yaw).inverse)
    return box


def _placement(box_global, ego_t, ego_q, own: str) -> np.ndarray | None:
    """Projected corners (2x8) in `own` when the box lies wholly inside that image and clear of
    every other camera (entirely behind it or projecting outside it); else None."""
    from nuscenes.utils.geometry_utils import view_points

    projected = None
    for channel in CAMERAS:
        corners = _in_camera(box_global, ego_t, ego_q, channel).corners()
        in_front = corners[2] > 0.1
        if channel == own:
            if not in_front.all():
                return None
            uv = view_points(corners, intrinsic(channel), normalize=True)[:2]
            if uv[0].min() <= 1 or uv[0].max() >= WIDTH - 1 or uv[1].min() <= 1 or uv[1].max() >= HEIGHT - 1:
                return None
            projected = uv
        elif in_front.any():
            if not in_front.all():
                return None  # straddles this camera's image plane
            uv = view_points(corners, intrinsic(channel), normalize=True)[:2]
            if uv[0].max() >= 0 and uv[0].min() <= WIDTH and uv[1].max() >= 0 and uv[1].min() <= HEIGHT:
                return None  # would show in this camera too
    return projected


def _place(kind: ObjectKind, channel: str, ego_t, ego_q, rng: random.Random):
    """A Box of `kind` (global frame) seen by `channel` only, and its projected corners there."""
    from nuscenes.utils.data_classes import Box

    yaw_cam = np.radians(RIG[channel][1])
    for _ in range(200):
        direction = yaw_cam + np.radians(rng.uniform(-6.0, 6.0))
        distance = rng.uniform(*kind.distance)
        local = np.array([distance * np.cos(direction), distance * np.sin(direction), kind.size[2] / 2])
        center = ego_q.rotate(local) + np.asarray(ego_t)
        heading = ego_q * _quaternion_yaw(rng.uniform(-np.pi, np.pi))
        box = Box(center.tolist(), list(kind.size), heading, name=kind.category)
        uv = _placement(box, ego_t, ego_q, channel)
        if uv is not None:
            return box, uv
    raise RuntimeError(f"could not place a {kind.category} in {channel}")  # a bug in the rig or sizes


def _paint(image: np.ndarray, corners_uv: np.ndarray, colour: tuple[int, int, int]) -> list[float]:
    """Fill the hull of the projected corners; returns its pixel box [x1, y1, x2, y2]."""
    hull = convex_hull(corners_uv)
    x1, y1 = (int(np.floor(v)) for v in corners_uv.min(axis=1))
    x2, y2 = (int(np.ceil(v)) + 1 for v in corners_uv.max(axis=1))
    mask = Image.new("L", (x2 - x1, y2 - y1), 0)
    ImageDraw.Draw(mask).polygon([(x - x1, y - y1) for x, y in hull], fill=255)
    region = image[y1:y2, x1:x2]
    region[np.asarray(mask) > 0] = colour
    return [round(float(v), 2) for v in (*corners_uv.min(axis=1), *corners_uv.max(axis=1))]


def write_nuscenes(root: str | Path, *, n_scenes: int = 2, samples_per_scene: int = 6, seed: int = 0,
                   version: str = "v1.0-mini", drop_camera: str | None = None, corrupt_camera: str | None = None,
                   missing_camera_file: str | None = None, degenerate_box: bool = False,
                   distractors: bool = True) -> Path:
    """Write the dataset under `root` and return `root`.

    Bad-input options, each hitting one fixed sample (numbered over the whole dataset, in order):
    `drop_camera` leaves that channel out of sample 0 (only five cameras); `corrupt_camera`
    truncates that channel's JPEG of sample 1; `missing_camera_file` deletes that channel's JPEG of
    sample 2; `degenerate_box` gives sample 3 an extra zero-size annotation in front of CAM_FRONT.
    `distractors` adds a pedestrian and a truck, each in another camera than the car.
    """
    for name, channel in (("drop_camera", drop_camera), ("corrupt_camera", corrupt_camera),
                          ("missing_camera_file", missing_camera_file)):
        if channel is not None and channel not in CAMERAS:
            raise ValueError(f"{name} must be one of {CAMERAS}, got {channel!r}")
    root = Path(root)
    table_dir = root / version
    table_dir.mkdir(parents=True, exist_ok=True)
    token = _Tokens(seed)
    rng = random.Random(seed)
    background = _background(seed)

    tables: dict[str, list[dict[str, Any]]] = {name: [] for name in (
        "category", "attribute", "visibility", "instance", "sensor", "calibrated_sensor", "ego_pose", "log",
        "scene", "sample", "sample_data", "sample_annotation", "map")}
    category_token = {}
    for index, name in enumerate(CATEGORIES, start=1):
        category_token[name] = token()
        tables["category"].append({"token": category_token[name], "name": name,
                                   "description": f"synthetic {name}", "index": index})
    attribute_token = {}
    for name in ATTRIBUTES:
        attribute_token[name] = token()
        tables["attribute"].append({"token": attribute_token[name], "name": name, "description": name})
    tables["visibility"] = [{"token": t, "level": level, "description": d} for t, level, d in VISIBILITY]
    sensor_token = {}
    for channel in CAMERAS:
        sensor_token[channel] = token()
        tables["sensor"].append({"token": sensor_token[channel], "channel": channel, "modality": "camera"})

    map_token = token()
    map_file = f"maps/{map_token}.png"
    (root / "maps").mkdir(exist_ok=True)
    road = np.zeros((200, 200), dtype=np.uint8)
    road[80:120, :] = 255
    Image.fromarray(road).save(root / map_file)
    tables["map"].append({"token": map_token, "category": "semantic_prior", "filename": map_file, "log_tokens": []})

    camera_order: list[str] = []
    truth: dict[str, Any] = {"version": version, "width": WIDTH, "height": HEIGHT, "seed": seed,
                             "colours": {k: list(v) for k, v in COLOURS.items()}, "samples": []}
    sample_index = 0
    for scene_index in range(n_scenes):
        log_name = f"n015-2018-07-{11 + scene_index % 18:02d}-11-22-45+0800"
        log_token = token()
        tables["log"].append({"token": log_token, "logfile": log_name, "vehicle": "n015",
                              "date_captured": log_name[5:15], "location": "singapore-onenorth"})
        tables["map"][0]["log_tokens"].append(log_token)
        calibration = {}
        for channel in CAMERAS:
            translation, yaw, *_ = RIG[channel]
            calibration[channel] = token()
            tables["calibrated_sensor"].append({
                "token": calibration[channel], "sensor_token": sensor_token[channel],
                "translation": list(translation), "rotation": list(camera_rotation(yaw)),
                "camera_intrinsic": intrinsic(channel).tolist()})
        scene_token = token()
        scene_name = SCENE_NAMES[scene_index] if scene_index < len(SCENE_NAMES) else f"scene-{2000 + scene_index}"
        sample_tokens = [token() for _ in range(samples_per_scene)]
        instances: dict[str, list[str]] = {}  # category -> its annotation tokens in this scene, in order
        instance_token = {}
        previous_data: dict[str, dict[str, Any]] = {}
        start_xy = np.array([400.0 + 150.0 * scene_index, 1100.0])
        heading = rng.uniform(-np.pi, np.pi)
        ego_q = _quaternion_yaw(heading)
        timestamp0 = 1_531_281_439_800_000 + scene_index * 100_000_000
        for k, sample_token in enumerate(sample_tokens):
            timestamp = timestamp0 + k * 500_000
            ego_t = [*(start_xy + 4.0 * k * np.array([np.cos(heading), np.sin(heading)])).tolist(), 0.0]
            tables["sample"].append({"token": sample_token, "timestamp": timestamp, "scene_token": scene_token,
                                     "prev": sample_tokens[k - 1] if k else "",
                                     "next": sample_tokens[k + 1] if k + 1 < samples_per_scene else ""})
            if not camera_order:
                camera_order = list(CAMERAS)
                rng.shuffle(camera_order)
            main_camera = camera_order.pop()
            others = [c for c in CAMERAS if c != main_camera]
            rng.shuffle(others)
            placed = [(CAR, main_camera)]
            if distractors:
                placed += [(PEDESTRIAN, others[0]), (TRUCK, others[1])]
            images = {channel: background.copy() for channel in CAMERAS}
            sample_truth: dict[str, Any] = {"token": sample_token, "scene_token": scene_token, "index": sample_index,
                                            "main_camera": main_camera, "objects": []}
            for kind, channel in placed:
                box, uv = _place(kind, channel, ego_t, ego_q, rng)
                pixel_box = _paint(images[channel], uv, COLOURS[kind.category])
                ann_token = token()
                if kind.category not in instance_token:
                    instance_token[kind.category] = token()
                    instances[kind.category] = []
                instances[kind.category].append(ann_token)
                tables["sample_annotation"].append({
                    "token": ann_token, "sample_token": sample_token, "instance_token": instance_token[kind.category],
                    "visibility_token": "4",
                    "attribute_tokens": [attribute_token[kind.attribute]] if kind.attribute else [],
                    "translation": [float(v) for v in box.center], "size": list(kind.size),
                    "rotation": [float(v) for v in box.orientation], "prev": "", "next": "",
                    "num_lidar_pts": rng.randint(5, 200), "num_radar_pts": rng.randint(0, 5)})
                sample_truth["objects"].append({"annotation_token": ann_token, "category": kind.category,
                                                "word": kind.word, "camera": channel, "box_px": pixel_box,
                                                "colour": list(COLOURS[kind.category])})
            if degenerate_box and sample_index == 3:
                ann_token = token()
                cone_instance = token()
                tables["instance"].append({"token": cone_instance, "category_token": category_token[CONE.category],
                                           "nbr_annotations": 1, "first_annotation_token": ann_token,
                                           "last_annotation_token": ann_token})
                center = ego_q.rotate([8.0, 0.0, 0.4]) + np.asarray(ego_t)
                tables["sample_annotation"].append({
                    "token": ann_token, "sample_token": sample_token, "instance_token": cone_instance,
                    "visibility_token": "4", "attribute_tokens": [], "translation": center.tolist(),
                    "size": [0.0, 0.0, 0.0], "rotation": list(ego_q), "prev": "", "next": "",
                    "num_lidar_pts": 3, "num_radar_pts": 0})
                sample_truth["degenerate_annotation"] = ann_token
            for channel in CAMERAS:
                if drop_camera == channel and sample_index == 0:
                    sample_truth["dropped_camera"] = channel
                    continue
                sd_token = token()
                cam_timestamp = timestamp + CAMERA_DELAY_US[channel]
                filename = f"samples/{channel}/{log_name}__{channel}__{cam_timestamp}.jpg"
                path = root / filename
                path.parent.mkdir(parents=True, exist_ok=True)
                data = simplejpeg.encode_jpeg(images[channel], quality=90, colorspace="RGB", colorsubsampling="420")
                if corrupt_camera == channel and sample_index == 1:
                    data = data[: len(data) // 2]
                    sample_truth["corrupt_camera"] = channel
                if not (missing_camera_file == channel and sample_index == 2):
                    path.write_bytes(data)
                else:
                    sample_truth["missing_camera_file"] = channel
                tables["ego_pose"].append({"token": sd_token, "timestamp": cam_timestamp,
                                           "rotation": list(ego_q), "translation": ego_t})
                record = {"token": sd_token, "sample_token": sample_token, "ego_pose_token": sd_token,
                          "calibrated_sensor_token": calibration[channel], "timestamp": cam_timestamp,
                          "fileformat": "jpg", "is_key_frame": True, "height": HEIGHT, "width": WIDTH,
                          "filename": filename, "prev": "", "next": ""}
                if channel in previous_data:
                    previous_data[channel]["next"] = sd_token
                    record["prev"] = previous_data[channel]["token"]
                previous_data[channel] = record
                tables["sample_data"].append(record)
            truth["samples"].append(sample_truth)
            sample_index += 1
        for category, ann_tokens in instances.items():
            tables["instance"].append({"token": instance_token[category], "category_token": category_token[category],
                                       "nbr_annotations": len(ann_tokens), "first_annotation_token": ann_tokens[0],
                                       "last_annotation_token": ann_tokens[-1]})
        by_token = {a["token"]: a for a in tables["sample_annotation"]}
        for ann_tokens in instances.values():
            for a, b in zip(ann_tokens, ann_tokens[1:]):
                by_token[a]["next"], by_token[b]["prev"] = b, a
        tables["scene"].append({"token": scene_token, "log_token": log_token, "nbr_samples": samples_per_scene,
                                "first_sample_token": sample_tokens[0], "last_sample_token": sample_tokens[-1],
                                "name": scene_name, "description": "Synthetic drive, parked cars, pedestrians"})

    for name, rows in tables.items():
        (table_dir / f"{name}.json").write_text(json.dumps(rows, indent=0), encoding="utf-8")
    (root / TRUTH_FILE).write_text(json.dumps(truth, indent=1), encoding="utf-8")
    return root


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + ", and " + items[-1]


def _direction(channel: str) -> str:
    return {"CAM_FRONT": "front", "CAM_FRONT_LEFT": "front left", "CAM_FRONT_RIGHT": "front right",
            "CAM_BACK": "back", "CAM_BACK_LEFT": "back left", "CAM_BACK_RIGHT": "back right"}[channel]


def _colour_word(category: str) -> str:
    return {"vehicle.car": "red", "human.pedestrian.adult": "blue", "vehicle.truck": "yellow"}.get(category, "orange")


def write_drivelm(path: str | Path, nusc_root: str | Path, *, seed: int = 0, unknown_frame: bool = False,
                  bad_tag: bool = False) -> Path:
    """Write DriveLM-style QA for every sample of the synthetic dataset at `nusc_root`.

    Object tags `<cN,CAM,x,y>` are the centres of the painted objects' boxes in 1600x900 camera
    pixels (from `synthetic_truth.json`). `unknown_frame` adds a key frame whose sample token is not
    in the nuScenes tables; `bad_tag` adds a QA whose tag names a camera that does not exist.
    """
    truth = json.loads((Path(nusc_root) / TRUTH_FILE).read_text(encoding="utf-8"))
    rng = random.Random(seed)
    files = _camera_files(Path(nusc_root), truth["version"])
    out: dict[str, Any] = {}
    for sample in truth["samples"]:
        objects = sample["objects"]
        tags = []
        infos = {}
        for n, obj in enumerate(objects, start=1):
            x1, y1, x2, y2 = obj["box_px"]
            tag = f"<c{n},{obj['camera']},{(x1 + x2) / 2:.1f},{(y1 + y2) / 2:.1f}>"
            tags.append(tag)
            infos[tag] = {"Category": "Pedestrian" if obj["word"] == "pedestrian" else "Vehicle",
                          "Status": "Stationary" if obj["word"] != "pedestrian" else "Standing",
                          "Visual_description": f"{_colour_word(obj['category']).capitalize()} {obj['word']}.",
                          "2d_bbox": [x1, y1, x2, y2]}
        phrases = [f"a {_colour_word(o['category'])} {o['word']} to the {_direction(o['camera'])} of the ego vehicle"
                   for o in objects]
        listing = _join(phrases)
        main = tags[0]
        ahead = objects[0]["camera"] == "CAM_FRONT"
        qa = {
            "perception": [
                {"Q": "What are the important objects in the current scene? Those objects will be considered for "
                      "the future reasoning and driving decision.",
                 "A": f"There is {listing}. The IDs of these objects are {_join(tags)}."},
                {"Q": f"What is the moving status of object {main}? Please select the correct answer from the "
                      "following options: A. Going ahead. B. Turn left. C. Stationary. D. Back up.",
                 "A": "C."},
            ],
            "prediction": [
                {"Q": f"Is {main} a traffic sign or a road barrier?", "A": "No."},
                {"Q": f"Would {main} be in the moving direction of the ego vehicle?", "A": "Yes." if ahead else "No."},
            ],
            "planning": [
                {"Q": f"What actions could the ego vehicle take based on {main}? Why take this action and what's "
                      "the probability?",
                 "A": ("The action is to slow down. The reason is that the car ahead is stationary, high probability."
                       if ahead else "The action is to keep going at the same speed. The reason is that there is "
                       "no safety issue, high probability.")},
            ],
            "behavior": [
                {"Q": "Predict the behavior of the ego vehicle.",
                 "A": "The ego vehicle is going straight. The ego vehicle is driving "
                      f"{rng.choice(['slowly', 'with normal speed'])}."},
            ],
        }
        if bad_tag and sample["index"] == 0:
            qa["perception"].append({"Q": "What is <c9,CAM_TOP,100.0,100.0>?", "A": "A sign."})
        scene = out.setdefault(sample["scene_token"], {
            "scene_description": "The ego vehicle drives along a straight road past parked vehicles.",
            "key_frames": {}})
        scene["key_frames"][sample["token"]] = {"key_object_infos": infos, "QA": qa,
                                                "image_paths": files.get(sample["token"], {})}
    if unknown_frame:  # first in its scene, a copy of a real frame under a token nuScenes does not have
        first_scene = next(iter(out.values()))
        frames = first_scene["key_frames"]
        first_scene["key_frames"] = {"f" * 32: dict(next(iter(frames.values()))), **frames}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1), encoding="utf-8")
    return path


def _camera_files(root: Path, version: str) -> dict[str, dict[str, str]]:
    """{sample_token: {channel: '../nuscenes/<filename>'}} as DriveLM writes its image paths."""
    tables = root / version
    channel_of = {s["token"]: s["channel"] for s in json.loads((tables / "sensor.json").read_text())}
    sensor_of = {c["token"]: channel_of[c["sensor_token"]] for c in json.loads((tables / "calibrated_sensor.json").read_text())}
    files: dict[str, dict[str, str]] = {}
    for sd in json.loads((tables / "sample_data.json").read_text()):
        files.setdefault(sd["sample_token"], {})[sensor_of[sd["calibrated_sensor_token"]]] = f"../nuscenes/{sd['filename']}"
    return files
