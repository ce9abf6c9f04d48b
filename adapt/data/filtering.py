"""Filter records before mixing: duplicates, looping answers, broken samples, optional model scores,
and contamination with evaluation sets (InternVL 2.5's data pipeline, on the user's own data).

InternVL 2.5 reports that even a small share of noisy samples hurts, and that samples with repetitive
answers teach a model to loop at generation time. The rules, each switchable in `FilterConfig`:

1. duplicates (`dedup`): same normalised text (Unicode NFKC, casefold, whitespace collapsed,
   `<image>`/`<video>` placeholders ignored) on the same images, within a source, across sources and
   against the held-out sets; images are the same when their bytes are (BLAKE2 digest) or, with
   `perceptual`, when their dHashes differ in at most `max_hash_distance` of 64 bits.
2. repetition (`repetition`) in answers: a token repeated `max_token_run` times in a row, a span of
   2..`max_tandem_period` tokens repeated `min_tandem_repeats` times in a row, a share of repeated
   `ngram`-grams above `max_ngram_share`, or a line (with letters or digits) `max_line_repeats` times.
   A numbered list repeats words but not spans (the numbers differ), so it is kept.
3. heuristics (`heuristics`): empty answers, answers of markup only, questions with no text besides
   placeholders, images that cannot be read, below `min_image_side` or beyond `max_aspect_ratio`,
   grounding answers whose boxes do not parse on InternVL's 0..1000 grid, and multiple-choice
   answers that are not one of the choices (`meta.choices`, or lettered options in the question).
4. model scoring (`score_model`, off by default): a local transformers chat model rates each kept
   sample's text 1..5 in batches; samples whose expected rating is below `score_threshold` go.
5. contamination (`contamination`): training samples whose image or question/answer matches a
   sample of an evaluation set (adapt records, a formatted folder, or an InternVL meta file) are
   reported and, with `remove_contaminated`, removed.

Every removal is counted per source and rule, the first `examples` removals per rule and source are
kept as examples, and `FilterReport.to_dict()` is what `adapt filter` and `adapt run` save.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Annotated, Any, NamedTuple

import numpy as np
from pydantic import ConfigDict, Field, ValidationError, field_validator
from pydantic.dataclasses import dataclass as pydantic_dataclass

from adapt.data.boxes import GRID, parse_boxes
from adapt.data.images import difference_hash
from adapt.data.records import (
    IMAGE_PLACEHOLDER,
    VIDEO_PLACEHOLDER,
    DatasetSpec,
    Record,
    images_of,
    write_jsonl,
    write_meta,
)
from adapt.errors import AdaptError, Report, validation_error
from adapt.fileio import atomic_write_text, resolve_inside

RULES = ("duplicate", "duplicate_heldout", "repetition", "empty_answer", "markup_only", "no_question_text",
         "unreadable_image", "small_image", "aspect_ratio", "bad_box", "not_a_choice", "contaminated",
         "low_score")
DEFAULT_SCORE_PROMPT = (
    "Rate the quality of this training sample for a vision-language assistant from 1 (useless, wrong or "
    "garbled) to 5 (clear question, correct and fluent answer). Reply with one digit.\n\n"
    "Question: {question}\nAnswer: {answer}")


@pydantic_dataclass(config=ConfigDict(strict=True, extra="forbid"))
class FilterConfig:
    """The `filter:` section of a recipe or run config (and `adapt filter`'s options); types and
    ranges are declared here, so a wrong setting is refused with its key before any work."""

    dedup: bool = True
    perceptual: bool = True
    max_hash_distance: Annotated[int, Field(ge=0, le=15)] = 3  # bits of a 64-bit dHash
    repetition: bool = True
    max_token_run: Annotated[int, Field(ge=2)] = 8
    min_tandem_repeats: Annotated[int, Field(ge=2)] = 4
    max_tandem_period: Annotated[int, Field(ge=1)] = 32
    ngram: Annotated[int, Field(ge=1)] = 4
    max_ngram_share: Annotated[float, Field(gt=0, le=1)] = 0.5
    min_ngram_tokens: Annotated[int, Field(ge=1)] = 24
    max_line_repeats: Annotated[int, Field(ge=1)] = 3
    heuristics: bool = True
    min_image_side: Annotated[int, Field(ge=1)] = 28
    max_aspect_ratio: Annotated[float, Field(ge=1)] = 20.0
    contamination: list[str] = field(default_factory=list)  # evaluation sets (one path is a list of one)
    remove_contaminated: bool = False
    score_model: str | None = None
    score_threshold: float = 3.0
    score_batch_size: Annotated[int, Field(ge=1)] = 16
    score_prompt: str = DEFAULT_SCORE_PROMPT
    examples: Annotated[int, Field(ge=0)] = 5

    @field_validator("contamination", mode="before")
    @classmethod
    def _one_path_is_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None, *, where: str = "filter") -> FilterConfig:
        """Build from a config mapping; unknown keys and wrong values are named with their key."""
        raw = dict(raw or {})
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(raw) - set(known))
        if unknown:
            raise AdaptError(f"unknown {where} setting(s): {', '.join(unknown)}", hint=f"accepted: {', '.join(known)}")
        try:
            return cls(**raw)
        except ValidationError as err:
            raise validation_error(err, raw, prefix=where,
                                   hint="each setting's type and range is declared in adapt.data.filtering.FilterConfig"
                                   ) from None


# -- text ---------------------------------------------------------------------------------------

_PLACEHOLDERS = re.compile(rf"{re.escape(IMAGE_PLACEHOLDER)}|{re.escape(VIDEO_PLACEHOLDER)}|\b(?:image|frame)-?\d+:",
                           re.I)
_TAGS = re.compile(r"</?[A-Za-z][^<>]*>")
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
# a token is one CJK character (those scripts do not separate words) or a run of other word characters
_TOKEN = re.compile(rf"[{_CJK}]|[^\W{_CJK}]+")
_ASCII_PUNCTUATION = str.maketrans({c: " " for c in "!\"#$%&'()*+,-./:;<=>?@[\\]^`{|}~"})
_ALNUM = re.compile(r"[^\W_]")
_OPTION = re.compile(r"^\s*\(?([A-Z])[.):]\s*(.+?)\s*$", re.M)


def normalize_text(text: str) -> str:
    """NFKC, casefold and single spaces: the form two texts are compared in."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def _has_text(text: str) -> bool:
    return _ALNUM.search(text) is not None


def turns(record: Record, role: str) -> list[str]:
    return [t.get("value", "") for t in record.get("conversations") or [] if isinstance(t, dict) and t.get("from") == role]


def _without_placeholders(text: str) -> str:
    """The text with `<image>`, `<video>` and `Image-1:` / `Frame-1:` labels blanked (fast path first)."""
    text = text.replace(IMAGE_PLACEHOLDER, " ").replace(VIDEO_PLACEHOLDER, " ")
    return _PLACEHOLDERS.sub(" ", text) if ":" in text else text


def _normalized_turns(record: Record) -> list[tuple[str, str]]:
    """(role, normalised text without placeholders) per turn, system turns left out."""
    return [(t.get("from"), normalize_text(_without_placeholders(t.get("value", ""))))
            for t in record.get("conversations") or [] if isinstance(t, dict) and t.get("from") != "system"]


def _join_turns(normalized: list[tuple[str, str]]) -> str:
    return "\x1f".join(f"{role}:{text}" for role, text in normalized)


def text_key(record: Record) -> str:
    """The normalised conversation, placeholders removed, roles kept (system turns ignored)."""
    return _join_turns(_normalized_turns(record))


def tokens_of(normalized: str) -> list[str]:
    """Words (split at spaces and punctuation), and single characters in CJK scripts."""
    if normalized.isascii():  # 6x faster than the regex, same tokens
        return normalized.translate(_ASCII_PUNCTUATION).split()
    return _TOKEN.findall(normalized)


def _digest(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


# -- repetition -----------------------------------------------------------------------------------

def repetition(answer: str, config: FilterConfig, normalized: str | None = None) -> str | None:
    """Why an answer loops (None when it does not); `normalized` is `normalize_text(answer)` if known."""
    if "\n" in answer:
        lines = answer.splitlines()
        counted = Counter(normalize_text(line) for line in lines if _has_text(line))
        if counted:
            line, n = counted.most_common(1)[0]
            if n >= config.max_line_repeats:
                return f"line {line[:40]!r} repeated {n} times"
    tokens = tokens_of(normalize_text(answer) if normalized is None else normalized)
    n_tokens = len(tokens)
    if n_tokens < 2:
        return None
    n = config.ngram
    n_grams = max(n_tokens - n + 1, 0)
    repeated = n_grams - len(set(zip(*(tokens[i:] for i in range(n)))))
    # a run of R equal tokens holds R - n + 1 equal n-grams: look for runs only when that many repeat
    if repeated >= config.max_token_run - n:
        run = 1
        for previous, token in zip(tokens, tokens[1:]):
            run = run + 1 if token == previous else 1
            if run >= config.max_token_run:
                return f"token {token!r} repeated {run} times in a row"
    if n_tokens >= config.min_ngram_tokens and n_grams and repeated / n_grams > config.max_ngram_share:
        return f"{repeated} of {n_grams} {n}-grams are repeats"
    k = config.min_tandem_repeats
    # a span of p >= 2 tokens repeated k times holds kp - n + 1 n-grams of which at most p differ
    if repeated >= (k - 1) * 2 - n + 1:
        for period in range(2, min(config.max_tandem_period, n_tokens // k) + 1):
            same = 0
            for i in range(n_tokens - period):
                same = same + 1 if tokens[i] == tokens[i + period] else 0
                if same >= (k - 1) * period:
                    span = " ".join(tokens[i + 1:i + 1 + period])
                    return f"{period}-token span {span[:40]!r} repeated {k}+ times in a row"
    return None


# -- heuristics -----------------------------------------------------------------------------------

def _box_problem(answer: str, task: str | None) -> str | None:
    if task != "grounding" and "<box>" not in answer:
        return None
    tagged = re.findall(r"<box>(.*?)</box>", answer, re.S)
    if task != "grounding" and not tagged:
        return None
    if task == "grounding" and not tagged:
        return "grounding answer has no <box>...</box>"
    for content in tagged:
        boxes = parse_boxes(f"<box>{content}</box>")
        if not boxes:
            return f"box {content[:40]!r} does not parse as [[x1, y1, x2, y2]]"
        for x1, y1, x2, y2 in boxes:
            if not (0 <= x1 < x2 <= GRID and 0 <= y1 < y2 <= GRID):
                return f"box {[x1, y1, x2, y2]} is not a box on the 0..{GRID} grid"
    return None


def _choice_problem(record: Record, question: str, answer: str) -> str | None:
    """Multiple choice: the answer must name one of the choices (by letter, text, or both)."""
    listed = (record.get("meta") or {}).get("choices")
    if isinstance(listed, list) and listed and all(isinstance(c, str) for c in listed):
        options = {chr(ord("a") + i): normalize_text(c) for i, c in enumerate(listed)}
        lettered = record["meta"].get("letter") is not None
    elif not ("\nA" in question or "(A" in question or question.startswith("A")) or "B" not in question:
        return None
    else:
        found = _OPTION.findall(question)
        letters = [letter for letter, _ in found]
        if len(found) < 2 or letters != [chr(ord("A") + i) for i in range(len(found))]:
            return None
        options, lettered = {letter.lower(): normalize_text(text).rstrip(".") for letter, text in found}, True
    said = normalize_text(answer).rstrip(".")
    if said in options.values():
        return None
    match = re.match(r"^\(?([a-z])(?:[.):]\s*|\s+|$)(.*)$", said)
    if lettered and match and match.group(1) in options and match.group(2) in ("", options[match.group(1)]):
        return None
    return f"answer {answer[:40]!r} is not one of the {len(options)} choices"


class TextVerdict(NamedTuple):
    """What the rules that read only a record's text decide (so worker processes can compute it)."""

    reason: tuple[str, str] | None
    text: int  # digest of the normalised conversation (`text_key`)


def text_verdict(record: Record, config: FilterConfig) -> TextVerdict:
    """Text heuristics (empty / markup-only answers, no question, boxes, choices), then repetition."""
    questions, answers = turns(record, "human"), turns(record, "gpt")
    normalized = _normalized_turns(record)
    reason = _text_problem(record, questions, answers) if config.heuristics else None
    if reason is None and config.repetition:
        for answer, (_, text) in zip(answers, (pair for pair in normalized if pair[0] == "gpt")):
            why = repetition(answer, config, text)
            if why:
                reason = ("repetition", why)
                break
    return TextVerdict(reason, _digest(_join_turns(normalized)))


def _text_problem(record: Record, questions: list[str], answers: list[str]) -> tuple[str, str] | None:
    for answer in answers:
        if not answer.strip():
            return "empty_answer", "an answer is empty or whitespace"
        if not _has_text(answer) or "<" in answer and not _has_text(_TAGS.sub(" ", answer)):
            return "markup_only", f"answer {answer[:40]!r} has no text besides markup"
    if questions and not _has_text(_without_placeholders(" ".join(questions))):
        return "no_question_text", "the question has no text besides placeholders"
    task = (record.get("meta") or {}).get("task")
    for answer in answers:
        why = _box_problem(answer, task)
        if why:
            return "bad_box", why
    if len(questions) == 1 and len(answers) == 1:
        why = _choice_problem(record, questions[0], answers[0])
        if why:
            return "not_a_choice", why
    return None


def _image_problem(info: _Image | str, config: FilterConfig) -> tuple[str, str] | None:
    if isinstance(info, str):
        return "unreadable_image", info
    if min(info.width, info.height) < config.min_image_side:
        return "small_image", f"image is {info.width}x{info.height}, below {config.min_image_side} px"
    if max(info.width, info.height) / min(info.width, info.height) > config.max_aspect_ratio:
        return "aspect_ratio", f"image is {info.width}x{info.height}, beyond {config.max_aspect_ratio}:1"
    return None


# -- images ---------------------------------------------------------------------------------------

@dataclass
class _Image:
    digest: int
    cluster: int
    width: int
    height: int


class ImageIndex:
    """Each distinct image file read once: content digest, dHash cluster and size.

    Near duplicates are found online: the dHash is split into `max_hash_distance + 1` bands, and two
    hashes within that distance agree exactly on at least one band (pigeonhole), so only images that
    share a band value are compared. Memory grows with distinct images, not with records.
    """

    def __init__(self, max_hash_distance: int | None) -> None:
        self.distance = max_hash_distance
        self.by_path: dict[str, _Image | str] = {}
        self.by_digest: dict[int, int] = {}
        self._hashes: list[int] = []
        bounds = [round(64 * i / ((max_hash_distance or 0) + 1)) for i in range((max_hash_distance or 0) + 2)]
        self._bands = [((1 << (hi - lo)) - 1) << lo for lo, hi in zip(bounds, bounds[1:])]
        self._tables: list[dict[int, list[int]]] = [defaultdict(list) for _ in self._bands]

    def get(self, path: str) -> _Image | str:
        """The image's entry, or why it cannot be read."""
        found = self.by_path.get(path)
        if found is None:
            found = self.by_path[path] = self._read(path)
        return found

    def _read(self, path: str) -> _Image | str:
        try:
            data = Path(path).read_bytes()
        except OSError as err:
            return f"cannot read {path}: {err.strerror or err}"
        digest = int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")
        try:
            dhash, width, height = difference_hash(data)
        except Exception as err:  # PIL raises many types for corrupt or unknown files
            return f"cannot decode {path}: {err}"
        cluster = self.by_digest.get(digest)
        if cluster is None:
            cluster = self._cluster(dhash) if self.distance is not None else len(self.by_digest)
            self.by_digest[digest] = cluster
        return _Image(digest, cluster, width, height)

    def _cluster(self, dhash: int) -> int:
        for band, table in zip(self._bands, self._tables):
            for cluster in table.get(dhash & band, ()):
                if (self._hashes[cluster] ^ dhash).bit_count() <= self.distance:
                    return cluster
        cluster = len(self._hashes)
        self._hashes.append(dhash)
        for band, table in zip(self._bands, self._tables):
            table[dhash & band].append(cluster)
        return cluster


# -- the filter -----------------------------------------------------------------------------------

@dataclass
class FilterReport:
    """What the filter removed, per source and rule, with examples."""

    config: FilterConfig
    read: Counter = field(default_factory=Counter)
    kept: Counter = field(default_factory=Counter)
    removed: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    examples: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))
    contaminated: Counter = field(default_factory=Counter)  # found per source, removed or not

    def note(self, rule: str, source: str, record: Record, detail: str) -> None:
        self.removed[source][rule] += 1
        shown = self.examples[rule]
        if sum(1 for e in shown if e["source"] == source) < self.config.examples:
            shown.append({"source": source, "id": record.get("id"), "detail": detail,
                          "image": record.get("image"), "question": "\n".join(turns(record, "human"))[:300],
                          "answer": "\n".join(turns(record, "gpt"))[:300]})

    def to_dict(self) -> dict[str, Any]:
        return {"config": asdict(self.config),
                "sources": {name: {"read": self.read[name], "kept": self.kept[name],
                                   "removed": dict(self.removed.get(name, {})),
                                   "contaminated": self.contaminated[name]} for name in self.read},
                "removed": dict(sum((Counter(c) for c in self.removed.values()), Counter())),
                "examples": dict(self.examples)}

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, ensure_ascii=False))

    def manifest_entry(self) -> dict[str, Any]:
        """The report without its examples: what the mixture manifest records."""
        return {k: v for k, v in self.to_dict().items() if k != "examples"}

    def summary(self) -> str:
        lines = [f"filter: kept {sum(self.kept.values())} of {sum(self.read.values())} records"]
        for name in self.read:
            removed = self.removed.get(name) or {}
            lines.append(f"  {name}: kept {self.kept[name]} of {self.read[name]}"
                         + (" (" + ", ".join(f"{k}: {v}" for k, v in Counter(removed).most_common()) + ")"
                            if removed else "")
                         + (f", {self.contaminated[name]} match an evaluation set" if self.contaminated[name] else ""))
        return "\n".join(lines)


