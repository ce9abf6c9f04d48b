"""Domain/general mixing: ratios by samples and by supervised tokens, weights, seeds, upsampling,
manifest, save/load, held-out splits and source loading."""

from __future__ import annotations

import json
import math
import random
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from adapt.data.mixing import (
    Mixture,
    SavedEntries,
    SavedTable,
    Source,
    by_record,
    content_key,
    load_source,
    load_sources,
    load_sources_from_meta,
    mix,
    supervised_tokens,
)
from adapt.data.samples import SampleBuilder
from adapt.data.splits import split_by_group
from adapt.data.templates import Encoder
from adapt.errors import AdaptError, Report

RATIOS = [0, 0.125, 0.25, 0.5, 0.75]


def _record(rid: str, answer_words: int) -> dict:
    return {"id": rid, "conversations": [{"from": "human", "value": f"Question {rid}?"},
                                         {"from": "gpt", "value": " ".join(["word"] * answer_words)}],
            "meta": {"source": rid.split("-")[0]}}


def _source(name: str, kind: str, n: int, *, words: tuple[int, int] = (1, 8), weight: float = 1.0) -> Source:
    rng = random.Random(name)
    return Source(name=name, root=f"/data/{name}", kind=kind, weight=weight,
                  records=[_record(f"{name}-{i}", rng.randint(*words)) for i in range(n)])


def words(record: dict, root: str) -> int:
    """A fake supervised-token count: the answer's word count."""
    return len(record["conversations"][-1]["value"].split())


def _domain() -> list[Source]:
    return [_source("drive", "domain", 37), _source("bdd", "domain", 23)]


def _general() -> list[Source]:
    # long general answers, short domain ones: token shares differ strongly from sample shares
    return [_source("sharegpt", "general", 90, words=(10, 40)), _source("chartqa", "general", 60, words=(2, 20), weight=2)]


def _kind_counts(mixture: Mixture) -> tuple[int, int]:
    kinds = Counter(mixture.sources[r["meta"]["mix_source"]].kind for r, _ in mixture.entries)
    return kinds["domain"], kinds["general"]


def _kind_tokens(mixture: Mixture) -> tuple[int, int]:
    totals = Counter()
    for record, root in mixture.entries:
        totals[mixture.sources[record["meta"]["mix_source"]].kind] += words(record, root)
    return totals["domain"], totals["general"]


# -- ratios ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("ratio", RATIOS)
def test_ratio_by_samples_is_the_closest_reachable(ratio):
    mixture = mix(_domain(), _general(), general_ratio=ratio, seed=1, upsample=True)
    n_domain, n_general = _kind_counts(mixture)
    assert n_domain == 60  # every domain record once
    achieved = n_general / (n_domain + n_general)
    assert abs(achieved - ratio) <= 1 / (n_domain + n_general)
    for other in (n_general - 1, n_general + 1):  # one sample more or fewer is never closer
        if other >= 0:
            assert abs(achieved - ratio) <= abs(other / (n_domain + other) - ratio) + 1e-12
    assert mixture.achieved_ratio == pytest.approx(achieved)


@pytest.mark.parametrize("ratio", RATIOS)
def test_ratio_by_tokens_is_within_one_sample(ratio):
    general = _general()
    mixture = mix(_domain(), general, general_ratio=ratio, mix_by="tokens", measure=by_record(words), seed=2, upsample=True)
    domain_tokens, general_tokens = _kind_tokens(mixture)
    assert _kind_counts(mixture)[0] == 60
    ideal = ratio / (1 - ratio) * domain_tokens  # general tokens that give exactly `ratio`
    largest = max(words(r, "") for s in general for r in s.records)
    assert abs(general_tokens - ideal) <= largest
    assert mixture.achieved_token_ratio == pytest.approx(general_tokens / (domain_tokens + general_tokens))
    if ratio:
        by_samples = mix(_domain(), _general(), general_ratio=ratio, seed=2, upsample=True)
        # general answers are ~4x longer, so far fewer general samples reach the same token share
        assert _kind_counts(mixture)[1] < _kind_counts(by_samples)[1] / 2


