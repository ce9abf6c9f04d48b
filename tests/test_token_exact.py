"""adapt's training sequences are token for token the tokenization of the whole rendered conversation,
for every InternVL family on tokenizers shaped like the released ones.

The expectations are computed here, independently of adapt's encoder: the conversation is rendered as
the official `conversation.py` templates (MPT separator style) render it, with the official default
system messages and the official per-family whitespace handling (only `preprocess_internlm` strips each
turn), every `<image>` expanded to `<img>` + `<IMG_CONTEXT>` x tokens + `</img>`, and the whole string goes
through the tokenizer in one call. Supervised positions are worked out from the tokenizer's character
offsets: exactly the tokens that end inside an answer or its end token. A second reference is the official
preprocessing itself (`preprocess_mpt`, `preprocess_internlm`, `preprocess_phi3`, `preprocess_internvl2_5`),
re-implemented below from reading it and compared position by position, BOS and end tokens included.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from original_layout import write_internlm2_tokenizer, write_phi3_tokenizer, write_qwen2_tokenizer
from tokenizers import processors

from adapt.data.templates import IGNORE_INDEX, Encoder, chat_template_for

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

def render(family: str, record: dict, tiles: list[int], *, system: str = "default", generation: bool = False):
    """The official MPT-style prompt (system_template + sep, then role + message + sep per turn) with
    images expanded; returns the text and the character span of each answer + its end token.
    `system="none"` (adapt's option, not the official code's) leaves the system block out."""
    spec = OFFICIAL[family]
    turns = list(record["conversations"])
    system = {"default": spec["default"], "none": None}.get(system, system)
    if turns[0]["from"] == "system":
        system, turns = turns[0]["value"], turns[1:]
    if generation:
        turns = turns[:-1]
    text = "" if system is None else spec["system"] + system + spec["sep"]
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


def expected(tokenizer, family: str, record: dict, tiles: list[int], *, system: str = "default",
             generation: bool = False):
    """Ids of the whole string, as the official code tokenizes it (special tokens on), and the label mask."""
    text, answers = render(family, record, tiles, system=system, generation=generation)
    ids = tokenizer(text)["input_ids"]
    bare = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    lead = len(ids) - len(bare["input_ids"])
    assert ids[lead:] == bare["input_ids"]
    if OFFICIAL[family]["bos"] and (lead == 0 or ids[0] != tokenizer.bos_token_id):
        ids, lead = [tokenizer.bos_token_id, *ids], lead + 1  # the family's official code assumes `<s>` first
    mask = [False] * lead + [any(a < end <= b for a, b in answers) for _, end in bare["offset_mapping"]]
    return ids, mask


# ----------------------------------------------------------------------------------------------- tests

@pytest.mark.parametrize("offsets", [True, False], ids=["offsets", "prefixes"])
@pytest.mark.parametrize("system", ["default", "none", "You are a careful driver."])
@pytest.mark.parametrize("record_name", sorted(RECORDS))
@pytest.mark.parametrize(("family", "tokenizer_name"), PAIRS)
def test_ids_are_the_whole_string_and_labels_the_answers(tokenizers, family, tokenizer_name, record_name, system,
                                                         offsets):
    """Both ways of finding the answers (character offsets of fast tokenizers, common prefixes for slow
    ones) on every family, tokenizer, record and system-message choice."""
    tokenizer = tokenizers(tokenizer_name)
    record, tiles = RECORDS[record_name]
    encoder = Encoder(tokenizer, family, tokens_per_tile=TPT, system=None if system == "default" else system)
    encoder.use_offsets = offsets
    out = encoder.encode(record, tiles)
    ids, mask = expected(tokenizer, family, record, tiles, system=system)
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
    prompt = encoder.encode(record, tiles, generation=True)
    assert prompt.input_ids == expected(tokenizer, family, record, tiles, system=system, generation=True)[0]


CHATS = {
    "default-system": _conv(("human", " Say hi. "), ("gpt", " hi "), ("human", "Again, 再见?"), ("gpt", "bye")),
    "own-system": _conv(("system", "You are terse."), ("human", "Say hi."), ("gpt", "hi")),
}


@pytest.mark.parametrize("chat", sorted(CHATS))
@pytest.mark.parametrize(("family", "tokenizer_name"), PAIRS)
def test_exported_chat_template_is_the_training_text(tokenizers, family, tokenizer_name, chat):
    """`apply_chat_template` (which adds no special tokens itself) with the exported template gives the
    training ids: BOS where training has it (Phi-3 included), the official default system message,
    the family's whitespace handling; with `add_generation_prompt` it gives the evaluation prompt."""
    tokenizer = tokenizers(tokenizer_name)
    record = {"id": "c", "conversations": CHATS[chat]}
    roles = {"system": "system", "human": "user", "gpt": "assistant"}
    messages = [{"role": roles[t["from"]], "content": t["value"]} for t in record["conversations"]]
    template = chat_template_for(tokenizer, family)
    encoder = Encoder(tokenizer, family, tokens_per_tile=TPT)
    for generation in (False, True):
        rendered = tokenizer.apply_chat_template(messages[:-1] if generation else messages, chat_template=template,
                                                 tokenize=False, add_generation_prompt=generation)
        ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
        assert ids == encoder.encode(record, [], generation=generation).input_ids
    assert (ids[0] == tokenizer.bos_token_id) == (OFFICIAL[family]["bos"] or tokenizer("a")["input_ids"][0] == tokenizer.bos_token_id)


