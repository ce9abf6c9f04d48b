"""Experiments: sweeps of full runs over any RunConfig setting, each point over several seeds, kept
in one results store, and the best-point rule that says when the best is not distinguishable.

    from adapt import experiments
    base = RunConfig(domain="driving")                            # the demo; set model/data for real runs
    rows = experiments.run_sweep("runs/ratios", experiments.ratio_points([0, 0.25, 0.5]), base=base)
    choice = experiments.best(rows, by="general_ratio")          # mean and spread over the seeds
    print(choice.message)

The three ablations of Mini-InternVL are points over `general_ratio` (`ratio_points`), over the
share of the domain training set (`fraction_points`, RunConfig.domain_fraction) and over the tuning
mode (`mode_points`: full, the partial presets, LoRA); a Point may change any RunConfig field.

Results store: every run is a normal run directory `<folder>/<point>-s<seed>` and `<folder>/sweep.json`
indexes them (parameters, status, steps, scores). Calling `run_sweep` again with the same folder
reuses finished runs (no training), resumes an interrupted one from its last checkpoint and runs
the missing ones; a run whose saved config differs from the requested one is an error, never
silently reused.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from adapt.config import RunConfig, parse_run_config, read_run_config
from adapt.console import is_main_process
from adapt.errors import AdaptError
from adapt.fileio import atomic_write_text

INDEX = "sweep.json"
DEFAULT_SEEDS = (0, 1, 2)
# the per-seed values a point's summary gives as mean and spread
METRICS = ("domain_after", "domain_loss_after", "general_after", "general_loss_after", "domain_chance",
           "domain_before", "general_loss_before")
# tuning-mode labels: "full", "lora", "partial:<preset>" (presets of adapt.training.trainer.partial_patterns)
MODES = ("full", "partial:mlp", "partial:mlp+llm", "lora")
# RunConfig fields that say where and how fast a run goes, not what it computes: a finished run is
# reused whatever they are (the same folder given as a relative or an absolute path)
OPERATIONAL = ("runs_dir", "num_proc")


@dataclass
class Point:
    """One setting of a sweep: `changes` are RunConfig fields over the sweep's base config (a
    `train` / `eval` dict is merged into the base's); `label` names its runs and its table rows."""

    label: str
    changes: dict[str, Any]
    value: Any = None  # what the plot's x axis shows (the ratio, the fraction, the mode label)

    def __post_init__(self) -> None:
        if self.value is None:
            self.value = self.label


def ratio_points(ratios: Sequence[float]) -> list[Point]:
    """Points over the general-data ratio (the share of general samples in training)."""
    return [Point(f"r{ratio:g}", {"general_ratio": float(ratio)}, float(ratio)) for ratio in ratios]


def fraction_points(fractions: Sequence[float]) -> list[Point]:
    """Points over the share of the domain training set used (RunConfig.domain_fraction), at the base mix."""
    return [Point(f"f{fraction:g}", {"domain_fraction": float(fraction)}, float(fraction)) for fraction in fractions]


def mode_points(modes: Sequence[str] = MODES) -> list[Point]:
    """Points over the tuning mode: "full", "lora" or "partial:<preset>" (mlp, mlp+llm, vit-last-N)."""
    points = []
    for mode in modes:
        kind, _, preset = mode.partition(":")
        if kind not in ("full", "partial", "lora") or bool(preset) != (kind == "partial"):
            raise AdaptError(f"unknown tuning mode {mode!r}",
                             hint="use full, lora or partial:PRESET (partial:mlp, partial:mlp+llm, partial:vit-last-N)")
        train = {"mode": kind, **({"partial": preset} if preset else {})}
        points.append(Point(re.sub(r"[^A-Za-z0-9.+=-]", "-", mode), {"train": train}, mode))
    return points


def point_config(base: RunConfig, point: Point, seed: int, folder: Path) -> RunConfig:
    """The RunConfig of one run of a sweep: base < point changes, with its seed and stable name."""
    data = base.to_dict()
    for key, value in point.changes.items():
        data[key] = {**data[key], **value} if isinstance(data.get(key), dict) and isinstance(value, dict) else value
    data.update(seed=seed, runs_dir=str(folder), name=f"{point.label}-s{seed}")
    return parse_run_config(data, base.source_file)


