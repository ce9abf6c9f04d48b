"""Mix domain data with general instruction data, so the model learns the domain without forgetting.

Mini-InternVL found domain-only training is not best (a general share of 0.25 won in their driving
test), and a model trained without general data forgets general skills. The mixture is decided
once, seeded, and saved with a manifest (per source: available, used, repeated, tokens), so a
resumed run trains on exactly the same samples and nobody has to guess what went in.

Ratios are either by samples or by supervised tokens: long general answers (ShareGPT4V captions)
outweigh short domain answers (multiple-choice letters) by far more than their sample count says.
"""

from __future__ import annotations

import array
import hashlib
import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from adapt.data.arrow import MappedPages, Rows, read_table
from adapt.data.records import Record, apply_repeat, read_jsonl, read_meta
from adapt.errors import AdaptError, Report
from adapt.fileio import atomic_write, atomic_write_text

if TYPE_CHECKING:
    from adapt.data.samples import Planned, SampleBuilder

KINDS = ("domain", "general")
MIX_BY = ("samples", "tokens")
MANIFEST_VERSION = 1
Measure = Callable[["Source", int], int]  # supervised tokens of a source's row (0: it would be dropped)
Plan = Callable[[Record, str], "Planned"]


@dataclass
class Source:
    """One dataset: its records (a list, or an `arrow.Rows` view read lazily from an Arrow table), the
    folder their image paths resolve in, and its share of its kind."""

    name: str
    root: str
    records: Sequence[Record]
    kind: str
    weight: float = 1.0
    max_tiles: int | None = None

    def __post_init__(self) -> None:
        _check_kind_weight(self.name, self.kind, self.weight)

    def __len__(self) -> int:
        return len(self.records)


def _check_kind_weight(name: str, kind: str, weight: float) -> None:
    if kind not in KINDS:
        raise AdaptError(f"source {name!r} has kind {kind!r}; expected one of {KINDS}")
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not (math.isfinite(weight) and weight > 0):
        raise AdaptError(f"source {name!r} has weight {weight!r}; a weight must be a number > 0",
                         hint="weights are relative shares among sources of the same kind, e.g. 1 and 3")


# -- loading ----------------------------------------------------------------------------------------

def load_sources(path: str | Path, *, kind: str, weight: float = 1.0, name: str | None = None,
                 report: Report, seed: int = 0, arrow_cache: str | Path | None = None,
                 num_proc: int = 1) -> list[Source]:
    """Sources from a formatter output folder (`records.jsonl` + `meta.json`), an InternVL meta file
    (one Source per entry) or a bare JSONL (its folder is the image root). Bad rows go to `report`.

    With `arrow_cache` (a folder) each file is read into a cached Arrow table (`adapt.data.arrow`,
    `num_proc` processes) and the records stay there: `Source.records` is then a lazy `Rows` view."""
    path = Path(path)
    read = {"arrow_cache": arrow_cache, "num_proc": num_proc}
    if path.is_dir():
        if (path / "meta.json").is_file():
            return load_sources_from_meta(path / "meta.json", kind=kind, weight=weight, name=name,
                                          report=report, seed=seed, **read)
        if (path / "records.jsonl").is_file():
            return [_jsonl_source(path / "records.jsonl", name or path.name, kind, weight, report, **read)]
        raise AdaptError("folder has neither meta.json nor records.jsonl", path=path,
                         hint="pass a formatter output folder, an InternVL meta .json file or a .jsonl file")
    if not path.is_file():
        raise AdaptError("data source not found", path=path,
                         hint="pass a formatter output folder, an InternVL meta .json file or a .jsonl file")
    if path.suffix == ".jsonl":
        return [_jsonl_source(path, name or path.stem, kind, weight, report, **read)]
    if path.suffix == ".json":
        return load_sources_from_meta(path, kind=kind, weight=weight, name=name, report=report, seed=seed, **read)
    raise AdaptError("unrecognised data source", path=path,
                     hint="pass a formatter output folder, an InternVL meta .json file or a .jsonl file")


def load_source(path: str | Path, *, name: str | None = None, kind: str, weight: float = 1.0,
                report: Report, seed: int = 0) -> Source:
    """Exactly one Source (see `load_sources`); a meta file listing several datasets is refused."""
    sources = load_sources(path, kind=kind, weight=weight, name=name, report=report, seed=seed)
    if len(sources) != 1:
        raise AdaptError(f"this meta file lists {len(sources)} datasets ({', '.join(s.name for s in sources)}) "
                         "but one source was expected", path=path,
                         hint="load it with load_sources / load_sources_from_meta, or point at one dataset")
    return sources[0]