# ------------------------------------------------- the official preprocessing, re-implemented from reading
# OpenGVLab/InternVL internvl_chat/internvl/train/dataset.py, as internvl_chat_finetune.py routes each template.

def _official_prompt(family: str, record: dict, tiles: list[int]) -> str:
    """`conv.get_prompt()` (MPT style) after `append_message` per turn, then each `<image>` replaced in turn."""
    spec = OFFICIAL[family]
    text = spec["system"] + spec["default"] + spec["sep"]
    for turn in record["conversations"]:
        value = turn["value"].strip() if spec["strip"] else turn["value"]  # only preprocess_internlm strips
        text += (spec["user"] if turn["from"] == "human" else spec["assistant"]) + value + spec["sep"]
    for n in tiles:
        text = text.replace("<image>", "<img>" + "<IMG_CONTEXT>" * (n * TPT) + "</img>", 1)
    return text


def _official_mpt(tok, record, tiles):
    """preprocess_mpt (Hermes-2): whole prompt tokenized; each re-grouped turn re-tokenized to find the answers."""
    spec = OFFICIAL["Hermes-2"]
    conv = _official_prompt("Hermes-2", record, tiles)
    ids = tok(conv)["input_ids"]
    target = list(ids)
    turns = conv.split(spec["sep"])
    regrouped = [spec["sep"].join(turns[:3])] + [spec["sep"].join(turns[i:i + 2]) for i in range(3, len(turns), 2)]
    cur = 0
    for turn in regrouped:
        if turn == "":
            break
        turn_len = len(tok(turn)["input_ids"]) + 1
        parts = turn.split(spec["sep"] + spec["assistant"])
        if len(parts) != 2:
            break
        instruction = len(tok(parts[0] + spec["sep"] + spec["assistant"])["input_ids"])
        target[cur:cur + instruction] = [IGNORE_INDEX] * len(target[cur:cur + instruction])
        cur += turn_len
    target[cur:] = [IGNORE_INDEX] * len(target[cur:])
    return ids, target if cur == len(ids) else [IGNORE_INDEX] * len(ids)  # "tokenization mismatch": zeroed


