"""Domain recipes: which sources and formatters, prompts, metrics and default hyperparameters
make up one field. Built in: driving, medical, remote_sensing; a user declares their own in YAML
(`adapt run --domain my_domain.yaml`, see domains/recipe.py for the keys)."""

from __future__ import annotations

from pathlib import Path

from adapt.errors import AdaptError
from domains.recipe import DataSource, Domain, load_yaml_domain

BUILTIN = ("driving", "medical", "remote_sensing")


def get(name: str) -> Domain:
    """A built-in recipe by name, or a user recipe from a YAML file path."""
    if name.endswith((".yaml", ".yml")) or Path(name).is_file():
        return load_yaml_domain(name)
    key = name.replace("-", "_")
    if key == "driving":
        from domains.driving import DRIVING
        return DRIVING
    if key == "medical":
        from domains.medical import MEDICAL
        return MEDICAL
    if key == "remote_sensing":
        from domains.remote_sensing import REMOTE_SENSING
        return REMOTE_SENSING
    raise AdaptError(f"unknown domain {name!r}",
                     hint=f"choose one of: {', '.join(BUILTIN)}, or pass a YAML recipe file (see README)")


__all__ = ["BUILTIN", "DataSource", "Domain", "get"]
