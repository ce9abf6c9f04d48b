"""The filter step (adapt/data/filtering.py): each rule removes what it should and keeps what it
should, in English and other scripts; counts, examples and the manifest say what went and why."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from adapt.data.filtering import (
    DataFilter,
    FilterConfig,
    KeySet,
    ModelScorer,
    filter_files,
    normalize_text,
    record_in_manifest,
    repetition,
)
from adapt.data.images import difference_hash
from adapt.data.mixing import Source, load_sources
from adapt.data.records import write_jsonl
from adapt.errors import AdaptError, Report

REALDATA = Path(__file__).resolve().parents[2] / "shared" / "realdata"


def rec(question: str, answer: str, image: str | None = "a.jpg", *, id: str = "r", **meta) -> dict:
    out = {"id": id, "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}],
           "meta": dict(meta)}
    if image is not None:
        out["image"] = image
        out["conversations"][0]["value"] = "<image>\n" + question
    return out


def scene(seed: int, size: tuple[int, int] = (320, 240)) -> Image.Image:
    """A smooth random picture (blurred noise): distinct seeds give distinct dHashes."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    scene(1).save(tmp_path / "a.jpg", quality=95)
    scene(1).save(tmp_path / "a_copy.jpg", quality=95)  # the same bytes under another name
    scene(1).save(tmp_path / "a_reencoded.jpg", quality=60)  # a near duplicate
    scene(2).save(tmp_path / "b.jpg", quality=95)
    scene(3, (30, 900)).save(tmp_path / "thin.png")
    scene(4, (16, 16)).save(tmp_path / "tiny.png")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    return tmp_path


def run_filter(records: list[dict], root: Path, config: FilterConfig | None = None, name: str = "src") -> DataFilter:
    data_filter = DataFilter(config or FilterConfig())
    data_filter.kept = [r for r in records if data_filter.check(r, str(root), name)]
    return data_filter


def removed(data_filter: DataFilter, source: str = "src") -> dict:
    return dict(data_filter.report.removed.get(source, {}))


# -- normalisation and perceptual hash -------------------------------------------------------------

def test_normalize_text_nfkc_casefold_whitespace():
    assert normalize_text("  Ｓtraße\u00a0 IS\n\tＣＬＯＳＥＤ ") == "strasse is closed"
    assert normalize_text("ﾃﾞｰﾀ") == normalize_text("データ")  # half-width katakana -> full width (NFKC)


@given(st.text())
def test_normalize_text_is_idempotent(text):
    assert normalize_text(normalize_text(text)) == normalize_text(text)


def reference_dhash(image: Image.Image) -> int:
    """imagehash.dhash as published: grey, LANCZOS to 9x8, left < right, bits row-major."""
    pixels = np.asarray(image.convert("L").resize((9, 8), Image.Resampling.LANCZOS))
    bits = "".join("1" if b else "0" for b in (pixels[:, 1:] > pixels[:, :-1]).flatten())
    return int(bits, 2)


def test_difference_hash_matches_the_published_definition(root):
    png = io.BytesIO()
    scene(7).save(png, format="PNG")
    assert difference_hash(png.getvalue())[0] == reference_dhash(scene(7))  # no JPEG draft: exact
    big = io.BytesIO()
    scene(8, (1600, 900)).save(big, format="JPEG", quality=90)
    ours, width, height = difference_hash(big.getvalue())
    assert (width, height) == (1600, 900)
    assert (ours ^ reference_dhash(Image.open(big))).bit_count() <= 3  # decoded at 1/8 scale: a few bits at most
    near = difference_hash((root / "a_reencoded.jpg").read_bytes())[0]
    assert (difference_hash((root / "a.jpg").read_bytes())[0] ^ near).bit_count() <= 3
    far = difference_hash((root / "b.jpg").read_bytes())[0]
    assert (near ^ far).bit_count() > 10


# -- rule 1: duplicates ------------------------------------------------------------------------------

