"""Token layout and labels for every template, checked against whole-string tokenization.

The reference is the official approach (render the prompt text, replace each `<image>` by
`<img><IMG_CONTEXT>...</img>`, tokenize the whole string); our builder works from spans, so both
must agree token for token, and the supervised tokens must decode to exactly the answers.
"""

from __future__ import annotations

import pytest

from adapt.data.templates import IGNORE_INDEX, TEMPLATES, Encoder, chat_template_jinja, expand_placeholders

TPT = 4  # tokens per tile, small so the sequences stay readable


def _conv(*turns):
    return [{"from": r, "value": v} for r, v in turns]


CASES = {
    "single": ({"id": "s", "image": "a.jpg", "conversations": _conv(("human", "<image>\nWhat is this?"),
                                                                    ("gpt", "A red car."))}, [3]),
    "multi": ({"id": "m", "image": ["a.jpg", "b.jpg"],
               "conversations": _conv(("human", "<image>\n<image>\nSame place?"), ("gpt", "yes"),
                                      ("human", "Which is brighter?"), ("gpt", "The first one."))}, [2, 1]),
    "video": ({"id": "v", "video": "c.mp4", "conversations": _conv(("human", "<video>\nWhat happens?"),
                                                                   ("gpt", "A car turns left."))}, [1, 1, 1]),
    "text": ({"id": "t", "conversations": _conv(("system", "You are terse."), ("human", "Say hi."),
                                                ("gpt", "hi"))}, []),
}


def _reference(tokenizer, template, record, tiles, system):
    """Whole-string rendering as the official preprocessors do, then one tokenizer call."""
    t = TEMPLATES[template]
    convs = record["conversations"]
    if convs[0]["from"] == "system":
        system, convs = convs[0]["value"], convs[1:]
    n_frames = sum(tiles) if record.get("video") else 0
    n_images = 0 if record.get("video") else len(tiles)
    text = tokenizer.bos_token if t.bos else ""
    if system is not None:
        text += t.system.format(system=system) + t.end + t.after_end
    answers = []
    for turn in convs:
        if turn["from"] == "human":
            text += t.user + expand_placeholders(turn["value"], n_images, n_frames) + t.end + t.after_end
        else:
            text += t.assistant + turn["value"] + t.end + t.after_end
            answers.append(turn["value"] + t.end)
    for n in tiles:
        text = text.replace("<image>", "<img>" + "<IMG_CONTEXT>" * (n * TPT) + "</img>", 1)
    return tokenizer(text, add_special_tokens=False)["input_ids"], answers


@pytest.mark.parametrize("template", sorted(TEMPLATES))
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("system", [None, "default"])
def test_ids_and_labels_token_by_token(tiny_tokenizer, template, case, system):
    record, tiles = CASES[case]
    enc = Encoder(tiny_tokenizer, template, tokens_per_tile=TPT, system=system)
    out = enc.encode(record, tiles)
    ref_ids, answers = _reference(tiny_tokenizer, template, record, tiles, enc.system)
    assert out.input_ids == ref_ids
    assert len(out.labels) == len(out.input_ids)
    # supervised tokens are exactly the answers + end token, each as a contiguous run
    runs, current = [], []
    for tok, lab in zip(out.input_ids, out.labels):
        if lab != IGNORE_INDEX:
            assert lab == tok
            current.append(tok)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    assert [tiny_tokenizer.decode(r) for r in runs] == answers
    # one image span per image (or per frame), each with n * TPT context tokens
    context = tiny_tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert [sum(1 for i in out.input_ids[a:b] if i == context) for a, b in out.image_spans] == [n * TPT for n in tiles]


def test_multi_image_and_frame_prefixes():
    assert expand_placeholders("<image>\n<image>\nQ", 2) == "Image-1: <image>\nImage-2: <image>\nQ"
    already = "Image-1: <image>\nImage-2: <image>\nQ"
    assert expand_placeholders(already, 2) == already
    assert expand_placeholders("<video>\nQ", 0, 2) == "Frame-1: <image>\nFrame-2: <image>\nQ"


def test_internlm2_has_bos_and_phi3_markers(tiny_tokenizer):
    record, tiles = CASES["text"]
    ids = Encoder(tiny_tokenizer, "internlm2-chat", TPT).encode(record, tiles).input_ids
    assert ids[0] == tiny_tokenizer.bos_token_id
    phi = tiny_tokenizer.decode(Encoder(tiny_tokenizer, "phi3-chat", TPT).encode(record, tiles).input_ids)
    # the official Phi-3 preprocessing and chat() start with <s> (adapt used to drop it)
    assert phi.startswith("<s><|system|>\nYou are terse.<|end|><|user|>\nSay hi.<|end|><|assistant|>\nhi<|end|>")


def test_internvl2_5_newline_not_supervised(tiny_tokenizer):
    record, tiles = CASES["text"]
    out = Encoder(tiny_tokenizer, "internvl2_5", TPT).encode(record, tiles)
    assert tiny_tokenizer.decode(out.input_ids).endswith("<|im_start|>assistant\nhi<|im_end|>\n")
    assert out.labels[-1] == IGNORE_INDEX and out.labels[-2] != IGNORE_INDEX


def test_generation_prompt_is_training_prefix(tiny_tokenizer):
    record, tiles = CASES["single"]
    enc = Encoder(tiny_tokenizer, "internvl2_5", TPT)
    full = enc.encode(record, tiles)
    prompt = enc.encode(record, tiles, generation=True)
    first_label = next(i for i, v in enumerate(full.labels) if v != IGNORE_INDEX)
    assert prompt.input_ids == full.input_ids[:first_label]


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_exported_chat_template_renders_same_text(tiny_tokenizer, template):
    from jinja2 import Template as Jinja

    record, tiles = CASES["text"]
    out = Encoder(tiny_tokenizer, template, TPT).encode(record, tiles)
    messages = [{"role": {"system": "system", "human": "user", "gpt": "assistant"}[c["from"]], "content": c["value"]}
                for c in record["conversations"]]
    rendered = Jinja(chat_template_jinja(template)).render(messages=messages, bos_token=tiny_tokenizer.bos_token,
                                                           add_generation_prompt=False)
    assert tiny_tokenizer(rendered, add_special_tokens=False)["input_ids"] == out.input_ids
