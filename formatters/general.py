"""General instruction data already in conversation form: InternVL meta files + JSONL, LLaVA arrays.

Sources:
- an InternVL meta file `{name: {root, annotation, repeat_time, ...}}` (read with
  `adapt.data.records.read_meta`), each annotation a JSONL file (or a LLaVA JSON array);
- one JSONL annotation file, or one LLaVA JSON array (`[{id, image?, conversations}, ...]`); their
  image root is the file's folder or the `root` option. Text-only rows (no `image`) are kept.

Rows are validated with `adapt.data.records.problems` (roles, placeholders, paths confined to their root
and existing) and their images decoded (`verify_images="header"` only opens headers, for very large
sets); bad rows are counted skips with file and line / 1-based array position.

Rows are shared out among processes (`num_proc`) in 4 MB ranges of each JSONL annotation (a LLaVA
array is read whole); the output is the same bytes for any number. Images that decoding normalised
(16-bit, EXIF orientation...) are counted per row in `report.stats["images_normalized"]`.

Roots: records of one run share one image root. With several datasets in a meta file the root is the
datasets' common parent folder and every image path is rewritten relative to it (after checking it
lies inside its own dataset root); if the only common parent is the filesystem root, pick datasets
with `dataset=name[,name...]` and format them separately. `repeat_time` is not applied here (mixing
weights belong to the recipe); it is listed in `report.stats["repeat_time"]`.

Ids: a row keeps its own id (a missing one becomes `<dataset>-<row>`); with several datasets each id is
prefixed `<dataset>/`, and a repeated id gets `#2`, `#3`... appended (renames listed in the report). `meta` is kept, with
`source` (the dataset name) and `domain` added when absent and `task` inferred when absent ("text"
without media, "video" with a video, else "vqa"). Rows whose text carries 0..1 float boxes (some
LLaVA-style releases) are left as they are, flagged `meta.normalized_boxes_in_text` and counted in
`report.stats["rows_with_normalized_boxes"]`: converting them needs each image's size and the
dataset's own convention, which a recipe must decide.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapt.data import boxes as bx
from adapt.data import records as rec
from adapt.errors import AdaptError, Report
from adapt.fileio import PathMemo
from formatters.base import ImageChecker, Plan, choose, iter_json_rows, parse_options, sharded


@dataclass(frozen=True)
class GeneralOptions:
    root: str | None = None
    dataset: list[str] | None = None
    source_name: str | None = None
    domain: str = "general"
    verify_images: str = "decode"


@dataclass(frozen=True)
class _Part:
    name: str
    annotation: Path
    root: Path
    repeat_time: float = 1.0
    paths_from: str | None = None  # a meta entry's relative paths: "working directory" / "meta file folder"


def _first_char(path: Path) -> str:
    with open(path, "rb") as handle:
        while chunk := handle.read(4096):
            stripped = chunk.lstrip()
            if stripped:
                return stripped[:1].decode("latin-1")
    return ""


def _plan(source: Path, opts: GeneralOptions) -> tuple[list[_Part], Path]:
    """The annotation files to read and the one root all record paths will be relative to."""
    if source.is_dir() and (source / "meta.json").is_file():  # a folder `adapt format` wrote
        source = source / "meta.json"
    if not source.is_file():
        raise AdaptError("expected an InternVL meta file, a JSONL annotation file, a LLaVA JSON array or a "
                         "folder written by `adapt format` (with meta.json)", path=source)
    is_meta = source.suffix.lower() == ".json" and _first_char(source) == "{"
    if not is_meta:
        if opts.dataset is not None:
            raise AdaptError("option dataset applies to meta files only", path=source)
        base = source.parent
        root = (Path(opts.root) if Path(opts.root).is_absolute() else base / opts.root) if opts.root else base
        name = opts.source_name or source.stem
        return [_Part(name, source, root)], root
    if opts.root is not None:
        raise AdaptError("a meta file names each dataset's root; option root applies to JSONL/LLaVA files", path=source)
    specs = rec.read_meta(source)
    if opts.dataset is not None:
        unknown = sorted(set(opts.dataset) - {s.name for s in specs})
        if unknown:
            raise AdaptError(f"dataset(s) {unknown} are not in the meta file", path=source,
                             hint="choose from: " + ", ".join(s.name for s in specs))
        specs = [s for s in specs if s.name in opts.dataset]
    parts = [_Part(s.name, Path(s.annotation), Path(s.root).resolve(), s.repeat_time, s.resolved_from) for s in specs]
    roots = {p.root for p in parts}
    common = Path(os.path.commonpath([str(r) for r in roots]))
    if len(roots) > 1 and common == Path(common.anchor):
        raise AdaptError("the datasets of this meta file share no parent folder below the filesystem root",
                         path=source, hint="format them one at a time with dataset=<name>")
    return parts, common


def _rows(part: _Part, report: Report, span: tuple[int, int, int] | None) -> Iterator[tuple[int, rec.Record]]:
    """Valid rows of one annotation file, or of a byte span of a JSONL one (invalid rows are counted skips)."""
    if part.annotation.suffix.lower() == ".jsonl":
        yield from rec.read_jsonl(part.annotation, report, root=part.root, check_files=True, span=span)
        return
    paths = PathMemo()
    for row, item in iter_json_rows(part.annotation, report):
        report.read += 1
        found = rec.problems(item, root=part.root, check_files=True, paths=paths)
        if found:
            report.skip("invalid record: " + "; ".join(found), path=part.annotation, row=row,
                        id=str(item.get("id")) if isinstance(item, dict) else None)
            continue
        yield row, rec.normalize(item)


def _infer_task(record: rec.Record) -> str:
    if record.get("video"):
        return "video"
    return "vqa" if rec.images_of(record) else "text"


UNIT_BYTES = 4 << 20  # a JSONL annotation is shared out among processes in ranges of this size


@dataclass(frozen=True)
class _Context:
    parts: list[_Part]
    common: Path
    opts: GeneralOptions


def _plan_rows(source: Path, out: Path, report: Report, **options: Any) -> Plan:
    """The annotation files and their byte ranges (a LLaVA JSON array is one unit, read whole)."""
    opts = parse_options(GeneralOptions, options, "general")
    choose("general", "verify_images", opts.verify_images, ("decode", "header"))
    parts, common = _plan(source, opts)
    if any(p.paths_from for p in parts):
        report.stats["meta_paths_relative_to"] = {p.name: p.paths_from for p in parts}
    repeats = {p.name: p.repeat_time for p in parts if p.repeat_time != 1}
    if repeats:
        report.stats["repeat_time"] = repeats
    units: list[tuple[int, tuple[int, int, int] | None]] = []
    for index, part in enumerate(parts):
        if not part.annotation.is_file():
            raise AdaptError(f"annotation file of dataset {part.name!r} not found", path=part.annotation)
        if part.annotation.suffix.lower() == ".jsonl":
            units += [(index, span) for span in rec.byte_ranges(part.annotation, UNIT_BYTES)]
        else:
            units.append((index, None))
    # a process pays from ~8 MB of rows (16k pool rows: ~0.6 s of work against ~1 s to start one)
    return Plan(units, _Context(parts, common, opts), min_per_process=2)


def _work(context: _Context, units: Sequence[tuple[int, tuple[int, int, int] | None]], out: Path,
          report: Report) -> Iterator[rec.Record]:
    """The records of some units, in file order. Normalised images are counted per row (`count_rows`):
    the same count for any split of the rows among processes."""
    parts, common, opts = context.parts, context.common, context.opts
    checkers: dict[int, ImageChecker] = {}
    for index, span in units:
        part = parts[index]
        checker = checkers.setdefault(index, ImageChecker(part.root, report, decode=opts.verify_images == "decode",
                                                          count_rows=True))
        for row, record in _rows(part, report, span):
            ident = str(record["id"]) if record.get("id") not in (None, "") else f"{part.name}-{row}"
            if len(parts) > 1:
                ident = f"{part.name}/{ident}"
            if not all(checker.size(p, path=part.annotation, row=row, id=ident) for p in rec.images_of(record)):
                continue
            record["id"] = ident  # formatters.base.UniqueIds renames a repeated id and reports it
            if part.root != common:
                _rebase(record, part.root, common)
            meta = dict(record.get("meta") or {}) if isinstance(record.get("meta"), dict) else {}
            meta.setdefault("source", part.name)
            meta.setdefault("domain", opts.domain)
            if meta.get("task") not in rec.TASKS:
                meta["task"] = _infer_task(record)
            text = "\n".join(t["value"] for t in record["conversations"])
            if any(bx.looks_normalized(b) for b in bx.parse_boxes(text)):
                meta["normalized_boxes_in_text"] = True
                report.stats["rows_with_normalized_boxes"] = report.stats.get("rows_with_normalized_boxes", 0) + 1
            record["meta"] = meta
            yield record


def _rebase(record: rec.Record, root: Path, common: Path) -> None:
    """Rewrite media paths from `root`-relative to `common`-relative (lexically, like the loader joins)."""
    def move(rel: str) -> str:
        return Path(os.path.relpath(os.path.normpath(root / rel), common)).as_posix()

    image = record.get("image")
    if isinstance(image, str):
        record["image"] = move(image)
    elif isinstance(image, list):
        record["image"] = [move(p) for p in image]
    if record.get("video"):
        record["video"] = move(record["video"])


def _image_root(source: Path, **options: Any) -> Path:
    return _plan(Path(source), parse_options(GeneralOptions, options, "general"))[1]


GENERAL = sharded("general", _plan_rows, _work, _image_root,
                  "InternVL meta/JSONL and LLaVA JSON instruction data (text-only rows kept)")
