"""Demo datasets whose answers can only be read off the pixels, in the real release formats.

The medical and remote-sensing demos train the random-init tiny model for a few CPU minutes, so every
question is about a large, flat feature a small vision tower picks up quickly (whether there is a
bright lesion, on which side, a bright layer at the bottom, a scene's colour, which cell of a 2x2 grid
holds an object, is there water, how many red buildings fill four slots), each source asks one or two
question types (the budget of a few thousand sample passes learns about three or four), and every
question type is balanced over its answers, so a model that ignores the image scores the chance
level the report prints (1/2 for yes/no and left/right, 1/3 for the DICOM classes, 1/4 for counts,
scene classes and grid cells). The grounding tiles are lit by a fixed gradient (`_lit`): the tiny
model's vision tower starts with zero position embeddings, and a flat object looks the same in any
cell until they are learned. Every image is a different file (seeded jitter and noise): the
held-out split drops training images identical to a held-out one, and with a few distinct pictures
that emptied whole answer classes from training. Unlike the fixtures in `medical.py` / `sources.py`
(a few rows that exercise every formatter branch), these files are all valid and there are enough
of them to learn from."""

from __future__ import annotations

import csv
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from formatters.synthetic.sources import OBJECTS, Box, _save, paint, write_class_folders

# ------------------------------------------------------------------------------------------ medical

# Hounsfield units of the painted anatomy, and the CT soft-tissue window they are rendered with:
# air is black, the body mid grey, a lesion or fluid layer white.
AIR_HU, BODY_HU, LESION_HU = -1000, 40, 400
CT_WINDOW = (40, 400)
SCAN_SIZE = 128
# Lesion centres as fractions of the image: (name, x, y) per quadrant of the image (not the patient).
QUADRANTS = (("upper left", 0.27, 0.27), ("upper right", 0.73, 0.27), ("lower left", 0.27, 0.73),
             ("lower right", 0.73, 0.73))