def test_ratio_by_tokens_with_a_real_sample_builder(tiny_tokenizer):
    builder = SampleBuilder(Encoder(tiny_tokenizer, "internvl2_5"))
    domain, general = [_source("drive", "domain", 12)], [_source("chat", "general", 40, words=(5, 30))]
    mixture = mix(domain, general, general_ratio=0.25, mix_by="tokens", measure=supervised_tokens(builder))
    supervised = Counter()
    for record, root in mixture.entries:
        supervised[mixture.sources[record["meta"]["mix_source"]].kind] += builder.plan(record, root).supervised
    largest = max(builder.plan(r, "/").supervised for r in general[0].records)
    assert abs(supervised["general"] - 0.25 / 0.75 * supervised["domain"]) <= largest
    manifest = mixture.manifest(plan=builder.plan)
    assert manifest["achieved_ratio"]["tokens"] == pytest.approx(
        supervised["general"] / (supervised["general"] + supervised["domain"]))
    assert manifest["sources"]["drive"]["tokens"] > manifest["sources"]["drive"]["supervised_tokens"] > 0
    assert manifest["sources"]["drive"]["tiles"] == 0  # text-only


@pytest.mark.parametrize("mix_by", ["samples", "tokens"])
def test_total_fixes_the_sample_count(mix_by):
    mixture = mix(_domain(), _general(), general_ratio=0.25, mix_by=mix_by, measure=by_record(words), total=50, seed=3)
    n_domain, n_general = _kind_counts(mixture)
    assert n_domain + n_general == 50
    if mix_by == "samples":
        assert abs(n_general - 0.25 * 50) <= 0.5
    else:
        domain_tokens, general_tokens = _kind_tokens(mixture)
        # (1-r)G - rD is 0 at the exact ratio; swapping one domain sample (<= 8 words) for a general
        # one (<= 40 words) moves it by at most (1-r)*40 + r*8, so the best split lies that close
        assert abs(0.75 * general_tokens - 0.25 * domain_tokens) <= 0.75 * 40 + 0.25 * 8
        assert n_general < 0.25 * 50  # long general answers: fewer samples than by count


def test_general_weights_are_respected():
    general = [_source("a", "general", 300, weight=1), _source("b", "general", 300, weight=3),
               _source("c", "general", 300, weight=0.5)]
    for n_domain in (10, 41, 100):
        mixture = mix([_source("d", "domain", n_domain)], general, general_ratio=0.75, seed=4)
        n_general = _kind_counts(mixture)[1]
        used = Counter(r["meta"]["mix_source"] for r, _ in mixture.entries)
        for source in general:
            quota = source.weight / 4.5 * n_general
            assert abs(used[source.name] - quota) < 1, (source.name, used, quota)


