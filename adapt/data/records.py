"""The unified conversation record: InternVL's fine-tuning JSONL row plus our `meta`.

    {"id": "...", "image": "a.jpg" | ["a.jpg", "b.jpg"], "video"?: "clip.mp4",
     "conversations": [{"from": "system"?|"human"|"gpt", "value": "..."}, ...],
     "meta": {"task": "vqa", "source": "vqa_rad", "domain": "medical", ...}}

Formatters write records; nothing downstream reads a source format. Image paths are relative to a
data root and are resolved inside it (see `adapt.fileio.resolve_inside`).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError

from adapt.errors import AdaptError, Report, validation_problems
from adapt.fileio import PathMemo, atomic_write

Record = dict[str, Any]

TASKS = ("classification", "grounding", "region", "vqa", "driving", "caption", "video", "text")
IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"
ROLES = ("human", "gpt")


class Turn(BaseModel):
    """One conversation turn; roles and their order are checked by `problems`, which names them."""

    model_config = ConfigDict(extra="allow", strict=True, populate_by_name=True)
    role: str = Field(alias="from")
    value: str


class RecordSchema(BaseModel):
    """The JSON types of a record, declared once: every reader (JSONL, meta files, LLaVA arrays) and
    every formatter's output check goes through `problems`, which validates against it first. Plain
    JSON values only, so a record can also live in an Arrow table."""

    model_config = ConfigDict(extra="allow", strict=True)
    id: StrictStr | int | None = None
    image: Annotated[StrictStr, Field(min_length=1)] | list[Annotated[StrictStr, Field(min_length=1)]] | None = None
    video: Annotated[StrictStr, Field(min_length=1)] | None = None
    conversations: list[Turn] = Field(min_length=1)
    meta: dict[str, Any] = Field(default_factory=dict)


def images_of(record: Record) -> list[str]:
    """The record's image paths as a list ([] for text-only and video rows)."""
    image = record.get("image")
    if image is None:
        return []
    return [image] if isinstance(image, str) else list(image)


def normalize(record: Record) -> Record:
    """Apply InternVL's convention: a single-image row without `<image>` gets `<image>\\n` in front of
    the first human turn. Returns the same dict (mutated) for chaining."""
    convs = record.get("conversations") or []
    n_placeholders = sum(c.get("value", "").count(IMAGE_PLACEHOLDER) for c in convs if isinstance(c, dict))
    if len(images_of(record)) == 1 and n_placeholders == 0:
        for turn in convs:
            if turn.get("from") == "human":
                turn["value"] = f"{IMAGE_PLACEHOLDER}\n{turn['value']}"
                break
    if record.get("video") and not any(VIDEO_PLACEHOLDER in c.get("value", "") for c in convs):
        for turn in convs:
            if turn.get("from") == "human":
                turn["value"] = f"{VIDEO_PLACEHOLDER}\n{turn['value']}"
                break
    return record


def problems(record: Any, *, root: str | Path | None = None, check_files: bool = False,
             require_answer: bool = True, paths: PathMemo | None = None) -> list[str]:
    """Everything wrong with a record, as short sentences (empty list = valid).

    Checks: shape, roles (optional leading system turn, then human/gpt alternating, starting with
    human and ending with gpt), no empty answer, `<image>` count == image count, `<video>` at most
    once and only with a video, markup (`adapt.data.text`), paths inside `root` (and existing when
    `check_files`). `paths` remembers resolutions and file checks over many rows (one per call if None).
    """
    if not isinstance(record, dict):
        return ["row is not a JSON object"]
    try:
        RecordSchema.model_validate(record)
    except ValidationError as err:
        return validation_problems(record, err)
    out: list[str] = []
    convs = record["conversations"]
    turns = list(convs)
    if turns[0]["from"] == "system":
        turns = turns[1:]
    for i, turn in enumerate(turns):
        role = turn["from"]
        if role not in ROLES:
            out.append(f"turn {i} has unknown role {role!r} (expected 'human' or 'gpt', or a first 'system')")
        elif role != ROLES[i % 2]:
            out.append(f"turn {i} is {role!r} but turns must alternate human/gpt starting with human")
        elif role == "gpt" and not turn["value"].strip():
            out.append(f"turn {i} is an empty answer")
    if out:
        return out
    if require_answer and (not turns or turns[-1].get("from") != "gpt"):
        out.append("the conversation does not end with a 'gpt' answer")
    text = "".join(t["value"] for t in convs)
    images = images_of(record)
    n_image = text.count(IMAGE_PLACEHOLDER)
    if record.get("video"):
        if images:
            out.append("a row has either 'video' or 'image', not both")
        if text.count(VIDEO_PLACEHOLDER) != 1:
            out.append(f"a video row needs exactly one {VIDEO_PLACEHOLDER} placeholder, found {text.count(VIDEO_PLACEHOLDER)}")
        if n_image:
            out.append(f"a video row must not contain {IMAGE_PLACEHOLDER}")
    else:
        if VIDEO_PLACEHOLDER in text:
            out.append(f"{VIDEO_PLACEHOLDER} placeholder without a 'video' field")
        expected = len(images)
        if n_image != expected and not (expected == 1 and n_image == 0):
            out.append(f"{n_image} {IMAGE_PLACEHOLDER} placeholder(s) for {expected} image(s)")
    from adapt.data.text import record_problems  # the markup rule (imports templates, which import us)

    out += record_problems(record)
    if root is not None:
        paths = paths or PathMemo()
        video = [record["video"]] if record.get("video") else []
        for rel in images + video:
            try:
                path = paths.resolve(root, rel)
            except AdaptError as err:
                out.append(err.message)
                continue
            # a video may be a file or, as InternVL also accepts, a folder of frames
            exists = paths.exists(path) if rel in video else paths.is_file(path)
            if check_files and not exists:
                out.append(f"file not found: {rel}")
    return out