class KeySet:
    """A growing set of 64-bit digests in one numpy array (open addressing, linear probing).

    Written here because a Python set of ints costs ~90 bytes a key, so de-duplicating a 1M-record pool
    held ~70 MB of keys; this holds 8-16 bytes a key (load factor 1/4..1/2), measured in
    benchmarks/filter_scale.py. Keys are uniform digests, so their low bits index the table directly.
    """

    def __init__(self, capacity: int = 1 << 12) -> None:
        self._slots = np.zeros(capacity, dtype=np.uint64)
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def add(self, key: int) -> bool:
        """Insert `key`; False when it was there already."""
        key = key or 1  # 0 marks an empty slot
        if 2 * (self._count + 1) > len(self._slots):
            self._grow()
        slots, mask = self._slots, len(self._slots) - 1
        index = key & mask
        while True:
            held = int(slots[index])
            if held == 0:
                slots[index] = key
                self._count += 1
                return True
            if held == key:
                return False
            index = (index + 1) & mask

    def _grow(self) -> None:
        keys = self._slots[self._slots != 0]
        self._slots = np.zeros(2 * len(self._slots), dtype=np.uint64)
        self._count = 0
        for start in range(0, len(keys), 1 << 16):  # in slices: a list of every key would cost ~36 B each
            for key in keys[start:start + (1 << 16)].tolist():
                self.add(key)


