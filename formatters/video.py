"""Video clips (files or frame folders) with questions or labels -> InternVL video records.

Source: a folder holding the clips and one annotation file (or the annotation file itself, clips
relative to its folder). The annotation file is CSV or JSONL, found as the `annotations` option or
the first of ANNOTATION_NAMES in the folder, with one row per sample:

- `video`: a video file or a folder of frame images, relative to the source folder;
- `question` + `answer`: a question about the clip (closed when the answer is yes/no), or
- `label` (and no question): classification over the set of labels in the file.

Options: `num_frames` (default 8), `extract_frames` (default False), `allow_fewer` (default False:
clips shorter than num_frames are skipped with their counts; True takes all their frames),
`annotations`, `domain` (meta.domain, default "video").

Default records keep the clip: `"video": path` with `<video>` in the first human turn and
`meta.num_frames`; the sampler decodes n segment frames at training time (random per segment
with augmentation). Every clip is fully decoded here so that a broken or short clip is a counted
skip now, not a crash mid-training. Frame folders become multi-image records of their n middle
frames (`Frame-1: <image>\\n...`), referenced in place, because a record's `video` must be a file.
With `extract_frames=True` the n middle frames of every clip are written as JPEGs under
out/images/ and the records are multi-image records with the same frame prompt. Clips are checked
(and frames extracted) in parallel with `run(..., num_proc=N)`, same output.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapt.data.records import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, Record
from adapt.data.text import source_problem
from adapt.data.video import (
    TooFewFrames,
    count_video_frames,
    frame_files,
    read_frames,
    segment_frame_indices,
    video_prompt,
)
from adapt.errors import AdaptError, Report
from adapt.fileio import resolve_inside
from formatters.base import Plan, image_size_or_skip, sharded

ANNOTATION_NAMES = ("annotations.jsonl", "annotations.csv", "labels.jsonl", "labels.csv", "qa.jsonl", "qa.csv")
YES_NO = ("yes", "no")
JPEG_QUALITY = 95


def _annotation_file(source: Path, annotations: str | Path | None) -> tuple[Path, Path]:
    """(clip root, annotation file)."""
    if source.is_file():
        return source.parent, source
    if annotations is not None:
        path = Path(annotations)
        path = path if path.is_absolute() or path.is_file() else source / path
        if not path.is_file():
            raise AdaptError("annotation file not found", path=path)
        return source, path
    for name in ANNOTATION_NAMES:
        if (source / name).is_file():
            return source, source / name
    raise AdaptError("no annotation file in the video folder", path=source,
                     hint=f"add one of {', '.join(ANNOTATION_NAMES)} (columns video, question, answer "
                          "or video, label), or pass it with the `annotations` option")


def _video_root(source: Path, annotations: str | Path | None = None, extract_frames: bool = False,
                **_: Any) -> Path | None:
    return None if extract_frames else _annotation_file(source, annotations)[0]


def _rows(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, row) of a JSONL or CSV annotation file; unparsable JSONL lines come as None."""
    if path.suffix.lower() == ".jsonl":
        with open(path, encoding="utf-8") as handle:
            for line_no, line in enumerate(handle, start=1):
                if line.strip():
                    try:
                        yield line_no, json.loads(line)
                    except json.JSONDecodeError:
                        yield line_no, None
        return
    if path.suffix.lower() != ".csv":
        raise AdaptError("annotation file must be .csv or .jsonl", path=path)
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        header = [name.strip() for name in next(reader, [])]
        for line_no, cells in enumerate(reader, start=2):
            yield line_no, dict(zip(header, cells))


def _text(value: Any) -> str:
    return "" if value is None else str(value).strip()


@dataclass(frozen=True)
class _Clips:
    """What every row of a video annotation file needs (a worker gets it once)."""

    root: Path
    path: Path
    labels: list[str]
    num_frames: int
    extract_frames: bool
    allow_fewer: bool
    domain: str


