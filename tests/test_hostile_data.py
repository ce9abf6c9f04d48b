"""Generated records, meta files, boxes and run configs: valid output or `AdaptError`, nothing else.

The contract (issue #12): every generated input either passes, or is refused with an `AdaptError` /
a list of problems naming what is wrong; never another exception, never a silently wrong value.
"""

from __future__ import annotations

import contextlib
import json
import math
import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from adapt import api
from adapt.data import boxes as bx
from adapt.data import records as rec
from adapt.errors import AdaptError, Report

MANY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
WORK = Path(tempfile.mkdtemp(prefix="adapt-hostile-"))

json_value = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8)
meta_entry = st.fixed_dictionaries({}, optional={k: json_value | st.just("ann.jsonl") for k in (
    "root", "annotation", "repeat_time", "max_dynamic_patch", "data_augment")})
record_key = st.sampled_from(["from", "value", "id", "image", "video", "conversations", "meta"])
record_like = st.recursive(
    st.none() | st.booleans() | st.integers() | st.sampled_from(["human", "gpt", "system", "a.png", "<image>"])
    | st.text(alphabet="<>imagevdo/|_ \n", max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(record_key, inner, max_size=4), max_leaves=14)


@MANY
@given(st.one_of(json_value, st.dictionaries(st.text(max_size=4), meta_entry | json_value, max_size=3)))
def test_meta_files(raw):
    path = WORK / "meta.json"
    path.write_text(json.dumps(raw))
    try:
        specs = rec.read_meta(path)
    except AdaptError as err:
        assert str(path) in str(err)
        return
    for spec in specs:
        assert spec.repeat_time > 0 and math.isfinite(spec.repeat_time)
        assert spec.max_dynamic_patch is None or (isinstance(spec.max_dynamic_patch, int) and spec.max_dynamic_patch >= 1)
        assert isinstance(spec.data_augment, bool)


def test_meta_file_values_of_the_wrong_type_name_the_entry():
    path = WORK / "typed.json"
    for entry, words in [({"annotation": "a.jsonl", "repeat_time": [2]}, "repeat_time"),
                         ({"annotation": "a.jsonl", "repeat_time": "nan"}, "repeat_time"),
                         ({"annotation": {"x": 1}}, "annotation"), ({"annotation": "a", "root": None}, "root"),
                         ({"annotation": "a", "max_dynamic_patch": 0}, "max_dynamic_patch")]:
        path.write_text(json.dumps({"ds": entry}))
        try:
            rec.read_meta(path)
        except AdaptError as err:
            assert "'ds'" in str(err) and words in str(err)
        else:
            raise AssertionError(f"accepted {entry}")


@MANY
@given(record_like)
def test_records(record):
    found = rec.problems(record, root=WORK, check_files=True)
    assert isinstance(found, list) and all(isinstance(p, str) for p in found)
    if not found:
        normalized = rec.normalize(record)
        assert rec.problems(normalized, root=WORK) == []


@MANY
@given(st.lists(record_like, max_size=4))
def test_jsonl_rows_are_kept_or_counted_with_their_line(rows):
    path = WORK / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    report = Report()
    kept = list(rec.read_jsonl(path, report, root=WORK))
    assert len(kept) + report.skipped == len(rows)
    assert all(s.path == str(path) and s.row is not None for s in report.skips)


box = st.lists(st.one_of(st.integers(-50, 1200), st.floats(allow_nan=True, allow_infinity=True)), min_size=0, max_size=5)


@MANY
@given(box, st.integers(1, 3000), st.integers(1, 3000))
@example([-1.0, 0, 0, 1], 1, 1)  # inside the 1-pixel tolerance but with no area once clamped (found by CI)
def test_boxes(raw, width, height):
    from formatters.grounding import to_pixels

    for fmt in ("auto", "xyxy", "xywh", "xyxy_norm", "xywh_norm"):
        px, how = to_pixels(raw, fmt, width, height)
        if px is None:
            assert isinstance(how, str) and how
            continue
        x1, y1, x2, y2 = px
        assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height
        grid = bx.to_grid(px, width, height)
        assert all(0 <= v <= 1000 for v in grid) and grid[0] <= grid[2] and grid[1] <= grid[3]


@MANY
@given(st.text(alphabet="<>refbox/[], 0123456789.-e", max_size=60))
def test_box_text_parsing_never_raises(text):
    for parsed in bx.parse_boxes(text):
        assert len(parsed) == 4
    assert all(isinstance(r, str) for r in bx.parse_refs(text))


config_key = st.sampled_from(["domain", "model", "general_ratio", "mix_by", "upsample", "seed", "data", "general",
                              "train", "eval", "strict", "runs_dir", "name", "bogus"])
train_key = st.sampled_from(["learning_rate", "num_train_epochs", "max_steps", "gradient_accumulation_steps", "max_tiles", "max_length", "mode",
                             "partial", "lora_r", "save_steps", "precision", "dataloader_num_workers", "pack", "system"])
small_value = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 10**6) | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=2) | st.dictionaries(st.text(max_size=4), inner, max_size=2), max_leaves=5)


@MANY
@given(st.dictionaries(config_key, small_value, max_size=4), st.dictionaries(train_key, small_value, max_size=3))
def test_run_configs(top, train):
    path = WORK / "run.yaml"
    path.write_text(yaml.safe_dump({**top, **({"train": train} if train else {})}))
    with contextlib.suppress(AdaptError):  # refusing is fine; any other exception fails the test
        api.resolve(api.load_config_file(path))
