"""Mix domain data with general instruction data, so the model learns the domain without forgetting.

Mini-InternVL found domain-only training is not best (a general share of 0.25 won in their driving
test), and a model trained without general data forgets general skills. The mixture is decided
once, seeded, and saved with a manifest (per source: available, used, repeated, tokens), so a
resumed run trains on exactly the same samples and nobody has to guess what went in.

Ratios are either by samples or by supervised tokens: long general answers (ShareGPT4V captions)
outweigh short domain answers (multiple-choice letters) by far more than their sample count says.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapt.data.records import Record, apply_repeat, read_jsonl, read_meta
from adapt.errors import AdaptError, Report
from adapt.fileio import atomic_write, atomic_write_text

if TYPE_CHECKING:
    from adapt.data.samples import Planned, SampleBuilder

KINDS = ("domain", "general")
MIX_BY = ("samples", "tokens")
MANIFEST_VERSION = 1
Measure = Callable[[Record, str], int]
Plan = Callable[[Record, str], "Planned"]


@dataclass
class Source:
    """One dataset: its records, the folder their image paths resolve in, and its share of its kind."""

    name: str
    root: str
    records: list[Record]
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
                 report: Report, seed: int = 0) -> list[Source]:
    """Sources from a formatter output folder (`records.jsonl` + `meta.json`), an InternVL meta file
    (one Source per entry) or a bare JSONL (its folder is the image root). Bad rows go to `report`."""
    path = Path(path)
    if path.is_dir():
        if (path / "meta.json").is_file():
            return load_sources_from_meta(path / "meta.json", kind=kind, weight=weight, name=name,
                                          report=report, seed=seed)
        if (path / "records.jsonl").is_file():
            return [_jsonl_source(path / "records.jsonl", name or path.name, kind, weight, report)]
        raise AdaptError("folder has neither meta.json nor records.jsonl", path=path,
                         hint="pass a formatter output folder, an InternVL meta .json file or a .jsonl file")
    if not path.is_file():
        raise AdaptError("data source not found", path=path,
                         hint="pass a formatter output folder, an InternVL meta .json file or a .jsonl file")
    if path.suffix == ".jsonl":
        return [_jsonl_source(path, name or path.stem, kind, weight, report)]
    if path.suffix == ".json":
        return load_sources_from_meta(path, kind=kind, weight=weight, name=name, report=report, seed=seed)
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
                           report: Report, seed: int = 0) -> list[Source]:
    """One Source per meta-file entry, `repeat_time` applied (seeded) and `max_dynamic_patch` kept as
    each record's `meta.max_tiles` (a record's own value wins).

    `weight` is the whole file's share; it is split among the entries by their size after
    `repeat_time`, which is how InternVL's concatenated loader weighs them.
    """
    path = Path(path)
    _check_kind_weight(name or str(path), kind, weight)
    specs = read_meta(path)
    loaded: list[tuple[str, str, list[Record], int | None]] = []
    for spec in specs:
        max_tiles = spec.max_dynamic_patch
        records = _read_records(Path(spec.annotation), spec.root, report)
        if max_tiles is not None:
            for record in records:
                record["meta"].setdefault("max_tiles", max_tiles)
        source_name = spec.name if name is None else name if len(specs) == 1 else f"{name}:{spec.name}"
        loaded.append((source_name, str(Path(spec.root).resolve()),
                       _non_empty(apply_repeat(records, spec.repeat_time, seed), source_name, spec.annotation, report),
                       max_tiles))
    size = sum(len(records) for _, _, records, _ in loaded)
    return [Source(name=n, root=root, records=records, kind=kind, max_tiles=max_tiles,
                   weight=weight if len(loaded) == 1 else weight * len(records) / size)
            for n, root, records, max_tiles in loaded]


def limit_tiles(source: Source, max_tiles: int) -> None:
    """A per-source tile budget from the run config: each record's `meta.max_tiles`, which can lower
    the run's max_tiles for this source's images (never raise it)."""
    source.max_tiles = min(source.max_tiles or max_tiles, max_tiles)
    for record in source.records:
        meta = record.setdefault("meta", {})
        meta["max_tiles"] = min(meta.get("max_tiles") or max_tiles, max_tiles)


def _jsonl_source(path: Path, name: str, kind: str, weight: float, report: Report) -> Source:
    _check_kind_weight(name, kind, weight)
    root = str(path.parent.resolve())
    return Source(name=name, root=root, records=_non_empty(_read_records(path, root, report), name, path, report),
                  kind=kind, weight=weight)


def _read_records(annotation: Path, root: str, report: Report) -> list[Record]:
    out = []
    for line_no, record in read_jsonl(annotation, report, root=root):
        if not isinstance(record.setdefault("meta", {}), dict):
            report.skip("'meta' is not a JSON object", path=annotation, row=line_no, id=str(record.get("id")))
            continue
        out.append(record)
    return out


def _non_empty(records: list[Record], name: str, path: str | Path, report: Report) -> list[Record]:
    if not records:
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

@contextlib.contextmanager
def _bulk() -> Iterator[None]:
    """Pause the cyclic GC while building many small dicts (they form no cycles): its repeated full
    scans otherwise make loading a 600k-sample mixture about three times slower."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


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


