"""Train the tiny model on a small fixture in one process or under a launcher, recording what each
rank consumed (used by tests/test_distributed.py; not a test module itself).

    python -m accelerate.commands.launch --config_file configs/accelerate/ddp.yaml --num_processes 2 \\
        tests/distributed_train.py FIXTURE OUT

For each loss reduction in REDUCTIONS it trains the same model from the same init with the same
global batch of 2 samples (batch_size 2 // world size per rank) and writes OUT/<reduction>-rank<R>.json:
{"losses": [...], "grad_norms": [...], "items": [[epoch, index, padding], ...]}, the items being what
this rank's dataloader built; rank 0 also writes OUT/<reduction>-weights.pt (the trained state dict).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from adapt.checkpoints.models import load
from adapt.training import trainer as training
from adapt.training.trainer import TrainConfig, train

REDUCTIONS = ("square", "sample")
N_SAMPLES = 9  # odd: the last step of an epoch has one sample for two ranks (a zero-weight padding item)
GLOBAL_BATCH = 2
EPOCHS = 2


def write_fixture(folder: Path) -> Path:
    """N_SAMPLES records whose answers differ in length (1..N_SAMPLES words), so the token, sample and
    square reductions weigh them differently: one-tile images, and a last text-only one (its step
    leaves the vision tower without gradients on one rank)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    words = ["red", "green", "blue", "car", "road", "sign", "tree", "left", "right"]
    rows = []
    for i in range(N_SAMPLES):
        answer = " ".join(words[(i + k) % len(words)] for k in range(i + 1))
        row = {"id": f"s{i}", "meta": {"task": "vqa"},
               "conversations": [{"from": "human", "value": "<image>\nDescribe the picture."},
                                 {"from": "gpt", "value": answer}]}
        if i == N_SAMPLES - 1:
            row["conversations"][0]["value"] = "Name some colours."
            row["meta"]["task"] = "text"
        else:
            Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
            row["image"] = f"img{i}.png"
        rows.append(row)
    path = folder / "records.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def config(reduction: str, world_size: int) -> TrainConfig:
    return TrainConfig(mode="full", learning_rate=1e-3, lr_scheduler_type="constant", warmup_steps=0.0, weight_decay=0.0,
                       num_train_epochs=EPOCHS, pack=False, per_device_train_batch_size=GLOBAL_BATCH // world_size, gradient_accumulation_steps=1,
                       loss_reduction=reduction, max_tiles=1, max_length=1024, logging_steps=1, save_steps=100_000,
                       dataloader_num_workers=0, seed=0, precision="fp32", dataloader_pin_memory=False)


class RecordingDataset(training.MixtureDataset):
    """The engine's dataset, noting every (epoch, index, padding) item it is asked to build."""

    items: list[list[Any]] = []

    def __getitem__(self, item):
        index, epoch, padding = item
        RecordingDataset.items.append([epoch, index, padding])
        return super().__getitem__(item)


def run(fixture: Path, out: Path, reduction: str, world_size: int, rank: int) -> dict[str, Any]:
    """One training; returns (and writes) this rank's losses, grad norms and consumed items."""
    records = [json.loads(line) for line in (fixture / "records.jsonl").read_text().splitlines()]
    entries = [(r, str(fixture)) for r in records]
    loaded = load("tiny", seed=0)
    RecordingDataset.items = []
    training.MixtureDataset = RecordingDataset  # the engine builds its dataset through this name
    try:
        result = train(loaded, entries, config(reduction, world_size), out / f"{reduction}-checkpoints-w{world_size}",
                       progress=False)
    finally:
        training.MixtureDataset = RecordingDataset.__mro__[1]
    steps = [h for h in result.log_history if "loss" in h and "train_runtime" not in h]
    report = {"losses": [h["loss"] for h in steps], "grad_norms": [h["grad_norm"] for h in steps],
              "items": RecordingDataset.items, "steps": result.steps}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{reduction}-rank{rank}.json").write_text(json.dumps(report))
    if rank == 0:
        torch.save({k: v.detach().cpu() for k, v in result.model.state_dict().items()}, out / f"{reduction}-weights.pt")
    return report


def main(fixture: str, out: str) -> None:
    from accelerate import PartialState

    state = PartialState(cpu=True)
    for reduction in REDUCTIONS:
        run(Path(fixture), Path(out), reduction, state.num_processes, state.process_index)
    # leave the gloo group cleanly: exiting with it alive can abort a rank ("terminate called ...")
    state.wait_for_everyone()
    state.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
