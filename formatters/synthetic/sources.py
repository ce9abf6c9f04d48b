"""Tiny synthetic datasets in the real on-disk formats of the vision sources, for tests and the demo.

Every image is painted so that its annotation is true of its pixels: a class is the colour of a large
patch, an object is a flat rectangle of its category's colour exactly where its box says (pixel
edges: the box [x1, y1, x2, y2] covers columns x1..x2-1), an RSVQA answer is what the tile shows
(water = blue pixels, buildings = red squares). A wrong join or a wrong box conversion in a formatter
therefore shows up as a record that disagrees with its image. All writers are deterministic and
take milliseconds.
"""

from __future__ import annotations

import csv
import json
import random
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 230), "yellow": (235, 205, 40),
    "white": (250, 250, 250),
}
BACKGROUND = (110, 110, 110)
# Scene classes (AID / UC Merced style) and the colour that identifies each.
LAND_COVER = {"desert": "yellow", "forest": "green", "residential": "red", "river": "blue"}
# Object categories (DIOR style) and their colours.
OBJECTS = {"vehicle": "red", "storagetank": "white", "pond": "blue", "tree": "green"}
Box = tuple[int, int, int, int]


def paint(size: tuple[int, int], shapes: Sequence[tuple[str, Box]]) -> Image.Image:
    """A grey image with flat rectangles: `shapes` is [(colour name, pixel xyxy box)]."""
    width, height = size
    pixels = np.empty((height, width, 3), dtype=np.uint8)
    pixels[:] = BACKGROUND
    for colour, (x1, y1, x2, y2) in shapes:
        pixels[y1:y2, x1:x2] = COLOURS[colour]
    return Image.fromarray(pixels)


