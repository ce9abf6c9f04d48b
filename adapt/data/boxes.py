"""Boxes: pixel <-> InternVL's 0..1000 grid, source conventions, and the text form.

InternVL writes a box as `<box>[[x1, y1, x2, y2]]</box>` with corners normalised to integers
0..1000 by round(x / W * 1000). Sources come as pixel xyxy, pixel xywh (COCO), or 0..1 floats
(some LLaVA-style releases); mixing these up silently is a known peer bug, so the conversion
functions here take the convention explicitly and `looks_normalized` guards pixel fields.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

Box = Sequence[float]
GRID = 1000

_BOX_TEXT = re.compile(r"\[\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*\]")
_BOX_TAG = re.compile(r"<box>(.*?)</box>", re.S)
_REF_TAG = re.compile(r"<ref>(.*?)</ref>", re.S)


def xywh_to_xyxy(box: Box) -> list[float]:
    x, y, w, h = box
    return [x, y, x + w, y + h]


def looks_normalized(box: Box) -> bool:
    """True when every coordinate is within [0, 1] and at least one is fractional: a 0..1 box.

    A pixel box inside the first pixel ([0, 0, 1, 1]) is degenerate anyway, so this never mistakes a
    real pixel box for a normalized one.
    """
    return all(0.0 <= float(v) <= 1.0 for v in box) and any(float(v) not in (0.0, 1.0) for v in box)


def box_problem(box: Box, width: int, height: int) -> str | None:
    """Why a pixel xyxy box cannot be used (None when it is fine).

    Boxes that poke out of the image by less than a pixel are accepted (and later clamped);
    anything further out, inverted or of zero area is rejected.
    """
    if len(box) != 4:
        return f"box must have 4 numbers, got {len(box)}"
    x1, y1, x2, y2 = (float(v) for v in box)
    if x2 <= x1 or y2 <= y1:
        return f"box {list(box)} has zero or negative area"
    if x1 < -1 or y1 < -1 or x2 > width + 1 or y2 > height + 1:
        return f"box {list(box)} lies outside the {width}x{height} image"
    inside = clamp([x1, y1, x2, y2], width, height)
    if inside[2] <= inside[0] or inside[3] <= inside[1]:  # e.g. [-1, 0, 0, 1]: within the tolerance, no pixel
        return f"box {list(box)} has no area inside the {width}x{height} image"
    return None


def clamp(box: Box, width: float, height: float) -> list[float]:
    x1, y1, x2, y2 = box
    return [min(max(x1, 0.0), width), min(max(y1, 0.0), height), min(max(x2, 0.0), width), min(max(y2, 0.0), height)]


def to_grid(box: Box, width: int, height: int) -> list[int]:
    """Pixel xyxy -> integer 0..1000 corners (InternVL's round(x / W * 1000))."""
    x1, y1, x2, y2 = clamp(box, width, height)
    return [round(x1 / width * GRID), round(y1 / height * GRID), round(x2 / width * GRID), round(y2 / height * GRID)]


def from_grid(box: Box, width: int, height: int) -> list[float]:
    """Integer 0..1000 corners -> pixel xyxy (within half a grid unit of the original)."""
    x1, y1, x2, y2 = box
    return [x1 / GRID * width, y1 / GRID * height, x2 / GRID * width, y2 / GRID * height]


def point_to_grid(x: float, y: float, width: int, height: int) -> tuple[int, int]:
    return round(min(max(x, 0.0), width) / width * GRID), round(min(max(y, 0.0), height) / height * GRID)


def box_text(boxes: Sequence[Box]) -> str:
    """[[x1, y1, x2, y2], ...] as InternVL writes it (integers, comma-space)."""
    return "[" + ", ".join("[" + ", ".join(str(int(v)) for v in b) + "]" for b in boxes) + "]"


def ref_box(expression: str, boxes: Sequence[Box]) -> str:
    """`<ref>expression</ref><box>[[...]]</box>`: the grounding answer form."""
    return f"<ref>{expression}</ref><box>{box_text(boxes)}</box>"


def parse_boxes(text: str) -> list[list[float]]:
    """All boxes in a model answer: inside <box>...</box> tags when present, else any [x1, y1, x2, y2]."""
    tagged = _BOX_TAG.findall(text)
    sources = tagged if tagged else [text]
    return [[float(v) for v in m] for src in sources for m in _BOX_TEXT.findall(src)]


def parse_refs(text: str) -> list[str]:
    return [r.strip() for r in _REF_TAG.findall(text)]


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two xyxy boxes (any common unit)."""
    ix1, iy1, ix2, iy2 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, ix2 - ix1) * max(0.0, iy2 - iy1)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0
