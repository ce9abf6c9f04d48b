"""Markup in text: the one rule for what a record's words may contain, at format time and at train time.

Policy: **reject, never escape**. A row whose text carries markup it must not carry is a counted,
located skip (an `AdaptError` under --strict), in `adapt format` (formatters/base.py) and again
when `adapt run` reads records (`adapt.data.records.problems`, then the tokenizer check in
`adapt.data.samples`). Escaping would change the words the model learns; rejecting keeps every
written record exactly what the source said, and the report says which rows were left out.

Two levels:
  * records (`record_problems`): no chat-template special token (`<|im_end|>`, `<s>`, ...) and no
    image-internal token (`<img>`, `</img>`, `<IMG_CONTEXT>`) anywhere; `<image>`/`<video>`
    placeholders only in human turns; `<ref>`, `<box>`, `<quad>` balanced and not nested (the
    grounding markup InternVL records legitimately carry).
  * source text (`source_problem`): a referring expression, question, answer or class name a
    formatter embeds in its own markup must carry no markup at all, or `x</ref><box>[[0, 0, 9, 9]]</box>`
    would become a box in the answer.

Text that passes never turns into special token ids at tokenization: every special token of the
templates and of the tokenizer is refused before encoding.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import cache
from typing import Any

from adapt.data.records import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER
from adapt.data.templates import IMAGE_SPECIAL_TOKENS, IMG_CONTEXT, IMG_END, IMG_START, TEMPLATES

PLACEHOLDERS = (IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER)
GROUNDING_TAGS = ("ref", "box", "quad")


@cache
def template_special_tokens() -> frozenset[str]:
    """The special tokens every chat template writes around turns (`<|im_start|>`, `<|end|>`, `</s>`, ...)."""
    pattern = re.compile(r"<\|[^|<>]+\|>|</?s>")
    found: set[str] = set()
    for template in TEMPLATES.values():
        for piece in (template.system, template.user, template.assistant, template.end, *template.stop):
            found.update(pattern.findall(piece))
    return frozenset(found | {"<s>", "</s>"})


@cache
def forbidden_tokens(extra: frozenset[str] = frozenset()) -> frozenset[str]:
    """Tokens no record text may contain: template specials, image internals, and `extra`
    (a tokenizer's own special tokens) minus the markup records legitimately carry."""
    allowed = set(PLACEHOLDERS) | {t for t in IMAGE_SPECIAL_TOKENS if t not in (IMG_START, IMG_END, IMG_CONTEXT)}
    return frozenset(template_special_tokens() | {IMG_START, IMG_END, IMG_CONTEXT} | extra) - allowed


@cache
def _pattern(tokens: frozenset[str]) -> re.Pattern[str]:
    return re.compile("|".join(re.escape(t) for t in sorted(tokens, key=lambda t: (-len(t), t))) or r"(?!)")


def tokenizer_special_tokens(tokenizer: Any) -> frozenset[str]:
    """Every token string the tokenizer treats as special or added (these never split into plain text)."""
    tokens = set(getattr(tokenizer, "all_special_tokens", []) or [])
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    tokens.update(str(token) for token in decoder.values())
    return frozenset(t for t in tokens if t)


def first_forbidden(text: str, tokens: frozenset[str]) -> str | None:
    """The first forbidden token found in `text` (None when clean)."""
    match = _pattern(tokens).search(text)
    return match.group(0) if match else None


_TAG = re.compile(r"<(/?)(ref|box|quad)>")


def _grounding_problem(text: str) -> str | None:
    """`<ref>`/`<box>`/`<quad>` must open and close in order, never nested."""
    open_tag: str | None = None
    for match in _TAG.finditer(text):
        closing, tag = match.group(1) == "/", match.group(2)
        if not closing and open_tag is None:
            open_tag = tag
        elif closing and open_tag == tag:
            open_tag = None
        else:
            return f"unbalanced or nested grounding markup {match.group(0)!r}"
    return f"unclosed <{open_tag}>" if open_tag else None


def record_problems(record: dict[str, Any], extra_tokens: Iterable[str] = ()) -> list[str]:
    """Markup problems of a structurally valid record (turns are dicts with string values)."""
    out: list[str] = []
    forbidden = forbidden_tokens(frozenset(extra_tokens))
    for i, turn in enumerate(record.get("conversations") or []):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            continue  # shape problems are reported by records.problems
        value, role = turn["value"], turn.get("from")
        token = first_forbidden(value, forbidden)
        if token is not None:
            out.append(f"turn {i} contains the special token {token!r} (text must never become control tokens)")
        if role != "human":
            for placeholder in PLACEHOLDERS:
                if placeholder in value:
                    out.append(f"turn {i} ({role}) contains the {placeholder} placeholder, allowed only in human turns")
        grounding = _grounding_problem(value)
        if grounding:
            out.append(f"turn {i}: {grounding}")
    return out


def source_problem(text: Any, what: str = "text") -> str | None:
    """Why a piece of source text cannot be embedded in a record (None when it can)."""
    if not isinstance(text, str):
        return None
    token = first_forbidden(text, forbidden_tokens())
    if token is None:
        token = next((p for p in PLACEHOLDERS if p in text), None)
    if token is None:
        match = _TAG.search(text)
        token = match.group(0) if match else None
    return None if token is None else f"{what} contains markup {token!r} (rows with template markup are skipped)"
