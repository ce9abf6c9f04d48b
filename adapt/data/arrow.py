"""Records as Arrow tables (opened memory-mapped as HF `datasets`), read once and cached per file.

A JSONL annotation (a formatted folder's records.jsonl, an InternVL meta entry's file, a bare JSONL)
becomes a `datasets.Dataset` with one row per non-blank line:

    record   the normalized record as a JSON string (records are heterogeneous: image str or list,
             free-form meta), null for a bad row
    line     the file line; problem: why the row is skipped (today's messages), null when valid
    id, images                      typed columns the pipeline reads without parsing the record
    g_scene ... g_image, g_sample   64-bit keys of the held-out groupings (adapt.data.splits)

The table is cached under the run's shared data folder (`<shared>/arrow/`, one folder of Arrow
stream files per JSONL, keyed by the file's path, size and modification time) and opened memory-mapped
as a `datasets.Dataset`: a second run reads nothing but the mapped table. A source's
records are then a `Rows` view (table + row positions), mixing works on (source, row) index arrays,
and planning (`plan_rows`) measures only the rows a mixture uses, once, cached the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from adapt.data.records import Record, byte_ranges, images_of, normalize, numbered_lines, problems
from adapt.errors import Report
from adapt.fileio import PathMemo

if TYPE_CHECKING:
    import datasets

    from adapt.data.samples import SampleBuilder

ARROW_VERSION = 1  # bump when a column's meaning changes: old cached tables are then not reused
GROUP_LEVELS = ("scene", "patient", "study", "video", "image")  # adapt.data.splits.GROUPINGS without "sample"
SHARD_BYTES = 32 << 20  # a file is read in this many byte ranges, one process each (fixed: the cache key)


def _key(grouping: str, value: str) -> int:
    """A signed 64-bit key of (grouping, value); 0 means "no such group"."""
    digest = hashlib.blake2b(f"{grouping}\0{value}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True) or 1


def group_keys(record: Record) -> dict[str, int]:
    """Per grouping level, the key `splits.holdout_group` would give the record (0 when it has none)."""
    from adapt.data.mixing import content_key

    meta = record.get("meta") or {}
    out = {f"g_{g}": _key(g, str(meta[f])) if meta.get(f) else 0
           for g, f in (("scene", "scene_token"), ("patient", "patient_id"), ("study", "study_uid"))}
    video = record.get("video") or meta.get("clip")
    out["g_video"] = _key("video", str(video)) if video else 0
    images = images_of(record)
    out["g_image"] = _key("image", "\n".join(sorted(images))) if images else 0
    out["g_sample"] = _key("sample", content_key(record))
    return out


def _features() -> datasets.Features:
    from datasets import Features, Sequence, Value

    columns = {"record": Value("string"), "line": Value("int64"), "problem": Value("string"), "id": Value("string"),
               "images": Sequence(Value("string"))}
    return Features({**columns, **{f"g_{g}": Value("int64") for g in (*GROUP_LEVELS, "sample")}})


_EMPTY_KEYS = {f"g_{g}": 0 for g in (*GROUP_LEVELS, "sample")}


def _row(raw: bytes, line: int, root: str, paths: PathMemo) -> dict[str, Any]:
    """One table row: the checks and messages of `records.read_jsonl` and `mixing._read_records`."""
    bad = {"record": None, "line": line, "id": None, "images": [], **_EMPTY_KEYS}
    try:
        record = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return {**bad, "problem": "line is not valid UTF-8"}
    except json.JSONDecodeError as err:
        return {**bad, "problem": f"malformed JSON: {err.msg} at column {err.colno}"}
    found = problems(record, root=root, paths=paths)
    if found:
        return {**bad, "problem": "invalid record: " + "; ".join(found),
                "id": str(record.get("id")) if isinstance(record, dict) else None}
    record = normalize(record)
    if not isinstance(record.setdefault("meta", {}), dict):
        return {**bad, "problem": "'meta' is not a JSON object", "id": str(record.get("id"))}
    return {"record": json.dumps(record, ensure_ascii=False), "line": line, "problem": None,
            "id": str(record.get("id")), "images": images_of(record), **group_keys(record)}


def _write_shard(path: str, root: str, start: int, end: int, line: int, out: str) -> None:
    """Worker: the rows of one byte range into an Arrow stream file, in batches of 8192 rows."""
    import pyarrow as pa

    schema = _features().arrow_schema
    paths = PathMemo()
    batch: list[dict[str, Any]] = []
    with open(path, "rb") as handle, pa.OSFile(out, "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for line_no, raw in numbered_lines(handle, (start, end, line)):
            if raw.strip():
                batch.append(_row(raw, line_no, root, paths))
                if len(batch) == 8192:
                    writer.write_batch(pa.RecordBatch.from_pylist(batch, schema=schema))
                    batch = []
        if batch:
            writer.write_batch(pa.RecordBatch.from_pylist(batch, schema=schema))


def _build(path: Path, root: str, folder: Path, num_proc: int) -> None:
    """The file's table as one Arrow stream file per byte range (written here or by `num_proc`
    worker processes), the folder renamed into place when all are written."""
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    from adapt.fileio import atomic_dir

    shards = byte_ranges(path, SHARD_BYTES)
    processes = max(1, min(num_proc, len(shards)))
    with atomic_dir(folder, overwrite=True) as tmp:
        jobs = [(str(path), root, start, end, line, str(tmp / f"shard-{i:05d}.arrow"))
                for i, (start, end, line) in enumerate(shards)]
        if processes == 1:
            for job in jobs:
                _write_shard(*job)
        else:
            from adapt.config import process_context

            try:
                with ProcessPoolExecutor(processes, mp_context=process_context([__name__])) as pool:
                    for future in [pool.submit(_write_shard, *job) for job in jobs]:
                        future.result()
            except BrokenProcessPool:
                from adapt.errors import AdaptError

                raise AdaptError("a data worker process died (killed, or out of memory) while reading the file into "
                                 "Arrow; nothing was kept", path=path,
                                 hint="run again, with fewer processes (--num-proc) if memory is short") from None


def read_table(annotation: str | Path, root: str, report: Report, *, cache_dir: str | Path,
               num_proc: int = 1) -> tuple[datasets.Dataset, np.ndarray]:
    """(table, positions of its valid rows) of a JSONL file; bad rows go to `report` with file:line.

    The table is written with pyarrow (record batches, one stream file per byte range) and opened
    memory-mapped with `datasets.Dataset.from_file`, not built by `Dataset.from_generator`: the
    latter's per-row feature encoding cost 55 us a row, twice the row's own parsing and checks
    (measured on 50k pool rows: 2.8 s vs 0.13 s of CPU to store them)."""
    import datasets

    path = Path(annotation)
    if not path.is_file():
        from adapt.errors import AdaptError

        raise AdaptError("annotation file not found", path=path, hint="check the path you passed")
    stat = path.stat()
    key = hashlib.blake2b(json.dumps([str(path.resolve()), str(root), stat.st_size, stat.st_mtime_ns, ARROW_VERSION,
                                      SHARD_BYTES]).encode(), digest_size=12).hexdigest()
    folder = Path(cache_dir) / f"{path.stem}-{key}"
    if not folder.is_dir():  # written whole or not at all (atomic_dir): a folder that is there is complete
        _build(path, str(root), folder, num_proc)
    with _quiet_datasets():
        parts = [datasets.Dataset.from_file(str(f)) for f in sorted(folder.glob("shard-*.arrow"))]
        table = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    random_access(table)
    report.read += len(table)
    import pyarrow.compute as pc

    bad = pc.is_valid(table.data.column("problem")).to_numpy(zero_copy_only=False)
    if bad.any():
        problem_rows = table.select_columns(["line", "problem", "id"]).select(np.flatnonzero(bad))
        for line, problem, identifier in zip(problem_rows["line"], problem_rows["problem"], problem_rows["id"]):
            report.skip(problem, path=path, row=line, id=identifier)
    return table, np.flatnonzero(~bad)


_MADV_RANDOM, _MADV_DONTNEED = 1, 4  # <sys/mman.h> on Linux


class MappedPages:
    """The memory mappings of some tables' Arrow files, for madvise(2). Found once in /proc/self/maps
    (they stay put while the tables, kept here, are alive), and only read-only file mappings: DONTNEED
    on anonymous memory would zero it. Without /proc or libc there are none, and advice is a no-op."""

    def __init__(self, tables: list[datasets.Dataset]) -> None:
        import ctypes

        self.tables, self.ranges = tables, []
        files = {os.path.realpath(f["filename"]) for table in tables for f in table.cache_files}
        try:
            with open("/proc/self/maps") as handle:
                maps = handle.read().splitlines() if files else []
            self._madvise = ctypes.CDLL(None, use_errno=True).madvise
        except (OSError, AttributeError):
            return
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5] in files and "w" not in fields[1]:
                start, end = (int(x, 16) for x in fields[0].split("-"))
                self.ranges.append((ctypes.c_void_p(start), ctypes.c_size_t(end - start)))

    def advise(self, advice: int) -> None:
        for start, length in self.ranges:
            self._madvise(start, length, advice)

    def release(self) -> None:
        """Drop the pages this process has mapped (they stay in the page cache and are mapped again
        when read): after reading many rows, so resident memory is what the process holds, not what
        it has read. The kernel maps 64 KiB around each page a read faults in, so a few hundred
        scattered rows already map tens of MB."""
        self.advise(_MADV_DONTNEED)


def random_access(table: datasets.Dataset) -> None:
    """No read-ahead on the table's pages: a mixture reads scattered rows, and read-ahead made reading
    133k of 1.1M rows read (and map) nearly every page."""
    MappedPages([table]).advise(_MADV_RANDOM)


def release(tables: list[datasets.Dataset]) -> None:
    """`MappedPages.release` of these tables, after one pass over many of their rows."""
    MappedPages(tables).release()


class _quiet_datasets:
    """datasets' own progress bars and 'Generating train split' lines: adapt shows one phase display."""

    def __enter__(self) -> None:
        import datasets

        self.was = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()

    def __exit__(self, *exc: Any) -> None:
        import datasets

        if self.was:
            datasets.enable_progress_bars()


