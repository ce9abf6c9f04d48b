"""Staged runs: several trainings in order, in one run directory (the InternVL 2.5 recipe: projector
warm-up, optional ViT incremental learning, full instruction tuning).

Each stage is an ordinary `adapt.training.trainer.train` call with its own TrainConfig (the run's
training options, overridden by the stage's) into `<run>/stages/<k>-<name>/checkpoints`. A stage that
finished writes its weights and a completion marker; on resume, finished stages are skipped, the
model restarts from the last finished stage's weights, and the first unfinished stage resumes from
its own last complete checkpoint (so a kill inside any stage loses at most `save_steps` steps).
A LoRA stage is merged into the weights when it ends, so the next stage starts from a plain model.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from adapt.checkpoints.models import Loaded
from adapt.data.records import Record
from adapt.errors import AdaptError
from adapt.fileio import atomic_write_text
from adapt.training.trainer import TrainConfig, TrainResult, train

STAGE_MARKER = "stage-complete.json"
# Keys of a stage that are not training options: its name and its own data mixture.
DATA_KEYS = ("data", "general", "general_ratio", "mix_by")
# What a stage trains is always its own choice: these are never inherited from the run's options.
TUNING_KEYS = ("mode", "partial", "trainable")

Entries = Sequence[tuple[Record, str]]


@dataclass
class Stage:
    """One stage: its name, its training options (over the run's) and optionally its own mixture."""

    name: str
    train: dict[str, Any]
    data: dict[str, Any] = field(default_factory=dict)  # RunConfig keys of its own mixture (data, general, ...)


def parse_stages(raw: Any, path: Path | None = None) -> list[Stage]:
    """Stages from a run config's `stages` list; each names at least `name` and `mode`."""
    if not isinstance(raw, list) or not raw:
        raise AdaptError("stages is a non-empty list of stage mappings", path=path,
                         hint="e.g. stages: [{name: projector, mode: partial, partial: mlp, learning_rate: 2.0e-4}]")
    stages, seen = [], set()
    for number, item in enumerate(raw, 1):
        if not isinstance(item, dict):
            raise AdaptError(f"stage {number} is {item!r}, not a mapping", path=path)
        item = dict(item)
        name = item.pop("name", None)
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name in seen:
            raise AdaptError(f"stage {number} needs a unique name of letters, digits, '.', '_' or '-' (got {name!r})",
                             path=path)
        if "mode" not in item:
            raise AdaptError(f"stage {name} does not say what it trains", path=path,
                             hint="give it mode: full | partial (with partial: mlp | mlp+llm | vit-last-N, or "
                                  "trainable: [regex, ...]) | lora")
        seen.add(name)
        data = {key: item.pop(key) for key in DATA_KEYS if key in item}
        stages.append(Stage(name, item, data))
    return stages


def stage_config(base: TrainConfig, stage: Stage) -> TrainConfig:
    """The run's training options overridden by the stage's; the tuning mode comes from the stage only."""
    options = {k: v for k, v in asdict(base).items() if k not in TUNING_KEYS}
    try:
        return TrainConfig.from_dict({**options, **stage.train})
    except AdaptError as err:
        raise AdaptError(f"stage {stage.name}: {err.message}", path=err.path, hint=err.hint) from None


def check_stages(raw: Any, base: TrainConfig, path: Path | None = None) -> list[Stage]:
    """Every stage parsed and its TrainConfig checked, before anything runs."""
    stages = parse_stages(raw, path)
    for stage in stages:
        stage_config(base, stage)
    return stages


def stage_dir(run_dir: str | Path, index: int, stage: Stage) -> Path:
    return Path(run_dir) / "stages" / f"{index + 1}-{stage.name}"


def is_complete(folder: Path) -> bool:
    return (folder / STAGE_MARKER).is_file()


@dataclass
class StagesResult:
    model: torch.nn.Module
    results: dict[str, TrainResult]  # stages trained by this call (finished ones skipped on resume are absent)
    steps: dict[str, int]  # optimizer steps of every stage, read from the markers


def _load_weights(model: torch.nn.Module, folder: Path) -> None:
    """A finished stage's weights into `model` (strict: every tensor, or a clear failure)."""
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    saved = type(model).from_pretrained(folder, dtype=dtype)
    model.load_state_dict(saved.state_dict(), strict=True)


def _plain(model: torch.nn.Module) -> torch.nn.Module:
    """The model with LoRA adapters merged in (the next stage trains the merged weights)."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


def train_stages(loaded: Loaded, stages: Sequence[Stage], entries_for: Callable[[Stage], Entries], base: TrainConfig,
                 run_dir: str | Path, *, resume: bool = False,
                 after_stage: Callable[[Stage, Loaded], Any] | None = None,
                 callbacks: Sequence[TrainerCallback] = (), progress: bool = True,
                 logging_dir: str | Path | None = None) -> StagesResult:
    """Train `stages` in order on `loaded.model` (replaced by each stage's result); `after_stage` runs
    after each (e.g. evaluation) and again for a stage whose evaluation a kill interrupted."""
    configs = [stage_config(base, stage) for stage in stages]  # every stage checked before any trains
    folders = [stage_dir(run_dir, i, stage) for i, stage in enumerate(stages)]
    if not resume and any(f.exists() for f in folders):
        raise AdaptError("the run directory already holds stages of an earlier run", path=Path(run_dir) / "stages",
                         hint="resume that run, or train into a new folder")
    done = [is_complete(f) for f in folders]
    finished = max((i for i, d in enumerate(done) if d), default=-1)
    if finished >= 0:
        _load_weights(loaded.model, folders[finished] / "model")
    results: dict[str, TrainResult] = {}
    for index, (stage, config, folder) in enumerate(zip(stages, configs, folders, strict=True)):
        if index <= finished:
            continue
        result = train(loaded, entries_for(stage), config, folder / "checkpoints", resume=resume,
                       callbacks=callbacks, progress=progress,
                       logging_dir=None if logging_dir is None else Path(logging_dir) / stage.name)
        model = _plain(result.model)
        if result.final_dir is not None:  # sharded training: the gathered weights are there
            _load_weights(model, result.final_dir)
        model.save_pretrained(folder / "model")
        loaded.model = model
        if after_stage is not None:
            after_stage(stage, loaded)
        atomic_write_text(folder / STAGE_MARKER, json.dumps({"stage": stage.name, "steps": result.steps,
                                                             "trainable": result.trainable}))
        results[stage.name] = result
        resume = True  # a later stage's folder is fresh; resuming one without checkpoints starts it
    steps = {stage.name: json.loads((f / STAGE_MARKER).read_text())["steps"] for stage, f in zip(stages, folders)}
    return StagesResult(loaded.model, results, steps)


def train_run_stages(config: Any, domain: Any, train_config: TrainConfig, eval_settings: dict[str, Any],
                     run_dir: Path, loaded: Loaded, mixture_entries: Entries, heldout: dict[str, Entries], *,
                     resume: bool, shared_dir: Path | None = None, progress: bool = True) -> TrainResult:
    """`adapt run` with a `stages` list: each stage on the run's mixture or its own (prepared under
    <run>/stages/<k>-<name>/data), evaluated on the run's held-out sets after it
    (<run>/eval/stage-<k>-<name>.json). Returns the last stage's result carrying the final model and
    the steps of all stages."""
    from adapt import api
    from adapt.evaluation import evaluator

    stages = check_stages(config.stages, train_config)
    eval_builder = api.make_builder(loaded, train_config, train=False)
    eval_kwargs = {"batch_size": eval_settings["batch_size"], "max_new_tokens": eval_settings["max_new_tokens"]}

    def entries_for(stage: Stage) -> Entries:
        if not stage.data:
            return mixture_entries
        index = next(i for i, s in enumerate(stages) if s.name == stage.name)
        own = type(config)(**{**config.to_dict(), **stage.data})
        data = api.prepare_data(own, domain, stage_config(train_config, stage), eval_settings,
                                stage_dir(run_dir, index, stage) / "data", loaded, shared_dir=shared_dir)
        return data.mixture.entries

    def after_stage(stage: Stage, trained: Loaded) -> None:
        if not api.is_main_process():
            return
        index = next(i for i, s in enumerate(stages) if s.name == stage.name)
        api.say(f"evaluating after stage {index + 1} ({stage.name})")
        report = evaluator.evaluate(trained, eval_builder, heldout, **eval_kwargs)
        evaluator.save_report(report, run_dir / "eval" / f"stage-{index + 1}-{stage.name}.json")

    result = train_stages(loaded, stages, entries_for, train_config, run_dir, resume=resume, after_stage=after_stage,
                          progress=progress, logging_dir=run_dir / "logs")
    last = result.results.get(stages[-1].name)
    trainable = last.trainable if last is not None else "all stages were complete already"
    return TrainResult(model=result.model, steps=sum(result.steps.values()), samples=len(mixture_entries),
                       dropped=last.dropped if last is not None else api.Report(name="samples"), log_history=[],
                       trainable=trainable)