def run_sweep(folder: str | Path, points: Sequence[Point], *, base: RunConfig | None = None,
              seeds: Sequence[int] = DEFAULT_SEEDS, shared_dir: str | Path | None = None,
              progress: bool = True, parallel: int = 1) -> list[dict[str, Any]]:
    """Run every point x seed (each a full `api.run` without export) into `folder`, reusing finished
    runs and resuming an interrupted one; the data is formatted once in `shared_dir` (default
    <folder>/shared), and the base model is evaluated once per seed (its held-out split).

    `parallel` runs that many at once, each in its own process: on GPUs one per GPU (set
    CUDA_VISIBLE_DEVICES per process), on CPU the cores shared out (a run's model then uses
    cores/parallel threads: the small demo model trains about as fast on one thread as on two, so two
    runs at once take about half the time of one after the other).

    Returns one row per point x seed: point, value, seed, the point's changes, status (trained,
    resumed, reused), steps, the scores of RunResult.scores() and run_dir; `<folder>/sweep.json`
    indexes them after each run. `progress`: a bar over the runs (a widget in Jupyter); each run's
    own progress stays in its logs/run.log.
    """
    from adapt import api

    if not points or not seeds:
        raise AdaptError("a sweep needs at least one point and one seed")
    if parallel < 1:
        raise AdaptError(f"parallel must be 1 or more (got {parallel})")
    labels = [point.label for point in points]
    if len(set(labels)) != len(labels) or len(set(seeds)) != len(seeds):
        raise AdaptError(f"sweep points and seeds must be distinct (points {labels}, seeds {list(seeds)})")
    folder = Path(folder)
    base = base or RunConfig()
    shared = Path(shared_dir) if shared_dir else folder / "shared"
    index = _read_index(folder)
    rows = []
    # seed-major: an interrupted sweep has whole curves (every point of the first seeds) to show
    jobs = []
    for seed in seeds:
        for point in points:
            config = point_config(base, point, seed, folder)
            run_dir = folder / str(config.name)
            row = {"point": point.label, "value": point.value, "seed": seed, **_flat(point.changes)}
            jobs.append((config, run_dir, row, _state(run_dir, config)))
    with tqdm(total=len(jobs), desc="sweep runs", unit="run", disable=not progress) as bar:
        def done(run_dir: Path, row: dict[str, Any], status: str, steps: int | None, scores: dict[str, Any]) -> None:
            row.update(status=status, steps=steps, **scores, run_dir=str(run_dir))
            _record(folder, index, run_dir.name, row)
            rows.append(row)
            bar.set_postfix_str(f"{row['point']} seed {row['seed']} {status}")
            bar.update()

        for _config, run_dir, row, status in jobs:
            if status == "reused":
                result = _finished(run_dir, index.get(run_dir.name, {}).get("steps"))
                done(run_dir, row, status, result.steps, result.scores())
        todo = [job for job in jobs if job[3] != "reused"]
        if parallel > 1 and len(todo) > 1:
            api.format_data(todo[0][0], shared)  # once, before the runs that share it start
            _run_parallel(todo, shared, parallel, folder, index, done)
        else:
            for config, run_dir, row, status in todo:
                _record(folder, index, run_dir.name, {**row, "status": "running", "run_dir": str(run_dir)})
                try:
                    steps, scores = _run_one(config, run_dir, status, shared)
                except BaseException as err:  # noted in the index (Ctrl-C too), then raised as it was
                    _record(folder, index, run_dir.name, _failed(row, run_dir, err))
                    raise
                done(run_dir, row, status, steps, scores)
    order = {label: i for i, label in enumerate(labels)}
    rows.sort(key=lambda row: (order[row["point"]], list(seeds).index(row["seed"])))
    return rows


def _run_one(config: RunConfig, run_dir: Path, status: str, shared: Path) -> tuple[int | None, dict[str, Any]]:
    """One run of a sweep (here or in a worker process): its steps and scores."""
    from adapt import api

    if status == "resumed":
        result = api.run(resume=run_dir, shared_dir=shared, export=False, progress=False)
    else:
        result = api.run(config, shared_dir=shared, export=False, progress=False)
    return result.steps, result.scores()


def _failed(row: dict[str, Any], run_dir: Path, err: BaseException) -> dict[str, Any]:
    return {**row, "status": "interrupted" if isinstance(err, KeyboardInterrupt) else "failed",
            "error": str(err) or type(err).__name__, "run_dir": str(run_dir)}


