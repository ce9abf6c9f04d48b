"""Medical sources: VQA-RAD, SLAKE, PMC-VQA, PathVQA and labelled DICOM folders.

Every record is a one-turn VQA (or, for labelled DICOM, a multiple-choice classification) with the
evaluator's needs in `meta`: `answer` (ground truth), `answer_type` ("closed" / "open"), and
`choices` when the answer set is known (yes/no, lettered options, class labels).

Sources and their options (all keyword options of `formatters.base.run`):

- `vqa-rad`: the VQA-RAD json (or its folder). `images` (default `<dir>/images`, else
  `<dir>/VQA_RAD Image Folder`), `split` = all | train | test (test = phrase_type test_*).
- `slake`: the SLAKE folder (train.json / validate.json / test.json, images under imgs/) or one of
  its json files. `split` = train | validate | test (default train), `lang` = en | zh | all
  (default en), `images` (default `<dir>/imgs`). Closed yes/no questions get their two answers as
  `choices` in both languages (yes/no; 是/不是, 包含/不包含, ...).
- `pmc-vqa`: a PMC-VQA csv (or its folder + `split`, default train -> train.csv). Both answer
  column spellings (Answer / Anwser) are read, and both releases' answers: the option text or
  `B: text` (v1) and the bare letter `B` of the `_2` files. `images` (default `<dir>/images`, else `figures`).
  The question lists the lettered options; the answer is the letter.
- `pathvqa`: the parquet mirror (a file or a folder of `<split>-*.parquet`; images are written as
  PNG under out/images/) or, only with `allow_pickle=True`, the original `<split>_qa.pkl` lists.
  `split` (default: from the file name, else train), `images` (pickle only; default
  `<pvqa>/images/<split>`).
- `dicom`: a folder of DICOM files + a label CSV (`labels`, default `<folder>/labels.csv`) whose
  `file` column holds paths relative to the folder, with either a `label` column (classification
  over the set of labels) or `question` + `answer` columns (VQA). `window` = (center, width),
  "center,width" or a preset name (see WINDOW_PRESETS; default: the file's VOI LUT / window,
  else the image's full range), `frame` (multi-frame files; default the middle frame).
  Renders are RGB PNGs under out/images/; meta carries the file's PatientID / StudyInstanceUID
  (`patient_id`, `study_uid`) so held-out splits keep a patient on one side. Rows are rendered in
  parallel (`run(..., num_proc=N)`), same output; the VQA sources keep one process.

Skip rows are 1-based everywhere: the Nth item of a JSON list, the file line of a CSV.
"""

from __future__ import annotations

import csv
import json
import os
import pickle
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import pydicom
from PIL import Image
from pydantic import Field
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut, apply_voi

from adapt.data.images import decode_rgb
from adapt.data.records import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, Record
from adapt.data.text import source_problem
from adapt.errors import AdaptError, Report
from adapt.fileio import resolve_inside
from formatters.base import Formatter, Plan, image_size_or_skip, option, sharded

DOMAIN = "medical"
YES_NO = ("yes", "no")
LETTERS = ("A", "B", "C", "D")
MCQ_SUFFIX = "Answer with the option's letter from the given choices directly."

# Common CT windows (center, width) in Hounsfield units, as radiology references list them.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "brain": (40.0, 80.0),
    "soft_tissue": (50.0, 400.0),
    "mediastinum": (50.0, 350.0),
    "liver": (30.0, 150.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
}
DICOM_SUFFIXES = (".dcm", ".dicom", ".dic")


# ---------------------------------------------------------------------------------------------- shared


def _reject_unknown(kind: str, unknown: dict[str, Any], accepted: str) -> None:
    if unknown:
        raise AdaptError(f"unknown option(s) for {kind}: {', '.join(sorted(unknown))}",
                         hint=f"{kind} accepts: {accepted}")


def _text(value: Any) -> str:
    """A json/csv cell as stripped text (VQA-RAD stores some answers as numbers)."""
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


def _answer_type(declared: Any, answer: str) -> str:
    """closed/open from the source's own label when it has one, else closed exactly for yes/no answers."""
    label = _text(declared).upper()
    if label in ("CLOSED", "OPEN"):
        return label.lower()
    return "closed" if answer.lower() in YES_NO else "open"


