"""The Python API that the CLI and the notebooks share: format, prepare data, train, evaluate,
export, one full `run`, and a `sweep` over general-data ratios.

    from adapt import api
    result = api.run(domain="driving", general_ratio=0.25)        # demo data + tiny model on CPU
    rows = api.sweep([0, 0.25, 0.5], domain="driving")            # one run per ratio, same data
    api.best_ratio(rows)                                          # the row of the best trade-off

A run directory holds everything about one run (README "Run directory"):
    config.yaml  data/  checkpoints/  eval/  export/  logs/

Several processes (`torchrun` / `accelerate launch ... -m adapt.cli run`): every rank calls `run`;
see its docstring for who does what.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from tqdm import tqdm

import formatters
from adapt import console, experiments, preflight
from adapt.checkpoints import models
from adapt.config import RunConfig, parse_run_config, read_run_config, resolve_num_proc
from adapt.config import load_config_file as load_config_file  # the CLI and notebooks read configs here
from adapt.data import filtering, mixing
from adapt.data.arrow import RowPlanner, Rows
from adapt.data.records import Record
from adapt.data.samples import SampleBuilder
from adapt.data.splits import split_by_group, take_fraction
from adapt.errors import AdaptError, Report
from adapt.evaluation import evaluator as evaluation
from adapt.fileio import atomic_write_text
from adapt.training.attention import TRAINING_ONLY
from adapt.training.trainer import TrainConfig, make_builder, train
from domains import DataSource, Domain
from domains import get as get_domain
from domains.recipe import check_eval
from formatters.base import run as run_formatter

KEY_PACKAGES = ("adapt", "torch", "transformers", "peft", "trl", "accelerate", "datasets", "nuscenes-devkit",
                "pydicom", "av", "pillow", "simplejpeg", "numpy")
DEMO_MODEL = "tiny"


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in KEY_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


say = console.say  # progress news: hidden under --quiet, always in the run log
is_main_process = console.is_main_process


# ----------------------------------------------------------------------------------------------
# several processes (torchrun / accelerate launch)
# ----------------------------------------------------------------------------------------------
# How long the other ranks wait for the main process (formatting a real dataset, evaluating).
DIST_TIMEOUT = timedelta(seconds=int(os.environ.get("ADAPT_DIST_TIMEOUT", 4 * 3600)))


def processes():
    """accelerate's process state. Initialising it here (with adapt's timeout) starts the process
    group under a launcher before anything needs it; the Trainer later reuses that group."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available(), timeout=DIST_TIMEOUT)


def agreed(value: Any) -> Any:
    """`value` as the main process has it, on every rank: a timestamped name is decided once."""
    if processes().num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    box = [value]
    broadcast_object_list(box, from_process=0)
    return box[0]


# ----------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------
def resolve(config: RunConfig) -> tuple[Domain, TrainConfig, dict[str, Any]]:
    """The domain recipe, the full TrainConfig (recipe defaults < config) and eval settings."""
    domain = get_domain(config.domain)
    if config.demo and domain.demo is None and domain.sources:  # a recipe is a partial run config
        config.data = [source.to_dict() for source in domain.sources]
    if config.demo and domain.demo is None:
        raise AdaptError(f"domain {domain.name!r} has no demo data and its recipe names no sources",
                         hint="pass --data KIND=PATH, or list sources in the recipe")
    train_config = TrainConfig.from_dict({**domain.train_defaults(config.demo), "seed": config.seed, **config.train},
                                         path=config.source_file)
    filtering.FilterConfig.from_dict({**domain.filter, **config.filter})  # bad settings fail before any work
    eval_settings = check_eval({**domain.eval_settings(config.demo), **config.eval}, path=config.source_file)
    return domain, train_config, eval_settings


def run_name(config: RunConfig) -> str:
    model = Path(config.model).name if config.model else DEMO_MODEL
    return config.name or f"{Path(config.domain).stem}-{model}-r{config.general_ratio:g}-{time.strftime('%Y%m%d-%H%M%S')}"