@dataclass
class Mixture:
    """The training mixture: (record, root) entries in their final order, each record tagged with
    `meta.mix_source`, and how each source was used."""

    entries: list[tuple[Record, str]]
    sources: dict[str, SourceUsage]
    requested_ratio: float
    mix_by: str
    seed: int
    upsample: bool = False
    total: int | None = None
    notes: list[str] = field(default_factory=list)
    holdout: dict[str, Any] = field(default_factory=dict)  # per source: how held-out records were grouped

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
        """A JSON-able account of the mixture. With `plan` (e.g. `SampleBuilder.plan`) every entry is
        planned once and the per-source tokens, tiles, supervised tokens and drops are filled (and kept)."""
        if plan is not None:
            self._fill_from_plan(plan)
        return {
            "version": MANIFEST_VERSION, "mix_by": self.mix_by, "seed": self.seed,
            "requested_ratio": self.requested_ratio, "total": self.total, "upsample": self.upsample,
            "samples": {"domain": self._count("domain", "samples") or 0,
                        "general": self._count("general", "samples") or 0, "total": len(self.entries)},
            "achieved_ratio": {"samples": self.achieved_ratio, "tokens": self.achieved_token_ratio},
            "sources": {name: asdict(usage) for name, usage in self.sources.items()},
            "notes": list(self.notes), "holdout": self.holdout,
        }

    def _fill_from_plan(self, plan: Plan) -> None:
        from adapt.data.samples import SampleDropped

        sums = {name: [0, 0, 0, 0] for name in self.sources}  # supervised, tokens, tiles, dropped
        cache: dict[int, Any] = {}
        for record, root in self.entries:
            if id(record) not in cache:
                try:
                    cache[id(record)] = plan(record, root)
                except SampleDropped:
                    cache[id(record)] = None
            planned, acc = cache[id(record)], sums[record["meta"]["mix_source"]]
            if planned is None:
                acc[3] += 1
            else:
                acc[0] += planned.supervised
                acc[1] += planned.length
                acc[2] += planned.tiles
        for name, (supervised, tokens, tiles, dropped) in sums.items():
            usage = self.sources[name]
            usage.supervised_tokens, usage.tokens, usage.tiles, usage.dropped = supervised, tokens, tiles, dropped

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
        """Write `mixture.jsonl` then `manifest.json` (each atomically); the manifest carries the
        records file's hash, so a pair torn by a crash between the two writes is refused on load."""
        folder = Path(folder)
        digest = hashlib.sha256()
        with atomic_write(folder / "mixture.jsonl") as handle:
            for record, _ in self.entries:
                line = json.dumps(record, ensure_ascii=False) + "\n"
                digest.update(line.encode("utf-8"))
                handle.write(line)
        manifest = self.manifest(plan)
        manifest["files"] = {"mixture.jsonl": {"records": len(self.entries), "sha256": digest.hexdigest()}}
        atomic_write_text(folder / "manifest.json", json.dumps(manifest, indent=2, ensure_ascii=False))

    @classmethod
    def load(cls, folder: str | Path) -> Mixture:
        """The mixture `save` wrote: same entries in the same order, roots from the manifest."""
        folder = Path(folder)
        manifest_path, records_path = folder / "manifest.json", folder / "mixture.jsonl"
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
            raw = records_path.read_bytes()
        except FileNotFoundError as err:
            raise AdaptError("saved mixture is incomplete (missing file)", path=err.filename,
                             hint="re-run the mixing step into this folder") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise AdaptError(f"manifest is not valid JSON ({err})", path=manifest_path) from None
        if not isinstance(manifest, dict) or manifest.get("version") != MANIFEST_VERSION:
            raise AdaptError(f"unsupported mixture manifest (expected version {MANIFEST_VERSION})", path=manifest_path)
        expected = manifest.get("files", {}).get("mixture.jsonl", {})
        if hashlib.sha256(raw).hexdigest() != expected.get("sha256"):
            raise AdaptError("mixture.jsonl does not match manifest.json (edited, or a save was interrupted)",
                             path=records_path, hint="re-run the mixing step; a resumed run needs the exact mixture")
        try:
            sources = {name: SourceUsage(**usage) for name, usage in manifest["sources"].items()}
            settings = {key: manifest[key] for key in ("requested_ratio", "mix_by", "seed", "upsample", "total",
                                                       "notes")}
            settings["holdout"] = manifest.get("holdout", {})
        except (KeyError, TypeError, AttributeError) as err:
            raise AdaptError(f"mixture manifest is malformed ({err})", path=manifest_path,
                             hint="re-run the mixing step") from None
        entries = []
        with _bulk():
            for row, line in enumerate(raw.decode("utf-8").splitlines(), start=1):
                record = json.loads(line)
                name = record.get("meta", {}).get("mix_source")
                if name not in sources:
                    raise AdaptError(f"record names source {name!r}, which the manifest does not list",
                                     path=records_path, row=row, hint="re-run the mixing step")
                entries.append((record, sources[name].root))
        return cls(entries=entries, sources=sources, **settings)


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
        self.orders: list[list[int]] = [[] for _ in sources]
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
            self.orders[i] = order
        self.picks.append((i, self.orders[i][position]))
        self.counts[i] += 1

    def exhausted_once(self) -> bool:
        return all(c >= len(s.records) for c, s in zip(self.counts, self.sources))