def load_sources_from_meta(path: str | Path, *, kind: str, weight: float = 1.0, name: str | None = None,
                           report: Report, seed: int = 0, arrow_cache: str | Path | None = None,
                           num_proc: int = 1) -> list[Source]:
    """One Source per meta-file entry, `repeat_time` applied (seeded) and `max_dynamic_patch` kept as
    each record's `meta.max_tiles` (a record's own value wins).

    `weight` is the whole file's share; it is split among the entries by their size after
    `repeat_time`, which is how InternVL's concatenated loader weighs them.
    """
    path = Path(path)
    _check_kind_weight(name or str(path), kind, weight)
    specs = read_meta(path)
    loaded: list[tuple[str, str, Sequence[Record], int | None]] = []
    for spec in specs:
        max_tiles = spec.max_dynamic_patch
        records: Sequence[Record]
        if arrow_cache is not None:
            table, valid = read_table(spec.annotation, spec.root, report, cache_dir=arrow_cache, num_proc=num_proc)
            records = Rows(table, valid, max_tiles=max_tiles).repeat(spec.repeat_time, seed)
        else:
            records = _read_records(Path(spec.annotation), spec.root, report)
            if max_tiles is not None:
                for record in records:
                    record["meta"].setdefault("max_tiles", max_tiles)
            records = apply_repeat(records, spec.repeat_time, seed)
        source_name = spec.name if name is None else name if len(specs) == 1 else f"{name}:{spec.name}"
        loaded.append((source_name, str(Path(spec.root).resolve()),
                       _non_empty(records, source_name, spec.annotation, report), max_tiles))
    size = sum(len(records) for _, _, records, _ in loaded)
    return [Source(name=n, root=root, records=records, kind=kind, max_tiles=max_tiles,
                   weight=weight if len(loaded) == 1 else weight * len(records) / size)
            for n, root, records, max_tiles in loaded]


def limit_tiles(source: Source, max_tiles: int) -> None:
    """A per-source tile budget from the run config: each record's `meta.max_tiles`, which can lower
    the run's max_tiles for this source's images (never raise it)."""
    source.max_tiles = min(source.max_tiles or max_tiles, max_tiles)
    if not isinstance(source.records, list):  # an arrow.Rows view applies it as it reads each record
        source.records.limit = min(source.records.limit or max_tiles, max_tiles)
        return
    for record in source.records:
        meta = record.setdefault("meta", {})
        meta["max_tiles"] = min(meta.get("max_tiles") or max_tiles, max_tiles)


def _jsonl_source(path: Path, name: str, kind: str, weight: float, report: Report, *,
                  arrow_cache: str | Path | None = None, num_proc: int = 1) -> Source:
    _check_kind_weight(name, kind, weight)
    root = str(path.parent.resolve())
    records: Sequence[Record]
    if arrow_cache is not None:
        records = Rows(*read_table(path, root, report, cache_dir=arrow_cache, num_proc=num_proc))
    else:
        records = _read_records(path, root, report)
    return Source(name=name, root=root, records=_non_empty(records, name, path, report), kind=kind, weight=weight)


def _read_records(annotation: Path, root: str, report: Report) -> list[Record]:
    out = []
    for line_no, record in read_jsonl(annotation, report, root=root):
        if not isinstance(record.setdefault("meta", {}), dict):
            report.skip("'meta' is not a JSON object", path=annotation, row=line_no, id=str(record.get("id")))
            continue
        out.append(record)
    return out


def _non_empty(records: Sequence[Record], name: str, path: str | Path, report: Report) -> Sequence[Record]:
    if not len(records):
        reasons = ", ".join(f"{k}: {v}" for k, v in report.reasons().most_common(3)) or "the file has no rows"
        raise AdaptError(f"source {name!r} has no usable records ({reasons})", path=path,
                         hint="check the file (the skip report lists each bad row), or leave this source out")
    return records


# -- sample identity (held-out splits live in adapt.data.splits) -------------------------------------

def content_key(record: Record) -> str:
    """What makes two records the same sample (meta ignored): repeats from `repeat_time` and
    duplicate rows share a key, so a held-out record never also appears in training."""
    return json.dumps({k: record.get(k) for k in ("image", "video", "conversations")}, sort_keys=True,
                      ensure_ascii=False)


# -- mixing -----------------------------------------------------------------------------------------

@dataclass
class SourceUsage:
    """What one source contributed; token fields stay None until measured or planned."""

    kind: str
    root: str
    weight: float
    max_tiles: int | None
    available: int
    used: int
    samples: int
    upsample_factor: float = 1.0
    supervised_tokens: int | None = None
    tokens: int | None = None
    tiles: int | None = None
    dropped: int | None = None


