"""Image classification as multiple choice (Mini-InternVL): `[image][prefix][candidates][suffix] -> label`.

    human: <image>\\nClassify the image into one of the following categories:
           A. desert
           B. forest
           C. river
           Answer with the option's letter and the category name from the given choices directly.
    gpt:   B. forest

With `choices="listed"` the candidates are one comma-separated line and the answer is the bare label.
`meta.answer` is exactly the expected answer text ("B. forest" or "forest"); `meta.label` is the bare
label, `meta.letter` its letter (lettered only) and `meta.choices` the candidates in shown order.

Options shared by both formatters: `choices` ("lettered" | "listed"), `shuffle` + `seed` (a shuffle
seeded per record id, so the order does not depend on file order), `max_choices` (the true label
plus seeded random distractors; needed for lettered lists of more than 26 classes), `subset`
(keep only these labels: other samples are dropped and counted in `report.stats`, candidates
are the subset), `prompt_prefix`, `prompt_suffix`, `source_name`, `domain`.

- CLASSIFICATION reads one folder per class (AID / UC Merced: `source/<class>/<image>`), or a label
  file (CSV/TSV with a header, JSON array of objects or `{image: label}`, JSONL) whose columns are
  `image_key` / `label_key`; images are relative to the label file's folder or to `images`. The class
  list is `classes` (a list, or a text file with one class per line, or a JSON list), else the
  folder names / the labels found. A label not in the class list is a counted skip with file and
  row (CSV row = line number), as are missing and corrupt images.
  Rows are checked and their images decoded in parallel (`run(..., num_proc=N)`), same output.
- MEDMNIST reads `<flag>.npz` (`{split}_images` (N, H, W) grayscale or (N, H, W, 3) RGB uint8,
  `{split}_labels` (N,) or (N, 1)) and writes PNGs under `out/images/`; `label_names` (a list, a JSON
  file with a list or MedMNIST's `{"0": "name", ...}` dict, read relative to the working directory)
  is required since the npz holds only indices. Multi-label (ChestMNIST) and 3D volumes are refused: they are not single-choice tasks.
  The npz is read with `allow_pickle=False` and its images streamed one at a time (MedMNIST+ 224 px
  splits do not fit in memory); a label index outside `label_names` is a skip whose row is the
  1-based sample number.
"""

from __future__ import annotations

import csv
import os
import random
import string
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from adapt.data import records as rec
from adapt.data.text import source_problem
from adapt.errors import AdaptError, Report
from formatters.base import (
    IMAGE_EXTENSIONS,
    Formatter,
    ImageChecker,
    Plan,
    choose,
    iter_json_rows,
    load_json,
    parse_options,
    sharded,
    turn,
)
from formatters.grounding import default_name

PROMPT_PREFIX = "Classify the image into one of the following categories:\n"
SUFFIX_LETTERED = "\nAnswer with the option's letter and the category name from the given choices directly."
SUFFIX_LISTED = "\nAnswer with the category name from the given choices directly."
LABEL_FILE_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl")


@dataclass(frozen=True)
class ChoiceOptions:
    choices: str = "lettered"
    shuffle: bool = False
    seed: int = 0
    max_choices: int | None = None
    subset: list[str] | None = None
    prompt_prefix: str = PROMPT_PREFIX
    prompt_suffix: str | None = None
    source_name: str | None = None
    domain: str = "general"


@dataclass(frozen=True)
class ClassificationOptions(ChoiceOptions):
    classes: list[str] | str | None = None
    image_key: str = "image"
    label_key: str = "label"
    images: str | None = None


@dataclass(frozen=True)
class MedmnistOptions(ChoiceOptions):
    split: str = "train"
    label_names: list[str] | dict[str, str] | str | None = None
    domain: str = "medical"