# ----------------------------------------------------------------------------------------------
# steps
# ----------------------------------------------------------------------------------------------
def format_source(source: DataSource, out: str | Path, *, strict: bool = False, overwrite: bool = False,
                  progress: bool | tqdm = True, num_proc: int | None = None) -> Report:
    """Run one formatter (`adapt format`) in `num_proc` processes (None: the cores available); an
    existing complete output is reused. `progress` may be the formatting phase's display, which
    counts the records of every source."""
    out = Path(out)
    if (out / "meta.json").is_file() and not overwrite:
        return Report(name=source.label)
    report = run_formatter(formatters.get(source.kind), source.path, out, name=source.label, strict=strict,
                           overwrite=overwrite, progress=progress, num_proc=num_proc, **source.options)
    say(report.summary())
    return report


def demo_sources(domain: Domain, folder: Path, seed: int) -> tuple[list[DataSource], list[DataSource]]:
    """Write the domain's synthetic sources once under `folder` (reused by later runs and sweeps)."""
    marker = folder / "sources.json"
    if marker.is_file():
        saved = json.loads(marker.read_text())
        return [DataSource(**d) for d in saved["data"]], [DataSource(**d) for d in saved["general"]]
    say(f"writing the {domain.name} demo data (synthetic, in the real source formats) to {folder}")
    data, general = domain.demo(folder, seed)
    atomic_write_text(marker, json.dumps({"data": [d.to_dict() for d in data],
                                          "general": [g.to_dict() for g in general]}, indent=2))
    return data, general


def source_lists(config: RunConfig, domain: Domain, folder: Path) -> tuple[list[DataSource], list[DataSource]]:
    """The run's domain and general sources: the domain demo's (written under folder/sources) when
    no data is given, else config.data and config.general (the recipe's general data by default)."""
    if config.demo:
        return demo_sources(domain, folder / "sources", config.seed)
    return ([DataSource(**d) for d in config.data],
            [DataSource(**g) for g in config.general] or list(domain.general))


def data_sources(items: Sequence[str | dict[str, Any] | DataSource], *, general: bool = False,
                 ) -> list[dict[str, Any]]:
    """RunConfig.data / .general entries from what the CLI takes (`KIND=PATH[?key=value&...]`; for
    general data a bare path means `general=PATH`), dicts or DataSources."""
    out = []
    for item in items:
        if isinstance(item, str):
            text = item if "=" in item or not general else f"general={item}"
            item = DataSource.parse(text, where="--general" if general else "--data")
        out.append(item.to_dict() if isinstance(item, DataSource) else DataSource(**item).to_dict())
    return out


def format_data(config: RunConfig, folder: str | Path) -> dict[str, list[Path]]:
    """Format a run's sources as `run` does, without training: {"domain": [...], "general": [...]}
    formatted folders. The layout (folder/sources, folder/formatted/<label>) is a run's shared data
    folder, so `run(config, shared_dir=folder)` and `sweep(..., shared_dir=folder)` reuse it."""
    folder = Path(folder)
    domain, _, _ = resolve(config)
    out: dict[str, list[Path]] = {"domain": [], "general": []}
    with console.phase("formatting", unit="rec") as bar:
        for kind, items in zip(("domain", "general"), source_lists(config, domain, folder)):
            for item in items:
                format_source(item, folder / "formatted" / item.label, strict=config.strict, progress=bar,
                              num_proc=config.num_proc)
                out[kind].append(folder / "formatted" / item.label)
    return out


def load_records(path: str | Path, *, kind: str = "domain", strict: bool = False) -> list[tuple[Record, str]]:
    """(record, image root) pairs of a formatted folder, InternVL meta file or JSONL (to look at them)."""
    report = Report(name=Path(path).name, strict=strict)
    return [(record, source.root) for source in mixing.load_sources(path, kind=kind, report=report)
            for record in source.records]


def sample_builder(config: RunConfig) -> tuple[models.Loaded, SampleBuilder]:
    """The model (tokenizer, template) and the training SampleBuilder a run with `config` uses."""
    _, train_config, _ = resolve(config)
    loaded = load_model(config, train_config)
    return loaded, make_builder(loaded, train_config)


