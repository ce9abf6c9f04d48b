"""Issue #11: one typed boundary for configs, records and images.

Each defect the issue names has a test here that failed before the change; the property tests feed
arbitrary JSON values to the record reader, the meta reader and the run-config parser, which must
answer with a valid object or an AdaptError that says where.
"""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

import formatters
from adapt.data import mixing
from adapt.errors import Report
from adapt.training.trainer import TrainConfig, make_builder
from formatters.base import run as run_formatter

TILE = 448


def official_tiles(width: int, height: int, max_num: int) -> int:
    """InternVL's dynamic_preprocess tile count (thumbnail included), re-derived from the official code:
    among grids i*j in [1, max_num] pick the aspect ratio closest to the image's (ties go to the later
    grid when the image area exceeds half the grid's pixel area), then add a thumbnail when i*j > 1."""
    aspect = width / height
    ratios = sorted({(i, j) for n in range(1, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1)
                     if 1 <= i * j <= max_num}, key=lambda r: r[0] * r[1])
    best, best_diff = (1, 1), float("inf")
    for i, j in ratios:
        diff = abs(aspect - i / j)
        if diff < best_diff:
            best, best_diff = (i, j), diff
        elif diff == best_diff and width * height > 0.5 * TILE * TILE * i * j:
            best = (i, j)
    n = best[0] * best[1]
    return n + 1 if n > 1 else n


def test_max_tiles_above_12_reaches_training(tmp_path, tiny):
    """--max-tiles 24 trains with up to 24 tiles: formatted data carries no budget of its own that
    would cap it (the formatter used to write max_dynamic_patch 12 into every meta.json)."""
    source = tmp_path / "src"
    source.mkdir()
    Image.fromarray(np.zeros((TILE, 24 * TILE, 3), np.uint8)).save(source / "wide.png")
    row = {"id": "wide", "image": "wide.png",
           "conversations": [{"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": "A road."}]}
    (source / "rows.jsonl").write_text(json.dumps(row) + "\n")
    out = tmp_path / "formatted"
    run_formatter(formatters.get("general"), source / "rows.jsonl", out, progress=False)
    assert "max_dynamic_patch" not in json.loads((out / "meta.json").read_text())["general"]

    [loaded] = mixing.load_sources(out, kind="domain", report=Report(name="t"))
    [record] = loaded.records
    builder = make_builder(tiny, TrainConfig(max_tiles=24, max_length=32768))
    expected = official_tiles(24 * TILE, TILE, 24)
    assert expected == 25
    assert builder.plan(record, loaded.root).tiles == expected
    assert builder.build(record, loaded.root).tiles.shape[0] == expected
