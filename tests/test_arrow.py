"""Arrow-backed records (adapt.data.arrow): the same sources, skips, splits, mixtures and plans as the
in-memory path, read from cached tables, planned once."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from adapt import api
from adapt.config import RunConfig
from adapt.data import arrow, mixing
from adapt.data.mixing import Mixture, by_record, load_sources, mix
from adapt.data.samples import SampleBuilder, SampleDropped
from adapt.data.splits import split_by_group
from adapt.data.templates import Encoder
from adapt.errors import AdaptError, Report


def _row(i: int, rng: random.Random, images: list[str]) -> dict:
    out = {"id": f"r{i}", "conversations": [{"from": "human", "value": f"Question {i}?"},
                                            {"from": "gpt", "value": " ".join(["word"] * rng.randint(1, 30))}],
           "meta": {"source": "pool"}}
    if images and rng.random() < 0.7:
        out["image"] = rng.choice(images)
    return out


def _images(folder: Path) -> list[str]:
    """Four images of different shapes; b.png has the same bytes as a.png (same content, other name)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, (h, w) in {"a.png": (448, 900), "c.png": (100, 100), "d.png": (900, 300)}.items():
        Image.fromarray(np.full((h, w, 3), len(name) * 40, np.uint8)).save(folder / name)
    (folder / "b.png").write_bytes((folder / "a.png").read_bytes())
    return ["a.png", "b.png", "c.png", "d.png"]


def _write(path: Path, rows: list, *, bad: bool = True) -> None:
    lines = [json.dumps(r).encode() for r in rows]
    if bad:  # today's skip reasons, each with its line: malformed JSON, not UTF-8, invalid record, blank
        escaping = {"id": "up", "image": "../outside.png",
                    "conversations": [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "A."}]}
        lines[3:3] = [b'{"id": "broken"', b"\xff\xfe", json.dumps({"id": "x", "conversations": []}).encode(), b"",
                      json.dumps(escaping).encode(), json.dumps(escaping).encode()]  # twice: a memo answers the 2nd
    path.write_bytes(b"\n".join(lines) + b"\n")


def _skips(report: Report) -> list[tuple]:
    return [(s.reason, str(s.path), s.row, s.id) for s in report.skips]


def test_arrow_sources_match_list_sources(tmp_path):
    rng = random.Random(0)
    images = _images(tmp_path / "a")
    _write(tmp_path / "a" / "a.jsonl", [_row(i, rng, images) for i in range(40)])
    _write(tmp_path / "b.jsonl", [_row(i, rng, []) for i in range(9)], bad=False)
    (tmp_path / "meta.json").write_text(json.dumps({
        "a": {"root": "a", "annotation": "a/a.jsonl", "repeat_time": 1.5, "max_dynamic_patch": 6},
        "b": {"root": ".", "annotation": "b.jsonl", "repeat_time": 0.5}}))
    plain, cached = Report(), Report()
    expected = load_sources(tmp_path / "meta.json", kind="general", weight=2.0, report=plain, seed=3)
    got = load_sources(tmp_path / "meta.json", kind="general", weight=2.0, report=cached, seed=3,
                       arrow_cache=tmp_path / "arrow")
    assert isinstance(got[0].records, arrow.Rows)
    for want, have in zip(expected, got, strict=True):
        assert (have.name, have.root, have.weight, have.max_tiles) == (want.name, want.root, want.weight, want.max_tiles)
        assert list(have.records) == list(want.records)
    assert _skips(cached) == _skips(plain) and len(plain.skips) == 5 and cached.read == plain.read
    assert any("outside" in s[0] or "escapes" in s[0] or ".." in s[0] for s in _skips(plain))
    for source in (expected[0], got[0]):
        mixing.limit_tiles(source, 4)
    assert list(got[0].records) == list(expected[0].records)


def test_sharded_read_keeps_order_and_lines(tmp_path, monkeypatch):
    """A file read in byte ranges by two processes: every row once, in file order, bad rows with their line."""
    monkeypatch.setattr(arrow, "SHARD_BYTES", 700)  # a few rows per range, rows cut across boundaries
    rng = random.Random(2)
    _write(tmp_path / "rows.jsonl", [_row(i, rng, []) for i in range(60)])
    plain, cached = Report(), Report()
    [want] = load_sources(tmp_path / "rows.jsonl", kind="domain", report=plain)
    [have] = load_sources(tmp_path / "rows.jsonl", kind="domain", report=cached, arrow_cache=tmp_path / "arrow",
                          num_proc=2)
    assert (tmp_path / "rows.jsonl").stat().st_size // 700 > 4
    assert list(have.records) == list(want.records) and _skips(cached) == _skips(plain)


