"""Untrusted files: nothing a dataset, config or checkpoint carries gets to run code.

* weights: every `torch.load` in the package is `weights_only=True` (the converter's refusal of a
  malicious .bin is tested in tests/test_convert.py); no `eval`/`exec`, no unsafe YAML loaders,
  `np.load` never with pickles, and `trust_remote_code` is never switched on in the package;
* pickles from datasets (PathVQA, RefCOCO, an npz with object arrays) are refused unless the user opts
  in, and the refusal happens before anything is unpickled (a payload that would create a file does not);
* remote code named by a checkpoint (`auto_map`) is not imported by `adapt.checkpoints.models.load`;
* YAML with a python/object tag is an `AdaptError` (run config, domain recipe, a run's config.yaml),
  never executed;
* image paths stay inside their roots at training time too (the formatter side, including a symlink
  pointing out, is in tests/test_bad_inputs.py).
"""

from __future__ import annotations

import ast
import inspect
import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from adapt.cli import main
from adapt.errors import AdaptError, Report

REPO = Path(__file__).resolve().parents[1]
PACKAGE_FILES = sorted(
    p for folder in ("adapt", "formatters", "domains") for p in (REPO / folder).rglob("*.py")
)
# The only functions that may unpickle, each reached only after an explicit allow_pickle opt-in.
PICKLE_GATES = {("formatters/grounding.py", "_load_refs"), ("formatters/medical.py", "_pickle_rows")}


class Payload:
    """Unpickling this creates `marker`: proof that a refused file was not unpickled after all."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def _calls(path: Path) -> list[tuple[ast.Call, str, str | None]]:
    """(call, dotted callee, enclosing function) for every call in a source file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out: list[tuple[ast.Call, str, str | None]] = []

    def visit(node: ast.AST, function: str | None) -> None:
        for child in ast.iter_child_nodes(node):
            name = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
            if isinstance(child, ast.Call):
                out.append((child, ast.unparse(child.func), function))
            visit(child, name)

    visit(tree, None)
    return out


def _keyword(call: ast.Call, name: str) -> object:
    for keyword in call.keywords:
        if keyword.arg == name:
            return (
                keyword.value.value if isinstance(keyword.value, ast.Constant) else ast.unparse(keyword.value)
            )
    return "<absent>"


def test_package_source_has_no_unsafe_loader():
    seen = {"torch.load": 0, "np.load": 0, "pickle.load": 0}
    for path in PACKAGE_FILES:
        rel = path.relative_to(REPO).as_posix()
        for call, callee, function in _calls(path):
            where = f"{rel}:{call.lineno}"
            if callee == "torch.load":
                seen["torch.load"] += 1
                assert _keyword(call, "weights_only") is True, (
                    f"{where}: torch.load without weights_only=True"
                )
            if callee in ("np.load", "numpy.load"):
                seen["np.load"] += 1
                assert _keyword(call, "allow_pickle") in (False, "<absent>"), f"{where}: np.load with pickles"
            if callee in ("pickle.load", "pickle.loads", "pickle.Unpickler", "dill.load", "joblib.load"):
                seen["pickle.load"] += 1
                assert (rel, function) in PICKLE_GATES, f"{where}: unpickling outside the allow_pickle gates"
            assert callee not in (
                "eval",
                "exec",
                "yaml.load",
                "yaml.unsafe_load",
                "yaml.full_load",
                "yaml.load_all",
                "marshal.loads",
            ), f"{where}: {callee}"
            assert _keyword(call, "trust_remote_code") is not True, f"{where}: trust_remote_code=True"
        assert (
            "yaml.Loader" not in path.read_text(encoding="utf-8") and "UnsafeLoader" not in path.read_text()
        )
    # the scan saw the loaders it is about (a renamed import would make it vacuous)
    assert seen["torch.load"] >= 1 and seen["np.load"] >= 1 and seen["pickle.load"] == len(PICKLE_GATES)


def test_trust_remote_code_is_off_by_default():
    from adapt.checkpoints import models

    assert inspect.signature(models.load).parameters["trust_remote_code"].default is False


