"""Visual grounding: a referring expression -> `<ref>expression</ref><box>[[x1, y1, x2, y2]]</box>`.

Corners are InternVL's integers 0..1000 (round(x / W * 1000), `adapt.data.boxes.to_grid`); several boxes
for one expression are written `[[...], [...]]`. Inputs (option `format`, detected when unambiguous):

- `coco`: a COCO instances json (`images`, `annotations` with xywh pixel `bbox`, `categories`); the
  expression is the category name, all boxes of one category in one image form one answer.
- `refcoco`: RefCOCO/+/g refs (a list of `{ref_id, ann_id, image_id, split, sentences: [{sent}]}`) plus
  the COCO `instances.json` beside them (option `instances`); one record per sentence. Refs stored as
  a JSON file are read as is; the released pickles `refs(*).p` are only unpickled with the explicit
  option `allow_pickle=True` (unpickling runs code from the file: only do it for files you trust).
- `voc`: a DIOR-RSVG style folder, `Annotations/*.xml` (`object/name`, `object/bndbox/{xmin,ymin,xmax,ymax}`,
  `object/description`) and `JPEGImages/`, with split files `<split>.txt` listing global object indices
  (DIOR-RSVG's convention: objects counted over the xml files in sorted name order) or annotation ids.
- `jsonl`: plain rows `{image, expression, box: [x1, y1, x2, y2]}` (or `boxes: [[...], ...]`), as
  JSONL or one JSON array.

Boxes are pixels unless `box_format` says `*_norm` (0..1 floats). A 0..1 box found in a pixel field
is never taken as pixels: with the default `box_format="auto"` of plain rows it is recognised by
`adapt.data.boxes.looks_normalized` and converted; with an explicit pixel format it is a counted skip
whose reason says which option to pass. Boxes outside the image or of zero area are counted skips.

The readers (`plan_targets`, `check_targets`) are reused by the region formatter; the image checks
run in parallel with `run(..., num_proc=N)`, same output.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, StrictInt, StrictStr, ValidationError

from adapt.data import boxes as bx
from adapt.data import records as rec
from adapt.errors import AdaptError, Report, Skip, validation_problems
from formatters.base import (
    ImageChecker,
    Plan,
    choose,
    iter_json_rows,
    load_json,
    parse_options,
    sharded,
    source_text_or_skip,
    turn,
)

FORMATS = ("auto", "coco", "refcoco", "voc", "jsonl")
BOX_FORMATS = ("auto", "xyxy", "xywh", "xyxy_norm", "xywh_norm")
GROUNDING_QUESTION = "Please provide the bounding box coordinate of the region this sentence describes: <ref>{expression}</ref>"


# --------------------------------------------------------------------------------------------------
# Readers shared by grounding and region
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ReaderOptions:
    """Options of the grounding/region readers (see the module docstring)."""

    format: str = "auto"
    box_format: str = "auto"
    images: str | None = None
    split: str | None = None
    split_entries: str = "auto"
    instances: str | None = None
    allow_pickle: bool = False
    sentences: str = "all"
    source_name: str | None = None
    domain: str = "general"


@dataclass
class Target:
    """One referring expression with its checked boxes, ready to become a record."""

    id: str
    image: str
    expression: str
    name: str | None
    boxes_px: list[list[float]]
    size: tuple[int, int]
    path: Path
    row: int | None

    @property
    def grid(self) -> list[list[int]]:
        return [bx.to_grid(b, *self.size) for b in self.boxes_px]


@dataclass
class _Candidate:
    id: str
    image: str
    expression: str
    boxes: list[Any]
    box_format: str
    path: Path
    row: int | None
    name: str | None = None


def detect_format(source: Path, requested: str = "auto") -> str:
    """The input format: `requested` unless "auto", else what the source unambiguously is."""
    fmt = choose("grounding", "format", requested, FORMATS)
    if fmt != "auto":
        return fmt
    if source.is_dir():
        if (source / "Annotations").is_dir():
            return "voc"
        if _refs_files(source):
            return "refcoco"
        raise AdaptError("cannot tell the grounding format of this folder", path=source,
                         hint="a DIOR-RSVG folder has Annotations/; a RefCOCO folder has refs(*).json or refs(*).p "
                              "plus instances.json; or pass format=coco|refcoco|voc|jsonl")
    suffix = source.suffix.lower()
    if suffix == ".jsonl":
        return "jsonl"
    if suffix in (".p", ".pkl", ".pickle"):
        return "refcoco"
    if suffix == ".json":
        shape, first = _peek_json(source)
        if shape == "object":
            return "coco"
        if isinstance(first, dict) and "sentences" in first:
            return "refcoco"
        if isinstance(first, dict) and "expression" in first:
            return "jsonl"
    raise AdaptError("cannot tell the grounding format of this file", path=source,
                     hint="pass format=coco|refcoco|voc|jsonl")


def _peek_json(path: Path) -> tuple[str, Any]:
    """("object" | "array" | "other", first array element or None) from the file's first MiB, so that
    detecting the format does not parse a COCO file of hundreds of MB a second time."""
    try:
        with open(path, encoding="utf-8") as handle:
            head = handle.read(1 << 20).lstrip()
    except UnicodeDecodeError:
        raise AdaptError("annotation file is not UTF-8 text", path=path) from None
    if head.startswith("{"):
        return "object", None
    if not head.startswith("["):
        return "other", None
    try:
        return "array", json.JSONDecoder().raw_decode(head[1:].lstrip())[0]
    except json.JSONDecodeError:
        return "array", None


def reader_root(source: Path, opts: ReaderOptions) -> Path:
    """The folder record image paths are relative to (the source itself for a DIOR-RSVG folder)."""
    if source.is_dir() and (source / "Annotations").is_dir():
        return source
    base = source if source.is_dir() else source.parent
    return base / opts.images if opts.images else base


@dataclass(frozen=True)
class TargetUnit:
    """One step of a grounding or region source, in file order: a candidate to check (with whether
    it is its image's first use), or a skip its reader made; `reads` rows the reader counted before it."""

    candidate: _Candidate | None
    first: bool = False
    skip: Skip | None = None
    reads: int = 0


class _ReaderReport(Report):
    """The report readers fill while planning: each skip becomes a unit, so that `check_targets`
    reports it in file order among the checks of the candidates (and `--strict` stops on the first
    bad row of the file, as one pass over it would). Stats and warnings go to the run's report."""

    def __init__(self, real: Report, units: list[TargetUnit]) -> None:
        super().__init__(name=real.name, stats=real.stats, warnings=real.warnings)
        self.units = units

    def skip(self, reason: str, *, path: str | Path | None = None, row: int | None = None,
             id: str | None = None) -> None:
        self.units.append(TargetUnit(None, skip=Skip(reason, str(path) if path is not None else None, row, id),
                                     reads=self.read))
        self.read = 0


def plan_targets(source: Path, report: Report, opts: ReaderOptions, *, group: bool) -> list[TargetUnit]:
    """Every candidate and reader skip of any supported input, in file order (the image checks run in
    `check_targets`, possibly in several processes). `group` merges all COCO boxes of one category
    in one image into one target (grounding); without it every annotation is its own target (region)."""
    choose("grounding", "box_format", opts.box_format, BOX_FORMATS)
    choose("grounding", "sentences", opts.sentences, ("all", "first"))
    fmt = detect_format(source, opts.format)
    if opts.split is not None and fmt not in ("refcoco", "voc"):
        raise AdaptError(f"option split={opts.split!r} applies to refcoco and voc inputs, not {fmt}", path=source)
    name = opts.source_name or default_name(source)
    readers = {"coco": _read_coco, "refcoco": _read_refcoco, "voc": _read_voc, "jsonl": _read_plain}
    units: list[TargetUnit] = []
    reader = _ReaderReport(report, units)
    seen: set[str] = set()
    for cand in readers[fmt](source, reader, opts, name, group):
        key = os.path.normpath(cand.image) if isinstance(cand.image, str) and cand.image else ""
        units.append(TargetUnit(cand, key not in seen, reads=reader.read))
        reader.read = 0
        seen.add(key)
    if reader.read:
        units.append(TargetUnit(None, reads=reader.read))
    return units


def check_targets(root: Path, units: Sequence[TargetUnit], report: Report) -> Iterator[Target]:
    """The candidates whose expression, image (fully decoded, once per process) and boxes are usable;
    the readers' skips reported in their place."""
    checker = ImageChecker(root, report)
    for unit in units:
        report.read += unit.reads
        if unit.skip is not None:
            report.skip(unit.skip.reason, path=unit.skip.path, row=unit.skip.row, id=unit.skip.id)
        if unit.candidate is None:
            continue
        report.read += 1
        target = _check(unit.candidate, checker, report, unit.first)
        if target is not None:
            yield target


def default_name(source: Path) -> str:
    """The `meta.source` of a run without `source_name`: the folder name or file stem, lower case;
    for generic file names (COCO `instances*.json`, RefCOCO `refs(unc).p`) the parent folder's name."""
    generic = source.is_file() and source.stem.lower().startswith(("instances", "refs"))
    name = source.parent.name if generic or not source.stem else source.name if source.is_dir() else source.stem
    return name.lower().replace(" ", "_")


def _box_format(opts: ReaderOptions, pixel_default: str) -> str:
    """The explicit format, or the source format's own convention (plain rows: detect 0..1 boxes)."""
    return pixel_default if opts.box_format == "auto" else opts.box_format


def to_pixels(raw: Any, box_format: str, width: int, height: int) -> tuple[list[float] | None, str]:
    """One source box -> clamped pixel xyxy, or (None, why not). Returns the format actually used as
    the second value on success ("xyxy_norm" when an auto box was recognised as 0..1)."""
    if (not isinstance(raw, (list, tuple)) or len(raw) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in raw)):
        return None, f"box {raw!r} is not a list of 4 numbers"
    fmt = box_format
    if fmt == "auto":
        fmt = "xyxy_norm" if bx.looks_normalized(raw) else "xyxy"
    elif not fmt.endswith("_norm") and bx.looks_normalized(raw):
        return None, (f"box {list(raw)} looks like 0..1 normalised floats but box_format={fmt!r} says pixels; "
                      f"pass box_format='{fmt}_norm' if the source stores 0..1 boxes")
    if fmt.endswith("_norm"):
        if not all(0.0 <= float(v) <= 1.0 for v in raw):
            return None, (f"box {list(raw)} has values outside 0..1 but box_format={fmt!r} says normalised; "
                          f"pass box_format='{fmt.removesuffix('_norm')}' for pixel boxes")
        xyxy = bx.xywh_to_xyxy(raw) if fmt.startswith("xywh") else list(raw)
        px = [xyxy[0] * width, xyxy[1] * height, xyxy[2] * width, xyxy[3] * height]
    else:
        px = bx.xywh_to_xyxy(raw) if fmt == "xywh" else [float(v) for v in raw]
    problem = bx.box_problem(px, width, height)
    if problem:
        return None, problem
    return bx.clamp(px, width, height), fmt


