"""Issue #11: one typed boundary for configs, records and images.

Each defect the issue names has a test here that failed before the change; the property tests feed
arbitrary JSON values to the record reader, the meta reader and the run-config parser, which must
answer with a valid object or an AdaptError that says where.
"""

from __future__ import annotations

import json
import re
import shlex
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import formatters
from adapt import api
from adapt.cli import main
from adapt.data import mixing
from adapt.data.records import normalize, problems, read_jsonl, read_meta
from adapt.errors import AdaptError, Report
from adapt.training.trainer import TrainConfig, make_builder, train
from formatters.base import run as run_formatter
from formatters.synthetic import sources as syn
from formatters.synthetic.general import write_general_demo

TILE = 448


def official_tiles(width: int, height: int, max_num: int) -> int:
    """InternVL's dynamic_preprocess tile count (thumbnail included), re-derived from the official code:
    among grids i*j in [1, max_num] pick the aspect ratio closest to the image's (ties go to the later
    grid when the image area exceeds half the grid's pixel area), then add a thumbnail when i*j > 1."""
    aspect = width / height
    ratios = sorted({(i, j) for n in range(1, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1)
                     if 1 <= i * j <= max_num}, key=lambda r: r[0] * r[1])
    best, best_diff = (1, 1), float("inf")
    for i, j in ratios:
        diff = abs(aspect - i / j)
        if diff < best_diff:
            best, best_diff = (i, j), diff
        elif diff == best_diff and width * height > 0.5 * TILE * TILE * i * j:
            best = (i, j)
    n = best[0] * best[1]
    return n + 1 if n > 1 else n


def test_max_tiles_above_12_reaches_training(tmp_path, tiny):
    """--max-tiles 24 trains with up to 24 tiles: formatted data carries no budget of its own that
    would cap it (the formatter used to write max_dynamic_patch 12 into every meta.json)."""
    source = tmp_path / "src"
    source.mkdir()
    Image.fromarray(np.zeros((TILE, 24 * TILE, 3), np.uint8)).save(source / "wide.png")
    row = {"id": "wide", "image": "wide.png",
           "conversations": [{"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": "A road."}]}
    (source / "rows.jsonl").write_text(json.dumps(row) + "\n")
    out = tmp_path / "formatted"
    run_formatter(formatters.get("general"), source / "rows.jsonl", out, progress=False)
    assert "max_dynamic_patch" not in json.loads((out / "meta.json").read_text())["general"]

    [loaded] = mixing.load_sources(out, kind="domain", report=Report(name="t"))
    [record] = loaded.records
    builder = make_builder(tiny, TrainConfig(max_tiles=24, max_length=32768))
    expected = official_tiles(24 * TILE, TILE, 24)
    assert expected == 25
    assert builder.plan(record, loaded.root).tiles == expected
    assert builder.build(record, loaded.root).tiles.shape[0] == expected

    mixing.limit_tiles(loaded, 6)  # a source's own budget in the run config (`max_tiles: 6`) lowers it
    assert builder.plan(record, loaded.root).tiles == official_tiles(24 * TILE, TILE, 6) == 7


def test_tile_budget_per_image_kind(tmp_path, tiny):
    """The run config's budgets per image kind: one image gets max_tiles; a multi-image sample shares
    multi_image_max_tiles (default max_tiles) among its images, as InternVL divides max_dynamic_patch."""
    for name in ("a.png", "b.png"):
        Image.fromarray(np.zeros((TILE, 8 * TILE, 3), np.uint8)).save(tmp_path / name)
    one = {"id": "one", "image": "a.png",
           "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "Road."}]}
    two = {"id": "two", "image": ["a.png", "b.png"],
           "conversations": [{"from": "human", "value": "<image>\n<image>\nWhat?"}, {"from": "gpt", "value": "Roads."}]}
    default = make_builder(tiny, TrainConfig(max_tiles=12, max_length=32768))
    assert default.plan(one, tmp_path).tiles == official_tiles(8 * TILE, TILE, 12)
    assert default.plan(two, tmp_path).tiles == 2 * official_tiles(8 * TILE, TILE, 6)
    kinds = make_builder(tiny, TrainConfig(max_tiles=12, multi_image_max_tiles=4, max_length=32768))
    assert kinds.plan(one, tmp_path).tiles == official_tiles(8 * TILE, TILE, 12)  # single images keep theirs
    assert kinds.plan(two, tmp_path).tiles == 2 * official_tiles(8 * TILE, TILE, 2) == 6
    assert kinds.build(two, tmp_path).tiles.shape[0] == 6


# ------------------------------------------------------------------------------------------------
# records and meta files: any JSON value gives a valid record or a counted skip with file:line
# ------------------------------------------------------------------------------------------------
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                    max_leaves=8)
TURN = st.fixed_dictionaries({}, optional={"from": st.sampled_from(["system", "human", "gpt"]) | JSON,
                                           "value": st.sampled_from(["<image>\nq", "a", ""]) | JSON})
