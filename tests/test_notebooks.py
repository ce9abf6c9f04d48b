"""The notebooks run top to bottom on the demo (nbclient, the venv's `python3` kernel that ipykernel
installs) and show what they promise. Parameters are overridden the papermill way: a cell inserted
after the first code cell, so the notebooks themselves stay as committed. inspect_data runs first
and its formatted demo data is reused by mixing_ratios (SHARED_DIR), as a user would."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
RATIOS = [0, 0.25, 0.5]


def execute(name: str, overrides: dict, cwd: Path) -> nbformat.NotebookNode:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    first = next(i for i, cell in enumerate(nb.cells) if cell.cell_type == "code")
    source = "\n".join(f"{key} = {value!r}" for key, value in overrides.items())
    nb.cells.insert(first + 1, nbformat.v4.new_code_cell(source))
    NotebookClient(nb, kernel_name="python3", timeout=600, resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


def outputs(nb: nbformat.NotebookNode, kind: str) -> list:
    return [out["data"][kind] for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", [])
            if kind in out.get("data", {})]


def stdout(nb: nbformat.NotebookNode) -> str:
    return "".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                   for out in cell.get("outputs", []) if out.get("name") == "stdout")


def test_notebooks_are_committed_without_outputs():
    for path in NOTEBOOKS.glob("*.ipynb"):
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, path.name


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> dict:
    return {"root": tmp_path_factory.mktemp("notebooks")}


def test_inspect_data_shows_views_boxes_tokens_and_histograms(shared):
    root = shared["root"]
    nb = execute("inspect_data.ipynb", {"DATA_DIR": str(root / "data"), "N_SAMPLES": 2}, root)
    shared["data_dir"] = root / "data"
    images = outputs(nb, "image/png")
    assert len(images) >= 3  # two samples' views, the histograms
    assert all(base64.b64decode(image)[:8] == b"\x89PNG\r\n\x1a\n" for image in images)
    html = "".join(outputs(nb, "text/html"))
    supervised = "".join(re.findall(r'<span class="supervised"[^>]*>(.*?)</span>', html, flags=re.S))
    assert "CAM_" in supervised  # the demo answers name a camera
    assert "Which camera" not in supervised and "Which camera" in html  # the question is context only
    assert "&lt;IMG_CONTEXT&gt; x" in html  # image tokens shown collapsed, with their count
    text = stdout(nb)
    assert re.search(r"\d+ domain records", text)
    assert "box" in text
    assert re.search(r"filter: kept \d+ of \d+ records", text)  # removed samples per rule
    assert re.search(r"made-up: kept 0 of 4 \((?=.*duplicate: 1)(?=.*repetition: 1)(?=.*markup_only: 1)"
                     r"(?=.*no_question_text: 1)", text)
    for rule in ("duplicate", "repetition", "markup_only", "no_question_text"):
        assert f"<td>{rule}</td>" in html


def test_mixing_ratios_sweeps_tabulates_and_plots(shared):
    root = shared["root"]
    runs = root / "runs"
    overrides = {"RATIOS": RATIOS, "RUNS_DIR": str(runs), "SHARED_DIR": str(shared.get("data_dir", root / "data")),
                 "TRAIN": {"max_steps": 2, "max_tiles": 1, "pack_tokens": 1024, "pack_tiles": 4, "dataloader_num_workers": 0,
                           "logging_steps": 1},
                 "EVAL": {"holdout": 3, "general_holdout": 3, "max_new_tokens": 4}}
    nb = execute("mixing_ratios.ipynb", overrides, root)

    sweeps = list(runs.glob("sweep-*/sweep.json"))
    assert len(sweeps) == 1
    rows = json.loads(sweeps[0].read_text())
    assert [row["general_ratio"] for row in rows] == RATIOS
    assert all(row["steps"] == 2 and row["domain_loss_after"] is not None for row in rows)
    assert len({row["general_loss_before"] for row in rows}) == 1  # one base model, evaluated once, shared
    assert len(list((root / "data" / "base-eval").glob("*.json"))) == 1

    html = "".join(outputs(nb, "text/html"))
    body = html[html.index("<tbody>"):html.index("</tbody>")]
    assert body.count("<tr") == len(RATIOS)
    from adapt import api

    best = api.best_ratio(rows, tolerance=0.10)
    assert f"best general ratio: {best['general_ratio']:g} " in stdout(nb)

    plot = runs / "mixing_ratios.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert outputs(nb, "image/png")


def test_best_ratio_keeps_general_skill_then_maximises_the_domain_score():
    from adapt import api
    from adapt.errors import AdaptError

    def row(ratio, score, domain_loss, general_loss):
        return {"general_ratio": ratio, "domain_after": score, "domain_loss_after": domain_loss,
                "general_loss_after": general_loss}

    rows = [row(0.0, 0.9, 1.0, 3.0),    # best domain score, but forgets: 3.0 > 2.0 * 1.1
            row(0.25, 0.8, 1.2, 2.15),  # within 10% of the lowest general loss (2.0)
            row(0.5, 0.8, 1.1, 2.0),    # same score as 0.25, lower domain loss: wins the tie
            row(0.75, 0.6, 1.5, 2.05)]
    assert api.best_ratio(rows)["general_ratio"] == 0.5
    assert api.best_ratio(rows, tolerance=0.6)["general_ratio"] == 0.0  # 3.0 <= 2.0 * 1.6
    assert api.best_ratio(rows, tolerance=0.0)["general_ratio"] == 0.5
    tied = [row(0.5, 0.7, 1.0, 2.0), row(0.25, 0.7, 1.0, 2.0)]
    assert api.best_ratio(tied)["general_ratio"] == 0.25  # full tie: less general data
    no_general = [row(0.0, 0.5, 1.0, None), row(0.25, 0.6, 1.0, None)]
    assert api.best_ratio(no_general)["general_ratio"] == 0.25
    with pytest.raises(AdaptError):
        api.best_ratio([])