@dataclass
class PreparedData:
    mixture: mixing.Mixture
    heldout: dict[str, list[tuple[Record, str]]]


def prepare_data(config: RunConfig, domain: Domain, train_config: TrainConfig, eval_settings: dict[str, Any],
                 data_dir: Path, loaded: models.Loaded, *, shared_dir: Path | None = None) -> PreparedData:
    """Format every source, hold out evaluation sets, mix, and save the mixture (reused on resume)."""
    mixture_dir = data_dir / "mixture"
    heldout_file = data_dir / "heldout.json"
    if (mixture_dir / "manifest.json").is_file() and heldout_file.is_file():
        held = json.loads(heldout_file.read_text())
        return PreparedData(mixing.Mixture.load(mixture_dir),
                            {k: [(r, root) for r, root in v] for k, v in held.items()})
    formatted_dir = (shared_dir or data_dir) / "formatted"
    data, general = source_lists(config, domain, shared_dir or data_dir)
    if config.general_ratio > 0 and not general:
        raise AdaptError("--general-ratio > 0 but no general data was given",
                         hint="pass --general /path/to/internvl_meta.json (or --general-ratio 0)")
    report = Report(name="load", strict=config.strict)
    seed = config.seed
    # records become memory-mapped Arrow tables, cached beside the formatted data (a sweep's shared
    # folder): a second run with the same files reads no JSONL and plans nothing again
    arrow_cache = (shared_dir or data_dir) / "arrow"
    num_proc = resolve_num_proc(config.num_proc)
    domain_sources, general_sources = [], []
    with console.phase("formatting", unit="rec") as bar:
        for kind, items, bucket in (("domain", data, domain_sources), ("general", general, general_sources)):
            for item in items:
                out = formatted_dir / item.label
                format_source(item, out, strict=config.strict, progress=bar, num_proc=config.num_proc)
                loaded_sources = mixing.load_sources(out, kind=kind, weight=item.weight, name=item.label,
                                                     report=report, seed=seed, arrow_cache=arrow_cache,
                                                     num_proc=num_proc)
                for source in loaded_sources if item.max_tiles else ():
                    mixing.limit_tiles(source, item.max_tiles)
                bucket.extend(loaded_sources)
    heldout: dict[str, list[tuple[Record, str]]] = {"domain": [], "general": []}
    holdout: dict[str, Any] = {}  # per source: the grouping of its held-out split, for the manifest
    train_domain, train_general = [], []
    for kind, sources, keep, size in (("domain", domain_sources, train_domain, eval_settings["holdout"]),
                                      ("general", general_sources, train_general, eval_settings["general_holdout"])):
        for source in sources:
            n = size if isinstance(size, float) and size < 1 else max(1, round(int(size) / max(len(sources), 1)))
            if len(source) < 2:
                keep.append(source)
                continue
            train_part, held_part, holdout[source.name] = split_by_group(source, n, seed)
            keep.append(train_part)
            heldout[kind] += [(r, held_part.root) for r in held_part.records]
    train_domain = [take_fraction(source, config.domain_fraction, seed) for source in train_domain]
    filter_settings = {**domain.filter, **config.filter}
    if filter_settings:  # the filter decides per record object: it reads the sources into memory
        for source in train_domain + train_general:
            source.records = source.records.materialize() if isinstance(source.records, Rows) else source.records
    train_domain, train_general, filtered = filtering.filter_training(
        filter_settings, train_domain, train_general, heldout["domain"] + heldout["general"], data_dir)
    planner = RowPlanner(make_builder(loaded, train_config), arrow_cache, num_proc)
    if config.mix_by == "tokens":  # every domain row is measured: plan them in one batched pass
        for source in train_domain:
            planner.plan_source(source, np.arange(len(source)))
    mixture = mixing.mix(train_domain, train_general if config.general_ratio > 0 else [],
                         general_ratio=config.general_ratio, mix_by=config.mix_by, seed=seed,
                         upsample=config.upsample or config.demo, measure=planner if config.mix_by == "tokens" else None)
    mixture.holdout = holdout
    with console.phase("planning", total=len(mixture.entries), unit="sample") as bar:
        mixture.plans = planner.plan_mixture(mixture.entries, progress=bar)  # once: the manifest and train() reuse it
    mixture.save(mixture_dir)
    if filtered is not None:
        filtering.record_in_manifest(mixture_dir / "manifest.json", filtered)
        say(filtered.summary())
    atomic_write_text(heldout_file, json.dumps(heldout, ensure_ascii=False))
    say(mixture.summary())
    if report.skipped:
        say(report.summary())
    return PreparedData(mixture, heldout)


