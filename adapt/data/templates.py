"""Chat templates of the InternVL families, and the record -> (input_ids, labels) builder.

Token sequences are built segment by segment from token ids: each turn's text is tokenized on its
own and image placeholders become `<img>` + `<IMG_CONTEXT>` x n + `</img>` ids directly. Labels
come from the same spans (assistant reply + its end token), so they can never disagree with the
input the way the official re-tokenize-and-compare preprocessors do ("tokenization mismatch",
silently zeroed samples).

Family templates (OpenGVLab/InternVL `conversation.py`, MPT separator style):
  Hermes-2        (InternVL2-1B, Qwen2)     chatml, `<|im_end|>` separator, no BOS
  internlm2-chat  (InternVL2-2B, InternLM2) chatml, `<|im_end|>` separator, BOS `<s>` first
  phi3-chat       (InternVL2-4B, Phi-3)     `<|user|>\\n ... <|end|>`
  internvl2_5     (InternVL2.5 / 3, -hf)    chatml, `<|im_end|>\\n` separator (the `\\n` unsupervised)
"""

from __future__ import annotations

import re
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
    bos: bool = False  # prepend the tokenizer's BOS
    default_system: str | None = None
    stop: tuple[str, ...] = field(default=())

    def turn(self, role_prefix: str, text: str) -> str:
        return f"{role_prefix}{text}{self.end}{self.after_end}"


TEMPLATES: dict[str, Template] = {
    "Hermes-2": Template("Hermes-2", "<|im_start|>system\n{system}", "<|im_start|>user\n", "<|im_start|>assistant\n",
                         "<|im_end|>", default_system=SYSTEM_MESSAGES["internvl2"], stop=("<|im_end|>", "<|endoftext|>")),
    "internlm2-chat": Template("internlm2-chat", "<|im_start|>system\n{system}", "<|im_start|>user\n",
                               "<|im_start|>assistant\n", "<|im_end|>", bos=True,
                               default_system=SYSTEM_MESSAGES["internvl2"], stop=("<|im_end|>", "</s>")),
    "phi3-chat": Template("phi3-chat", "<|system|>\n{system}", "<|user|>\n", "<|assistant|>\n", "<|end|>",
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
    """`system` may be None/'none' (no system turn), 'default' (the family's official message),
    a key of SYSTEM_MESSAGES, or the user's own text."""
    if system is None or system == "none":
        return None
    if system == "default":
        return template.default_system
    return SYSTEM_MESSAGES.get(system, system)


def chat_template_jinja(name: str, image_token: str = IMAGE_PLACEHOLDER) -> str:
    """A HF `chat_template` rendering exactly what `encode` builds for text turns.

    Image parts of a message render as `image_token` + newline: `<image>` for adapt's own records,
    `<IMG_CONTEXT>` for exports, the placeholder the -hf InternVLProcessor and vLLM expand.
    """
    t = get_template(name)
    esc = lambda s: s.replace("\n", "\\n")  # noqa: E731
    bos = "{{ bos_token }}" if t.bos else ""
    return (
        bos
        + "{% for message in messages %}"
        + "{% if message['content'] is string %}{% set text = message['content'] %}"
        + "{% else %}{% set text = namespace(v='') %}{% for part in message['content'] %}"
        + "{% if part['type'] == 'image' %}{% set text.v = text.v + '" + image_token + "\\n' %}"
        + "{% elif part['type'] == 'text' %}{% set text.v = text.v + part['text'] %}{% endif %}{% endfor %}"
        + "{% set text = text.v %}{% endif %}"
        + f"{{% if message['role'] == 'system' %}}{{{{ '{esc(t.system.split('{system}')[0])}' + text + '{esc(t.end + t.after_end)}' }}}}"
        + f"{{% elif message['role'] == 'user' %}}{{{{ '{esc(t.user)}' + text + '{esc(t.end + t.after_end)}' }}}}"
        + f"{{% else %}}{{{{ '{esc(t.assistant)}' + text + '{esc(t.end + t.after_end)}' }}}}{{% endif %}}"
        + "{% endfor %}"
        + f"{{% if add_generation_prompt %}}{{{{ '{esc(t.assistant)}' }}}}{{% endif %}}"
    )


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
    """Turns conversations into ids/labels for one tokenizer + template (cached special ids)."""

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
        self._cache: dict[str, list[int]] = {}

    def ids(self, text: str) -> list[int]:
        if not text:
            return []
        cached = self._cache.get(text)
        if cached is None:
            cached = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(text) < 64:  # role prefixes and separators repeat in every sample
                self._cache[text] = cached
        return cached

    def _text_with_images(self, text: str, tiles: list[int], cursor: list[int], out: list[int],
                          spans: list[tuple[int, int]]) -> None:
        pieces = text.split(IMAGE_PLACEHOLDER)
        out.extend(self.ids(pieces[0]))
        for piece in pieces[1:]:
            n = tiles[cursor[0]]
            cursor[0] += 1
            start = len(out)
            out.append(self.img_start)
            out.extend([self.img_context] * (n * self.tokens_per_tile))
            out.append(self.img_end)
            spans.append((start, len(out)))
            out.extend(self.ids(piece))

    def encode(self, record: Record, tiles_per_image: list[int], *, generation: bool = False) -> Encoded:
        """Ids and labels for a record whose images became `tiles_per_image` tiles each.

        With `generation=True` the last gpt turn (if any) is dropped and the assistant prefix is
        appended: the prompt the model completes at evaluation time, built by the same code.
        """
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
        ids: list[int] = []
        labels: list[int] = []
        spans: list[tuple[int, int]] = []
        cursor = [0]
        if t.bos and self.tokenizer.bos_token_id is not None:
            ids.append(self.tokenizer.bos_token_id)
        if system is not None:
            ids.extend(self.ids(t.system.format(system=system) + t.end + t.after_end))
        for turn in convs:
            if turn["from"] == "human":
                text = expand_placeholders(turn["value"], n_images, n_frames)
                self._text_with_images(t.user + text, tiles_per_image, cursor, ids, spans)
                ids.extend(self.ids(t.end + t.after_end))
            else:
                labels.extend([IGNORE_INDEX] * (len(ids) - len(labels)))
                ids.extend(self.ids(t.assistant))
                labels.extend([IGNORE_INDEX] * (len(ids) - len(labels)))
                answer = self.ids(turn["value"]) + self.ids(t.end)
                ids.extend(answer)
                labels.extend(answer)
                ids.extend(self.ids(t.after_end))
        if generation:
            ids.extend(self.ids(t.assistant))
        labels.extend([IGNORE_INDEX] * (len(ids) - len(labels)))
        if cursor[0] != len(tiles_per_image):
            from adapt.errors import AdaptError

            raise AdaptError(f"record {record.get('id')}: {cursor[0]} image placeholders for {len(tiles_per_image)} images")
        return Encoded(ids, labels, spans)

    def stop_token_ids(self) -> list[int]:
        out = []
        for token in self.template.stop:
            tid = self.tokenizer.convert_tokens_to_ids(token)
            if tid is not None and tid != self.tokenizer.unk_token_id:
                out.append(tid)
        return out
