"""Formatters: real source data -> unified records (InternVL JSONL + meta).

Each module defines `formatters.base.Formatter` objects; `formatters.base.run` drives one: progress
bar, atomic JSONL, an InternVL meta file, and the report of what was read, written and skipped.
The registry maps the `adapt format KIND` names to them, imported lazily so that `adapt format
video` does not import the nuScenes devkit.
"""

from __future__ import annotations

import importlib

from adapt.errors import AdaptError

REGISTRY: dict[str, str] = {
    "classification": "formatters.classification:CLASSIFICATION",
    "medmnist": "formatters.classification:MEDMNIST",
    "grounding": "formatters.grounding:GROUNDING",
    "region": "formatters.region:REGION",
    "driving": "formatters.driving:DRIVING",
    "vqa-rad": "formatters.medical:VQA_RAD",
    "slake": "formatters.medical:SLAKE",
    "pmc-vqa": "formatters.medical:PMC_VQA",
    "pathvqa": "formatters.medical:PATHVQA",
    "dicom": "formatters.medical:DICOM",
    "video": "formatters.video:VIDEO",
    "rsvqa": "formatters.remote_sensing:RSVQA",
    "general": "formatters.general:GENERAL",
}


def get(kind: str):
    """The `Formatter` registered under `kind`."""
    if kind not in REGISTRY:
        raise AdaptError(f"unknown formatter kind {kind!r}", hint="choose one of: " + ", ".join(sorted(REGISTRY)))
    module, _, attr = REGISTRY[kind].partition(":")
    return getattr(importlib.import_module(module), attr)
