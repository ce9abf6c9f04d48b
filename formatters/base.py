"""The common driver every formatter runs under.

    out/records.jsonl   the records (written atomically)
    out/meta.json       an InternVL meta file pointing at them, with the image root
    out/report.json     read / written / skipped (with file:row and reason)
    out/images/...      derived images (stitched cameras, DICOM renders, video frames), if any

Record image paths are relative to the meta file's `root`: `out` when the formatter derives
images, else the source folder (no copies of images the source already has).
"""

from __future__ import annotations

import json
import typing
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

from PIL import Image
from pydantic import TypeAdapter, ValidationError
from tqdm import tqdm

from adapt.data import records as rec
from adapt.data.images import NOTES_KEY, decode_rgb, image_size
from adapt.data.text import source_problem
from adapt.errors import AdaptError, Report, validation_problems
from adapt.fileio import atomic_dir, resolve_inside

Generator = Callable[..., Iterator[rec.Record]]


@dataclass(frozen=True)
class Formatter:
    """One source kind: a generator of records plus where its record image paths are rooted.

    `generate(source, out, report, **options)` yields records, writing derived images under `out`
    and reporting bad rows with `report.skip`. `image_root(source, **options)` returns the folder
    the yielded image paths are relative to, or None when they are derived files under `out`.
    """

    kind: str
    generate: Generator
    image_root: Callable[..., Path | None] = lambda source, **options: None
    summary: str = ""


def run(formatter: Formatter, source: str | Path, out: str | Path, *, name: str | None = None,
        strict: bool = False, overwrite: bool = False, progress: bool | tqdm = True, **options: Any) -> Report:
    """Run one formatter into `out` (atomically: a killed run leaves nothing that looks complete).
    `progress` is a bool (a bar for this source or none) or a run's formatting bar to count into.

    Records carry no tile budget: that is a training choice (the run config's max_tiles), so the
    same formatted data serves a 6-tile and a 24-tile run alike."""
    name = name or formatter.kind
    source = Path(source)
    if not source.exists():
        raise AdaptError("input not found", path=source, hint="pass the dataset folder or annotation file")
    report = Report(name=name, strict=strict)
    root = formatter.image_root(source, **options)
    generator = formatter.generate
    out = Path(out)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        image_root = Path(root) if root is not None else out

        ids = UniqueIds(report)

        def checked() -> Iterator[rec.Record]:
            shared = progress if isinstance(progress, tqdm) else None
            records = generator(source, tmp, report, **options)
            if shared is None:
                records = tqdm(records, desc=name, unit="rec", disable=not progress, leave=False)
            else:
                shared.set_postfix_str(name, refresh=False)
            for record in records:
                where_root = tmp if root is None else image_root
                found = rec.problems(record, root=where_root, check_files=True)
                if found:  # the same rule `adapt run` applies when it reads records back
                    meta = record.get("meta") if isinstance(record.get("meta"), dict) else {}
                    report.skip("invalid record: " + "; ".join(found), path=meta.get("annotation", source),
                                row=meta.get("row"), id=str(record.get("id")))
                    continue
                ids.assign(record)
                report.written += 1
                if shared is not None:
                    shared.update()
                yield record

        rec.write_jsonl(tmp / "records.jsonl", checked())
        meta_root = "." if root is None else str(Path(root).resolve())
        rec.write_meta(tmp / "meta.json", [rec.DatasetSpec(name=name, root=meta_root, annotation="records.jsonl")])
        if report.written == 0:
            report.warn(f"no records written from {source} (read {report.read} rows, skipped {report.skipped})")
        report.save(tmp / "report.json")
    return report


class UniqueIds:
    """Gives every written record a distinct id; a clash is renamed `id#2`, `id#3`... and reported."""

    def __init__(self, report: Report) -> None:
        self.report, self.seen = report, set()

    def assign(self, record: rec.Record) -> None:
        ident = str(record.get("id")) if record.get("id") not in (None, "") else f"row-{self.report.written + 1}"
        new, n = ident, 1
        while new in self.seen:
            n += 1
            new = f"{ident}#{n}"
        if new != ident:
            renamed = self.report.stats.setdefault("renamed_ids", {})
            if len(renamed) < 1000:
                renamed[f"{ident} (record {self.report.written + 1})"] = new
            self.report.stats["duplicate_ids_renamed"] = self.report.stats.get("duplicate_ids_renamed", 0) + 1
        self.seen.add(new)
        record["id"] = new


def source_text_or_skip(report: Report, texts: dict[str, Any], *, path: str | Path | None, row: int | None,
                        id: str | None) -> bool:
    """True when every named source text may be embedded; else one counted, located skip (adapt.data.text)."""
    for what, value in texts.items():
        problem = source_problem(value, what)
        if problem:
            report.skip(problem, path=path, row=row, id=id)
            return False
    return True


def decoded_size(path: Path, report: Report) -> tuple[int, int]:
    """Fully decode an image as training will (adapt.data.images) and count what was normalised."""
    image = decode_rgb(str(path))
    for note in image.info.get(NOTES_KEY, []):
        counts = report.stats.setdefault("images_normalized", {})
        kind = note.split(" range ")[0]
        counts[kind] = counts.get(kind, 0) + 1
        report.warn(f"some images were normalised on decode ({kind}...): see stats.images_normalized")
    return image.size


