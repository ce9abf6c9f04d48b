"""nuScenes (+ DriveLM) -> driving records on one stitched six-camera image.

Every sample becomes one 2688x896 JPEG (`images/<sample_token>.jpg`, quality 95): the six 1600x900
cameras, each resized (bicubic) to 896x448 and labelled with its channel name at its top-left
corner, in the official grid

    CAM_FRONT_LEFT | CAM_FRONT | CAM_FRONT_RIGHT
    CAM_BACK_LEFT  | CAM_BACK  | CAM_BACK_RIGHT

InternVL tiles this size 6x2, so each camera is exactly two 448 tiles (12 + thumbnail = 13).

Records, one question per record (so an evaluator scores each; the image is written once per sample):

* With `drivelm=<json>`: one record per DriveLM QA (`per="qa"`, the default: what DriveLM's
  evaluation scores) or one multi-turn record per key frame (`per="frame"`: the image tokens are
  paid once per frame in training). Object tags `<cN,CAM,x,y>` in 1600x900 camera pixels become
  `<cN,CAM,X,Y>` with X, Y in 0..1000 of the stitched image (`convert_tags`); `restore_tags` maps a
  model's answer back for DriveLM's per-camera match score.
* Without DriveLM, questions come from the nuScenes annotations: `grounding` (category in a camera ->
  its boxes), `region` (a box -> its category) and `perception` ("Which camera sees the car?", the
  one question per sample chosen so that answers stay balanced over the six cameras).

Boxes come from the devkit: `get_sample_data` moves each 3D box into the camera frame, the corners
in front of the camera (edges cut at the near plane) are projected with the intrinsics via
`view_points`, and the hull is clipped to the image. A question is only asked when its answer is
unambiguous in the image: every object of that kind seen in the camera is clearly visible
(`min_visibility`, `min_box_px`), a region box overlaps no other object, a perception object is
the only one of its kind in the whole sample. What is left out for these reasons is counted in
`report.stats["not_asked"]`; broken input (a missing camera, an unreadable JPEG, an annotation
whose box projects to nothing) is a counted skip with the sample token.

In parallel (`run(..., num_proc=N)`): `plan` loads the devkit tables, makes the annotation pass,
balances the perception answers and makes every seeded choice over the whole dataset, yielding
one `ImageJob` per sample with its final records; `work` stitches the jobs' images in any
process. So the records, the report and the images are the same bytes for any N.
"""

from __future__ import annotations

import json
import random
import re
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import simplejpeg
from PIL import Image, ImageDraw, ImageFont
from pydantic import Field

from adapt.data import boxes as bx
from adapt.data.images import decode_rgb, resize
from adapt.errors import AdaptError, Report
from formatters.base import Plan, option, sharded, source_text_or_skip

CAMERA_GRID = (("CAM_FRONT_LEFT", "CAM_FRONT", "CAM_FRONT_RIGHT"),
               ("CAM_BACK_LEFT", "CAM_BACK", "CAM_BACK_RIGHT"))
CAMERAS = tuple(c for row in CAMERA_GRID for c in row)
CAMERA_CELL = {cam: (col, row) for row, cams in enumerate(CAMERA_GRID) for col, cam in enumerate(cams)}
CAM_W, CAM_H = 1600, 900          # nuScenes camera images; DriveLM tags are in these pixels
VIEW_W, VIEW_H = 896, 448         # each camera in the stitched image
STITCHED_W, STITCHED_H = VIEW_W * 3, VIEW_H * 2
JPEG_QUALITY = 95
QUESTION_KINDS = ("grounding", "region", "perception")

LAYOUT = ("The image shows six camera views stitched in two rows: top row CAM_FRONT_LEFT, CAM_FRONT, "
          "CAM_FRONT_RIGHT; bottom row CAM_BACK_LEFT, CAM_BACK, CAM_BACK_RIGHT.")
TAG_NOTE = "Objects are written as <id,camera,x,y> with x and y in 0..1000 coordinates of the whole image."
GROUNDING_Q = "Please provide the bounding box coordinate of the region this sentence describes: <ref>{ref}</ref>"
REGION_Q = "What object is in this location <box>{box}</box>? Answer with the object name."
PERCEPTION_Q = "Which camera sees the {name}? Answer with the camera name."

_TAG = re.compile(r"<(c\d+),\s*([A-Za-z_]+),\s*(-?\d+(?:\.\d+)?),\s*(-?\d+(?:\.\d+)?)>")

# Short, speakable names for the nuScenes categories (the grounding phrase and the region answer).
NAMES = {
    "animal": "animal", "human.pedestrian.adult": "pedestrian", "human.pedestrian.child": "pedestrian",
    "human.pedestrian.construction_worker": "pedestrian", "human.pedestrian.police_officer": "pedestrian",
    "human.pedestrian.personal_mobility": "scooter rider", "human.pedestrian.stroller": "stroller",
    "human.pedestrian.wheelchair": "wheelchair", "movable_object.barrier": "barrier",
    "movable_object.debris": "debris", "movable_object.pushable_pullable": "cart",
    "movable_object.trafficcone": "traffic cone", "static_object.bicycle_rack": "bicycle rack",
    "vehicle.bicycle": "bicycle", "vehicle.bus.bendy": "bus", "vehicle.bus.rigid": "bus", "vehicle.car": "car",
    "vehicle.construction": "construction vehicle", "vehicle.emergency.ambulance": "ambulance",
    "vehicle.emergency.police": "police car", "vehicle.motorcycle": "motorcycle", "vehicle.trailer": "trailer",
    "vehicle.truck": "truck",
}
_PLURALS = {"bus": "buses", "debris": "debris", "scooter rider": "scooter riders"}