class DataFilter:
    """Applies rules 1-3 and 5 record by record (streaming) and rule 4 in batches (`apply`).

    Register the held-out and evaluation sets first (`add_heldout`, `add_evaluation`), then `check`
    each training record in order: the first copy of a sample is kept, later copies are duplicates.
    Memory: one 8-byte key per kept sample and one entry per distinct image file.
    """

    def __init__(self, config: FilterConfig | None = None) -> None:
        self.config = config or FilterConfig()
        self.report = FilterReport(self.config)
        self.images = ImageIndex(self.config.max_hash_distance if self.config.perceptual else None)
        self._seen = KeySet()
        self._heldout: set[int] = set()
        self._eval_images: set[int] = set()
        self._eval_texts: set[int] = set()
        self._eval_videos: set[str] = set()
        self._resolved: dict[tuple[str, str], _Image | str] = {}

    # references
    def add_heldout(self, pairs: Iterable[tuple[Record, str]]) -> None:
        """Held-out samples: training copies of them are removed (rule 1)."""
        for record, root in pairs:
            self._heldout.add(self._sample_key(record, root))

    def add_evaluation(self, pairs: Iterable[tuple[Record, str]]) -> None:
        """Evaluation samples: training samples sharing an image or the question/answer are flagged."""
        for record, root in pairs:
            self._eval_texts.add(_digest(text_key(record)))
            for info in self._image_infos(record, root):
                if isinstance(info, _Image):
                    self._eval_images.add(info.cluster)
            if record.get("video"):
                self._eval_videos.add(str(record["video"]))

    def load_evaluation(self, paths: Sequence[str | Path]) -> int:
        """Register evaluation sets from files (records JSONL, formatted folder, InternVL meta file)."""
        from adapt.data.mixing import load_sources

        count = 0
        for path in paths:
            for source in load_sources(path, kind="general", report=Report(name=str(path))):
                self.add_evaluation((record, source.root) for record in source.records)
                count += len(source.records)
        return count

    # checks
    def _image_infos(self, record: Record, root: str) -> list[_Image | str]:
        return [self._image(root, rel) for rel in images_of(record)]

    def _image(self, root: str, rel: str) -> _Image | str:
        """An image's entry by (root, relative path): resolving a path costs more than all the rules."""
        found = self._resolved.get((root, rel))
        if found is None:
            try:
                found = self.images.get(str(resolve_inside(root, rel)))
            except AdaptError as err:
                found = err.message
            self._resolved[(root, rel)] = found
        return found

    def _sample_key(self, record: Record, root: str, infos: list[_Image | str] | None = None,
                    text: int | None = None) -> int:
        infos = self._image_infos(record, root) if infos is None else infos
        images = [f"#{i.cluster}" if isinstance(i, _Image) else f"?{rel}" for i, rel in zip(infos, images_of(record))]
        text = _digest(text_key(record)) if text is None else text
        return _digest("\x1e".join([str(text), *images, str(record.get("video") or "")]))

    def check(self, record: Record, root: str, source: str, verdict: TextVerdict | None = None) -> bool:
        """Keep (True) or remove (False, counted with its reason) one training record. `verdict` is
        `text_verdict(record, config)` when a worker process computed it already."""
        report = self.report
        report.read[source] += 1
        reason = self._reason(record, root, source, verdict or text_verdict(record, self.config))
        if reason is not None:
            report.note(*reason[:1], source, record, reason[1])
            return False
        report.kept[source] += 1
        return True

    def _reason(self, record: Record, root: str, source: str, verdict: TextVerdict) -> tuple[str, str] | None:
        config = self.config
        if verdict.reason is not None:
            return verdict.reason
        needs_images = config.heuristics or config.dedup or self._eval_images
        infos = self._image_infos(record, root) if needs_images else []
        if config.heuristics:
            for info in infos:
                found = _image_problem(info, config)
                if found:
                    return found
        if self._eval_texts or self._eval_images or self._eval_videos:
            why = self._contamination(record, infos, verdict.text)
            if why:
                self.report.contaminated[source] += 1
                if config.remove_contaminated:
                    return "contaminated", why
        if config.dedup:
            key = self._sample_key(record, root, infos, verdict.text)
            if key in self._heldout:
                return "duplicate_heldout", "same text and images as a held-out sample"
            if not self._seen.add(key):
                return "duplicate", "same text and images as an earlier sample"
        return None

    def _contamination(self, record: Record, infos: list[_Image | str], text: int) -> str | None:
        for info, rel in zip(infos, images_of(record)):
            if isinstance(info, _Image) and info.cluster in self._eval_images:
                return f"image {rel} is (nearly) an evaluation image"
        if record.get("video") and str(record["video"]) in self._eval_videos:
            return f"video {record['video']} is an evaluation video"
        if text in self._eval_texts:
            return "question and answer match an evaluation sample"
        return None

    # whole sources
    def apply(self, sources: list[Any]) -> list[Any]:
        """Filter `mixing.Source`s: new Sources with the kept records (model scoring last, batched).

        Counts are of distinct records (a meta file's `repeat_time` copies are one record). A source
        left empty is dropped from the list (its removals stay in the report)."""
        from dataclasses import replace

        kept_sources = []
        for source in sources:
            self.report.read.setdefault(source.name, 0)
            # repeat_time repeats the same record object: decide once, so repeats are not duplicates
            decided: dict[int, bool] = {}
            for record in source.records:
                if id(record) not in decided:
                    decided[id(record)] = self.check(record, source.root, source.name)
            kept_sources.append(replace(source, records=[r for r in source.records if decided[id(r)]]))
        if self.config.score_model:
            scorer = ModelScorer.load(self.config.score_model, prompt=self.config.score_prompt,
                                      batch_size=self.config.score_batch_size)
            for i, source in enumerate(kept_sources):
                distinct = list({id(r): r for r in source.records}.values())
                low = set()
                for record, score in zip(distinct, scorer.score(distinct)):
                    if score < self.config.score_threshold:
                        low.add(id(record))
                        self.report.kept[source.name] -= 1
                        self.report.note("low_score", source.name, record,
                                         f"rated {score:.2f} < {self.config.score_threshold}")
                kept_sources[i] = replace(source, records=[r for r in source.records if id(r) not in low])
        return [s for s in kept_sources if s.records]