class _LazyEntries(Sequence):
    """(record, root) pairs read on access; equal to any sequence of the same pairs. `source_index`
    (one per entry) indexes `names`, the mixture's source names."""

    names: list[str]
    source_index: np.ndarray

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None  # type: ignore[assignment]

    def __len__(self) -> int:
        return len(self.source_index)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return self.entry(int(index))

    def entry(self, index: int) -> tuple[Record, str]:
        raise NotImplementedError


class Entries(_LazyEntries):
    """A mixed mixture's entries: entry i is row `rows[i]` of `sources[source_index[i]]`, tagged with
    `meta.mix_source`. Only the index arrays live in memory; records are read (from Arrow) on access."""

    def __init__(self, sources: list[Source], source_index: np.ndarray, rows: np.ndarray) -> None:
        self.sources, self.names = sources, [s.name for s in sources]
        self.source_index, self.rows = source_index, rows

    def entry(self, index: int) -> tuple[Record, str]:
        source = self.sources[self.source_index[index]]
        record = source.records[int(self.rows[index])]
        return {**record, "meta": {**record.get("meta", {}), "mix_source": source.name}}, source.root

    def tables(self) -> list[Any]:
        """The Arrow tables the entries are read from (whose mapped pages `arrow.MappedPages` releases)."""
        return [s.records.table for s in self.sources if isinstance(s.records, Rows)]

    def keys(self) -> np.ndarray:
        """One int per distinct (source, row): repeats of a drawn record share it."""
        return self.source_index.astype(np.int64) * (int(self.rows.max(initial=0)) + 1) + self.rows


class SavedEntries(_LazyEntries):
    """The entries of a saved `mixture.jsonl`, read line by line on access (line offsets in memory)."""

    def __init__(self, path: Path, offsets: np.ndarray, names: list[str], source_index: np.ndarray,
                 roots: dict[str, str]) -> None:
        self.path, self.offsets, self.names, self.source_index, self.roots = path, offsets, names, source_index, roots
        self._handle: Any = None

    def __getstate__(self) -> dict[str, Any]:  # each dataloader worker opens the file itself
        return {**self.__dict__, "_handle": None}

    def entry(self, index: int) -> tuple[Record, str]:
        if self._handle is None:
            self._handle = open(self.path, "rb")  # noqa: SIM115 - kept open for the reads that follow
        self._handle.seek(int(self.offsets[index]))
        record = json.loads(self._handle.readline())
        return record, self.roots[self.names[self.source_index[index]]]


class SavedTable(_LazyEntries):
    """The entries of a saved `mixture.arrow`, memory-mapped (each rank maps the file the main
    process wrote; nothing is parsed until an entry is read)."""

    def __init__(self, table: Any, names: list[str], source_index: np.ndarray, roots: dict[str, str]) -> None:
        self.table, self.names, self.source_index, self.roots = table, names, source_index, roots
        self._records: Any = None

    def __getstate__(self) -> dict[str, Any]:  # dataloader workers map the file again
        return {**self.__dict__, "_records": None}

    def entry(self, index: int) -> tuple[Record, str]:
        if self._records is None:
            self._records = self.table.data.column("record")
        record = json.loads(self._records[index].as_py())
        return record, self.roots[self.names[self.source_index[index]]]


@dataclass
class Plans:
    """Each entry's `SampleBuilder.plan`, computed once and reused by the manifest, `train()` and a
    resumed run: length -1 marks a dropped entry, its reason in `drops` (entry index -> reason)."""

    length: np.ndarray
    tiles: np.ndarray
    supervised: np.ndarray
    drops: dict[int, str] = field(default_factory=dict)

    @classmethod
    def compute(cls, entries: Sequence[tuple[Record, str]], plan: Plan, progress: Any = None) -> Plans:
        """Plan entry by entry; a drawn record's repeats are planned once. `progress` (a tqdm, the
        planning phase's display) counts the entries."""
        from adapt.data.samples import SampleDropped

        keys = entries.keys() if isinstance(entries, Entries) else None
        values = np.zeros((3, len(entries)), dtype=np.int64)
        drops: dict[int, str] = {}
        done: dict[int, int] = {}
        for i, (record, root) in enumerate(entries):
            if progress is not None:
                progress.update()
            key = int(keys[i]) if keys is not None else None
            if key is not None and key in done:
                values[:, i] = values[:, done[key]]
                if done[key] in drops:
                    drops[i] = drops[done[key]]
                continue
            try:
                planned = plan(record, root)
                values[:, i] = (planned.length, planned.tiles, planned.supervised)
            except SampleDropped as err:
                values[:, i] = (-1, 0, 0)
                drops[i] = str(err)
            if key is not None:
                done[key] = i
        return cls(values[0], values[1], values[2], drops)

    def save(self, path: Path) -> str:
        """Write atomically; returns the file's sha256 (for the manifest)."""
        import io

        buffer = io.BytesIO()
        np.savez(buffer, length=self.length, tiles=self.tiles, supervised=self.supervised,
                 drops=np.array(json.dumps({str(k): v for k, v in self.drops.items()})))
        with atomic_write(path, "wb") as handle:
            handle.write(buffer.getvalue())
        return hashlib.sha256(buffer.getvalue()).hexdigest()

    @classmethod
    def load(cls, path: Path) -> Plans:
        with np.load(path) as data:
            drops = {int(k): v for k, v in json.loads(str(data["drops"])).items()}
            return cls(data["length"], data["tiles"], data["supervised"], drops)


