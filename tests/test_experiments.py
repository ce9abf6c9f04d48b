"""adapt.experiments: the results store (reuse, resume, other settings refused), the summary over
seeds and the best-point rule with its "not distinguishable" verdict, the domain-data share."""

from __future__ import annotations

import json

import pytest

from adapt.errors import AdaptError

TRAIN = {"max_steps": 2, "max_tiles": 1, "pack_tokens": 1024, "pack_tiles": 4, "dataloader_num_workers": 0,
         "save_steps": 1, "logging_steps": 1}
EVAL = {"holdout": 3, "general_holdout": 3, "max_new_tokens": 4, "blind": False}


def test_a_sweep_folder_reuses_finished_runs_and_resumes_an_interrupted_one(tmp_path, monkeypatch):
    from adapt import api, experiments

    calls: list[bool] = []
    real_train = api.train

    def train(*args, **kwargs):
        calls.append(kwargs["resume"])
        if len(calls) == 2:  # the second run is killed (Ctrl-C) when its training starts
            raise KeyboardInterrupt
        return real_train(*args, **kwargs)

    monkeypatch.setattr(api, "train", train)
    folder, base, points = tmp_path / "sweep", api.RunConfig(train=TRAIN, eval=EVAL), experiments.ratio_points([0, 0.5])
    with pytest.raises(KeyboardInterrupt):
        experiments.run_sweep(folder, points, base=base, seeds=[0], progress=False)
    index = json.loads((folder / "sweep.json").read_text())["runs"]
    assert [(run["point"], run["status"]) for run in index] == [("r0", "trained"), ("r0.5", "interrupted")]
    assert (folder / "r0-s0" / "eval" / "after.json").is_file() and not (folder / "r0.5-s0" / "eval" / "after.json").exists()
    assert (folder / "r0.5-s0" / "eval" / "before.json").is_file()  # its start (data, base evaluation) is kept

    rows = experiments.run_sweep(folder, points, base=base, seeds=[0], progress=False)
    assert [row["status"] for row in rows] == ["reused", "resumed"]
    assert calls == [False, False, True]  # the finished run is not trained again; the other resumes
    assert [row["steps"] for row in rows] == [2, 2]
    assert all(row["domain_after"] is not None and row["general_loss_after"] is not None for row in rows)

    again = experiments.run_sweep(folder, points, base=base, seeds=[0], progress=False)
    assert calls == [False, False, True]  # trains nothing
    assert [row["status"] for row in again] == ["reused", "reused"]
    assert [{k: v for k, v in row.items() if k != "status"} for row in again] == \
           [{k: v for k, v in row.items() if k != "status"} for row in rows]
    assert experiments.load_sweep(folder) == again
    (folder / "sweep.json").unlink()  # the run directories are the store; the index is rebuilt from them
    rebuilt = experiments.run_sweep(folder, points, base=base, seeds=[0], progress=False)
    assert [(row["status"], row["steps"]) for row in rebuilt] == [("reused", 2), ("reused", 2)]
    by_api = api.sweep([0, 0.5], runs_dir=tmp_path, name="sweep", seeds=[0], progress=False, train=TRAIN, eval=EVAL)
    assert [row["status"] for row in by_api] == ["reused", "reused"] and calls == [False, False, True]
    assert api.best_ratio(by_api)["general_ratio"] == experiments.best(again, by="general_ratio").value

    other = api.RunConfig(train={**TRAIN, "max_steps": 3}, eval=EVAL)
    with pytest.raises(AdaptError, match="other settings") as err:
        experiments.run_sweep(folder, points, base=other, seeds=[0], progress=False)
    assert "r0-s0" in str(err.value)


def row(ratio, seed, score, general_loss, domain_loss=1.0):
    return {"general_ratio": ratio, "seed": seed, "domain_after": score, "general_loss_after": general_loss,
            "domain_loss_after": domain_loss}