# -- seeds ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("mix_by", ["samples", "tokens"])
def test_seed_reproducible_and_different_seed_reorders(mix_by):
    def run(seed):
        return mix(_domain(), _general(), general_ratio=0.5, mix_by=mix_by, measure=by_record(words), seed=seed, upsample=True)

    first, again, other = run(7), run(7), run(8)
    assert [(r["id"], root) for r, root in first.entries] == [(r["id"], root) for r, root in again.entries]
    assert first.entries == again.entries
    assert [r["id"] for r, _ in first.entries] != [r["id"] for r, _ in other.entries]
    # the order interleaves kinds rather than appending general after domain
    kinds = [first.sources[r["meta"]["mix_source"]].kind for r, _ in first.entries]
    assert "general" in kinds[: len(kinds) // 3] and "domain" in kinds[-len(kinds) // 3:]


# -- upsampling and refusals ---------------------------------------------------------------------

def test_small_general_source_needs_explicit_upsampling():
    domain, general = [_source("d", "domain", 40)], [_source("tiny", "general", 7)]
    with pytest.raises(AdaptError) as err:
        mix(domain, general, general_ratio=0.5)
    text = str(err.value)
    assert "'tiny'" in text and "7 records" in text and "needs 40" in text and "--upsample" in text
    assert "ratio" in text and "more data" in text

    mixture = mix(domain, general, general_ratio=0.5, upsample=True)
    usage = mixture.sources["tiny"]
    assert (usage.available, usage.used, usage.samples) == (7, 7, 40)
    assert usage.upsample_factor == pytest.approx(40 / 7, abs=1e-4)
    assert any("tiny" in note and "upsampled" in note for note in mixture.notes)
    assert "upsampled" in mixture.summary()
    repeats = Counter(r["id"] for r, _ in mixture.entries if r["meta"]["mix_source"] == "tiny")
    assert set(repeats.values()) <= {40 // 7, 40 // 7 + 1}  # balanced: floor or ceil each


def test_by_tokens_also_refuses_without_upsampling():
    with pytest.raises(AdaptError, match="--upsample"):
        mix([_source("d", "domain", 40, words=(20, 30))], [_source("tiny", "general", 5)],
            general_ratio=0.5, mix_by="tokens", measure=by_record(words))


@pytest.mark.parametrize("ratio", [-0.1, 1, 1.0, 1.5, math.nan, "0.25", True])
def test_ratio_outside_range_rejected(ratio):
    with pytest.raises(AdaptError, match=r"\[0, 1\)"):
        mix(_domain(), _general(), general_ratio=ratio)


def test_empty_general_pool_rejected_but_domain_only_allowed():
    with pytest.raises(AdaptError, match="no general data"):
        mix(_domain(), [], general_ratio=0.25)
    with pytest.raises(AdaptError, match="'empty' has no records"):
        mix(_domain(), [Source("empty", "/x", [], "general")], general_ratio=0.25)
    mixture = mix(_domain(), [], general_ratio=0)
    assert _kind_counts(mixture) == (60, 0) and mixture.achieved_ratio == 0


def test_other_misuse_rejected():
    with pytest.raises(AdaptError, match="measure"):
        mix(_domain(), _general(), general_ratio=0.25, mix_by="tokens")
    with pytest.raises(AdaptError, match="mix_by"):
        mix(_domain(), _general(), general_ratio=0.25, mix_by="bytes")
    with pytest.raises(AdaptError, match="passed as domain"):
        mix(_general(), _general(), general_ratio=0.25)
    with pytest.raises(AdaptError, match="distinct names"):
        mix(_domain() + [_source("drive", "domain", 3)], _general(), general_ratio=0.25)
    with pytest.raises(AdaptError, match="weight"):
        _source("x", "general", 3, weight=0)


# -- manifest and persistence --------------------------------------------------------------------

def test_manifest_counts():
    domain, general = _domain(), _general()
    mixture = mix(domain, general, general_ratio=0.25, seed=5, measure=by_record(words))
    manifest = mixture.manifest()
    json.dumps(manifest)  # JSON-able
    n_general = round(0.25 / 0.75 * 60)
    assert manifest["samples"] == {"domain": 60, "general": n_general, "total": 60 + n_general}
    assert manifest["requested_ratio"] == 0.25 and manifest["seed"] == 5 and manifest["mix_by"] == "samples"
    assert manifest["achieved_ratio"]["samples"] == pytest.approx(n_general / (60 + n_general))
    for source in domain + general:
        entry = manifest["sources"][source.name]
        mine = [r for r, _ in mixture.entries if r["meta"]["mix_source"] == source.name]
        assert entry["kind"] == source.kind and entry["root"] == source.root and entry["weight"] == source.weight
        assert entry["available"] == len(source.records)
        assert entry["samples"] == len(mine) and entry["used"] == len({r["id"] for r in mine})
        assert entry["supervised_tokens"] == sum(words(r, "") for r in mine)
        assert entry["upsample_factor"] == 1.0
    assert sum(s["samples"] for s in manifest["sources"].values()) == len(mixture.entries)
    domain_tokens, general_tokens = _kind_tokens(mixture)
    assert manifest["achieved_ratio"]["tokens"] == pytest.approx(general_tokens / (domain_tokens + general_tokens))
    # records keep their own meta and gain the source name; the inputs are left untouched
    record = mixture.entries[0][0]
    assert record["meta"]["source"] == record["id"].split("-")[0]
    assert all("mix_source" not in r["meta"] for s in domain + general for r in s.records)


def test_manifest_plan_fills_tiles(tmp_path, tiny_tokenizer):
    Image.fromarray(np.zeros((448, 900, 3), np.uint8)).save(tmp_path / "wide.png")
    with_image = {"id": "img", "image": "wide.png",
                  "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "Dark."}]}
    domain = [Source("cam", str(tmp_path), [with_image, _record("cam-1", 3)], "domain")]
    builder = SampleBuilder(Encoder(tiny_tokenizer, "internvl2_5"))
    manifest = mix(domain, [], general_ratio=0).manifest(plan=builder.plan)
    expected_tiles = builder.plan(with_image, str(tmp_path)).tiles
    assert expected_tiles > 1  # a 2:1 image becomes several tiles plus a thumbnail
    assert manifest["sources"]["cam"]["tiles"] == expected_tiles
    assert manifest["sources"]["cam"]["dropped"] == 0


def test_save_load_round_trip(tmp_path):
    mixture = mix(_domain(), [_source("tiny", "general", 7)], general_ratio=0.5, seed=6, upsample=True,
                  measure=by_record(words))
    mixture.save(tmp_path / "mix")
    loaded = Mixture.load(tmp_path / "mix")
    assert loaded.entries == mixture.entries
    assert loaded.manifest() == mixture.manifest()
    assert {root for _, root in loaded.entries} == {"/data/drive", "/data/bdd", "/data/tiny"}
    lines = (tmp_path / "mix" / "mixture.jsonl").read_text().splitlines()
    assert all(json.loads(line)["meta"]["mix_source"] in mixture.sources for line in lines)
    assert not any("/data/" in line for line in lines)  # roots live in the manifest only

    assert isinstance(loaded.entries, SavedTable)  # every rank maps mixture.arrow, parses no JSONL
    arrow_file = tmp_path / "mix" / "mixture.arrow"
    saved_arrow = arrow_file.read_bytes()
    arrow_file.write_bytes(saved_arrow[:-8])
    with pytest.raises(AdaptError, match="mixture.arrow does not match"):
        Mixture.load(tmp_path / "mix")
    arrow_file.write_bytes(saved_arrow)

    manifest = json.loads((tmp_path / "mix" / "manifest.json").read_text())  # saved before mixture.arrow
    del manifest["files"]["mixture.arrow"]
    (tmp_path / "mix" / "manifest.json").write_text(json.dumps(manifest))
    older = Mixture.load(tmp_path / "mix")
    assert isinstance(older.entries, SavedEntries) and older.entries == mixture.entries

    path = tmp_path / "mix" / "mixture.jsonl"
    path.write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(AdaptError, match="does not match"):
        Mixture.load(tmp_path / "mix")
    with pytest.raises(AdaptError, match="incomplete"):
        Mixture.load(tmp_path / "nowhere")


# -- held-out splits -----------------------------------------------------------------------------

def test_holdout_disjoint_seeded_and_leak_free():
    base = _source("drive", "domain", 50)
    source = Source(base.name, base.root, base.records + base.records[:10], "domain")  # 10 repeated rows
    train, heldout, account = split_by_group(source, 12, seed=0)
    assert len(heldout.records) == 12 and account["grouping"] == {"sample": 50}
    assert not {content_key(r) for r in train.records} & {content_key(r) for r in heldout.records}
    assert len(train.records) + sum(1 + (r in base.records[:10]) for r in heldout.records) == 60
    assert heldout.kind == train.kind == "domain" and heldout.root == source.root

    again = split_by_group(source, 12, seed=0)[1]
    other = split_by_group(source, 12, seed=1)[1]
    assert [r["id"] for r in again.records] == [r["id"] for r in heldout.records]
    assert {r["id"] for r in other.records} != {r["id"] for r in heldout.records}

    assert len(split_by_group(source, 0.1, seed=0)[1].records) == 5  # 10% of 50 distinct records
    for bad in (51, -1, 1.0, 0.0, "3"):
        with pytest.raises(AdaptError):
            split_by_group(source, bad, seed=0)


def test_holdout_grouped_by_image():
    records = [dict(_record(f"q-{i}", 2), image=f"frame{i // 3}.jpg") for i in range(30)]  # 3 questions per frame
    train, heldout, account = split_by_group(Source("qa", "/x", records, "domain"), 12, seed=0)
    assert len(heldout.records) == 12 and account["heldout_groups"] == {"image": 4}
    assert not {r["image"] for r in train.records} & {r["image"] for r in heldout.records}


# -- loading -------------------------------------------------------------------------------------

def _write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))


def test_meta_file_repeat_time_and_max_dynamic_patch(tmp_path):
    _write_jsonl(tmp_path / "a" / "ann.jsonl", [_record(f"a-{i}", 2) for i in range(10)])
    rows_b = [_record(f"b-{i}", 2) for i in range(8)]
    rows_b[0]["meta"]["max_tiles"] = 2  # a record's own limit wins
    _write_jsonl(tmp_path / "b" / "ann.jsonl", rows_b + ["{broken"])
    meta = {"a": {"root": "a", "annotation": "a/ann.jsonl", "repeat_time": 2, "max_dynamic_patch": 6},
            "b": {"root": "b", "annotation": "b/ann.jsonl", "repeat_time": 0.5}}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    report = Report()
    a, b = load_sources_from_meta(tmp_path / "meta.json", kind="general", weight=3.0, report=report)
    assert (a.name, len(a.records), a.max_tiles, a.root) == ("a", 20, 6, str((tmp_path / "a").resolve()))
    assert (b.name, len(b.records), b.max_tiles) == ("b", 4, None)
    assert all(r["meta"]["max_tiles"] == 6 for r in a.records)
    assert all("max_tiles" not in r["meta"] or r["id"] == "b-0" for r in b.records)
    assert len({r["id"] for r in b.records}) == 4  # the fraction is a subset, not repeats
    assert a.weight == pytest.approx(3.0 * 20 / 24) and b.weight == pytest.approx(3.0 * 4 / 24)
    assert report.skipped == 1 and "malformed JSON" in report.skips[0].reason
    with pytest.raises(AdaptError, match="lists 2 datasets"):
        load_source(tmp_path / "meta.json", kind="general", report=Report())
    assert [s.name for s in load_sources(tmp_path / "meta.json", kind="general", name="gen", report=Report())] \
        == ["gen:a", "gen:b"]


def test_formatter_folder_and_bare_jsonl(tmp_path):
    out = tmp_path / "drivelm"
    _write_jsonl(out / "records.jsonl", [_record(f"d-{i}", 2) for i in range(5)])
    meta = {"drivelm": {"root": ".", "annotation": "records.jsonl", "repeat_time": 1, "max_dynamic_patch": 12}}
    (out / "meta.json").write_text(json.dumps(meta))
    source = load_source(out, kind="domain", report=Report())
    assert (source.name, len(source.records), source.root, source.max_tiles) == \
        ("drivelm", 5, str(out.resolve()), 12)
    assert load_source(out, name="drive", kind="domain", report=Report()).name == "drive"

    bare = tmp_path / "extra" / "chat.jsonl"
    _write_jsonl(bare, [_record(f"c-{i}", 2) for i in range(3)] + [{"id": "bad", "conversations": []}])
    report = Report()
    source = load_source(bare, kind="general", weight=2, report=report)
    assert (source.name, len(source.records), source.root, source.weight) == ("chat", 3, str(bare.parent.resolve()), 2)
    assert report.skipped == 1

    with pytest.raises(AdaptError, match="no usable records"):
        _write_jsonl(tmp_path / "bad.jsonl", ["not json"])
        load_source(tmp_path / "bad.jsonl", kind="general", report=Report())
    with pytest.raises(AdaptError, match="not found"):
        load_source(tmp_path / "missing.jsonl", kind="general", report=Report())
    with pytest.raises(AdaptError, match="kind"):
        load_source(bare, kind="medical", report=Report())
