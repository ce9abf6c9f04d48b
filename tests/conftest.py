"""Shared fixtures: the tiny model is built once per session (random init, seeded)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny():
    from adapt.models import load

    return load("tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from adapt.models import tiny_tokenizer

    return tiny_tokenizer()
