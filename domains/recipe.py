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
    train: {learning_rate: 1.0e-5, epochs: 1, mode: full}
    eval: {holdout: 0.1, general_holdout: 200, max_new_tokens: 32}
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from adapt.errors import AdaptError

# The Mini-InternVL domain-adaptation recipe (REFERENCE.md section 5); drop path is not offered
# because the native InternViT has no stochastic depth.
MINI_INTERNVL_TRAIN = {"learning_rate": 1e-5, "lr_scheduler": "cosine", "warmup_ratio": 0.03, "weight_decay": 0.01,
                       "max_tiles": 12, "pack": True, "loss_reduction": "square", "max_length": 8192,
                       "precision": "auto", "mode": "full"}
# blind: also score the fine-tuned model with every image replaced by grey (a second generation pass;
# the demos turn it on, real runs opt in with `--blind` or eval: {blind: true}).
# The CPU demos' training: one 448 tile per image (real runs use 12), a learning rate a random-init
# tiny model learns from in a few hundred steps, small packs; what made the driving demo learn.
DEMO_TRAIN = {"learning_rate": 3e-3, "warmup_ratio": 0.05, "epochs": 20, "max_tiles": 1, "pack_tokens": 2048,
              "pack_tiles": 8, "weight_decay": 0.0, "logging_steps": 20, "save_steps": 100, "workers": 1}
DEFAULT_EVAL = {"holdout": 0.1, "general_holdout": 64, "max_new_tokens": 64, "batch_size": 4, "blind": False}


@dataclass
class DataSource:
    """One input of a recipe: a formatter kind, the source path, formatter options, a mixing weight."""

    kind: str
    path: str
    options: dict[str, Any] = field(default_factory=dict)
    name: str | None = None
    weight: float = 1.0

    @property
    def label(self) -> str:
        return self.name or f"{self.kind}-{Path(self.path).name}"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": str(self.path), "options": self.options, "name": self.label,
                "weight": self.weight}

    @classmethod
    def parse(cls, text: str, *, where: str = "--data") -> DataSource:
        """`KIND=PATH[?key=value&key=value]`, e.g. `driving=/data/nuscenes?drivelm=/data/v1_1_train.json`."""
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
        weight = float(options.pop("weight", 1.0))
        return cls(kind=kind, path=path, options=options, weight=weight)


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


def load_yaml_domain(path: str | Path) -> Domain:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AdaptError("domain recipe not found", path=path) from None
    except yaml.YAMLError as err:
        raise AdaptError(f"domain recipe is not valid YAML ({err})", path=path) from None
    if not isinstance(raw, dict) or "name" not in raw:
        raise AdaptError("a domain recipe is a YAML mapping with at least 'name' and 'sources'", path=path)
    accepted = ("name", "summary", "sources", "general", "train", "eval", "filter")
    unknown = set(raw) - set(accepted)
    if unknown:
        raise AdaptError(f"unknown key(s) in domain recipe: {', '.join(sorted(unknown))}", path=path,
                         hint=f"a recipe accepts: {', '.join(accepted)} (see domains/recipe.py)")

    def sources(key: str) -> list[DataSource]:
        items = raw.get(key) or []
        out = []
        for i, item in enumerate(items):
            if not isinstance(item, dict) or "kind" not in item or "path" not in item:
                raise AdaptError(f"{key}[{i}] needs 'kind' and 'path'", path=path)
            src = Path(item["path"])
            resolved = src if src.is_absolute() else path.parent / src
            out.append(DataSource(kind=item["kind"], path=str(resolved), options=dict(item.get("options") or {}),
                                  name=item.get("name"), weight=float(item.get("weight", 1.0))))
        return out

    return Domain(name=str(raw["name"]), summary=str(raw.get("summary", "")), sources=sources("sources"),
                  general=sources("general"), train=dict(raw.get("train") or {}), eval=dict(raw.get("eval") or {}),
                  filter=dict(raw.get("filter") or {}))
