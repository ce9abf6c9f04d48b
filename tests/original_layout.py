"""Tiny checkpoints in OpenGVLab's original InternVL layout (the remote-code `InternVLChatModel`), for the
conversion tests: real key names and config fields, real geometry (448 px tiles, patch 14, 256 tokens per
tile), tiny widths, random weights, and tokenizers shaped like the released ones.

Backbones (as in the released checkpoints):
  qwen2      InternVL2-1B style: Qwen2ForCausalLM, byte-level BPE tokenizer (vocab.json + merges.txt),
             embedding padded beyond the tokenizer, tied LM head (no lm_head tensor)
  internlm2  InternVL2-2B style: InternLM2ForCausalLM (fused `wqkv`, GQA 4 heads / 2 kv heads), remote-code
             sentencepiece tokenizer (`tokenizer.model` + auto_map), InternViT-6B-style vision (RMSNorm, qk-norm)
  phi3       InternVL2-4B style: Phi3ForCausalLM (fused qkv_proj / gate_up_proj), Llama-style tokenizer,
             LongRoPE ("su") scaling
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

IMAGE_TOKENS = ["<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>"]

VISION_300M = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                   qkv_bias=True, qk_normalization=False, norm_type="layer_norm", layer_norm_eps=1e-6)
VISION_6B = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                 qkv_bias=False, qk_normalization=True, norm_type="rms_norm", layer_norm_eps=1e-6)

# What transformers 4.x `PretrainedConfig.to_dict()` leaves in every released llm_config.
_CONFIG_NOISE = dict(add_cross_attention=False, bad_words_ids=None, begin_suppress_tokens=None, do_sample=False,
                     early_stopping=False, finetuning_task=None, is_decoder=False, length_penalty=1.0,
                     max_length=20, min_length=0, num_beams=1, output_attentions=False, prefix=None,
                     pruned_heads={}, remove_invalid_values=False, repetition_penalty=1.0, return_dict=True,
                     temperature=1.0, tf_legacy_loss=False, tie_encoder_decoder=False, tokenizer_class=None,
                     top_k=50, top_p=1.0, torchscript=False, transformers_version="4.37.2", typical_p=1.0,
                     use_bfloat16=True, torch_dtype="bfloat16")


# ------------------------------------------------------------------------------------------ tokenizers

def sentencepiece_pieces(extra: list[str]) -> tuple[list[str], list[float], list[int]]:
    """A sentencepiece BPE vocabulary: <unk>, <s>, </s>, the 256 byte pieces, merged pieces (score = merge
    priority: higher merges first), single characters, then `extra` user-defined pieces. Returns pieces,
    scores and sentencepiece piece types (1 normal, 2 unknown, 3 control, 4 user defined, 6 byte)."""
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    scores = [0.0] * len(pieces)
    # "ab" comes before "bc" in the vocabulary but scores lower: "abc" must become a + bc
    merged = {"ab": -20.0, "he": 0.0, "ll": -1.0, "llo": -2.0, "hello": -3.0, "▁w": -4.0, "or": -5.0, "▁wor": -6.0,
              "ld": -7.0, "▁world": -8.0, "▁h": -9.0, "▁hello": -10.0, "bc": -11.0}
    chars = list("▁abcdefghijklmnopqrstuvwxyz.,:!?[]0123456789")
    pieces += [*merged, *chars, *extra]
    scores += [*merged.values()] + [-100.0 - i for i in range(len(chars))] + [0.0] * len(extra)
    types += [1] * (len(merged) + len(chars)) + [4] * len(extra)
    return pieces, scores, types


def _added(tokens: dict[int, str]) -> dict[str, dict[str, Any]]:
    return {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                     "special": True} for i, t in sorted(tokens.items())}


def write_internlm2_tokenizer(path: Path) -> dict[str, int]:
    """Like InternVL2-2B's: a sentencepiece `tokenizer.model` (BPE, byte fallback, no dummy prefix), the
    chat tokens as user-defined pieces, InternVL's tokens added after the sentencepiece vocabulary, and a
    tokenizer_config that points at remote code. Returns token -> id."""
    from transformers.convert_slow_tokenizer import import_protobuf

    pieces, scores, types = sentencepiece_pieces(["<|action_start|>", "<|action_end|>", "<|im_end|>", "<|im_start|>"])
    proto = import_protobuf().ModelProto()
    for piece, score, kind in zip(pieces, scores, types):
        entry = proto.pieces.add()
        entry.piece, entry.score, entry.type = piece, score, kind
    proto.trainer_spec.model_type = 2  # BPE
    proto.trainer_spec.byte_fallback = True
    proto.trainer_spec.unk_piece = "<unk>"
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = False
    proto.normalizer_spec.remove_extra_whitespaces = False
    (path / "tokenizer.model").write_bytes(proto.SerializeToString())
    ids = {p: i for i, p in enumerate(pieces)}
    ids.update({t: len(pieces) + i for i, t in enumerate(IMAGE_TOKENS)})
    specials = {ids[t]: t for t in ["<unk>", "<s>", "</s>", "<|action_start|>", "<|action_end|>", "<|im_end|>",
                                    "<|im_start|>", *IMAGE_TOKENS]}
    config = {"added_tokens_decoder": _added(specials), "additional_special_tokens": IMAGE_TOKENS,
              "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None]},
              "bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>", "unk_token": "<unk>",
              "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False,
              "model_max_length": 8192, "tokenizer_class": "InternLM2Tokenizer", "decode_with_prefix_space": False}
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (path / "special_tokens_map.json").write_text(json.dumps(
        {"additional_special_tokens": IMAGE_TOKENS, "bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>",
         "unk_token": "<unk>"}))
    return ids


def write_qwen2_tokenizer(path: Path) -> dict[str, int]:
    """Like InternVL2-1B's: byte-level BPE (vocab.json + merges.txt), the Qwen2 specials and InternVL's
    tokens after the BPE vocabulary. Returns token -> id of every token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    corpus = ["hello world, a tiny corpus for a byte level tokenizer", "the quick brown fox jumps over the lazy dog",
              "Please provide the bounding box coordinate of the region: [[12, 34, 560, 780]]", "你好 世界"] * 3
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=330, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tokenizer.model.save(str(path))
    base = tokenizer.get_vocab_size()
    specials = {base + i: t for i, t in enumerate(["<|endoftext|>", "<|im_start|>", "<|im_end|>", *IMAGE_TOKENS])}
    config = {"added_tokens_decoder": _added(specials), "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
              "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None,
              "errors": "replace", "model_max_length": 8192, "split_special_tokens": False,
              "clean_up_tokenization_spaces": False, "tokenizer_class": "Qwen2Tokenizer"}
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return {**tokenizer.get_vocab(), **{t: i for i, t in specials.items()}}