# -- model-based scoring ----------------------------------------------------------------------------

class ModelScorer:
    """Rates sample text 1..5 with a local chat model: the expected digit under the model's next-token
    distribution restricted to "1".."5" (one batched forward pass, no sampling, so it is deterministic)."""

    def __init__(self, model: Any, tokenizer: Any, *, prompt: str = DEFAULT_SCORE_PROMPT, batch_size: int = 16) -> None:
        import torch

        self.model, self.tokenizer, self.prompt, self.batch_size = model.eval(), tokenizer, prompt, batch_size
        ids = [tokenizer.encode(str(d), add_special_tokens=False) for d in range(1, 6)]
        if any(len(i) != 1 for i in ids):
            raise AdaptError("the scoring model's tokenizer does not have single tokens for the digits 1..5")
        self.digits = torch.tensor([i[0] for i in ids])

    @classmethod
    def load(cls, name: str, **kwargs: Any) -> ModelScorer:
        """A preset (`tiny`) or native InternVL folder through adapt's loader, else any local causal LM."""
        from adapt.checkpoints import models

        path = Path(name)
        if name in models.PRESETS or (path / "config.json").is_file() and '"internvl"' in (path / "config.json").read_text():
            loaded = models.load(name)
            return cls(loaded.model, loaded.tokenizer, **kwargs)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(name, local_files_only=True)
        except OSError as err:
            raise AdaptError(f"cannot load the scoring model {name!r} locally ({err})",
                             hint="score_model must be a local folder (or 'tiny'); nothing is downloaded") from None
        return cls(model, tokenizer, **kwargs)

    def _text(self, record: Record) -> str:
        question = _without_placeholders("\n".join(turns(record, "human"))).strip()
        content = self.prompt.format(question=question, answer="\n".join(turns(record, "gpt")))
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                      add_generation_prompt=True)
        return content + "\nRating: "

    def score(self, records: Sequence[Record]) -> list[float]:
        """Expected rating per record, in 1..5."""
        import torch

        out: list[float] = []
        self.tokenizer.padding_side = "left"  # the last position is then every row's next token
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        for start in range(0, len(records), self.batch_size):
            texts = [self._text(r) for r in records[start:start + self.batch_size]]
            batch = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.no_grad():
                positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
                logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                    position_ids=positions).logits
            probs = torch.softmax(logits[:, -1, self.digits].float(), dim=-1)
            out += (probs @ torch.arange(1, 6, dtype=torch.float32)).tolist()
        return out


