"""Chat templates of the InternVL families, and the record -> (input_ids, labels) builder.

Token sequences are the tokenization of the whole rendered conversation, exactly what the official
training code, `chat()`, `apply_chat_template` and vLLM feed the model. Labels cover each answer and its
end token, found from the character spans of the answers in that tokenization, so they can never
disagree with the input the way the official re-tokenize-and-compare preprocessors do ("tokenization
mismatch", silently zeroed samples).

Family templates (OpenGVLab/InternVL `conversation.py`, MPT separator style, routed as
`internvl_chat_finetune.py` routes them):
  Hermes-2        (InternVL2-1B, Qwen2)     chatml, `<|im_end|>` separator           `preprocess_mpt`
  internlm2-chat  (InternVL2-2B, InternLM2) chatml, `<|im_end|>` separator, BOS `<s>`, each turn stripped
                                                                                      `preprocess_internlm`
  phi3-chat       (InternVL2-4B, Phi-3)     `<|user|>\\n ... <|end|>`, BOS `<s>`       `preprocess_phi3`
  internvl2_5     (InternVL2.5 / 3, -hf)    chatml, `<|im_end|>\\n` separator (the `\\n` unsupervised), BOS
                                            where the tokenizer adds one (InternLM2)  `preprocess_internvl2_5`
Every family starts with whatever the tokenizer itself puts first (its BOS when it adds one), as the
official code, which tokenizes with special tokens on, does. The default system message is each
template's official one (`conv.system_message`); `none` leaves the system turn out.
"""

from __future__ import annotations

import contextlib
import re
from bisect import bisect_left
from dataclasses import dataclass, field

from adapt.data.records import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, Record

IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"
IMAGE_SPECIAL_TOKENS = [IMG_START, IMG_END, IMG_CONTEXT, "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>"]
IGNORE_INDEX = -100

# The official default system messages (InternVL conversation.py), selectable by name.
SYSTEM_MESSAGES = {
    "internvl2": "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。",
    "internvl2_5": "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。",
}


@dataclass(frozen=True)
class Template:
    name: str
    system: str  # format string with {system}
    user: str  # role prefix of a human turn
    assistant: str  # role prefix of a gpt turn
    end: str  # end-of-turn token (supervised after each answer)
    after_end: str = ""  # text after the end token (not supervised)
    bos: bool = False  # starts with the tokenizer's BOS even where the tokenizer does not add it itself
    default_system: str | None = None
    stop: tuple[str, ...] = field(default=())
    strip_turns: bool = False  # strip each turn's text, as the official preprocessing of this family does


TEMPLATES: dict[str, Template] = {
    "Hermes-2": Template("Hermes-2", "<|im_start|>system\n{system}", "<|im_start|>user\n", "<|im_start|>assistant\n",
                         "<|im_end|>", default_system=SYSTEM_MESSAGES["internvl2"], stop=("<|im_end|>", "<|endoftext|>")),
    "internlm2-chat": Template("internlm2-chat", "<|im_start|>system\n{system}", "<|im_start|>user\n",
                               "<|im_start|>assistant\n", "<|im_end|>", bos=True, strip_turns=True,
                               default_system=SYSTEM_MESSAGES["internvl2"], stop=("<|im_end|>", "</s>")),
    "phi3-chat": Template("phi3-chat", "<|system|>\n{system}", "<|user|>\n", "<|assistant|>\n", "<|end|>", bos=True,
                          default_system=SYSTEM_MESSAGES["internvl2"], stop=("<|end|>", "<|endoftext|>")),
    "internvl2_5": Template("internvl2_5", "<|im_start|>system\n{system}", "<|im_start|>user\n",
                            "<|im_start|>assistant\n", "<|im_end|>", after_end="\n",
                            default_system=SYSTEM_MESSAGES["internvl2_5"], stop=("<|im_end|>", "<|endoftext|>")),
}


def get_template(name: str) -> Template:
    from adapt.errors import AdaptError

    if name not in TEMPLATES:
        raise AdaptError(f"unknown chat template {name!r}", hint="choose one of: " + ", ".join(TEMPLATES))
    return TEMPLATES[name]


def resolve_system(template: Template, system: str | None) -> str | None:
    """`system` may be None/'default' (the family's official message, which the released models were
    trained and are prompted with), 'none' (no system turn), a key of SYSTEM_MESSAGES, or the user's text."""
    if system == "none":
        return None
    if system is None or system == "default":
        return template.default_system
    return SYSTEM_MESSAGES.get(system, system)