def _official_internlm(tok, record, tiles):
    """preprocess_internlm (internlm2-chat): turns stripped, `<s>` first, split at the assistant role."""
    spec = OFFICIAL["internlm2-chat"]
    conv = _official_prompt("internlm2-chat", record, tiles)
    ids = tok(conv)["input_ids"]
    target = list(ids)

    def n(text):  # every separate tokenization carries its own `<s>`
        return len(tok(text)["input_ids"]) - 1

    def ignore(start, length):
        target[start:start + length] = [IGNORE_INDEX] * len(target[start:start + length])

    ignore(0, 1)
    parts = conv.split(spec["assistant"])
    cur = 1
    ignore(cur, n(parts[0] + spec["assistant"]))
    cur += n(parts[0] + spec["assistant"])
    for info in parts[1:-1]:
        answer, question = info.split(spec["user"])
        cur += n(answer)
        ignore(cur, n(spec["user"] + question + spec["assistant"]))
        cur += n(spec["user"] + question + spec["assistant"])
    cur += n(parts[-1])
    ignore(cur, len(ids))
    return ids, target if cur == len(ids) else [IGNORE_INDEX] * len(ids)


def _official_internvl2_5(tok, record, tiles):
    """preprocess_internvl2_5: one tokenization per turn; `<s>` kept on the first only (add_bos_token);
    `<|im_start|>assistant\\n` and each turn's final `\\n` unsupervised."""
    spec = OFFICIAL["internvl2_5"]
    images = iter(tiles)
    batches, roles = [spec["system"] + spec["default"] + spec["sep"]], ["system"]
    for turn in record["conversations"]:
        value = turn["value"]
        for _ in range(value.count("<image>")):
            value = value.replace("<image>", "<img>" + "<IMG_CONTEXT>" * (next(images) * TPT) + "</img>", 1)
        batches.append((spec["user"] if turn["from"] == "human" else spec["assistant"]) + value + spec["sep"])
        roles.append(turn["from"])
    add_bos = tok("a")["input_ids"][0] == tok.bos_token_id
    if add_bos:
        batches[0] = tok.bos_token + batches[0]
    pieces = [tok(b)["input_ids"] for b in batches]
    if add_bos:
        pieces = [p[1:] for p in pieces]
    skip = len(tok(spec["assistant"])["input_ids"]) - (1 if add_bos else 0)
    ids, target = [], []
    for role, piece in zip(roles, pieces):
        ids += piece
        if role == "gpt":
            target += [IGNORE_INDEX] * skip + piece[skip:-1] + [IGNORE_INDEX]
        else:
            target += [IGNORE_INDEX] * len(piece)
    return ids, target


OFFICIAL_RECORDS = {name: RECORDS[name] for name in ("image-1-tile", "image-7-tiles", "three-rounds", "two-images")}
OFFICIAL_RECORDS["text"] = ({"id": "t", "conversations": _conv(("human", "Say hi."), ("gpt", "hi"))}, [])
ROUTES = [("Hermes-2", "qwen2-bpe", _official_mpt), ("internlm2-chat", "internlm2-sp", _official_internlm),
          ("internvl2_5", "qwen2-bpe", _official_internvl2_5), ("internvl2_5", "internlm2-sp", _official_internvl2_5)]


@pytest.mark.parametrize("record_name", sorted(OFFICIAL_RECORDS))
@pytest.mark.parametrize(("family", "tokenizer_name", "official"), ROUTES, ids=[f"{f}-{t}" for f, t, _ in ROUTES])
def test_equals_the_official_preprocessing(tokenizers, family, tokenizer_name, official, record_name):
    """Where the official preprocessing is self-consistent on the family's released tokenizer, adapt's ids
    and labels equal it position by position (first token, BOS, last supervised token included)."""
    tokenizer = tokenizers(tokenizer_name)
    record, tiles = OFFICIAL_RECORDS[record_name]
    ids, labels = official(tokenizer, record, tiles)
    assert any(label != IGNORE_INDEX for label in labels), "the official code zeroed this sample"
    out = Encoder(tokenizer, family, tokens_per_tile=TPT).encode(record, tiles)
    assert out.input_ids == ids
    assert out.labels == labels


