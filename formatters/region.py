"""Region perception (Mini-InternVL): the question carries a box, the answer names what is there.

    human: <image>\\nWhat object is in this location <box>[[x1, y1, x2, y2]]</box>?
    gpt:   vehicle<box>[[x1, y1, x2, y2]]</box>          (answer_box=False: just "vehicle")

It reads exactly the inputs of the grounding formatter, through its readers (`plan_targets`, `check_targets`), so
box conventions, 0..1 detection and skips behave the same. Every object is its own record (COCO
annotations are not grouped by category as they are for grounding). The answer is the object's
category name where the source has one (COCO category, VOC `object/name`), else its referring
expression; `answer_field` forces either.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapt.data import boxes as bx
from adapt.data import records as rec
from adapt.errors import AdaptError, Report
from formatters.base import Plan, choose, parse_options, sharded, turn
from formatters.grounding import (
    ReaderOptions,
    TargetJob,
    TargetUnit,
    check_targets,
    reader_root,
    target_plan,
)

REGION_QUESTION = "What object is in this location <box>{box}</box>?"


@dataclass(frozen=True)
class RegionOptions(ReaderOptions):
    question: str = REGION_QUESTION
    answer_box: bool = True
    answer_field: str = "auto"


def plan(source: Path, out: Path, report: Report, **options: Any) -> Plan:
    opts = parse_options(RegionOptions, options, "region")
    choose("region", "answer_field", opts.answer_field, ("auto", "name", "expression"))
    if "{box}" not in opts.question:
        raise AdaptError("option question must contain the placeholder {box}")
    return target_plan(source, report, opts, group=False)


def work(job: TargetJob, units: Sequence[TargetUnit], out: Path, report: Report) -> Iterator[rec.Record]:
    opts = job.opts
    for target in check_targets(job.root, units, report):
        if opts.answer_field == "expression" or (opts.answer_field == "auto" and not target.name):
            answer = target.expression
        elif target.name:
            answer = target.name
        else:
            report.skip("answer_field=name but the object has no category name", path=target.path, row=target.row,
                        id=target.id)
            continue
        box = bx.box_text(target.grid)
        yield {
            "id": target.id, "image": target.image,
            "conversations": turn(opts.question.replace("{box}", box),
                                  f"{answer}<box>{box}</box>" if opts.answer_box else answer),
            "meta": {"task": "region", "source": job.name, "domain": opts.domain, "answer": answer,
                     "expression": target.expression, "boxes_px": target.boxes_px, "boxes": target.grid,
                     "image_size": list(target.size), **({"category": target.name} if target.name else {})},
        }


def image_root(source: Path, **options: Any) -> Path:
    return reader_root(Path(source), parse_options(RegionOptions, options, "region"))


REGION = sharded("region", plan, work, image_root,
                 "Region perception: box in the question, object name (and box) in the answer")