def test_exact_and_normalised_duplicates_within_a_source(root):
    records = [rec("What is on the road?", "A red car.", id="1"),
               rec("what  is on the ROAD?", "a red car.", id="2"),           # case and whitespace
               rec("Ｗｈａｔ is on the road?", "A red car.", id="3"),           # full-width letters (NFKC)
               {**rec("What is on the road?", "A red car.", id="4"),        # placeholder after the question
                "conversations": [{"from": "human", "value": "What is on the road?\n<image>"},
                                  {"from": "gpt", "value": "A red car."}]},
               rec("What is on the road?", "A red car.", "a_copy.jpg", id="5"),  # same bytes, other name
               rec("What is on the road?", "A blue car.", id="6"),          # another answer: kept
               rec("What is on the road?", "A red car.", "b.jpg", id="7"),  # another image: kept
               rec("道路上有什么？", "一辆红色的汽车。", id="8"),
               rec("道路上有什么？ ", "一辆红色的汽车。", id="9")]               # Chinese, trailing space
    data_filter = run_filter(records, root)
    assert [r["id"] for r in data_filter.kept] == ["1", "6", "7", "8"]
    assert removed(data_filter) == {"duplicate": 5}


def test_near_duplicate_images_by_perceptual_hash(root):
    records = [rec("Describe the scene.", "A street.", "a.jpg", id="1"),
               rec("Describe the scene.", "A street.", "a_reencoded.jpg", id="2")]
    assert [r["id"] for r in run_filter(records, root).kept] == ["1"]
    exact_only = run_filter(records, root, FilterConfig(perceptual=False))
    assert [r["id"] for r in exact_only.kept] == ["1", "2"]


def test_duplicates_across_sources_and_against_heldout(root):
    data_filter = DataFilter(FilterConfig())
    data_filter.add_heldout([(rec("Is it raining?", "No.", id="h"), str(root))])
    first = Source("first", str(root), [rec("Any cars?", "Yes.", id="1"), rec("is it raining?", "no.", id="2")],
                   "domain")
    second = Source("second", str(root), [rec("Any  cars?", "Yes.", id="3"), rec("Any trucks?", "No.", id="4")],
                    "general")
    kept = data_filter.apply([first, second])
    assert [[r["id"] for r in s.records] for s in kept] == [["1"], ["4"]]
    report = data_filter.report.to_dict()
    assert report["sources"]["first"]["removed"] == {"duplicate_heldout": 1}
    assert report["sources"]["second"]["removed"] == {"duplicate": 1}
    assert report["sources"]["second"]["read"] == 2 and report["sources"]["second"]["kept"] == 1


def test_repeat_time_copies_are_not_duplicates(root):
    record = rec("Any cars?", "Yes.")
    kept = DataFilter().apply([Source("s", str(root), [record, record, record], "domain")])
    assert len(kept[0].records) == 3


def test_dedup_switch(root):
    records = [rec("Q?", "A.", id="1"), rec("Q?", "A.", id="2")]
    assert len(run_filter(records, root, FilterConfig(dedup=False)).kept) == 2


# -- rule 2: repetition --------------------------------------------------------------------------

LOOPING = [
    "The car is parked on the left side of the road. " * 6,
    "The image shows a chest X-ray. There is no sign of pneumonia. There is no sign of pneumonia. "
    "There is no sign of pneumonia. There is no sign of pneumonia. There is no sign of pneumonia.",
    "The building is very very very very very very very very very very tall",
    "这是一辆白色的汽车。" * 8,
    "Das Auto fährt nach links, und dann fährt es nach links, und dann fährt es nach links, "
    "und dann fährt es nach links, und dann fährt es nach links.",
    "Objects:\n- car\n- car\n- car\n- car",
    "1. Pedestrian\n2. Pedestrian crossing\n" + "3. Pedestrian crossing the road the road the road the road\n" * 2,
]
NORMAL = [
    "1. Check the left mirror.\n2. Check the right mirror.\n3. Check the blind spot.\n4. Signal left.\n"
    "5. Check the left mirror again.\n6. Turn left slowly.",
    "There are three cars: a red car on the left, a blue car in the middle and a white car on the right.",
    "The lesion is in the left lung. The right lung is clear. The heart is normal in size. The bones are intact.",
    "图中有三辆车：左边是一辆红色的车，中间是一辆蓝色的车，右边是一辆白色的车。",
    "Step 1: find the car. Step 2: find the truck. Step 3: find the bus. Step 4: find the bicycle. "
    "Step 5: find the pedestrian.",
    "- Car: yes\n- Truck: no\n- Bus: no\n- Pedestrian: yes",
    "يوجد في الصورة سيارة حمراء وشاحنة زرقاء على الطريق السريع.",
    "yes",
]


