"""The Python API that the CLI and the notebooks share: format, prepare data, train, evaluate,
export, one full `run`, and a `sweep` over general-data ratios.

    from adapt import api
    result = api.run(domain="driving", general_ratio=0.25)        # demo data + tiny model on CPU
    table = api.sweep(domain="driving", ratios=[0, 0.25, 0.5])    # one run per ratio, same data

A run directory holds everything about one run (README "Run directory"):
    config.yaml  data/  checkpoints/  eval/  export/  logs/
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import yaml

import formatters
from adapt import evaluation, mixing, models
from adapt.errors import AdaptError, Report
from adapt.fileio import atomic_write_text
from adapt.records import Record
from adapt.training import TrainConfig, make_builder, train
from domains import DataSource, Domain
from domains import get as get_domain
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


def say(message: str) -> None:
    print(f"[adapt] {message}", flush=True)


# ----------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------
@dataclass
class RunConfig:
    """Everything that defines a run; written to <run>/config.yaml and read back by --resume."""

    domain: str = "driving"
    model: str | None = None  # None: the demo (tiny preset) when no data is given
    general_ratio: float = 0.25
    mix_by: str = "samples"
    upsample: bool = False
    seed: int = 0
    data: list[dict[str, Any]] = field(default_factory=list)  # DataSource dicts; empty: the domain demo
    general: list[dict[str, Any]] = field(default_factory=list)
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig overrides
    eval: dict[str, Any] = field(default_factory=dict)
    strict: bool = False
    runs_dir: str = "runs"
    name: str | None = None

    @property
    def demo(self) -> bool:
        return not self.data

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def load_config_file(path: str | Path) -> dict[str, Any]:
    """A run config YAML (configs/<domain>/<model>.yaml): RunConfig keys, safe-loaded."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise AdaptError("config file not found", path=path) from None
    except yaml.YAMLError as err:
        raise AdaptError(f"config file is not valid YAML ({err})", path=path) from None
    if not isinstance(raw, dict):
        raise AdaptError("a config file is a YAML mapping of run options", path=path)
    unknown = set(raw) - set(RunConfig.__dataclass_fields__)
    if unknown:
        raise AdaptError(f"unknown config key(s): {', '.join(sorted(unknown))}", path=path,
                         hint=f"accepted: {', '.join(RunConfig.__dataclass_fields__)}")
    return raw


def resolve(config: RunConfig) -> tuple[Domain, TrainConfig, dict[str, Any]]:
    """The domain recipe, the full TrainConfig (recipe defaults < config) and eval settings."""
    domain = get_domain(config.domain)
    if not 0 <= config.general_ratio < 1:
        raise AdaptError(f"--general-ratio {config.general_ratio} is outside [0, 1)",
                         hint="0 trains on domain data only; 0.25 makes a quarter of the samples general")
    if config.demo and domain.demo is None:
        raise AdaptError(f"domain {domain.name!r} has no demo data", hint="pass --data KIND=PATH")
    train_config = TrainConfig.from_dict({**domain.train_defaults(config.demo), "seed": config.seed, **config.train})
    return domain, train_config, {**domain.eval_settings(), **config.eval}


def run_name(config: RunConfig) -> str:
    model = Path(config.model).name if config.model else DEMO_MODEL
    return config.name or f"{Path(config.domain).stem}-{model}-r{config.general_ratio:g}-{time.strftime('%Y%m%d-%H%M%S')}"


# ----------------------------------------------------------------------------------------------
# steps
# ----------------------------------------------------------------------------------------------
def format_source(source: DataSource, out: str | Path, *, strict: bool = False, overwrite: bool = False) -> Report:
    """Run one formatter (`adapt format`); an existing complete output is reused."""
    out = Path(out)
    if (out / "meta.json").is_file() and not overwrite:
        return Report(name=source.label)
    report = run_formatter(formatters.get(source.kind), source.path, out, name=source.label, strict=strict,
                           overwrite=overwrite, **source.options)
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
    if config.demo:
        data, general = demo_sources(domain, (shared_dir or data_dir) / "sources", config.seed)
    else:
        data = [DataSource(**d) for d in config.data]
        general = [DataSource(**g) for g in config.general] or domain.general
    if config.general_ratio > 0 and not general:
        raise AdaptError("--general-ratio > 0 but no general data was given",
                         hint="pass --general /path/to/internvl_meta.json (or --general-ratio 0)")
    report = Report(name="load", strict=config.strict)
    seed = config.seed
    domain_sources, general_sources = [], []
    for kind, items, bucket in (("domain", data, domain_sources), ("general", general, general_sources)):
        for item in items:
            out = formatted_dir / item.label
            format_source(item, out, strict=config.strict)
            bucket.extend(mixing.load_sources(out, kind=kind, weight=item.weight, name=item.label, report=report,
                                              seed=seed))
    heldout: dict[str, list[tuple[Record, str]]] = {"domain": [], "general": []}
    train_domain, train_general = [], []
    for kind, sources, keep, size in (("domain", domain_sources, train_domain, eval_settings["holdout"]),
                                      ("general", general_sources, train_general, eval_settings["general_holdout"])):
        for source in sources:
            n = size if isinstance(size, float) and size < 1 else max(1, round(int(size) / max(len(sources), 1)))
            if len(source) < 2:
                keep.append(source)
                continue
            train_part, held_part = mixing.split_holdout(source, n, seed)
            keep.append(train_part)
            heldout[kind] += [(r, held_part.root) for r in held_part.records]
    builder = make_builder(loaded, train_config)

    def plan(record: Record, root: str):
        return builder.plan(record, root)

    def measure(record: Record, root: str) -> int:
        return builder.plan(record, root).supervised

    mixture = mixing.mix(train_domain, train_general if config.general_ratio > 0 else [],
                         general_ratio=config.general_ratio, mix_by=config.mix_by, seed=seed,
                         upsample=config.upsample or config.demo, measure=measure)
    mixture.save(mixture_dir, plan=plan)
    atomic_write_text(heldout_file, json.dumps(heldout, ensure_ascii=False))
    say(mixture.summary())
    if report.skipped:
        say(report.summary())
    return PreparedData(mixture, heldout)