class Rows(Sequence):
    """A source's records, read lazily from an Arrow table: `positions` are table rows (a meta file's
    `repeat_time` repeats positions, not records). `max_tiles` is the meta file's default for each
    record's `meta.max_tiles`, `limit` a run's per-source cap (see `mixing.limit_tiles`)."""

    def __init__(self, table: datasets.Dataset, positions: np.ndarray, *, max_tiles: int | None = None,
                 limit: int | None = None) -> None:
        self.table, self.positions = table, np.asarray(positions, dtype=np.int64)
        self.max_tiles, self.limit = max_tiles, limit
        self._records: tuple[list, np.ndarray] | None = None

    def __getstate__(self) -> dict[str, Any]:  # dataloader workers re-map the table, never copy its column
        return {**self.__dict__, "_records": None}

    def __len__(self) -> int:
        return len(self.positions)

    def view(self, positions: np.ndarray) -> Rows:
        """The same table and settings over other positions."""
        return Rows(self.table, positions, max_tiles=self.max_tiles, limit=self.limit)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return self.view(self.positions[index])
        if self._records is None:  # the column's chunks and where each starts: a row is found by bisection
            chunks = self.table.data.column("record").chunks  # (pyarrow's own lookup walks every chunk)
            self._records = (chunks, np.cumsum([0] + [len(c) for c in chunks]))
        chunks, starts = self._records
        position = int(self.positions[index])
        chunk = int(np.searchsorted(starts, position, side="right")) - 1
        return self.decode(chunks[chunk][position - int(starts[chunk])].as_py())

    def decode(self, text: str) -> Record:
        """A stored record with the source's tile settings applied (as `load_sources` does to lists)."""
        record = json.loads(text)
        meta = record["meta"]
        if self.max_tiles is not None:
            meta.setdefault("max_tiles", self.max_tiles)
        if self.limit is not None:
            meta["max_tiles"] = min(meta.get("max_tiles") or self.limit, self.limit)
        return record

    def column(self, name: str) -> np.ndarray:
        """A typed column at this view's positions (no second copy when the view is the whole table)."""
        values = self.table.data.column(name).to_numpy()
        whole = len(self.positions) == len(values) and (len(values) == 0 or (
            self.positions[0] == 0 and self.positions[-1] == len(values) - 1 and bool((np.diff(self.positions) == 1).all())))
        return values if whole else values[self.positions]

    def has_values(self, name: str) -> bool:
        """Whether an integer column is non-zero anywhere in the table (read by pyarrow, no copy)."""
        import pyarrow.compute as pc

        return bool(len(self.table) and pc.any(pc.not_equal(self.table.data.column(name), 0)).as_py())

    def repeat(self, repeat_time: float, seed: int) -> Rows:
        """`records.apply_repeat` on positions: the same picks as on a list of the records."""
        whole, frac = int(repeat_time), repeat_time - int(repeat_time)
        parts = [self.positions] * whole
        if frac > 0:
            parts.append(self.positions[random.Random(seed).sample(range(len(self)), round(len(self) * frac))])
        return self.view(np.concatenate(parts) if parts else self.positions[:0])

    def materialize(self) -> list[Record]:
        """The records as Python dicts, a repeated position sharing one dict (as `apply_repeat` does)."""
        seen: dict[int, Record] = {}
        out = []
        for i, position in enumerate(self.positions.tolist()):
            if position not in seen:
                seen[position] = self[i]
            out.append(seen[position])
        return out