def mix(domain: list[Source], general: list[Source], *, general_ratio: float, mix_by: str = "samples",
        seed: int = 0, upsample: bool = False, measure: Measure | None = None,
        total: int | None = None) -> Mixture:
    """Mix `domain` and `general` sources so the general share is `general_ratio` (r in [0, 1)).

    By samples: every domain record once (or `total` samples overall) and round(r/(1-r) * n_domain)
    general samples, split among general sources by weight. By tokens: general samples are added
    until their share of supervised tokens (`measure(record, root)`) is as close to r as one sample
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
        source = sources[pick[0]]
        record = source.records[pick[1]]
        key = (source.name, id(record))
        if key not in tokens_cache:
            tokens_cache[key] = int(measure(record, source.root))  # type: ignore[misc]
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

    tagged: dict[tuple[str, int], Record] = {}
    with _bulk():
        entries = [_entry(sources, pick, tagged) for sources, picks in ((domain, domain_picks), (general, general_picks))
                   for pick in picks]
    random.Random(f"adapt.mix:{seed}:order").shuffle(entries)
    return Mixture(entries=entries, sources=usages, requested_ratio=r, mix_by=mix_by, seed=seed,
                   upsample=upsample, total=total, notes=notes)


def supervised_tokens(builder: SampleBuilder) -> Measure:
    """A `measure` for `mix`: supervised tokens from `builder.plan` (0 for a record it would drop)."""
    from adapt.data.samples import SampleDropped

    def measure(record: Record, root: str) -> int:
        try:
            return builder.plan(record, root).supervised
        except SampleDropped:
            return 0

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


def _entry(sources: list[Source], pick: tuple[int, int], tagged: dict[tuple[str, int], Record]) -> tuple[Record, str]:
    """(record tagged with its source name, root); a record drawn twice shares one tagged copy."""
    source = sources[pick[0]]
    record = source.records[pick[1]]
    key = (source.name, id(record))
    if key not in tagged:
        tagged[key] = {**record, "meta": {**record.get("meta", {}), "mix_source": source.name}}
    return tagged[key], source.root