class MultipleChoice:
    """Builds the question and the expected answer for one label, as configured."""

    def __init__(self, kind: str, classes: list[str], opts: ChoiceOptions) -> None:
        choose(kind, "choices", opts.choices, ("lettered", "listed"))
        marked = next(filter(None, (source_problem(c, f"class name {c!r}") for c in classes)), None)
        if marked:
            raise AdaptError(marked, hint="rename the class (folder) so it carries no <...> template markup")
        if len(set(classes)) != len(classes):
            raise AdaptError(f"the class list has duplicates: {classes}")
        missing = [s for s in opts.subset or [] if s not in classes]
        if missing:
            raise AdaptError(f"subset labels {missing} are not in the class list {classes}")
        self.pool = [c for c in classes if c in opts.subset] if opts.subset else list(classes)
        if len(self.pool) < 2:
            raise AdaptError(f"multiple choice needs at least 2 candidate labels, got {self.pool}")
        if opts.max_choices is not None and opts.max_choices < 2:
            raise AdaptError(f"max_choices={opts.max_choices} must be at least 2")
        shown = min(len(self.pool), opts.max_choices or len(self.pool))
        if opts.choices == "lettered" and shown > len(string.ascii_uppercase):
            raise AdaptError(f"{shown} lettered candidates do not fit in the letters A-Z",
                             hint="pass max_choices=26 or less, or choices=listed")
        self.opts = opts
        self.suffix = opts.prompt_suffix if opts.prompt_suffix is not None else (
            SUFFIX_LETTERED if opts.choices == "lettered" else SUFFIX_LISTED)

    def keeps(self, label: str) -> bool:
        return label in self.pool

    def build(self, label: str, record_id: str) -> tuple[str, str, dict[str, Any]]:
        """(question, answer, meta fields) for a sample whose ground truth is `label`."""
        rng = random.Random(f"{self.opts.seed}|{record_id}")
        candidates = list(self.pool)
        if self.opts.max_choices is not None and self.opts.max_choices < len(candidates):
            picked = {label, *rng.sample([c for c in candidates if c != label], self.opts.max_choices - 1)}
            candidates = [c for c in candidates if c in picked]
        if self.opts.shuffle:
            rng.shuffle(candidates)
        meta: dict[str, Any] = {"label": label, "choices": candidates}
        if self.opts.choices == "lettered":
            letter = string.ascii_uppercase[candidates.index(label)]
            body = "\n".join(f"{string.ascii_uppercase[i]}. {c}" for i, c in enumerate(candidates))
            answer = f"{letter}. {label}"
            meta["letter"] = letter
        else:
            body, answer = ", ".join(candidates), label
        return f"{self.opts.prompt_prefix}{body}{self.suffix}", answer, {"answer": answer, **meta}


def _record(record_id: str, image: str, size: tuple[int, int], label: str, mc: MultipleChoice,
            source: str, domain: str) -> rec.Record:
    question, answer, meta = mc.build(label, record_id)
    return {"id": record_id, "image": image, "conversations": turn(question, answer),
            "meta": {"task": "classification", "source": source, "domain": domain, **meta,
                     "image_size": list(size)}}


def _count(report: Report, key: str) -> None:
    report.stats[key] = report.stats.get(key, 0) + 1


# --------------------------------------------------------------------------------------------------
# Class folders and label files
# --------------------------------------------------------------------------------------------------

def _class_list(value: list[str] | str | None, base: Path) -> list[str] | None:
    if value is None or isinstance(value, list):
        return value
    path = Path(value) if Path(value).is_absolute() else base / value
    if path.suffix.lower() == ".json":
        data = load_json(path, "class list")
        if not isinstance(data, list) or not all(isinstance(c, str) for c in data):
            raise AdaptError("a JSON class list must be an array of strings", path=path)
        return data
    if not path.is_file():
        raise AdaptError("class list file not found", path=path, hint="pass classes=[...] or a text file, one per line")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _label_rows(path: Path, opts: ClassificationOptions, report: Report) -> Iterator[tuple[int, Any, Any]]:
    """(row, image, label) from a label file; image/label are None when the row lacks them."""
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        try:
            with open(path, newline="", encoding="utf-8-sig") as handle:
                reader = csv.DictReader(handle, delimiter="\t" if suffix == ".tsv" else ",")
                columns = reader.fieldnames or []
                if opts.image_key not in columns or opts.label_key not in columns:
                    raise AdaptError(f"label file has columns {columns}, not image_key={opts.image_key!r} and "
                                     f"label_key={opts.label_key!r}", path=path, row=1,
                                     hint="pass image_key=... and label_key=... naming its columns")
                for row in reader:
                    yield reader.line_num, row.get(opts.image_key), row.get(opts.label_key)
        except UnicodeDecodeError:
            raise AdaptError("label file is not UTF-8 text", path=path) from None
        except csv.Error as err:
            raise AdaptError(f"malformed CSV ({err})", path=path) from None
        return
    if suffix == ".json":
        data = load_json(path, "label file")
        if isinstance(data, dict):  # {image: label}
            for row, (image, label) in enumerate(data.items(), start=1):
                yield row, image, label
            return
    for row, item in iter_json_rows(path, report):
        if isinstance(item, dict):
            yield row, item.get(opts.image_key), item.get(opts.label_key)
        else:
            yield row, None, None


@dataclass(frozen=True)
class _Rows:
    """What every row of a classification source needs (a worker gets it once)."""

    opts: ClassificationOptions
    root: Path
    name: str
    classes: list[str]
    mc: MultipleChoice


