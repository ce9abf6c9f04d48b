"""Shared fixtures: the tiny model is built once per session (random init, seeded)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny():
    from adapt.checkpoints.models import load

    return load("tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from adapt.checkpoints.models import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture
def one_thread():
    """The test machine's cores are shared: one torch thread trains the tiny model several times faster
    than two threads fighting over them (and both runs of a comparison use the same count)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_terminal_summary(terminalreporter) -> None:
    """Print the bad-input matrix (tests/test_bad_inputs.py) as a table when that module ran."""
    import sys

    rows = next((getattr(m, "BAD_INPUT_MATRIX", None) for name, m in list(sys.modules.items())
                 if name.rpartition(".")[2] == "test_bad_inputs"), None)
    if not rows:
        return
    terminalreporter.write_sep("=", f"bad-input matrix ({len(rows)} cases)")
    terminalreporter.write_line("| area | case | outcome |")
    terminalreporter.write_line("|---|---|---|")
    for area, case, outcome in rows:
        cell = outcome.replace("|", "\\|")
        terminalreporter.write_line(f"| {area} | {case} | {cell} |")
