"""Post-training runs (`adapt dpo`, `adapt grpo`): load, hold out, measure before, train on TRL,
measure after, export; one output folder with pairs, checkpoints, report.json and export/.

Both start from a fine-tuned model (an `adapt run` export, or any InternVL checkpoint).
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError

from adapt.checkpoints import models
from adapt.data.records import Record
from adapt.errors import AdaptError, Report, validation_error
from adapt.evaluation import evaluator
from adapt.fileio import atomic_write_text
from adapt.training.preference import PreferenceConfig, preference_scores, train_preference
from adapt.training.rl import RLConfig, mean_reward, train_grpo
from adapt.training.trainer import TrainConfig, make_builder

Entries = list[tuple[Record, str]]


def options_into(kind: type, options: dict[str, Any]) -> Any:
    """A PreferenceConfig / RLConfig from key=value options, checked against the types and ranges the
    config declares (pydantic's lax mode reads CLI strings: '1e-3', 'true', '8')."""
    accepted = [f.name for f in dataclasses.fields(kind) if f.name != "extra"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise AdaptError(f"unknown option(s): {', '.join(unknown)}", hint=f"accepted: {', '.join(accepted)}")
    try:
        config = TypeAdapter(kind).validate_python(options)
    except ValidationError as err:
        raise validation_error(err, options, prefix="--opt") from None
    config.validate()
    return config


def split_heldout(items: Sequence, share: float, seed: int) -> tuple[list, list]:
    """(train, held-out): a seeded share (at least one item) held out."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n = max(1, round(len(items) * share)) if len(items) > 1 else 0
    held = set(order[:n])
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


def _records(path: str | Path | None) -> Entries:
    if path is None:
        return []
    from adapt import api

    return api.load_records(path)


def _export(loaded: models.Loaded, model: Any, out: Path, max_tiles: int, card: dict[str, Any]) -> Path:
    from adapt.checkpoints.export import export_model

    return export_model(model, loaded.tokenizer, loaded.template, out / "export", card=card, overwrite=True,
                        max_tiles=max_tiles)


def _task_metrics(loaded: models.Loaded, records: Entries, max_tiles: int) -> dict[str, Any] | None:
    if not records:
        return None
    builder = make_builder(loaded, TrainConfig(max_tiles=max_tiles), train=False)
    return evaluator.evaluate(loaded, builder, {"heldout": records}, max_new_tokens=64).get("heldout")


def preference_run(model: str, out: str | Path, *, pairs: str | Path | None = None, records: str | Path | None = None,
                   heldout_pairs: str | Path | None = None, heldout_records: str | Path | None = None,
                   options: dict[str, Any] | None = None, samples: int = 4, resume: bool = False,
                   progress: bool = True) -> dict[str, Any]:
    """DPO / MPO from JSONL pairs, or from pairs built out of the model's own scored answers to
    labelled `records`; reports held-out preference accuracy and margin (and task metrics on
    `heldout_records`) before and after."""
    from formatters.preference import pairs_from_generations, read_pairs, write_pairs

    config: PreferenceConfig = options_into(PreferenceConfig, options or {})
    if (pairs is None) == (records is None):
        raise AdaptError("give either --pairs (a preference JSONL) or --from-records (labelled records)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    loaded = models.load(model, seed=config.seed)
    report = Report(name="preference pairs")
    if pairs is not None:
        train_pairs = read_pairs(pairs, report)
    else:
        builder = make_builder(loaded, TrainConfig(max_tiles=config.max_tiles, seed=config.seed), train=False)
        train_pairs = pairs_from_generations(loaded, builder, _records(records), n=samples, report=report)
        write_pairs(out / "pairs.jsonl", [pair for pair, _ in train_pairs])
    if heldout_pairs is not None:
        held = read_pairs(heldout_pairs, report)
    else:
        train_pairs, held = split_heldout(train_pairs, 0.1, config.seed)
    if not train_pairs:
        raise AdaptError("no usable preference pair", hint=report.summary())
    task_records = _records(heldout_records)
    before = {"preference": preference_scores(loaded, held, max_tiles=config.max_tiles),
              "task": _task_metrics(loaded, task_records, config.max_tiles)}
    result = train_preference(loaded, train_pairs, config, out / "checkpoints", resume=resume, progress=progress)
    loaded.model = result.model.merge_and_unload() if hasattr(result.model, "merge_and_unload") else result.model
    after = {"preference": preference_scores(loaded, held, max_tiles=config.max_tiles),
             "task": _task_metrics(loaded, task_records, config.max_tiles)}
    summary = {"config": dataclasses.asdict(config), "pairs": {"train": len(train_pairs), "heldout": len(held)},
               "skipped": report.to_dict(), "steps": result.steps, "before": before, "after": after}
    _export(loaded, loaded.model, out, config.max_tiles, {"base_model": model, "training": summary["config"],
                                                          "metrics": {"before": before["preference"],
                                                                      "after": after["preference"]}})
    atomic_write_text(out / "report.json", json.dumps(summary, indent=2, default=str))
    return summary


def grpo_run(model: str, records: str | Path, out: str | Path, *, heldout_records: str | Path | None = None,
             options: dict[str, Any] | None = None, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """GRPO on labelled records with adapt's task and format rewards; reports held-out greedy and
    sampled mean reward (and task metrics) before and after."""
    config: RLConfig = options_into(RLConfig, options or {})
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    loaded = models.load(model, seed=config.seed)
    entries = _records(records)
    held = _records(heldout_records) if heldout_records is not None else []
    if not held:
        entries, held = split_heldout(entries, 0.1, config.seed)
    if not entries:
        raise AdaptError("no labelled record to train on", path=records)

    def measure() -> dict[str, Any]:
        return {"greedy": mean_reward(loaded, held, config), "sampled": mean_reward(loaded, held, config, samples=4),
                "task": _task_metrics(loaded, held, config.max_tiles)}

    before = measure()
    result = train_grpo(loaded, entries, config, out / "checkpoints", resume=resume, progress=progress)
    loaded.model = result.model.merge_and_unload() if hasattr(result.model, "merge_and_unload") else result.model
    after = measure()
    summary = {"config": dataclasses.asdict(config), "prompts": {"train": len(entries), "heldout": len(held)},
               "steps": result.steps, "before": before, "after": after}
    _export(loaded, loaded.model, out, config.max_tiles, {"base_model": model, "training": summary["config"],
                                                          "metrics": {"before": before["greedy"],
                                                                      "after": after["greedy"]}})
    atomic_write_text(out / "report.json", json.dumps(summary, indent=2, default=str))
    return summary