def write_phi3_tokenizer(path: Path) -> dict[str, int]:
    """Like InternVL2-4B's: a Llama-style sentencepiece BPE (tokenizer.json, dummy prefix, byte fallback), the
    Phi-3 chat tokens and InternVL's tokens after it. Returns token -> id of every token."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
    from transformers.tokenization_utils_base import generate_merges

    pieces, scores, _ = sentencepiece_pieces([])
    vocab = {p: i for i, p in enumerate(pieces)}
    tokenizer = Tokenizer(models.BPE(vocab, generate_merges(vocab, list(zip(pieces, scores))), unk_token="<unk>",
                                     fuse_unk=True, byte_fallback=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    chat = ["<|endoftext|>", "<|assistant|>", "<|end|>", "<|user|>", "<|system|>"]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ["<unk>", "<s>", "</s>"]])
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in chat + IMAGE_TOKENS])
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                             special_tokens=[("<s>", 1)])
    tokenizer.save(str(path / "tokenizer.json"))
    specials = {i: p for i, p in enumerate(["<unk>", "<s>", "</s>"])}
    specials.update({len(pieces) + i: t for i, t in enumerate(chat + IMAGE_TOKENS)})
    config = {"added_tokens_decoder": _added(specials), "bos_token": "<s>", "eos_token": "<|endoftext|>",
              "pad_token": "<|endoftext|>", "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False,
              "legacy": False, "model_max_length": 131072, "clean_up_tokenization_spaces": False,
              "tokenizer_class": "LlamaTokenizer"}
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return tokenizer.get_vocab()


# --------------------------------------------------------------------------------------------- configs

def llm_config(backbone: str, vocab_size: int, ids: dict[str, int], *, tie: bool) -> dict[str, Any]:
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  vocab_size=vocab_size, tie_word_embeddings=tie, use_cache=True, **_CONFIG_NOISE)
    if backbone == "qwen2":
        return dict(common, architectures=["Qwen2ForCausalLM"], model_type="qwen2", _name_or_path="Qwen/Qwen2-0.5B-Instruct",
                    num_key_value_heads=2, hidden_act="silu", max_position_embeddings=32768, rms_norm_eps=1e-6,
                    rope_theta=1000000.0, rope_scaling=None, sliding_window=32768, use_sliding_window=False,
                    max_window_layers=21, attention_dropout=0.0, initializer_range=0.02, bos_token_id=ids["<|endoftext|>"],
                    eos_token_id=ids["<|im_end|>"], attn_implementation="flash_attention_2")
    if backbone == "internlm2":
        return dict(common, architectures=["InternLM2ForCausalLM"], model_type="internlm2",
                    _name_or_path="internlm/internlm2-chat-1_8b", num_key_value_heads=2, hidden_act="silu",
                    max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=1000000, bias=False,
                    rope_scaling={"type": "dynamic", "factor": 2.0}, attn_implementation="eager",
                    initializer_range=0.02, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                    auto_map={"AutoConfig": "configuration_internlm2.InternLM2Config",
                              "AutoModel": "modeling_internlm2.InternLM2ForCausalLM"})
    if backbone == "phi3":
        head_dim = 64 // 4
        return dict(common, architectures=["Phi3ForCausalLM"], model_type="phi3",
                    _name_or_path="microsoft/Phi-3-mini-128k-instruct", num_key_value_heads=4, hidden_act="silu",
                    max_position_embeddings=131072, original_max_position_embeddings=4096, rms_norm_eps=1e-5,
                    rope_theta=10000.0, sliding_window=262144, embd_pdrop=0.0, resid_pdrop=0.0,
                    attention_dropout=0.0, initializer_range=0.02, bos_token_id=1, eos_token_id=ids["<|endoftext|>"],
                    pad_token_id=ids["<|endoftext|>"], rope_scaling={"type": "su", "short_factor": [1.0 + 0.1 * i for i in range(head_dim // 2)],
                                                      "long_factor": [2.0 + 0.5 * i for i in range(head_dim // 2)]})
    raise ValueError(backbone)


def original_config(backbone: str, vision: dict[str, Any], llm: dict[str, Any], *, template: str,
                    ps_version: str | None = "v2", select_layer: int = -1, vision_image_size: int = 448,
                    force_image_size: int = 448) -> dict[str, Any]:
    vision_config = dict(vision, architectures=["InternVisionModel"], model_type="intern_vit_6b", num_channels=3,
                         patch_size=14, image_size=vision_image_size, hidden_act="gelu", dropout=0.0,
                         drop_path_rate=0.1, attention_dropout=0.0, initializer_range=0.02, initializer_factor=0.1,
                         use_flash_attn=True, **{k: v for k, v in _CONFIG_NOISE.items() if k != "torch_dtype"})
    config = {"_commit_hash": None, "architectures": ["InternVLChatModel"],
              "auto_map": {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
                           "AutoModel": "modeling_internvl_chat.InternVLChatModel"},
              "model_type": "internvl_chat", "downsample_ratio": 0.5, "dynamic_image_size": True,
              "force_image_size": force_image_size, "max_dynamic_patch": 12, "min_dynamic_patch": 1,
              "pad2square": False, "select_layer": select_layer, "template": template, "torch_dtype": "bfloat16",
              "use_backbone_lora": 0, "use_llm_lora": 0, "use_thumbnail": True, "vision_config": vision_config,
              "llm_config": llm, "transformers_version": None}
    if ps_version is not None:
        config["ps_version"] = ps_version
    return config


# --------------------------------------------------------------------------------------------- weights

def original_state_dict(backbone: str, vision: dict[str, Any], llm: dict[str, Any], *, vision_image_size: int = 448,
                        seed: int = 0) -> dict[str, torch.Tensor]:
    """Random float32 weights under the original key names (what `InternVLChatModel.state_dict()` holds)."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 0.2, offset: float = 0.0) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * scale + offset

    sd: dict[str, torch.Tensor] = {}
    c, inter, patch = vision["hidden_size"], vision["intermediate_size"], 14
    grid = vision_image_size // patch
    sd["vision_model.embeddings.class_embedding"] = rand(1, 1, c)
    sd["vision_model.embeddings.patch_embedding.weight"] = rand(c, 3, patch, patch, scale=0.05)
    sd["vision_model.embeddings.patch_embedding.bias"] = rand(c)
    sd["vision_model.embeddings.position_embedding"] = rand(1, grid * grid + 1, c)
    layer_norm = vision["norm_type"] == "layer_norm"
    for i in range(vision["num_hidden_layers"]):
        p = f"vision_model.encoder.layers.{i}."
        sd[p + "attn.qkv.weight"] = rand(3 * c, c)
        if vision["qkv_bias"]:
            sd[p + "attn.qkv.bias"] = rand(3 * c)
        if vision["qk_normalization"]:
            sd[p + "attn.q_norm.weight"] = rand(c, offset=1.0)
            sd[p + "attn.k_norm.weight"] = rand(c, offset=1.0)
        sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"] = rand(c, c), rand(c)
        sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"] = rand(inter, c), rand(inter)
        sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"] = rand(c, inter), rand(c)
        for norm in ("norm1", "norm2"):
            sd[p + f"{norm}.weight"] = rand(c, offset=1.0)
            if layer_norm:
                sd[p + f"{norm}.bias"] = rand(c)
        sd[p + "ls1"], sd[p + "ls2"] = rand(c, offset=0.5), rand(c, offset=0.5)
    h, v, lm_inter = llm["hidden_size"], llm["vocab_size"], llm["intermediate_size"]
    heads, kv = llm["num_attention_heads"], llm["num_key_value_heads"]
    d = h // heads
    sd["mlp1.0.weight"], sd["mlp1.0.bias"] = rand(4 * c, offset=1.0), rand(4 * c)
    sd["mlp1.1.weight"], sd["mlp1.1.bias"] = rand(h, 4 * c), rand(h)
    sd["mlp1.3.weight"], sd["mlp1.3.bias"] = rand(h, h), rand(h)
    m = "language_model.model."
    if backbone == "internlm2":
        sd[m + "tok_embeddings.weight"] = rand(v, h)
        for i in range(llm["num_hidden_layers"]):
            p = f"{m}layers.{i}."
            sd[p + "attention.wqkv.weight"] = rand((heads + 2 * kv) * d, h)
            sd[p + "attention.wo.weight"] = rand(h, heads * d)
            sd[p + "feed_forward.w1.weight"] = rand(lm_inter, h)
            sd[p + "feed_forward.w3.weight"] = rand(lm_inter, h)
            sd[p + "feed_forward.w2.weight"] = rand(h, lm_inter)
            sd[p + "attention_norm.weight"], sd[p + "ffn_norm.weight"] = rand(h, offset=1.0), rand(h, offset=1.0)
        sd[m + "norm.weight"] = rand(h, offset=1.0)
        sd["language_model.output.weight"] = rand(v, h)
        return sd
    sd[m + "embed_tokens.weight"] = rand(v, h)
    for i in range(llm["num_hidden_layers"]):
        p = f"{m}layers.{i}."
        if backbone == "qwen2":
            sd[p + "self_attn.q_proj.weight"], sd[p + "self_attn.q_proj.bias"] = rand(heads * d, h), rand(heads * d)
            sd[p + "self_attn.k_proj.weight"], sd[p + "self_attn.k_proj.bias"] = rand(kv * d, h), rand(kv * d)
            sd[p + "self_attn.v_proj.weight"], sd[p + "self_attn.v_proj.bias"] = rand(kv * d, h), rand(kv * d)
            sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"] = rand(lm_inter, h), rand(lm_inter, h)
        else:  # phi3
            sd[p + "self_attn.qkv_proj.weight"] = rand((heads + 2 * kv) * d, h)
            sd[p + "mlp.gate_up_proj.weight"] = rand(2 * lm_inter, h)
        sd[p + "self_attn.o_proj.weight"] = rand(h, heads * d)
        sd[p + "mlp.down_proj.weight"] = rand(h, lm_inter)
        sd[p + "input_layernorm.weight"] = rand(h, offset=1.0)
        sd[p + "post_attention_layernorm.weight"] = rand(h, offset=1.0)
    sd[m + "norm.weight"] = rand(h, offset=1.0)
    if not llm["tie_word_embeddings"]:
        sd["language_model.lm_head.weight"] = rand(v, h)
    return sd