def plan_video(source: Path, out: Path, report: Report, *, num_frames: int = 8, extract_frames: bool = False,
               allow_fewer: bool = False, annotations: str | Path | None = None, domain: str = "video",
               **unknown: Any) -> Plan:
    """The annotation file's rows (line, row) and the label set of its classification rows."""
    if unknown:
        raise AdaptError(f"unknown option(s) for video: {', '.join(sorted(unknown))}",
                         hint="video accepts: num_frames, extract_frames, allow_fewer, annotations, domain")
    try:
        num_frames = int(num_frames)
    except (TypeError, ValueError):
        raise AdaptError(f"num_frames must be an integer, got {num_frames!r}") from None
    if num_frames < 1:
        raise AdaptError(f"num_frames must be at least 1, got {num_frames}")
    root, path = _annotation_file(source, annotations)
    try:
        rows = list(_rows(path))
    except (UnicodeDecodeError, csv.Error) as err:
        raise AdaptError(f"cannot read annotation file ({err})", path=path) from None
    labels = sorted({_text(r.get("label")) for _, r in rows
                     if isinstance(r, dict) and _text(r.get("label")) and not _text(r.get("question"))})
    # a row decodes a whole clip (a tenth of a second or more)
    return Plan(rows, _Clips(root, path, labels, num_frames, bool(extract_frames), bool(allow_fewer), domain),
                min_per_process=8)


def video_rows(clips: _Clips, rows: Sequence[tuple[int, Any]], out: Path, report: Report) -> Iterator[Record]:
    """Annotated clips -> video records (or multi-image frame records), skipping unusable clips with why."""
    root, path, labels, num_frames, allow_fewer = clips.root, clips.path, clips.labels, clips.num_frames, clips.allow_fewer
    for line, row in rows:
        record_id = f"video-{line}"
        report.read += 1
        if not isinstance(row, dict):
            report.skip("row is not a JSON object", path=path, row=line, id=record_id)
            continue
        qa = _question_answer(row, labels)
        if isinstance(qa, str):
            report.skip(qa, path=path, row=line, id=record_id)
            continue
        question, answer, meta = qa
        rel = _text(row["video"])
        try:
            clip = resolve_inside(root, rel)
        except AdaptError as err:
            report.skip(err.message, path=path, row=line, id=record_id)
            continue
        if not clip.exists():
            report.skip(f"video not found: {rel}", path=path, row=line, id=record_id)
            continue
        escaping = _frame_outside_root(clip, root) if clip.is_dir() else None
        if escaping:
            report.skip(escaping, path=path, row=line, id=record_id)
            continue
        if clips.extract_frames:
            visual = _extracted(clip, rel, out, record_id, num_frames, allow_fewer, report, path, line)
        elif clip.is_dir():
            visual = _frame_folder(clip, rel, root, num_frames, allow_fewer, report, path, line, record_id)
        else:
            visual = _video_file(clip, rel, num_frames, allow_fewer, report, path, line, record_id)
        if visual is None:
            continue
        fields, n, total = visual
        turn = f"{VIDEO_PLACEHOLDER}\n{question}" if "video" in fields else f"{video_prompt(n)}\n{question}"
        meta = {"task": "video", "source": "video", "domain": clips.domain, "answer": answer, **meta,
                "clip": Path(rel).as_posix(), "num_frames": n}
        if total is not None:
            meta["clip_frames"] = total
        yield {"id": record_id, **fields,
               "conversations": [{"from": "human", "value": turn}, {"from": "gpt", "value": answer}], "meta": meta}


