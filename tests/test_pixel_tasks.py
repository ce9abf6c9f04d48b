"""The remote-sensing demo data (formatters/synthetic/pixel_tasks.py) through the real formatters:
every answer is read off the pixels and balanced over its answers, so a model that ignores the image
scores the chance level; the grounding tiles' light is the same in every tile, so it says where a
patch is, never the answer."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from adapt import api
from adapt.data.boxes import from_grid
from adapt.evaluation.evaluator import reference_answer
from formatters import get
from formatters.base import run
from formatters.synthetic.pixel_tasks import (
    BUILDING_SLOTS,
    GRID,
    TILE,
    WATER,
    _lit,
    write_dior_rsvg_grid,
    write_rsvqa_demo,
)
from formatters.synthetic.sources import paint


def _records(kind: str, source: Path, out: Path, **options: str) -> list[tuple[dict, np.ndarray]]:
    run(get(kind), source, out, progress=False, **options)
    return [(record, np.asarray(Image.open(Path(root) / record["image"]).convert("RGB"), dtype=np.float32))
            for record, root in api.load_records(out)]


def test_grounding_box_is_the_cell_that_differs_from_the_empty_lit_tile(tmp_path):
    records = _records("grounding", write_dior_rsvg_grid(tmp_path / "dior", per_cell=3), tmp_path / "out", split="train")
    empty = np.asarray(_lit(paint((TILE, TILE), [])), dtype=np.float32)
    step = TILE // GRID
    cells = []
    for record, image in records:
        change = np.abs(image - empty).max(axis=-1)
        per_cell = [change[r * step:(r + 1) * step, c * step:(c + 1) * step].mean() for r in range(GRID) for c in range(GRID)]
        [box] = record["meta"]["boxes"]
        x1, y1, x2, y2 = from_grid(box, TILE, TILE)
        cell = int((y1 + y2) / 2 // step) * GRID + int((x1 + x2) / 2 // step)
        assert int(np.argmax(per_cell)) == cell, (record["id"], per_cell)
        assert sorted(per_cell)[-2] < 0.25 * per_cell[cell]  # the other cells are the light and noise only
        assert "left" not in reference_answer(record) and "top" not in reference_answer(record)
        cells.append(cell)
    assert Counter(cells) == {cell: 3 for cell in range(GRID * GRID)}


def test_rsvqa_answers_are_the_water_and_the_red_blocks_in_the_tile(tmp_path):
    records = _records("rsvqa", write_rsvqa_demo(tmp_path / "rsvqa", n_images=16), tmp_path / "out")
    answers: dict[str, Counter] = {"presence": Counter(), "count": Counter()}
    margin = 8  # inside every shape whatever its jitter (up to 6 pixels)
    for record, image in records:
        red = [image[y1 + margin:y2 - margin, x1 + margin:x2 - margin].mean(axis=(0, 1)) for x1, y1, x2, y2 in BUILDING_SLOTS]
        water = image[WATER[1] + margin:WATER[3] - margin, WATER[0] + margin:WATER[2] - margin].mean(axis=(0, 1))
        seen = {"count": str(sum(int(r - b > 80) for r, _, b in red)), "presence": "yes" if water[2] - water[0] > 80 else "no"}
        kind = record["meta"]["question_type"]
        assert reference_answer(record) == seen[kind], (record["id"], seen)
        answers[kind][seen[kind]] += 1
    assert answers == {"presence": {"yes": 8, "no": 8}, "count": {str(n): 4 for n in range(4)}}