def validate(record: Any, **kwargs: Any) -> Record:
    """Return the normalized record or raise `AdaptError` listing its problems."""
    found = problems(record, **kwargs)
    if found:
        raise AdaptError("; ".join(found))
    return normalize(record)


def byte_ranges(path: str | Path, size: int) -> list[tuple[int, int, int]]:
    """(start byte, end byte, first line number) of each `size`-byte range of a text file, cut at
    line starts, found in one pass (a range's first line number needs the newlines before it): the
    units that parallel readers of a JSONL file share out."""
    total = Path(path).stat().st_size
    cuts = [0]
    with open(path, "rb") as handle:
        for target in range(size, total, size):
            handle.seek(target - 1)
            handle.readline()
            if cuts[-1] < handle.tell() < total:
                cuts.append(handle.tell())
        cuts.append(total)
        lines, position = [1], 0
        for end in cuts[1:-1]:
            handle.seek(position)
            lines.append(lines[-1] + handle.read(end - position).count(b"\n"))
            position = end
    return [(start, end, line) for start, end, line in zip(cuts, cuts[1:], lines)]


def numbered_lines(handle: Any, span: tuple[int, int, int] | None) -> Iterator[tuple[int, bytes]]:
    """(line number, raw line) of the whole file, or of a `byte_ranges` span of it."""
    if span is None:
        yield from enumerate(handle, start=1)
        return
    start, end, line = span
    handle.seek(start)
    position = start
    for raw in iter(handle.readline, b""):
        if position >= end:
            return
        position += len(raw)
        yield line, raw
        line += 1


def read_jsonl(path: str | Path, report: Report | None = None, *, root: str | Path | None = None,
               check_files: bool = False, require_answer: bool = True, paths: PathMemo | None = None,
               span: tuple[int, int, int] | None = None) -> Iterator[tuple[int, Record]]:
    """Stream (line_number, record) from a JSONL file (or one `byte_ranges` span of it), skipping and
    counting bad lines.

    Lines that are not UTF-8, not JSON, or not a valid record go to `report` with their file:line
    (or raise under a strict report). Blank lines are ignored. Paths are resolved once per file read
    (`paths`, or a memo of this read).
    """
    paths = paths or PathMemo()
    path = Path(path)
    report = report if report is not None else Report(name=str(path))
    if not path.is_file():
        raise AdaptError("annotation file not found", path=path, hint="check the path you passed")
    with open(path, "rb") as handle:
        for line_no, raw in numbered_lines(handle, span):
            if not raw.strip():
                continue
            report.read += 1
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                report.skip("line is not valid UTF-8", path=path, row=line_no)
                continue
            except json.JSONDecodeError as err:
                report.skip(f"malformed JSON: {err.msg} at column {err.colno}", path=path, row=line_no)
                continue
            found = problems(record, root=root, check_files=check_files, require_answer=require_answer, paths=paths)
            if found:
                report.skip("invalid record: " + "; ".join(found), path=path, row=line_no,
                            id=str(record.get("id")) if isinstance(record, dict) else None)
                continue
            yield line_no, normalize(record)