def load_model(config: RunConfig, train_config: TrainConfig) -> models.Loaded:
    name = config.model or DEMO_MODEL
    dtype = None if train_config.precision in ("auto", "fp32") else train_config.precision
    return models.load(name, dtype=dtype, attn_implementation=train_config.attn_implementation, seed=config.seed)


@dataclass
class RunResult:
    run_dir: Path
    before: dict[str, Any]
    after: dict[str, Any]
    export_dir: Path | None
    steps: int

    def scores(self) -> dict[str, float | None]:
        pick = lambda report, name, key: report.get(name, {}).get(key)  # noqa: E731
        return {"domain_before": pick(self.before, "domain", "score"), "domain_after": pick(self.after, "domain", "score"),
                "general_before": pick(self.before, "general", "score"),
                "general_after": pick(self.after, "general", "score"),
                "general_loss_before": pick(self.before, "general", "answer_loss"),
                "general_loss_after": pick(self.after, "general", "answer_loss")}


def run(config: RunConfig | None = None, *, resume: str | Path | None = None, shared_dir: str | Path | None = None,
        export: bool = True, progress: bool = True, **overrides: Any) -> RunResult:
    """Format, mix, evaluate (before), train, evaluate (after), export: one run directory."""
    if resume is not None:
        run_dir = Path(resume)
        if not (run_dir / "config.yaml").is_file():
            raise AdaptError("not a run directory (no config.yaml)", path=run_dir)
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())["run"]
        config = RunConfig(**saved)
    else:
        config = config or RunConfig()
        for key, value in overrides.items():
            if key not in RunConfig.__dataclass_fields__:
                raise AdaptError(f"unknown run option {key!r}")
            setattr(config, key, value)
        run_dir = Path(config.runs_dir) / run_name(config)
    domain, train_config, eval_settings = resolve(config)
    run_dir.mkdir(parents=True, exist_ok=True)
    if config.demo:
        say(f"no --data given: running the {domain.name} DEMO (synthetic data in the real formats, "
            f"the random-init '{DEMO_MODEL}' model on {'GPU' if torch.cuda.is_available() else 'CPU'})")
    atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(
        {"run": config.to_dict(), "train": train_config.__dict__, "eval": eval_settings,
         "versions": package_versions()}, sort_keys=False))
    loaded = load_model(config, train_config)
    data = prepare_data(config, domain, train_config, eval_settings, run_dir / "data", loaded,
                        shared_dir=Path(shared_dir) if shared_dir else None)
    eval_builder = make_builder(loaded, train_config, train=False)
    eval_kwargs = {"batch_size": eval_settings["batch_size"], "max_new_tokens": eval_settings["max_new_tokens"]}
    before_path = run_dir / "eval" / "before.json"
    if before_path.is_file():
        before = json.loads(before_path.read_text())
    else:
        say("evaluating the model before fine-tuning")
        before = evaluation.evaluate(loaded, eval_builder, data.heldout, **eval_kwargs)
        evaluation.save_report(before, before_path)
    say(f"training ({train_config.mode}) on {len(data.mixture.entries)} samples")
    result = train(loaded, data.mixture.entries, train_config, run_dir / "checkpoints", resume=resume is not None,
                   logging_dir=run_dir / "logs", progress=progress)
    say(result.trainable)
    trained = models.Loaded(result.model, loaded.tokenizer, loaded.template, loaded.source)
    say("evaluating the fine-tuned model")
    after = evaluation.evaluate(trained, eval_builder, data.heldout, **eval_kwargs)
    evaluation.save_report(after, run_dir / "eval" / "after.json")
    table = evaluation.comparison_markdown(before, after)
    atomic_write_text(run_dir / "eval" / "report.md", f"# {run_dir.name}\n\n{table}")
    say("before vs after:\n" + table)
    export_dir = None
    if export:
        from adapt.export import export_model

        card = {"base_model": config.model or f"{DEMO_MODEL} (random init demo)", "domain": domain.name,
                "mixture": json.loads((run_dir / "data" / "mixture" / "manifest.json").read_text()),
                "metrics": {"before": _headlines(before), "after": _headlines(after)},
                "training": train_config.__dict__}
        export_dir = export_model(result.model, loaded.tokenizer, loaded.template, run_dir / "export", card=card,
                                  overwrite=True, max_tiles=train_config.max_tiles)
        say(f"exported to {export_dir}")
    return RunResult(run_dir, before, after, export_dir, result.steps)


