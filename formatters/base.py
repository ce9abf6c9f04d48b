"""The common driver every formatter runs under.

    out/records.jsonl   the records (written atomically)
    out/meta.json       an InternVL meta file pointing at them, with the image root
    out/report.json     read / written / skipped (with file:row and reason)
    out/images/...      derived images (stitched cameras, DICOM renders, video frames), if any

Record image paths are relative to the meta file's `root`: `out` when the formatter derives
images, else the source folder (no copies of images the source already has).
"""

from __future__ import annotations

import array
import copy
import hashlib
import json
import shutil
import time
import typing
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, fields
from multiprocessing.context import BaseContext
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from PIL import Image
from pydantic import TypeAdapter, ValidationError
from tqdm import tqdm

from adapt.config import available_cores, process_context, resolve_num_proc
from adapt.data import records as rec
from adapt.data.images import NOTES_KEY, decode_rgb, image_size
from adapt.data.text import source_problem
from adapt.errors import AdaptError, Report, validation_problems
from adapt.fileio import PathMemo, atomic_dir, atomic_write

Generator = Callable[..., Iterator[rec.Record]]
Work = Callable[[Any, Sequence[Any], Path, Report], Iterator[rec.Record]]


@dataclass(frozen=True)
class Plan:
    """What a sharded formatter decides in one pass over the whole source, in the parent process.

    `units` are the pieces of heavy work in output order (a sample to stitch and its records, an
    image to decode); each worker process gets one contiguous slice, so the output does not depend
    on how many there are. `context` is what every unit needs (options, a class list), sent once
    per worker. Both must pickle. A worker is started only for `min_per_process` units or more:
    the workers' server process imports torch and the formatter once, about a second of CPU."""

    units: Sequence[Any]
    context: Any = None
    min_per_process: int = 1


@dataclass(frozen=True)
class Formatter:
    """One source kind: a generator of records plus where its record image paths are rooted.

    `generate(source, out, report, **options)` yields records, writing derived images under `out`
    and reporting bad rows with `report.skip`. `image_root(source, **options)` returns the folder
    the yielded image paths are relative to, or None when they are derived files under `out`.

    A formatter whose rows are heavy (image decode and encode) also gives `plan` and `work` (see
    `sharded`): `plan(source, out, report, **options) -> Plan` makes every choice that needs the
    whole source, `work(context, units, out, report)` yields the records of some units; `run`
    spreads the units over processes. Text-only formatters keep one process.
    """

    kind: str
    generate: Generator
    image_root: Callable[..., Path | None] = lambda source, **options: None
    summary: str = ""
    plan: Callable[..., Plan] | None = None
    work: Work | None = None


def sharded(kind: str, plan: Callable[..., Plan], work: Work, image_root: Callable[..., Path | None],
            summary: str = "") -> Formatter:
    """A formatter split into a whole-source `plan` and per-unit `work`; its `generate` runs both here."""
    def generate(source: Path, out: Path, report: Report, **options: Any) -> Iterator[rec.Record]:
        made = plan(source, out, report, **options)
        yield from work(made.context, made.units, out, report)

    return Formatter(kind, generate, image_root, summary, plan=plan, work=work)