# Edges of a devkit `Box.corners()` cuboid (corner order: front face 0-3, back face 4-7).
_BOX_EDGES = ((0, 1), (1, 2), (2, 3), (3, 0), (4, 5), (5, 6), (6, 7), (7, 4), (0, 4), (1, 5), (2, 6), (3, 7))
_NEAR = 0.1  # metres: the devkit's "in front of the camera"


def display_name(category: str) -> str:
    return NAMES.get(category, category.rsplit(".", 1)[-1].replace("_", " "))


def plural(name: str) -> str:
    if name in _PLURALS:
        return _PLURALS[name]
    return name + ("es" if name.endswith(("s", "x", "ch", "sh")) else "s")


# --------------------------------------------------------------------------- coordinates


def camera_to_stitched(cam: str, x: float, y: float) -> tuple[float, float]:
    """1600x900 camera pixel -> pixel of the 2688x896 stitched image."""
    col, row = _cell(cam)
    return col * VIEW_W + x * VIEW_W / CAM_W, row * VIEW_H + y * VIEW_H / CAM_H


def camera_box_to_stitched(cam: str, box: Sequence[float]) -> list[float]:
    x1, y1 = camera_to_stitched(cam, box[0], box[1])
    x2, y2 = camera_to_stitched(cam, box[2], box[3])
    return [x1, y1, x2, y2]


def drivelm_tag_to_stitched(cam: str, x: float, y: float) -> tuple[int, int]:
    """A DriveLM tag point (1600x900 pixels of `cam`) -> integer 0..1000 point of the stitched image."""
    if not (-1 <= x <= CAM_W + 1 and -1 <= y <= CAM_H + 1):
        raise ValueError(f"point ({x}, {y}) lies outside the {CAM_W}x{CAM_H} {cam} image")
    px, py = camera_to_stitched(cam, min(max(x, 0.0), CAM_W), min(max(y, 0.0), CAM_H))
    return bx.point_to_grid(px, py, STITCHED_W, STITCHED_H)


