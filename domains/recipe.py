"""The shape of a domain recipe, and user recipes from YAML.

A recipe names its data sources (each a formatter kind + path + options), the general data mixed
in, training defaults (TrainConfig keys) and evaluation settings, plus an optional demo that writes
synthetic sources in the real formats so the whole pipeline runs with no data at hand.

YAML (safe-loaded):

    name: my_domain
    summary: Crop disease classification
    sources:
      - {kind: classification, path: /data/crops, options: {choices: lettered}}
    general:
      - {kind: general, path: /data/internvl_sft/meta.json, weight: 1.0}
    train: {learning_rate: 1.0e-5, num_train_epochs: 1, mode: full}
    eval: {holdout: 0.1, general_holdout: 200, max_new_tokens: 32}
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictStr, TypeAdapter, ValidationError, with_config
from typing_extensions import NotRequired, TypedDict

from adapt.errors import AdaptError, validation_error

# The Mini-InternVL domain-adaptation recipe (REFERENCE.md section 5) in TrainingArguments' names;
# drop path is not offered because the native InternViT has no stochastic depth.
MINI_INTERNVL_TRAIN = {"learning_rate": 1e-5, "lr_scheduler_type": "cosine", "warmup_steps": 0.03, "weight_decay": 0.01,
                       "max_tiles": 12, "pack": True, "loss_reduction": "square", "max_length": 8192,
                       "precision": "auto", "mode": "full"}
# blind: also score the fine-tuned model with every image replaced by grey (a second generation pass;
# the demos turn it on, real runs opt in with `--blind` or eval: {blind: true}).
# The CPU demos' training: one 448 tile per image (real runs use 12), a learning rate a random-init
# tiny model learns from in a few hundred steps, small packs; what made the driving demo learn.
DEMO_TRAIN = {"learning_rate": 3e-3, "warmup_steps": 0.05, "num_train_epochs": 20, "max_tiles": 1, "pack_tokens": 2048,
              "pack_tiles": 8, "weight_decay": 0.0, "logging_steps": 20, "save_steps": 100}
DEFAULT_EVAL = {"holdout": 0.1, "general_holdout": 64, "max_new_tokens": 64, "batch_size": 4, "blind": False}


@with_config(ConfigDict(extra="forbid"))
class SourceEntry(TypedDict):
    """A data source as a run config, a recipe or a notebook writes it (declared once, checked by pydantic)."""

    kind: Annotated[StrictStr, Field(min_length=1)]
    path: Annotated[StrictStr, Field(min_length=1)]
    options: NotRequired[dict[str, Any]]
    name: NotRequired[StrictStr | None]
    weight: NotRequired[Annotated[float, Field(gt=0, allow_inf_nan=False)]]
    max_tiles: NotRequired[Annotated[int, Field(ge=1)] | None]  # this source's tile budget, below the run's


@with_config(ConfigDict(extra="forbid"))
class EvalEntry(TypedDict, total=False):
    """Evaluation settings: held-out shares (a fraction below 1, or a count) and generation settings."""

    holdout: Annotated[float, Field(gt=0, lt=1)] | Annotated[int, Field(ge=1)]
    general_holdout: Annotated[float, Field(gt=0, lt=1)] | Annotated[int, Field(ge=0)]
    max_new_tokens: Annotated[int, Field(ge=1)]
    batch_size: Annotated[int, Field(ge=1)]
    blind: bool  # also score the trained model on grey images (the demos; opt-in for real runs)


SOURCE = TypeAdapter(SourceEntry)
EVAL = TypeAdapter(EvalEntry)


def check_eval(settings: Any, *, path: str | Path | None = None, prefix: str = "eval") -> dict[str, Any]:
    """Evaluation settings checked against EvalEntry, or a user error naming the key."""
    try:
        return dict(EVAL.validate_python(settings, strict=True))
    except ValidationError as err:
        raise validation_error(err, settings, path=path, prefix=prefix,
                               hint=f"the eval section accepts: {', '.join(DEFAULT_EVAL)}") from None


@dataclass
class DataSource:
    """One input of a recipe: a formatter kind, the source path, formatter options, a mixing weight."""

    kind: str
    path: str
    options: dict[str, Any] = field(default_factory=dict)
    name: str | None = None
    weight: float = 1.0
    max_tiles: int | None = None

    @property
    def label(self) -> str:
        return self.name or f"{self.kind}-{Path(self.path).name}"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": str(self.path), "options": self.options, "name": self.label,
                "weight": self.weight, "max_tiles": self.max_tiles}

    @classmethod
    def parse(cls, text: str, *, where: str = "--data") -> DataSource:
        """`KIND=PATH[?key=value&key=value]`, e.g. `driving=/data/nuscenes?drivelm=/data/v1_1_train_nus.json`."""
        kind, sep, rest = text.partition("=")
        if not sep or not kind or not rest:
            raise AdaptError(f"{where} {text!r} is not KIND=PATH", hint="e.g. --data vqa-rad=/data/vqa_rad")
        path, _, query = rest.partition("?")
        options: dict[str, Any] = {}
        for pair in filter(None, query.split("&")):
            key, eq, value = pair.partition("=")
            if not eq:
                raise AdaptError(f"{where} option {pair!r} is not key=value")
            options[key] = value
        entry = {"kind": kind, "path": path, "options": options}
        for key in ("weight", "max_tiles"):  # the mixing and tiling settings, not formatter options
            if key in options:
                entry[key] = options.pop(key)
        try:  # lax: a command line gives weight=0.5 as text
            checked = SOURCE.validate_python(entry)
        except ValidationError as err:
            raise validation_error(err, entry, prefix=where, hint="e.g. --data 'general=/data/rows.jsonl?weight=0.5'") from None
        return cls(**checked)


@dataclass
class Domain:
    name: str
    summary: str
    sources: list[DataSource] = field(default_factory=list)  # the recipe's default real-data layout (docs)
    general: list[DataSource] = field(default_factory=list)
    train: dict[str, Any] = field(default_factory=dict)
    eval: dict[str, Any] = field(default_factory=dict)
    filter: dict[str, Any] = field(default_factory=dict)  # adapt.data.filtering.FilterConfig settings; {}: off
    demo: Callable[[Path, int], tuple[list[DataSource], list[DataSource]]] | None = None
    demo_train: dict[str, Any] = field(default_factory=dict)  # overrides for the tiny CPU demo
    demo_eval: dict[str, Any] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)  # README-style command lines

    def train_defaults(self, demo: bool) -> dict[str, Any]:
        return {**MINI_INTERNVL_TRAIN, **self.train, **(self.demo_train if demo else {})}

    def eval_settings(self, demo: bool = False) -> dict[str, Any]:
        return {**DEFAULT_EVAL, **self.eval, **(self.demo_eval if demo else {})}


class RecipeFile(BaseModel):
    """A user recipe YAML: a partial run config (its sources and general data are a run's defaults)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    name: Annotated[StrictStr, Field(min_length=1)]
    summary: StrictStr = ""
    sources: list[SourceEntry] = Field(default_factory=list)
    general: list[SourceEntry] = Field(default_factory=list)
    train: dict[str, Any] = Field(default_factory=dict)
    eval: EvalEntry = Field(default_factory=dict)
    filter: dict[str, Any] = Field(default_factory=dict)  # adapt.data.filtering.FilterConfig settings; {}: off


def load_yaml_domain(path: str | Path) -> Domain:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AdaptError("domain recipe not found", path=path) from None
    except UnicodeDecodeError:
        raise AdaptError("domain recipe is not UTF-8 text", path=path) from None
    except yaml.YAMLError as err:
        raise AdaptError(f"domain recipe is not valid YAML ({err})", path=path) from None
    if not isinstance(raw, dict) or "name" not in raw:
        raise AdaptError("a domain recipe is a YAML mapping with at least 'name' and 'sources'", path=path)
    unknown = sorted(str(key) for key in set(raw) - set(RecipeFile.model_fields))
    if unknown:
        raise AdaptError(f"unknown key(s) in domain recipe: {', '.join(unknown)}", path=path,
                         hint=f"a recipe accepts: {', '.join(RecipeFile.model_fields)} (see domains/recipe.py)")
    try:
        recipe = RecipeFile.model_validate(raw)
    except ValidationError as err:
        raise validation_error(err, raw, path=path, hint="see the recipe example in README.md") from None

    def sources(entries: list[SourceEntry]) -> list[DataSource]:
        out = []
        for entry in entries:
            source = DataSource(**entry)
            if not Path(source.path).is_absolute():  # relative to the recipe file, wherever adapt runs
                source.path = str(path.resolve().parent / source.path)
            out.append(source)
        return out

    return Domain(name=recipe.name, summary=recipe.summary, sources=sources(recipe.sources),
                  general=sources(recipe.general), train=recipe.train, eval=dict(recipe.eval),
                  filter=recipe.filter)