@pytest.mark.parametrize("answer", LOOPING)
def test_looping_answers_are_caught(answer):
    assert repetition(answer, FilterConfig()) is not None


@pytest.mark.parametrize("answer", NORMAL)
def test_normal_answers_and_lists_are_kept(answer):
    assert repetition(answer, FilterConfig()) is None


WORDS = ["car", "truck", "bus", "road", "lane", "sign", "light", "left", "right", "ahead", "stop", "slow"]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(WORDS), min_size=2, max_size=8), st.integers(4, 10))
def test_any_phrase_looped_four_times_is_caught(phrase, times):
    assert repetition(" ".join(phrase * times), FilterConfig()) is not None


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(st.characters(categories=["Ll"]), min_size=3, max_size=8), min_size=2, max_size=12,
                unique_by=normalize_text))
def test_numbered_lists_of_distinct_items_are_kept(items):
    answer = "\n".join(f"{i}. The object is a {item}." for i, item in enumerate(items, 1))
    assert repetition(answer, FilterConfig()) is None


def test_repetition_switch_and_counts(root):
    records = [rec("Describe.", LOOPING[0], id="1"), rec("Describe it.", NORMAL[0], id="2")]
    assert removed(run_filter(records, root)) == {"repetition": 1}
    assert len(run_filter(records, root, FilterConfig(repetition=False)).kept) == 2


# -- rule 3: heuristics ----------------------------------------------------------------------------

@pytest.mark.parametrize(("record", "rule"), [
    (rec("What is this?", "   "), "empty_answer"),
    (rec("What is this?", "<br/>"), "markup_only"),
    (rec("What is this?", "**  --  **"), "markup_only"),
    (rec("", "A car."), "no_question_text"),
    (rec("Image-1: ", "A car."), "no_question_text"),
    (rec("What is this?", "A car.", "tiny.png"), "small_image"),
    (rec("What is this?", "A car.", "thin.png"), "aspect_ratio"),
    (rec("What is this?", "A car.", "broken.jpg"), "unreadable_image"),
    (rec("What is this?", "A car.", "missing.jpg"), "unreadable_image"),
    (rec("Where is the car?", "<ref>car</ref><box>[[10, 20, 5, 40]]</box>", task="grounding"), "bad_box"),
    (rec("Where is the car?", "<ref>car</ref><box>[[10, 20, 500, 1400]]</box>", task="grounding"), "bad_box"),
    (rec("Where is the car?", "It is on the left.", task="grounding"), "bad_box"),
    (rec("Where is the car?", "<ref>car</ref><box>left</box>"), "bad_box"),
    (rec("Which?\nA. desert\nB. forest\nC. river\nAnswer with the letter.", "D"), "not_a_choice"),
    (rec("Which?\nA. desert\nB. forest", "B. desert"), "not_a_choice"),
    (rec("Which class?", "lake", choices=["desert", "forest"]), "not_a_choice"),
])
def test_heuristic_removals(root, record, rule):
    data_filter = run_filter([record], root)
    assert data_filter.kept == []
    assert removed(data_filter) == {rule: 1}
    assert data_filter.report.examples[rule][0]["detail"]