# -- entry points ---------------------------------------------------------------------------------

def filter_training(settings: dict[str, Any] | None, domain: list[Any], general: list[Any],
                    heldout: Iterable[tuple[Record, str]], out_dir: Path) -> tuple[list[Any], list[Any], FilterReport | None]:
    """`adapt run`'s filter step between formatting and mixing: nothing happens without a `filter:`
    section; with one, duplicates of held-out samples go too and the report is saved under out_dir."""
    if not settings:
        return domain, general, None
    data_filter = DataFilter(FilterConfig.from_dict(settings))
    data_filter.add_heldout(heldout)
    data_filter.load_evaluation(data_filter.config.contamination)
    kept = data_filter.apply(domain + general)
    names = {s.name for s in kept}
    if not any(s.name in names for s in domain):
        raise AdaptError("the filter removed every domain record", hint=data_filter.report.summary())
    data_filter.report.save(out_dir / "filter_report.json")
    return ([s for s in kept if s.kind == "domain"], [s for s in kept if s.kind == "general"], data_filter.report)


def record_in_manifest(manifest_path: Path, report: FilterReport) -> None:
    """Add the filter's settings and counts to a saved mixture manifest (its records hash is unchanged)."""
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    manifest["filter"] = report.manifest_entry()
    atomic_write_text(manifest_path, json.dumps(manifest, indent=2, ensure_ascii=False))