def test_best_uses_means_over_seeds_and_says_when_the_best_is_not_distinguishable():
    from adapt import experiments

    rows = [row(0.0, 0, 0.95, 3.0), row(0.0, 1, 0.97, 3.2),      # best domain score, but forgets general skill
            row(0.25, 0, 0.80, 2.1), row(0.25, 1, 0.90, 2.1),    # mean 0.85 +- 0.071
            row(0.5, 0, 0.70, 2.0), row(0.5, 1, 0.84, 2.0),      # mean 0.77 +- 0.099: within one combined std
            row(0.75, 0, 0.30, 2.0), row(0.75, 1, 0.32, 2.0)]    # clearly worse
    choice = experiments.best(rows, by="general_ratio", tolerance=0.1)
    assert choice.value == 0.25 and choice.row["n"] == 2
    assert choice.row["domain_after"] == pytest.approx(0.85)
    assert choice.row["domain_after_std"] == pytest.approx(0.0707, abs=1e-4)
    assert (choice.row["domain_after_min"], choice.row["domain_after_max"]) == (0.80, 0.90)
    assert choice.kept == [0.25, 0.5, 0.75]
    assert choice.ties == [0.5] and not choice.distinguishable
    assert "NOT distinguishable from 0.5" in choice.message

    apart = [r for r in rows if r["general_ratio"] != 0.5]
    clear = experiments.best(apart, by="general_ratio", tolerance=0.1)
    assert clear.value == 0.25 and clear.distinguishable and "distinguishable from every other" in clear.message

    assert clear.borderline == []  # 0.0 forgets for certain: 3.1 +- 0.14 is far above the 2.2 limit
    close = [row(0.0, 0, 0.95, 2.0), row(0.0, 1, 0.97, 2.6),   # mean 2.3 +- 0.42: over the 2.2 limit, within one std
             row(0.5, 0, 0.60, 2.0), row(0.5, 1, 0.62, 2.0)]
    unsure = experiments.best(close, by="general_ratio", tolerance=0.1)
    assert unsure.value == 0.5 and unsure.kept == [0.5] and unsure.borderline == [0.0]
    assert "the only point whose mean general answer loss is within the tolerance" in unsure.message
    assert "within one combined std of its limit: 0 (more seeds would tell)" in unsure.message

    one_seed = experiments.best([r for r in rows if r["seed"] == 0], by="general_ratio", tolerance=0.1)
    assert one_seed.value == 0.25 and "one seed: no spread measured" in one_seed.message


def test_best_ratio_keeps_general_skill_then_maximises_the_domain_score():
    from adapt import api

    def single(ratio, score, domain_loss, general_loss):
        return {"general_ratio": ratio, "domain_after": score, "domain_loss_after": domain_loss,
                "general_loss_after": general_loss}

    rows = [single(0.0, 0.9, 1.0, 3.0),    # best domain score, but forgets: 3.0 > 2.0 * 1.1
            single(0.25, 0.8, 1.2, 2.15),  # within 10% of the lowest general loss (2.0)
            single(0.5, 0.8, 1.1, 2.0),    # same score as 0.25, lower domain loss: wins the tie
            single(0.75, 0.6, 1.5, 2.05)]
    assert api.best_ratio(rows)["general_ratio"] == 0.5
    assert api.best_ratio(rows, tolerance=0.6)["general_ratio"] == 0.0  # 3.0 <= 2.0 * 1.6
    assert api.best_ratio(rows, tolerance=0.0)["general_ratio"] == 0.5
    tied = [single(0.5, 0.7, 1.0, 2.0), single(0.25, 0.7, 1.0, 2.0)]
    assert api.best_ratio(tied)["general_ratio"] == 0.25  # full tie: less general data
    no_general = [single(0.0, 0.5, 1.0, None), single(0.25, 0.6, 1.0, None)]
    assert api.best_ratio(no_general)["general_ratio"] == 0.25
    with pytest.raises(AdaptError):
        api.best_ratio([])