def write_weights(path: Path, state: dict[str, torch.Tensor], *, fmt: str = "safetensors", shards: int = 1) -> None:
    """Save like `save_pretrained` did: one file, or `shards` files plus an index (`.bin` via torch.save)."""
    from safetensors.torch import save_file

    keys = list(state)
    ext, stem = ("safetensors", "model") if fmt == "safetensors" else ("bin", "pytorch_model")
    names = [f"{stem}.{ext}"] if shards == 1 else [f"{stem}-{i + 1:05d}-of-{shards:05d}.{ext}" for i in range(shards)]
    weight_map = {}
    for i, name in enumerate(names):
        part = {k: state[k].contiguous() for k in keys[i::shards]}
        weight_map.update(dict.fromkeys(part, name))
        if fmt == "safetensors":
            save_file(part, str(path / name), metadata={"format": "pt"})
        else:
            torch.save(part, path / name)
    if shards > 1:
        (path / f"{stem}.{ext}.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


TEMPLATES = {"qwen2": "Hermes-2", "internlm2": "internlm2-chat", "phi3": "phi3-chat"}


def write_original_checkpoint(path: Path, backbone: str, *, vision: dict[str, Any] | None = None, fmt: str = "safetensors",
                              shards: int = 1, ps_version: str | None = "v2", select_layer: int = -1,
                              vision_image_size: int = 448, vocab_delta: int = 0,
                              extra_tensors: dict[str, torch.Tensor] | None = None, seed: int = 0) -> dict[str, Any]:
    """Write a complete original-layout checkpoint folder; returns its config dict and state dict.

    `vocab_delta` changes the embedding rows relative to the released convention (negative: fewer rows
    than token ids)."""
    path.mkdir(parents=True, exist_ok=True)
    vision = vision or VISION_300M
    writer = {"internlm2": write_internlm2_tokenizer, "qwen2": write_qwen2_tokenizer, "phi3": write_phi3_tokenizer}
    ids = writer[backbone](path)
    vocab, tie = len(ids), backbone == "qwen2"  # InternVL resized InternLM2 / Phi-3 embeddings to len(tokenizer)
    if backbone == "qwen2":
        vocab = -(-vocab // 64) * 64  # padded, like Qwen2's 151936 rows for 151655 token ids
    llm = llm_config(backbone, vocab + vocab_delta, ids, tie=tie)
    config = original_config(backbone, vision, llm, template=TEMPLATES[backbone], ps_version=ps_version,
                             select_layer=select_layer, vision_image_size=vision_image_size)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    state = original_state_dict(backbone, vision, llm, vision_image_size=vision_image_size, seed=seed)
    state.update(extra_tensors or {})
    write_weights(path, state, fmt=fmt, shards=shards)
    return {"config": config, "state": state, "ids": ids}