def _headlines(report: dict[str, Any]) -> dict[str, Any]:
    return {name: {"score": s.get("score"), "answer_loss": s.get("answer_loss"),
                   "tasks": s.get("tasks")} for name, s in report.items()}


def sweep(ratios: list[float], *, domain: str = "driving", runs_dir: str = "runs", name: str = "sweep",
          **overrides: Any) -> list[dict[str, Any]]:
    """One run per general ratio over the same formatted data; returns one row per ratio."""
    base = Path(runs_dir) / f"{name}-{Path(domain).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    rows = []
    for ratio in ratios:
        config = RunConfig(domain=domain, general_ratio=ratio, runs_dir=str(base), name=f"r{ratio:g}", **overrides)
        result = run(config, shared_dir=base / "shared", export=False)
        rows.append({"general_ratio": ratio, **result.scores(), "run_dir": str(result.run_dir)})
    atomic_write_text(base / "sweep.json", json.dumps(rows, indent=2))
    return rows


def _load_run(run_dir: str | Path) -> tuple[Path, RunConfig, TrainConfig, dict[str, Any]]:
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise AdaptError("not a run directory (no config.yaml)", path=run_dir)
    config = RunConfig(**yaml.safe_load((run_dir / "config.yaml").read_text())["run"])
    _, train_config, eval_settings = resolve(config)
    return run_dir, config, train_config, eval_settings


def load_trained(run_dir: str | Path) -> models.Loaded:
    """The model of a run's last complete checkpoint (LoRA adapters applied onto the base model)."""
    from transformers import InternVLForConditionalGeneration

    from adapt.training import last_complete_checkpoint

    run_dir, config, train_config, _ = _load_run(run_dir)
    checkpoint = last_complete_checkpoint(run_dir / "checkpoints")
    if checkpoint is None:
        raise AdaptError("the run has no complete checkpoint yet", path=run_dir / "checkpoints",
                         hint="resume the run (adapt run --resume RUN_DIR) or lower --save-steps")
    base = load_model(config, train_config)
    if (checkpoint / "adapter_config.json").is_file():
        from peft import PeftModel

        model = PeftModel.from_pretrained(base.model, checkpoint)
    else:
        model = InternVLForConditionalGeneration.from_pretrained(checkpoint)
    return models.Loaded(model, base.tokenizer, base.template, str(checkpoint))


def evaluate_run(run_dir: str | Path, *, model: str | Path | None = None) -> dict[str, Any]:
    """Evaluate a model (default: the run's export) on the run's held-out sets; saved under eval/."""
    run_dir, config, train_config, eval_settings = _load_run(run_dir)
    target = Path(model) if model else run_dir / "export"
    loaded = models.load(str(target)) if target.exists() else load_trained(run_dir)
    held = json.loads((run_dir / "data" / "heldout.json").read_text())
    sets = {k: [(r, root) for r, root in v] for k, v in held.items()}
    report = evaluation.evaluate(loaded, make_builder(loaded, train_config, train=False), sets,
                                 batch_size=eval_settings["batch_size"], max_new_tokens=eval_settings["max_new_tokens"])
    evaluation.save_report(report, run_dir / "eval" / f"eval-{time.strftime('%Y%m%d-%H%M%S')}.json")
    return report


def export_run(run_dir: str | Path, out: str | Path, *, overwrite: bool = False) -> Path:
    """`adapt export`: the run's last complete checkpoint, merged, in the HF-native layout."""
    from adapt.export import export_model

    run_dir, config, train_config, _ = _load_run(run_dir)
    loaded = load_trained(run_dir)
    manifest = run_dir / "data" / "mixture" / "manifest.json"
    after = run_dir / "eval" / "after.json"
    card = {"base_model": config.model or f"{DEMO_MODEL} (random init demo)", "domain": config.domain,
            "mixture": json.loads(manifest.read_text()) if manifest.is_file() else None,
            "metrics": _headlines(json.loads(after.read_text())) if after.is_file() else None,
            "training": train_config.__dict__}
    return export_model(loaded.model, loaded.tokenizer, loaded.template, out, card=card, overwrite=overwrite,
                        max_tiles=train_config.max_tiles)