def load_model(config: RunConfig, train_config: TrainConfig) -> models.Loaded:
    name = config.model or DEMO_MODEL
    dtype = None if train_config.precision in ("auto", "fp32") else train_config.precision
    # "auto" and the training-only kernels are chosen per run by training.train (no KV cache): load with SDPA
    attn = train_config.attn_implementation
    attn = "sdpa" if attn == "auto" or attn in TRAINING_ONLY else attn
    return models.load(name, dtype=dtype, attn_implementation=attn, seed=config.seed,
                       load_in_4bit=train_config.mode == "lora" and train_config.qlora)


@dataclass
class RunResult:
    run_dir: Path
    before: dict[str, Any]
    after: dict[str, Any]
    export_dir: Path | None
    steps: int

    def scores(self) -> dict[str, float | None]:
        def pick(report: dict[str, Any], name: str, *keys: str) -> Any:
            value: Any = report.get(name, {})
            for key in keys:
                value = (value or {}).get(key)
            return value

        return {"domain_before": pick(self.before, "domain", "score"), "domain_after": pick(self.after, "domain", "score"),
                "general_before": pick(self.before, "general", "score"),
                "general_after": pick(self.after, "general", "score"),
                "general_loss_before": pick(self.before, "general", "answer_loss"),
                "general_loss_after": pick(self.after, "general", "answer_loss"),
                "domain_loss_before": pick(self.before, "domain", "answer_loss"),
                "domain_loss_after": pick(self.after, "domain", "answer_loss"),
                "domain_chance": pick(self.after, "domain", "chance", "score"),
                "domain_blind": pick(self.after, "domain", "blind", "score")}


def run(config: RunConfig | None = None, *, resume: str | Path | None = None, shared_dir: str | Path | None = None,
        export: bool = True, progress: bool = True, **overrides: Any) -> RunResult:
    """Format, mix, evaluate (before), train, evaluate (after), export: one run directory.

    Everything checkable (model, data sources, options, output space) is checked first
    (adapt.preflight); a start that fails (checks, loading, formatting, mixing) leaves no run
    directory. `progress=False` (--quiet) prints warnings, errors and the final table only; the rest
    goes to <run>/logs/run.log.

    Under torchrun / accelerate launch every rank calls this with the same arguments. The run
    directory name is decided on the main process and broadcast (so a timestamped name is the
    same everywhere; --name works too); the main process writes config.yaml and prepares the data
    while the others wait, then they load what it saved; every rank trains; the main process
    evaluates and exports while the others wait; every rank returns the same result. Multi-node
    runs need runs_dir (and shared_dir) on a filesystem all nodes share.

    `shared_dir` holds data that several runs reuse (formatted sources, the base model's
    evaluation when the held-out sets and settings match); `sweep` passes one.
    """
    with console.session(quiet=not progress), preflight.StartGuard() as start:
        return _run(config, start, resume=resume, shared_dir=shared_dir, export=export, progress=progress,
                    **overrides)


