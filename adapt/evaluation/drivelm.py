"""DriveLM scoring of formatted driving records, as the official challenge evaluation scores them.

The formatter rewrites object tags to integer 0..1000 points of the stitched image; the official
match regex reads camera-pixel decimals only. So predictions get the formatter's inverse
(`restore_tags`) and references their original camera-pixel text before any DriveLM metric runs.
Questions are routed by the challenge tag carried in each record (`meta["tag"]`); records from the
training release have none, and then the tag follows the answer: multiple-choice / yes-no -> accuracy,
open -> language, open with object points -> also match. Which routing was used is reported.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any, Protocol

from adapt.data.records import Record
from adapt.evaluation import metrics


class Judge(Protocol):
    name: str

    def rate(self, answers: Sequence[str], references: Sequence[str]) -> list[float | None]: ...


def answer_tag(answer_px: str, declared: str | None = None) -> list[int]:
    """The tag a question without a challenge tag gets, from its camera-pixel answer (nuScenes
    which-camera questions, declared "camera", are closed: accuracy)."""
    from formatters.driving import answer_type

    if declared == "camera" or answer_type(answer_px) != "open":
        return [metrics.DRIVELM_ACCURACY_TAG]
    if metrics.point_match(answer_px, answer_px)[1]:
        return [metrics.DRIVELM_LANGUAGE_TAG, metrics.DRIVELM_MATCH_TAG]
    return [metrics.DRIVELM_LANGUAGE_TAG]


def _frame_order(meta: dict[str, Any]) -> tuple[int, int]:
    """The official order within a key frame: perception, prediction, planning, behavior, then the index."""
    from formatters.driving import DRIVELM_GROUPS

    group = meta.get("qa_type")
    return (DRIVELM_GROUPS.index(group) if group in DRIVELM_GROUPS else len(DRIVELM_GROUPS), int(meta.get("index", 0)))


def score_driving(records: Sequence[Record], predictions: Sequence[str], references: Sequence[str],
                  judge: Judge | None = None) -> dict[str, Any]:
    """DriveLM accuracy / language / match (+ GPT with a judge) over driving records, tags restored."""
    from formatters.driving import restore_tags  # the formatter owns the tag geometry and its inverse

    metas = [r.get("meta", {}) for r in records]
    preds = [restore_tags(p) for p in predictions]
    refs = [m.get("answer_camera_px") or restore_tags(ref) for m, ref in zip(metas, references)]
    questions = [m.get("question_camera_px") or restore_tags(next(
        (t["value"] for t in r["conversations"] if t["from"] == "human"), "")) for m, r in zip(metas, records)]
    official = bool(metas) and all(isinstance(m.get("tag"), list) for m in metas)
    keep = [True] * len(records)
    if official:
        frames: dict[str, list[int]] = defaultdict(list)
        for i, m in enumerate(metas):
            frames[str(m.get("sample_token", i))].append(i)
        for indices in frames.values():
            indices.sort(key=lambda i: _frame_order(metas[i]))
            kept = metrics.drivelm_graph_keep([questions[i] for i in indices], [preds[i] for i in indices],
                                              [refs[i] for i in indices])
            for i, flag in zip(indices, kept):
                keep[i] = flag
    scored = [i for i in range(len(records)) if keep[i]]
    tags = [metas[i]["tag"] if official else answer_tag(refs[i], metas[i].get("answer_type")) for i in scored]
    ratings = None
    if judge is not None:
        ratings = [None] * len(scored)
        rated = [k for k, t in enumerate(tags) if {metrics.DRIVELM_GPT_TAG, metrics.DRIVELM_MATCH_TAG} & set(t)]
        for k, rating in zip(rated, judge.rate([preds[scored[k]] for k in rated], [refs[scored[k]] for k in rated])):
            ratings[k] = rating
    scores = metrics.drivelm_scores([preds[i] for i in scored], [refs[i] for i in scored], tags, ratings,
                                    judge=judge.name if judge is not None else None)
    language = scores.pop("language_scores")
    scores.update({k: v for k, v in language.items() if k not in ("language", "count")})
    scores["exact_match"] = _mean(metrics.answer_match(p, r) for p, r in zip(predictions, references))
    scores["routing"] = "challenge tags" if official else "answer type (no challenge tags in the records)"
    scores["graph_skipped"] = len(records) - len(scored)
    scores["count"] = len(records)
    return scores


def _mean(values) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None