def _question_answer(row: dict[str, Any], labels: list[str]) -> tuple[str, str, dict[str, Any]] | str:
    """(question, answer, meta) of a row, or the reason it cannot be used."""
    if not _text(row.get("video")):
        return "missing field video"
    question, answer, label = _text(row.get("question")), _text(row.get("answer")), _text(row.get("label"))
    question = question.replace(VIDEO_PLACEHOLDER, "").replace(IMAGE_PLACEHOLDER, "").strip()  # ours is the only one
    marked = next(filter(None, (source_problem(t, w) for t, w in ((question, "question"), (answer, "answer"),
                                                                  (label, "label")))), None)
    if marked:
        return marked
    if question and answer:
        closed = answer.lower() in YES_NO
        meta: dict[str, Any] = {"answer_type": "closed" if closed else "open"}
        if closed:
            meta["choices"] = list(YES_NO)
        return question, answer, meta
    if label and not question:
        prompt = f"What is happening in this video? Choose one of: {', '.join(labels)}.\nAnswer with the label only."
        return prompt, label, {"answer_type": "closed", "choices": labels}
    return "missing field(s): need question and answer, or label"


def _frame_outside_root(folder: Path, root: Path) -> str | None:
    """Why a frame folder is unusable when one of its frames is a symlink out of the data root, else None
    (the folder itself was resolved inside the root, its files were not)."""
    for frame in frame_files(folder):
        try:
            resolve_inside(root, frame.relative_to(root.resolve()))
        except AdaptError as err:
            return f"{err.message} (a frame of {folder.name})"
    return None


def _too_short(err: TooFewFrames, rel: str) -> str:
    return f"video too short: {rel} has {err.available} frame(s), {err.requested} requested"


Visual = tuple[dict[str, Any], int, "int | None"]  # record fields (video or image), frames fed, frames in the clip


def _video_file(clip: Path, rel: str, n: int, allow_fewer: bool, report: Report, path: Path, line: int,
                record_id: str) -> Visual | None:
    """The `video` field, after decoding the whole clip once to prove it is usable."""
    try:
        total = count_video_frames(clip)
    except AdaptError as err:
        report.skip(f"video unusable: {rel}: {err.message}", path=path, row=line, id=record_id)
        return None
    if total < n and not (allow_fewer and total > 0):
        report.skip(_too_short(TooFewFrames(total, n), rel), path=path, row=line, id=record_id)
        return None
    return {"video": Path(rel).as_posix()}, min(n, total), total


def _frame_folder(folder: Path, rel: str, root: Path, n: int, allow_fewer: bool, report: Report, path: Path,
                  line: int, record_id: str) -> Visual | None:
    """The frame folder's segment-middle frames as an image list, referenced in place."""
    files = frame_files(folder)
    if len(files) < n and not (allow_fewer and files):
        report.skip(_too_short(TooFewFrames(len(files), n), rel), path=path, row=line, id=record_id)
        return None
    chosen = [files[i] for i in segment_frame_indices(len(files), min(n, len(files)))]
    for frame in chosen:
        if image_size_or_skip(frame, report, source=path, row=line, id=record_id) is None:
            return None
    images = [frame.relative_to(root.resolve()).as_posix() for frame in chosen]
    return {"image": images}, len(images), len(files)


def _extracted(clip: Path, rel: str, out: Path, record_id: str, n: int, allow_fewer: bool, report: Report,
               path: Path, line: int) -> Visual | None:
    """The clip's segment-middle frames written as JPEGs under out/images/, as an image list."""
    try:
        frames = read_frames(clip, n, allow_fewer=allow_fewer)
    except TooFewFrames as err:
        report.skip(_too_short(err, rel), path=path, row=line, id=record_id)
        return None
    except AdaptError as err:
        report.skip(f"video unusable: {rel}: {err.message}", path=path, row=line, id=record_id)
        return None
    folder = out / "images" / record_id
    folder.mkdir(parents=True, exist_ok=True)
    images = []
    for k, frame in enumerate(frames, start=1):
        target = folder / f"frame-{k:03d}.jpg"
        frame.save(target, format="JPEG", quality=JPEG_QUALITY)
        images.append(target.relative_to(out).as_posix())
    return {"image": images}, len(images), None


VIDEO = sharded("video", plan_video, video_rows, _video_root,
                "video clips or frame folders + CSV/JSONL questions or labels (frames sampled per segment)")