# -- held-out split on columns -------------------------------------------------------------------------

def split_rows(source: Any, n_or_fraction: int | float, seed: int) -> tuple[Any, Any, dict[str, Any]]:
    """`splits.split_by_group` for a `Rows`-backed source, on the key columns: the same groups in the
    same first-seen order, the same seeded draw and the same image-content check, without reading
    the records (only the held-out ones are decoded)."""
    from collections import Counter
    from dataclasses import replace

    from adapt.data import splits

    rows: Rows = source.records
    # memory: a 1M-row pool is split on a few 8 MB arrays, never Python objects; levels no row of the
    # table has are not read at all (a general pool has images, no scenes or patients)
    pages = MappedPages([rows.table])  # each key column is copied out, then its mapped pages dropped
    present_levels = [g for g in GROUP_LEVELS if rows.has_values(f"g_{g}")]
    sample = rows.column("g_sample")
    pages.release()
    given_up: list[str] = []
    while True:
        codes = np.full(len(rows), len(GROUP_LEVELS), dtype=np.int8)
        keys = sample.copy()
        for level in reversed(range(len(GROUP_LEVELS))):  # the first present level wins
            name = GROUP_LEVELS[level]
            if name in given_up or name not in present_levels:
                continue
            values = rows.column(f"g_{name}")
            pages.release()
            present = values != 0
            codes[present], keys[present] = level, values[present]
            del values, present
        if len(rows) == 0 or codes[0] == len(GROUP_LEVELS) or (keys != keys[0]).any():
            break
        given_up.append(GROUP_LEVELS[codes[0]])
    given_up.sort(key=splits.GROUPINGS.index)
    groups, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    del keys
    order_seen = np.argsort(first, kind="stable")  # groups in first-seen order, as a dict keeps them
    rank = np.empty_like(order_seen)
    rank[order_seen] = np.arange(len(order_seen))
    group_of = rank[inverse]  # each position's group number, in first-seen order
    del inverse
    group_code = codes[first[order_seen]]
    del codes
    # distinct (group, content) pairs per group: sorted by group then content, a pair is new where
    # either changes (np.unique(axis=1) over the stacked pair did the same with 3x the memory)
    order = np.lexsort((sample, group_of))
    sorted_groups = group_of[order]
    new_pair = np.ones(len(order), dtype=bool)
    new_pair[1:] = sorted_groups[1:] != sorted_groups[:-1]
    sorted_samples = sample[order]
    del order
    new_pair[1:] |= sorted_samples[1:] != sorted_samples[:-1]
    del sorted_samples
    members = np.bincount(sorted_groups[new_pair], minlength=len(groups))
    del sorted_groups, new_pair
    target = splits._target(n_or_fraction, len(np.unique(sample)), source.name)
    draw = random.Random(f"adapt.holdout:{seed}:{source.name}").sample(range(len(groups)), len(groups))
    chosen = np.zeros(len(groups), dtype=bool)
    held_count = 0
    for index in draw[:-1]:  # the last group in the order always trains
        if held_count >= target:
            break
        chosen[index] = True
        held_count += int(members[index])
    in_held = chosen[group_of]
    held_positions = np.flatnonzero(in_held)
    _, first_content = np.unique(sample[held_positions], return_index=True)
    held_positions = held_positions[np.sort(first_content)]  # each content once, first seen
    held = [rows[int(i)] for i in held_positions]
    train_view = rows.view(rows.positions[~in_held])
    train_view, leaked = _drop_shared_images(train_view, held, source.root)
    names = ("scene", "patient", "study", "video", "image", "sample")
    account = {"grouping": dict(Counter(names[c] for c in group_code.tolist())),
               "heldout_groups": dict(Counter(names[c] for c in group_code[chosen].tolist())),
               "heldout_records": len(held), "train_records_dropped_same_image": leaked,
               "single_group_refined": given_up}
    pages.release()  # the image column was read too
    return replace(source, records=train_view), replace(source, records=held), account