def _jinja_literal(text: str) -> str:
    """`text` as a jinja string literal (jinja unescapes literals like Python)."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def chat_template_jinja(name: str, image_token: str = IMAGE_PLACEHOLDER, *, bos: bool | None = None,
                        system: str | None = "default") -> str:
    """A HF `chat_template` rendering exactly the text `encode` builds for text turns.

    Image parts of a message render as `image_token` + newline: `<image>` for adapt's own records,
    `<IMG_CONTEXT>` for exports, the placeholder the -hf InternVLProcessor and vLLM expand. `bos`
    (default: the template's) writes `bos_token` first, as `apply_chat_template` adds no special tokens;
    pass True for a tokenizer that adds its BOS itself (`leading_special_ids`). A conversation without
    a system message gets `system` resolved as in training (the official default unless 'none').
    """
    t = get_template(name)
    lit = _jinja_literal
    end = lit(t.end + t.after_end)
    content = "(text | trim)" if t.strip_turns else "text"
    system_text = resolve_system(t, system)
    default = "" if system_text is None else (
        "{% if loop.first and message['role'] != 'system' %}{{ "
        + lit(t.system.format(system=system_text) + t.end + t.after_end) + " }}{% endif %}")
    return (
        ("{{ bos_token }}" if (t.bos if bos is None else bos) else "")
        + "{% for message in messages %}" + default
        + "{% if message['content'] is string %}{% set text = message['content'] %}"
        + "{% else %}{% set text = namespace(v='') %}{% for part in message['content'] %}"
        + "{% if part['type'] == 'image' %}{% set text.v = text.v + " + lit(image_token + "\n") + " %}"
        + "{% elif part['type'] == 'text' %}{% set text.v = text.v + part['text'] %}{% endif %}{% endfor %}"
        + "{% set text = text.v %}{% endif %}"
        + "{% if message['role'] == 'system' %}{{ " + lit(t.system.split("{system}")[0]) + " + text + " + end + " }}"
        + "{% elif message['role'] == 'user' %}{{ " + lit(t.user) + " + " + content + " + " + end + " }}"
        + "{% else %}{{ " + lit(t.assistant) + " + " + content + " + " + end + " }}{% endif %}"
        + "{% endfor %}"
        + "{% if add_generation_prompt %}{{ " + lit(t.assistant) + " }}{% endif %}"
    )


def chat_template_for(tokenizer, name: str, image_token: str = IMAGE_PLACEHOLDER) -> str:
    """`chat_template_jinja` for this tokenizer: its BOS written first where training starts with it."""
    return chat_template_jinja(name, image_token, bos=bool(leading_special_ids(tokenizer, get_template(name))))


def leading_special_ids(tokenizer, template: Template) -> list[int]:
    """The ids every sequence starts with: what the tokenizer itself puts in front of any text (its BOS
    when it adds one, as the official code tokenizes with special tokens on), else the BOS the template's
    official preprocessing assumes."""
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    front = full[: full.index(bare[0])] if bare and bare[0] in full else []
    if not front and template.bos and tokenizer.bos_token_id is not None:
        front = [tokenizer.bos_token_id]
    return front


# Each image is rendered as one context token between its markers; its ids are repeated afterwards.
_IMAGE_MARK = IMG_START + IMG_CONTEXT + IMG_END
_IMAGE_N = re.compile(r"Image-(\d+): " + re.escape(IMAGE_PLACEHOLDER))


def expand_placeholders(text: str, n_images: int, n_frames: int = 0) -> str:
    """`<video>` -> `Frame-1: <image>\\nFrame-2: <image>\\n...`; with several images, each bare
    `<image>` gets its `Image-N: ` prefix (rows that already carry the prefixes are left as they are)."""
    if n_frames and VIDEO_PLACEHOLDER in text:
        frames = "".join(f"Frame-{i + 1}: {IMAGE_PLACEHOLDER}\n" for i in range(n_frames))
        text = text.replace(VIDEO_PLACEHOLDER + "\n", frames, 1).replace(VIDEO_PLACEHOLDER, frames, 1)
    if n_images > 1 and not _IMAGE_N.search(text):
        parts = text.split(IMAGE_PLACEHOLDER)
        text = parts[0] + "".join(f"Image-{i}: {IMAGE_PLACEHOLDER}{p}" for i, p in enumerate(parts[1:], start=1))
    return text


@dataclass
class Encoded:
    """Token ids and labels of one conversation, with where each image's span sits."""

    input_ids: list[int]
    labels: list[int]
    image_spans: list[tuple[int, int]]  # [start, end) of each `<img> ... </img>` block, in image order

    def __len__(self) -> int:
        return len(self.input_ids)


class Encoder:
    """Turns conversations into ids/labels for one tokenizer + template.

    The conversation is rendered to one string (each image as `<img><IMG_CONTEXT></img>`) and tokenized
    whole, as the official `chat()`, `apply_chat_template` and vLLM do, so no text is ever tokenized out of
    its context (a sentencepiece tokenizer would add a word-start piece to each separately tokenized span).
    Labels come from the character spans of the answers (tokenizer offsets); the single `<IMG_CONTEXT>`
    of each image is then repeated to the image's token count.
    """

    def __init__(self, tokenizer, template: Template | str, tokens_per_tile: int = 256,
                 system: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.template = get_template(template) if isinstance(template, str) else template
        self.tokens_per_tile = tokens_per_tile
        self.system = resolve_system(self.template, system)
        ids = tokenizer.convert_tokens_to_ids([IMG_START, IMG_END, IMG_CONTEXT])
        unk = tokenizer.unk_token_id
        if any(i is None or (unk is not None and i == unk) for i in ids):
            from adapt.errors import AdaptError

            raise AdaptError("the tokenizer lacks InternVL's image tokens <img>, </img>, <IMG_CONTEXT>",
                             hint="use an InternVL tokenizer, or convert the checkpoint with `adapt convert`")
        self.img_start, self.img_end, self.img_context = ids
        self.leading = leading_special_ids(tokenizer, self.template)
        self.use_offsets = bool(getattr(tokenizer, "is_fast", False))  # slow tokenizers give no offsets

    def ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def render(self, record: Record, tiles_per_image: list[int], *,
               generation: bool = False) -> tuple[str, list[tuple[int, int]]]:
        """The conversation as one string, each image as `<img><IMG_CONTEXT></img>`, and the character
        span of each supervised part (answer + end token)."""
        t = self.template
        convs = list(record["conversations"])
        system = self.system
        if convs and convs[0]["from"] == "system":
            system = convs[0]["value"]
            convs = convs[1:]
        if generation and convs and convs[-1]["from"] == "gpt":
            convs = convs[:-1]
        n_frames = sum(tiles_per_image) if record.get("video") else 0
        n_images = len(tiles_per_image) if not record.get("video") else 0
        text = t.system.format(system=system) + t.end + t.after_end if system is not None else ""
        answers: list[tuple[int, int]] = []
        for turn in convs:
            value = turn["value"].strip() if t.strip_turns else turn["value"]
            if turn["from"] == "human":
                value = expand_placeholders(value, n_images, n_frames).replace(IMAGE_PLACEHOLDER, _IMAGE_MARK)
                text += t.user + value + t.end + t.after_end
            else:
                text += t.assistant
                answers.append((len(text), len(text) + len(value) + len(t.end)))
                text += value + t.end + t.after_end
        if generation:
            text += t.assistant
        return text, answers

    def encode(self, record: Record, tiles_per_image: list[int], *, generation: bool = False) -> Encoded:
        """Ids and labels for a record whose images became `tiles_per_image` tiles each.

        With `generation=True` the last gpt turn (if any) is dropped and the assistant prefix is
        appended: the prompt the model completes at evaluation time, built by the same code.
        """
        text, answers = self.render(record, tiles_per_image, generation=generation)
        return self._assemble(record, tiles_per_image, *self._tokenize(text, answers))

    def encode_many(self, items: list[tuple[Record, list[int]]]) -> list[Encoded]:
        """`encode` of several (record, tiles_per_image) with one batched call of a fast tokenizer, which
        gives each text the ids and offsets a call of its own gives (no padding, no truncation); a slow
        tokenizer encodes them one by one."""
        if not self.use_offsets:
            return [self.encode(record, tiles) for record, tiles in items]
        rendered = [self.render(record, tiles) for record, tiles in items]
        if not rendered:
            return []
        encoded = self._ids_and_offsets([text for text, _ in rendered])
        return [self._assemble(record, tiles, whole, self._labels(whole, offsets, answers))
                for (record, tiles), (_, answers), (whole, offsets) in zip(items, rendered, encoded)]

    def _ids_and_offsets(self, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
        """Ids and character offsets of each text, no special tokens added. The backend's `encode_batch`
        is what transformers calls, after setting the backend's truncation, padding and special-token
        state (its call on the first text does that here); reading its encodings directly skips the
        conversion of each to a dict of every field, a fifth of planning's CPU."""
        first = self.tokenizer(texts[:1], add_special_tokens=False, return_offsets_mapping=True)
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None or backend.truncation is not None or backend.padding is not None:
            batch = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
            return list(zip(batch["input_ids"], batch["offset_mapping"]))
        rest = [(e.ids, e.offsets) for e in backend.encode_batch(texts[1:], add_special_tokens=False)]
        return [(first["input_ids"][0], first["offset_mapping"][0]), *rest]

    def _assemble(self, record: Record, tiles_per_image: list[int], whole: list[int], labels: list[int]) -> Encoded:
        """Ids and labels of the whole text with each image's context token expanded to its tiles.
        Built from slices between the context tokens (list.index and slice copies run in C), not token
        by token: planning a 1M-record pool spends its time here."""
        from adapt.errors import AdaptError

        context = self.img_context
        positions: list[int] = []
        with contextlib.suppress(ValueError):
            while True:
                positions.append(whole.index(context, positions[-1] + 1 if positions else 0))
        if len(positions) != len(tiles_per_image):
            raise AdaptError(f"record {record.get('id')}: {len(positions)} image placeholders "
                             f"for {len(tiles_per_image)} images")
        ids, out_labels = list(self.leading), [IGNORE_INDEX] * len(self.leading)
        spans: list[tuple[int, int]] = []
        previous = 0
        for position, tiles in zip(positions, tiles_per_image):
            ids += whole[previous:position]
            out_labels += labels[previous:position]
            begin = len(ids) - 1  # the `<img>` just before
            ids += [context] * (tiles * self.tokens_per_tile)
            out_labels += [IGNORE_INDEX] * (tiles * self.tokens_per_tile)
            spans.append((begin, len(ids) + 1))  # through the `</img>` that follows
            previous = position + 1
        ids += whole[previous:]
        out_labels += labels[previous:]
        return Encoded(ids, out_labels, spans)

    def _tokenize(self, text: str, answers: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
        """Ids of `text` and their labels: a token is supervised when it ends inside an answer span (so a
        token straddling the start of an answer is learned with it, and offsets trimmed of whitespace
        still land on the right side). Fast tokenizers give character offsets in the same call; for
        others the answer bounds are where the tokenization of the text before them stops matching."""
        if self.use_offsets:
            encoding = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            whole = encoding["input_ids"]
            return whole, self._labels(whole, encoding["offset_mapping"], answers)
        whole = self.ids(text)
        labels = [IGNORE_INDEX] * len(whole)
        for start, stop in answers:
            first, last = self._common_start(text[:start], whole), self._common_start(text[:stop], whole)
            labels[first:last] = whole[first:last]
        return whole, labels

    @staticmethod
    def _labels(whole: list[int], offsets: list[tuple[int, int]], answers: list[tuple[int, int]]) -> list[int]:
        """A token's label is itself when its end lies in an answer span (start < end <= stop). `render`
        makes the spans disjoint and in text order, so the only span that can hold an end is the
        first whose stop is at or after it: one bisection per token instead of a test per span."""
        stops = [stop for _, stop in answers]
        labels = [IGNORE_INDEX] * len(whole)
        for i, (_, end) in enumerate(offsets):
            j = bisect_left(stops, end)
            if j < len(stops) and answers[j][0] < end:
                labels[i] = whole[i]
        return labels

    def _common_start(self, prefix: str, whole: list[int]) -> int:
        """How many leading tokens of `whole` the tokenization of `prefix` shares."""
        n = 0
        for a, b in zip(self.ids(prefix), whole):
            if a != b:
                break
            n += 1
        return n

    def stop_token_ids(self) -> list[int]:
        out = []
        for token in self.template.stop:
            tid = self.tokenizer.convert_tokens_to_ids(token)
            if tid is not None and tid != self.tokenizer.unk_token_id:
                out.append(tid)
        return out
