"""Shared fixtures for the training tests, and the training child that the crash tests SIGKILL.

Run as a script (`python tests/helpers.py SPEC.json`) it trains the tiny model on the records of a
spec file with `adapt.training.trainer.train`, logging which sample ids each optimizer step consumed, and
can hang at a chosen point (inside a step, or inside a checkpoint save before its completion
marker) so that the parent kills it exactly there.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from adapt.training.trainer import TrainConfig  # noqa: E402

Entry = tuple[dict[str, Any], str]
FAST = {"learning_rate": 1e-2, "dataloader_num_workers": 0, "save_steps": 1000, "warmup_steps": 0.0, "weight_decay": 0.0,
        "logging_steps": 1, "lr_scheduler_type": "constant", "max_grad_norm": 1.0}


def write_records(root: Path, n_images: int = 2, n_text: int = 2, *, seed: int = 0) -> list[Entry]:
    """One-tile 448x448 PNG rows (distinct answers) and text-only rows, as (record, root) entries."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    entries: list[Entry] = []
    for i in range(n_images):
        pixels = rng.integers(0, 256, (448, 448, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"img{i}.png")
        entries.append(({"id": f"img{i}", "image": f"img{i}.png",
                         "conversations": [{"from": "human", "value": "<image>\nWhich colour dominates?"},
                                           {"from": "gpt", "value": f"Mostly colour number {i}."}]}, str(root)))
    for i in range(n_text):
        entries.append(({"id": f"txt{i}",
                         "conversations": [{"from": "human", "value": f"Count to {i + 2}."},
                                           {"from": "gpt", "value": " ".join(str(k) for k in range(1, i + 3))}]},
                        str(root)))
    return entries


def fast_config(**overrides: Any) -> TrainConfig:
    """A TrainConfig whose every step moves every trainable weight (no warmup, no decay)."""
    return TrainConfig(**{**FAST, **overrides})


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    """Names present in both whose values differ."""
    return {name for name in before.keys() & after.keys() if not torch.equal(before[name], after[name])}


# ----------------------------------------------------------------------------------------------
# the training child (crash tests)
# ----------------------------------------------------------------------------------------------
def instrument(spec: dict[str, Any]) -> None:
    """Log one JSON line per optimizer step to spec['log'] ({"step": k, "ids": [...]}, k 1-based, the
    step being computed; ids only for direct `train` runs) and hang where the spec asks:
    `hang_in_step: k` inside step k's loss, `hang_in_save: k` while checkpoint-k is half written
    (weights saved, optimizer state and completion marker not yet)."""
    from adapt.data.batching import Collator
    from adapt.training import trainer as training

    log = open(spec["log"], "a", encoding="utf-8")  # noqa: SIM115 (lives as long as the process)

    def note(line: dict[str, Any]) -> None:
        log.write(json.dumps(line) + "\n")
        log.flush()
        os.fsync(log.fileno())

    collate = Collator.__call__

    def collate_with_ids(self, items):
        batch = collate(self, items)
        batch["record_ids"] = [s.id for s in items if s is not None]
        return batch

    compute_loss = training.AdaptTrainer.compute_loss

    def logged_compute_loss(self, model, inputs, *args, **kwargs):
        step = self.state.global_step + 1
        note({"step": step, "ids": inputs.pop("record_ids", None)})
        if step == spec.get("hang_in_step"):
            note({"hanging": "step", "step": step})
            time.sleep(600)
        return compute_loss(self, model, inputs, *args, **kwargs)

    save_optimizer = training.AdaptTrainer._save_optimizer_and_scheduler

    def slow_save(self, output_dir):
        if self.state.global_step == spec.get("hang_in_save"):
            note({"hanging": "save", "step": self.state.global_step, "folder": str(output_dir)})
            time.sleep(600)
        return save_optimizer(self, output_dir)

    if "cli" not in spec:  # evaluation batches go through the collator too; only training ones here
        Collator.__call__ = collate_with_ids
    training.AdaptTrainer.compute_loss = logged_compute_loss
    training.AdaptTrainer._save_optimizer_and_scheduler = slow_save
    spec["note"] = note


def run_child(spec_path: str) -> int:
    """`train` on spec['entries'] with spec['config'] into spec['out'] (final weights saved beside the
    checkpoints), or `adapt` with the arguments spec['cli']."""
    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(1)
    instrument(spec)
    if "cli" in spec:
        from adapt.cli import main

        return main(spec["cli"])
    from safetensors.torch import save_file

    from adapt.checkpoints.models import load
    from adapt.training.trainer import train

    entries = [(record, root) for record, root in spec["entries"]]
    result = train(load("tiny", seed=0), entries, TrainConfig(**spec["config"]), spec["out"],
                   resume=spec.get("resume", False), progress=False)
    save_file(snapshot(result.model), str(Path(spec["out"]) / "final.safetensors"))
    spec["note"]({"done": result.steps})
    return 0


if __name__ == "__main__":
    sys.exit(run_child(sys.argv[1]))
