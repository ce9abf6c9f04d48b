"""The run configuration: one typed object (run, data sources, mixing, training, evaluation) read
by one parser from a YAML run config, CLI flags, a domain recipe's defaults and a notebook's dict.

Types and ranges are declared on the fields (pydantic), so a wrong value anywhere ends in one
`AdaptError` naming the file, the key path and what is accepted. Training options are checked by
`adapt.training.trainer.TrainConfig` (TrainingArguments' names, other TrainingArguments fields
passed through); data sources and evaluation settings by `domains.recipe.SourceEntry` / `EvalEntry`.
"""

from __future__ import annotations

import multiprocessing
import os
from multiprocessing import forkserver
from multiprocessing.context import BaseContext
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from adapt.errors import AdaptError, validation_error
from domains.recipe import DataSource, EvalEntry, SourceEntry

RUN_NAME_HINT = "a run name is one folder name inside --runs-dir: letters, digits and . _ + = - (no '/' or '..')"


class RunConfig(BaseModel):
    """Everything that defines a run; written to <run>/config.yaml and read back by --resume."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True)

    domain: str = "driving"
    model: str | None = None  # None: the demo (tiny preset) when no data is given
    general_ratio: Annotated[float, Field(ge=0, lt=1)] = 0.25
    mix_by: Literal["samples", "tokens"] = "samples"
    upsample: bool = False
    # the share of the domain training set used (after the held-out split; a seeded sample of each
    # source's records): Mini-InternVL's data-amount ablation, and a smaller, faster demo
    domain_fraction: Annotated[float, Field(gt=0, le=1)] = 1.0
    seed: Annotated[int, Field(ge=0)] = 0
    data: list[SourceEntry] = Field(default_factory=list)  # empty: the recipe's sources, else its demo
    general: list[SourceEntry] = Field(default_factory=list)  # empty: the recipe's general data
    train: dict[str, Any] = Field(default_factory=dict)  # TrainConfig options (TrainingArguments names)
    eval: EvalEntry = Field(default_factory=dict)
    filter: dict[str, Any] = Field(default_factory=dict)  # FilterConfig settings over the recipe's; {}: no filter
    stages: list[dict[str, Any]] = Field(default_factory=list)  # staged training (adapt.training.stages); empty: one stage
    strict: bool = False
    num_proc: Annotated[int, Field(ge=1)] | None = None  # data-preparation processes; None: the cores available
    runs_dir: str = "runs"
    name: str | None = None
    _source: Path | None = PrivateAttr(default=None)  # the YAML file it came from, for error messages

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as err:
            raise config_error(err, data) from None

    def __setattr__(self, name: str, value: Any) -> None:
        try:
            super().__setattr__(name, value)
        except ValidationError as err:
            raise config_error(err, {name: value}, self._source) from None

    @field_validator("data", "general")
    @classmethod
    def _complete_sources(cls, entries: list[SourceEntry]) -> list[dict[str, Any]]:
        return [DataSource(**entry).to_dict() for entry in entries]

    @field_validator("name")
    @classmethod
    def _one_folder(cls, name: str | None) -> str | None:
        """A run directory stays inside --runs-dir (`--name ../../x` used to write outside it)."""
        if name is not None and (not name or name in (".", "..") or any(c in name for c in "/\\\0")
                                 or name.startswith("-") or Path(name).is_absolute()):
            raise ValueError(RUN_NAME_HINT)
        return name

    @property
    def demo(self) -> bool:
        return not self.data

    @property
    def source_file(self) -> Path | None:
        return self._source

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, which containers and `taskset` narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def resolve_num_proc(num_proc: int | None) -> int:
    """Processes for formatting and data preparation: `num_proc`, else every available core."""
    return num_proc if num_proc is not None else available_cores()


# what every data worker (formatting, Arrow tables) imports: the server imports it once for all of them
WORKER_PRELOAD = ["formatters.base", "adapt.data.arrow", "datasets", "pyarrow"]


def process_context(preload: list[str]) -> BaseContext:
    """Where the OS has it, forkserver: one server process imports the `preload` modules (with
    `WORKER_PRELOAD` and torch) once, started now so that it does so while the caller keeps working,
    and forks every worker from it; else spawn. Never plain fork: the parent may have torch and its
    threads loaded. The server is the process's first caller's: later preloads are not imported."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(dict.fromkeys(WORKER_PRELOAD + preload)))  # no effect once the server runs
    forkserver.ensure_running()
    return context


def config_error(err: ValidationError, value: Any, path: Path | None = None) -> AdaptError:
    """A RunConfig error as the user reads it: unknown keys with the accepted ones, else key paths."""
    unknown = [str(item["loc"][0]) for item in err.errors() if item["type"] == "extra_forbidden"
               and len(item["loc"]) == 1]
    if unknown:
        return AdaptError(f"unknown config key(s): {', '.join(unknown)}", path=path,
                          hint=f"accepted: {', '.join(RunConfig.model_fields)}")
    return validation_error(err, value, path=path, hint="see configs/*/*.yaml and README.md for the accepted values")


def parse_run_config(data: Any, path: str | Path | None = None) -> RunConfig:
    """The one parser: a mapping of run options (YAML, CLI, notebook) -> RunConfig or AdaptError."""
    path = Path(path) if path is not None else None
    if not isinstance(data, dict):
        raise AdaptError("a run config is a mapping of run options", path=path,
                         hint=f"accepted keys: {', '.join(RunConfig.model_fields)}")
    try:
        config = RunConfig(**{str(key): value for key, value in data.items()})
    except AdaptError as err:  # the same message, with the file named
        raise AdaptError(err.message, path=path, hint=err.hint) from None
    config._source = path
    return config


def read_yaml(path: Path) -> Any:
    """Safe-load a YAML file (tags like !!python/object are refused, never executed)."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AdaptError("config file not found", path=path) from None
    except UnicodeDecodeError:
        raise AdaptError("config file is not UTF-8 text", path=path) from None
    except yaml.YAMLError as err:
        raise AdaptError(f"config file is not valid YAML ({err})", path=path,
                         hint="fix the YAML at the line shown (plain keys and values only)") from None


def load_config_file(path: str | Path) -> RunConfig:
    """A run config YAML (configs/<domain>/<model>.yaml), safe-loaded and checked."""
    path = Path(path)
    return parse_run_config(read_yaml(path) or {}, path)


def read_run_config(run_dir: str | Path) -> RunConfig:
    """The RunConfig a run directory's config.yaml saved (for --resume, eval and export)."""
    run_dir = Path(run_dir)
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise AdaptError("not a run directory (no config.yaml)", path=run_dir)
    raw = read_yaml(path)
    saved = raw.get("run") if isinstance(raw, dict) else None
    if not isinstance(saved, dict):
        raise AdaptError("config.yaml has no 'run' mapping", path=path,
                         hint="this file is written at the start of every run; restore it or start a new run")
    return parse_run_config(saved, path)