def _start_sweep_worker(slots: Any, threads: int) -> None:
    """Worker initializer: a GPU of its own (when there are enough), else its share of the cores,
    pinned (CPU affinity), so the run's model threads and loader workers (sized from the cores it
    may use) stay off the other runs' cores."""
    import os

    import torch

    slot = slots.get()
    if torch.cuda.is_available() and torch.cuda.device_count() > slot:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(slot)
    elif hasattr(os, "sched_setaffinity"):
        cores = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, cores[slot * threads:(slot + 1) * threads] or cores)
    torch.set_num_threads(threads)


def _run_parallel(todo: list[tuple[RunConfig, Path, dict[str, Any], str]], shared: Path, parallel: int,
                  folder: Path, index: dict[str, dict[str, Any]], done: Any) -> None:
    """The runs of `todo` in `parallel` worker processes (spawned: no fork of a process holding torch
    threads); each is recorded as it finishes. A failure stops the others and is raised."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    from adapt.config import available_cores

    processes = min(parallel, len(todo))
    context = multiprocessing.get_context("spawn")
    slots = context.Queue()
    for slot in range(processes):
        slots.put(slot)
    threads = max(1, available_cores() // processes)
    with ProcessPoolExecutor(processes, mp_context=context, initializer=_start_sweep_worker,
                             initargs=(slots, threads)) as pool:
        futures = {}
        for config, run_dir, row, status in todo:  # "queued": a worker takes it when one is free
            _record(folder, index, run_dir.name, {**row, "status": "queued", "run_dir": str(run_dir)})
            futures[pool.submit(_run_one, config, run_dir, status, shared)] = (run_dir, row, status)
        pending = set(futures)
        try:
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    run_dir, row, status = futures[future]
                    error = future.exception()
                    if error is not None:
                        _record(folder, index, run_dir.name, _failed(row, run_dir, error))
                        raise error
                    done(run_dir, row, status, *future.result())
        except BaseException:
            for future in pending:  # not started yet: noted as interrupted; running ones finish first
                if future.cancel():
                    run_dir, row, _ = futures[future]
                    _record(folder, index, run_dir.name, _failed(row, run_dir, KeyboardInterrupt()))
            raise


def _state(run_dir: Path, config: RunConfig) -> str:
    """"reused" (finished), "resumed" (started, unfinished) or "trained" (new) for a run directory;
    a directory made by another config is an error, not a result of this sweep."""
    if not (run_dir / "config.yaml").is_file():
        return "trained"
    saved, wanted = read_run_config(run_dir).to_dict(), config.to_dict()
    differ = sorted(key for key in saved if key not in OPERATIONAL and saved[key] != wanted[key])
    if differ:
        raise AdaptError(f"this sweep folder holds a run with other settings ({', '.join(differ)} differ)",
                         path=run_dir, hint="use another sweep folder for other settings, or delete that run")
    return "reused" if (run_dir / "eval" / "after.json").is_file() else "resumed"


def _finished(run_dir: Path, steps: int | None) -> Any:
    """The RunResult of a finished run from its files; its steps from the index, else its last checkpoint."""
    from adapt import api

    def report(name: str) -> dict[str, Any]:
        return json.loads((run_dir / "eval" / f"{name}.json").read_text())

    if steps is None:
        states = sorted(run_dir.glob("checkpoints/checkpoint-*/trainer_state.json"),
                        key=lambda path: int(path.parent.name.rpartition("-")[2]))
        steps = json.loads(states[-1].read_text())["global_step"] if states else None
    return api.RunResult(run_dir, report("before"), report("after"), None, steps)


def _flat(changes: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A point's changes as table columns: {"train": {"mode": "lora"}} -> {"train.mode": "lora"}."""
    out: dict[str, Any] = {}
    for key, value in changes.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _read_index(folder: Path) -> dict[str, dict[str, Any]]:
    path = folder / INDEX
    if not path.is_file():
        return {}
    try:
        runs = json.loads(path.read_text())["runs"]
        return {Path(run["run_dir"]).name: run for run in runs}
    except (ValueError, KeyError, TypeError):
        raise AdaptError("the sweep index is not a sweep.json written by adapt", path=path,
                         hint="delete it: the run directories next to it are reused without it") from None