def filter_files(inputs: Sequence[str | Path], out: str | Path, config: FilterConfig, *,
                 heldout: Sequence[str | Path] = (), strict: bool = False) -> FilterReport:
    """`adapt filter`: filter formatted folders, InternVL meta files or JSONL files into `out`
    (one `<source>.jsonl` per source, a `meta.json` whose roots are the original image roots, so
    `adapt run --data`/`--general` and `mixing.load_sources` read it) plus `filter_report.json`.
    Each kept record is written once: a meta file's `repeat_time` is for the loader, not baked in."""
    from adapt.data.mixing import load_sources

    out = Path(out)
    load_report = Report(name="filter", strict=strict)
    sources = [s for path in inputs for s in load_sources(path, kind="domain", report=load_report)]
    if len({s.name for s in sources}) != len(sources):
        raise AdaptError("two inputs have a source of the same name", hint="rename one folder or meta entry")
    data_filter = DataFilter(config)
    for path in heldout:
        for source in load_sources(path, kind="domain", report=load_report):
            data_filter.add_heldout((r, source.root) for r in source.records)
    data_filter.load_evaluation(config.contamination)
    kept = {s.name: s for s in data_filter.apply(sources)}
    specs = []
    for source in sources:
        name = source.name.replace("/", "_").replace(":", "_")
        records = list({id(r): r for r in kept[source.name].records}.values()) if source.name in kept else []
        write_jsonl(out / f"{name}.jsonl", records)
        if records:
            specs.append(DatasetSpec(name=source.name, root=source.root, annotation=f"{name}.jsonl"))
    if not specs:
        raise AdaptError("the filter removed every record", hint=data_filter.report.summary())
    write_meta(out / "meta.json", specs)
    data_filter.report.save(out / "filter_report.json")
    return data_filter.report
