"""Load an HF-native InternVL (`InternVLForConditionalGeneration`) with its tokenizer and template.

`load("tiny")` and the `mini-internvl2-{1b,2b,4b}` presets need no download: random weights with the
real geometry (448 tiles, patch 14, pixel unshuffle 0.5 -> 256 tokens per tile) and the offline
tokenizer in `adapt/assets/tiny-tokenizer`, which carries the real special tokens. Anything else is
a local directory or hub id in the native layout, located by `adapt.preflight.locate_model` (which
names the cause when it cannot be loaded: offline and not cached, no such hub id, another
architecture, an original OpenGVLab checkpoint that needs `adapt convert`, no tokenizer).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, InternVLConfig, InternVLForConditionalGeneration

from adapt.checkpoints.pickles import pickles_refused
from adapt.data.templates import IMG_CONTEXT, TEMPLATES
from adapt.errors import AdaptError
from adapt.preflight import locate_model

TINY_TOKENIZER = Path(__file__).parents[1] / "assets" / "tiny-tokenizer"

INTERNVIT_300M = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                      attention_bias=True, layer_norm_eps=1e-6, norm_type="layer_norm", use_qk_norm=False,
                      image_size=448, patch_size=14, hidden_act="gelu")

# Text backbones of the Mini-InternVL family, with the shapes of their released configs.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        template="internvl2_5",
        vision=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                    attention_bias=True, image_size=448, patch_size=14),
        text=dict(model_type="qwen2", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32768,
                  rope_theta=1_000_000.0, tie_word_embeddings=True),
    ),
    "mini-internvl2-1b": dict(  # InternVL2-1B: InternViT-300M + Qwen2-0.5B-Instruct
        template="Hermes-2", vision=INTERNVIT_300M,
        text=dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, vocab_size=151655, max_position_embeddings=32768,
                  rope_theta=1_000_000.0, tie_word_embeddings=False),
    ),
    "mini-internvl2-2b": dict(  # InternVL2-2B: InternViT-300M + InternLM2-chat-1.8B (as Llama)
        template="internlm2-chat", vision=INTERNVIT_300M,
        text=dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                  num_attention_heads=16, num_key_value_heads=8, vocab_size=92553, max_position_embeddings=32768,
                  rope_theta=1_000_000.0, rms_norm_eps=1e-5, tie_word_embeddings=False),
    ),
    "mini-internvl2-4b": dict(  # InternVL2-4B: InternViT-300M + Phi-3-mini-128k
        template="phi3-chat", vision=INTERNVIT_300M,
        text=dict(model_type="phi3", hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, vocab_size=32020, max_position_embeddings=131072,
                  rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False),
    ),
}


@dataclass
class Loaded:
    model: InternVLForConditionalGeneration
    tokenizer: Any
    template: str
    source: str  # preset name or path

    @property
    def tokens_per_tile(self) -> int:
        return int(self.model.config.image_seq_length)


def tiny_tokenizer():
    return AutoTokenizer.from_pretrained(TINY_TOKENIZER)


def preset_config(name: str, tokenizer=None) -> InternVLConfig:
    """The InternVLConfig of a preset (random init happens in `load`)."""
    spec = PRESETS[name]
    tokenizer = tokenizer or tiny_tokenizer()
    text = dict(spec["text"])
    text.setdefault("vocab_size", -(-len(tokenizer) // 64) * 64)  # padded like real checkpoints
    text.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    tie = text["tie_word_embeddings"]
    config = InternVLConfig(
        vision_config=dict(spec["vision"], model_type="internvl_vision"), text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(IMG_CONTEXT), image_seq_length=256,
        downsample_ratio=0.5, projector_hidden_act="gelu", vision_feature_layer=-1,
        vision_feature_select_strategy="default", tie_word_embeddings=tie, template=spec["template"],
    )
    check_geometry(config)
    return config


def check_geometry(config: InternVLConfig) -> None:
    """image_seq_length must equal (image/patch)^2 * ratio^2 and the patch grid side be even."""
    image = config.vision_config.image_size[0]
    patch = config.vision_config.patch_size[0]
    side = image // patch
    expected = int(side * side * config.downsample_ratio ** 2)
    if side % 2 or expected != config.image_seq_length:
        raise AdaptError(f"inconsistent vision geometry: {image}px / patch {patch} with downsample "
                         f"{config.downsample_ratio} gives {expected} tokens per tile, config says "
                         f"{config.image_seq_length}", hint="fix image_seq_length in config.json")


def detect_template(config: Any, tokenizer: Any) -> str:
    """The chat template of a checkpoint: `config.template` if present (original and converted
    checkpoints carry it), else from the tokenizer's chat template and the text backbone."""
    name = getattr(config, "template", None)
    if name in TEMPLATES:
        return name
    text_type = getattr(getattr(config, "text_config", None), "model_type", "")
    chat = getattr(tokenizer, "chat_template", None) or ""
    if "<|user|>" in chat or text_type == "phi3":
        return "phi3-chat"
    # the chat template's separator tells the InternLM2-based internvl2_5 models from internlm2-chat ones,
    # and Qwen2-based Hermes-2 ones from internvl2_5 ones (the two differ in system message and separator)
    if "<|im_end|>\\n" in chat or "<|im_end|>\n" in chat:
        return "internvl2_5"
    if text_type in ("internlm2", "llama") and getattr(tokenizer, "bos_token", None) == "<s>":
        return "internlm2-chat"
    if text_type == "qwen2" and "<|im_end|>" not in chat:
        return "internvl2_5"
    return "Hermes-2"


