"""Preference records, their batches, and DPO / MPO training on TRL's DPOTrainer.

Checks against definitions written out here, not imported from adapt: the sequence log-probability
is HF's own teacher-forced cross-entropy, and the first MPO step's loss is TRL's documented mix
(0.8 sigmoid DPO + 0.2 BCO pair + 1.0 SFT) at policy == reference, where every log-ratio is 0:
0.8 log 2 + 0.2 (2 log 2) + mean chosen-token NLL."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from adapt.checkpoints.models import load
from adapt.data.templates import IGNORE_INDEX
from adapt.data.tiling import normalize
from adapt.errors import Report
from adapt.training.preference import (
    LOSS_PRESETS,
    PreferenceCollator,
    PreferenceConfig,
    pair_builder,
    pair_records,
    preference_scores,
    train_preference,
)
from formatters.preference import read_pairs

pytestmark = pytest.mark.usefixtures("one_thread")

COLOURS = ["red", "blue", "green", "amber", "white", "black", "grey", "pink", "teal", "gold", "olive", "cyan"]


def _pairs(folder, n: int, offset: int = 0):
    """One-tile image pairs whose chosen answer is longer than the rejected one ("It is red." vs
    "red."): a random-init model prefers the shorter one, so held-out accuracy starts at 0."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(offset)
    out = []
    for i in range(offset, offset + n):
        Image.fromarray(rng.integers(0, 256, (448, 448, 3), dtype=np.uint8)).save(folder / f"p{i}.png")
        colour = COLOURS[i % len(COLOURS)]
        out.append(({"id": f"p{i}", "image": f"p{i}.png", "prompt": "<image>\nWhat colour is it?",
                     "chosen": f"It is {colour}.", "rejected": f"{colour}."}, str(folder)))
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pairs")
    return {"train": _pairs(folder, 8), "heldout": _pairs(folder, 6, offset=100)}


def test_read_pairs_keeps_good_rows_and_counts_bad_ones_by_row(tmp_path):
    Image.new("RGB", (64, 64)).save(tmp_path / "a.png")
    rows = [{"id": "ok", "image": "a.png", "prompt": "Is it dark?", "chosen": "Yes.", "rejected": "No."},
            "not json",
            {"prompt": "Q", "chosen": "same", "rejected": "same"},
            {"prompt": "Q", "chosen": "A"},
            {"image": "missing.png", "prompt": "Q", "chosen": "A", "rejected": "B"},
            {"image": ["a.png", "a.png"], "prompt": "<image> Q", "chosen": "A", "rejected": "B"},
            {"image": "../outside.png", "prompt": "Q", "chosen": "A", "rejected": "B"},
            {"prompt": "Text only?", "chosen": "A", "rejected": "B"}]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    report = Report()
    pairs = read_pairs(path, report)
    assert [r["id"] for r, _ in pairs] == ["ok", "pairs:8"]
    assert pairs[0][0]["prompt"] == "<image>\nIs it dark?"  # single image: placeholder in front
    assert (report.read, report.written, report.skipped) == (8, 2, 6)
    assert [s.row for s in report.skips] == [2, 3, 4, 5, 6, 7]
    reasons = " | ".join(s.reason for s in report.skips)
    for text in ("not JSON", "the same answer", "'rejected' must be", "image not found", "2 images but 1"):
        assert text in reasons


def test_batches_are_trl_layout_with_adapt_tiles_and_answer_masks(data):
    loaded = load("tiny", seed=0)
    pairs = data["train"][:2]
    collator = PreferenceCollator(pair_builder(loaded, PreferenceConfig(max_tiles=1), train=True), pairs,
                                  loaded.tokenizer.pad_token_id)
    batch = collator([{"pair": 0}, {"pair": 1}])
    assert batch["input_ids"].shape[0] == 4 and batch["pixel_values"].shape[0] == 4  # c0 c1 r0 r1, one tile each
    assert torch.equal(batch["pixel_values"][0], batch["pixel_values"][2])
    assert not torch.equal(batch["pixel_values"][0], batch["pixel_values"][1])
    for row, (record, side) in enumerate([(pairs[0][0], "chosen"), (pairs[1][0], "chosen"),
                                          (pairs[0][0], "rejected"), (pairs[1][0], "rejected")]):
        answer = batch["input_ids"][row][batch["completion_mask"][row].bool()]
        assert loaded.tokenizer.decode(answer, skip_special_tokens=True).strip() == record[side]


