"""Every shipped run config resolves to a valid run: known keys, a valid TrainConfig, known formatters."""

from __future__ import annotations

from pathlib import Path

import pytest

import formatters
from adapt import api
from domains import DataSource

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*/*.yaml"))
RUN_CONFIGS = [p for p in CONFIGS if p.parent.name in ("driving", "medical", "remote_sensing")]


def test_there_is_a_config_per_domain_and_size():
    names = {f"{p.parent.name}/{p.stem}" for p in RUN_CONFIGS}
    assert {f"{d}/{s}" for d in ("driving", "medical", "remote_sensing") for s in ("1b", "2b", "4b")} <= names


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_run_config_resolves(path):
    config = api.load_config_file(path)
    domain, train_config, eval_settings = api.resolve(config)
    assert domain.name == path.parent.name == config.domain
    assert train_config.mode == "full" and train_config.loss_reduction == "square" and train_config.max_tiles == 12
    assert train_config.learning_rate == pytest.approx(1e-5) and train_config.pack
    assert eval_settings["max_new_tokens"] > 0
    for item in config.data + config.general:
        source = DataSource(**item)
        assert formatters.get(source.kind).kind == source.kind