def test_checkpoint_remote_code_is_not_imported(tmp_path):
    """A model folder whose config and tokenizer config name code in the folder (auto_map) loads with
    the native classes; the folder's module is never imported."""
    from adapt.checkpoints.models import TINY_TOKENIZER, load

    marker, folder = tmp_path / "imported", tmp_path / "model"
    load("tiny", seed=0).model.save_pretrained(folder)
    shutil.copy(TINY_TOKENIZER / "tokenizer.json", folder / "tokenizer.json")
    tokenizer_config = json.loads((TINY_TOKENIZER / "tokenizer_config.json").read_text())
    tokenizer_config.update(
        auto_map={"AutoTokenizer": [None, "remote.RemoteTokenizer"]}, tokenizer_class="RemoteTokenizer"
    )
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "remote.RemoteConfig", "AutoModel": "remote.RemoteModel"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "remote.py").write_text(
        f"import os\nos.mkdir({str(marker)!r})\n"
        "from transformers import PreTrainedTokenizerFast as RemoteTokenizer\n"
    )
    try:
        loaded = load(str(folder))
    except AdaptError:
        loaded = None  # refusing is fine too; running the folder's code is not
    assert not marker.exists()
    if loaded is not None:
        assert type(loaded.model).__name__ == "InternVLForConditionalGeneration"