@pytest.mark.parametrize("mix_by", ["samples", "tokens"])
def test_mix_same_picks_from_arrow(tmp_path, mix_by):
    rng = random.Random(1)
    for name, n in (("dom", 30), ("gen", 200)):
        _write(tmp_path / f"{name}.jsonl", [_row(i, rng, []) for i in range(n)], bad=False)

    def sources(cache: Path | None) -> tuple[list, list]:
        return tuple(load_sources(tmp_path / f"{name}.jsonl", kind=kind, report=Report(), arrow_cache=cache)
                     for name, kind in (("dom", "domain"), ("gen", "general")))

    def words(record: dict, root: str) -> int:
        return len(record["conversations"][-1]["value"].split())

    plain = mix(*sources(None), general_ratio=0.25, mix_by=mix_by, measure=by_record(words), seed=4)
    cached = mix(*sources(tmp_path / "arrow"), general_ratio=0.25, mix_by=mix_by, measure=by_record(words), seed=4)
    assert len(cached.entries) == len(plain.entries) > 30 and cached.entries == plain.entries
    assert cached.manifest() == plain.manifest()


def _split_view(result):
    train, held, account = result
    return [r["id"] for r in train.records], [r["id"] for r in held.records], account


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from([None, "s1", "s2", "s3"]), st.sampled_from([None, "p1", "p2"]),
                          st.sampled_from([None, 0, 1, 2, 3]), st.integers(0, 6)), min_size=2, max_size=40),
       st.one_of(st.integers(1, 8), st.sampled_from([0.2, 0.5])), st.integers(0, 3))
def test_split_rows_matches_split_by_group(tmp_path_factory, rows, size, seed):
    folder = tmp_path_factory.mktemp("split")
    images = _images(folder)
    records = []
    for i, (scene, patient, image, answer) in enumerate(rows):
        record = {"id": f"r{i}", "conversations": [{"from": "human", "value": "Q?"},
                                                   {"from": "gpt", "value": f"answer {answer}"}],
                  "meta": {k: v for k, v in (("scene_token", scene), ("patient_id", patient)) if v}}
        if image is not None:
            record["image"] = images[image]
        records.append(record)
    _write(folder / "rows.jsonl", records, bad=False)
    plain = load_sources(folder / "rows.jsonl", kind="domain", report=Report())[0]
    cached = load_sources(folder / "rows.jsonl", kind="domain", report=Report(), arrow_cache=folder / "arrow")[0]
    try:
        expected = _split_view(split_by_group(plain, size, seed))
    except AdaptError as err:
        with pytest.raises(AdaptError, match="held-out size"):
            split_by_group(cached, size, seed)
        assert "held-out size" in err.message
        return
    assert _split_view(split_by_group(cached, size, seed)) == expected


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from([None, 0, 2, 3]), st.text(min_size=0, max_size=40),
                          st.integers(1, 60)), min_size=1, max_size=30), st.sampled_from([64, 300, 4096]))
def test_row_planner_matches_plan(tmp_path_factory, tiny_tokenizer, rows, max_length):
    folder = tmp_path_factory.mktemp("plan")
    images = _images(folder)
    records = []
    for i, (image, question, answer) in enumerate(rows):
        record = {"id": f"r{i}", "conversations": [{"from": "human", "value": question or "?"},
                                                   {"from": "gpt", "value": " ".join(["word"] * answer)}]}
        if image is not None:
            record["image"] = images[image]
        records.append(record)
    _write(folder / "rows.jsonl", records, bad=False)
    report = Report()
    [source] = load_sources(folder / "rows.jsonl", kind="domain", report=report, arrow_cache=folder / "arrow")
    if not len(source.records):
        return
    builder = SampleBuilder(Encoder(tiny_tokenizer, "internvl2_5"), max_length=max_length)
    mixture = mix([source], [], general_ratio=0, seed=0)
    plans = arrow.RowPlanner(builder, folder / "arrow").plan_mixture(mixture.entries)
    for i, (record, root) in enumerate(mixture.entries):
        try:
            planned = builder.plan(record, root)
            assert (plans.length[i], plans.tiles[i], plans.supervised[i]) == \
                (planned.length, planned.tiles, planned.supervised)
        except SampleDropped as err:
            assert plans.length[i] == -1 and plans.drops[i] == str(err)


def test_prepare_twice_reuses_tables_and_plans(tmp_path, monkeypatch):
    """The demo run's data step: plans equal SampleBuilder.plan per entry, are saved with the mixture,
    and a second run over the same shared folder reads no JSONL row and plans nothing."""
    config = RunConfig(domain="driving", general_ratio=0.25, num_proc=1)
    domain, train_config, eval_settings = api.resolve(config)
    loaded = api.load_model(config, train_config)
    shared = tmp_path / "shared"
    first = api.prepare_data(config, domain, train_config, eval_settings, tmp_path / "one", loaded, shared_dir=shared)
    builder = api.make_builder(loaded, train_config)
    entries = first.mixture.entries
    assert isinstance(entries, mixing.Entries) and first.mixture.plans is not None
    for i, (record, root) in enumerate(entries):
        try:
            assert builder.plan(record, root).length == first.mixture.plans.length[i]
        except SampleDropped:
            assert first.mixture.plans.length[i] == -1

    def refuse(*args, **kwargs):
        raise AssertionError("read or planned again")

    monkeypatch.setattr(arrow, "_row", refuse)
    monkeypatch.setattr(SampleBuilder, "plan", refuse)
    second = api.prepare_data(config, domain, train_config, eval_settings, tmp_path / "two", loaded, shared_dir=shared)
    assert second.mixture.entries == entries and second.heldout == first.heldout
    assert np.array_equal(second.mixture.plans.length, first.mixture.plans.length)
    for name in ("mixture.jsonl", "manifest.json", "plans.npz"):
        assert (tmp_path / "one/mixture" / name).read_bytes() == (tmp_path / "two/mixture" / name).read_bytes()
    saved = Mixture.load(tmp_path / "two" / "mixture")  # a resumed run: lazy entries, the same plans
    assert saved.entries == entries and np.array_equal(saved.plans.supervised, first.mixture.plans.supervised)
    assert saved.manifest() == second.mixture.manifest()


