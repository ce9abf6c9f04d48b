"""Synthetic general instruction data (InternVL meta + JSONL) for the demo and tests.

Image rows ask the colour of a painted square (answers balanced over the colours) and text rows
ask small arithmetic questions, so "general skill" is measurable and forgettable: a model that
overfits the domain and stops answering these shows it in the held-out general score.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40)}


def write_general_demo(root: str | Path, n: int = 64, *, seed: int = 0, image_share: float = 0.5) -> Path:
    """Write `root/images/*.png`, `root/general.jsonl` and an InternVL meta file `root/meta.json`."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    names = list(COLOURS)
    rows = []
    n_images = round(n * image_share)
    for i in range(n):
        if i < n_images:
            colour = names[i % len(names)]
            image = Image.new("RGB", (320, 240), (128, 128, 128))
            x, y = rng.randint(10, 200), rng.randint(10, 120)
            ImageDraw.Draw(image).rectangle([x, y, x + 100, y + 100], fill=COLOURS[colour])
            image.save(root / "images" / f"g{i}.png")
            rows.append({"id": f"g{i}", "image": f"images/g{i}.png", "conversations": [
                {"from": "human", "value": "<image>\nWhat colour is the square? Answer with one word."},
                {"from": "gpt", "value": colour}], "meta": {"task": "vqa", "answer": colour, "answer_type": "closed"}})
        else:
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            rows.append({"id": f"t{i}", "conversations": [
                {"from": "human", "value": f"What is {a} plus {b}? Answer with a number."},
                {"from": "gpt", "value": str(a + b)}], "meta": {"task": "text", "answer": str(a + b)}})
    rng.shuffle(rows)
    with open(root / "general.jsonl", "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    (root / "meta.json").write_text(json.dumps({"demo_general": {"root": ".", "annotation": "general.jsonl",
                                                                 "repeat_time": 1, "data_augment": False}}))
    return root / "meta.json"