RECORD_LIKE = st.fixed_dictionaries({}, optional={
    "id": JSON, "image": st.sampled_from(["a.png", ["a.png", "b.png"], "../x.png"]) | JSON,
    "video": st.sampled_from(["clip.mp4"]) | JSON, "meta": JSON,
    "conversations": st.lists(TURN, max_size=4) | JSON})
GOOD_TURNS = [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]


def read_lines(folder: Path, rows: list) -> tuple[list, Report]:
    path = folder / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    report = Report(name="rows")
    return list(read_jsonl(path, report, root=folder)), report


@settings(max_examples=300, deadline=None)
@given(st.lists(RECORD_LIKE | JSON, min_size=1, max_size=4))
def test_any_json_row_is_a_record_or_a_counted_skip(rows):
    with tempfile.TemporaryDirectory() as folder:
        read, report = read_lines(Path(folder), rows)
    assert len(read) + len(report.skips) == len(rows)
    for _, record in read:
        assert problems(record) == []
        normalize(record)
    for skip in report.skips:
        assert skip.path and skip.row is not None and skip.reason


@pytest.mark.parametrize("row, where", [
    ({"image": 5, "conversations": GOOD_TURNS}, "image: "),
    ({"video": 5, "conversations": GOOD_TURNS}, "video: "),
    ({"conversations": [{"from": "system", "value": 5}, *GOOD_TURNS]}, "conversations[0].value: "),
    ({"image": ["a.png", 3], "conversations": GOOD_TURNS}, "image[1]: "),
    ({"meta": [1], "conversations": GOOD_TURNS}, "meta: "),
])
def test_wrong_json_types_are_skips_naming_the_field(tmp_path, row, where):
    """These rows used to end in a TypeError / AttributeError traceback."""
    read, report = read_lines(tmp_path, [row])
    assert not read and len(report.skips) == 1
    assert report.skips[0].row == 1 and where in report.skips[0].reason


@settings(max_examples=300, deadline=None)
@given(JSON | st.dictionaries(st.text(max_size=4), st.fixed_dictionaries({}, optional={
    "root": st.just("imgs") | JSON, "annotation": st.just("a.jsonl") | JSON, "repeat_time": JSON,
    "max_dynamic_patch": JSON, "data_augment": JSON}) | JSON, max_size=3))
def test_any_json_meta_file_is_specs_or_an_error_naming_it(value):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "meta.json"
        path.write_text(json.dumps(value))
        try:
            specs = read_meta(path)
        except AdaptError as err:
            assert err.path == path
            return
    for spec in specs:
        assert spec.repeat_time > 0 and (spec.max_dynamic_patch is None or spec.max_dynamic_patch >= 1)
        assert isinstance(spec.root, str) and isinstance(spec.annotation, str)


@pytest.mark.parametrize("entry, message", [
    ({"annotation": "a.jsonl", "repeat_time": "abc"}, "repeat_time: "),
    ({"annotation": "a.jsonl", "root": 5}, "root: "),
    ({"annotation": "a.jsonl", "max_dynamic_patch": True}, "max_dynamic_patch: "),
])
def test_meta_entries_of_the_wrong_type_are_errors_naming_the_field(tmp_path, entry, message):
    path = tmp_path / "meta.json"
    path.write_text(json.dumps({"set": entry}))
    with pytest.raises(AdaptError, match=re.escape(message)) as caught:
        read_meta(path)
    assert caught.value.path == path and "'set'" in caught.value.message


def test_coco_image_id_of_the_wrong_type_is_a_counted_skip(tmp_path):
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "a.png")
    coco = {"images": [{"id": 1, "file_name": "a.png", "width": 64, "height": 64}],
            "categories": [{"id": 1, "name": "car"}],
            "annotations": [{"id": 1, "image_id": [1], "category_id": 1, "bbox": [1, 1, 10, 10]},
                            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [1, 1, 10, 10]}]}
    (tmp_path / "instances.json").write_text(json.dumps(coco))
    report = run_formatter(formatters.get("grounding"), tmp_path / "instances.json", tmp_path / "out",
                           progress=False)
    assert report.written == 1 and len(report.skips) == 1
    assert report.skips[0].row == 1 and "image_id" in report.skips[0].reason


# ------------------------------------------------------------------------------------------------
# the run configuration: one parser, ranges where declared, recipes as partial run configs
# ------------------------------------------------------------------------------------------------
README = Path(__file__).resolve().parents[1] / "README.md"


def cli(capsys, *argv: str | Path) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    return code, captured.err