def run(formatter: Formatter, source: str | Path, out: str | Path, *, name: str | None = None,
        strict: bool = False, overwrite: bool = False, progress: bool | tqdm = True, num_proc: int | None = None,
        **options: Any) -> Report:
    """Run one formatter into `out` (atomically: a killed run leaves nothing that looks complete).
    `progress` is a bool (a bar for this source or none) or a run's formatting bar to count into.
    `num_proc` (default: the cores available) processes share a sharded formatter's work; the
    output (records, meta, report, derived images) is the same bytes for any number.

    Records carry no tile budget: that is a training choice (the run config's max_tiles), so the
    same formatted data serves a 6-tile and a 24-tile run alike."""
    name = name or formatter.kind
    source = Path(source)
    if not source.exists():
        raise AdaptError("input not found", path=source, hint="pass the dataset folder or annotation file")
    report = Report(name=name, strict=strict)
    root = formatter.image_root(source, **options)
    out = Path(out)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        check_root = tmp if root is None else Path(root)
        shared = progress if isinstance(progress, tqdm) else None
        bar = shared if shared is not None else tqdm(desc=name, unit="rec", disable=not progress, leave=False)
        if shared is not None:
            shared.set_postfix_str(name, refresh=False)
        ids = UniqueIds(report)
        try:
            if formatter.plan is not None and formatter.work is not None:
                processes = resolve_num_proc(num_proc)
                # workers start from a server that imports the formatter while this process plans
                context = process_context([__name__, formatter.work.__module__]) if processes > 1 else None
                made = formatter.plan(source, tmp, report, **options)
                _write_sharded(formatter.work, made, source, tmp, report, check_root, bar, processes, context, ids)
            else:
                records = _valid(formatter.generate(source, tmp, report, **options), report, check_root, source,
                                 bar.update)
                rec.write_jsonl(tmp / "records.jsonl", ids.assign_all(records))
            ids.finish()
        finally:
            if shared is None:
                bar.close()
        meta_root = "." if root is None else str(Path(root).resolve())
        rec.write_meta(tmp / "meta.json", [rec.DatasetSpec(name=name, root=meta_root, annotation="records.jsonl")])
        if report.written == 0:
            report.warn(f"no records written from {source} (read {report.read} rows, skipped {report.skipped})")
        report.save(tmp / "report.json")
    return report


def _valid(records: Iterable[rec.Record], report: Report, root: Path, source: Path,
           count: Callable[[int], Any]) -> Iterator[rec.Record]:
    """The records that pass the same rule `adapt run` applies when it reads them back (the others
    are located skips); `count(1)` per record passed on, for the progress bar."""
    paths = PathMemo()
    for record in records:
        found = rec.problems(record, root=root, check_files=True, paths=paths)
        if found:
            meta = record.get("meta") if isinstance(record.get("meta"), dict) else {}
            report.skip("invalid record: " + "; ".join(found), path=meta.get("annotation", source),
                        row=meta.get("row"), id=str(record.get("id")))
            continue
        count(1)
        yield record


# --------------------------------------------------------------------------------------------------
# Parallel formatting: contiguous shards of a plan's units, one part file each, merged in order
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Shard:
    work: Work
    context: Any
    units: Sequence[Any]
    source: Path
    out: Path
    root: Path
    part: Path
    name: str
    strict: bool


_worker: dict[str, Any] = {}  # a worker process's progress counter and stop event


def _start_worker(counts: Any, stop: Any, threads: int) -> None:
    """Worker initializer: count records into the counter the parent's progress bar reads (shared
    memory: a pipe of counts could fill while the parent merges, and block a worker's exit), and
    share the cores with the other workers (torch would start a thread per core in every one)."""
    import torch

    torch.set_num_threads(threads)
    _worker.update(counts=counts, stop=stop)


class _Stopped(Exception):
    """The parent asked the workers to stop (another shard failed, or the run was interrupted)."""


def _format_shard(shard: _Shard) -> tuple[Report, bytes, bool]:
    """Worker: the records of one slice of units into its part file; returns the slice's report, a
    64-bit hash of each record's id, and whether every id is a non-empty string (see `_write_sharded`)."""
    started = time.process_time()
    report = Report(name=shard.name, strict=shard.strict)
    counts, stop = _worker["counts"], _worker["stop"]
    hashes = array.array("q")
    plain = True

    def count(n: int) -> None:
        if stop.is_set():
            raise _Stopped
        with counts.get_lock():
            counts.value += n

    def noted(records: Iterable[rec.Record]) -> Iterator[rec.Record]:
        nonlocal plain
        for record in records:
            ident = record.get("id")
            plain = plain and isinstance(ident, str) and ident != ""
            hashes.append(_id_hash(str(ident)))
            yield record

    records = _valid(shard.work(shard.context, shard.units, shard.out, report), report, shard.root, shard.source,
                     count)
    rec.write_jsonl(shard.part, noted(records))
    report.timing["worker_cpu"] = time.process_time() - started  # the benchmark's CPU seconds per sample
    return report, hashes.tobytes(), plain