def _check(cand: _Candidate, checker: ImageChecker, report: Report, first: bool = True) -> Target | None:
    if not cand.expression or not isinstance(cand.expression, str) or not cand.expression.strip():
        report.skip("empty or missing referring expression", path=cand.path, row=cand.row, id=cand.id)
        return None
    if not source_text_or_skip(report, {"referring expression": cand.expression}, path=cand.path, row=cand.row,
                               id=cand.id):
        return None
    if not cand.boxes:
        report.skip("no box for the expression", path=cand.path, row=cand.row, id=cand.id)
        return None
    size = checker.size(cand.image, path=cand.path, row=cand.row, id=cand.id, first=first)
    if size is None:
        return None
    boxes_px, used_norm = [], 0
    for raw in cand.boxes:
        px, how = to_pixels(raw, cand.box_format, *size)
        if px is None:
            report.skip(how, path=cand.path, row=cand.row, id=cand.id)
            return None
        boxes_px.append(px)
        used_norm += how.endswith("_norm")
    if used_norm:
        report.stats["normalized_boxes_converted"] = report.stats.get("normalized_boxes_converted", 0) + used_norm
    return Target(id=cand.id, image=cand.image, expression=" ".join(cand.expression.split()), name=cand.name,
                  boxes_px=boxes_px, size=size, path=cand.path, row=cand.row)