def _drop_shared_images(train: Rows, held: list[Record], root: str) -> tuple[Rows, int]:
    """`splits._drop_shared_images` per distinct image path of the training rows, not per row."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from adapt.data.splits import _file_hash, _image_files

    held_files = {path for record in held for path in _image_files(record, root)}
    sizes = {path.stat().st_size for path in held_files if path.is_file()}
    if not sizes or not len(train):
        return train, 0
    held_hashes = {_file_hash(path) for path in held_files if path.is_file()} - {None}
    images = train.table.data.column("images").take(pa.array(train.positions))
    flat, parents = pc.list_flatten(images), pc.list_parent_indices(images)
    distinct = pc.unique(flat)
    bad = []
    for rel in distinct.to_pylist():
        path = Path(root) / rel
        if path.is_file() and path.stat().st_size in sizes and _file_hash(path) in held_hashes:
            bad.append(rel)
    if not bad:
        return train, 0
    hit = pc.is_in(flat, value_set=pa.array(bad, type=flat.type)).to_numpy(zero_copy_only=False)
    drop = np.zeros(len(train), dtype=bool)
    drop[parents.to_numpy(zero_copy_only=False)[hit]] = True
    return train.view(train.positions[~drop]), int(drop.sum())


# -- planning ---------------------------------------------------------------------------------------

def builder_key(builder: SampleBuilder) -> str:
    """Everything a plan depends on besides the record: tokenizer (its whole definition when fast),
    template, tiling, length limit, system prompt."""
    encoder, policy, tokenizer = builder.encoder, builder.policy, builder.encoder.tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    parts = [type(tokenizer).__name__, getattr(tokenizer, "name_or_path", ""), len(tokenizer),
             backend.to_str() if backend is not None else sorted(tokenizer.get_vocab().items()),
             repr(encoder.template), encoder.tokens_per_tile, encoder.system, repr(policy), builder.max_length,
             builder.train, builder.video_frames, sorted(builder.special_tokens)]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()


def _plan_batch(texts: list[str], *, builder: SampleBuilder, root: str, view: Rows) -> dict[str, list[Any]]:
    from adapt.data.samples import SampleDropped

    out: dict[str, list[Any]] = {"length": [], "tiles": [], "supervised": [], "drop": []}
    for planned in builder.plan_many([view.decode(text) for text in texts], root):
        dropped = isinstance(planned, SampleDropped)
        values = (-1, 0, 0, str(planned)) if dropped else (planned.length, planned.tiles, planned.supervised, None)
        for name, value in zip(out, values):
            out[name].append(value)
    return out


def plan_rows(builder: SampleBuilder, rows: Rows, root: str, positions: np.ndarray, *, cache_dir: str | Path,
              num_proc: int = 1) -> dict[str, np.ndarray | list[str | None]]:
    """`SampleBuilder.plan` of the table rows `positions` (sorted, distinct) as columns length, tiles,
    supervised (length -1: dropped, with its reason in drop). Cached under cache_dir by the table,
    the rows, the source's tile settings and `builder_key`: a second run with the same mixture and
    settings plans nothing."""
    from datasets import Features, Value

    key = hashlib.sha256(json.dumps([rows.table._fingerprint, rows.max_tiles, rows.limit, root,
                                     builder_key(builder), ARROW_VERSION]).encode())
    key.update(np.ascontiguousarray(positions, dtype=np.int64).tobytes())
    fingerprint = key.hexdigest()[:32]
    cache = Path(cache_dir) / "plans"
    cache.mkdir(parents=True, exist_ok=True)
    features = Features({"length": Value("int64"), "tiles": Value("int64"), "supervised": Value("int64"),
                         "drop": Value("string")})
    subset = rows.table.select_columns(["record"]).select(positions)
    num_proc = max(1, min(num_proc, len(positions) // 2000))  # a process pays from a few thousand rows
    with _quiet_datasets():  # datasets finds the cache file itself ("Loading cached processed dataset")
        planned = subset.map(_plan_batch, batched=True, batch_size=512, input_columns=["record"],
                             fn_kwargs={"builder": builder, "root": root, "view": rows.view(positions[:0])},
                             remove_columns=["record"], features=features, num_proc=num_proc if num_proc > 1 else None,
                             new_fingerprint=fingerprint, cache_file_name=str(cache / f"plan-{fingerprint}.arrow"))
    release([rows.table])  # with one process the rows were read here
    data = planned.data
    return {name: data.column(name).to_numpy() for name in ("length", "tiles", "supervised")} | \
        {"drop": data.column("drop").to_pylist()}


class RowPlanner:
    """Plans each (source, table row) a run needs exactly once: as the `measure` of `mixing.mix` by
    tokens (called per (source, row)), then the whole mixture's `Plans` (`plan_mixture`), batched and
    cached for Arrow-backed sources, record by record for list-backed ones."""

    def __init__(self, builder: SampleBuilder, cache_dir: str | Path, num_proc: int = 1) -> None:
        self.builder, self.cache_dir, self.num_proc = builder, Path(cache_dir), num_proc
        self.done: dict[tuple[str, int], tuple[int, int, int, str | None]] = {}  # (source, position) -> plan

    def _position(self, source: Any, row: int) -> int:
        return int(source.records.positions[row]) if isinstance(source.records, Rows) else row

    def _plan_one(self, record: Record, root: str) -> tuple[int, int, int, str | None]:
        from adapt.data.samples import SampleDropped

        try:
            planned = self.builder.plan(record, root)
            return planned.length, planned.tiles, planned.supervised, None
        except SampleDropped as err:
            return -1, 0, 0, str(err)

    def __call__(self, source: Any, row: int) -> int:
        """Supervised tokens of one row (0 when it would be dropped): a `mixing.Measure`."""
        key = (source.name, self._position(source, row))
        if key not in self.done:
            self.done[key] = self._plan_one(source.records[row], source.root)
        length, _, supervised, _ = self.done[key]
        return supervised if length >= 0 else 0

    def plan_source(self, source: Any, rows: np.ndarray) -> None:
        """Plan these rows of one source (batched over processes and cached when Arrow-backed)."""
        positions = np.unique(source.records.positions[rows] if isinstance(source.records, Rows) else rows)
        todo = np.array([p for p in positions.tolist() if (source.name, p) not in self.done], dtype=np.int64)
        if not len(todo):
            return
        if isinstance(source.records, Rows):
            planned = plan_rows(self.builder, source.records, source.root, todo, cache_dir=self.cache_dir,
                                num_proc=self.num_proc)
            for i, position in enumerate(todo.tolist()):
                self.done[(source.name, position)] = (int(planned["length"][i]), int(planned["tiles"][i]),
                                                      int(planned["supervised"][i]), planned["drop"][i])
        else:
            for position in todo.tolist():
                self.done[(source.name, position)] = self._plan_one(source.records[position], source.root)

    def plan_mixture(self, entries: Any, progress: Any = None) -> Any:
        """The `mixing.Plans` of a mixed mixture's `Entries`: only the rows it draws are planned (a
        general pool of 1M rows mixed at 0.25 into 100k domain rows plans ~133k rows, not 1.1M).
        `progress` (the planning phase's display) counts the entries, source by source."""
        from adapt.data.mixing import Plans

        values = np.zeros((3, len(entries)), dtype=np.int64)
        drops: dict[int, str] = {}
        for index, source in enumerate(entries.sources):
            mine = np.flatnonzero(entries.source_index == index)
            if not len(mine):
                continue
            self.plan_source(source, entries.rows[mine])
            rows = entries.rows[mine]
            positions = source.records.positions[rows] if isinstance(source.records, Rows) else rows
            for i, position in zip(mine.tolist(), positions.tolist()):
                length, tiles, supervised, drop = self.done[(source.name, position)]
                values[:, i] = (length, tiles, supervised)
                if drop is not None:
                    drops[i] = drop
            if progress is not None:
                progress.update(len(mine))
        return Plans(values[0], values[1], values[2], drops)