def _id_hash(ident: str) -> int:
    return int.from_bytes(hashlib.blake2b(ident.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little",
                          signed=True)


def _slices(n_units: int, n_shards: int) -> list[range]:
    """`n_shards` contiguous ranges covering 0..n_units, sizes differing by one at most."""
    bounds = [n_units * i // n_shards for i in range(n_shards + 1)]
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


def _write_sharded(work: Work, plan: Plan, source: Path, tmp: Path, report: Report, root: Path, bar: tqdm,
                   num_proc: int, context: BaseContext | None, ids: UniqueIds) -> None:
    """`records.jsonl` of the plan's records in unit order: worked here when one process is enough,
    else by `num_proc` worker processes whose part files and reports are merged in shard order (each
    worker's skips are in its rows' order, so the merged report reads as one process's).

    When every id is a distinct non-empty string (the workers send a hash of each), `UniqueIds`
    would change nothing, so the part files are concatenated as they are (the same bytes: a record
    is written as `json.dumps` either way); otherwise each record is read back and its id assigned
    in order, as one process does. For a 1M-row pool, parsing and writing every record again in
    this one process took longer than the workers, and the set of seen ids ~100 MB."""
    out = tmp / "records.jsonl"
    units = list(plan.units)
    processes = max(1, min(num_proc, len(units) // max(plan.min_per_process, 1)))
    if processes == 1 or context is None:
        shard_report = Report(name=report.name, strict=report.strict)
        records = _valid(work(plan.context, units, tmp, shard_report), shard_report, root, source, bar.update)
        rec.write_jsonl(out, ids.assign_all(records))
        merge_reports(report, shard_report)
        return
    parts = tmp / ".parts"
    parts.mkdir()
    counts, stop = context.Value("q", 0), context.Event()
    shards = [_Shard(work, plan.context, units[s.start:s.stop], source, tmp, root, parts / f"{i:05d}.jsonl", report.name,
                     report.strict) for i, s in enumerate(_slices(len(units), processes))]
    threads = max(1, available_cores() // processes)
    report.timing["workers"] = processes
    shown, hashes, plain = 0, [], True
    with ProcessPoolExecutor(processes, mp_context=context, initializer=_start_worker,
                             initargs=(counts, stop, threads)) as pool:
        futures = [pool.submit(_format_shard, shard) for shard in shards]
        try:
            for future in futures:
                while not future.done():
                    wait([future], timeout=0.2)
                    now = counts.value
                    bar.update(now - shown)
                    shown = now
                shard_report, shard_hashes, shard_plain = future.result()  # the first failing shard in order raises
                merge_reports(report, shard_report)
                hashes.append(np.frombuffer(shard_hashes, dtype=np.int64))
                plain = plain and shard_plain
            bar.update(counts.value - shown)
        except BrokenProcessPool:
            raise AdaptError(f"a formatting worker process died (killed, or out of memory) while formatting "
                             f"{source}; nothing was written", hint="run again, with fewer processes "
                             "(--num-proc) if memory is short") from None
        finally:
            stop.set()  # on an error or an interrupt the other workers stop at their next record
    every = np.concatenate(hashes)
    if plain and len(np.unique(every)) == len(every):
        with atomic_write(out, "wb") as handle:
            for shard in shards:
                with open(shard.part, "rb") as part:
                    shutil.copyfileobj(part, handle, 1 << 20)
        report.written += len(every)
    else:
        rec.write_jsonl(out, ids.assign_all(record for shard in shards for record in _read_part(shard.part)))
    for shard in shards:
        shard.part.unlink()
    parts.rmdir()


def _read_part(path: Path) -> Iterator[rec.Record]:
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            yield json.loads(line)


def merge_reports(into: Report, part: Report) -> None:
    """Add a later slice's report to `into`: counts and skips in order, stats summed (numbers) or
    merged key by key (dicts, kept in first-seen order), anything else kept from the first slice."""
    into.read += part.read
    into.written += part.written
    into.skips.extend(part.skips)
    for warning in part.warnings:
        into.warn(warning)
    _merge_stats(into.stats, part.stats)
    for step, seconds in part.timing.items():
        into.timing[step] = into.timing.get(step, 0.0) + seconds


def _merge_stats(into: dict[str, Any], part: dict[str, Any]) -> None:
    for key, value in part.items():
        if key not in into:
            into[key] = copy.deepcopy(value)
        elif isinstance(value, dict) and isinstance(into[key], dict):
            _merge_stats(into[key], value)
        elif isinstance(value, (int, float)) and isinstance(into[key], (int, float)) and not isinstance(value, bool):
            into[key] += value


class UniqueIds:
    """Gives every written record a distinct id; a clash is renamed `id#2`, `id#3`... and reported
    (in `report.stats` by `finish`, after the formatter's own stats)."""

    def __init__(self, report: Report) -> None:
        self.report, self.seen = report, set()
        self.renamed: dict[str, str] = {}
        self.clashes = 0

    def assign(self, record: rec.Record) -> None:
        ident = str(record.get("id")) if record.get("id") not in (None, "") else f"row-{self.report.written + 1}"
        new, n = ident, 1
        while new in self.seen:
            n += 1
            new = f"{ident}#{n}"
        if new != ident:
            if len(self.renamed) < 1000:
                self.renamed[f"{ident} (record {self.report.written + 1})"] = new
            self.clashes += 1
        self.seen.add(new)
        record["id"] = new

    def assign_all(self, records: Iterable[rec.Record]) -> Iterator[rec.Record]:
        """Each record with its unique id, counted as written."""
        for record in records:
            self.assign(record)
            self.report.written += 1
            yield record

    def finish(self) -> None:
        if self.clashes:
            self.report.stats["renamed_ids"] = self.renamed
            self.report.stats["duplicate_ids_renamed"] = self.clashes


def source_text_or_skip(report: Report, texts: dict[str, Any], *, path: str | Path | None, row: int | None,
                        id: str | None) -> bool:
    """True when every named source text may be embedded; else one counted, located skip (adapt.data.text)."""
    for what, value in texts.items():
        problem = source_problem(value, what)
        if problem:
            report.skip(problem, path=path, row=row, id=id)
            return False
    return True


def decoded_size(path: Path, report: Report, count: bool = True) -> tuple[int, int]:
    """Fully decode an image as training will (adapt.data.images) and count what was normalised
    (unless `count` is False: a parallel worker decoding an image that an earlier row counted)."""
    image = decode_rgb(str(path))
    if count:
        count_normalized(report, image.info.get(NOTES_KEY, []))
    return image.size


def count_normalized(report: Report, notes: list[str]) -> None:
    """Count (and warn about once per kind) what decoding did beyond a plain decode."""
    for note in notes:
        counts = report.stats.setdefault("images_normalized", {})
        kind = note.split(" range ")[0]
        counts[kind] = counts.get(kind, 0) + 1
        report.warn(f"some images were normalised on decode ({kind}...): see stats.images_normalized")


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
    every row that uses an unusable image is reported as its own skip. What decoding normalised is
    counted once per image, or, with `count_rows`, once per row that uses it: a count that does not
    depend on how a source's rows are split among processes when no process sees them all.
    """

    def __init__(self, root: Path, report: Report, decode: bool = True, count_rows: bool = False) -> None:
        self.root, self.report, self.decode, self.count_rows = Path(root), report, decode, count_rows
        self._cache: dict[Path, tuple[tuple[int, int] | None, str, list[str]]] = {}
        self._paths = PathMemo()

    def size(self, rel: str, *, path: str | Path | None, row: int | None, id: str | None,
             first: bool = True) -> tuple[int, int] | None:
        """(width, height) of the image, or None after a counted skip (escaping, missing, corrupt).
        `first` is False for a row of a parallel shard whose image an earlier row of the source used:
        its normalisation is counted once, as one process counts it."""
        try:
            target = self._paths.resolve(self.root, rel)
        except AdaptError as err:
            self.report.skip(err.message, path=path, row=row, id=id)
            return None
        cached = target in self._cache
        if not cached:
            self._cache[target] = self._probe(target)
        size, reason, notes = self._cache[target]
        if size is None:
            self.report.skip(reason, path=path, row=row, id=id)
        elif self.count_rows or (first and not cached):
            count_normalized(self.report, notes)
        return size

    def _probe(self, target: Path) -> tuple[tuple[int, int] | None, str, list[str]]:
        if not target.is_file():
            return None, f"image not found: {target}", []
        try:
            if self.decode:
                image = decode_rgb(str(target))
                return image.size, "", list(image.info.get(NOTES_KEY, []))
            return image_size(target), "", []
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            return None, f"corrupt image: {target} ({err})", []


def turn(question: str, answer: str) -> list[dict[str, str]]:
    """A single-image question/answer pair with InternVL's `<image>` placeholder in front."""
    return [{"from": "human", "value": f"{rec.IMAGE_PLACEHOLDER}\n{question}"}, {"from": "gpt", "value": answer}]