def write_jsonl(path: str | Path, records: Iterable[Record]) -> int:
    """Write records atomically (temp file + rename); returns the count written."""
    count = 0
    with atomic_write(path) as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    return count


@dataclass
class DatasetSpec:
    """One entry of an InternVL meta file."""

    name: str
    root: str
    annotation: str
    repeat_time: float = 1.0
    max_dynamic_patch: int | None = None
    data_augment: bool = False
    resolved_from: str = "absolute"  # how relative paths were read: "working directory" or "meta file folder"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"root": self.root, "annotation": self.annotation,
                               "data_augment": self.data_augment, "repeat_time": self.repeat_time}
        if self.max_dynamic_patch is not None:
            out["max_dynamic_patch"] = self.max_dynamic_patch
        return out


class MetaEntry(BaseModel):
    """One dataset of an InternVL meta file; other keys InternVL writes (length, ...) pass through."""

    model_config = ConfigDict(extra="allow", strict=True)
    root: StrictStr = "."
    annotation: Annotated[StrictStr, Field(min_length=1)]
    repeat_time: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 1.0
    max_dynamic_patch: Annotated[int, Field(ge=1)] | None = None
    data_augment: bool = False


def read_meta(path: str | Path) -> list[DatasetSpec]:
    """Read an InternVL meta file `{name: {root, annotation, repeat_time, max_dynamic_patch?}}`.

    Relative `root` and `annotation` are read as InternVL's training script reads them, relative to the
    working directory, when the annotation exists there; otherwise relative to the meta file's folder.
    Each spec says which in `resolved_from`.
    """
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AdaptError("meta file not found", path=path) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AdaptError(f"meta file is not valid JSON ({err})", path=path) from None
    if not isinstance(raw, dict) or not raw:
        raise AdaptError("meta file must be a non-empty JSON object {name: {root, annotation, ...}}", path=path)
    specs = []
    for name, entry in raw.items():
        if not isinstance(entry, dict):
            raise AdaptError(f"entry {name!r} is not an object {{root, annotation, ...}}", path=path)
        try:
            checked = MetaEntry.model_validate(entry)
        except ValidationError as err:
            raise AdaptError(f"entry {name!r}: " + "; ".join(validation_problems(entry, err)), path=path,
                             hint="an entry is {\"root\": folder, \"annotation\": file, \"repeat_time\": number > 0, "
                                  "\"max_dynamic_patch\": integer >= 1}") from None
        base, resolved_from = _meta_base(path, name, checked.annotation, checked.root)
        specs.append(DatasetSpec(
            name=name, root=str(base / checked.root), annotation=str(base / checked.annotation),
            repeat_time=checked.repeat_time, max_dynamic_patch=checked.max_dynamic_patch,
            data_augment=checked.data_augment, resolved_from=resolved_from))
    return specs


def _meta_base(meta: Path, name: str, annotation: str, root: str) -> tuple[Path, str]:
    """The folder relative paths of one meta entry start from: the working directory (InternVL's
    convention, its shell/data/*.json files name paths from the repository's internvl_chat folder)
    when the annotation is found there, else the meta file's folder."""
    if Path(annotation).is_absolute():  # only the root is relative: beside the meta file, as before
        return meta.parent, "absolute" if Path(root).is_absolute() else "meta file folder"
    if Path(annotation).exists():
        return Path.cwd(), "working directory"
    if (meta.parent / annotation).exists():
        return meta.parent, "meta file folder"
    raise AdaptError(f"annotation {annotation!r} of entry {name!r} is found neither in the working directory "
                     f"({Path.cwd()}) nor beside the meta file", path=meta,
                     hint="InternVL reads meta paths relative to the directory it runs in; run from there "
                          "or give absolute paths")


def write_meta(path: str | Path, specs: Iterable[DatasetSpec]) -> None:
    with atomic_write(path) as handle:
        json.dump({s.name: s.to_dict() for s in specs}, handle, indent=2, ensure_ascii=False)


def apply_repeat(records: list[Record], repeat_time: float, seed: int) -> list[Record]:
    """Repeat a dataset `repeat_time` times: the integer part whole, the fraction as a seeded random
    subset. (The official loader keeps the *first* N*r lines for r < 1, which biases towards
    whatever the file happens to start with; we sample instead.)"""
    whole, frac = int(repeat_time), repeat_time - int(repeat_time)
    out = records * whole
    if frac > 0:
        out += random.Random(seed).sample(records, round(len(records) * frac))
    return out