def _classification_plan(source: Path, out: Path, report: Report, **options: Any) -> Plan:
    """The rows (row, label file, image, label, first use of the image) and the class list."""
    opts = parse_options(ClassificationOptions, options, "classification")
    root = _classification_root(source, opts)
    name = opts.source_name or default_name(source)
    if source.is_dir():
        folders = sorted(p for p in source.iterdir() if p.is_dir() and not p.name.startswith("."))
        classes = _class_list(opts.classes, source) or [p.name for p in folders]
        samples: list[tuple[int | None, Path | None, Any, Any]] = [
            (None, None, f.relative_to(source).as_posix(), folder.name)
            for folder in folders for f in sorted(folder.rglob("*"))
            if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in IMAGE_EXTENSIONS]
        report.stats["ignored_files"] = sum(1 for folder in folders for f in folder.rglob("*")
                                            if f.is_file() and f.suffix.lower() not in IMAGE_EXTENSIONS)
    else:
        if source.suffix.lower() not in LABEL_FILE_SUFFIXES:
            raise AdaptError("expected a folder with one sub-folder per class or a label file "
                             f"({', '.join(LABEL_FILE_SUFFIXES)})", path=source)
        samples = [(row, source, image, label) for row, image, label in _label_rows(source, opts, report)]
        found = sorted({str(label).strip() for *_, label in samples if isinstance(label, (str, int)) and str(label).strip()})
        classes = _class_list(opts.classes, source.parent) or found
    mc = MultipleChoice("classification", classes, opts)
    seen: set[str] = set()
    units = []
    for row, path, image, label in samples:
        key = os.path.normpath(image.strip()) if isinstance(image, str) and image.strip() else ""
        units.append((row, path, image, label, key not in seen))
        seen.add(key)
    # a row is one image decode (milliseconds): a worker pays off from a few hundred
    return Plan(units, _Rows(opts, root, name, classes, mc), min_per_process=200)


def _classification_rows(rows: _Rows, units: Sequence[tuple[Any, ...]], out: Path,
                         report: Report) -> Iterator[rec.Record]:
    """One multiple-choice record per usable row (each image fully decoded)."""
    opts, name, classes, mc = rows.opts, rows.name, rows.classes, rows.mc
    checker = ImageChecker(rows.root, report)
    for row, path, image, label, first in units:
        report.read += 1
        # a label file row is located by file:row; a class-folder image (whose root is the source) by its path
        where = path if path is not None else (rows.root / image if isinstance(image, str) else rows.root)
        ident = f"{name}-{row}" if row is not None else f"{name}-{Path(str(image)).with_suffix('').as_posix()}"
        label = str(label).strip() if isinstance(label, (str, int)) and not isinstance(label, bool) else ""
        if not isinstance(image, str) or not image.strip() or not label:
            report.skip(f"row lacks a value for {opts.image_key!r} or {opts.label_key!r}", path=where, row=row, id=ident)
            continue
        if label not in classes:
            report.skip(f"unknown label {label!r} (not in the class list)", path=where, row=row, id=ident)
            continue
        if not mc.keeps(label):
            _count(report, "outside_subset")
            continue
        size = checker.size(image.strip(), path=where, row=row, id=ident, first=first)
        if size is not None:
            yield _record(ident, image.strip(), size, label, mc, name, opts.domain)


def _classification_root(source: Path, opts: ClassificationOptions) -> Path:
    if source.is_dir():
        if opts.images is not None:
            raise AdaptError("option images applies to label files; a class-folder source holds its images",
                             path=source)
        return source
    if opts.images:
        return Path(opts.images) if Path(opts.images).is_absolute() else source.parent / opts.images
    return source.parent


def _classification_image_root(source: Path, **options: Any) -> Path:
    return _classification_root(Path(source), parse_options(ClassificationOptions, options, "classification"))


# --------------------------------------------------------------------------------------------------
# MedMNIST
# --------------------------------------------------------------------------------------------------

def _label_names(value: list[str] | dict[str, str] | str | None) -> list[str]:
    """The class names; a file name is read relative to the working directory, as every path option
    given on the command line is (DriveLM's `drivelm=` too), not relative to the npz."""
    if value is None:
        raise AdaptError("MedMNIST files hold label indices only: pass label_names",
                         hint='a list, or a JSON file with a list or MedMNIST\'s INFO[flag]["label"] dict '
                              '{"0": "adipose", "1": "background", ...}')
    source_path = None
    if isinstance(value, str):
        source_path = Path(value)
        value = load_json(source_path, "label_names file")
    if isinstance(value, dict):
        try:
            ordered = sorted(value.items(), key=lambda kv: int(kv[0]))
        except ValueError:
            raise AdaptError("label_names dict keys must be label indices (\"0\", \"1\", ...)", path=source_path) from None
        if [int(k) for k, _ in ordered] != list(range(len(ordered))):
            raise AdaptError("label_names dict keys must be 0..N-1 without gaps", path=source_path)
        value = [v for _, v in ordered]
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise AdaptError("label_names must be a list of non-empty strings", path=source_path)
    return [v.strip() for v in value]