@dataclass
class Mixture:
    """The training mixture: (record, root) entries in their final order, each record tagged with
    `meta.mix_source`, how each source was used, and (once planned) each entry's plan. `entries` is
    a lazy `Entries` / `SavedEntries` view (or, built by hand, a list)."""

    entries: Sequence[tuple[Record, str]]
    sources: dict[str, SourceUsage]
    requested_ratio: float
    mix_by: str
    seed: int
    upsample: bool = False
    total: int | None = None
    notes: list[str] = field(default_factory=list)
    holdout: dict[str, Any] = field(default_factory=dict)  # per source: how held-out records were grouped
    plans: Plans | None = None

    def _count(self, kind: str, attr: str) -> int | None:
        values = [getattr(u, attr) for u in self.sources.values() if u.kind == kind and u.samples]
        return None if any(v is None for v in values) else sum(values)

    @property
    def achieved_ratio(self) -> float:
        """The general share of samples."""
        n_general = self._count("general", "samples") or 0
        return n_general / len(self.entries) if self.entries else 0.0

    @property
    def achieved_token_ratio(self) -> float | None:
        """The general share of supervised tokens (None until measured)."""
        general, domain = self._count("general", "supervised_tokens"), self._count("domain", "supervised_tokens")
        if general is None or domain is None or general + domain == 0:
            return None
        return general / (general + domain)

    def manifest(self, plan: Plan | None = None) -> dict[str, Any]:
        """A JSON-able account of the mixture. With `plan` (e.g. `SampleBuilder.plan`) every entry not
        planned yet is planned once; planned, the per-source tokens, tiles, supervised tokens and drops
        are filled (and kept)."""
        if plan is not None and self.plans is None:
            self.plans = Plans.compute(self.entries, plan)
        if self.plans is not None:
            self._fill_from_plans(self.plans)
        return {
            "version": MANIFEST_VERSION, "mix_by": self.mix_by, "seed": self.seed,
            "requested_ratio": self.requested_ratio, "total": self.total, "upsample": self.upsample,
            "samples": {"domain": self._count("domain", "samples") or 0,
                        "general": self._count("general", "samples") or 0, "total": len(self.entries)},
            "achieved_ratio": {"samples": self.achieved_ratio, "tokens": self.achieved_token_ratio},
            "sources": {name: asdict(usage) for name, usage in self.sources.items()},
            "notes": list(self.notes), "holdout": self.holdout,
        }

    def _fill_from_plans(self, plans: Plans) -> None:
        if isinstance(self.entries, _LazyEntries):
            names, index = self.entries.names, self.entries.source_index
        else:
            names = list(self.sources)
            index = np.array([names.index(r["meta"]["mix_source"]) for r, _ in self.entries], dtype=np.int64)
        kept = plans.length >= 0
        for position, name in enumerate(names):
            mine = index == position
            usage = self.sources[name]
            usage.supervised_tokens = int(plans.supervised[mine & kept].sum())
            usage.tokens = int(plans.length[mine & kept].sum())
            usage.tiles = int(plans.tiles[mine & kept].sum())
            usage.dropped = int((mine & ~kept).sum())

    def summary(self) -> str:
        """Human-readable lines for the CLI and logs."""
        lines = [f"mixture: {len(self.entries)} samples, general share {self.achieved_ratio:.4f} by samples"
                 + (f", {self.achieved_token_ratio:.4f} by supervised tokens" if self.achieved_token_ratio is not None
                    else "") + f" (requested {self.requested_ratio} by {self.mix_by}, seed {self.seed})"]
        for name, usage in self.sources.items():
            lines.append(f"  {usage.kind:7s} {name}: {usage.samples} samples from {usage.available} records"
                         + (f" (upsampled x{usage.upsample_factor:.2f})" if usage.upsample_factor > 1 else ""))
        return "\n".join(lines + [f"  note: {note}" for note in self.notes])

    def save(self, folder: str | Path, plan: Plan | None = None) -> None:
        """Write `mixture.jsonl` (streamed entry by entry), `plans.npz` when planned, then
        `manifest.json` (each atomically); the manifest carries the files' hashes, so a set torn by a
        crash between the writes is refused on load."""
        folder = Path(folder)
        digest = hashlib.sha256()
        import pyarrow as pa

        pages = MappedPages(self.entries.tables() if isinstance(self.entries, Entries) else [])
        position = {name: i for i, name in enumerate(self.sources)}
        schema = pa.schema([("record", pa.string()), ("source", pa.int32())])
        batch: tuple[list[str], list[int]] = ([], [])

        def flush(writer: Any) -> None:
            writer.write_batch(pa.RecordBatch.from_arrays([pa.array(batch[0], pa.string()),
                                                           pa.array(batch[1], pa.int32())], schema=schema))
            batch[0].clear()
            batch[1].clear()

        # mixture.jsonl for people and InternVL's tools; mixture.arrow (the same records, in order)
        # for the trainer: every rank memory-maps it instead of parsing the JSONL
        with atomic_write(folder / "mixture.jsonl") as handle, atomic_write(folder / "mixture.arrow", "wb") as raw, \
                pa.ipc.new_stream(raw, schema) as writer:
            for i, (record, _) in enumerate(self.entries):
                text = json.dumps(record, ensure_ascii=False)
                digest.update((text + "\n").encode("utf-8"))
                handle.write(text + "\n")
                batch[0].append(text)
                batch[1].append(position[record["meta"]["mix_source"]])
                if i % 64 == 63:  # resident memory stays flat however large the mixture
                    pages.release()
                if len(batch[0]) == 4096:
                    flush(writer)
            if batch[0] or not len(self.entries):
                flush(writer)
        pages.release()
        manifest = self.manifest(plan)
        manifest["files"] = {"mixture.jsonl": {"records": len(self.entries), "sha256": digest.hexdigest()},
                             "mixture.arrow": {"sha256": _file_sha256(folder / "mixture.arrow")}}
        if self.plans is not None:
            manifest["files"]["plans.npz"] = {"sha256": self.plans.save(folder / "plans.npz")}
        atomic_write_text(folder / "manifest.json", json.dumps(manifest, indent=2, ensure_ascii=False))

    @classmethod
    def load(cls, folder: str | Path) -> Mixture:
        """The mixture `save` wrote: same entries in the same order (read lazily), roots from the manifest."""
        folder = Path(folder)
        manifest_path, records_path = folder / "manifest.json", folder / "mixture.jsonl"
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
            records_path.stat()  # the missing-file message names it
        except FileNotFoundError as err:
            raise AdaptError("saved mixture is incomplete (missing file)", path=err.filename,
                             hint="re-run the mixing step into this folder") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise AdaptError(f"manifest is not valid JSON ({err})", path=manifest_path) from None
        if not isinstance(manifest, dict) or manifest.get("version") != MANIFEST_VERSION:
            raise AdaptError(f"unsupported mixture manifest (expected version {MANIFEST_VERSION})", path=manifest_path)
        files = manifest.get("files", {})
        try:
            sources = {name: SourceUsage(**usage) for name, usage in manifest["sources"].items()}
            settings = {key: manifest[key] for key in ("requested_ratio", "mix_by", "seed", "upsample", "total",
                                                       "notes")}
            settings["holdout"] = manifest.get("holdout", {})
        except (KeyError, TypeError, AttributeError) as err:
            raise AdaptError(f"mixture manifest is malformed ({err})", path=manifest_path,
                             hint="re-run the mixing step") from None
        names = list(sources)
        if "mixture.arrow" in files:
            entries: _LazyEntries = _saved_table(folder, files, names, sources)
        else:  # saved before mixture.arrow existed: read by line offsets
            entries = _saved_lines(records_path, files, names, sources)
        plans = None
        if "plans.npz" in files:
            plans_path = folder / "plans.npz"
            if not plans_path.is_file() or hashlib.sha256(plans_path.read_bytes()).hexdigest() != \
                    files["plans.npz"].get("sha256"):
                raise AdaptError("plans.npz does not match manifest.json (edited, or a save was interrupted)",
                                 path=plans_path, hint="re-run the mixing step")
            plans = Plans.load(plans_path)
        return cls(entries=entries, sources=sources, plans=plans, **settings)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _saved_table(folder: Path, files: dict[str, Any], names: list[str], sources: dict[str, SourceUsage]) -> SavedTable:
    """The entries of `mixture.arrow`, memory-mapped; both saved files must match the manifest."""
    import datasets

    for name in ("mixture.jsonl", "mixture.arrow"):
        path = folder / name
        if not path.is_file() or _file_sha256(path) != files.get(name, {}).get("sha256"):
            raise AdaptError(f"{name} does not match manifest.json (edited, or a save was interrupted)",
                             path=path, hint="re-run the mixing step; a resumed run needs the exact mixture")
    table = datasets.Dataset.from_file(str(folder / "mixture.arrow"))
    index = table.data.column("source").to_numpy()
    if len(index) != files["mixture.jsonl"].get("records") or (len(index) and not 0 <= index.min() <= index.max() < len(names)):
        raise AdaptError("mixture.arrow does not match manifest.json", path=folder / "mixture.arrow",
                         hint="re-run the mixing step")
    return SavedTable(table, names, index, {name: usage.root for name, usage in sources.items()})