def _record(folder: Path, index: dict[str, dict[str, Any]], name: str, row: dict[str, Any]) -> None:
    """Update one run's entry and rewrite the index (after every run, so an interrupted sweep has it)."""
    index[name] = row
    if is_main_process():
        atomic_write_text(folder / INDEX, json.dumps({"runs": list(index.values())}, indent=2, default=str))


def load_sweep(folder: str | Path) -> list[dict[str, Any]]:
    """The rows of a sweep folder's index (every run it holds, whatever call ran it)."""
    return list(_read_index(Path(folder)).values())


# ----------------------------------------------------------------------------------------------
# summary and the best point
# ----------------------------------------------------------------------------------------------
def summarize(rows: Sequence[dict[str, Any]], *, by: str = "value") -> list[dict[str, Any]]:
    """One row per point (in first-seen order): `by`, n (seeds), and for each metric its mean,
    `<metric>_std` (sample std; 0 for one seed), `<metric>_min` and `<metric>_max`."""
    groups: dict[Any, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row[by], []).append(row)
    out = []
    for key, members in groups.items():
        summary: dict[str, Any] = {by: key, "n": len(members)}
        for metric in METRICS:
            values = [m[metric] for m in members if m.get(metric) is not None]
            summary[metric] = statistics.fmean(values) if values else None
            summary[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else (0.0 if values else None)
            summary[f"{metric}_min"] = min(values, default=None)
            summary[f"{metric}_max"] = max(values, default=None)
        out.append(summary)
    return out


@dataclass
class Choice:
    """The best point and how sure it is: `ties` are the kept points whose mean domain score is within
    one combined spread of the best's (not distinguishable with these seeds)."""

    row: dict[str, Any]
    kept: list[Any]
    ties: list[Any]
    by: str
    summary: list[dict[str, Any]] = field(default_factory=list)
    # points left out by the general-loss tolerance whose mean loss is within one combined std of the
    # limit: with these seeds it is not established that they lose general skill
    borderline: list[Any] = field(default_factory=list)

    @property
    def value(self) -> Any:
        return self.row[self.by]

    @property
    def distinguishable(self) -> bool:
        return not self.ties

    @property
    def message(self) -> str:
        row, n = self.row, self.row["n"]
        score = _pm(row, "domain_after")
        loss = _pm(row, "general_loss_after")
        text = (f"best {self.by}: {_fmt(self.value)} (domain score {score}, general answer loss {loss}; "
                f"mean ± std over {n} seed{'s' if n != 1 else ''})")
        if n < 2:
            return text + "; one seed: no spread measured, so no difference between points is established"
        if self.ties:
            text += (f"; NOT distinguishable from {', '.join(_fmt(t) for t in self.ties)} "
                     "(mean domain scores within one combined std)")
        elif len(self.kept) > 1:
            text += "; distinguishable from every other kept point (mean domain scores differ by more than one combined std)"
        else:
            text += "; the only point whose mean general answer loss is within the tolerance"
        if self.borderline:
            text += (f"; left out by the general-loss tolerance but within one combined std of its limit: "
                     f"{', '.join(_fmt(b) for b in self.borderline)} (more seeds would tell)")
        return text


def best(rows: Sequence[dict[str, Any]], *, by: str = "value", tolerance: float = 0.1) -> Choice:
    """The point with the best domain/general trade-off, from the means over seeds.

    A point keeps general skill when its mean general answer loss after training is within
    `tolerance` (relative: 0.1 = 10%) of the lowest mean of the sweep; the answer loss is the
    teacher-forced loss of the held-out general answers, which moves smoothly where a small model's
    generations are all wrong. Among those points the best has the highest mean domain score; ties
    go to the lower mean domain answer loss, then to the smaller value (for a ratio: less general
    data), then to the earlier point. Kept points whose mean domain score differs from the best's by
    at most sqrt(std_best² + std_other²) are reported as not distinguishable from it; points left out
    whose mean general loss is within one combined std of the limit are reported as borderline.
    """
    if not rows:
        raise AdaptError("choosing the best point needs at least one sweep row")
    summary = summarize(rows, by=by)
    losses = [s["general_loss_after"] for s in summary if s["general_loss_after"] is not None]
    limit = min(losses) * (1 + tolerance) if losses else None
    kept = [s for s in summary if limit is None or s["general_loss_after"] is None or s["general_loss_after"] <= limit]

    def rank(item: tuple[int, dict[str, Any]]) -> tuple[float, float, float, int]:
        order, s = item
        score, loss, value = s["domain_after"], s["domain_loss_after"], s[by]
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        return (-(score if score is not None else -math.inf), loss if loss is not None else math.inf,
                value if numeric else 0.0, order)

    top = min(enumerate(kept), key=rank)[1]
    ties = []
    if top["n"] > 1:
        for s in kept:
            if s is top or s["domain_after"] is None or top["domain_after"] is None:
                continue
            spread = math.hypot(top["domain_after_std"] or 0.0, s["domain_after_std"] or 0.0)
            if abs(top["domain_after"] - s["domain_after"]) <= spread:
                ties.append(s[by])
    borderline = []
    if limit is not None and top["n"] > 1:
        lowest = min((s for s in summary if s["general_loss_after"] is not None), key=lambda s: s["general_loss_after"])
        for s in summary:
            if s not in kept and s["general_loss_after"] - limit <= math.hypot(
                    s["general_loss_after_std"] or 0.0, (1 + tolerance) * (lowest["general_loss_after_std"] or 0.0)):
                borderline.append(s[by])
    return Choice(top, [s[by] for s in kept], ties, by, summary, borderline)


def _fmt(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _pm(row: dict[str, Any], metric: str) -> str:
    mean, std = row.get(metric), row.get(f"{metric}_std")
    return "n/a" if mean is None else f"{mean:.3f} ± {std or 0.0:.3f}"


# ----------------------------------------------------------------------------------------------
# the plot the notebooks show
# ----------------------------------------------------------------------------------------------
def plot(rows: Sequence[dict[str, Any]], path: str | Path, *, xlabel: str, title: str,
         choice: Choice | None = None, tolerance: float | None = None, log_x: bool = False) -> Any:
    """Domain score (with chance) and answer losses per point: each seed as a dot, the mean as a line
    with a ± std band; the chosen point marked. Saved as PNG at `path`; returns the figure."""
    import matplotlib.pyplot as plt

    summary = choice.summary if choice is not None else summarize(rows)
    by = choice.by if choice is not None else "value"
    labels = [s[by] for s in summary]
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in labels)
    where = {v: (v if numeric else i) for i, v in enumerate(labels)}
    xs = [where[v] for v in labels]
    fig, (score_ax, loss_ax) = plt.subplots(1, 2, figsize=(11, 4))
    panels = ((score_ax, [("domain_after", "domain score", "tab:blue")]),
              (loss_ax, [("domain_loss_after", "domain answer loss", "tab:blue"),
                         ("general_loss_after", "general answer loss", "tab:orange")]))
    for ax, metrics in panels:
        for metric, name, color in metrics:
            means = [s[metric] if s[metric] is not None else math.nan for s in summary]
            stds = [s[f"{metric}_std"] or 0.0 for s in summary]
            ax.plot(xs, means, "o-", color=color, label=f"{name} (mean)")
            ax.fill_between(xs, [m - d for m, d in zip(means, stds)], [m + d for m, d in zip(means, stds)],
                            color=color, alpha=0.2, label="± std over seeds")
            dots = [(where[r[by]], r[metric]) for r in rows if r.get(metric) is not None]
            ax.scatter([x for x, _ in dots], [y for _, y in dots], s=12, color=color, alpha=0.5)
    chance = [s["domain_chance"] for s in summary if s["domain_chance"] is not None]
    if chance:
        score_ax.axhline(statistics.fmean(chance), color="grey", linestyle="--", linewidth=1, label="chance")
    general = [s["general_loss_after"] for s in summary if s["general_loss_after"] is not None]
    if tolerance is not None and general:
        loss_ax.axhline(min(general) * (1 + tolerance), color="grey", linewidth=0.8, linestyle=":",
                        label=f"general loss limit (+{tolerance:.0%})")
    score_ax.set(xlabel=xlabel, ylabel="domain score (after training)", title="Domain score")
    loss_ax.set(xlabel=xlabel, ylabel="answer loss (after training, log scale)", title="Answer losses (held out)",
                yscale="log")  # a forgotten skill's loss is many times a kept one's
    for ax in (score_ax, loss_ax):
        if not numeric:
            ax.set_xticks(xs, [str(v) for v in labels])
        elif log_x:
            ax.set_xscale("log", base=2)
        if choice is not None:
            ax.axvline(where[choice.value], color="tab:red", linewidth=1.5, alpha=0.6,
                       label=f"best: {_fmt(choice.value)}")
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return fig