def _run(config: RunConfig | None, start: preflight.StartGuard, *, resume: str | Path | None,
         shared_dir: str | Path | None, export: bool, progress: bool, **overrides: Any) -> RunResult:
    state = processes()
    main = state.is_main_process
    if resume is not None:
        run_dir = Path(resume)
        config = read_run_config(run_dir)
    else:
        config = config or RunConfig()
        config = parse_run_config({**config.to_dict(), **overrides}) if overrides else config
        run_dir = None
    domain, train_config, eval_settings = resolve(config)
    if config.stages:  # a bad stage fails here, before any data step or training
        from adapt.training.stages import check_stages

        check_stages(config.stages, train_config)
    run_dir = run_dir or Path(config.runs_dir) / agreed(run_name(config))
    shared = Path(shared_dir) if shared_dir else None
    if main:
        if resume is None and (run_dir / "config.yaml").is_file():
            raise AdaptError("this run directory already exists", path=run_dir,
                             hint=f"continue it with adapt run --resume {run_dir}, or choose another --name")
        preflight.check_run(config.model or DEMO_MODEL, preflight.run_sources(config, domain), train_config,
                            [run_dir, *([shared] if shared else [])])
        start.creating(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        console.log_to(run_dir / "logs" / "run.log")
        if config.demo:
            say(f"no --data given: running the {domain.name} DEMO (synthetic data in the real formats, "
                f"the random-init '{DEMO_MODEL}' model on {'GPU' if torch.cuda.is_available() else 'CPU'})")
        atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(
            {"run": config.to_dict(), "train": train_config.to_dict(), "eval": eval_settings,
             "versions": package_versions()}, sort_keys=False))
    loaded = load_model(config, train_config)
    with state.main_process_first():  # the others then load the mixture the main process saved
        data = prepare_data(config, domain, train_config, eval_settings, run_dir / "data", loaded, shared_dir=shared)
    start.started()
    eval_builder = make_builder(loaded, train_config, train=False)
    eval_kwargs = {"batch_size": eval_settings["batch_size"], "max_new_tokens": eval_settings["max_new_tokens"]}
    before_path, after_path = run_dir / "eval" / "before.json", run_dir / "eval" / "after.json"
    if main and not before_path.is_file():
        cached = base_eval_cache(shared, config, train_config, eval_kwargs, run_dir / "data" / "heldout.json")
        if cached is not None and cached.is_file():
            say(f"the model before fine-tuning was evaluated on these held-out sets already ({cached})")
            before_path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(cached, before_path)
        else:
            say("evaluating the model before fine-tuning")
            with console.phase("evaluation (before)", total=_eval_steps(data.heldout), unit="q") as bar:
                before = evaluation.evaluate(loaded, eval_builder, data.heldout, **eval_kwargs, progress=bar)
            evaluation.save_report(before, before_path)
            if cached is not None:
                evaluation.save_report(before, cached)
    say(f"training ({train_config.mode}) on {len(data.mixture.entries)} samples")
    if config.stages:
        from adapt.training.stages import train_run_stages

        result = train_run_stages(config, domain, train_config, eval_settings, run_dir, loaded, data.mixture.entries,
                                  data.heldout, resume=resume is not None, shared_dir=shared, progress=progress)
    else:
        result = train(loaded, data.mixture.entries, train_config, run_dir / "checkpoints",
                       resume=resume is not None, logging_dir=run_dir / "logs", progress=progress,
                       callbacks=[console.LogToRunLog()], plans=data.mixture.plans)
    say(result.trainable)
    export_dir = run_dir / "export" if export else None
    if main:
        before = json.loads(before_path.read_text())
        model = result.model if result.final_dir is None else from_checkpoint(result.final_dir, config, train_config).model
        trained = models.Loaded(model, loaded.tokenizer, loaded.template, loaded.source)
        say("evaluating the fine-tuned model")
        with console.phase("evaluation (after)", total=_eval_steps(data.heldout), unit="q") as bar:
            after = evaluation.evaluate(trained, eval_builder, data.heldout, **eval_kwargs, progress=bar,
                                        blind=bool(eval_settings["blind"]))
        evaluation.save_report(after, after_path)
        table = evaluation.comparison_markdown(before, after)
        atomic_write_text(run_dir / "eval" / "report.md", f"# {run_dir.name}\n\n{table}")
        console.result("before vs after:\n" + table)
        if export_dir is not None:
            from adapt.checkpoints.export import export_model

            card = {"base_model": config.model or f"{DEMO_MODEL} (random init demo)", "domain": domain.name,
                    "mixture": json.loads((run_dir / "data" / "mixture" / "manifest.json").read_text()),
                    "metrics": {"before": _headlines(before), "after": _headlines(after)},
                    "training": train_config.to_dict()}
            export_dir = export_model(model, loaded.tokenizer, loaded.template, export_dir, card=card,
                                      overwrite=True, max_tiles=train_config.max_tiles)
            say(f"exported to {export_dir}")
    state.wait_for_everyone()
    return RunResult(run_dir, json.loads(before_path.read_text()), json.loads(after_path.read_text()), export_dir,
                     result.steps)