class CocoAnnotation(BaseModel):
    """The fields of a COCO annotation the reader uses, with their JSON types (bbox is checked later,
    with the box conventions)."""

    model_config = ConfigDict(extra="allow", strict=True)
    image_id: StrictInt | StrictStr
    bbox: Any
    category_id: StrictInt | StrictStr | None = None
    id: StrictInt | StrictStr | None = None


def _key(value: Any) -> int | str | None:
    """A COCO id as a lookup key; ids that are not a number or a string match nothing."""
    return value if isinstance(value, (int, str)) and not isinstance(value, bool) else None


def _index(items: Any, path: Path, what: str) -> dict[Any, dict[str, Any]]:
    if not isinstance(items, list):
        raise AdaptError(f"'{what}' must be a list", path=path)
    return {item["id"]: item for item in items if isinstance(item, dict) and _key(item.get("id")) is not None}


def _read_coco_file(path: Path) -> dict[str, Any]:
    data = load_json(path, "COCO instances file")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(data.get("annotations"), list):
        raise AdaptError("not a COCO instances file (needs 'images' and 'annotations' lists)", path=path)
    return data


def _read_coco(source: Path, report: Report, opts: ReaderOptions, name: str, group: bool) -> Iterator[_Candidate]:
    data = _read_coco_file(source)
    images = _index(data["images"], source, "images")
    categories = _index(data.get("categories", []), source, "categories")
    categories = {key: c.get("name", "") for key, c in categories.items()}
    box_format = _box_format(opts, "xywh")
    groups: dict[tuple[Any, Any], _Candidate] = {}
    for row, ann in enumerate(data["annotations"], start=1):
        if not isinstance(ann, dict):
            report.read += 1
            report.skip("annotation is not a JSON object", path=source, row=row)
            continue
        try:
            CocoAnnotation.model_validate(ann)
        except ValidationError as err:
            report.read += 1
            report.skip("annotation " + "; ".join(validation_problems(ann, err)), path=source, row=row)
            continue
        if ann.get("iscrowd"):
            report.stats["crowd_annotations_dropped"] = report.stats.get("crowd_annotations_dropped", 0) + 1
            continue
        image = images.get(ann["image_id"])
        category = categories.get(ann.get("category_id"))
        if image is None or not category or "file_name" not in image:
            report.read += 1
            report.skip(f"annotation refers to unknown image {ann['image_id']!r} or category {ann.get('category_id')!r}",
                        path=source, row=row, id=str(ann.get("id")))
            continue
        key = (ann["image_id"], ann.get("category_id")) if group else (ann["image_id"], ann.get("id", row))
        if key in groups:
            groups[key].boxes.append(ann["bbox"])
            continue
        ident = f"{name}-{ann['image_id']}-{ann.get('category_id')}" if group else f"{name}-ann{ann.get('id', row)}"
        groups[key] = _Candidate(id=ident, image=str(image["file_name"]), expression=category, name=category,
                                 boxes=[ann["bbox"]], box_format=box_format, path=source, row=row)
    yield from groups.values()