def _saved_lines(records_path: Path, files: dict[str, Any], names: list[str],
                 sources: dict[str, SourceUsage]) -> SavedEntries:
    """The entries of a `mixture.jsonl` without `mixture.arrow`, by line offsets (every line checked)."""
    position = {name: i for i, name in enumerate(names)}
    digest, offsets, index = hashlib.sha256(), array.array("q"), array.array("i")
    unknown: tuple[int, Any] | None = None
    with open(records_path, "rb") as handle:
        offset = 0
        for row, line in enumerate(handle, start=1):  # every row is checked before training on any
            digest.update(line)
            try:
                name = json.loads(line).get("meta", {}).get("mix_source")
            except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
                name = None
            if name not in position and unknown is None:
                unknown = (row, name)
            offsets.append(offset)
            index.append(position.get(name, -1))
            offset += len(line)
    if digest.hexdigest() != files.get("mixture.jsonl", {}).get("sha256"):
        raise AdaptError("mixture.jsonl does not match manifest.json (edited, or a save was interrupted)",
                         path=records_path, hint="re-run the mixing step; a resumed run needs the exact mixture")
    if unknown is not None:
        raise AdaptError(f"record names source {unknown[1]!r}, which the manifest does not list",
                         path=records_path, row=unknown[0], hint="re-run the mixing step")
    return SavedEntries(records_path, np.frombuffer(offsets, dtype=np.int64), names,
                        np.frombuffer(index, dtype=np.int32), {name: usage.root for name, usage in sources.items()})