def _eval_steps(heldout: dict[str, list[tuple[Record, str]]]) -> int:
    """What the evaluation display counts: each held-out entry answered, then scored by its loss."""
    return 2 * sum(len(entries) for entries in heldout.values())


def base_eval_cache(shared_dir: Path | None, config: RunConfig, train_config: TrainConfig,
                    eval_kwargs: dict[str, Any], heldout_file: Path) -> Path | None:
    """Where the base model's evaluation is kept for runs that share `shared_dir`: the ratios of a
    sweep hold out the same sets from the same sources, so the model before fine-tuning scores the
    same. Keyed by everything it depends on (held-out sets, model and its files, seed, sample and
    generation settings); None without a shared folder."""
    if shared_dir is None:
        return None
    model = config.model or DEMO_MODEL
    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in Path(model).glob("*")) \
        if Path(model).is_dir() else []
    key = json.dumps({"heldout": hashlib.sha256(heldout_file.read_bytes()).hexdigest(), "model": model,
                      "files": files, "seed": config.seed, "train": train_config.to_dict(), "eval": eval_kwargs},
                     sort_keys=True, default=str)
    return shared_dir / "base-eval" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def _headlines(report: dict[str, Any]) -> dict[str, Any]:
    return {name: {"score": s.get("score"), "answer_loss": s.get("answer_loss"),
                   "tasks": s.get("tasks")} for name, s in report.items()}


def sweep(ratios: Sequence[float], *, domain: str = "driving", runs_dir: str | Path = "runs", name: str | None = None,
          seeds: Sequence[int] = experiments.DEFAULT_SEEDS, shared_dir: str | Path | None = None, progress: bool = True,
          parallel: int = 1, **overrides: Any) -> list[dict[str, Any]]:
    """One run per general ratio and seed over the same formatted data (adapt.experiments.run_sweep);
    `overrides` are RunConfig fields (model, train, eval, data, domain_fraction, ...).

    The sweep folder is <runs_dir>/<name>: calling again with the same name reuses its finished runs
    and resumes an interrupted one; without a name it is a new timestamped folder. `parallel` runs
    that many at once (`experiments.run_sweep`). Returns one flat
    row per ratio x seed, ready for `pandas.DataFrame(rows)`; <sweep>/sweep.json indexes them.
    """
    folder = Path(runs_dir) / (name or agreed(f"sweep-{Path(domain).stem}-{time.strftime('%Y%m%d-%H%M%S')}"))
    base = RunConfig(domain=domain, **overrides)
    return experiments.run_sweep(folder, experiments.ratio_points(ratios), base=base, seeds=seeds,
                                 shared_dir=shared_dir, progress=progress, parallel=parallel)


def best_ratio(rows: Sequence[dict[str, Any]], *, tolerance: float = 0.1) -> dict[str, Any]:
    """The general ratio with the best domain/general trade-off (adapt.experiments.best over the
    rows' `general_ratio`): its summary row, with means and spreads over the seeds."""
    return experiments.best(rows, by="general_ratio", tolerance=tolerance).row


def _load_run(run_dir: str | Path) -> tuple[Path, RunConfig, TrainConfig, dict[str, Any]]:
    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    _, train_config, eval_settings = resolve(config)
    return run_dir, config, train_config, eval_settings