def _refs_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.startswith("refs")
                  and p.suffix.lower() in (".json", ".p", ".pkl", ".pickle"))


def _load_refs(path: Path, allow_pickle: bool) -> Any:
    if path.suffix.lower() == ".json":
        return load_json(path, "refs file")
    if not allow_pickle:
        raise AdaptError("refusing to unpickle a refs file: unpickling runs code stored in the file", path=path,
                         hint="convert it to JSON, or pass allow_pickle=True (adapt format: --opt allow_pickle=true) "
                              "if you trust this file")
    try:
        with open(path, "rb") as handle:
            return pickle.load(handle)
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ValueError) as err:
        raise AdaptError(f"cannot unpickle the refs file ({err})", path=path) from None


def _read_refcoco(source: Path, report: Report, opts: ReaderOptions, name: str, group: bool) -> Iterator[_Candidate]:
    refs_path = source
    if source.is_dir():
        found = _refs_files(source)
        if len(found) != 1:
            raise AdaptError(f"expected one refs(*).json or refs(*).p file in the folder, found {len(found)}",
                             path=source, hint="pass the refs file itself as the source")
        refs_path = found[0]
    refs = _load_refs(refs_path, opts.allow_pickle)
    if not isinstance(refs, list):
        raise AdaptError("a refs file must hold a list of refs", path=refs_path)
    instances_path = refs_path.parent / (opts.instances or "instances.json")
    coco = _read_coco_file(instances_path)
    images = _index(coco["images"], instances_path, "images")
    anns = _index(coco["annotations"], instances_path, "annotations")
    categories = {key: c.get("name") for key, c in _index(coco.get("categories", []), instances_path,
                                                           "categories").items()}
    box_format = _box_format(opts, "xywh")
    for row, ref in enumerate(refs, start=1):
        if not isinstance(ref, dict) or not isinstance(ref.get("sentences"), list):
            report.read += 1
            report.skip("ref without a 'sentences' list", path=refs_path, row=row)
            continue
        if opts.split is not None and ref.get("split") != opts.split:
            continue
        ann, image = anns.get(_key(ref.get("ann_id"))), images.get(_key(ref.get("image_id")))
        ref_id = ref.get("ref_id", row)
        if ann is None or image is None or "bbox" not in ann or "file_name" not in image:
            report.read += 1
            report.skip(f"ref {ref_id} points to a missing annotation {ref.get('ann_id')!r} or image {ref.get('image_id')!r}",
                        path=refs_path, row=row, id=f"{name}-{ref_id}")
            continue
        sentences = ref["sentences"][:1] if opts.sentences == "first" else ref["sentences"]
        for k, sentence in enumerate(sentences):
            text = sentence.get("sent") or sentence.get("raw") if isinstance(sentence, dict) else sentence
            yield _Candidate(id=f"{name}-{ref_id}-{k}", image=str(image["file_name"]), expression=text or "",
                             name=categories.get(_key(ann.get("category_id"))), boxes=[ann["bbox"]],
                             box_format=box_format, path=refs_path, row=row)