def colour_box(image: Image.Image, colour: str, tolerance: int = 40, near: Sequence[float] | None = None,
               margin: int = 4) -> list[int] | None:
    """The pixel xyxy box of the pixels close to `colour` (None if none), optionally only those within
    `margin` pixels of the box `near`: an independent way for tests to find where an object really is."""
    pixels = np.asarray(image.convert("RGB")).astype(int)
    mask = (np.abs(pixels - np.array(COLOURS[colour])).max(axis=-1) <= tolerance)
    if near is not None:
        x1, y1 = max(int(near[0]) - margin, 0), max(int(near[1]) - margin, 0)
        window = np.zeros_like(mask)
        window[y1:int(near[3]) + margin, x1:int(near[2]) + margin] = True
        mask &= window
    if not mask.any():
        return None
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def _save(image: Image.Image, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        image.save(path, quality=95, subsampling=0)  # 4:4:4 keeps flat colour edges where they are
    else:
        image.save(path)
    return path.name


def _scene(rng: random.Random, colour: str, size: tuple[int, int]) -> Image.Image:
    """A scene-class image: a patch of the class colour covering about half the tile."""
    width, height = size
    x1, y1 = rng.randrange(0, width // 4), rng.randrange(0, height // 4)
    return paint(size, [(colour, (x1, y1, x1 + width * 3 // 4, y1 + height * 3 // 4))])


# --------------------------------------------------------------------------------------------------
# Classification
# --------------------------------------------------------------------------------------------------

def write_class_folders(root: str | Path, per_class: int = 3, classes: Sequence[str] = tuple(LAND_COVER),
                        size: tuple[int, int] = (64, 64), suffix: str = ".jpg", seed: int = 0) -> Path:
    """AID / UC Merced layout: `root/<class>/<class>_<i><suffix>`; the class is the patch colour."""
    root, rng = Path(root), random.Random(seed)
    for label in classes:
        for i in range(per_class):
            _save(_scene(rng, LAND_COVER[label], size), root / label / f"{label}_{i:03d}{suffix}")
    return root


def write_label_file(root: str | Path, per_class: int = 2, classes: Sequence[str] = tuple(LAND_COVER),
                     fmt: str = "csv", size: tuple[int, int] = (48, 48), seed: int = 1) -> Path:
    """Images under `root/images/` plus a label file (`labels.csv` with columns image,label, or
    `labels.json`, an array of {image, label}); image paths are relative to `root`."""
    root, rng = Path(root), random.Random(seed)
    rows = []
    for label in classes:
        for i in range(per_class):
            name = _save(_scene(rng, LAND_COVER[label], size), root / "images" / f"{label}_{i:03d}.png")
            rows.append({"image": f"images/{name}", "label": label})
    if fmt == "csv":
        path = root / "labels.csv"
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=["image", "label"])
            writer.writeheader()
            writer.writerows(rows)
    else:
        path = root / "labels.json"
        path.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    return path


MEDMNIST_NAMES = ("adipose", "background", "debris")


def write_medmnist(path: str | Path, counts: tuple[int, int, int] = (6, 3, 3), rgb: bool = False,
                   size: int = 28, names: Sequence[str] = MEDMNIST_NAMES, seed: int = 0) -> tuple[Path, Path]:
    """A MedMNIST-shaped `<flag>.npz` (compressed, like the release) and the label dict JSON beside it
    (`<flag>_labels.json`, MedMNIST's INFO format {"0": name, ...}). Class k is a centre square of
    brightness 60 + 80k (grayscale) or of colour k of the palette (RGB); labels are (N, 1) uint8."""
    path, rng = Path(path), np.random.default_rng(seed)
    palette = list(COLOURS.values())
    arrays: dict[str, np.ndarray] = {}
    for split, count in zip(("train", "val", "test"), counts):
        labels = np.array([i % len(names) for i in range(count)], dtype=np.uint8)
        shape = (count, size, size, 3) if rgb else (count, size, size)
        images = rng.integers(0, 30, size=shape, dtype=np.uint8)
        lo, hi = size // 4, size - size // 4
        for i, label in enumerate(labels):
            images[i, lo:hi, lo:hi] = palette[int(label)] if rgb else 60 + 80 * int(label)
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels[:, None]
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    names_path = path.with_name(f"{path.stem}_labels.json")
    names_path.write_text(json.dumps({str(i): n for i, n in enumerate(names)}), encoding="utf-8")
    return path, names_path


# --------------------------------------------------------------------------------------------------
# Grounding sources
# --------------------------------------------------------------------------------------------------

def _layout(index: int, size: tuple[int, int]) -> list[tuple[str, Box]]:
    """Objects of image `index`: (category, box), every category at most twice, never overlapping.
    Image 0 has two vehicles (a multi-box expression); the others one object per category."""
    width, height = size
    cells = [(0, 0), (1, 0), (0, 1), (1, 1)]
    categories = ["vehicle", "vehicle", "pond"] if index == 0 else [list(OBJECTS)[(index + k) % 4] for k in range(2)]
    out = []
    for k, category in enumerate(categories):
        cx, cy = cells[(index + k) % 4]
        x1 = cx * width // 2 + 4 + 3 * index
        y1 = cy * height // 2 + 5 + 2 * k
        out.append((category, (x1, y1, x1 + width // 4 + k, y1 + height // 5 + index)))
    return out


def _where(box: Box, size: tuple[int, int]) -> str:
    horizontal = "left" if (box[0] + box[2]) / 2 < size[0] / 2 else "right"
    vertical = "top" if (box[1] + box[3]) / 2 < size[1] / 2 else "bottom"
    return f"{vertical} {horizontal}"


def write_coco(root: str | Path, n_images: int = 3, size: tuple[int, int] = (160, 120)) -> Path:
    """COCO instances (`root/instances.json`, xywh pixel boxes, images in `root/train2014/`) and RefCOCO
    refs for them (`root/refs(unc).json`, one ref per object, two sentences each, splits train/val).
    Returns the instances file."""
    root = Path(root)
    categories = [{"id": i + 1, "name": name, "supercategory": "object"} for i, name in enumerate(OBJECTS)]
    cat_id = {c["name"]: c["id"] for c in categories}
    images, annotations, refs = [], [], []
    for index in range(n_images):
        file_name = f"COCO_train2014_{index + 1:012d}.png"
        layout = _layout(index, size)
        _save(paint(size, [(OBJECTS[c], b) for c, b in layout]), root / "train2014" / file_name)
        images.append({"id": index + 1, "file_name": file_name, "width": size[0], "height": size[1]})
        for category, (x1, y1, x2, y2) in layout:
            ann_id = len(annotations) + 1
            annotations.append({"id": ann_id, "image_id": index + 1, "category_id": cat_id[category],
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
            where, colour = _where((x1, y1, x2, y2), size), OBJECTS[category]
            refs.append({"ref_id": ann_id, "ann_id": ann_id, "image_id": index + 1, "category_id": cat_id[category],
                         "split": "val" if index == n_images - 1 else "train", "file_name": file_name,
                         "sentences": [{"sent_id": 2 * ann_id, "sent": f"{colour} {category} {where}"},
                                       {"sent_id": 2 * ann_id + 1, "sent": f"the {category} at the {where}"}]})
    instances = root / "instances.json"
    instances.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}),
                         encoding="utf-8")
    (root / "refs(unc).json").write_text(json.dumps(refs), encoding="utf-8")
    return instances


def write_dior_rsvg(root: str | Path, n_images: int = 4, size: tuple[int, int] = (200, 200)) -> Path:
    """DIOR-RSVG layout: `Annotations/<id>.xml` (filename, size, objects with name, bndbox and
    description), `JPEGImages/<id>.jpg`, and `train.txt` / `val.txt` / `test.txt` listing global object
    indices (objects counted over the xml files in name order). Returns `root`."""
    root = Path(root)
    index = 0
    splits: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for image_no in range(n_images):
        stem = f"{image_no + 1:05d}"
        layout = _layout(image_no, size)
        _save(paint(size, [(OBJECTS[c], b) for c, b in layout]), root / "JPEGImages" / f"{stem}.jpg")
        ann = ET.Element("annotation")
        ET.SubElement(ann, "filename").text = f"{stem}.jpg"
        size_el = ET.SubElement(ann, "size")
        for tag, value in zip(("width", "height", "depth"), (*size, 3)):
            ET.SubElement(size_el, tag).text = str(value)
        for category, box in layout:
            obj = ET.SubElement(ann, "object")
            ET.SubElement(obj, "name").text = category
            bndbox = ET.SubElement(obj, "bndbox")
            for tag, value in zip(("xmin", "ymin", "xmax", "ymax"), box):
                ET.SubElement(bndbox, tag).text = str(value)
            ET.SubElement(obj, "description").text = f"the {OBJECTS[category]} {category} at the {_where(box, size)}"
            splits["test" if image_no == n_images - 1 else "val" if image_no == n_images - 2 else "train"].append(index)
            index += 1
        (root / "Annotations").mkdir(parents=True, exist_ok=True)
        ET.ElementTree(ann).write(root / "Annotations" / f"{stem}.xml", encoding="utf-8")
    for split, indices in splits.items():
        (root / f"{split}.txt").write_text("".join(f"{i}\n" for i in indices), encoding="utf-8")
    return root


def write_grounding_rows(root: str | Path, normalized: bool = False, n_images: int = 2,
                         size: tuple[int, int] = (160, 100)) -> Path:
    """Plain rows `{id, image, expression, box}` as `root/grounding.jsonl`, one per object, with pixel
    xyxy boxes or (normalized=True) 0..1 floats rounded to 4 decimals. Returns the JSONL file."""
    root = Path(root)
    rows = []
    for index in range(n_images):
        layout = _layout(index + 1, size)
        name = _save(paint(size, [(OBJECTS[c], b) for c, b in layout]), root / "images" / f"scene_{index}.png")
        for k, (category, box) in enumerate(layout):
            value: list[float] = list(box)
            if normalized:
                value = [round(box[0] / size[0], 4), round(box[1] / size[1], 4),
                         round(box[2] / size[0], 4), round(box[3] / size[1], 4)]
            rows.append({"id": f"{index}-{k}", "image": f"images/{name}", "name": category,
                         "expression": f"the {OBJECTS[category]} {category}", "box": value})
    path = root / "grounding.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------------
# RSVQA
# --------------------------------------------------------------------------------------------------

def write_rsvqa(root: str | Path, prefix: str = "LR", splits: Sequence[str] = ("train", "val"),
                images_per_split: int = 3, size: tuple[int, int] = (64, 64)) -> Path:
    """The RSVQA release layout: `<prefix>_split_<split>_{questions,answers,images}.json` and TIFF tiles
    in `Images_LR/<id>.tif` (prefix LR) or `Data/<id>.tif` (USGS). Each tile shows water (a blue patch)
    or not and 0..3 buildings (red squares); questions ask about presence, count and rural/urban, and
    their answers are true of the tile. Answer ids differ from question ids and the answers list is
    shuffled, so only a join by id gives right answers. The second question of each image is marked
    inactive, and in each split the last image is inactive (with its questions). Returns `root`."""
    root = Path(root)
    folder = "Images_LR" if prefix == "LR" else "Data"
    rng = random.Random(7)
    image_id = question_id = 0
    for split in splits:
        questions, answers, images = [], [], []
        for k in range(images_per_split):
            water, buildings = (image_id % 2 == 0), image_id % 4
            shapes: list[tuple[str, Box]] = [("blue", (2, 40, 30, 62))] if water else []
            shapes += [("red", (34 + 8 * b, 4 + 8 * b, 40 + 8 * b, 10 + 8 * b)) for b in range(buildings)]
            _save(paint(size, shapes), root / folder / f"{image_id}.tif")
            active_image = k != images_per_split - 1
            qa = [("presence", "Is there a water area?", "yes" if water else "no"),
                  ("count", "How many buildings are there?", str(buildings)),
                  ("rural_urban", "Is it a rural or an urban area?", "urban" if buildings >= 2 else "rural")]
            ids = []
            for n, (qtype, text, answer) in enumerate(qa):
                answer_id = 1000 + question_id
                questions.append({"id": question_id, "date_added": 1.5e9, "img_id": image_id, "people_id": 0,
                                  "type": qtype, "question": text, "answers_ids": [answer_id],
                                  "active": active_image and n != 1})
                answers.append({"id": answer_id, "date_added": 1.5e9, "question_id": question_id, "people_id": 0,
                                "answer": answer, "active": True})
                ids.append(question_id)
                question_id += 1
            images.append({"id": image_id, "people_id": 0, "original_name": f"tile_{image_id}.tif",
                           "questions_ids": ids, "active": active_image})
            image_id += 1
        rng.shuffle(answers)
        stem = root / f"{prefix}_split_{split}"
        for key, items in (("questions", questions), ("answers", answers), ("images", images)):
            Path(f"{stem}_{key}.json").write_text(json.dumps({key: items}), encoding="utf-8")
    return root


# --------------------------------------------------------------------------------------------------
# General instruction data
# --------------------------------------------------------------------------------------------------

def _conv(question: str, answer: str) -> list[dict[str, str]]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def write_internvl_meta(root: str | Path) -> Path:
    """An InternVL meta file (`root/meta.json`) over two datasets with different roots
    (`root/ds_a/images`, `root/ds_b/pics`), each with a JSONL annotation holding single-image,
    multi-image and text-only rows; both datasets use the ids "0" and "1". Returns the meta file."""
    root = Path(root)
    for name, folder, colour in (("ds_a", "images", "red"), ("ds_b", "pics", "blue")):
        base = root / name / folder
        _save(paint((40, 30), [(colour, (5, 5, 25, 20))]), base / "one.png")
        _save(paint((30, 40), [("green", (2, 2, 12, 12))]), base / "two.png")
        rows = [
            {"id": "0", "image": f"{folder}/one.png",
             "conversations": _conv("<image>\nWhat colour is the rectangle?", colour)},
            {"id": "1", "image": [f"{folder}/one.png", f"{folder}/two.png"],
             "conversations": _conv("Image-1: <image>\nImage-2: <image>\nWhich image shows green?", "Image-2")},
            {"id": "2", "conversations": _conv("What is 2 + 2?", "4")},
        ]
        (root / name / "ann.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    meta = {"ds_a": {"root": "ds_a", "annotation": "ds_a/ann.jsonl", "data_augment": False, "repeat_time": 1},
            "ds_b": {"root": "ds_b", "annotation": "ds_b/ann.jsonl", "data_augment": False, "repeat_time": 2}}
    path = root / "meta.json"
    path.write_text(json.dumps(meta, indent=1), encoding="utf-8")
    return path


def write_llava(root: str | Path) -> Path:
    """A LLaVA-style JSON array (`root/llava.json`, images under `root/coco/`): image rows, text-only
    rows and one row whose answer carries a 0..1 float box. Returns the array file."""
    root = Path(root)
    size = (80, 60)
    box = (20, 15, 60, 45)
    _save(paint(size, [("yellow", box)]), root / "coco" / "a.png")
    _save(paint(size, [("blue", (0, 0, 40, 60))]), root / "coco" / "b.png")
    norm = [round(box[0] / size[0], 3), round(box[1] / size[1], 3), round(box[2] / size[0], 3), round(box[3] / size[1], 3)]
    rows = [
        {"id": 100, "image": "coco/a.png", "conversations": _conv("<image>\nWhat colour is the square?", "Yellow.")},
        {"id": "t1", "conversations": _conv("Name a primary colour.", "Red.")},
        {"id": "b2", "image": "coco/b.png",
         "conversations": _conv("<image>\nWhich half is blue?", "The left half.")
         + _conv("Anything else?", "No, the rest is grey.")},
        {"id": "box", "image": "coco/a.png",
         "conversations": _conv("<image>\nWhere is the yellow square?", f"It is at {norm}.")},
        {"id": "t2", "conversations": _conv("Say hello.", "Hello.")},
    ]
    path = root / "llava.json"
    path.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    return path