def _medmnist_labels(source: Path, split: str) -> np.ndarray:
    try:
        with np.load(source, allow_pickle=False) as npz:
            keys = set(npz.files)
            wanted = (f"{split}_images", f"{split}_labels")
            if not set(wanted) <= keys:
                raise AdaptError(f"no {wanted[0]}/{wanted[1]} arrays in this npz (it has {sorted(keys)})", path=source,
                                 hint="choose split=train|val|test")
            labels = npz[wanted[1]]
    except (OSError, ValueError, zipfile.BadZipFile) as err:  # not a zip, or pickled object arrays
        raise AdaptError(f"cannot read the npz file ({err})", path=source) from None
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise AdaptError(f"{split}_labels has shape {labels.shape}: this is a multi-label dataset (like ChestMNIST), "
                         "not a single-choice classification", path=source)
    return labels


def _stream_images(source: Path, key: str) -> Iterator[np.ndarray]:
    """The images of one npz member, one at a time: MedMNIST+ 224 px splits are many GB, so the array
    is read sample by sample from the (possibly compressed) zip member instead of loaded whole."""
    with zipfile.ZipFile(source) as archive, archive.open(f"{key}.npy") as handle:
        version = np.lib.format.read_magic(handle)
        readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in readers:
            raise AdaptError(f"unsupported .npy version {version} for {key}", path=source)
        shape, fortran_order, dtype = readers[version](handle)
        if dtype != np.uint8 or fortran_order:
            raise AdaptError(f"{key} is {dtype}{' (Fortran order)' if fortran_order else ''}; MedMNIST images are "
                             "C-ordered uint8", path=source)
        if not (len(shape) == 3 or (len(shape) == 4 and shape[-1] in (1, 3))):
            raise AdaptError(f"{key} has shape {shape}: expected (N, H, W) grayscale or (N, H, W, 3) RGB "
                             "(3D MedMNIST volumes are not supported)", path=source)
        sample_shape = shape[1:]
        nbytes = int(np.prod(sample_shape))
        for _ in range(shape[0]):
            chunk = handle.read(nbytes)
            if len(chunk) != nbytes:
                raise AdaptError(f"{key} is truncated", path=source)
            pixels = np.frombuffer(chunk, dtype=np.uint8).reshape(sample_shape)
            yield pixels[..., 0] if pixels.ndim == 3 and pixels.shape[-1] == 1 else pixels


def _medmnist(source: Path, out: Path, report: Report, **options: Any) -> Iterator[rec.Record]:
    opts = parse_options(MedmnistOptions, options, "medmnist")
    if source.suffix.lower() != ".npz":
        raise AdaptError("expected a MedMNIST <flag>.npz file", path=source)
    names = _label_names(opts.label_names)
    labels = _medmnist_labels(source, opts.split)
    mc = MultipleChoice("medmnist", names, opts)
    flag = source.stem
    name = opts.source_name or flag
    folder = out / "images" / flag / opts.split
    folder.mkdir(parents=True, exist_ok=True)
    count = 0
    for index, pixels in enumerate(_stream_images(source, f"{opts.split}_images")):
        if index >= len(labels):
            raise AdaptError(f"{opts.split}_images has more samples than the {len(labels)} labels", path=source)
        count += 1
        report.read += 1
        ident = f"{name}-{opts.split}-{index}"
        value = int(labels[index])
        if not 0 <= value < len(names):
            report.skip(f"unknown label index {value} (label_names has {len(names)})", path=source, row=index + 1,
                        id=ident)
            continue
        if not mc.keeps(names[value]):
            _count(report, "outside_subset")
            continue
        rel = f"images/{flag}/{opts.split}/{index:06d}.png"
        Image.fromarray(pixels).save(out / rel)
        yield _record(ident, rel, (pixels.shape[1], pixels.shape[0]), names[value], mc, name, opts.domain)
    if count != len(labels):
        raise AdaptError(f"{count} images but {len(labels)} labels in split {opts.split}", path=source)


CLASSIFICATION = sharded("classification", _classification_plan, _classification_rows, _classification_image_root,
                         "Class folders (AID, UC Merced) or a label file -> multiple-choice classification")
MEDMNIST = Formatter("medmnist", _medmnist, lambda source, **options: None,
                     "MedMNIST <flag>.npz -> PNGs + multiple-choice classification")