def _split_selection(source: Path, opts: ReaderOptions, xml_files: list[Path]) -> tuple[str, set[str]] | None:
    """(mode, entries) of the split file, mode "index" (global object indices) or "id" (xml stems)."""
    if opts.split is None:
        return None
    choose("grounding", "split_entries", opts.split_entries, ("auto", "index", "id"))
    candidates = [source / opts.split, source / f"{opts.split}.txt", source / "ImageSets" / "Main" / f"{opts.split}.txt"]
    split_file = next((p for p in candidates if p.is_file()), None)
    if split_file is None:
        raise AdaptError(f"split file for split={opts.split!r} not found", path=source,
                         hint=f"expected {opts.split}.txt beside Annotations/ (or ImageSets/Main/{opts.split}.txt)")
    entries = {line.strip() for line in split_file.read_text(encoding="utf-8").splitlines() if line.strip()}
    mode = opts.split_entries
    if mode == "auto":
        stems = {p.stem for p in xml_files}
        if entries <= stems:
            mode = "id"
        elif all(e.isdigit() for e in entries):
            mode = "index"
        else:
            raise AdaptError("split file lists neither object indices nor annotation ids", path=split_file,
                             hint="pass split_entries=index or split_entries=id")
    if mode == "index" and not all(e.isdigit() for e in entries):
        raise AdaptError("split_entries=index but the split file has non-integer lines", path=split_file)
    return mode, ({str(int(e)) for e in entries} if mode == "index" else entries)


