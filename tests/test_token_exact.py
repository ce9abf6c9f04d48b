"""adapt's training sequences are token for token the tokenization of the whole rendered conversation,
for every InternVL family on tokenizers shaped like the released ones.

The expectations are computed here, independently of adapt's encoder: the conversation is rendered as
the official `conversation.py` templates (MPT separator style) render it, with the official default
system messages and the official per-family whitespace handling (only `preprocess_internlm` strips each
turn), every `<image>` expanded to `<img>` + `<IMG_CONTEXT>` x tokens + `</img>`, and the whole string goes
through the tokenizer in one call. Supervised positions are worked out from the tokenizer's character
offsets: exactly the tokens that end inside an answer or its end token.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from original_layout import write_internlm2_tokenizer, write_phi3_tokenizer, write_qwen2_tokenizer
from tokenizers import processors

from adapt.data.templates import IGNORE_INDEX, Encoder, chat_template_jinja

TPT = 4  # tokens per tile, small so the sequences stay readable

# OpenGVLab/InternVL internvl_chat/internvl/conversation.py: system_template, roles, sep, system_message.
INTERNVL2_SYSTEM = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
INTERNVL2_5_SYSTEM = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
CHATML = dict(system="<|im_start|>system\n", user="<|im_start|>user\n", assistant="<|im_start|>assistant\n")
OFFICIAL = {
    # preprocess_mpt: the whole prompt tokenized with special tokens on (Qwen2 adds no BOS)
    "Hermes-2": dict(CHATML, sep="<|im_end|>", default=INTERNVL2_SYSTEM, strip=False, bos=False),
    # preprocess_internlm: every turn .strip()ped, `<s>` at position 0 (`target[:1]`, "<s>")
    "internlm2-chat": dict(CHATML, sep="<|im_end|>", default=INTERNVL2_SYSTEM, strip=True, bos=True),
    # preprocess_phi3: `cur_len = 1` skips the `<s>` the Phi-3 tokenizer puts first
    "phi3-chat": dict(system="<|system|>\n", user="<|user|>\n", assistant="<|assistant|>\n", sep="<|end|>",
                      default=INTERNVL2_SYSTEM, strip=False, bos=True),
    # preprocess_internvl2_5: `<|im_end|>\n` closes each turn, its `\n` unsupervised; `<s>` where add_bos_token
    "internvl2_5": dict(CHATML, sep="<|im_end|>\n", default=INTERNVL2_5_SYSTEM, strip=False, bos=False),
}
END = {"Hermes-2": "<|im_end|>", "internlm2-chat": "<|im_end|>", "phi3-chat": "<|end|>", "internvl2_5": "<|im_end|>"}


def _conv(*turns):
    return [{"from": r, "value": v} for r, v in turns]


RECORDS = {
    "image-1-tile": ({"id": "a", "image": "a.jpg", "conversations": _conv(
        ("human", " <image>\nWhat is this? "), ("gpt", " A red car. "))}, [1]),
    "image-7-tiles": ({"id": "b", "image": "b.jpg", "conversations": _conv(
        ("human", "<image>\nDescribe the scene."), ("gpt", "Two cars, 一辆红色的车, and a bus.\n"))}, [7]),
    "three-rounds": ({"id": "c", "image": "c.jpg", "conversations": _conv(
        ("human", "<image>\nWhat colour is the light?"), ("gpt", " Green.\n"), ("human", "Can we go?"),
        ("gpt", "Yes"), ("human", "Wie heißt die Straße?"), ("gpt", "交通灯是绿色的。"))}, [2]),
    "text-own-system": ({"id": "d", "conversations": _conv(
        ("system", "You are terse."), ("human", "Say hi."), ("gpt", "hi"))}, []),
    "two-images": ({"id": "e", "image": ["e1.jpg", "e2.jpg"], "conversations": _conv(
        ("human", "Image-1: <image>\nImage-2: <image>\nSame place?"), ("gpt", "No: différent  "))}, [3, 1]),
    "video": ({"id": "f", "video": "f.mp4", "conversations": _conv(
        ("human", "<video>\nWhat happens?"), ("gpt", "A car turns left."))}, [1, 1]),
}


# ------------------------------------------------------------------------------------------ tokenizers

def _set_bos(tokenizer, bos: bool):
    """Make the tokenizer put its BOS first (as Llama / InternLM2 / Phi-3 ones do) or not (as Qwen2 does)."""
    single = "<s> $A" if bos else "$A"
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=single, pair=f"{single} $B:1", special_tokens=[("<s>", tokenizer.convert_tokens_to_ids("<s>"))])
    return tokenizer


def _tiny(bos: bool):
    """adapt's own tiny tokenizer: Qwen2-style byte-level BPE with every family's chat tokens."""
    from adapt.checkpoints.models import tiny_tokenizer

    return _set_bos(tiny_tokenizer(), bos)


def _qwen2(path: Path):
    from transformers import AutoTokenizer

    write_qwen2_tokenizer(path)
    return AutoTokenizer.from_pretrained(path)


def _internlm2(path: Path, bos: bool):
    """InternLM2's sentencepiece BPE (no dummy prefix, byte fallback), as a fast tokenizer the way
    `adapt convert` and InternLM's own converter build it."""
    from adapt.checkpoints.convert import _internlm2_tokenizer

    write_internlm2_tokenizer(path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    return _internlm2_tokenizer(path, dict(config, add_bos_token=bos))


def _phi3(path: Path, bos: bool):
    """Phi-3's Llama-style sentencepiece tokenizer (word-start `▁` on the first piece, byte fallback)."""
    from transformers import AutoTokenizer

    write_phi3_tokenizer(path)
    return _set_bos(AutoTokenizer.from_pretrained(path), bos)


TOKENIZERS = {
    "bpe": lambda p: _tiny(False), "bpe+bos": lambda p: _tiny(True), "qwen2-bpe": _qwen2,
    "internlm2-sp": lambda p: _internlm2(p, True), "internlm2-sp-nobos": lambda p: _internlm2(p, False),
    "phi3-sp": lambda p: _phi3(p, True), "phi3-sp-nobos": lambda p: _phi3(p, False),
}
# every family on the tokenizers it ships with, plus both BOS variants of each tokenizer type
PAIRS = [("Hermes-2", "bpe"), ("Hermes-2", "bpe+bos"), ("Hermes-2", "qwen2-bpe"),
         ("internlm2-chat", "bpe"), ("internlm2-chat", "internlm2-sp"), ("internlm2-chat", "internlm2-sp-nobos"),
         ("phi3-chat", "bpe"), ("phi3-chat", "bpe+bos"), ("phi3-chat", "phi3-sp"), ("phi3-chat", "phi3-sp-nobos"),
         ("internvl2_5", "bpe"), ("internvl2_5", "bpe+bos"), ("internvl2_5", "qwen2-bpe"),
         ("internvl2_5", "internlm2-sp"), ("internvl2_5", "internlm2-sp-nobos")]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = TOKENIZERS[name](tmp_path_factory.mktemp(name.replace("+", "-")))
        return cache[name]

    return get


# ------------------------------------------------------------------------------ independent reference

def render(family: str, record: dict, tiles: list[int], *, generation: bool = False):
    """The official MPT-style prompt (system_template + sep, then role + message + sep per turn) with
    images expanded; returns the text and the character span of each answer + its end token."""
    spec = OFFICIAL[family]
    turns = list(record["conversations"])
    system = spec["default"]
    if turns[0]["from"] == "system":
        system, turns = turns[0]["value"], turns[1:]
    if generation:
        turns = turns[:-1]
    text = spec["system"] + system + spec["sep"]
    answers = []
    for turn in turns:
        value = turn["value"].strip() if spec["strip"] else turn["value"]
        if turn["from"] == "human":
            value = value.replace("<video>\n", "".join(f"Frame-{i + 1}: <image>\n" for i in range(len(tiles))))
            text += spec["user"] + value + spec["sep"]
        else:
            text += spec["assistant"]
            answers.append((len(text), len(text) + len(value) + len(END[family])))
            text += value + spec["sep"]
    if generation:
        text += spec["assistant"]
    for n in tiles:  # one `<image>` per image (or frame), in order, as the official code replaces them
        head, _, tail = text.partition("<image>")
        block = "<img>" + "<IMG_CONTEXT>" * (n * TPT) + "</img>"
        shift = len(block) - len("<image>")
        answers = [(a + shift, b + shift) if a >= len(head) else (a, b) for a, b in answers]
        text = head + block + tail
    return text, answers


def expected(tokenizer, family: str, record: dict, tiles: list[int], *, generation: bool = False):
    """Ids of the whole string, as the official code tokenizes it (special tokens on), and the label mask."""
    text, answers = render(family, record, tiles, generation=generation)
    ids = tokenizer(text)["input_ids"]
    bare = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    lead = len(ids) - len(bare["input_ids"])
    assert ids[lead:] == bare["input_ids"]
    if OFFICIAL[family]["bos"] and (lead == 0 or ids[0] != tokenizer.bos_token_id):
        ids, lead = [tokenizer.bos_token_id, *ids], lead + 1  # the family's official code assumes `<s>` first
    mask = [False] * lead + [any(a < end <= b for a, b in answers) for _, end in bare["offset_mapping"]]
    return ids, mask


# ----------------------------------------------------------------------------------------------- tests

@pytest.mark.parametrize("record_name", sorted(RECORDS))
@pytest.mark.parametrize(("family", "tokenizer_name"), PAIRS)
def test_ids_are_the_whole_string_and_labels_the_answers(tokenizers, family, tokenizer_name, record_name):
    tokenizer = tokenizers(tokenizer_name)
    record, tiles = RECORDS[record_name]
    out = Encoder(tokenizer, family, tokens_per_tile=TPT).encode(record, tiles)
    ids, mask = expected(tokenizer, family, record, tiles)
    assert out.input_ids == ids
    assert [label != IGNORE_INDEX for label in out.labels] == mask
    assert all(label in (IGNORE_INDEX, token) for label, token in zip(out.labels, out.input_ids))
    # each supervised run closes with the end token; what follows it is not supervised
    end_id = tokenizer.convert_tokens_to_ids(END[family])
    runs_end = [i for i in range(len(mask)) if mask[i] and (i + 1 == len(mask) or not mask[i + 1])]
    assert [out.input_ids[i] for i in runs_end] == [end_id] * sum(t["from"] == "gpt" for t in record["conversations"])
    context = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert [out.input_ids[a:b].count(context) for a, b in out.image_spans] == [n * TPT for n in tiles]
    assert all(out.input_ids[a] == tokenizer.convert_tokens_to_ids("<img>") and
               out.input_ids[b - 1] == tokenizer.convert_tokens_to_ids("</img>") for a, b in out.image_spans)
    prompt = Encoder(tokenizer, family, tokens_per_tile=TPT).encode(record, tiles, generation=True)
    assert prompt.input_ids == expected(tokenizer, family, record, tiles, generation=True)[0]