@pytest.mark.parametrize("flags, message", [
    (("--grad-accum", "0"), "train.gradient_accumulation_steps: input should be greater than or equal to 1"),
    (("--seed", "-1"), "seed: input should be greater than or equal to 0"),
    (("--name", "../../x"), "a run name is one folder name inside --runs-dir"),
    (("--name", "/tmp/elsewhere"), "a run name is one folder name inside --runs-dir"),
])
def test_run_options_out_of_range_are_user_errors(capsys, tmp_path, flags, message):
    """--grad-accum 0 and --seed -1 used to end in tracebacks inside the Trainer; --name ../../x
    wrote its run directory outside --runs-dir."""
    runs = tmp_path / "a" / "b" / "runs"
    code, err = cli(capsys, "run", *flags, "--runs-dir", runs, "--quiet", "--no-export")
    assert code == 2 and message in err, err
    assert not runs.exists() and not (tmp_path / "a" / "x").exists()


@pytest.mark.parametrize("text, where", [
    ("data: [5]\n", "data[0]: input should be a valid dictionary"),
    ("eval: {holdout: abc}\n", "eval.holdout: "),
    ("general_ratio: 1.5\n", "general_ratio: input should be less than 1"),
    ("data: [{kind: general, path: x.jsonl, weight: -1}]\n", "data[0].weight: input should be greater than 0"),
])
def test_run_config_values_of_the_wrong_type_name_file_and_key(tmp_path, text, where):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(AdaptError, match=re.escape(where)) as caught:
        api.load_config_file(path)
    assert caught.value.path == path


def test_train_options_of_the_wrong_range_name_the_key():
    with pytest.raises(AdaptError, match=re.escape("train.num_train_epochs: input should be greater than 0")):
        api.resolve(api.RunConfig(train={"num_train_epochs": 0}))


YAML_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
                           | st.text(max_size=6), lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=6)
RUN_KEYS = st.sampled_from(["domain", "model", "general_ratio", "mix_by", "upsample", "seed", "data", "general",
                            "train", "eval", "strict", "runs_dir", "name"]) | st.text(max_size=5)
TRAIN_KEYS = st.sampled_from(["learning_rate", "num_train_epochs", "gradient_accumulation_steps", "max_tiles",
                              "mode", "seed", "optim", "adam_beta2", "gradient_checkpointing", "bf16", "lr"])


@settings(max_examples=200, deadline=None)
@given(YAML_VALUES | st.dictionaries(RUN_KEYS, YAML_VALUES | st.dictionaries(TRAIN_KEYS, YAML_VALUES, max_size=3),
                                     max_size=4))
def test_any_yaml_run_config_is_a_config_or_an_error_naming_the_file(value):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "run.yaml"
        path.write_text(yaml.safe_dump(value))
        try:
            config = api.load_config_file(path)
        except AdaptError as err:
            assert err.path == path and err.message
            return
    assert 0 <= config.general_ratio < 1 and config.seed >= 0
    try:
        TrainConfig.from_dict(config.train)
    except AdaptError as err:
        assert err.message.startswith(("train.", "unknown training option", "training option", "unknown", "partial"))


def test_training_arguments_fields_pass_through_to_the_trainer(tmp_path, tiny):
    """A TrainingArguments field adapt has no option for reaches the Trainer as given."""
    from helpers import fast_config, write_records
    from transformers import TrainerCallback

    seen = {}

    class Capture(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            seen.update(optim=args.optim, adam_beta2=args.adam_beta2)

    config = TrainConfig.from_dict({**fast_config(max_steps=1).to_dict(), "optim": "adamw_torch",
                                    "adam_beta2": 0.95})
    train(tiny, write_records(tmp_path / "data", 1, 1), config, tmp_path / "out", progress=False,
          callbacks=[Capture()])
    assert seen == {"optim": "adamw_torch", "adam_beta2": 0.95}


@pytest.mark.slow
def test_readme_recipe_example_runs_verbatim(tmp_path, monkeypatch, capsys):
    """The README's own-domain recipe and command, as printed there, on synthetic folders laid out
    as the README says (it used to stop with "domain 'crops' has no demo data")."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("**Your own domain**"):]
    recipe = section[section.index("```yaml\n") + 8:section.index("```\n", section.index("```yaml\n") + 8)]
    command = next(line.strip() for line in section.splitlines() if line.strip().startswith("adapt run --domain"))
    syn.write_class_folders(tmp_path / "crops", per_class=4)
    write_general_demo(tmp_path / "general", n=24)  # general/meta.json, an InternVL meta file
    (tmp_path / "crops.yaml").write_text(recipe, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    code = main(shlex.split(command)[1:])
    out, err = capsys.readouterr()
    assert code == 0, err
    result = json.loads(out[out.rindex('{\n  "run_dir"'):])
    run_dir = Path(result["run_dir"])
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert [(s["kind"], Path(s["path"])) for s in saved["run"]["data"]] == [("classification", tmp_path / "crops")]
    assert saved["train"]["num_train_epochs"] == 2 and saved["train"]["max_tiles"] == 6
    manifest = json.loads((run_dir / "data" / "mixture" / "manifest.json").read_text())
    assert set(manifest["sources"]) == {"classification-crops", "general-meta.json"}, manifest["sources"]
    assert result["domain_after"] is not None