def test_points_name_their_runs_and_bad_modes_are_user_errors(tmp_path):
    from adapt import experiments
    from adapt.config import RunConfig

    modes = experiments.mode_points(["full", "partial:mlp+llm", "lora"])
    assert [p.label for p in modes] == ["full", "partial-mlp+llm", "lora"]
    base = RunConfig(train={"max_steps": 5, "mode": "full"})
    config = experiments.point_config(base, modes[1], 2, tmp_path)
    assert config.train == {"max_steps": 5, "mode": "partial", "partial": "mlp+llm"}  # merged into the base's
    assert (config.seed, config.name, config.runs_dir) == (2, "partial-mlp+llm-s2", str(tmp_path))
    fraction = experiments.point_config(base, experiments.fraction_points([0.25])[0], 0, tmp_path)
    assert fraction.domain_fraction == 0.25 and fraction.name == "f0.25-s0"
    for bad in ("partial", "lora:x", "frozen"):
        with pytest.raises(AdaptError, match="unknown tuning mode"):
            experiments.mode_points([bad])
    with pytest.raises(AdaptError, match="domain_fraction"):
        RunConfig(domain_fraction=0)


def test_take_fraction_is_seeded_and_nested():
    from adapt.data.mixing import Source
    from adapt.data.splits import take_fraction

    source = Source("s", "/", [{"id": str(i), "conversations": []} for i in range(40)], "domain")
    quarter, half = take_fraction(source, 0.25, 3), take_fraction(source, 0.5, 3)
    assert (len(quarter), len(half)) == (10, 20)
    ids = [r["id"] for r in half.records]
    assert {r["id"] for r in quarter.records} <= set(ids) and ids == sorted(ids, key=int)  # nested, in order
    assert take_fraction(source, 0.25, 3).records == quarter.records
    assert take_fraction(source, 0.25, 4).records != quarter.records
    assert take_fraction(source, 1.0, 3) is source and len(take_fraction(source, 0.001, 3)) == 1


def test_adapt_sweep_refuses_bad_options_before_any_run(tmp_path, capsys):
    from adapt.cli import main

    assert main(["sweep", "--modes", "frozen", "--runs-dir", str(tmp_path)]) == 2
    assert "unknown tuning mode 'frozen'" in capsys.readouterr().err
    assert main(["sweep", "--ratios", "0", "0.5", "--seeds", "1", "1", "--runs-dir", str(tmp_path)]) == 2
    assert "must be distinct" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # one setting per sweep
        main(["sweep", "--ratios", "0", "--modes", "full"])
    assert not any(tmp_path.iterdir())  # nothing was started


def test_parallel_runs_give_the_sequential_results(tmp_path):
    """Two runs at once in worker processes: the same rows as one after the other (losses to float
    rounding: a worker trains on its share of the cores), indexed, and reused by a later call."""
    from adapt import api, experiments

    base, points = api.RunConfig(train=TRAIN, eval=EVAL), experiments.ratio_points([0, 0.5])
    sequential = experiments.run_sweep(tmp_path / "one", points, base=base, seeds=[0], progress=False,
                                       shared_dir=tmp_path / "shared")
    parallel = experiments.run_sweep(tmp_path / "two", points, base=base, seeds=[0], progress=False,
                                     shared_dir=tmp_path / "shared", parallel=2)
    assert [(row["point"], row["status"], row["steps"]) for row in parallel] == [("r0", "trained", 2), ("r0.5", "trained", 2)]
    for one, two in zip(sequential, parallel):
        assert one["domain_after"] == two["domain_after"]
        assert one["general_loss_after"] == pytest.approx(two["general_loss_after"], rel=1e-3)
    assert {run["status"] for run in json.loads((tmp_path / "two" / "sweep.json").read_text())["runs"]} == {"trained"}
    again = experiments.run_sweep(tmp_path / "two", points, base=base, seeds=[0], progress=False,
                                  shared_dir=tmp_path / "shared", parallel=2)
    assert [row["status"] for row in again] == ["reused", "reused"]
    with pytest.raises(AdaptError, match="parallel"):
        experiments.run_sweep(tmp_path / "three", points, base=base, seeds=[0], parallel=0)