def _vqa_record(record_id: str, image: str, question: str, answer: str, *, source: str, answer_type: str,
                task: str = "vqa", choices: list[str] | None = None, **meta: Any) -> Record:
    question = question.replace(IMAGE_PLACEHOLDER, "").replace(VIDEO_PLACEHOLDER, "").strip()  # ours is the only one
    if choices is None and answer.lower() in YES_NO:
        choices = list(YES_NO)
    info: dict[str, Any] = {"task": task, "source": source, "domain": DOMAIN, "answer": answer,
                            "answer_type": answer_type}
    if choices is not None:
        info["choices"] = choices
    info.update({k: v for k, v in meta.items() if v not in (None, "")})
    return {"id": record_id, "image": image,
            "conversations": [{"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{question}"},
                              {"from": "gpt", "value": answer}],
            "meta": info}


def _usable_image(root: Path, rel: str, report: Report, *, path: Path, row: int, record_id: str) -> str | None:
    """The record path of a source image inside `root`, or None after a counted skip (escape, missing, corrupt)."""
    try:
        target = resolve_inside(root, rel)
    except AdaptError as err:
        report.skip(err.message, path=path, row=row, id=record_id)
        return None
    if image_size_or_skip(target, report, source=path, row=row, id=record_id) is None:
        return None
    return Path(rel).as_posix()