def _sequence_logp(loaded, record, root) -> float:
    """Summed log-probability of the answer, from HF's own mean cross-entropy over the labels."""
    builder = pair_builder(loaded, PreferenceConfig(max_tiles=1), train=False)
    sample = builder.build(record, root)
    labels = sample.labels[None]
    out = loaded.model(input_ids=sample.input_ids[None], pixel_values=normalize(sample.tiles, torch.float32),
                       labels=labels)
    return -float(out.loss) * int((labels[:, 1:] != IGNORE_INDEX).sum())


def test_preference_scores_match_hf_sequence_log_probabilities(data):
    loaded = load("tiny", seed=0)
    pairs = data["heldout"][:3]
    scores = preference_scores(loaded, pairs, max_tiles=1, batch_size=2)
    with torch.no_grad():
        margins = []
        for record, root in pairs:
            chosen, rejected = pair_records(record)
            margins.append(_sequence_logp(loaded, chosen, root) - _sequence_logp(loaded, rejected, root))
    assert scores["pairs"] == 3
    assert scores["margin"] == pytest.approx(sum(margins) / 3, abs=1e-3)
    assert scores["accuracy"] == sum(m > 0 for m in margins) / 3


def test_first_mpo_step_loss_is_trls_weighted_mix(data, tmp_path):
    assert LOSS_PRESETS["mpo"] == (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0])
    loaded = load("tiny", seed=0)
    pairs = data["train"][:3]
    with torch.no_grad():  # SFT part: mean NLL over every chosen answer token of the (single) batch
        builder = pair_builder(loaded, PreferenceConfig(max_tiles=1), train=False)
        total, tokens = 0.0, 0
        for record, root in pairs:
            chosen, _ = pair_records(record)
            sample = builder.build(chosen, root)
            n = int((sample.labels[1:] != IGNORE_INDEX).sum())
            total, tokens = total - _sequence_logp(loaded, chosen, root), tokens + n
    config = PreferenceConfig(loss="mpo", max_steps=1, per_device_train_batch_size=3, learning_rate=1e-3, logging_steps=1,
                              max_tiles=1)
    result = train_preference(loaded, pairs, config, tmp_path / "out", progress=False)
    first = next(row for row in result.log_history if "loss" in row)
    assert first["loss"] == pytest.approx(0.8 * math.log(2) + 0.2 * 2 * math.log(2) + total / tokens, rel=1e-3)


@pytest.mark.slow
def test_mpo_raises_heldout_preference_accuracy(data, tmp_path, capsys):
    loaded = load("tiny", seed=0)
    before = preference_scores(loaded, data["heldout"], max_tiles=1)
    config = PreferenceConfig(loss="mpo", mode="full", learning_rate=5e-3, max_steps=8, per_device_train_batch_size=2,
                              logging_steps=1, max_tiles=1)
    result = train_preference(loaded, data["train"], config, tmp_path / "out", progress=False)
    loaded.model = result.model
    after = preference_scores(loaded, data["heldout"], max_tiles=1)
    with capsys.disabled():
        print(f"\nMPO held-out preference accuracy {before['accuracy']:.3f} -> {after['accuracy']:.3f}, "
              f"margin {before['margin']:.2f} -> {after['margin']:.2f}")
    assert result.steps == 8
    assert after["accuracy"] > before["accuracy"] and after["margin"] > before["margin"]


@pytest.mark.slow
def test_lora_dpo_trains_adapters_only_and_widens_the_margin(data, tmp_path, capsys):
    loaded = load("tiny", seed=0)
    base = {n: p.detach().clone() for n, p in loaded.model.named_parameters()}
    before = preference_scores(loaded, data["heldout"], max_tiles=1)
    config = PreferenceConfig(loss="dpo", mode="lora", lora_r=4, learning_rate=5e-2, max_steps=6, per_device_train_batch_size=2,
                              logging_steps=1, max_tiles=1)
    result = train_preference(loaded, data["train"], config, tmp_path / "out", progress=False)
    trained = dict(result.model.named_parameters())
    assert any("lora_" in n for n in trained)
    frozen = {n.replace("base_model.model.", "").replace(".base_layer", ""): p for n, p in trained.items()
              if "lora_" not in n}
    assert all(torch.equal(base[n], frozen[n]) for n in base if n in frozen)
    loaded.model = result.model
    after = preference_scores(loaded, data["heldout"], max_tiles=1)
    with capsys.disabled():
        print(f"\nLoRA DPO held-out margin {before['margin']:.2f} -> {after['margin']:.2f}, "
              f"accuracy {before['accuracy']:.3f} -> {after['accuracy']:.3f}")
    assert after["margin"] > before["margin"]