class _Stream:
    """An endless seeded draw over sources, interleaved by weight so that every prefix splits its
    samples among the sources to within one sample of their weight shares (Tijdeman's chairman
    assignment). Each source yields its records in a seeded random order, with a fresh order per
    pass when it runs out, so an upsampled source repeats every record floor or ceil times."""

    def __init__(self, sources: list[Source], seed: int, salt: str) -> None:
        self.sources, self.seed, self.salt = sources, seed, salt
        total_weight = sum(s.weight for s in sources)
        self.shares = [s.weight / total_weight for s in sources]
        self.counts = [0] * len(sources)
        self.orders: list[np.ndarray] = [np.zeros(0, np.int64) for _ in sources]
        self.picks: list[tuple[int, int]] = []
        self.slack = 1 / (2 * len(sources) - 2) if len(sources) > 1 else 0.0

    def take(self, n: int) -> list[tuple[int, int]]:
        while len(self.picks) < n:
            self._next()
        return self.picks[:n]

    def pick(self, index: int) -> tuple[int, int]:
        while len(self.picks) <= index:
            self._next()
        return self.picks[index]

    def _next(self) -> None:
        step = len(self.picks) + 1
        due = [j for j, share in enumerate(self.shares) if share * step - self.counts[j] >= self.slack - 1e-9]
        i = min(due or range(len(self.shares)),
                key=lambda j: ((self.counts[j] + 1 - self.slack) / self.shares[j], j))
        size = len(self.sources[i].records)
        cycle, position = divmod(self.counts[i], size)
        if position == 0:
            order = list(range(size))
            random.Random(f"adapt.mix:{self.seed}:{self.salt}:{self.sources[i].name}:{cycle}").shuffle(order)
            self.orders[i] = np.array(order, dtype=np.int64)  # 8 bytes a row, not a Python int each
        self.picks.append((i, int(self.orders[i][position])))
        self.counts[i] += 1

    def exhausted_once(self) -> bool:
        return all(c >= len(s.records) for c, s in zip(self.counts, self.sources))