def _read_json_list(path: Path) -> list[Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AdaptError("annotation file not found", path=path) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AdaptError(f"not valid JSON ({err})", path=path) from None
    if not isinstance(data, list):
        raise AdaptError("expected a JSON list of question rows", path=path)
    return data


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """Header (stripped names) and rows; row numbers in skips are file lines (header = line 1)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            header = [name.strip() for name in next(reader, [])]
            rows = [dict(zip(header, cells)) for cells in reader]
    except FileNotFoundError:
        raise AdaptError("csv file not found", path=path) from None
    except (UnicodeDecodeError, csv.Error) as err:
        raise AdaptError(f"cannot read csv ({err})", path=path) from None
    return header, rows


def _folder_option(value: str | Path | None, candidates: list[Path], what: str) -> Path:
    """An explicit folder option, else the first existing candidate; AdaptError naming all tried."""
    tried = [Path(value)] if value is not None else candidates
    for folder in tried:
        if folder.is_dir():
            return folder
    raise AdaptError(f"{what} folder not found (looked for {', '.join(str(p) for p in tried)})",
                     hint="pass the folder with the `images` option")


def _required(row: dict[str, Any], keys: tuple[str, ...]) -> str | None:
    """Why a row cannot be used: a required field missing, or carrying template markup (adapt.data.text)."""
    missing = [k for k in keys if not _text(row.get(k))]
    if missing:
        return f"missing field(s): {', '.join(missing)}"
    return next(filter(None, (source_problem(row.get(k), f"field {k!r}") for k in row)), None)


# --------------------------------------------------------------------------------------------- VQA-RAD


def _vqa_rad_json(source: Path) -> Path:
    if source.is_file():
        return source
    preferred = source / "VQA_RAD Dataset Public.json"
    if preferred.is_file():
        return preferred
    found = sorted(source.glob("*.json"))
    if len(found) != 1:
        raise AdaptError(f"expected one VQA-RAD json in the folder, found {len(found)}", path=source,
                         hint="pass the json file itself (e.g. 'VQA_RAD Dataset Public.json')")
    return found[0]


def _vqa_rad_images(source: Path, images: str | Path | None = None, **_: Any) -> Path:
    base = _vqa_rad_json(source).parent
    return _folder_option(images, [base / "images", base / "VQA_RAD Image Folder"], "VQA-RAD image")


def generate_vqa_rad(source: Path, out: Path, report: Report, *, images: str | Path | None = None,
                     split: str = "all", **unknown: Any) -> Iterator[Record]:
    """VQA-RAD rows -> VQA records (answer_type from the source's CLOSED/OPEN)."""
    _reject_unknown("vqa-rad", unknown, "images, split")
    if split not in ("all", "train", "test"):
        raise AdaptError(f"split must be all, train or test, got {split!r}")
    path = _vqa_rad_json(source)
    root = _vqa_rad_images(source, images)
    other_split = 0
    for index, row in enumerate(_read_json_list(path)):
        record_id = f"vqa_rad-{index}"
        line = index + 1  # rows are reported 1-based, as every formatter reports them
        report.read += 1
        if not isinstance(row, dict):
            report.skip("row is not an object", path=path, row=line, id=record_id)
            continue
        row_split = "test" if _text(row.get("phrase_type")).startswith("test") else "train"
        if split != "all" and row_split != split:
            other_split += 1
            continue
        problem = _required(row, ("image_name", "question", "answer"))
        if problem:
            report.skip(problem, path=path, row=line, id=record_id)
            continue
        image = _usable_image(root, _text(row["image_name"]), report, path=path, row=line, record_id=record_id)
        if image is None:
            continue
        answer = _text(row["answer"])
        yield _vqa_record(record_id, image, _text(row["question"]), answer, source="vqa_rad",
                          answer_type=_answer_type(row.get("answer_type"), answer), split=row_split,
                          qid=row.get("qid"), organ=_text(row.get("image_organ")),
                          question_type=_text(row.get("question_type")))
    report.stats["other_split_rows"] = report.stats.get("other_split_rows", 0) + other_split


VQA_RAD = Formatter("vqa-rad", generate_vqa_rad, _vqa_rad_images, "VQA-RAD radiology VQA (json + image folder)")


# ----------------------------------------------------------------------------------------------- SLAKE


# SLAKE's Chinese closed questions answer with an affirmative verb or its negation (是/不是, 包含/不包含,
# 有/没有, 是/否); the pair is the choice set, as yes/no is for the English ones.
_ZH_NEGATION = {"否": "是", "没有": "有"}
_ZH_NEGATED = {"有": "没有"}


def chinese_yes_no(answer: str) -> list[str] | None:
    """[affirmative, negative] for a Chinese yes/no-style answer, None for any other (an organ name)."""
    if answer in _ZH_NEGATION:
        return [_ZH_NEGATION[answer], answer]
    if answer in _ZH_NEGATED:
        return [answer, _ZH_NEGATED[answer]]
    if len(answer) > 1 and answer.startswith("不"):
        return [answer[1:], answer]
    if answer in ("是", "包含", "正常", "对", "存在"):
        return [answer, "不" + answer]
    return None


def _slake_json(source: Path, split: str) -> Path:
    if source.is_file():
        return source
    if split not in ("train", "validate", "test"):
        raise AdaptError(f"split must be train, validate or test, got {split!r}")
    return source / f"{split}.json"


def _slake_images(source: Path, images: str | Path | None = None, **_: Any) -> Path:
    base = source if source.is_dir() else source.parent
    return _folder_option(images, [base / "imgs"], "SLAKE image")


def generate_slake(source: Path, out: Path, report: Report, *, split: str = "train", lang: str = "en",
                   images: str | Path | None = None, **unknown: Any) -> Iterator[Record]:
    """SLAKE rows of one split and language -> VQA records (rows of other languages are counted, not skipped)."""
    _reject_unknown("slake", unknown, "split, lang, images")
    if lang not in ("en", "zh", "all"):
        raise AdaptError(f"lang must be en, zh or all, got {lang!r}")
    path = _slake_json(source, split)
    root = _slake_images(source, images)
    other_language = 0
    for index, row in enumerate(_read_json_list(path)):
        record_id = f"slake-{path.stem}-{index}"
        line = index + 1  # rows are reported 1-based, as every formatter reports them
        report.read += 1
        if not isinstance(row, dict):
            report.skip("row is not an object", path=path, row=line, id=record_id)
            continue
        row_lang = _text(row.get("q_lang")).lower()
        if lang != "all" and row_lang != lang:
            other_language += 1
            continue
        problem = _required(row, ("img_name", "question", "answer"))
        if problem:
            report.skip(problem, path=path, row=line, id=record_id)
            continue
        image = _usable_image(root, _text(row["img_name"]), report, path=path, row=line, record_id=record_id)
        if image is None:
            continue
        answer = _text(row["answer"])
        kind = _answer_type(row.get("answer_type"), answer)
        yield _vqa_record(record_id, image, _text(row["question"]), answer, source="slake", answer_type=kind,
                          choices=chinese_yes_no(answer) if kind == "closed" and row_lang == "zh" else None,
                          split=path.stem,
                          lang=row_lang, qid=row.get("qid"), modality=_text(row.get("modality")),
                          location=_text(row.get("location")), content_type=_text(row.get("content_type")))
    report.stats["other_language_rows"] = report.stats.get("other_language_rows", 0) + other_language


SLAKE = Formatter("slake", generate_slake, _slake_images, "SLAKE bilingual radiology VQA (English by default)")


# --------------------------------------------------------------------------------------------- PMC-VQA

_LETTER_PREFIX = re.compile(r"^\s*([A-D])\s*[:.)]\s*")


def _pmc_csv(source: Path, split: str) -> Path:
    return source if source.is_file() else source / f"{split}.csv"


def _pmc_images(source: Path, images: str | Path | None = None, split: str = "train", **_: Any) -> Path:
    base = _pmc_csv(source, split).parent
    return _folder_option(images, [base / "images", base / "figures"], "PMC-VQA image")


def _option_text(letter: str, cell: str) -> str:
    """'B: CT scan' / 'B. CT scan' / 'CT scan' -> 'CT scan' (the prefix is dropped only if it is this letter)."""
    match = _LETTER_PREFIX.match(cell)
    return cell[match.end():].strip() if match and match.group(1) == letter else cell.strip()


def _label_from_answer(answer: str, options: dict[str, str]) -> str | None:
    """The option letter an answer cell names: a bare letter (the `_2` csv files write `B`), its own 'B:'
    prefix, else the one option with the same text."""
    bare = answer.strip().upper()
    if bare in options:
        return bare
    match = _LETTER_PREFIX.match(answer)
    if match and match.group(1) in options:
        return match.group(1)
    same = [letter for letter, text in options.items() if text.casefold() == answer.casefold()]
    return same[0] if len(same) == 1 else None


def generate_pmc_vqa(source: Path, out: Path, report: Report, *, images: str | Path | None = None,
                     split: str = "train", **unknown: Any) -> Iterator[Record]:
    """PMC-VQA rows -> lettered multiple-choice VQA records (answer = the letter)."""
    _reject_unknown("pmc-vqa", unknown, "images, split")
    path = _pmc_csv(source, split)
    root = _pmc_images(source, images, split)
    header, rows = _read_csv(path)
    answer_column = "Answer" if "Answer" in header else "Anwser" if "Anwser" in header else None
    needed = ["Figure_path", "Question", *(f"Choice {letter}" for letter in LETTERS)]
    missing = [c for c in needed if c not in header] + ([] if answer_column else ["Answer (or Anwser)"])
    if missing:
        raise AdaptError(f"PMC-VQA csv lacks column(s) {', '.join(missing)}; header is {header}", path=path)
    for line, row in enumerate(rows, start=2):
        record_id = f"pmc_vqa-{path.stem}-{line}"
        report.read += 1
        problem = _required(row, ("Figure_path", "Question"))
        if problem:
            report.skip(problem, path=path, row=line, id=record_id)
            continue
        options = {letter: _option_text(letter, row.get(f"Choice {letter}") or "") for letter in LETTERS}
        options = {letter: text for letter, text in options.items() if text}
        if len(options) < 2:
            report.skip("fewer than two non-empty choices", path=path, row=line, id=record_id)
            continue
        label = _text(row.get("Answer_label")).upper()
        if label not in options:
            label = _label_from_answer(_text(row.get(answer_column)), options)
        if label is None:
            report.skip(f"answer matches no single choice: {_text(row.get(answer_column))!r}", path=path,
                        row=line, id=record_id)
            continue
        image = _usable_image(root, _text(row["Figure_path"]), report, path=path, row=line, record_id=record_id)
        if image is None:
            continue
        question = "\n".join([_text(row["Question"]), *(f"{k}. {v}" for k, v in options.items()), MCQ_SUFFIX])
        yield _vqa_record(record_id, image, question, label, source="pmc_vqa", answer_type="closed",
                          choices=list(options), options=options, answer_text=options[label])


PMC_VQA = Formatter("pmc-vqa", generate_pmc_vqa, _pmc_images, "PMC-VQA multiple-choice VQA (csv + figures)")


# -------------------------------------------------------------------------------------------- PathVQA


def _pathvqa_input(source: Path, split: str | None) -> tuple[str, list[Path], str]:
    """('parquet' | 'pickle', files, split): a file's split comes from its name unless given."""
    if source.is_file():
        kind = {".parquet": "parquet", ".pkl": "pickle", ".pickle": "pickle"}.get(source.suffix.lower())
        if kind is None:
            raise AdaptError("expected a .parquet or .pkl PathVQA file", path=source)
        named = source.name.split("-")[0] if kind == "parquet" else source.name.removesuffix("_qa.pkl")
        return kind, [source], split or named
    split = split or "train"
    parquet = sorted(p for p in source.rglob("*.parquet") if p.name.startswith(split))
    if parquet:
        return "parquet", parquet, split
    pickled = [p for p in (source / "qas" / split / f"{split}_qa.pkl", source / f"{split}_qa.pkl") if p.is_file()]
    if pickled:
        return "pickle", pickled[:1], split
    raise AdaptError(f"no PathVQA data for split {split!r}", path=source,
                     hint=f"expected {split}-*.parquet files (parquet mirror) or qas/{split}/{split}_qa.pkl")


def _pickle_images(pkl: Path, split: str, images: str | Path | None) -> Path:
    """The image folder of a pickle split: `<pvqa>/images/<split>`, pvqa being the parent of `qas/`."""
    pvqa = next((p.parent for p in pkl.parents if p.name == "qas"), pkl.parent)
    return _folder_option(images, [pvqa / "images" / split], "PathVQA image")


def _pathvqa_root(source: Path, split: str | None = None, images: str | Path | None = None,
                  **_: Any) -> Path | None:
    kind, files, split = _pathvqa_input(source, split)
    return _pickle_images(files[0], split, images) if kind == "pickle" else None


def _image_bytes(value: Any) -> bytes | None:
    if isinstance(value, dict):
        value = value.get("bytes")
    return value if isinstance(value, (bytes, bytearray)) and value else None


def _parquet_rows(path: Path) -> Iterator[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise AdaptError(f"reading the PathVQA parquet mirror needs a working pyarrow ({err})",
                         hint="install a pyarrow build that matches your numpy (pyarrow 26 needs numpy 2)") from None
    try:
        parquet = pq.ParquetFile(path)
        missing = {"image", "question", "answer"} - set(parquet.schema_arrow.names)
        if missing:
            raise AdaptError(f"parquet lacks column(s) {', '.join(sorted(missing))}", path=path)
        for batch in parquet.iter_batches(batch_size=64, columns=["image", "question", "answer"]):
            yield from batch.to_pylist()
    except OSError as err:  # pyarrow's ArrowInvalid / ArrowIOError are OSError subclasses
        raise AdaptError(f"cannot read parquet ({err})", path=path) from None


def _pickle_rows(path: Path) -> list[Any]:
    try:
        with open(path, "rb") as handle:
            data = pickle.load(handle)  # noqa: S301 - only reached with allow_pickle=True
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ImportError) as err:
        raise AdaptError(f"cannot unpickle ({err})", path=path) from None
    if not isinstance(data, list):
        raise AdaptError(f"expected a pickled list of {{image, question, answer}}, got {type(data).__name__}", path=path)
    return data


def _find_image(folder: Path, name: str) -> str:
    """A pickle row's image name ('train_0422') -> its file name in the image folder."""
    if Path(name).suffix:
        return name
    for suffix in (".jpg", ".jpeg", ".png"):
        if (folder / f"{name}{suffix}").is_file():
            return f"{name}{suffix}"
    return f"{name}.jpg"


def generate_pathvqa(source: Path, out: Path, report: Report, *, split: str | None = None, allow_pickle: bool = False,
                     images: str | Path | None = None, **unknown: Any) -> Iterator[Record]:
    """PathVQA question rows -> VQA records; closed exactly for yes/no answers."""
    _reject_unknown("pathvqa", unknown, "split, allow_pickle, images")
    kind, files, split = _pathvqa_input(source, split)
    # only an explicit yes opts in: True from Python, "true" from `adapt format --opt allow_pickle=true`
    opted_in = allow_pickle is True or (isinstance(allow_pickle, str) and allow_pickle.strip().lower() == "true")
    if kind == "pickle" and not opted_in:
        raise AdaptError("PathVQA .pkl files are Python pickles, and unpickling an untrusted file runs arbitrary code",
                         path=files[0], hint="use the parquet mirror, or pass allow_pickle=True (adapt format: "
                                             "--opt allow_pickle=true) only for a file from a source you trust")
    image_dir = _pickle_images(files[0], split, images) if kind == "pickle" else out / "images"
    if kind == "parquet":
        image_dir.mkdir(parents=True, exist_ok=True)
    index = 0
    for path in files:
        for row_no, row in enumerate(_parquet_rows(path) if kind == "parquet" else _pickle_rows(path), start=1):
            record_id = f"pathvqa-{split}-{index}"
            index += 1
            report.read += 1
            problem = "row is not an object" if not isinstance(row, dict) else _required(row, ("question", "answer"))
            if problem:
                report.skip(problem, path=path, row=row_no, id=record_id)
                continue
            raw = row.get("image")
            if isinstance(raw, str) and raw.strip():
                image = _usable_image(image_dir, _find_image(image_dir, raw.strip()), report, path=path, row=row_no,
                                      record_id=record_id)
            else:
                image = _write_png(_image_bytes(raw), out, f"images/{record_id}.png", report, path, row_no, record_id)
            if image is None:
                continue
            answer = _text(row["answer"])
            yield _vqa_record(record_id, image, _text(row["question"]), answer, source="pathvqa",
                              answer_type=_answer_type(None, answer), split=split)


def _write_png(data: bytes | None, out: Path, rel: str, report: Report, path: Path, row: int,
               record_id: str) -> str | None:
    if data is None:
        report.skip("row has no image bytes", path=path, row=row, id=record_id)
        return None
    try:
        image = decode_rgb(bytes(data))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        report.skip(f"corrupt image bytes: {err}", path=path, row=row, id=record_id)
        return None
    image.save(out / rel, format="PNG")
    return rel


PATHVQA = Formatter("pathvqa", generate_pathvqa, _pathvqa_root,
                    "PathVQA pathology VQA (parquet mirror; pickles only with allow_pickle)")


# ----------------------------------------------------------------------------------------------- DICOM


def parse_window(window: Any) -> tuple[float, float] | None:
    """(center, width) from a tuple/list, a 'center,width' string or a preset name; None stays None."""
    if window is None:
        return None
    if isinstance(window, str):
        if window.strip().lower() in WINDOW_PRESETS:
            return WINDOW_PRESETS[window.strip().lower()]
        window = window.split(",")
    try:
        center, width = (float(v) for v in window)
    except (TypeError, ValueError):
        raise AdaptError(f"window {window!r} is not (center, width), 'center,width' or a preset",
                         hint="presets: " + ", ".join(sorted(WINDOW_PRESETS))) from None
    if width <= 0:
        raise AdaptError(f"window width must be > 0, got {width}")
    return center, width


def _first(value: Any) -> float:
    """A DS value that may be multi-valued (several windows in one file): the first one."""
    return float(value[0]) if isinstance(value, (list, tuple, MultiValue)) else float(value)


def apply_window(values: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """DICOM VOI windowing (PS3.3 C.11.2.1.2/3) of modality values to [0, 1]."""
    function = function.upper()
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    if function == "LINEAR":  # the standard's half-pixel convention
        center, width = center - 0.5, width - 1.0
        if width <= 0:
            return (values > center).astype(np.float64)
    return np.clip((values - center) / width + 0.5, 0.0, 1.0)


def _to_unit(values: np.ndarray, ds: pydicom.Dataset, window: tuple[float, float] | None) -> np.ndarray:
    """Modality values -> [0, 1]: chosen window, else the file's VOI LUT, else its window, else min..max."""
    if window is not None:
        return apply_window(values, *window)
    if ds.get("VOILUTSequence"):
        lut = np.asarray(ds.VOILUTSequence[0].LUTData, dtype=np.float64)
        mapped = apply_voi(np.rint(values).astype(np.int64), ds).astype(np.float64)
        low, high = lut.min(), lut.max()  # the LUT's own range: descriptors often overstate the bit depth
        return (mapped - low) / (high - low) if high > low else np.zeros_like(mapped)
    if "WindowCenter" in ds and "WindowWidth" in ds:
        return apply_window(values, _first(ds.WindowCenter), _first(ds.WindowWidth),
                            str(ds.get("VOILUTFunction", "LINEAR")))
    low, high = float(values.min()), float(values.max())
    return (values - low) / (high - low) if high > low else np.zeros_like(values, dtype=np.float64)


def render_dicom(path: str | Path, *, window: Any = None, frame: int | None = None) -> np.ndarray:
    """A DICOM image as (H, W, 3) uint8 RGB, displayed as a radiologist's viewer would show it."""
    return _render(path, window, frame)[0]


def _render(path: str | Path, window: Any, frame: int | None) -> tuple[np.ndarray, str]:
    """(RGB uint8 image, modality) of one DICOM file.

    dcmread -> pixel array (chosen or middle frame) -> modality LUT (rescale slope/intercept) ->
    VOI (chosen window, else the file's VOI LUT or window) -> uint8 -> MONOCHROME1 inverted -> RGB.
    Colour images are only scaled to 8 bits. Raises AdaptError for a non-DICOM file, a file
    without pixel data or pixel data that cannot be decoded.
    """
    window = parse_window(window)
    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError:
        raise AdaptError("not a DICOM file", path=path) from None
    except (OSError, EOFError) as err:
        raise AdaptError(f"cannot read DICOM ({err})", path=path) from None
    if not any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise AdaptError("DICOM has no pixel data", path=path)
    try:
        pixels = ds.pixel_array
    except Exception as err:  # pydicom raises many types for undecodable pixel data; each file is one skip
        syntax = ds.file_meta.get("TransferSyntaxUID", "unknown") if hasattr(ds, "file_meta") else "unknown"
        raise AdaptError(f"cannot decode pixel data (transfer syntax {syntax}: {err})", path=path,
                         hint="install a decoder plugin for it (pylibjpeg, gdcm) or convert the file") from None
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    if n_frames > 1:
        index = n_frames // 2 if frame is None else int(frame)
        if not 0 <= index < n_frames:
            raise AdaptError(f"frame {index} out of range: the file has {n_frames} frames", path=path)
        pixels = pixels[index]
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    modality = str(ds.get("Modality", "")).strip()
    if int(ds.get("SamplesPerPixel", 1)) > 1:
        if pixels.dtype == np.uint8:
            return np.ascontiguousarray(pixels[..., :3]), modality
        bits = int(ds.get("BitsStored", 8))
        return np.clip(np.rint(pixels[..., :3] / (2 ** bits - 1) * 255), 0, 255).astype(np.uint8), modality
    values = np.asarray(apply_modality_lut(pixels, ds), dtype=np.float64)
    grey = np.rint(_to_unit(values, ds, window) * 255.0).astype(np.uint8)
    if photometric == "MONOCHROME1":
        grey = 255 - grey
    return np.repeat(grey[..., None], 3, axis=2), modality


def _dicom_paths(source: Path, labels: str | Path | None) -> tuple[Path, Path]:
    """(folder the `file` column is relative to, label csv)."""
    if source.is_file():
        return source.parent, source
    label_file = Path(labels) if labels is not None else source / "labels.csv"
    if not label_file.is_file():
        raise AdaptError("label file not found", path=label_file,
                         hint="write a CSV with a `file` column and `label` (or `question` + `answer`) "
                              "columns, or pass it with the `labels` option")
    return source, label_file


def _render_name(rel: str) -> str:
    path = Path(rel)
    name = path.with_suffix(".png") if path.suffix.lower() in DICOM_SUFFIXES else path.with_name(path.name + ".png")
    return f"images/{name.as_posix()}"


@dataclass(frozen=True)
class _DicomRows:
    """What every row of a DICOM label file needs (a worker gets it once)."""

    root: Path
    label_file: Path
    is_vqa: bool
    classes: list[str]
    window: tuple[float, float] | None
    frame: int | None


def plan_dicom(source: Path, out: Path, report: Report, *, labels: str | Path | None = None,
               window: Any = None, frame: int | None = None, **unknown: Any) -> Plan:
    """The label file's rows (line, row) and what they share: the task and the class list."""
    _reject_unknown("dicom", unknown, "labels, window, frame")
    window = parse_window(window)
    frame = option("dicom", "frame", frame, Annotated[int, Field(ge=0)] | None)  # 0-based
    root, label_file = _dicom_paths(source, labels)
    header, rows = _read_csv(label_file)
    if "file" not in header or not ("label" in header or {"question", "answer"} <= set(header)):
        raise AdaptError(f"label csv needs a `file` column and `label` or `question` + `answer`; header is {header}",
                         path=label_file)
    is_vqa = {"question", "answer"} <= set(header)
    classes = sorted({_text(r.get("label")) for r in rows if _text(r.get("label"))}) if not is_vqa else []
    # a row is a DICOM decode, VOI and PNG encode (tens of milliseconds)
    return Plan(list(enumerate(rows, start=2)), _DicomRows(root, label_file, is_vqa, classes, window, frame),
                min_per_process=32)


def dicom_rows(rows: _DicomRows, units: Sequence[tuple[int, dict[str, str]]], out: Path,
               report: Report) -> Iterator[Record]:
    """Labelled DICOM files -> rendered PNGs + classification (label) or VQA (question/answer) records.
    A file used by several rows is rendered once per process (the PNG is replaced atomically, so
    two workers rendering the same file write the same bytes safely)."""
    rendered: dict[str, tuple[str | None, str, str]] = {}  # file -> (png or None, skip reason, modality)
    owners: dict[str, dict[str, str]] = {}  # file -> patient_id / study_uid, for held-out splits by patient
    for line, row in units:
        record_id = f"dicom-{line}"
        report.read += 1
        problem = _required(row, ("file", "question", "answer") if rows.is_vqa else ("file", "label"))
        if problem:
            report.skip(problem, path=rows.label_file, row=line, id=record_id)
            continue
        rel = _text(row["file"])
        if rel not in rendered:
            rendered[rel] = _render_to_png(rows.root, rel, out, rows.window, rows.frame)
            owners[rel] = _patient_and_study(rows.root / rel) if rendered[rel][0] is not None else {}
        image, reason, modality = rendered[rel]
        if image is None:
            report.skip(reason, path=rows.label_file, row=line, id=record_id)
            continue
        if rows.is_vqa:
            answer = _text(row["answer"])
            yield _vqa_record(record_id, image, _text(row["question"]), answer, source="dicom",
                              answer_type=_answer_type(None, answer), file=rel, modality=modality, **owners[rel])
        else:
            question = (f"What does this {modality or 'medical'} image show? Choose one of: "
                        f"{', '.join(rows.classes)}.\nAnswer with the label only.")
            yield _vqa_record(record_id, image, question, _text(row["label"]), source="dicom",
                              answer_type="closed", task="classification", choices=rows.classes, file=rel,
                              modality=modality, **owners[rel])


def _patient_and_study(path: Path) -> dict[str, str]:
    """The file's PatientID and StudyInstanceUID (either may be absent), read from the header only."""
    ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientID", "StudyInstanceUID"])
    found = {"patient_id": str(ds.get("PatientID", "") or "").strip(),
             "study_uid": str(ds.get("StudyInstanceUID", "") or "").strip()}
    return {key: value for key, value in found.items() if value}


def _render_to_png(root: Path, rel: str, out: Path, window: tuple[float, float] | None,
                   frame: int | None) -> tuple[str | None, str, str]:
    """Render one DICOM once: (record image path or None, why not, modality)."""
    try:
        path = resolve_inside(root, rel)
    except AdaptError as err:
        return None, err.message, ""
    if not path.is_file():
        return None, f"DICOM file not found: {rel}", ""
    try:
        rgb, modality = _render(path, window, frame)
    except AdaptError as err:
        return None, f"{err.message}: {rel}", ""
    target = _render_name(rel)
    (out / target).parent.mkdir(parents=True, exist_ok=True)
    partial = (out / target).with_name(f".{Path(target).name}.{os.getpid()}.partial")
    Image.fromarray(rgb).save(partial, format="PNG")
    os.replace(partial, out / target)
    return target, "", modality


DICOM = sharded("dicom", plan_dicom, dicom_rows, lambda source, **options: None,
                "DICOM folder + label csv, rendered with the modality LUT and a VOI window")
