"""Per-answer scores from adapt's metrics, for building preference pairs and as RL rewards.

Each is the metric the evaluator reports for the record's task, on one answer, so what a
preference or GRPO stage optimises is what evaluation measures:
  grounding       IoU of the first predicted box with the reference on the 0..1000 grid (0 if none parses)
  classification  1 if the answer names the right class / choice, else 0
  vqa, video      1 on a normalised exact match, else 0
  driving         DriveLM accuracy (plain string equality) for closed questions, else exact match
  other           normalised exact match
plus a format reward: 1 when the answer has the shape the task asks for (a parsable <box> for
grounding, a non-empty single-line answer otherwise).
"""

from __future__ import annotations

from adapt.data.boxes import parse_boxes
from adapt.data.records import Record
from adapt.evaluation import metrics
from adapt.evaluation.evaluator import reference_answer, score_task

TASK_METRIC = {"grounding": "mean_iou", "classification": "accuracy", "vqa": "exact_match", "video": "exact_match",
               "driving": "accuracy"}


def task_of(record: Record) -> str:
    return record.get("meta", {}).get("task", "text")


def task_reward(record: Record, answer: str | None) -> float:
    """The task metric of one answer to `record`, in [0, 1]."""
    task = task_of(record)
    answer = (answer or "").strip()
    if task == "driving" and not _is_closed(reference_answer(record)):
        return float(metrics.answer_match(answer, reference_answer(record)))
    scores = score_task(task, [record], [answer])
    value = scores.get(TASK_METRIC.get(task, "exact_match"))
    return float(value or 0.0)


def _is_closed(reference: str) -> bool:
    """A DriveLM multiple-choice (a letter) or yes/no answer, where the challenge uses string equality."""
    text = reference.strip().rstrip(".").lower()
    return text in ("yes", "no") or (len(text) == 1 and text.isalpha())


def format_reward(record: Record, answer: str | None) -> float:
    """1 when the answer has the shape its task asks for, else 0."""
    answer = (answer or "").strip()
    if task_of(record) == "grounding":
        return float(bool(parse_boxes(answer)))
    return float(bool(answer) and "\n" not in answer)