@pytest.mark.parametrize("record", [
    rec("What is this?", "A car."),
    rec("これは何ですか？", "車です。"),
    rec("ما هذا؟", "سيارة."),
    rec("Where is the car?", "<ref>car</ref><box>[[10, 20, 500, 400]]</box>", task="grounding"),
    rec("Which?\nA. desert\nB. forest\nC. river", "B"),
    rec("Which?\nA. desert\nB. forest\nC. river", "B. forest"),
    rec("Which?\n(A) desert\n(B) forest", "forest"),
    rec("Which class?", "Forest", choices=["desert", "forest"]),
    rec("Tell me a story about letters.", "A. Once upon a time."),  # not a multiple-choice question
    rec("Summarise the report.", "Normal study.", None),           # text-only
])
def test_heuristics_keep_good_samples(root, record):
    assert run_filter([record], root).kept == [record]


def test_heuristics_switch(root):
    assert len(run_filter([rec("What is this?", "<br/>")], root, FilterConfig(heuristics=False)).kept) == 1


# -- rule 5: contamination ---------------------------------------------------------------------------

def test_contamination_reported_and_optionally_removed(root, tmp_path):
    eval_set = tmp_path / "eval.jsonl"
    write_jsonl(eval_set, [rec("Is the road wet?", "Yes.", "b.jpg", id="e1"),
                           rec("Is there a stop sign?", "No.", "a.jpg", id="e2")])
    training = [rec("How many lanes?", "Two.", "b.jpg", id="1"),                    # an evaluation image
                rec("is there a  stop sign?", "no.", "a_reencoded.jpg", id="2"),  # its Q/A (near image)
                rec("How many lanes?", "Three.", None, id="3")]                 # clean
    config = FilterConfig(contamination=[str(eval_set)])
    data_filter = DataFilter(config)
    assert data_filter.load_evaluation(config.contamination) == 2
    kept = data_filter.apply([Source("train", str(root), training, "domain")])
    assert len(kept[0].records) == 3  # reported only, by default
    assert data_filter.report.to_dict()["sources"]["train"]["contaminated"] == 2
    strict = DataFilter(FilterConfig(contamination=[str(eval_set)], remove_contaminated=True))
    strict.load_evaluation([eval_set])
    kept = strict.apply([Source("train", str(root), training, "domain")])
    assert [r["id"] for r in kept[0].records] == ["3"]
    assert strict.report.to_dict()["removed"] == {"contaminated": 2}


def test_contamination_against_an_internvl_meta_file(root, tmp_path):
    write_jsonl(tmp_path / "bench.jsonl", [rec("What colour is the car?", "Red.", "a.jpg")])
    (tmp_path / "meta.json").write_text(json.dumps({"bench": {"root": str(root), "annotation": "bench.jsonl"}}))
    data_filter = DataFilter(FilterConfig(remove_contaminated=True))
    data_filter.load_evaluation([tmp_path / "meta.json"])
    assert not data_filter.check(rec("Anything here?", "A car.", "a_copy.jpg"), str(root), "train")


# -- reports, config, files ------------------------------------------------------------------------

def test_examples_are_capped_per_rule_and_source(root):
    records = [rec(f"Question {i}?", "", id=str(i)) for i in range(9)]
    data_filter = run_filter(records, root, FilterConfig(examples=3))
    assert removed(data_filter) == {"empty_answer": 9}
    assert [e["id"] for e in data_filter.report.examples["empty_answer"]] == ["0", "1", "2"]


def test_config_refuses_unknown_and_mistyped_settings():
    with pytest.raises(AdaptError, match="unknown filter setting"):
        FilterConfig.from_dict({"dedupe": True})
    with pytest.raises(AdaptError, match="max_ngram_share"):
        FilterConfig.from_dict({"max_ngram_share": "half"})
    with pytest.raises(AdaptError, match="repetition"):
        FilterConfig.from_dict({"repetition": "yes"})
    assert FilterConfig.from_dict({"contamination": "eval.jsonl", "max_ngram_share": 1}).contamination == ["eval.jsonl"]