def image_size_or_skip(path: Path, report: Report, *, source: str | Path | None = None, row: int | None = None,
                       id: str | None = None) -> tuple[int, int] | None:
    """Fully decode an image (truncation shows only on full decode); skip and count it when unusable."""
    try:
        return decoded_size(path, report)
    except FileNotFoundError:
        report.skip(f"image not found: {path}", path=source or path, row=row, id=id)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        report.skip(f"corrupt image: {path} ({err})", path=source or path, row=row, id=id)
    return None


T = TypeVar("T")

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".gif", ".webp"}


# --------------------------------------------------------------------------------------------------
# Shared helpers (options, JSON, images)
# --------------------------------------------------------------------------------------------------

def option(kind: str, name: str, value: Any, declared: Any) -> Any:
    """One formatter option as its declared type (pydantic, lax: a command line gives "5", "true");
    a wrong value is a user error naming the formatter, the option and what was given."""
    try:
        return TypeAdapter(declared).validate_python(value)
    except ValidationError as err:
        raise AdaptError(f"{kind} formatter option " + "; ".join(validation_problems(value, err, name)),
                         hint=f"see the {kind} formatter's docstring for its options") from None


def parse_options(spec: type[T], options: dict[str, Any], kind: str) -> T:
    """Build an options dataclass, naming unknown options instead of raising a TypeError traceback.
    A comma-separated string stands for a list (`--opt subset=a,b`) where the option takes no string."""
    known = {f.name: f.type for f in fields(spec)}  # type: ignore[arg-type]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise AdaptError(f"unknown option(s) {', '.join(unknown)} for the {kind} formatter",
                         hint="known options: " + ", ".join(sorted(known)))
    hints = typing.get_type_hints(spec)
    values = {key: value.split(",") if isinstance(value, str) and _list_not_str(hints[key]) else value
              for key, value in options.items()}
    try:
        return TypeAdapter(spec).validate_python(values)
    except ValidationError as err:
        raise AdaptError(f"{kind} formatter option " + "; ".join(validation_problems(values, err)),
                         hint="known options: " + ", ".join(sorted(known))) from None


def _list_not_str(declared: Any) -> bool:
    args = typing.get_args(declared) or (declared,)
    return str not in args and any(typing.get_origin(a) is list for a in args)


def choose(kind: str, name: str, value: str, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise AdaptError(f"option {name}={value!r} of the {kind} formatter is not one of: {', '.join(allowed)}")
    return value


def load_json(path: Path, what: str = "annotation file") -> Any:
    """Parse a JSON file, turning a missing or broken file into an `AdaptError` naming it."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AdaptError(f"{what} not found", path=path) from None
    except UnicodeDecodeError:
        raise AdaptError(f"{what} is not UTF-8 text", path=path) from None
    except json.JSONDecodeError as err:
        raise AdaptError(f"{what} is not valid JSON ({err.msg})", path=path, row=err.lineno) from None


def iter_json_rows(path: Path, report: Report) -> Iterator[tuple[int, Any]]:
    """(row, object) from a JSONL file (row = line) or a JSON array (row = 1-based position).

    Malformed JSONL lines are counted skips; a JSON file that is not an array is an `AdaptError`.
    """
    if path.suffix.lower() == ".jsonl":
        with open(path, "rb") as handle:
            for line_no, raw in enumerate(handle, start=1):
                if not raw.strip():
                    continue
                try:
                    item = json.loads(raw.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError) as err:
                    report.read += 1
                    report.skip(f"malformed JSON line ({err})", path=path, row=line_no)
                    continue
                yield line_no, item
        return
    data = load_json(path)
    if not isinstance(data, list):
        raise AdaptError("expected a JSON array of rows (or a .jsonl file)", path=path)
    yield from enumerate(data, start=1)


class ImageChecker:
    """Resolves record image paths inside their root and fully decodes each image once.

    Several rows often share an image (COCO, DIOR-RSVG, RSVQA): the decode result is cached, but
    every row that uses an unusable image is reported as its own skip.
    """

    def __init__(self, root: Path, report: Report, decode: bool = True) -> None:
        self.root, self.report, self.decode = Path(root), report, decode
        self._cache: dict[Path, tuple[tuple[int, int] | None, str]] = {}

    def size(self, rel: str, *, path: str | Path | None, row: int | None, id: str | None) -> tuple[int, int] | None:
        """(width, height) of the image, or None after a counted skip (escaping, missing, corrupt)."""
        try:
            target = resolve_inside(self.root, rel)
        except AdaptError as err:
            self.report.skip(err.message, path=path, row=row, id=id)
            return None
        if target not in self._cache:
            self._cache[target] = self._probe(target)
        size, reason = self._cache[target]
        if size is None:
            self.report.skip(reason, path=path, row=row, id=id)
        return size

    def _probe(self, target: Path) -> tuple[tuple[int, int] | None, str]:
        if not target.is_file():
            return None, f"image not found: {target}"
        try:
            if self.decode:
                return decoded_size(target, self.report), ""
            return image_size(target), ""
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            return None, f"corrupt image: {target} ({err})"


def turn(question: str, answer: str) -> list[dict[str, str]]:
    """A single-image question/answer pair with InternVL's `<image>` placeholder in front."""
    return [{"from": "human", "value": f"{rec.IMAGE_PLACEHOLDER}\n{question}"}, {"from": "gpt", "value": answer}]