def test_pathvqa_pickle_refused_without_opt_in(capsys, tmp_path):
    marker = tmp_path / "unpickled"
    pickled = tmp_path / "pvqa" / "qas" / "train" / "train_qa.pkl"
    pickled.parent.mkdir(parents=True)
    (tmp_path / "pvqa" / "images" / "train").mkdir(parents=True)
    pickled.write_bytes(pickle.dumps([Payload(marker)]))
    for source in (pickled, tmp_path / "pvqa"):  # the file itself, or the release folder
        code = main(["format", "pathvqa", "--input", str(source), "--output", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert code == 2 and f"{pickled}: PathVQA .pkl files are Python pickles" in err
        assert "--opt allow_pickle=true" in err and not marker.exists()


def test_pathvqa_opt_in_from_the_command_line(capsys, tmp_path):
    """The opt-in the refusal names works as written (a CLI option arrives as the string "true")."""
    from formatters.synthetic.medical import write_pathvqa_pickle

    pickled = write_pathvqa_pickle(tmp_path)
    for value in ("false", "yes-please"):
        assert (
            main(
                [
                    "format",
                    "pathvqa",
                    "--input",
                    str(pickled),
                    "--output",
                    str(tmp_path / "no"),
                    "--opt",
                    f"allow_pickle={value}",
                ]
            )
            == 2
        )
    assert (
        main(
            [
                "format",
                "pathvqa",
                "--input",
                str(pickled),
                "--output",
                str(tmp_path / "out"),
                "--opt",
                "allow_pickle=true",
            ]
        )
        == 0
    )
    capsys.readouterr()
    rows = pickle.loads(pickled.read_bytes())
    records = [json.loads(line) for line in (tmp_path / "out" / "records.jsonl").read_text().splitlines()]
    assert [r["conversations"][-1]["value"] for r in records] == [str(row["answer"]) for row in rows]


def test_refcoco_pickle_refused_without_opt_in(capsys, tmp_path):
    marker = tmp_path / "unpickled"
    refs = tmp_path / "refs(unc).p"
    refs.write_bytes(pickle.dumps([Payload(marker)]))
    (tmp_path / "instances.json").write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    code = main(["format", "grounding", "--input", str(refs), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and f"{refs}: refusing to unpickle" in err and "--opt allow_pickle=true" in err
    assert not marker.exists()


def test_npz_with_pickled_object_arrays_is_refused(capsys, tmp_path):
    marker = tmp_path / "unpickled"
    images = np.empty(2, dtype=object)
    images[:] = [Payload(marker), Payload(marker)]
    np.savez(tmp_path / "evil.npz", train_images=images, train_labels=np.zeros((2, 1), dtype=np.uint8))
    (tmp_path / "names.json").write_text('["a", "b"]')
    code = main(
        [
            "format",
            "medmnist",
            "--input",
            str(tmp_path / "evil.npz"),
            "--output",
            str(tmp_path / "out"),
            "--opt",
            f"label_names={tmp_path / 'names.json'}",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and f"{tmp_path / 'evil.npz'}: " in err and "train_images is object" in err
    assert not marker.exists()


EXPLOIT = "!!python/object/apply:os.mkdir [{marker!r}]"


@pytest.mark.parametrize("where", ["run config", "domain recipe", "run directory config.yaml"])
def test_yaml_python_tags_are_refused_not_executed(capsys, tmp_path, where):
    marker = tmp_path / "executed"
    tag = EXPLOIT.format(marker=str(marker))
    if where == "run config":
        path = tmp_path / "run.yaml"
        path.write_text(f"domain: driving\ngeneral_ratio: {tag}\n")
        argv = ["run", "--config", str(path), "--runs-dir", str(tmp_path / "runs")]
    elif where == "domain recipe":
        path = tmp_path / "recipe.yaml"
        path.write_text(f"name: {tag}\nsources: []\n")
        argv = ["run", "--domain", str(path), "--runs-dir", str(tmp_path / "runs")]
    else:
        path = tmp_path / "run" / "config.yaml"
        path.parent.mkdir()
        path.write_text(f"run: {tag}\n")
        argv = ["run", "--resume", str(path.parent)]
    code = main(argv)
    err = capsys.readouterr().err
    assert (
        code == 2 and f"adapt: error: {path}: " in err and "not valid YAML" in err and "python/object" in err
    )
    assert "Traceback" not in err and not marker.exists()


def test_api_refuses_python_tags_too(tmp_path):
    from adapt import api

    marker = tmp_path / "executed"
    path = tmp_path / "run.yaml"
    path.write_text(f"seed: {EXPLOIT.format(marker=str(marker))}\n")
    with pytest.raises(AdaptError, match="not valid YAML"):
        api.load_config_file(path)
    assert not marker.exists()
    import yaml

    yaml.unsafe_load(path.read_text())  # what an unsafe loader would have done with this file
    assert marker.is_dir()


def test_payload_is_live(tmp_path):
    """The pickles the refusal tests use really run code when unpickled (else those tests prove nothing)."""
    pickle.loads(pickle.dumps([Payload(tmp_path / "unpickled")]))
    assert (tmp_path / "unpickled").is_dir()


def test_training_time_loading_keeps_paths_inside_the_root(tmp_path):
    """A JSONL read straight into a mixture (no formatter) cannot reach files outside its folder either:
    `..`, absolute paths and a symlinked folder pointing out are skipped rows, and a sample built
    from a record that escapes is dropped, not read."""
    from adapt.checkpoints.models import tiny_tokenizer
    from adapt.data import mixing
    from adapt.data.samples import SampleBuilder, SampleDropped
    from adapt.data.templates import Encoder
    from formatters.synthetic.sources import paint

    outside = tmp_path / "outside"
    outside.mkdir()
    paint((32, 32), [("red", (0, 0, 16, 16))]).save(outside / "secret.png")
    root = tmp_path / "data"
    root.mkdir()
    paint((32, 32), [("blue", (0, 0, 16, 16))]).save(root / "ok.png")
    (root / "linked").symlink_to(outside, target_is_directory=True)
    conv = [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "red"}]
    rows = [
        {"id": "ok", "image": "ok.png", "conversations": conv},
        {"id": "dotdot", "image": "../outside/secret.png", "conversations": conv},
        {"id": "absolute", "image": str(outside / "secret.png"), "conversations": conv},
        {"id": "symlink", "image": "linked/secret.png", "conversations": conv},
    ]
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = Report()
    [source] = mixing.load_sources(root / "rows.jsonl", kind="domain", report=report)
    assert [r["id"] for r in source.records] == ["ok"]
    assert {s.id: s.row for s in report.skips} == {"dotdot": 2, "absolute": 3, "symlink": 4}
    assert all("escapes the data root" in s.reason or "absolute path" in s.reason for s in report.skips)

    builder = SampleBuilder(Encoder(tiny_tokenizer(), "internvl2_5"))
    for row in rows[1:]:
        with pytest.raises(SampleDropped, match="escapes the data root|absolute path"):
            builder.plan(row, str(root))
        with pytest.raises(SampleDropped, match="escapes the data root|absolute path"):
            builder.build(row, str(root))
    assert builder.build(rows[0], str(root)).tiles is not None
