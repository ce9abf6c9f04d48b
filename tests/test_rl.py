"""Task rewards, preference pairs from scored generations, and GRPO on TRL end to end.

Reward definitions are written out here independently: IoU of [x1, y1, x2, y2] boxes on the 0..1000
grid, DriveLM's plain string equality, and a lettered multiple-choice match."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import fast_config
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from adapt.checkpoints.models import load
from adapt.evaluation.rewards import format_reward, task_reward
from adapt.training.preference import PreferenceConfig, pair_builder
from adapt.training.rl import RLConfig, mean_reward, train_grpo
from adapt.training.trainer import train
from formatters.preference import pairs_from_generations

pytestmark = pytest.mark.usefixtures("one_thread")


def _iou(a, b) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return w * h / union if union > 0 else 0.0


def _grounding(box):
    return {"conversations": [{"from": "human", "value": "<image>\nWhere is the car?"},
                              {"from": "gpt", "value": f"<ref>car</ref><box>[[{', '.join(map(str, box))}]]</box>"}],
            "meta": {"task": "grounding"}}


coordinate = st.integers(0, 1000)
box = st.tuples(coordinate, coordinate, coordinate, coordinate).filter(lambda b: b[0] < b[2] and b[1] < b[3])


@settings(max_examples=60, deadline=None)
@given(box, box)
def test_grounding_reward_is_the_grid_iou_of_the_first_box(reference, predicted):
    record = _grounding(reference)
    answer = f"<ref>car</ref><box>[[{', '.join(map(str, predicted))}]]</box>"
    assert task_reward(record, answer) == pytest.approx(_iou(reference, predicted), abs=1e-9)
    assert format_reward(record, answer) == 1.0
    assert task_reward(record, "somewhere left") == 0.0 and format_reward(record, "somewhere left") == 0.0


def test_choice_exact_match_and_drivelm_rewards():
    choice = {"conversations": [{"from": "human", "value": "A. red or B. blue?"}, {"from": "gpt", "value": "B"}],
              "meta": {"task": "classification", "choices": ["A. red", "B. blue"], "answer": "B"}}
    assert [task_reward(choice, a) for a in ("B", "B. blue", "blue", "A", "A or B", "")] == [1, 1, 1, 0, 0, 0]
    vqa = {"conversations": [{"from": "human", "value": "Is there a lesion?"}, {"from": "gpt", "value": "Yes"}],
           "meta": {"task": "vqa", "answer": "Yes"}}
    assert task_reward(vqa, "yes.") == 1.0 and task_reward(vqa, "no") == 0.0
    drive = {"conversations": [{"from": "human", "value": "Is it safe? A. yes B. no"}, {"from": "gpt", "value": "A"}],
             "meta": {"task": "driving"}}
    assert task_reward(drive, "A") == 1.0 and task_reward(drive, "A.") == 0.0  # DriveLM: plain equality
    assert format_reward(drive, "A") == 1.0 and format_reward(drive, "") == 0.0 and format_reward(drive, "A\nB") == 0.0


def _choice_rows(folder, n: int, offset: int = 0):
    """Lettered two-way questions over one-tile random images; the right letter is always A."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(offset)
    rows = []
    for i in range(offset, offset + n):
        Image.fromarray(rng.integers(0, 256, (448, 448, 3), dtype=np.uint8)).save(folder / f"q{i}.png")
        rows.append(({"id": f"q{i}", "image": f"q{i}.png",
                      "conversations": [{"from": "human", "value": "<image>\nIs it A. red or B. blue? Answer with the letter."},
                                        {"from": "gpt", "value": "A"}],
                      "meta": {"task": "classification", "choices": ["A. red", "B. blue"], "answer": "A"}},
                     str(folder)))
    return rows


def test_pairs_from_generations_prefer_the_better_scored_answer(tmp_path):
    loaded = load("tiny", seed=0)
    entries = _choice_rows(tmp_path, 3)
    torch.manual_seed(0)
    builder = pair_builder(loaded, PreferenceConfig(max_tiles=1), train=False)
    pairs = pairs_from_generations(loaded, builder, entries, n=3, max_new_tokens=4)
    assert len(pairs) == 3  # random-init answers never name a choice: the reference becomes `chosen`
    for (pair, root), (record, _) in zip(pairs, entries):
        assert pair["chosen"] == "A" and pair["prompt"] == record["conversations"][0]["value"]
        assert pair["image"] == record["image"] and root == str(tmp_path)
        assert pair["meta"]["chosen_score"] == 1.0 == task_reward(record, pair["chosen"])
        assert pair["meta"]["rejected_score"] == task_reward(record, pair["rejected"]) < 1.0


@pytest.mark.slow
def test_grpo_runs_end_to_end_and_heldout_reward_does_not_drop(tmp_path, capsys):
    """A few SFT steps first (RL after SFT, as in practice: a random-init model never names a choice,
    so every group would have zero reward variance and nothing to learn from), then GRPO."""
    loaded = load("tiny", seed=0)
    train_rows, heldout = _choice_rows(tmp_path / "train", 4), _choice_rows(tmp_path / "heldout", 4, offset=100)
    loaded.model = train(loaded, train_rows, fast_config(max_steps=4), tmp_path / "sft", progress=False).model
    config = RLConfig(mode="full", learning_rate=2e-3, max_steps=4, prompts_per_step=2, generations=4,
                      max_new_tokens=4, logging_steps=1, max_tiles=1)
    before = mean_reward(loaded, heldout, config, samples=8)
    result = train_grpo(loaded, train_rows, config, tmp_path / "grpo", progress=False)
    loaded.model = result.model
    after = mean_reward(loaded, heldout, config, samples=8)
    with capsys.disabled():
        print(f"\nGRPO held-out mean reward {before['reward']:.3f} -> {after['reward']:.3f} "
              f"(task {before['task']:.3f} -> {after['task']:.3f})")
    logged = [row for row in result.log_history if "reward" in row]
    assert result.steps == 4 and len(logged) == 4
    assert any(row["reward_std"] > 0 for row in logged)  # some group had a learning signal
    assert after["reward"] >= before["reward"]