def test_filter_files_writes_loadable_output_and_manifest_entry(root, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "records.jsonl", [rec("Any cars?", "Yes.", "a.jpg", id="1"),
                                         rec("Any cars?", "Yes.", "a.jpg", id="2"),
                                         rec("Any cars?", "", "a.jpg", id="3")])
    (data / "meta.json").write_text(json.dumps({"cars": {"root": str(root), "annotation": "records.jsonl"}}))
    report = filter_files([data], tmp_path / "out", FilterConfig())
    assert report.to_dict()["sources"]["cars"] == {"read": 2, "kept": 1, "removed": {"duplicate": 1},
                                                   "contaminated": 0}
    sources = load_sources(tmp_path / "out", kind="domain", report=Report())
    assert [[r["id"] for r in s.records] for s in sources] == [["1"]]
    saved = json.loads((tmp_path / "out" / "filter_report.json").read_text())
    assert saved["examples"]["duplicate"][0]["id"] == "2"
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"version": 1}))
    record_in_manifest(manifest, report)
    assert json.loads(manifest.read_text())["filter"]["removed"] == {"duplicate": 1}


def test_real_internvl_rows_pass(tmp_path):
    path = REALDATA / "internvl_chat" / "coco_karpathy_train_567k.jsonl"
    if not path.is_file():
        pytest.skip("realdata not present")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    data_filter = DataFilter(FilterConfig(heuristics=False))  # the real images are not shipped
    assert all(data_filter.check(row, str(tmp_path), "coco") for row in rows)


# -- rule 4: model scoring -------------------------------------------------------------------------

def test_model_scoring_is_off_by_default_and_batched_with_the_tiny_model(root):
    assert FilterConfig().score_model is None
    records = [rec("What is on the road?", "A red car.", id="1"),
               rec("How many lanes are there on this wide highway?", "There are four lanes.", id="2"),
               rec("Is it raining?", "No.", id="3")]
    scorer = ModelScorer.load("tiny", batch_size=2)
    batched = scorer.score(records)
    one_by_one = [scorer.score([r])[0] for r in records]
    assert all(1 <= s <= 5 for s in batched)
    assert batched == pytest.approx(one_by_one, abs=1e-4)  # left padding does not change a score
    keep_all = DataFilter(FilterConfig(score_model="tiny", score_threshold=1.0))
    assert len(keep_all.apply([Source("s", str(root), records, "domain")])[0].records) == 3
    drop_all = DataFilter(FilterConfig(score_model="tiny", score_threshold=5.01))
    assert drop_all.apply([Source("s", str(root), records, "domain")]) == []
    assert drop_all.report.to_dict()["sources"]["s"] == {"read": 3, "kept": 0, "removed": {"low_score": 3},
                                                         "contaminated": 0}


# -- the hooks: adapt run's filter: section and `adapt filter` ----------------------------------------

