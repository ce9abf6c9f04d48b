"""Evaluation: batched generation with the training-time prompt builder, then a metric per task kind.

Domain skill is scored by task kind (classification accuracy, grounding Acc@IoU>=0.5, region
accuracy, VQA exact match closed/open, driving accuracy + language + match scores); general
skill is kept honest two ways on held-out general data: answer exact match / token F1 of the
generations and the teacher-forced loss of the reference answers (which moves smoothly even
where a small model's generations are all wrong).

Two baselines make a score readable on its own: `chance` (the best answer that ignores the image,
from the held-out set itself) and, on request, `blind` (the same model re-scored with every image
replaced by a constant grey one: how much of its score comes from the pixels).
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from adapt.checkpoints.models import Loaded
from adapt.data.batching import Collator
from adapt.data.boxes import parse_boxes, to_grid
from adapt.data.records import Record
from adapt.data.samples import SampleBuilder, SampleDropped
from adapt.data.tiling import normalize
from adapt.evaluation import metrics
from adapt.evaluation.drivelm import Judge, score_driving
from adapt.fileio import atomic_write_text
from adapt.training.trainer import supervised_loss

# Which number each task kind is summarised by (the "domain score" of a run).
HEADLINE = {"classification": "accuracy", "grounding": "accuracy", "region": "accuracy", "vqa": "exact_match",
            "driving": "accuracy", "video": "exact_match", "caption": "cider", "text": "exact_match"}
# The grey (uint8) of the blind baseline's images: the middle of the range, close to the ImageNet mean.
BLIND_GREY = 128
# The chance level tries at most this many of a group's most frequent answers (keeps real runs cheap).
CHANCE_CANDIDATES = 64


def reference_answer(record: Record) -> str:
    return next(t["value"] for t in reversed(record["conversations"]) if t["from"] == "gpt")


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def generate(loaded: Loaded, builder: SampleBuilder, entries: Sequence[tuple[Record, str]], *,
             batch_size: int = 4, max_new_tokens: int = 64, progress: tqdm | None = None,
             blind: bool = False) -> list[str | None]:
    """Greedy answers for (record, root) pairs, built exactly like training prompts (left-padded);
    `progress` (the evaluation phase's display) counts the entries answered.

    `blind` replaces every image by a constant grey one of the same size (same tiles, same prompt),
    so the answers can only come from the text."""
    model = loaded.model.eval()
    device = _model_device(model)
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    tokenizer = loaded.tokenizer
    stop = builder.encoder.stop_token_ids()
    out: list[str | None] = [None] * len(entries)
    for start in range(0, len(entries), batch_size):
        chunk = []
        if progress is not None:
            progress.update(min(batch_size, len(entries) - start))
        for i in range(start, min(start + batch_size, len(entries))):
            record, root = entries[i]
            try:
                chunk.append((i, builder.build(record, root, index=i, generation=True)))
            except SampleDropped:
                continue  # counted as unanswered (None) in the metrics
        if not chunk:
            continue
        width = max(len(s) for _, s in chunk)
        ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, (_, s) in enumerate(chunk):
            ids[row, width - len(s):] = s.input_ids
            mask[row, width - len(s):] = 1
        kwargs: dict[str, Any] = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
        tiles = [s.tiles for _, s in chunk if s.tiles is not None]
        if blind:
            tiles = [torch.full_like(t, BLIND_GREY) for t in tiles]
        if tiles:
            kwargs["pixel_values"] = normalize(torch.cat(tiles).to(device), dtype)
        generated = model.generate(**kwargs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop,
                                   pad_token_id=tokenizer.pad_token_id)
        for row, (i, _) in enumerate(chunk):
            out[i] = tokenizer.decode(generated[row, width:], skip_special_tokens=True).strip()
    return out


@torch.no_grad()
def answer_loss(loaded: Loaded, builder: SampleBuilder, entries: Sequence[tuple[Record, str]], *,
                progress: tqdm | None = None) -> float | None:
    """Mean per-token cross-entropy of the reference answers (teacher forced)."""
    model = loaded.model.eval()
    device = _model_device(model)
    collator = Collator(loaded.tokenizer.pad_token_id, pack=False, loss_reduction="token")
    total, count = 0.0, 0
    for i, (record, root) in enumerate(entries):
        if progress is not None:
            progress.update()
        try:
            sample = builder.build(record, root, index=i)
        except SampleDropped:
            continue
        batch = {k: v.to(device) for k, v in collator([sample]).items()}
        n = float(batch["loss_weights"][:, 1:].sum())
        total += float(supervised_loss(model, batch, None)) * n
        count += int(n)
    return total / count if count else None


def score_task(task: str, records: Sequence[Record], predictions: Sequence[str | None],
               judge: Judge | None = None) -> dict[str, Any]:
    """Metrics for one task kind; unanswered predictions (None) count as wrong. `judge` (off by default)
    adds DriveLM's GPT score from a local chat model."""
    preds = [p or "" for p in predictions]
    refs = [reference_answer(r) for r in records]
    metas = [r.get("meta", {}) for r in records]
    if task == "classification":
        choices = [m.get("choices") or None for m in metas]
        # the label: a lettered reference ("B. forest") is not itself one of the choices
        answers = [m.get("label") or m.get("answer", ref) for m, ref in zip(metas, refs)]
        if any(c is None for c in choices):
            choices = None
        return metrics.classification_accuracy(preds, answers, choices)
    if task == "grounding":
        gts = []
        for m, ref in zip(metas, refs):
            if m.get("boxes_px") and m.get("image_size"):
                w, h = m["image_size"]
                gts.append([to_grid(b, w, h) for b in m["boxes_px"]])
            else:
                gts.append(parse_boxes(ref))
        return metrics.grounding_accuracy(preds, gts)
    if task == "region":
        names = [m.get("name") or m.get("category") or m.get("answer") or ref for m, ref in zip(metas, refs)]
        return metrics.region_accuracy(preds, names)
    if task in ("vqa", "video"):
        return metrics.vqa_scores(preds, [m.get("answer", ref) for m, ref in zip(metas, refs)],
                                  [m.get("answer_type") for m in metas])
    if task == "driving":
        return score_driving(records, preds, refs, judge)
    scores = metrics.language_scores(preds, refs) if task == "caption" else {}
    scores["exact_match"] = _mean_bool(metrics.answer_match(p, r) for p, r in zip(preds, refs))
    scores["token_f1"] = sum(metrics.token_f1(p, r) for p, r in zip(preds, refs)) / max(len(refs), 1)
    scores["count"] = len(refs)
    return scores


def _mean_bool(values) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def evaluate(loaded: Loaded, builder: SampleBuilder, sets: dict[str, Sequence[tuple[Record, str]]], *,
             batch_size: int = 4, max_new_tokens: int = 64, with_loss: bool = True,
             progress: tqdm | None = None, judge: Judge | None = None, blind: bool = False) -> dict[str, Any]:
    """Score each named set ("domain", "general", ...) per task kind; returns a JSON-able dict.
    `progress` is the evaluation phase's one display (it counts each entry answered and each scored).

    Every set also gets its `chance` level; `blind` adds the grey-image baseline (a second generation pass)."""
    report: dict[str, Any] = {}
    for name, entries in sets.items():
        if not entries:
            continue
        predictions = generate(loaded, builder, entries, batch_size=batch_size, max_new_tokens=max_new_tokens,
                               progress=progress)
        by_task: dict[str, list[int]] = defaultdict(list)
        for i, (record, _) in enumerate(entries):
            by_task[record.get("meta", {}).get("task", "text")].append(i)
        counts = {t: len(i) for t, i in by_task.items()}
        tasks = {task: score_task(task, [entries[i][0] for i in idx], [predictions[i] for i in idx], judge)
                 for task, idx in sorted(by_task.items())}
        section: dict[str, Any] = {"tasks": tasks, "count": len(entries), "score": _headline(tasks, counts)}
        section["chance"] = _summary({task: chance_scores(task, [entries[i][0] for i in idx])
                                      for task, idx in sorted(by_task.items())}, counts)
        if blind:
            grey = generate(loaded, builder, entries, batch_size=batch_size, max_new_tokens=max_new_tokens, blind=True)
            section["blind"] = _summary({task: score_task(task, [entries[i][0] for i in idx], [grey[i] for i in idx])
                                         for task, idx in sorted(by_task.items())}, counts)
        if with_loss:
            section["answer_loss"] = answer_loss(loaded, builder, entries, progress=progress)
        section["examples"] = [{"id": entries[i][0].get("id"), "prediction": predictions[i],
                                "reference": reference_answer(entries[i][0])} for i in range(min(8, len(entries)))]
        report[name] = section
    return report


def _summary(tasks: dict[str, dict[str, Any]], counts: dict[str, int]) -> dict[str, Any]:
    """A baseline's headline score overall and per task kind (the columns beside before and after)."""
    return {"score": _headline(tasks, counts),
            "tasks": {task: scores.get(HEADLINE.get(task, "exact_match")) for task, scores in tasks.items()}}


def _chance_group(record: Record) -> tuple[str, str]:
    """Records whose best input-free answer may differ: one group per source and question type
    (VQA-RAD PRES vs POS, RSVQA presence vs count); a source without question types is one group."""
    meta = record.get("meta", {})
    return str(meta.get("source", "")), str(meta.get("question_type") or "")


def _constant_answer(record: Record) -> str:
    """What a model that ignores the image would say for this record's answer: the label, the
    answer, or the whole reference (a grounding reference is its box)."""
    meta = record.get("meta", {})
    return str(meta.get("label") or meta.get("answer") or reference_answer(record))


def chance_answers(task: str, records: Sequence[Record]) -> list[str]:
    """Per record, the one answer of its group (`_chance_group`) that scores best on the group's held-out
    records: the majority class, the majority answer per question type, the single box that maximises
    Acc@0.5. Candidates are the group's own answers (its CHANCE_CANDIDATES most frequent)."""
    groups: dict[tuple[str, str], list[int]] = defaultdict(list)
    for i, record in enumerate(records):
        groups[_chance_group(record)].append(i)
    key = HEADLINE.get(task, "exact_match")
    out = [""] * len(records)
    for members in groups.values():
        group = [records[i] for i in members]
        frequency = Counter(_constant_answer(r) for r in group)
        best, best_score = "", -1.0
        for candidate, _ in frequency.most_common(CHANCE_CANDIDATES):
            value = score_task(task, group, [candidate] * len(group)).get(key)
            if value is not None and value > best_score:
                best, best_score = candidate, value
        for i in members:
            out[i] = best
    return out


def chance_scores(task: str, records: Sequence[Record]) -> dict[str, Any]:
    """The task's metrics for `chance_answers`: what ignoring the image scores on these records."""
    return score_task(task, records, chance_answers(task, records))


def _headline(tasks: dict[str, dict[str, Any]], counts: dict[str, int]) -> float | None:
    """Sample-weighted mean of each task's headline metric."""
    total, weight = 0.0, 0
    for task, scores in tasks.items():
        value = scores.get(HEADLINE.get(task, "exact_match"))
        if value is not None and not (isinstance(value, float) and math.isnan(value)):
            total += value * counts[task]
            weight += counts[task]
    return total / weight if weight else None


def comparison_markdown(before: dict[str, Any] | None, after: dict[str, Any]) -> str:
    """A markdown table of headline scores and answer losses: chance, before, after fine-tuning, and
    the fine-tuned model on grey images (blind; n/a when not run)."""
    lines = ["| set | metric | chance | before | after | blind |", "|---|---|---|---|---|---|"]
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    for name, section in after.items():
        prior = (before or {}).get(name, {})
        chance = section.get("chance") or prior.get("chance") or {}
        blind = section.get("blind") or {}
        lines.append(f"| {name} | score | {fmt(chance.get('score'))} | {fmt(prior.get('score'))} | "
                     f"{fmt(section.get('score'))} | {fmt(blind.get('score'))} |")
        if "answer_loss" in section:
            lines.append(f"| {name} | answer loss | n/a | {fmt(prior.get('answer_loss'))} | "
                         f"{fmt(section.get('answer_loss'))} | n/a |")
        for task, scores in section["tasks"].items():
            key = HEADLINE.get(task, "exact_match")
            old = prior.get("tasks", {}).get(task, {}).get(key)
            lines.append(f"| {name} | {task} {key} | {fmt(chance.get('tasks', {}).get(task))} | {fmt(old)} | "
                         f"{fmt(scores.get(key))} | {fmt(blind.get('tasks', {}).get(task))} |")
    return "\n".join(lines) + "\n"


def save_report(report: dict[str, Any], path: str | Path) -> None:
    atomic_write_text(path, json.dumps(report, indent=2, ensure_ascii=False, default=str))