def _read_voc(source: Path, report: Report, opts: ReaderOptions, name: str, group: bool) -> Iterator[_Candidate]:
    xml_files = sorted((source / "Annotations").glob("*.xml"))
    selection = _split_selection(source, opts, xml_files)
    images_dir = opts.images or "JPEGImages"
    box_format = _box_format(opts, "xyxy")
    global_index = -1
    for xml_path in xml_files:
        try:
            root = ET.parse(xml_path).getroot()
        except ET.ParseError as err:
            if selection is not None and selection[0] == "index":
                raise AdaptError(f"malformed XML ({err}); the split file counts objects across all files, so the "
                                 "indices of every later file would be wrong", path=xml_path,
                                 hint="fix or restore this annotation file") from None
            report.read += 1
            report.skip(f"malformed XML ({err})", path=xml_path)
            continue
        filename = (root.findtext("filename") or f"{xml_path.stem}.jpg").strip()
        for k, obj in enumerate(root.findall("object"), start=1):
            global_index += 1
            if selection is not None:
                mode, entries = selection
                if (str(global_index) if mode == "index" else xml_path.stem) not in entries:
                    continue
            ident = f"{name}-{xml_path.stem}-{k}"
            bndbox = obj.find("bndbox")
            try:
                box = [float(bndbox.findtext(tag)) for tag in ("xmin", "ymin", "xmax", "ymax")]  # type: ignore[union-attr, arg-type]
            except (AttributeError, TypeError, ValueError):
                report.read += 1
                report.skip(f"object {k} has a missing or non-numeric bndbox", path=xml_path, row=k, id=ident)
                continue
            category = (obj.findtext("name") or "").strip() or None
            description = (obj.findtext("description") or "").strip()
            if not description:
                report.stats["objects_without_description"] = report.stats.get("objects_without_description", 0) + 1
            yield _Candidate(id=ident, image=f"{images_dir}/{filename}", expression=description or category or "",
                             name=category, boxes=[box], box_format=box_format, path=xml_path, row=k)


def _read_plain(source: Path, report: Report, opts: ReaderOptions, name: str, group: bool) -> Iterator[_Candidate]:
    box_format = _box_format(opts, "auto")
    for row, item in iter_json_rows(source, report):
        ident = f"{name}-{item.get('id', row)}" if isinstance(item, dict) else f"{name}-{row}"
        if not isinstance(item, dict) or not isinstance(item.get("image"), str) or not (
                "box" in item or "boxes" in item):
            report.read += 1
            report.skip("row needs 'image' (a path), 'expression' and 'box' or 'boxes'", path=source, row=row, id=ident)
            continue
        boxes = item["boxes"] if "boxes" in item else [item["box"]]
        if not isinstance(boxes, list):
            boxes = [boxes]
        yield _Candidate(id=ident, image=item["image"], expression=item.get("expression") or "",
                         name=item.get("name"), boxes=boxes, box_format=box_format, path=source, row=row)


# --------------------------------------------------------------------------------------------------
# The grounding formatter
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GroundingOptions(ReaderOptions):
    question: str = GROUNDING_QUESTION


@dataclass(frozen=True)
class TargetJob:
    """What turning a grounding or region source's candidates into records needs (sent to each worker)."""

    opts: Any
    name: str
    root: Path


def target_plan(source: Path, report: Report, opts: Any, *, group: bool) -> Plan:
    """The plan of a grounding or region source: its candidates as units (a candidate is at most one
    image decode, shared by the image's other candidates) and the job every worker needs."""
    return Plan(plan_targets(source, report, opts, group=group),
                TargetJob(opts, opts.source_name or default_name(source), reader_root(source, opts)),
                min_per_process=200)


def plan(source: Path, out: Path, report: Report, **options: Any) -> Plan:
    opts = parse_options(GroundingOptions, options, "grounding")
    if "{expression}" not in opts.question:
        raise AdaptError("option question must contain the placeholder {expression}")
    return target_plan(source, report, opts, group=True)


def work(job: TargetJob, units: Sequence[TargetUnit], out: Path, report: Report) -> Iterator[rec.Record]:
    opts = job.opts
    for target in check_targets(job.root, units, report):
        grid = target.grid
        yield {
            "id": target.id, "image": target.image,
            "conversations": turn(opts.question.replace("{expression}", target.expression),
                                  bx.ref_box(target.expression, grid)),
            "meta": {"task": "grounding", "source": job.name, "domain": opts.domain, "expression": target.expression,
                     "boxes_px": target.boxes_px, "boxes": grid, "image_size": list(target.size),
                     **({"category": target.name} if target.name else {})},
        }


def image_root(source: Path, **options: Any) -> Path:
    return reader_root(Path(source), parse_options(GroundingOptions, options, "grounding"))


GROUNDING = sharded("grounding", plan, work, image_root,
                    "Referring expressions (COCO, RefCOCO, DIOR-RSVG VOC xml, plain JSON) -> <ref>/<box> answers")