def load(name_or_path: str, *, dtype: torch.dtype | str | None = None, attn_implementation: str | None = "sdpa",
         trust_remote_code: bool = False, seed: int = 0, load_in_4bit: bool = False) -> Loaded:
    """Load a preset (random init, seeded) or a native checkpoint directory / hub id.

    `load_in_4bit` (QLoRA) quantizes the language model's linear layers to NF4 with bitsandbytes;
    the vision tower, projector and LM head stay in `dtype` (they are small and trained or sensitive).
    """
    if load_in_4bit and name_or_path in PRESETS:
        raise AdaptError("QLoRA (4-bit loading) needs a real checkpoint, not a random-init preset",
                         hint="pass --model /path/to/InternVL-hf, or use --mode lora")
    if name_or_path in PRESETS:
        tokenizer = tiny_tokenizer()
        config = preset_config(name_or_path, tokenizer)
        torch.manual_seed(seed)
        model = InternVLForConditionalGeneration(config)
        _sincos_positions(model)
        model.config._attn_implementation = attn_implementation or "sdpa"
        for sub in (model.config.text_config, model.config.vision_config):
            sub._attn_implementation = attn_implementation or "sdpa"
        if dtype is not None:
            model = model.to(torch_dtype(dtype))
        return Loaded(model, tokenizer, PRESETS[name_or_path]["template"], name_or_path)
    # decided once: a folder (or cached snapshot) loads with no network; only a confirmed hub id downloads
    location = locate_model(name_or_path)
    source = str(location.folder) if location.folder is not None else name_or_path
    local = location.folder is not None
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, local_files_only=local)
    except (OSError, ValueError) as err:
        raise AdaptError(f"the tokenizer files of {name_or_path} are there but do not load "
                         f"({str(err).splitlines()[0]})", path=source,
                         hint="they may be damaged or need a newer transformers; copy them again from the base "
                         "model (tokenizer.json, tokenizer_config.json)") from None
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code, "local_files_only": local}
    if dtype is not None:
        kwargs["dtype"] = torch_dtype(dtype)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if load_in_4bit:
        kwargs["quantization_config"] = _nf4_config(dtype)
    try:
        with pickles_refused(source if Path(source).exists() else None):
            model = InternVLForConditionalGeneration.from_pretrained(source, **kwargs)
    except OSError as err:
        raise AdaptError(f"cannot load the model weights of {name_or_path} ({str(err).splitlines()[0]})",
                         path=source, hint="a download that broke off or a damaged file: download it again "
                         "(hf download), or pass another --model folder") from None
    check_geometry(model.config)
    return Loaded(model, tokenizer, detect_template(model.config, tokenizer), source)


def _nf4_config(dtype: torch.dtype | str | None):
    """bitsandbytes NF4 for the LLM only (QLoRA); refuses cleanly where it cannot run."""
    import importlib.util

    if not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None:
        raise AdaptError("QLoRA needs a CUDA GPU and the bitsandbytes package",
                         hint="pip install bitsandbytes on a GPU machine, or use --mode lora")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch_dtype(dtype or "bf16"),
                              llm_int8_skip_modules=["vision_tower", "multi_modal_projector", "lm_head"])


def _sincos_positions(model: InternVLForConditionalGeneration) -> None:
    """Give a random-init vision tower fixed 2D sin-cos position embeddings (MAE-style).

    The native init leaves them at zero, so a fresh preset's image features carry no "where": the
    demo's which-camera question would first have to learn positions from scratch.
    """
    embeddings = model.model.vision_tower.embeddings
    if embeddings.position_embeddings is None:
        return
    dim = embeddings.position_embeddings.shape[-1]
    side = int(round((embeddings.position_embeddings.shape[1] - 1) ** 0.5))
    quarter = dim // 4
    freqs = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter))
    ys, xs = torch.meshgrid(torch.arange(side, dtype=torch.float32), torch.arange(side, dtype=torch.float32),
                            indexing="ij")
    parts = []
    for coord in (ys.flatten(), xs.flatten()):
        angles = coord[:, None] * freqs[None]
        parts += [angles.sin(), angles.cos()]
    table = torch.zeros(side * side + 1, dim)
    table[1:, : 4 * quarter] = torch.cat(parts, dim=1)
    with torch.no_grad():
        embeddings.position_embeddings.copy_(table[None])


def torch_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
             "fp32": torch.float32, "float32": torch.float32}
    if dtype not in table:
        raise AdaptError(f"unknown dtype {dtype!r}", hint="use bf16, fp16 or fp32")
    return table[dtype]


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total
