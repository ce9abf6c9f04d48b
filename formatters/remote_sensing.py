"""RSVQA (LR and HR): remote-sensing VQA from three JSON lists joined by ids.

The release ships, per split, `<P>_split_<split>_questions.json` `{"questions": [...]}` (`id`,
`img_id`, `type`, `question`, `answers_ids`, `active`), `..._answers.json` `{"answers": [...]}` (`id`,
`question_id`, `answer`, `active`) and `..._images.json` `{"images": [...]}` (`id`, `questions_ids`,
`active`), with P = `LR` (images `Images_LR/<id>.tif`) or `USGS` (HR, images `Data/<id>.tif`; HR also
has the split `test_phili`). Questions, answers and images marked `active: false` were removed from
the dataset by its authors: they are dropped and counted in `report.stats`, not reported as skips.
A question whose image or answer is missing, or whose image file is missing or corrupt, is a
counted skip with the questions file and its 1-based position in the list.

Options: `split` (default "train"), `prefix` (LR / USGS; detected when one set of files matches the
split), `images` (image folder, detected), `types` (keep only these question types, e.g.
presence,comp), `prompt_suffix` (appended to the question; InternVL's short-answer instruction by
default), `source_name`, `domain`. meta: task vqa, `answer`, `answer_type` ("closed" for yes/no
answers, else "open"), `question_type` (the release's `type`), `image_size`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapt.data import records as rec
from adapt.errors import AdaptError, Report
from formatters.base import Formatter, ImageChecker, load_json, parse_options, turn

SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
IMAGE_FOLDERS = ("Images_LR", "Data", "Images_HR", "Images")


@dataclass(frozen=True)
class RSVQAOptions:
    split: str = "train"
    prefix: str | None = None
    images: str | None = None
    types: list[str] | None = None
    prompt_suffix: str = SHORT_ANSWER
    source_name: str | None = None
    domain: str = "remote_sensing"


def _prefix(source: Path, opts: RSVQAOptions) -> str:
    if not source.is_dir():
        raise AdaptError("pass the RSVQA folder (with *_split_<split>_questions.json), not a file", path=source)
    if opts.prefix is not None:
        return opts.prefix
    found = sorted(p.name[: -len(f"_split_{opts.split}_questions.json")]
                   for p in source.glob(f"*_split_{opts.split}_questions.json"))
    if len(found) != 1:
        raise AdaptError(f"found {len(found)} question files for split {opts.split!r} ({', '.join(found) or 'none'})",
                         path=source, hint="pass split=train|val|test (HR also test_phili) and, if several, prefix=LR|USGS")
    return found[0]


def _image_folder(source: Path, opts: RSVQAOptions) -> str:
    if opts.images is not None:
        return opts.images
    for folder in IMAGE_FOLDERS:
        if (source / folder).is_dir():
            return folder
    raise AdaptError(f"no image folder ({', '.join(IMAGE_FOLDERS)}) in the RSVQA folder", path=source,
                     hint="pass images=<folder with <id>.tif>")


def _items(path: Path, key: str) -> list[Any]:
    data = load_json(path, f"RSVQA {key} file")
    items = data.get(key) if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise AdaptError(f"expected {{\"{key}\": [...]}}", path=path)
    return items


def _by_id(items: list[Any]) -> dict[Any, dict[str, Any]]:
    return {item["id"]: item for item in items if isinstance(item, dict) and "id" in item}


def _count(report: Report, key: str) -> None:
    report.stats[key] = report.stats.get(key, 0) + 1


def _generate(source: Path, out: Path, report: Report, **options: Any) -> Iterator[rec.Record]:
    opts = parse_options(RSVQAOptions, options, "rsvqa")
    prefix = _prefix(source, opts)
    stem = f"{prefix}_split_{opts.split}"
    questions_path = source / f"{stem}_questions.json"
    questions = _items(questions_path, "questions")
    answers = _by_id(_items(source / f"{stem}_answers.json", "answers"))
    images = _by_id(_items(source / f"{stem}_images.json", "images"))
    folder = _image_folder(source, opts)
    name = opts.source_name or {"LR": "rsvqa_lr", "USGS": "rsvqa_hr"}.get(prefix, f"rsvqa_{prefix.lower()}")
    checker = ImageChecker(source, report)
    for row, question in enumerate(questions, start=1):
        if isinstance(question, dict) and question.get("active") is False:  # the release's removed-entry stubs
            _count(report, "inactive_questions")
            continue
        if not isinstance(question, dict) or not {"id", "img_id", "question", "answers_ids"} <= question.keys():
            report.read += 1
            report.skip("question lacks id, img_id, question or answers_ids", path=questions_path, row=row)
            continue
        if opts.types is not None and question.get("type") not in opts.types:
            _count(report, "other_types")
            continue
        image = images.get(question["img_id"])
        if image is not None and not image.get("active", True):
            _count(report, "inactive_images")
            continue
        report.read += 1
        ident = f"{name}-{opts.split}-{question['id']}"
        if image is None:
            report.skip(f"image id {question['img_id']!r} is not in the images file", path=questions_path, row=row, id=ident)
            continue
        ids = question["answers_ids"] if isinstance(question["answers_ids"], list) else [question["answers_ids"]]
        found = [answers[a] for a in ids if a in answers and answers[a].get("active", True)]
        if any(a.get("question_id", question["id"]) != question["id"] for a in found):
            report.skip(f"answers_ids {ids} point to an answer of another question", path=questions_path, row=row,
                        id=ident)
            continue
        answer = str(found[0].get("answer", "")).strip() if found else ""
        if not answer:
            report.skip(f"no active answer among answers_ids {ids}", path=questions_path, row=row, id=ident)
            continue
        if len(found) > 1:
            _count(report, "questions_with_several_answers")
        rel = f"{folder}/{question['img_id']}.tif"
        size = checker.size(rel, path=questions_path, row=row, id=ident)
        if size is None:
            continue
        text = str(question["question"]).strip()
        yield {
            "id": ident, "image": rel,
            "conversations": turn(text + opts.prompt_suffix, answer),
            "meta": {"task": "vqa", "source": name, "domain": opts.domain, "question": text, "answer": answer,
                     "answer_type": "closed" if answer.lower() in ("yes", "no") else "open",
                     "question_type": question.get("type"), "image_size": list(size)},
        }


def _image_root(source: Path, **options: Any) -> Path:
    parse_options(RSVQAOptions, options, "rsvqa")
    return Path(source)


RSVQA = Formatter("rsvqa", _generate, _image_root,
                  "RSVQA LR/HR questions/answers/images json triplets -> remote-sensing VQA")