def scan_hu(quadrant: int | None, *, effusion: bool = False, seed: int = 0, size: int = SCAN_SIZE) -> np.ndarray:
    """A square axial "scan" in HU: an elliptical body with soft-tissue noise, a bright round lesion
    in QUADRANTS[quadrant] (None: no lesion) and, with `effusion`, a bright fluid layer at the bottom
    of the body. `seed` moves the lesion within its quadrant and varies its size, the layer's height
    and the noise, so no two scans are the same file: held-out scans are never training scans (the
    held-out split drops training images identical to a held-out one, which would empty whole classes)."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:size, 0:size] / size
    body = ((xs - 0.5) / 0.46) ** 2 + ((ys - 0.5) / 0.42) ** 2 <= 1
    hu = np.where(body, BODY_HU + rng.normal(0, 20, (size, size)), AIR_HU)
    if quadrant is not None:
        _, cx, cy = QUADRANTS[quadrant]
        cx, cy = cx + rng.uniform(-0.04, 0.04), cy + rng.uniform(-0.04, 0.04)
        hu[(xs - cx) ** 2 + (ys - cy) ** 2 <= rng.uniform(0.14, 0.18) ** 2] = LESION_HU
    if effusion:
        hu[body & (ys >= rng.uniform(0.68, 0.74))] = LESION_HU
    return np.rint(hu).astype(np.int16)


def _windowed(hu: np.ndarray) -> Image.Image:
    """The scan as an 8-bit greyscale RGB picture (what a PACS export in the VQA datasets looks like)."""
    center, width = CT_WINDOW
    unit = np.clip((hu.astype(np.float32) - (center - width / 2)) / width, 0, 1)
    return Image.fromarray(np.rint(unit * 255).astype(np.uint8)).convert("RGB")


def write_vqa_rad_demo(root: str | Path, n_images: int = 64) -> Path:
    """`VQA_RAD Dataset Public.json` + `VQA_RAD Image Folder/`: even images have a lesion (quadrant
    cycling), odd ones none, and each asks the CLOSED presence question (PRES, yes/no). Returns the json path."""
    root = Path(root)
    rows = []
    for i in range(n_images):
        quadrant = (i // 2) % 4 if i % 2 == 0 else None
        name = f"synpic{1000 + i}.jpg"
        _save(_windowed(scan_hu(quadrant, seed=1000 + i)), root / "VQA_RAD Image Folder" / name)
        rows.append({"qid": i + 1, "image_name": name, "image_organ": "CHEST", "answer_type": "CLOSED",
                     "phrase_type": "freeform", "question_type": "PRES", "question": "Is there a lesion in this image?",
                     "answer": "yes" if quadrant is not None else "no"})
    path = root / "VQA_RAD Dataset Public.json"
    path.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    return path


def write_slake_demo(root: str | Path, n_images: int = 64) -> Path:
    """A Slake1.0 folder whose train.json asks, for each image (a lesion in quadrant i % 4), the English
    CLOSED question whether the lesion is on the left or the right side; validate/test are empty. Returns root."""
    root = Path(root)
    rows = []
    for i in range(n_images):
        quadrant = i % 4
        _save(_windowed(scan_hu(quadrant, seed=2000 + i)), root / "imgs" / f"xmlab{i}" / "source.jpg")
        rows.append({"img_id": i, "img_name": f"xmlab{i}/source.jpg", "q_lang": "en", "location": "Chest",
                     "modality": "CT", "answer_type": "CLOSED", "base_type": "vqa", "content_type": "Position",
                     "question": "Is the lesion on the left or the right side of the image?",
                     "answer": QUADRANTS[quadrant][0].split()[1].capitalize(), "qid": 1000 + i})
    for name, split_rows in (("train", rows), ("validate", []), ("test", [])):
        (root / f"{name}.json").write_text(json.dumps(split_rows, indent=1), encoding="utf-8")
    return root


DICOM_CLASSES = ("normal", "nodule", "effusion")


def _write_ct(path: Path, hu: np.ndarray) -> None:
    """A Part-10 CT file: stored = HU + 1024 (slope 1, intercept -1024), soft-tissue window."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientID, ds.PatientName = "CT", path.stem.upper(), "Anonymous^Patient"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = hu.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 1, -1024, "HU"
    ds.WindowCenter, ds.WindowWidth = CT_WINDOW
    ds.PixelData = (hu.astype(np.int32) + 1024).astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def write_dicom_demo(root: str | Path, per_class: int = 12) -> Path:
    """CT studies `<class>_<i>.dcm` + `labels.csv` (file,label): normal = body only, nodule = a lesion
    in an upper quadrant (left and right alternating; a lower one looks like the fluid layer to the
    tiny demo model), effusion = a bright bottom layer. Returns the folder."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    labels = []
    for i in range(per_class):
        for label in DICOM_CLASSES:
            hu = scan_hu(i % 2 if label == "nodule" else None, effusion=label == "effusion",
                         seed=3000 + DICOM_CLASSES.index(label) * per_class + i)
            _write_ct(root / f"{label}_{i:03d}.dcm", hu)
            labels.append((f"{label}_{i:03d}.dcm", label))
    with open(root / "labels.csv", "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([("file", "label"), *labels])
    return root


# ----------------------------------------------------------------------------------- remote sensing

GRID = 2  # grounding boxes sit in the cells of a GRID x GRID layout (a coarse grid a tiny model learns)
TILE = 192


def _textured(image: Image.Image, seed: int) -> Image.Image:
    """`image` with seeded pixel noise: every tile is a different file (see `scan_hu` for why)."""
    noise = np.random.default_rng(seed).normal(0, 8, (image.height, image.width, 1))
    return Image.fromarray(np.clip(np.asarray(image, dtype=np.float32) + noise, 0, 255).astype(np.uint8))


def _lit(image: Image.Image) -> Image.Image:
    """`image` under a fixed illumination: brighter towards the right, warmer towards the bottom.
    The random-init demo model's vision tower starts with zero position embeddings, so without this
    every patch of a flat object looks the same wherever it is; a pretrained InternViT knows where a
    patch is. The light is the same in every tile, so it tells where a patch is, never the answer."""
    pixels = np.asarray(image, dtype=np.float32)
    height, width = pixels.shape[:2]
    bright = 0.6 + 0.8 * np.linspace(0, 1, width)[None, :, None]
    warm = 0.7 + 0.6 * np.linspace(0, 1, height)[:, None]
    gain = bright * np.stack([warm, np.ones_like(warm), 2 - warm], axis=-1)
    return Image.fromarray(np.clip(pixels * gain, 0, 255).astype(np.uint8))


def grid_box(cell: int, size: int = TILE) -> Box:
    """The pixel box of an object filling grid cell `cell` (row-major) less a margin."""
    step, margin = size // GRID, size // (GRID * 8)
    x1, y1 = (cell % GRID) * step + margin, (cell // GRID) * step + margin
    return x1, y1, x1 + step - 2 * margin, y1 + step - 2 * margin


def write_aid_demo(root: str | Path, per_class: int = 10) -> Path:
    """AID-style class folders: each class is the colour of a patch covering most of the tile."""
    return write_class_folders(root, per_class=per_class, size=(96, 96))


def write_dior_rsvg_grid(root: str | Path, per_cell: int = 12) -> Path:
    """DIOR-RSVG layout with one object per image, in cell (i % GRID**2) of the grid, its category
    cycling over OBJECTS; the description names colour and category but not the place. Every object
    is listed in train.txt (val.txt and test.txt are empty). Returns root."""
    root = Path(root)
    categories = list(OBJECTS)
    for i in range(per_cell * GRID * GRID):
        stem, cell, category = f"{i + 1:05d}", i % (GRID * GRID), categories[(i // (GRID * GRID)) % len(categories)]
        box = grid_box(cell)
        _save(_textured(_lit(paint((TILE, TILE), [(OBJECTS[category], box)])), seed=4000 + i),
              root / "JPEGImages" / f"{stem}.jpg")
        ann = ET.Element("annotation")
        ET.SubElement(ann, "filename").text = f"{stem}.jpg"
        size_el = ET.SubElement(ann, "size")
        for tag, value in zip(("width", "height", "depth"), (TILE, TILE, 3)):
            ET.SubElement(size_el, tag).text = str(value)
        obj = ET.SubElement(ann, "object")
        ET.SubElement(obj, "name").text = category
        bndbox = ET.SubElement(obj, "bndbox")
        for tag, value in zip(("xmin", "ymin", "xmax", "ymax"), box):
            ET.SubElement(bndbox, tag).text = str(value)
        ET.SubElement(obj, "description").text = f"the {OBJECTS[category]} {category}"
        (root / "Annotations").mkdir(parents=True, exist_ok=True)
        ET.ElementTree(ann).write(root / "Annotations" / f"{stem}.xml", encoding="utf-8")
    (root / "train.txt").write_text("".join(f"{i}\n" for i in range(per_cell * GRID * GRID)), encoding="utf-8")
    for split in ("val", "test"):
        (root / f"{split}.txt").write_text("", encoding="utf-8")
    return root


# Four building slots across the top half (tall blocks: the red area grows with the count); water in
# the bottom half.
BUILDING_SLOTS: tuple[Box, ...] = tuple((8 + 46 * k, 12, 8 + 46 * k + 34, 84) for k in range(4))
WATER: Box = (8, 112, 184, 184)


def write_rsvqa_demo(root: str | Path, n_images: int = 36) -> Path:
    """RSVQA-LR train split (`LR_split_train_{questions,answers,images}.json`, `Images_LR/<id>.tif`):
    image i has water (a blue band across the bottom) when i % 2 == 0 and i // 2 % 4 buildings (red
    blocks in the first slots), and
    asks presence (yes/no) and count (0..3); all active. Buildings and water move by a few pixels from
    tile to tile. Returns root."""
    root = Path(root)
    rng = np.random.default_rng(5000)
    questions, answers, images = [], [], []
    for image_id in range(n_images):
        water, buildings = image_id % 2 == 0, (image_id // 2) % 4
        dx, dy = (int(v) for v in rng.integers(-6, 7, 2))
        shapes = [("blue", (WATER[0] + dx, WATER[1] + dy, WATER[2] + dx, WATER[3] + dy))] if water else []
        shapes += [("red", (x1 + dx, y1 + dy, x2 + dx, y2 + dy)) for x1, y1, x2, y2 in BUILDING_SLOTS[:buildings]]
        _save(_textured(paint((TILE, TILE), shapes), seed=6000 + image_id), root / "Images_LR" / f"{image_id}.tif")
        qa = [("presence", "Is there a water area?", "yes" if water else "no"),
              ("count", "How many buildings are there?", str(buildings))]
        ids = []
        for qtype, text, answer in qa:
            question_id = len(questions)
            questions.append({"id": question_id, "date_added": 1.5e9, "img_id": image_id, "people_id": 0,
                              "type": qtype, "question": text, "answers_ids": [10_000 + question_id], "active": True})
            answers.append({"id": 10_000 + question_id, "date_added": 1.5e9, "question_id": question_id,
                            "people_id": 0, "answer": answer, "active": True})
            ids.append(question_id)
        images.append({"id": image_id, "people_id": 0, "original_name": f"tile_{image_id}.tif",
                       "questions_ids": ids, "active": True})
    for key, items in (("questions", questions), ("answers", answers), ("images", images)):
        (root / f"LR_split_train_{key}.json").write_text(json.dumps({key: items}), encoding="utf-8")
    return root