def test_saved_plans_must_match_manifest(tmp_path):
    records = [{"id": f"r{i}", "conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A."}],
                "meta": {}} for i in range(5)]
    mixture = mix([mixing.Source("d", str(tmp_path), records, "domain")], [], general_ratio=0)
    mixture.plans = mixing.Plans(np.arange(5), np.zeros(5, np.int64), np.ones(5, np.int64), {})
    mixture.save(tmp_path / "mix")
    assert np.array_equal(Mixture.load(tmp_path / "mix").plans.length, np.arange(5))
    (tmp_path / "mix" / "plans.npz").write_bytes(b"torn")
    with pytest.raises(AdaptError, match="plans.npz does not match"):
        Mixture.load(tmp_path / "mix")


_turn_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=0, max_size=30)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.lists(st.tuples(_turn_text, _turn_text), min_size=1, max_size=3)),
                min_size=1, max_size=12), st.sampled_from([16, 48, 2048]))
def test_plan_many_equals_plan(tiny_tokenizer, rows, max_length):
    """One batched tokenizer call gives what `plan` gives record by record (text, drops, truncation)."""
    builder = SampleBuilder(Encoder(tiny_tokenizer, "internvl2_5"), max_length=max_length)
    records = []
    for system, turns in rows:
        convs = [{"from": "system", "value": "Be brief."}] if system else []
        for question, answer in turns:
            convs += [{"from": "human", "value": question or "?"}, {"from": "gpt", "value": answer or "."}]
        records.append({"id": "x", "conversations": convs})
    expected = []
    for record in records:
        try:
            expected.append(builder.plan(record, "/"))
        except SampleDropped as err:
            expected.append(str(err))
    got = [str(p) if isinstance(p, SampleDropped) else p for p in builder.plan_many(records, "/")]
    assert got == expected


REALDATA = Path(__file__).resolve().parents[1].parent / "shared" / "realdata" / "internvl_chat"


def test_real_internvl_meta_reads_the_same_through_arrow(tmp_path, monkeypatch):
    """InternVL's own meta file and annotation excerpt (../shared/realdata, laid out as InternVL runs it:
    paths relative to the working directory) give the same records, roots and skips from Arrow as in memory."""
    if not REALDATA.is_dir():
        pytest.skip(f"{REALDATA} is absent")
    meta = json.loads((REALDATA / "coco_caption.json").read_text())
    spec = next(iter(meta.values()))
    annotation = tmp_path / spec["annotation"]
    annotation.parent.mkdir(parents=True)
    annotation.write_bytes((REALDATA / "coco_karpathy_train_567k.jsonl").read_bytes())
    (tmp_path / "coco_caption.json").write_text(json.dumps(meta))
    monkeypatch.chdir(tmp_path)

    def read(cache: Path | None) -> tuple[list, list]:
        report = Report()
        sources = load_sources("coco_caption.json", kind="general", report=report, arrow_cache=cache)
        return ([(s.name, s.root, s.max_tiles, [dict(r) for r in s.records]) for s in sources],
                [str(skip) for skip in report.skips])

    plain, cached = read(None), read(tmp_path / "arrow")
    assert cached == plain
    assert len(plain[0][0][3]) == sum(1 for line in annotation.read_text().splitlines() if line.strip())


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\n"), max_size=30),
                max_size=25), st.booleans(), st.integers(1, 64))
def test_byte_ranges_cover_every_line_once_with_its_number(tmp_path_factory, lines, trailing, size):
    """Any text file cut into `size`-byte ranges (parallel readers: formatters.general, Arrow tables):
    read range by range, the lines are the file's lines, each once, in order, with its 1-based number
    (blank lines, CR, multi-byte characters and lines longer than a range included)."""
    from adapt.data.records import byte_ranges, numbered_lines

    path = tmp_path_factory.mktemp("ranges") / "rows.jsonl"
    data = "\n".join(lines) + ("\n" if trailing and lines else "")
    path.write_bytes(data.encode("utf-8"))
    spans = byte_ranges(path, size)
    assert spans[0][0] == 0 and spans[-1][1] == len(data.encode("utf-8"))
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    with open(path, "rb") as handle:
        expected = list(enumerate(handle, start=1))
        got = [item for span in spans for item in numbered_lines(handle, span)]
    assert got == expected