def mix(domain: list[Source], general: list[Source], *, general_ratio: float, mix_by: str = "samples",
        seed: int = 0, upsample: bool = False, measure: Measure | None = None,
        total: int | None = None) -> Mixture:
    """Mix `domain` and `general` sources so the general share is `general_ratio` (r in [0, 1)).

    By samples: every domain record once (or `total` samples overall) and round(r/(1-r) * n_domain)
    general samples, split among general sources by weight. By tokens: general samples are added
    until their share of supervised tokens (`measure(source, row)`) is as close to r as one sample
    allows. A general source too small for its share is repeated only with `upsample=True`.
    The final order is a seeded shuffle; the same inputs and seed give the identical mixture.
    """
    r = _check_ratio(general_ratio)
    if mix_by not in MIX_BY:
        raise AdaptError(f"mix_by must be one of {MIX_BY}, not {mix_by!r}")
    if mix_by == "tokens" and measure is None:
        raise AdaptError("mixing by tokens needs a measure of supervised tokens per record",
                         hint="pass measure=supervised_tokens(builder), or mix by samples")
    if total is not None and (isinstance(total, bool) or not isinstance(total, int) or total < 1):
        raise AdaptError(f"total must be a positive number of samples, not {total!r}")
    _check_sources(domain, general)
    if r > 0 and not general:
        raise AdaptError(f"general_ratio is {r} but no general data was given",
                         hint="pass general instruction data, or set the general ratio to 0 for domain only")
    for source in domain + (general if r > 0 else []):
        if not source.records:
            raise AdaptError(f"{source.kind} source {source.name!r} has no records",
                             hint="check its data, or leave it out")

    tokens_cache: dict[tuple[str, int], int] = {}

    def tokens(sources: list[Source], pick: tuple[int, int]) -> int:
        source, row = sources[pick[0]], pick[1]
        key = (source.name, row)
        if key not in tokens_cache:
            tokens_cache[key] = int(measure(source, row))  # type: ignore[misc]
        return tokens_cache[key]

    domain_stream, general_stream = _Stream(domain, seed, "domain"), _Stream(general, seed, "general")
    every_domain = [(i, j) for i, source in enumerate(domain) for j in range(len(source.records))]
    if mix_by == "samples":
        if total is None:
            domain_picks = every_domain
            n_general = round(r / (1 - r) * len(domain_picks))
        else:
            n_general = round(r * total)
            domain_picks = domain_stream.take(total - n_general)
    elif total is None:
        domain_picks = every_domain
        n_general = _general_count_for_tokens(
            r, sum(tokens(domain, p) for p in domain_picks), general_stream, lambda p: tokens(general, p))
    else:
        domain_picks = domain_stream.take(total)
        general_candidates = general_stream.take(total) if r > 0 else []
        n_general = _best_split(r, total, [tokens(domain, p) for p in domain_picks],
                                [tokens(general, p) for p in general_candidates])
        domain_picks = domain_picks[:total - n_general]
    general_picks = general_stream.take(n_general) if n_general else []

    notes: list[str] = []
    usages = {**_usages(domain, domain_picks, upsample, notes),
              **_usages(general, general_picks, upsample, notes)}
    if measure is not None:
        for sources, picks in ((domain, domain_picks), (general, general_picks)):
            for name in (s.name for s in sources):
                usages[name].supervised_tokens = 0
            for pick in picks:
                usages[sources[pick[0]].name].supervised_tokens += tokens(sources, pick)

    # the final order is a seeded shuffle of the picks (as a list of entries was shuffled before), kept
    # as (source, row) index arrays: records are read when the mixture is saved or trained on
    picks = domain_picks + [(len(domain) + i, j) for i, j in general_picks]
    order = list(range(len(picks)))
    random.Random(f"adapt.mix:{seed}:order").shuffle(order)
    source_index = np.fromiter((picks[k][0] for k in order), dtype=np.int32, count=len(order))
    rows = np.fromiter((picks[k][1] for k in order), dtype=np.int64, count=len(order))
    return Mixture(entries=Entries(domain + general, source_index, rows), sources=usages, requested_ratio=r,
                   mix_by=mix_by, seed=seed, upsample=upsample, total=total, notes=notes)