def stitched_to_camera(X: float, Y: float, cam: str | None = None) -> tuple[str, float, float]:
    """A 0..1000 stitched point -> (camera, x, y) in 1600x900 camera pixels.

    The camera is the view the point falls in, unless `cam` is given (a tag names its camera; a
    point rounded onto the border of the neighbouring view still belongs to it, clamped to its edge).
    """
    px = min(max(X, 0.0), bx.GRID) / bx.GRID * STITCHED_W
    py = min(max(Y, 0.0), bx.GRID) / bx.GRID * STITCHED_H
    if cam is None:
        cam = CAMERA_GRID[min(int(py // VIEW_H), 1)][min(int(px // VIEW_W), 2)]
    col, row = _cell(cam)
    x = min(max((px - col * VIEW_W) * CAM_W / VIEW_W, 0.0), CAM_W)
    y = min(max((py - row * VIEW_H) * CAM_H / VIEW_H, 0.0), CAM_H)
    return cam, x, y


def convert_tags(text: str) -> str:
    """Rewrite every `<cN,CAM,x,y>` (camera pixels) as `<cN,CAM,X,Y>` (0..1000 of the stitched image).

    Raises ValueError for an unknown camera or a point outside the camera image.
    """
    def one(match: re.Match) -> str:
        ident, cam, x, y = match.group(1), match.group(2), float(match.group(3)), float(match.group(4))
        X, Y = drivelm_tag_to_stitched(cam, x, y)
        return f"<{ident},{cam},{X},{Y}>"

    return _TAG.sub(one, text)


def restore_tags(text: str) -> str:
    """Inverse of `convert_tags`: `<cN,CAM,X,Y>` (0..1000 stitched) -> camera pixels, one decimal.

    A tag with an unknown camera name is placed by its position in the grid.
    """
    def one(match: re.Match) -> str:
        ident, cam = match.group(1), match.group(2)
        cam_out, x, y = stitched_to_camera(float(match.group(3)), float(match.group(4)),
                                           cam if cam in CAMERA_CELL else None)
        return f"<{ident},{cam_out},{x:.1f},{y:.1f}>"

    return _TAG.sub(one, text)


def tags_in(text: str) -> list[str]:
    return [m.group(0) for m in _TAG.finditer(text)]


def _cell(cam: str) -> tuple[int, int]:
    if cam not in CAMERA_CELL:
        raise ValueError(f"unknown camera {cam!r} (expected one of {', '.join(CAMERAS)})")
    return CAMERA_CELL[cam]


# --------------------------------------------------------------------------- projection


def convex_hull(points: np.ndarray) -> list[tuple[float, float]]:
    """Convex hull (monotone chain) of 2xN points, counter-clockwise."""
    pts = sorted({(float(x), float(y)) for x, y in points.T})
    if len(pts) < 3:
        return pts

    def cross(o, a, b) -> float:
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower: list[tuple[float, float]] = []
    upper: list[tuple[float, float]] = []
    for p in pts:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    for p in reversed(pts):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    return lower[:-1] + upper[:-1]


def _clip_polygon(polygon: list[tuple[float, float]], width: float, height: float) -> list[tuple[float, float]]:
    """Sutherland-Hodgman clip of a convex polygon to [0, width] x [0, height]."""
    for axis, limit, keep_below in ((0, 0.0, False), (0, width, True), (1, 0.0, False), (1, height, True)):
        if not polygon:
            break

        def inside(p, axis=axis, limit=limit, keep_below=keep_below) -> bool:
            return p[axis] <= limit if keep_below else p[axis] >= limit

        clipped = []
        for i, current in enumerate(polygon):
            previous = polygon[i - 1]
            if inside(current) != inside(previous):
                t = (limit - previous[axis]) / (current[axis] - previous[axis])
                clipped.append((previous[0] + t * (current[0] - previous[0]), previous[1] + t * (current[1] - previous[1])))
            if inside(current):
                clipped.append(current)
        polygon = clipped
    return polygon


def project_box(box, intrinsic: np.ndarray, width: int = CAM_W, height: int = CAM_H) -> list[float] | None:
    """The 2D pixel box [x1, y1, x2, y2] of a devkit `Box` (camera frame) in the image, or None.

    Corners in front of the camera are projected with `view_points`; where the box crosses the
    near plane its edges are cut there, so a box partly behind the camera still gets the part
    that shows. The hull is clipped to the image; None when nothing of positive area remains.
    """
    from nuscenes.utils.geometry_utils import view_points

    corners = box.corners()
    if not np.isfinite(corners).all():
        return None
    front = corners[2] > _NEAR
    if not front.any():
        return None
    points = [corners[:, i] for i in range(8) if front[i]]
    if not front.all():
        for i, j in _BOX_EDGES:
            if front[i] != front[j]:
                a, b = corners[:, i], corners[:, j]
                points.append(a + (_NEAR - a[2]) / (b[2] - a[2]) * (b - a))
    uv = view_points(np.array(points).T, intrinsic, normalize=True)[:2]
    polygon = _clip_polygon(convex_hull(uv), width, height)
    if len(polygon) < 3:
        return None
    xs, ys = [p[0] for p in polygon], [p[1] for p in polygon]
    x1, y1, x2, y2 = min(xs), min(ys), max(xs), max(ys)
    if x2 - x1 <= 0 or y2 - y1 <= 0:
        return None
    return [x1, y1, x2, y2]


# --------------------------------------------------------------------------- stitching


@dataclass
class Timings:
    """Seconds spent per image step (added to `report.timing`, summed over worker processes; the
    benchmark reads them)."""

    decode: float = 0.0
    resize: float = 0.0
    label: float = 0.0
    encode: float = 0.0
    write: float = 0.0

    def to_dict(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in self.__dict__.items()}


@lru_cache(maxsize=1)
def _labels() -> dict[str, tuple[np.ndarray, np.ndarray, tuple[int, int]]]:
    """Each channel name pre-rendered once (white on a black outline): (rgb, alpha, (x, y) offset)."""
    try:
        font: Any = ImageFont.load_default(size=30)
    except (OSError, ValueError, ImportError):  # Pillow built without FreeType: small bitmap font
        font = ImageFont.load_default()
    out = {}
    for cam in CAMERAS:
        left, top, right, bottom = ImageDraw.Draw(Image.new("L", (1, 1))).textbbox((0, 0), cam, font=font, stroke_width=3)
        w, h = right - left + 2, bottom - top + 2
        rgb = Image.new("RGB", (w, h), (0, 0, 0))
        alpha = Image.new("L", (w, h), 0)
        for canvas, fill, stroke in ((rgb, (255, 255, 255), (0, 0, 0)), (alpha, 255, 255)):
            ImageDraw.Draw(canvas).text((1 - left, 1 - top), cam, font=font, fill=fill, stroke_width=3,
                                        stroke_fill=stroke)
        out[cam] = (np.asarray(rgb, dtype=np.float32), np.asarray(alpha, dtype=np.float32)[..., None] / 255.0,
                    (8, 6))
    return out


class CameraImageError(Exception):
    """A camera JPEG that cannot be used (missing, corrupt, wrong size)."""


def decode_camera(path: Path) -> np.ndarray:
    """Decode a camera JPEG to RGB uint8 HxWx3 (libjpeg-turbo through simplejpeg: the same pixels as
    PIL, 1.3-2.8x faster as measured here); anything that is not a clean JPEG goes through PIL, which
    also reports truncation. Raises CameraImageError."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CameraImageError(f"camera image not found: {path}") from None
    except OSError as err:
        raise CameraImageError(f"camera image unreadable: {path} ({err})") from None
    try:
        array = simplejpeg.decode_jpeg(data, colorspace="RGB")
    except ValueError:
        try:

            array = np.asarray(decode_rgb(data))
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            raise CameraImageError(f"corrupt camera image: {path} ({err})") from None
    if array.shape[:2] != (CAM_H, CAM_W):
        raise CameraImageError(f"camera image {path} is {array.shape[1]}x{array.shape[0]}, expected {CAM_W}x{CAM_H}")
    return array


def stitch(paths: dict[str, Path], timings: Timings | None = None) -> np.ndarray:
    """The 2688x896 stitched RGB array of the six camera images (raises CameraImageError)."""
    timings = timings if timings is not None else Timings()
    canvas = np.empty((STITCHED_H, STITCHED_W, 3), dtype=np.uint8)
    labels = _labels()
    for cam in CAMERAS:
        t0 = time.perf_counter()
        array = decode_camera(paths[cam])
        t1 = time.perf_counter()
        # PyTorch's antialiased uint8 bicubic: ~8x faster than PIL's for this shrink, within one grey
        # level of it (see adapt.data.images.resize and tests/test_tiling.py)
        view = resize(array, VIEW_W, VIEW_H)
        col, row = CAMERA_CELL[cam]
        x0, y0 = col * VIEW_W, row * VIEW_H
        canvas[y0:y0 + VIEW_H, x0:x0 + VIEW_W] = view
        t2 = time.perf_counter()
        rgb, alpha, (dx, dy) = labels[cam]
        h, w = alpha.shape[:2]
        patch = canvas[y0 + dy:y0 + dy + h, x0 + dx:x0 + dx + w]
        patch[:] = (patch * (1.0 - alpha) + rgb * alpha + 0.5).astype(np.uint8)
        timings.decode += t1 - t0
        timings.resize += t2 - t1
        timings.label += time.perf_counter() - t2
    return canvas


def encode_jpeg(canvas: np.ndarray) -> bytes:
    """JPEG quality 95, 4:2:0 (libjpeg-turbo, as PIL writes by default)."""
    return simplejpeg.encode_jpeg(canvas, quality=JPEG_QUALITY, colorspace="RGB", colorsubsampling="420")


# --------------------------------------------------------------------------- nuScenes loading


def load_nuscenes(root: Path, version: str):
    """The devkit's `NuScenes`, with its asserts and KeyErrors turned into a user error."""
    from nuscenes.nuscenes import NuScenes

    if not (root / version).is_dir():
        raise AdaptError(f"nuScenes tables for version {version!r} not found (expected {root / version}/*.json)",
                         path=root, hint="pass the nuScenes dataroot and the right --version (v1.0-mini, v1.0-trainval)")
    try:
        return NuScenes(version=version, dataroot=str(root), verbose=False)
    except (AssertionError, FileNotFoundError, KeyError, IndexError, TypeError, json.JSONDecodeError) as err:
        raise AdaptError(f"the nuScenes devkit could not load {version}: {type(err).__name__}: {err}", path=root,
                         hint="check that all 13 tables, the map png files and the log/map links are present") from None


def split_scenes(nusc, split: str | None) -> set[str] | None:
    """Scene tokens of a devkit split (None: all scenes)."""
    if split is None:
        return None
    from nuscenes.utils.splits import create_splits_scenes

    splits = create_splits_scenes()
    if split not in splits:
        raise AdaptError(f"unknown nuScenes split {split!r}", hint="choose one of: " + ", ".join(sorted(splits)))
    names = set(splits[split])
    tokens = {s["token"] for s in nusc.scene if s["name"] in names}
    if not tokens:
        raise AdaptError(f"no scene of split {split!r} is in this dataset", path=nusc.dataroot,
                         hint="pick the split that matches the version (mini_train / mini_val for v1.0-mini)")
    return tokens


class BadSample(Exception):
    """A sample whose data contradicts itself; skipped as a whole."""


@dataclass
class SeenBox:
    """One annotation as one camera shows it."""

    token: str
    category: str
    name: str
    camera: str
    box_px: list[float]         # camera pixels, clipped to the image
    eligible: bool              # devkit ANY visibility, visible enough, big enough: fit to ask about

    @property
    def stitched(self) -> list[float]:
        return camera_box_to_stitched(self.camera, self.box_px)


@dataclass
class SampleView:
    token: str
    scene_token: str
    paths: dict[str, Path]
    seen: list[SeenBox] = field(default_factory=list)


def camera_paths(nusc, sample: dict[str, Any]) -> dict[str, Path]:
    """The six camera files of a sample (raises BadSample when one is missing or mis-sized)."""
    missing = [cam for cam in CAMERAS if cam not in sample["data"]]
    if missing:
        raise BadSample(f"sample lacks camera(s) {', '.join(missing)} (needs all six)")
    paths = {}
    for cam in CAMERAS:
        sd = nusc.get("sample_data", sample["data"][cam])
        if (sd.get("width"), sd.get("height")) != (CAM_W, CAM_H):
            raise BadSample(f"{cam} is listed as {sd.get('width')}x{sd.get('height')}, expected {CAM_W}x{CAM_H}")
        paths[cam] = Path(nusc.get_sample_data_path(sd["token"]))
    return paths


def sample_view(nusc, sample: dict[str, Any], *, min_visibility: int, min_box_px: float) -> SampleView:
    """Paths of the six cameras and every annotation each camera shows (raises BadSample)."""
    from nuscenes.utils.geometry_utils import BoxVisibility, box_in_image

    view = SampleView(sample["token"], sample["scene_token"], camera_paths(nusc, sample))
    for ann_token in sample["anns"]:
        size = np.asarray(nusc.get("sample_annotation", ann_token)["size"], dtype=float)
        if size.shape != (3,) or not np.isfinite(size).all() or (size <= 0).any():
            raise BadSample(f"annotation {ann_token} has zero or invalid size {size.tolist()}")
    for cam in CAMERAS:
        # NONE, then the devkit's own ANY test: the same boxes get_sample_data(ANY) returns, plus the
        # ones it drops that still show (partly behind the camera), which decide what is unambiguous.
        _, boxes, intrinsic = nusc.get_sample_data(sample["data"][cam], box_vis_level=BoxVisibility.NONE)
        for box in boxes:
            any_visible = box_in_image(box, intrinsic, (CAM_W, CAM_H), vis_level=BoxVisibility.ANY)
            box_px = project_box(box, intrinsic)
            if box_px is None:
                if any_visible:
                    raise BadSample(f"projected box of annotation {box.token} in {cam} has zero area or lies "
                                    "outside the image")
                continue
            visibility = int(nusc.get("sample_annotation", box.token).get("visibility_token") or 0)
            stitched = camera_box_to_stitched(cam, box_px)
            big_enough = min(stitched[2] - stitched[0], stitched[3] - stitched[1]) >= min_box_px
            view.seen.append(SeenBox(box.token, box.name, display_name(box.name), cam, box_px,
                                     bool(any_visible) and visibility >= min_visibility and big_enough))
    return view


# --------------------------------------------------------------------------- questions


@dataclass
class Question:
    kind: str
    human: str
    answer: str
    meta: dict[str, Any]


def _grid_box(stitched_box: Sequence[float]) -> list[int]:
    return bx.to_grid(stitched_box, STITCHED_W, STITCHED_H)


def _rounded(box: Sequence[float]) -> list[float]:
    return [round(float(v), 2) for v in box]


def grounding_questions(view: SampleView, not_asked: Counter) -> list[Question]:
    """'<ref>the car in CAM_FRONT</ref>' -> all its boxes, when every such object there is clear."""
    groups: dict[tuple[str, str], list[SeenBox]] = {}
    for seen in view.seen:
        groups.setdefault((seen.name, seen.camera), []).append(seen)
    out = []
    for (name, cam), members in groups.items():
        if not all(m.eligible for m in members):
            if any(m.eligible for m in members):
                not_asked["grounding: some objects of the kind are barely visible"] += 1
            continue
        members.sort(key=lambda m: (m.box_px[0], m.box_px[1]))
        ref = f"the {name if len(members) == 1 else plural(name)} in {cam}"
        grid = [_grid_box(m.stitched) for m in members]
        out.append(Question("grounding", GROUNDING_Q.format(ref=ref), bx.ref_box(ref, grid), {
            "task": "grounding", "camera": cam, "category": [m.category for m in members], "name": name,
            "annotation_tokens": [m.token for m in members], "boxes_px": [_rounded(m.stitched) for m in members],
            "boxes_camera_px": [_rounded(m.box_px) for m in members], "boxes_grid": grid}))
    return out


def region_questions(view: SampleView, not_asked: Counter) -> list[Question]:
    """A box -> the name of the one object in it (boxes overlapping another object are not asked)."""
    out = []
    for seen in view.seen:
        if not seen.eligible:
            continue
        others = [o for o in view.seen if o is not seen and o.camera == seen.camera]
        if any(bx.iou(seen.box_px, o.box_px) > 0.3 for o in others):
            not_asked["region: box overlaps another object"] += 1
            continue
        grid = _grid_box(seen.stitched)
        out.append(Question("region", REGION_Q.format(box=bx.box_text([grid])), seen.name, {
            "task": "region", "camera": seen.camera, "category": seen.category, "name": seen.name,
            "annotation_token": seen.token, "boxes_px": [_rounded(seen.stitched)],
            "boxes_camera_px": [_rounded(seen.box_px)], "boxes_grid": [grid]}))
    return out


def perception_candidates(view: SampleView) -> list[SeenBox]:
    """Objects whose kind occurs once in the whole sample and shows in exactly one camera, clearly."""
    by_name: dict[str, list[SeenBox]] = {}
    for seen in view.seen:
        by_name.setdefault(seen.name, []).append(seen)
    return [group[0] for group in by_name.values() if len(group) == 1 and group[0].eligible]


def perception_question(seen: SeenBox) -> Question:
    return Question("perception", PERCEPTION_Q.format(name=seen.name), seen.camera, {
        "task": "driving", "answer_type": "camera", "camera": seen.camera, "category": seen.category,
        "name": seen.name, "annotation_token": seen.token, "boxes_px": [_rounded(seen.stitched)],
        "boxes_camera_px": [_rounded(seen.box_px)]})


# --------------------------------------------------------------------------- the generator


def _parse_questions(questions: str | Iterable[str]) -> tuple[str, ...]:
    kinds = tuple(q.strip() for q in (questions.split(",") if isinstance(questions, str) else questions) if q.strip())
    unknown = [q for q in kinds if q not in QUESTION_KINDS]
    if unknown or not kinds:
        raise AdaptError(f"unknown question kind(s) {unknown or kinds!r}",
                         hint="choose from: " + ", ".join(QUESTION_KINDS))
    return kinds


def _record(record_id: str, image: str, turns: list[tuple[str, str]], meta: dict[str, Any],
            note: str = "") -> dict[str, Any]:
    """One single-image record; the first question carries the layout (and `note`)."""
    preamble = f"<image>\n{LAYOUT}\n" + (f"{note}\n" if note else "")
    conversations = []
    for i, (human, gpt) in enumerate(turns):
        conversations.append({"from": "human", "value": preamble + human if i == 0 else human})
        conversations.append({"from": "gpt", "value": gpt})
    return {"id": record_id, "image": image, "conversations": conversations,
            "meta": {"domain": "driving", "image_size": [STITCHED_W, STITCHED_H], **meta}}


def image_path(token: str) -> str:
    """The record path of a sample's stitched image (known before it is written)."""
    return f"images/{token}.jpg"


def _write_image(token: str, paths: dict[str, Path], out: Path, timings: Timings) -> None:
    """Stitch, encode and write the sample's image (raises CameraImageError)."""
    canvas = stitch(paths, timings)
    t0 = time.perf_counter()
    data = encode_jpeg(canvas)
    t1 = time.perf_counter()
    (out / "images").mkdir(exist_ok=True)
    (out / image_path(token)).write_bytes(data)
    timings.encode += t1 - t0
    timings.write += time.perf_counter() - t1


@dataclass
class ImageJob:
    """One sample's stitched image and the records that show it: the unit of parallel work.

    The records are final when planned; they are written only if the image is (a broken camera
    file is a skip of the whole sample). `counts` are the `report.stats` counters they add to."""

    token: str
    paths: dict[str, Path]
    records: list[dict[str, Any]]
    counts: dict[str, list[str]]


@dataclass(frozen=True)
class JobContext:
    source: Path
    counters: dict[str, tuple[str, ...]]  # report.stats counters and the keys they start with (at 0)


def work(context: JobContext, jobs: Sequence[ImageJob], out: Path, report: Report) -> Iterator[dict[str, Any]]:
    """Stitch and write each job's image, then yield its records (in any process: no shared state)."""
    timings = Timings()
    counters = {name: Counter({key: 0 for key in keys}) for name, keys in context.counters.items()}
    report.stats.update(counters)
    try:
        for job in jobs:
            try:
                _write_image(job.token, job.paths, out, timings)
            except CameraImageError as err:
                report.skip(str(err), path=context.source, id=job.token)
                continue
            for name, keys in job.counts.items():
                counters[name].update(keys)
            yield from job.records
    finally:
        for step, seconds in timings.to_dict().items():
            report.timing[step] = report.timing.get(step, 0.0) + seconds


def plan(source: Path, out: Path, report: Report, *, version: str = "v1.0-mini", drivelm: str | None = None,
         split: str | None = None, questions: str | Iterable[str] = QUESTION_KINDS, per: str = "qa",
         min_visibility: int = 2, min_box_px: float = 6.0, max_questions: int = 4, seed: int = 0,
         **unknown: Any) -> Plan:
    """Every driving record of the nuScenes dataroot `source` (see the module docstring), with the
    images still to write: the annotation pass, the camera balance and every seeded choice are made
    here over the whole dataset, so the records do not depend on how the images are shared out.

    `min_visibility`: lowest nuScenes visibility level (1..4) of an object to ask about;
    `min_box_px`: shortest side (stitched pixels) of a box to ask about; `max_questions`: at most
    this many grounding and this many region questions per sample (seeded choice). With `drivelm`
    the questions come from the DriveLM file and these four options do not apply.
    """
    if unknown:
        raise AdaptError(f"unknown driving option(s): {', '.join(sorted(unknown))}",
                         hint="driving takes version, drivelm, split, questions, per, min_visibility, min_box_px, "
                              "max_questions, seed")
    if per not in ("qa", "frame"):
        raise AdaptError(f"per must be 'qa' or 'frame', got {per!r}")
    kinds = _parse_questions(questions)
    count = Annotated[int, Field(ge=0)]
    options = {"min_visibility": option("driving", "min_visibility", min_visibility, count),
               "min_box_px": option("driving", "min_box_px", min_box_px, Annotated[float, Field(ge=0)])}
    max_questions, seed = option("driving", "max_questions", max_questions, count), option("driving", "seed", seed, count)
    source = Path(source)
    started = time.perf_counter()
    nusc = load_nuscenes(source, version)
    scenes = split_scenes(nusc, split)
    if drivelm:
        jobs = _drivelm_jobs(nusc, Path(drivelm), source, report, scenes, per)
        counters: dict[str, tuple[str, ...]] = {"qa_per_group": ()}
    else:
        jobs = _nuscenes_jobs(nusc, source, report, scenes, kinds, max_questions, seed, options)
        counters = {"perception_answers": CAMERAS, "questions": ()}
    report.timing["plan"] = report.timing.get("plan", 0.0) + time.perf_counter() - started  # devkit load included
    # about 0.06 s of CPU a sample, against ~1 s of CPU for the workers' server to import torch
    return Plan(jobs, JobContext(source, counters), min_per_process=8)


def balance_cameras(options: Sequence[Sequence[str]], rng: random.Random) -> list[str | None]:
    """One camera per item, from its options, with the counts per camera as even as possible.

    Most constrained items first, each to its least-used option; then, while a camera can hand one
    item down a chain of reassignments to a camera with at least two fewer, do so (each such move
    lowers the sum of squared counts, so this ends; with no such chain left, max - min cannot be
    lowered by moving items). Items without options get None.
    """
    counts = Counter({cam: 0 for cam in CAMERAS})
    chosen: list[str | None] = [None] * len(options)
    order = sorted(range(len(options)), key=lambda i: (len(options[i]), rng.random()))
    for i in order:
        if options[i]:
            cam = min(options[i], key=lambda c: (counts[c], rng.random()))
            chosen[i] = cam
            counts[cam] += 1
    movable: dict[tuple[str, str], set[int]] = {}  # (assigned camera, other option) -> items
    for i, cam in enumerate(chosen):
        for other in options[i]:
            if cam is not None and other != cam:
                movable.setdefault((cam, other), set()).add(i)

    def move(i: int, to: str) -> None:
        for other in options[i]:
            movable.get((chosen[i], other), set()).discard(i)
        counts[chosen[i]] -= 1
        chosen[i] = to
        counts[to] += 1
        for other in options[i]:
            if other != to:
                movable.setdefault((to, other), set()).add(i)

    improved = True
    while improved:
        improved = False
        for source in sorted(CAMERAS, key=lambda c: -counts[c]):
            parent = {source: source}
            queue = [source]
            target = None
            while queue and target is None:
                cam = queue.pop(0)
                for nxt in CAMERAS:
                    if nxt not in parent and movable.get((cam, nxt)):
                        parent[nxt] = cam
                        if counts[nxt] <= counts[source] - 2:
                            target = nxt
                            break
                        queue.append(nxt)
            if target is not None:
                path = [target]
                while path[-1] != source:
                    path.append(parent[path[-1]])
                for to, frm in zip(path, path[1:]):  # from the target back, so each hop still has its item
                    move(min(movable[(frm, to)]), to)
                improved = True
                break
    return chosen


def _nuscenes_jobs(nusc, source: Path, report: Report, scenes: set[str] | None, kinds: tuple[str, ...],
                   max_questions: int, seed: int, options: dict[str, Any]) -> list[ImageJob]:
    rng = random.Random(seed)
    not_asked: Counter = Counter()
    report.stats["not_asked"] = not_asked
    scene_order = {s["token"]: i for i, s in enumerate(nusc.scene)}
    samples = sorted((s for s in nusc.sample if scenes is None or s["scene_token"] in scenes),
                     key=lambda s: (scene_order.get(s["scene_token"], -1), s["timestamp"]))
    # Pass 1: what each sample shows, so that the perception answers are balanced over the whole dataset.
    views: list[SampleView] = []
    for sample in samples:
        report.read += 1
        try:
            views.append(sample_view(nusc, sample, **options))
        except BadSample as err:
            report.skip(str(err), path=source, id=sample["token"])
    candidates = [perception_candidates(v) if "perception" in kinds else [] for v in views]
    cameras = balance_cameras([sorted({c.camera for c in found}) for found in candidates], rng)
    # Pass 2: the questions (the images are stitched by `work`, only for samples with a question).
    jobs = []
    for view, found, camera in zip(views, candidates, cameras):
        chosen: list[Question] = []
        if "grounding" in kinds:
            chosen += _at_most(grounding_questions(view, not_asked), max_questions, rng)
        if "region" in kinds:
            chosen += _at_most(region_questions(view, not_asked), max_questions, rng)
        if camera is not None:
            chosen.append(perception_question(rng.choice([c for c in found if c.camera == camera])))
        elif "perception" in kinds:
            not_asked["perception: no object kind seen once, in one camera"] += 1
        if not chosen:
            not_asked["sample without any question"] += 1
            continue
        image = image_path(view.token)
        records = [_record(f"{view.token}-{question.kind}-{n}", image, [(question.human, question.answer)], {
            "source": "nuscenes", "sample_token": view.token, "scene_token": view.scene_token,
            "question": question.human, "answer": question.answer, **question.meta})
            for n, question in enumerate(chosen)]
        jobs.append(ImageJob(view.token, view.paths, records, {
            "questions": [q.kind for q in chosen],
            "perception_answers": [q.answer for q in chosen if q.kind == "perception"]}))
    return jobs


def _at_most(questions: list[Question], n: int, rng: random.Random) -> list[Question]:
    return questions if len(questions) <= n else rng.sample(questions, n)


DRIVELM_GROUPS = ("perception", "prediction", "planning", "behavior")


def answer_type(answer: str) -> str:
    """How DriveLM scores an answer: 'choice' / 'yes_no' (accuracy) or 'open' (language, match)."""
    if re.fullmatch(r"\s*[A-D]\.?\s*", answer):
        return "choice"
    if re.match(r"\s*(yes|no)\b", answer, re.I):
        return "yes_no"
    return "open"


def _load_drivelm(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AdaptError("DriveLM file not found", path=path, hint="pass --drivelm the QA json (v1_1_train_nus.json)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AdaptError(f"DriveLM file is not valid JSON ({err})", path=path) from None
    if not isinstance(data, dict):
        raise AdaptError("DriveLM file must be a JSON object {scene_token: {scene_description, key_frames}}", path=path)
    return data


def _drivelm_jobs(nusc, path: Path, source: Path, report: Report, scenes: set[str] | None,
                  per: str) -> list[ImageJob]:
    data = _load_drivelm(path)
    jobs = []
    for scene_token, scene in data.items():
        frames = scene.get("key_frames") if isinstance(scene, dict) else None
        if not isinstance(frames, dict):
            report.read += 1
            report.skip(f"scene {scene_token} has no 'key_frames' object", path=path, id=scene_token)
            continue
        for sample_token, frame in frames.items():
            try:
                sample = nusc.get("sample", sample_token)
            except KeyError:
                report.read += 1
                report.skip(f"key frame sample token {sample_token} is not in the nuScenes {nusc.version} tables",
                            path=path, id=sample_token)
                continue
            if scenes is not None and sample["scene_token"] not in scenes:
                continue
            report.read += 1
            qa = frame.get("QA") if isinstance(frame, dict) else None
            if not isinstance(qa, dict):
                report.skip("key frame has no 'QA' object", path=path, id=sample_token)
                continue
            items = []
            for group in DRIVELM_GROUPS:
                for i, pair in enumerate(qa.get(group) or []):
                    item = _converted_qa(pair, group, i, sample_token, path, report)
                    if item is not None:
                        items.append(item)
            if not items:
                report.skip("key frame has no usable QA", path=path, id=sample_token)
                continue
            try:
                paths = camera_paths(nusc, sample)
            except BadSample as err:
                report.skip(str(err), path=source, id=sample_token)
                continue
            image = image_path(sample_token)
            base = {"source": "drivelm", "task": "driving", "sample_token": sample_token, "scene_token": scene_token}
            if per == "frame":
                records = [_record(f"{sample_token}-drivelm", image, [(it["question"], it["answer"]) for it in items],
                                   {**base, "qa": items}, note=TAG_NOTE)]
            else:
                records = [_record(f"{sample_token}-{it['qa_type']}-{it['index']}", image,
                                   [(it["question"], it["answer"])], {**base, **it}, note=TAG_NOTE) for it in items]
            jobs.append(ImageJob(sample_token, paths, records, {"qa_per_group": [it["qa_type"] for it in items]}))
    return jobs


def _converted_qa(pair: Any, group: str, index: int, sample_token: str, path: Path,
                  report: Report) -> dict[str, Any] | None:
    """One DriveLM QA with its tags in stitched 0..1000 coordinates (None, counted, when unusable)."""
    where = f"{sample_token}/{group}/{index}"
    if not isinstance(pair, dict) or not isinstance(pair.get("Q"), str) or not isinstance(pair.get("A"), str) \
            or not pair["Q"].strip() or not pair["A"].strip():
        report.skip("QA without a non-empty 'Q' and 'A'", path=path, id=where)
        return None
    if not source_text_or_skip(report, {"question": pair["Q"], "answer": pair["A"]}, path=path, row=None, id=where):
        return None
    try:
        question, answer = convert_tags(pair["Q"]), convert_tags(pair["A"])
    except ValueError as err:
        report.skip(f"bad object tag: {err}", path=path, id=where)
        return None
    tag = pair.get("tag")
    if tag is not None and not (isinstance(tag, list) and tag and all(t in (0, 1, 2, 3) for t in tag)):
        report.skip(f"challenge 'tag' must be a list of 0..3 (accuracy, GPT, language, match), got {tag!r}",
                    path=path, id=where)
        return None
    item = {"qa_type": group, "index": index, "question": question, "answer": answer,
            "answer_type": answer_type(pair["A"]), "question_camera_px": pair["Q"],
            "answer_camera_px": pair["A"], "tags_camera_px": tags_in(pair["A"])}
    return item if tag is None else {**item, "tag": tag}


DRIVING = sharded(
    "driving", plan, work,
    image_root=lambda source, **options: None,
    summary="nuScenes (+ DriveLM QA): six cameras stitched into one 2688x896 image; grounding, region and "
            "which-camera questions from the 3D annotations, or DriveLM QA with tags in 0..1000",
)
