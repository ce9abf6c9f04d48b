"""The two baselines every report shows beside before/after: the chance level of each task kind
(the best answer that ignores the image, computed from the held-out set) and the blind-image score
(the model re-scored with every image replaced by constant grey). The chance levels are checked
against closed forms computed here independently (majority class, majority answer per question
type, and for grounding on disjoint grid cells the share of the most frequent cell, which no box
can beat since a box with IoU >= 0.5 to a cell has more than half its area inside that cell)."""

from __future__ import annotations

from collections import Counter

import torch
from helpers import write_records
from hypothesis import given, settings
from hypothesis import strategies as st

from adapt import api
from adapt.evaluation import evaluator
from adapt.training.trainer import TrainConfig, make_builder


def _record(question: str, reference: str, task: str, **meta) -> dict:
    return {"id": f"{task}-{question}-{reference}", "image": "x.png",
            "conversations": [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": reference}],
            "meta": {"task": task, **meta}}


LABELS = ["desert", "forest", "river", "residential"]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(LABELS), min_size=1, max_size=40))
def test_classification_chance_is_the_majority_class(labels):
    records = [_record("Which class?", label, "classification", answer=label, choices=LABELS) for label in labels]
    chance = evaluator.chance_scores("classification", records)["accuracy"]
    assert chance == max(Counter(labels).values()) / len(labels)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["presence", "count"]), st.sampled_from(["yes", "no", "0", "1", "2"])),
                min_size=1, max_size=40))
def test_vqa_chance_is_the_majority_answer_per_question_type(rows):
    records = [_record(f"q {qtype}", answer, "vqa", answer=answer, question_type=qtype, source="rsvqa")
               for qtype, answer in rows]
    per_type = Counter(qtype for qtype, _ in rows)
    best = sum(max(Counter(a for t, a in rows if t == qtype).values()) for qtype in per_type)
    assert evaluator.chance_scores("vqa", records)["exact_match"] == best / len(rows)


def _cell_box(cell: int) -> list[int]:
    """Disjoint cells of a 3x3 grid on InternVL's 0..1000 scale (a margin keeps them apart)."""
    x1, y1 = (cell % 3) * 333 + 20, (cell // 3) * 333 + 20
    return [x1, y1, x1 + 290, y1 + 290]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 8), min_size=1, max_size=40))
def test_grounding_chance_is_the_most_frequent_cell(cells):
    records = [_record("<ref>the red vehicle</ref>", f"<ref>the red vehicle</ref><box>[{_cell_box(c)}]</box>",
                       "grounding", source="dior_rsvg") for c in cells]
    chance = evaluator.chance_scores("grounding", records)["accuracy"]
    assert chance == max(Counter(cells).values()) / len(cells)


def test_comparison_table_has_chance_before_after_and_blind_columns():
    section = {"score": 0.9, "tasks": {"vqa": {"exact_match": 0.9}}, "chance": {"score": 0.5, "tasks": {"vqa": 0.5}},
               "blind": {"score": 0.45, "tasks": {"vqa": 0.45}}}
    before = {"domain": {"score": 0.0, "tasks": {"vqa": {"exact_match": 0.0}}, "chance": section["chance"]}}
    table = evaluator.comparison_markdown(before, {"domain": section})
    assert table.splitlines()[0] == "| set | metric | chance | before | after | blind |"
    assert "| domain | score | 0.5000 | 0.0000 | 0.9000 | 0.4500 |" in table
    assert "| domain | vqa exact_match | 0.5000 | 0.0000 | 0.9000 | 0.4500 |" in table


def test_blind_generation_shows_the_model_only_grey_images(tiny, tmp_path):
    """The model gets the same number of tiles, every pixel the grey BLIND_GREY; without `blind` the
    real pixels (what the vision tower receives is checked)."""
    entries = write_records(tmp_path, n_images=2, n_text=0)
    builder = make_builder(tiny, TrainConfig(max_tiles=1), train=False)
    seen: list[torch.Tensor] = []

    def keep_pixels(_module, _args, kwargs):
        if kwargs.get("pixel_values") is not None:
            seen.append(kwargs["pixel_values"].detach().clone())

    handle = tiny.model.model.vision_tower.register_forward_pre_hook(keep_pixels, with_kwargs=True)
    try:
        evaluator.generate(tiny, builder, entries, batch_size=2, max_new_tokens=3, blind=True)
        grey = seen[0]
        seen.clear()
        evaluator.generate(tiny, builder, entries, batch_size=2, max_new_tokens=3)
        real = seen[0]
    finally:
        handle.remove()
    assert grey.shape == real.shape
    assert torch.unique(grey[:, 0]).numel() == 1 and torch.unique(grey[:, 2]).numel() == 1
    assert not torch.equal(real[0], real[1])


def test_lettered_classification_records_score_their_label(tmp_path):
    """The classification formatter's default lettered answers ("B. forest") score as right answers
    (they used to stop the evaluation: 'answer is not one of its choices')."""
    from formatters import get
    from formatters.base import run
    from formatters.synthetic.sources import write_class_folders

    write_class_folders(tmp_path / "aid", per_class=2)
    run(get("classification"), tmp_path / "aid", tmp_path / "out")
    records = [record for record, _ in api.load_records(tmp_path / "out")]
    assert records and all(". " in evaluator.reference_answer(r) for r in records)
    scores = evaluator.score_task("classification", records, [evaluator.reference_answer(r) for r in records])
    assert scores["accuracy"] == 1.0
    assert evaluator.chance_scores("classification", records)["accuracy"] == 0.25

