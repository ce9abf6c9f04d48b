"""The notebooks run top to bottom on the demo (nbclient, the venv's `python3` kernel that ipykernel
installs) and show what they promise. Parameters are overridden the papermill way: a cell inserted
after the first code cell, so the notebooks themselves stay as committed. inspect_data runs first
and its formatted demo data is reused by the sweep notebooks (SHARED_DIR), as a user would."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
RATIOS = [0, 0.5]
SEEDS = [0, 1]


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


TRAIN = {"max_steps": 2, "max_tiles": 1, "pack_tokens": 1024, "pack_tiles": 4, "dataloader_num_workers": 0,
         "logging_steps": 1}
EVAL = {"holdout": 3, "general_holdout": 3, "max_new_tokens": 4, "blind": False}


def html_tables(nb: nbformat.NotebookNode) -> list[str]:
    html = "".join(outputs(nb, "text/html"))
    return re.findall(r"<tbody>(.*?)</tbody>", html, flags=re.S)


def recomputed_best(rows: list[dict], by: str, tolerance: float) -> object:
    """The best-point rule, recomputed here from the runs table (not by adapt): mean general loss
    within tolerance of the lowest mean, then the highest mean domain score, the lower mean domain
    loss, the smaller value."""
    points: dict = {}
    for row in rows:
        points.setdefault(row[by], []).append(row)

    def mean(values):
        return sum(values) / len(values)

    means = {key: {m: mean([r[m] for r in members]) for m in ("domain_after", "domain_loss_after", "general_loss_after")}
             for key, members in points.items()}
    lowest = min(m["general_loss_after"] for m in means.values())
    kept = [key for key, m in means.items() if m["general_loss_after"] <= lowest * (1 + tolerance)]
    return min(kept, key=lambda key: (-means[key]["domain_after"], means[key]["domain_loss_after"], key))


def check_sweep(nb: nbformat.NotebookNode, folder: Path, by: str, values: list, seeds: list, png: str) -> list[dict]:
    """The runs table has one row per point x seed, the summary one per point, the printed choice is
    the table's, the figure is saved next to the sweep; returns the index rows."""
    rows = json.loads((folder / "sweep.json").read_text())["runs"]
    assert sorted((row[by], row["seed"]) for row in rows) == sorted((v, s) for v in values for s in seeds)
    assert all(row["status"] == "trained" and row["steps"] == 2 and row["domain_after"] is not None
               and row["general_loss_after"] is not None for row in rows)
    assert all((Path(row["run_dir"]) / "config.yaml").is_file() for row in rows)  # normal run directories
    runs, summary = html_tables(nb)[:2]
    assert runs.count("<tr") == len(values) * len(seeds)
    assert summary.count("<tr") == len(values)
    best = recomputed_best(rows, by, 0.10)
    shown = best if isinstance(best, str) else f"{best:g}"
    assert re.search(rf"best {re.escape(by)}: {re.escape(shown)} \(domain score [0-9.]+ ± [0-9.]+", stdout(nb))
    assert (folder / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert outputs(nb, "image/png")
    return rows


def test_mixing_ratios_sweeps_seeds_tabulates_plots_and_reuses_its_runs(shared):
    root = shared["root"]
    folder = root / "runs" / "mixing_ratios"
    overrides = {"RATIOS": RATIOS, "SEEDS": SEEDS, "SWEEP_DIR": str(folder),
                 "SHARED_DIR": str(shared.get("data_dir", root / "data")), "TRAIN": TRAIN, "EVAL": EVAL}
    nb = execute("mixing_ratios.ipynb", overrides, root)
    rows = check_sweep(nb, folder, "general_ratio", RATIOS, SEEDS, "mixing_ratios.png")
    for seed in SEEDS:  # one base model per seed (its held-out split), evaluated once and shared by the ratios
        assert len({row["general_loss_before"] for row in rows if row["seed"] == seed}) == 1
    assert f"runs: {{'trained': {len(RATIOS) * len(SEEDS)}}}" in stdout(nb)

    again = execute("mixing_ratios.ipynb", overrides, root)  # the same folder: every run reused, none trained
    assert f"runs: {{'reused': {len(RATIOS) * len(SEEDS)}}}" in stdout(again)
    assert re.search(r"best general_ratio: .*", stdout(again)).group() == re.search(r"best general_ratio: .*", stdout(nb)).group()


def test_data_amount_sweeps_shares_of_the_domain_training_set(shared):
    root = shared["root"]
    folder = root / "runs" / "data_amount"
    fractions = [0.25, 1.0]
    nb = execute("data_amount.ipynb", {"FRACTIONS": fractions, "SEEDS": [0], "PARALLEL": 1, "SWEEP_DIR": str(folder),
                                       "SHARED_DIR": str(shared.get("data_dir", root / "data")), "TRAIN": TRAIN,
                                       "EVAL": EVAL}, root)
    rows = check_sweep(nb, folder, "domain_fraction", fractions, [0], "data_amount.png")
    domain = [json.loads((Path(row["run_dir"]) / "data" / "mixture" / "manifest.json").read_text())["samples"]["domain"]
              for row in rows]
    assert domain[0] == round(domain[1] / 4)  # a quarter of the domain training samples


def test_tuning_mode_sweeps_full_partial_and_lora(shared):
    root = shared["root"]
    folder = root / "runs" / "tuning_mode"
    modes = ["partial:mlp", "lora"]
    nb = execute("tuning_mode.ipynb", {"MODES": modes, "SEEDS": [0], "PARALLEL": 1, "SWEEP_DIR": str(folder),
                                       "SHARED_DIR": str(shared.get("data_dir", root / "data")), "TRAIN": TRAIN,
                                       "EVAL": EVAL}, root)
    rows = check_sweep(nb, folder, "value", modes, [0], "tuning_mode.png")
    assert [row["train.mode"] for row in rows] == ["partial", "lora"]
