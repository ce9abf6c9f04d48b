"""Rebuild `adapt/assets/tiny-tokenizer/`: the offline tokenizer of the `tiny` model preset.

A byte-level BPE (Qwen2-style pre-tokenizer, so any text encodes) trained on a small built-in
corpus, carrying the real special tokens of the InternVL families: chatml (`<|im_start|>`,
`<|im_end|>`, `<|endoftext|>`), Phi-3 (`<|system|>`, `<|user|>`, `<|assistant|>`, `<|end|>`),
InternLM2 BOS/EOS (`<s>`, `</s>`) and InternVL's image/grounding tokens. The files are committed;
run `python adapt/assets/build_tiny_tokenizer.py` only to change them.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

OUT = Path(__file__).parent / "tiny-tokenizer"
VOCAB_SIZE = 2048
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>", "</s>", "<unk>",
           "<|system|>", "<|user|>", "<|assistant|>", "<|end|>",
           "<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>"]
# Qwen2's pre-tokenization split (digits one by one, words, punctuation runs, newlines apart).
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")

WORDS = """
the a an of to in on at for with by from and or not is are was be this that these those it its
what which where who how many much there here yes no left right front back top bottom middle
image picture photo camera view scene object objects vehicle vehicles car cars truck bus pedestrian
bicycle motorcycle traffic light sign road lane driving ego moving parked stopped turning ahead behind
please provide bounding box coordinate region sentence describes answer question choose option
following one letter name label class category describe detail short word answer with only
CAM_FRONT CAM_FRONT_LEFT CAM_FRONT_RIGHT CAM_BACK CAM_BACK_LEFT CAM_BACK_RIGHT six views stitched rows
row columns shows sees visible important objects planning prediction perception behavior safe action
medical scan ct mri x-ray xray chest lung liver brain kidney heart abnormal normal organ lesion
modality plane axial coronal sagittal pathology tissue tumor fracture present absent finding
remote sensing satellite aerial airport harbor forest river farmland residential building buildings
ship ships airplane storage tank bridge stadium beach desert mountain meadow parking lot urban rural
red green blue yellow white black gray orange purple color shape square circle triangle small large
frame video clip first last happens happening during
A B C D E F G H 0 1 2 3 4 5 6 7 8 9 . , ? ! : ; ' " ( ) [ ] < > / - _ = + * %
"""


def corpus() -> list[str]:
    words = WORDS.split()
    lines = [" ".join(words[i:i + 12]) for i in range(0, len(words), 12)]
    lines += [w.capitalize() for w in words] + [f" {w}" for w in words] + [f"{w}\n" for w in words]
    lines += [f"[[{a}, {b}, {a + 100}, {b + 50}]]" for a in range(0, 900, 37) for b in range(0, 900, 91)]
    return lines * 3


def build(out: Path = OUT) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE - len(SPECIAL), special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(), trainer=trainer)
    tok.add_special_tokens(SPECIAL)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token="<unk>", model_max_length=32768,
        extra_special_tokens={"image_token": "<IMG_CONTEXT>", "start_image_token": "<img>",
                              "end_image_token": "</img>"},
    )
    from adapt.data.templates import chat_template_jinja

    fast.chat_template = chat_template_jinja("internvl2_5")
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    return fast


if __name__ == "__main__":
    t = build()
    print(f"wrote {OUT} ({len(t)} tokens)")