def _user_data(folder: Path) -> Path:
    """Twelve questions on their own pictures, a near-duplicate of q3 (same picture, same text up to case
    and spacing) and a looping answer; held-out sets are drawn by picture, so whichever is held out,
    the rest shows the filter at work."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(12):
        scene(i + 1).save(folder / f"{i}.jpg", quality=95)
    scene(99).save(folder / "loop.jpg", quality=95)
    rows = [rec(f"Question number {i} about the scene?", f"Answer {i}.", f"{i}.jpg", id=f"q{i}") for i in range(12)]
    rows += [rec("question number 3  about the Scene?", "answer 3.", "3.jpg", id="dup"),
             rec("Describe the scene.", LOOPING[0], "loop.jpg", id="loop")]
    write_jsonl(folder / "data.jsonl", rows)
    return folder / "data.jsonl"


def _prepared(tmp_path: Path, tiny, **settings) -> tuple[dict, list[str], set[str]]:
    from adapt import api

    data = _user_data(tmp_path / "user")
    config = api.RunConfig(domain="remote_sensing", general_ratio=0, data=[{"kind": "general", "path": str(data),
                           "name": "mine"}], eval={"holdout": 2}, **settings)
    domain, train_config, eval_settings = api.resolve(config)
    prepared = api.prepare_data(config, domain, train_config, eval_settings, tmp_path / "run", tiny)
    manifest = json.loads((tmp_path / "run" / "mixture" / "manifest.json").read_text())
    ids = [json.loads(line)["id"] for line in (tmp_path / "run" / "mixture" / "mixture.jsonl").read_text().splitlines()]
    held = {record["id"] for entries in prepared.heldout.values() for record, _ in entries}
    return manifest, ids, held


def test_run_applies_the_filter_section_between_formatting_and_mixing(tmp_path, tiny):
    from adapt import api

    manifest, ids, held = _prepared(tmp_path, tiny, filter={"perceptual": False})
    assert "loop" not in ids and not {"dup", "q3"} <= set(ids)
    removed_counts = manifest["filter"]["sources"]["mine"]["removed"]
    assert removed_counts.get("repetition", 0) == (0 if "loop" in held else 1)
    duplicates = sum(n for rule, n in removed_counts.items() if rule != "repetition")
    assert duplicates == (0 if {"dup", "q3"} & held else 1)  # a held-out picture takes both with it
    assert set(ids) | held | {"loop", "dup", "q3"} == {f"q{i}" for i in range(12)} | {"loop", "dup"}
    assert manifest["filter"]["config"]["perceptual"] is False
    assert (tmp_path / "run" / "filter_report.json").is_file()
    with pytest.raises(AdaptError, match="unknown filter setting"):
        api.resolve(api.RunConfig(domain="remote_sensing", data=[{"kind": "general", "path": "x.jsonl"}],
                                  filter={"dedupe": True}))


def test_run_without_a_filter_section_filters_nothing(tmp_path, tiny):
    manifest, ids, held = _prepared(tmp_path, tiny)
    assert "filter" not in manifest
    assert set(ids) | held == {f"q{i}" for i in range(12)} | {"loop", "dup"}  # every record trains or is held out
    assert manifest["samples"]["total"] == len(ids) == 14 - len(held)


def test_cli_filter_command(tmp_path, capsys):
    from adapt.cli import main

    data = _user_data(tmp_path / "user")
    write_jsonl(tmp_path / "bench.jsonl", [rec("Question number 5 about the scene?", "Answer 5.", None, id="e")])
    code = main(["filter", str(data), "--output", str(tmp_path / "out"), "--eval", str(tmp_path / "bench.jsonl"),
                 "--remove-contaminated", "--set", "max_token_run=6", "--set", "perceptual=false"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "kept 11 of 14" in printed
    report = json.loads((tmp_path / "out" / "filter_report.json").read_text())
    assert report["removed"] == {"duplicate": 1, "repetition": 1, "contaminated": 1}
    assert report["config"]["max_token_run"] == 6 and report["config"]["perceptual"] is False
    assert main(["filter", str(data), "--output", str(tmp_path / "o2"), "--set", "dedupe=1"]) == 2
    assert "unknown filter setting" in capsys.readouterr().err



def test_cli_filter_reads_the_filter_section_of_a_run_config(tmp_path, capsys):
    """`adapt filter --config run.yaml` takes the run config's filter: section (--set still overrides)."""
    from adapt.cli import main

    data = _user_data(tmp_path / "user")
    config = tmp_path / "run.yaml"
    config.write_text("domain: driving\nfilter:\n  dedup: false\n  max_token_run: 6\n")
    assert main(["filter", str(data), "--output", str(tmp_path / "out"), "--config", str(config),
                 "--set", "perceptual=false"]) == 0
    saved = json.loads((tmp_path / "out" / "filter_report.json").read_text())["config"]
    assert (saved["dedup"], saved["max_token_run"], saved["perceptual"]) == (False, 6, False)
    assert "duplicate" not in json.loads((tmp_path / "out" / "filter_report.json").read_text())["removed"]
    config.write_text("filter:\n  max_hash_distance: 99\n")
    assert main(["filter", str(data), "--output", str(tmp_path / "o2"), "--config", str(config)]) == 2
    assert "filter.max_hash_distance" in capsys.readouterr().err

@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 2**64 - 1) | st.integers(0, 40), max_size=3000))
def test_key_set_behaves_as_a_set(keys):
    """The compact duplicate-key table answers exactly as a Python set, across its growth steps."""
    compact, reference = KeySet(capacity=8), set()
    for key in keys:
        assert compact.add(key) == ((key or 1) not in reference)
        reference.add(key or 1)
    assert len(compact) == len(reference)