def _official_phi3(tok, record, tiles):
    """preprocess_phi3 (phi3-chat): whole prompt tokenized (`<s>` first); answers located by re-tokenizing
    re-grouped turns with hand-tuned offsets for the Llama tokenizer's `<s>`."""
    spec = OFFICIAL["phi3-chat"]
    conv = _official_prompt("phi3-chat", record, tiles)
    ids = tok(conv)["input_ids"]
    target = list(ids)
    target[0] = IGNORE_INDEX
    turns = conv.split(spec["sep"])
    regrouped = [spec["sep"].join(turns[:3])] + [spec["sep"].join(turns[i:i + 2]) for i in range(3, len(turns), 2)]
    cur = 1
    for i, turn in enumerate(regrouped):
        if turn == "":
            break
        turn_len = len(tok(turn)["input_ids"]) - (0 if i == 0 else 1)
        parts = turn.split(spec["sep"] + spec["assistant"])
        if len(parts) != 2:
            break
        instruction = len(tok(parts[0] + spec["sep"] + spec["assistant"])["input_ids"]) - (1 if i == 0 else 2)
        target[cur:cur + instruction] = [IGNORE_INDEX] * len(target[cur:cur + instruction])
        cur += turn_len
    target[cur:] = [IGNORE_INDEX] * len(target[cur:])
    return ids, target if cur == len(ids) else [IGNORE_INDEX] * len(ids)


@pytest.mark.parametrize("record_name", sorted(OFFICIAL_RECORDS))
def test_phi3_first_and_last_tokens_are_the_official_ones(tokenizers, record_name):
    """The official Phi-3 input is the whole prompt with `<s>` first and `<|end|>` last; adapt's is the same.
    Its label arithmetic assumes a word-start piece on every separately tokenized turn, so on a tokenizer that
    adds it only at the very start (transformers 5 loads Phi-3's that way) it zeroes multi-round samples
    ("tokenization mismatch"); where it does not, its labels are adapt's."""
    tokenizer = tokenizers("phi3-sp")
    record, tiles = OFFICIAL_RECORDS[record_name]
    ids, labels = _official_phi3(tokenizer, record, tiles)
    out = Encoder(tokenizer, "phi3-chat", tokens_per_tile=TPT).encode(record, tiles)
    assert out.input_ids == ids
    if any(label != IGNORE_INDEX for label in labels):
        assert out.labels == labels
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.convert_tokens_to_ids("<|end|>")
    assert out.labels[0] == IGNORE_INDEX and out.labels[-1] == ids[-1]
    first = out.labels.index(next(label for label in out.labels if label != IGNORE_INDEX))
    assert out.input_ids[first - 1] == tokenizer.convert_tokens_to_ids("<0x0A>")  # right after `<|assistant|>\n`
    assert out.input_ids[first - 2] == tokenizer.convert_tokens_to_ids("<|assistant|>")


@pytest.mark.parametrize(("backbone", "chat", "family"), [
    ("llama", "internvl2_5", "internvl2_5"),  # InternVL2.5-2B-style: InternLM2 (as llama) with `<|im_end|>\n`
    ("llama", "internlm2-chat", "internlm2-chat"),
    ("qwen2", "Hermes-2", "Hermes-2"),
    ("qwen2", "internvl2_5", "internvl2_5"),
    ("qwen2", None, "internvl2_5"),
    ("phi3", "phi3-chat", "phi3-chat"),
])
def test_template_detected_from_the_chat_template_separator(backbone, chat, family):
    """A checkpoint without `config.template` gets the family whose separator its chat template uses: the
    BOS / system message / separator built for training depend on it."""
    from transformers import InternVLConfig

    from adapt.checkpoints.models import detect_template, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = chat_template_for(tokenizer, chat) if chat else None
    config = InternVLConfig(text_config={"model_type": backbone})
    assert detect_template(config, tokenizer) == family