def supervised_tokens(builder: SampleBuilder) -> Measure:
    """A `measure` for `mix`: supervised tokens from `builder.plan` (0 for a record it would drop).
    `arrow.RowPlanner` is the batched, cached one a run uses."""
    from adapt.data.samples import SampleDropped

    def tokens(record: Record, root: str) -> int:
        try:
            return builder.plan(record, root).supervised
        except SampleDropped:
            return 0

    return by_record(tokens)


def by_record(count: Callable[[Record, str], int]) -> Measure:
    """A `measure` from a count of one (record, image root)."""
    def measure(source: Source, row: int) -> int:
        return count(source.records[row], source.root)

    return measure


def _check_ratio(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise AdaptError(f"general ratio {value!r} must be in [0, 1): it is the general share of the mixture "
                         "(0 = domain only, 0.25 = one general sample in four)",
                         hint="Mini-InternVL found 0.25 best for driving; 1 would leave no domain data")
    return float(value)


def _check_sources(domain: list[Source], general: list[Source]) -> None:
    seen: set[str] = set()
    for expected, sources in (("domain", domain), ("general", general)):
        for source in sources:
            if source.kind != expected:
                raise AdaptError(f"source {source.name!r} is a {source.kind} source but was passed as {expected} data")
            if source.name in seen:
                raise AdaptError(f"two sources are named {source.name!r}; mixture sources need distinct names",
                                 hint="give each dataset its own name")
            seen.add(source.name)
    if not domain:
        raise AdaptError("no domain data to mix", hint="pass at least one domain dataset")


def _general_count_for_tokens(r: float, domain_tokens: int, stream: _Stream,
                              tokens: Callable[[tuple[int, int]], int]) -> int:
    """How many general samples from `stream` bring their supervised-token share closest to r."""
    if r == 0:
        return 0
    if domain_tokens == 0:
        raise AdaptError("the domain samples carry no supervised tokens, so a token ratio is undefined",
                         hint="check the domain data (every answer empty or truncated?), or mix by samples")
    count, general_tokens, share = 0, 0, 0.0
    while True:
        next_tokens = general_tokens + tokens(stream.pick(count))
        next_share = next_tokens / (domain_tokens + next_tokens)
        if next_share >= r:
            return count + 1 if abs(next_share - r) < abs(share - r) else count
        count, general_tokens, share = count + 1, next_tokens, next_share
        if general_tokens == 0 and stream.exhausted_once():
            raise AdaptError("the general samples carry no supervised tokens, so a token ratio cannot be reached",
                             hint="check the general data, or mix by samples")


def _best_split(r: float, total: int, domain_tokens: list[int], general_tokens: list[int]) -> int:
    """The general count (of `total` samples) whose supervised-token share is closest to r."""
    if r == 0:
        return 0
    domain_prefix, general_prefix = [0], [0]
    for value in domain_tokens:
        domain_prefix.append(domain_prefix[-1] + value)
    for value in general_tokens:
        general_prefix.append(general_prefix[-1] + value)
    best, best_gap = None, math.inf
    for n_general in range(total + 1):
        general_sum = general_prefix[n_general]
        whole = domain_prefix[total - n_general] + general_sum
        if whole and abs(general_sum / whole - r) < best_gap:
            best, best_gap = n_general, abs(general_sum / whole - r)
    if best is None:
        raise AdaptError("the candidate samples carry no supervised tokens, so a token ratio is undefined",
                         hint="check the data, or mix by samples")
    return best


def _usages(sources: list[Source], picks: list[tuple[int, int]], upsample: bool,
            notes: list[str]) -> dict[str, SourceUsage]:
    """Per-source counts; refuses (or, with `upsample`, notes) a source needed more often than it has records."""
    counts = [0] * len(sources)
    distinct: list[set[int]] = [set() for _ in sources]
    for i, j in picks:
        counts[i] += 1
        distinct[i].add(j)
    out = {}
    for source, count, used in zip(sources, counts, distinct):
        size = len(source.records)
        factor = count / size if size and count > size else 1.0
        if factor > 1:
            if not upsample:
                fixes = "a smaller total" if source.kind == "domain" else "a lower general ratio"
                raise AdaptError(f"{source.kind} source {source.name!r} has {size} records but the mixture needs "
                                 f"{count} of them (x{factor:.2f})",
                                 hint=f"pass --upsample to repeat it, use {fixes}, or add more data")
            notes.append(f"{source.kind} source {source.name!r}: {size} records upsampled x{factor:.2f} "
                         f"to {count} samples")
        out[source.name] = SourceUsage(kind=source.kind, root=source.root, weight=source.weight,
                                       max_tiles=source.max_tiles, available=size, used=len(used),
                                       samples=count, upsample_factor=round(factor, 4))
    return out
