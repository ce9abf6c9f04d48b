"""The common driver every formatter runs under.

    out/records.jsonl   the records (written atomically)
    out/meta.json       an InternVL meta file pointing at them, with the image root
    out/report.json     read / written / skipped (with file:row and reason), tiles per record
    out/images/...      derived images (stitched cameras, DICOM renders, video frames), if any

Record image paths are relative to the meta file's `root`: `out` when the formatter derives
images, else the source folder (no copies of images the source already has).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from adapt import records as rec
from adapt.errors import AdaptError, Report
from adapt.fileio import atomic_dir
from adapt.tiling import count_tiles, decode_rgb, tile_budget

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
        strict: bool = False, overwrite: bool = False, max_tiles: int = 12, progress: bool = True,
        **options: Any) -> Report:
    """Run one formatter into `out` (atomically: a killed run leaves nothing that looks complete)."""
    name = name or formatter.kind
    source = Path(source)
    if not source.exists():
        raise AdaptError("input not found", path=source, hint="pass the dataset folder or annotation file")
    report = Report(name=name, strict=strict)
    root = formatter.image_root(source, **options)
    generator = formatter.generate
    out = Path(out)
    tiles_hist: dict[int, int] = {}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        image_root = Path(root) if root is not None else out

        def checked() -> Iterator[rec.Record]:
            for record in tqdm(generator(source, tmp, report, **options), desc=name, unit="rec",
                               disable=not progress, leave=False):
                where_root = tmp if root is None else image_root
                found = rec.problems(record, root=where_root, check_files=True)
                if found:  # a formatter bug, not a user error: fail loudly rather than write it
                    raise AssertionError(f"formatter {name} produced an invalid record {record.get('id')}: {found}")
                n = _tiles_of(record, where_root, max_tiles)
                record.setdefault("meta", {})["tiles"] = n
                tiles_hist[n] = tiles_hist.get(n, 0) + 1
                report.written += 1
                yield record

        rec.write_jsonl(tmp / "records.jsonl", checked())
        meta_root = "." if root is None else str(Path(root).resolve())
        rec.write_meta(tmp / "meta.json", [rec.DatasetSpec(name=name, root=meta_root, annotation="records.jsonl",
                                                           max_dynamic_patch=max_tiles)])
        report.stats["tiles_per_record"] = dict(sorted(tiles_hist.items()))
        report.save(tmp / "report.json")
    return report


def _tiles_of(record: rec.Record, root: Path, max_tiles: int) -> int:
    """Tiles the record will become at training time (image headers only; video: one per frame)."""
    if record.get("video"):
        return int(record.get("meta", {}).get("num_frames", 8))
    paths = rec.images_of(record)
    budget = tile_budget(max_tiles, len(paths))
    total = 0
    for rel in paths:
        with Image.open(root / rel) as image:
            total += count_tiles(*image.size, max_tiles=budget)
    return total


def copy_into(src: Path, out: Path, rel: str) -> str:
    """Copy a source file under `out` and return its record path (for sources read from outside a root)."""
    dst = out / rel
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    return rel


def image_size_or_skip(path: Path, report: Report, *, source: str | Path | None = None, row: int | None = None,
                       id: str | None = None) -> tuple[int, int] | None:
    """Fully decode an image (truncation shows only on full decode); skip and count it when unusable."""
    try:
        return decode_rgb(str(path)).size
    except FileNotFoundError:
        report.skip(f"image not found: {path}", path=source or path, row=row, id=id)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        report.skip(f"corrupt image: {path} ({err})", path=source or path, row=row, id=id)
    return None