def load_trained(run_dir: str | Path) -> models.Loaded:
    """The model of a run's last complete checkpoint (LoRA adapters applied onto the base model)."""
    from adapt.training.trainer import last_complete_checkpoint

    run_dir, config, train_config, _ = _load_run(run_dir)
    checkpoint = last_complete_checkpoint(run_dir / "checkpoints", set_aside=False)  # reading never renames
    if checkpoint is None:
        raise AdaptError("the run has no complete checkpoint yet", path=run_dir / "checkpoints",
                         hint="resume the run (adapt run --resume RUN_DIR) or lower --save-steps")
    return from_checkpoint(checkpoint, config, train_config)


def from_checkpoint(checkpoint: Path, config: RunConfig, train_config: TrainConfig) -> models.Loaded:
    """A saved trained model: a whole one, or LoRA adapters applied onto the run's base model."""
    from transformers import InternVLForConditionalGeneration

    from adapt.checkpoints.pickles import pickles_refused

    base = load_model(config, train_config)
    with pickles_refused(checkpoint):
        if (checkpoint / "adapter_config.json").is_file():
            from peft import PeftModel

            model = PeftModel.from_pretrained(base.model, checkpoint)
        else:
            model = InternVLForConditionalGeneration.from_pretrained(checkpoint)
    return models.Loaded(model, base.tokenizer, base.template, str(checkpoint))


def evaluate_run(run_dir: str | Path, *, model: str | Path | None = None, judge: str | None = None,
                 out: str | Path | None = None, blind: bool | None = None) -> dict[str, Any]:
    """Evaluate a model (default: the run's export) on the run's held-out sets; the report is saved to
    `out` when given. The run directory is only read: it stays byte-identical. `judge` (a local chat model,
    off by default) adds DriveLM's GPT score, named in the report; `blind` (default: the run's eval setting)
    adds the grey-image baseline."""
    from adapt.evaluation.judge import LocalJudge

    run_dir, config, train_config, eval_settings = _load_run(run_dir)
    target = Path(model) if model else run_dir / "export"
    loaded = models.load(str(target)) if target.exists() else load_trained(run_dir)
    held = json.loads((run_dir / "data" / "heldout.json").read_text())
    sets = {k: [(r, root) for r, root in v] for k, v in held.items()}
    report = evaluation.evaluate(loaded, make_builder(loaded, train_config, train=False), sets,
                                 batch_size=eval_settings["batch_size"], max_new_tokens=eval_settings["max_new_tokens"],
                                 judge=LocalJudge.load(judge) if judge else None,
                                 blind=bool(eval_settings.get("blind") if blind is None else blind))
    if out is not None:
        evaluation.save_report(report, out)
    return report


def export_run(run_dir: str | Path, out: str | Path, *, overwrite: bool = False) -> Path:
    """`adapt export`: the run's last complete checkpoint, merged, in the HF-native layout."""
    from adapt.checkpoints.export import export_model

    run_dir, config, train_config, _ = _load_run(run_dir)
    loaded = load_trained(run_dir)
    manifest = run_dir / "data" / "mixture" / "manifest.json"
    after = run_dir / "eval" / "after.json"
    card = {"base_model": config.model or f"{DEMO_MODEL} (random init demo)", "domain": config.domain,
            "mixture": json.loads(manifest.read_text()) if manifest.is_file() else None,
            "metrics": _headlines(json.loads(after.read_text())) if after.is_file() else None,
            "training": train_config.to_dict()}
    return export_model(loaded.model, loaded.tokenizer, loaded.template, out, card=card, overwrite=overwrite,
                        max_tiles=train_config.max_tiles)


def preference(model: str, out: str | Path, **kwargs: Any) -> dict[str, Any]:
    """DPO / MPO post-training on TRL (see adapt.training.posttrain.preference_run)."""
    from adapt.training.posttrain import preference_run

    return preference_run(model, out, **kwargs)


def grpo(model: str, records: str | Path, out: str | Path, **kwargs: Any) -> dict[str, Any]:
    """GRPO post-training with task rewards on TRL (see adapt.training.posttrain.grpo_run)."""
    from adapt.training.posttrain import grpo_run

    return grpo_run(model, records, out, **kwargs)
