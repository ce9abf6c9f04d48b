"""Original OpenGVLab InternVL checkpoints -> HF-native InternVL (`adapt.checkpoints.convert`).

The references below recompute the original model from the original tensors, written from the
original code's semantics (InternViT `_naive_attn`, `pixel_shuffle` v2, `mlp1`, InternLM2's grouped
`wqkv` attention, Phi-3's fused qkv / gate_up and LongRoPE), not from the converter.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from original_layout import VISION_6B, write_original_checkpoint  # tests/original_layout.py
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoTokenizer, InternVLForConditionalGeneration

import adapt.checkpoints.convert as convert_module
from adapt.checkpoints.convert import convert_checkpoint
from adapt.errors import AdaptError

BACKBONES = ["qwen2", "internlm2", "phi3"]
SETUPS = {
    "qwen2": dict(shards=2),  # sharded safetensors with an index, tied LM head, padded embedding
    # InternViT-6B style vision (RMSNorm + qk-norm, no qkv bias), position grid for 224 px with
    # force_image_size 448 (resampled like the original does every forward), features from layer -2
    "internlm2": dict(vision=VISION_6B, vision_image_size=224, select_layer=-2),
    "phi3": dict(fmt="bin", shards=2),  # sharded .bin with an index (torch.load weights_only)
}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Each backbone written in the original layout and converted once."""
    root = tmp_path_factory.mktemp("convert")
    out = {}
    for backbone in BACKBONES:
        info = write_original_checkpoint(root / backbone, backbone, **SETUPS[backbone])
        dst = convert_checkpoint(root / backbone, root / f"{backbone}-hf")
        out[backbone] = dict(info, src=root / backbone, dst=dst)
    return out


@pytest.fixture(scope="module")
def models(converted):
    loaded = {}
    for backbone, info in converted.items():
        model, loading = InternVLForConditionalGeneration.from_pretrained(info["dst"], output_loading_info=True)
        loaded[backbone] = (model.eval(), loading)
    return loaded


# ----------------------------------------------------------------------------------- references

def rms(x, weight, eps):
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def ref_vit_layer(sd, prefix, vision, x):
    """InternVisionEncoderLayer: x + attn(norm1(x)) * ls1; x + mlp(norm2(x)) * ls2; attention as in
    `_naive_attn` (qkv -> (3, heads, head_dim), qk-norm over all heads, softmax(q*scale @ k^T) v)."""
    b, n, c = x.shape
    heads, eps = vision["num_attention_heads"], vision["layer_norm_eps"]

    def norm(t, name):
        if vision["norm_type"] == "layer_norm":
            return F.layer_norm(t, (c,), sd[f"{prefix}{name}.weight"], sd[f"{prefix}{name}.bias"], eps)
        return rms(t, sd[f"{prefix}{name}.weight"], eps)

    qkv = F.linear(norm(x, "norm1"), sd[prefix + "attn.qkv.weight"], sd.get(prefix + "attn.qkv.bias"))
    q, k, v = qkv.reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    if vision["qk_normalization"]:
        q = rms(q.transpose(1, 2).flatten(-2), sd[prefix + "attn.q_norm.weight"], eps).view(b, n, heads, -1).transpose(1, 2)
        k = rms(k.transpose(1, 2).flatten(-2), sd[prefix + "attn.k_norm.weight"], eps).view(b, n, heads, -1).transpose(1, 2)
    attn = ((q * (c // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
    out = F.linear((attn @ v).transpose(1, 2).reshape(b, n, c), sd[prefix + "attn.proj.weight"], sd[prefix + "attn.proj.bias"])
    x = x + out * sd[prefix + "ls1"]
    hidden = F.gelu(F.linear(norm(x, "norm2"), sd[prefix + "mlp.fc1.weight"], sd[prefix + "mlp.fc1.bias"]))
    return x + F.linear(hidden, sd[prefix + "mlp.fc2.weight"], sd[prefix + "mlp.fc2.bias"]) * sd[prefix + "ls2"]


def ref_mlp1(sd, x):
    x = F.layer_norm(x, (x.shape[-1],), sd["mlp1.0.weight"], sd["mlp1.0.bias"])  # nn.LayerNorm, eps 1e-5
    return F.linear(F.gelu(F.linear(x, sd["mlp1.1.weight"], sd["mlp1.1.bias"])), sd["mlp1.3.weight"], sd["mlp1.3.bias"])


def ref_unshuffle(grid):
    """pixel_shuffle v2 on a (B, H, W, C) grid, worked out from the original's views and permutes: token
    (i, j), row-major, carries [x[2i, 2j], x[2i, 2j+1], x[2i+1, 2j], x[2i+1, 2j+1]]."""
    b, h, w, c = grid.shape
    return grid.reshape(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h * w // 4, 4 * c)


def ref_image_features(sd, config, pixel_values):
    """extract_feature: InternViT (position embedding interpolated bicubic in float32 to the patch grid),
    hidden_states[select_layer] without CLS, pixel shuffle v2, mlp1."""
    vision = config["vision_config"]
    x = F.conv2d(pixel_values, sd["vision_model.embeddings.patch_embedding.weight"],
                 sd["vision_model.embeddings.patch_embedding.bias"], stride=vision["patch_size"])
    b, c, g, _ = x.shape
    x = torch.cat([sd["vision_model.embeddings.class_embedding"].expand(b, 1, c), x.flatten(2).transpose(1, 2)], 1)
    pos = sd["vision_model.embeddings.position_embedding"]
    side = math.isqrt(pos.shape[1] - 1)
    grid_pos = F.interpolate(pos[:, 1:].float().reshape(1, side, side, c).permute(0, 3, 1, 2), size=(g, g),
                             mode="bicubic", align_corners=False)
    x = x + torch.cat([pos[:, :1], grid_pos.reshape(1, c, g * g).permute(0, 2, 1)], 1)
    states = [x]
    for i in range(vision["num_hidden_layers"]):
        states.append(ref_vit_layer(sd, f"vision_model.encoder.layers.{i}.", vision, states[-1]))
    features = states[config["select_layer"]][:, 1:]
    return ref_mlp1(sd, ref_unshuffle(features.reshape(b, g, g, c)))


def ref_rope(backbone, llm, positions):
    d = llm["hidden_size"] // llm["num_attention_heads"]
    inv_freq = 1.0 / (llm["rope_theta"] ** (torch.arange(0, d, 2).float() / d))
    scale = 1.0
    if backbone == "phi3":  # Phi3SuScaledRotaryEmbedding: short factors below the original length
        inv_freq = inv_freq / torch.tensor(llm["rope_scaling"]["short_factor"])
        ratio = llm["max_position_embeddings"] / llm["original_max_position_embeddings"]
        scale = math.sqrt(1 + math.log(ratio) / math.log(llm["original_max_position_embeddings"]))
    angles = positions[:, None].float() * inv_freq[None]
    emb = torch.cat([angles, angles], -1)
    return emb.cos() * scale, emb.sin() * scale


def rotate(x, cos, sin):  # rotate_half RoPE on (B, T, heads, d)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos[None, :, None] + rotated * sin[None, :, None]


def ref_attention(backbone, sd, prefix, llm, h):
    """Causal GQA attention of one original decoder layer, from its original projections."""
    b, t, hidden = h.shape
    heads, kv = llm["num_attention_heads"], llm["num_key_value_heads"]
    d, groups = hidden // heads, heads // kv
    if backbone == "internlm2":  # 'b q (h gs d) -> b q h gs d', gs = groups + 2: queries, key, value per kv head
        qkv = F.linear(h, sd[prefix + "attention.wqkv.weight"]).reshape(b, t, kv, groups + 2, d)
        q, k, v = qkv[:, :, :, :groups].reshape(b, t, heads, d), qkv[:, :, :, -2], qkv[:, :, :, -1]
        out_weight = sd[prefix + "attention.wo.weight"]
    elif backbone == "phi3":  # qkv_proj rows: [q (heads*d) | k (kv*d) | v (kv*d)]
        qkv = F.linear(h, sd[prefix + "self_attn.qkv_proj.weight"])
        q, k, v = qkv.split([heads * d, kv * d, kv * d], -1)
        q, k, v = q.view(b, t, heads, d), k.view(b, t, kv, d), v.view(b, t, kv, d)
        out_weight = sd[prefix + "self_attn.o_proj.weight"]
    else:
        q, k, v = (F.linear(h, sd[f"{prefix}self_attn.{p}_proj.weight"], sd[f"{prefix}self_attn.{p}_proj.bias"])
                   for p in "qkv")
        q, k, v = q.view(b, t, heads, d), k.view(b, t, kv, d), v.view(b, t, kv, d)
        out_weight = sd[prefix + "self_attn.o_proj.weight"]
    cos, sin = ref_rope(backbone, llm, torch.arange(t))
    q, k = rotate(q, cos, sin), rotate(k, cos, sin)
    k, v = k.repeat_interleave(groups, 2), v.repeat_interleave(groups, 2)  # query head i uses kv head i // groups
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d)
    scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(b, t, heads * d)
    return F.linear(out, out_weight)


def ref_logits(backbone, sd, llm, embeds):
    """The original causal LM on input embeddings."""
    m, eps = "language_model.model.", llm["rms_norm_eps"]
    names = {"internlm2": ("attention_norm", "ffn_norm", "tok_embeddings", "language_model.output.weight")}.get(
        backbone, ("input_layernorm", "post_attention_layernorm", "embed_tokens", "language_model.lm_head.weight"))
    x = embeds
    for i in range(llm["num_hidden_layers"]):
        p = f"{m}layers.{i}."
        x = x + ref_attention(backbone, sd, p, llm, rms(x, sd[p + names[0] + ".weight"], eps))
        h = rms(x, sd[p + names[1] + ".weight"], eps)
        if backbone == "internlm2":
            up = F.silu(F.linear(h, sd[p + "feed_forward.w1.weight"])) * F.linear(h, sd[p + "feed_forward.w3.weight"])
            x = x + F.linear(up, sd[p + "feed_forward.w2.weight"])
        elif backbone == "phi3":
            gate, up = F.linear(h, sd[p + "mlp.gate_up_proj.weight"]).chunk(2, -1)
            x = x + F.linear(up * F.silu(gate), sd[p + "mlp.down_proj.weight"])
        else:
            up = F.silu(F.linear(h, sd[p + "mlp.gate_proj.weight"])) * F.linear(h, sd[p + "mlp.up_proj.weight"])
            x = x + F.linear(up, sd[p + "mlp.down_proj.weight"])
    head = sd.get(names[3], sd[f"{m}{names[2]}.weight"])  # Qwen2's tied head is the embedding
    return F.linear(rms(x, sd[m + "norm.weight"], eps), head)


def native_to_original(native, backbone, llm):
    """Undo the conversion with the inverse renames and by re-fusing q/k/v (written from the original
    layouts), so that the result must equal the source state dict key for key."""
    out, qkv = {}, {}
    heads, kv = llm["num_attention_heads"], llm["num_key_value_heads"]
    renames = [(r"model\.vision_tower\.embeddings\.cls_token", "vision_model.embeddings.class_embedding"),
               (r"model\.vision_tower\.embeddings\.position_embeddings", "vision_model.embeddings.position_embedding"),
               (r"model\.vision_tower\.embeddings\.patch_embeddings\.projection\.", "vision_model.embeddings.patch_embedding."),
               (r"model\.vision_tower\.encoder\.layer\.(\d+)\.attention\.projection_layer\.", r"vision_model.encoder.layers.\1.attn.proj."),
               (r"model\.vision_tower\.encoder\.layer\.(\d+)\.attention\.(q_norm|k_norm)\.", r"vision_model.encoder.layers.\1.attn.\2."),
               (r"model\.vision_tower\.encoder\.layer\.(\d+)\.mlp\.", r"vision_model.encoder.layers.\1.mlp."),
               (r"model\.vision_tower\.encoder\.layer\.(\d+)\.layernorm_before\.", r"vision_model.encoder.layers.\1.norm1."),
               (r"model\.vision_tower\.encoder\.layer\.(\d+)\.layernorm_after\.", r"vision_model.encoder.layers.\1.norm2."),
               (r"model\.vision_tower\.encoder\.layer\.(\d+)\.lambda_(\d)", r"vision_model.encoder.layers.\1.ls\2"),
               (r"model\.multi_modal_projector\.layer_norm\.", "mlp1.0."),
               (r"model\.multi_modal_projector\.linear_1\.", "mlp1.1."),
               (r"model\.multi_modal_projector\.linear_2\.", "mlp1.3.")]
    if backbone == "internlm2":
        renames += [(r"model\.language_model\.embed_tokens\.", "language_model.model.tok_embeddings."),
                    (r"model\.language_model\.layers\.(\d+)\.self_attn\.o_proj\.", r"language_model.model.layers.\1.attention.wo."),
                    (r"model\.language_model\.layers\.(\d+)\.mlp\.gate_proj\.", r"language_model.model.layers.\1.feed_forward.w1."),
                    (r"model\.language_model\.layers\.(\d+)\.mlp\.up_proj\.", r"language_model.model.layers.\1.feed_forward.w3."),
                    (r"model\.language_model\.layers\.(\d+)\.mlp\.down_proj\.", r"language_model.model.layers.\1.feed_forward.w2."),
                    (r"model\.language_model\.layers\.(\d+)\.input_layernorm\.", r"language_model.model.layers.\1.attention_norm."),
                    (r"model\.language_model\.layers\.(\d+)\.post_attention_layernorm\.", r"language_model.model.layers.\1.ffn_norm."),
                    (r"model\.language_model\.norm\.", "language_model.model.norm."),
                    (r"lm_head\.", "language_model.output.")]
    else:
        renames += [(r"model\.language_model\.", "language_model.model."), (r"lm_head\.", "language_model.lm_head.")]
    for key, tensor in native.items():
        fused = re.fullmatch(r"(model\.vision_tower\.encoder\.layer\.\d+\.attention|model\.language_model\.layers\.\d+\.self_attn)"
                             r"\.([qkv])_proj\.(weight|bias)", key)
        if fused and (key.startswith("model.vision_tower") or backbone == "internlm2"):
            qkv.setdefault((fused.group(1), fused.group(3)), {})[fused.group(2)] = tensor
            continue
        for pattern, replacement in renames:
            if re.match(pattern, key):
                out[re.sub(pattern, replacement, key, count=1)] = tensor
                break
        else:
            raise AssertionError(f"unexpected native key {key}")
    for (module, kind), parts in qkv.items():
        if module.startswith("model.vision_tower"):
            layer = module.split(".")[4]
            out[f"vision_model.encoder.layers.{layer}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
        else:  # InternLM2: per kv head, its q heads, then its k, then its v
            layer = module.split(".")[3]
            d = parts["k"].shape[0] // kv
            q = parts["q"].reshape(kv, heads // kv, d, *parts["q"].shape[1:])
            k, v = (parts[p].reshape(kv, 1, d, *parts[p].shape[1:]) for p in "kv")
            out[f"language_model.model.layers.{layer}.attention.wqkv.{kind}"] = torch.cat([q, k, v], 1).reshape(
                -1, *parts["q"].shape[1:])
    return out


def native_state(dst):
    state = {}
    for path in sorted(Path(dst).glob("*.safetensors")):
        state.update(load_file(path))
    return state


# ---------------------------------------------------------------------------------------- tests

@pytest.mark.parametrize("backbone", BACKBONES)
def test_loads_with_no_missing_or_unexpected_keys(backbone, converted, models):
    _, loading = models[backbone]
    assert not loading["missing_keys"] and not loading["unexpected_keys"] and not loading["mismatched_keys"]
    auto = AutoModelForImageTextToText.from_pretrained(converted[backbone]["dst"])
    assert isinstance(auto, InternVLForConditionalGeneration)
    config = auto.config
    assert config.image_seq_length == (448 // 14) ** 2 // 4 == 256
    assert config.template == {"qwen2": "Hermes-2", "internlm2": "internlm2-chat", "phi3": "phi3-chat"}[backbone]
    assert config.vision_feature_layer == SETUPS[backbone].get("select_layer", -1)
    assert config.text_config.model_type == {"qwen2": "qwen2", "internlm2": "llama", "phi3": "phi3"}[backbone]
    assert config.tie_word_embeddings is (backbone == "qwen2")


@pytest.mark.parametrize("backbone", BACKBONES)
def test_every_source_tensor_used_exactly_once(backbone, converted):
    """Inverting the conversion gives back exactly the source tensors: none lost, none duplicated, none
    invented, shapes and values intact (the resampled position grid aside, checked separately)."""
    info = converted[backbone]
    source, llm = info["state"], info["config"]["llm_config"]
    back = native_to_original(native_state(info["dst"]), backbone, llm)
    assert set(back) == set(source)
    for key, tensor in source.items():
        if key == "vision_model.embeddings.position_embedding" and backbone == "internlm2":
            assert back[key].shape == (1, 32 * 32 + 1, 32) and tensor.shape == (1, 16 * 16 + 1, 32)
            continue
        assert back[key].shape == tensor.shape, key
        assert torch.equal(back[key], tensor), key


@pytest.mark.parametrize("backbone", ["qwen2", "internlm2"])
def test_internvit_block_matches_original(backbone, converted, models):
    """LayerNorm + qkv bias (InternViT-300M) and RMSNorm + qk-norm without bias (InternViT-6B)."""
    model, _ = models[backbone]
    vision = converted[backbone]["config"]["vision_config"]
    x = torch.randn(2, 17, 32, generator=torch.Generator().manual_seed(1))
    for i in range(2):
        expected = ref_vit_layer(converted[backbone]["state"], f"vision_model.encoder.layers.{i}.", vision, x)
        with torch.no_grad():
            got = model.model.vision_tower.encoder.layer[i](x)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_internlm2_attention_matches_fused_wqkv(converted, models):
    """GQA 4 heads / 2 kv heads: the grouped wqkv split must pair each query head with its kv head."""
    model, _ = models["internlm2"]
    info = converted["internlm2"]
    h = torch.randn(1, 11, 64, generator=torch.Generator().manual_seed(2))
    positions = torch.arange(11)[None]
    lm = model.model.language_model
    with torch.no_grad():
        position_embeddings = lm.rotary_emb(h, positions)
        for i in range(2):
            got, _ = lm.layers[i].self_attn(h, position_embeddings=position_embeddings, attention_mask=None)
            expected = ref_attention("internlm2", info["state"], f"language_model.model.layers.{i}.",
                                     info["config"]["llm_config"], h)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # a wrong split (kv heads taken from the wrong group) would not pass: swap the two kv heads
    state = dict(info["state"])
    wqkv = state["language_model.model.layers.0.attention.wqkv.weight"].reshape(2, 4, 16, 64)
    state["language_model.model.layers.0.attention.wqkv.weight"] = wqkv.flip(0).reshape(-1, 64)
    wrong = ref_attention("internlm2", state, "language_model.model.layers.0.", info["config"]["llm_config"], h)
    assert not torch.allclose(wrong, expected, atol=1e-3)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_image_features_match_original(backbone, converted, models):
    """ViT (+ resampled position grid, select_layer), pixel shuffle v2 and the mlp1 projector."""
    model, _ = models[backbone]
    info = converted[backbone]
    pixels = torch.randn(2, 3, 448, 448, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = model.model.get_image_features(pixel_values=pixels).pooler_output
        projected = model.model.multi_modal_projector(torch.ones(1, 3, 128) * torch.linspace(-2, 2, 128))
    torch.testing.assert_close(got, ref_image_features(info["state"], info["config"], pixels), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(projected, ref_mlp1(info["state"], torch.ones(1, 3, 128) * torch.linspace(-2, 2, 128)),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_whole_model_logits_match_original(backbone, converted, models):
    """A prompt with one tile's `<img><IMG_CONTEXT>x256</img>`: finite, deterministic, and the logits the
    original model computes (image features scattered into the IMG_CONTEXT slots of the embeddings)."""
    model, _ = models[backbone]
    info = converted[backbone]
    tokenizer = AutoTokenizer.from_pretrained(info["dst"])
    prompt = "hello world <img>" + "<IMG_CONTEXT>" * 256 + "</img> what is this?"
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    context = info["ids"]["<IMG_CONTEXT>"]
    assert model.config.image_token_id == context and int((ids == context).sum()) == 256
    pixels = torch.randn(1, 3, 448, 448, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=pixels).logits
        again = model(input_ids=ids, pixel_values=pixels).logits
    assert torch.isfinite(logits).all() and torch.equal(logits, again)
    assert logits.shape == (1, ids.shape[1], info["config"]["llm_config"]["vocab_size"])
    sd, llm = info["state"], info["config"]["llm_config"]
    embed = sd["language_model.model." + ("tok_embeddings" if backbone == "internlm2" else "embed_tokens") + ".weight"]
    embeds = embed[ids].clone()
    embeds[ids == context] = ref_image_features(sd, info["config"], pixels).reshape(-1, embeds.shape[-1])
    torch.testing.assert_close(logits, ref_logits(backbone, sd, llm, embeds), atol=2e-4, rtol=2e-4)


INTERNVL2_SYSTEM = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"


def test_internlm2_tokenizer_is_the_sentencepiece_bpe(converted):
    """Expected ids worked out by hand from sentencepiece BPE: merge the adjacent pair whose merged piece
    has the best score, bytes for characters outside the vocabulary, no dummy prefix, BOS first."""
    info = converted["internlm2"]
    ids = info["ids"]
    tokenizer = AutoTokenizer.from_pretrained(info["dst"])
    # h e l l o ▁ w o r l d -> he, ll, llo, hello, ▁w, or, ▁wor, ld, ▁world
    assert tokenizer("hello world")["input_ids"] == [ids["<s>"], ids["hello"], ids["▁world"]]
    assert tokenizer("abc", add_special_tokens=False)["input_ids"] == [ids["a"], ids["bc"]]  # by score, not by id
    assert tokenizer("hé", add_special_tokens=False)["input_ids"] == [ids["h"], ids["<0xC3>"], ids["<0xA9>"]]
    chat = "<|im_start|>user\nhello<|im_end|><img><IMG_CONTEXT></img>"
    assert tokenizer(chat, add_special_tokens=False)["input_ids"] == [
        ids["<|im_start|>"], ids["u"], ids["s"], ids["e"], ids["r"], ids["<0x0A>"], ids["hello"], ids["<|im_end|>"],
        ids["<img>"], ids["<IMG_CONTEXT>"], ids["</img>"]]
    assert tokenizer.decode(tokenizer("hello world hé")["input_ids"], skip_special_tokens=True) == "hello world hé"
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                             add_generation_prompt=True)
    # the official default system message, as internlm2-chat training and chat() insert it
    assert rendered == f"<s><|im_start|>system\n{INTERNVL2_SYSTEM}<|im_end|><|im_start|>user\nhi<|im_end|><|im_start|>assistant\n"
    generation = json.loads((info["dst"] / "generation_config.json").read_text())
    assert ids["<|im_end|>"] in generation["eos_token_id"]


@pytest.mark.parametrize("backbone", ["qwen2", "phi3"])
def test_tokenizer_encodes_like_the_source(backbone, converted):
    info = converted[backbone]
    source = AutoTokenizer.from_pretrained(info["src"])
    target = AutoTokenizer.from_pretrained(info["dst"])
    for text in ["hello world", " the quick brown fox <img><IMG_CONTEXT></img>", "<ref>a</ref><box>[[1, 2, 3, 4]]</box> 你好"]:
        assert target(text)["input_ids"] == source(text)["input_ids"]
    for token in ["<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>"]:
        assert target(token, add_special_tokens=False)["input_ids"] == [info["ids"][token]]
    rendered = target.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    # the official default system message; Phi-3 starts with <s> as its official preprocessing and chat() do
    assert rendered == {"qwen2": f"<|im_start|>system\n{INTERNVL2_SYSTEM}<|im_end|><|im_start|>user\nhi<|im_end|><|im_start|>assistant\n",
                        "phi3": f"<s><|system|>\n{INTERNVL2_SYSTEM}<|end|><|user|>\nhi<|end|><|assistant|>\n"}[backbone]


def _error(src, dst, **kwargs) -> str:
    with pytest.raises(AdaptError) as err:
        convert_checkpoint(src, dst, **kwargs)
    assert not dst.exists()
    return str(err.value)


def test_unknown_source_tensors_are_refused_by_name(tmp_path):
    extra = {"vision_model.encoder.layers.0.attn.extra.weight": torch.zeros(2), "value_head.weight": torch.zeros(2)}
    write_original_checkpoint(tmp_path / "src", "qwen2", extra_tensors=extra)
    message = _error(tmp_path / "src", tmp_path / "dst")
    assert "vision_model.encoder.layers.0.attn.extra.weight" in message and "value_head.weight" in message


@pytest.mark.parametrize("ps_version", ["v1", None])
def test_pixel_shuffle_v1_is_refused(tmp_path, ps_version):
    """v1 (and a config without ps_version: the original default) transposes the token grid."""
    write_original_checkpoint(tmp_path / "src", "phi3", ps_version=ps_version)
    message = _error(tmp_path / "src", tmp_path / "dst")
    assert "ps_version 'v1'" in message and "transposed" in message


def test_bin_is_loaded_with_weights_only(tmp_path):
    """A pickle that would run code (here: create a file) is refused, and the code never runs."""
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    write_original_checkpoint(tmp_path / "src", "phi3", fmt="bin")
    bin_file = tmp_path / "src" / "pytorch_model.bin"
    torch.save({**torch.load(bin_file, weights_only=True), "language_model.extra": Payload()}, bin_file)
    message = _error(tmp_path / "src", tmp_path / "dst")
    assert "refused to load this pickle file" in message and "pytorch_model.bin" in message
    assert "weights_only=False" not in message and "`weights_only` set to `False`" not in message
    assert not marker.exists()


def test_tokenizer_larger_than_embedding_is_refused(tmp_path):
    write_original_checkpoint(tmp_path / "src", "phi3", vocab_delta=-1)
    assert "embedding has only" in _error(tmp_path / "src", tmp_path / "dst")


def test_dtype_overwrite_and_existing_output(tmp_path, converted):
    src, dst = converted["qwen2"]["src"], tmp_path / "out"
    dst.mkdir()
    assert "already exists" in str(pytest.raises(AdaptError, convert_checkpoint, src, dst).value)
    convert_checkpoint(src, dst, overwrite=True, dtype="bf16")
    with safe_open(str(dst / "model.safetensors"), framework="pt") as handle:
        assert {handle.get_tensor(k).dtype for k in handle.keys()} == {torch.bfloat16}  # noqa: SIM118
    assert json.loads((dst / "config.json").read_text())["dtype"] == "bfloat16"
    model = InternVLForConditionalGeneration.from_pretrained(dst)
    assert model.dtype == torch.bfloat16
    assert not list(tmp_path.glob(".out.*"))  # no temporary folder left behind


def test_missing_image_tokens_are_added_inside_the_embedding(tmp_path):
    """A tokenizer without InternVL's tokens (a base LLM's) gets them; the padded embedding has room."""
    info = write_original_checkpoint(tmp_path / "src", "qwen2")
    config_file = tmp_path / "src" / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["added_tokens_decoder"] = {i: t for i, t in config["added_tokens_decoder"].items()
                                      if t["content"] not in ("<quad>", "</quad>", "<IMG_CONTEXT>")}
    config_file.write_text(json.dumps(config))
    dst = convert_checkpoint(tmp_path / "src", tmp_path / "dst")
    tokenizer = AutoTokenizer.from_pretrained(dst)
    context = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert tokenizer("<quad><IMG_CONTEXT></quad>", add_special_tokens=False)["input_ids"] == [
        tokenizer.convert_tokens_to_ids(t) for t in ("<quad>", "<IMG_CONTEXT>", "</quad>")]
    vocab_size = info["config"]["llm_config"]["vocab_size"]
    assert len(set(tokenizer.get_vocab().values())) == len(tokenizer) <= vocab_size
    assert json.loads((dst / "config.json").read_text())["image_token_id"] == context < vocab_size


def test_sharded_output_with_index(tmp_path, converted, monkeypatch):
    monkeypatch.setattr(convert_module, "MAX_SHARD_BYTES", 64 * 1024)
    dst = convert_checkpoint(converted["internlm2"]["src"], tmp_path / "out")
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in dst.glob("*.safetensors"))
    assert len(shards) > 2 and sorted(set(index["weight_map"].values())) == shards
    assert native_state(dst).keys() == native_state(converted["internlm2"]["dst"]).keys()
    _, loading = InternVLForConditionalGeneration.from_pretrained(dst, output_loading_info=True)
    assert not loading["missing_keys"] and not loading["unexpected_keys"]


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_missing_shard_without_index_is_named(tmp_path, fmt):
    """Before, the untied Phi-3 head sat in the lost shard and the message said "no LM head"."""
    write_original_checkpoint(tmp_path / "src", "phi3", fmt=fmt, shards=2)
    stem = "model" if fmt == "safetensors" else "pytorch_model"
    (tmp_path / "src" / f"{stem}.{fmt}.index.json").unlink()
    (tmp_path / "src" / f"{stem}-00002-of-00002.{fmt}").unlink()
    message = _error(tmp_path / "src", tmp_path / "dst")
    assert f"{stem}-00002-of-00002.{fmt}" in message and "LM head" not in message


def _torchvision_imports() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:  # the CPU machines here have only a CUDA wheel, or none
        return False
    return True


@pytest.mark.parametrize("backbone", BACKBONES)
def test_converted_folder_is_laid_out_like_the_hf_releases(backbone, converted):
    """Before, a converted folder had no processor files and its chat template wrote `<image>\\n`."""
    from transformers import AutoImageProcessor, InternVLConfig

    from adapt.data.templates import IMG_CONTEXT, IMG_END, IMG_START, Encoder
    from adapt.data.tiling import count_tiles

    dst = converted[backbone]["dst"]
    for name in ("preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json",
                 "chat_template.jinja"):
        assert (dst / name).is_file(), name
    config = InternVLConfig.from_pretrained(dst)
    assert json.loads((dst / "processor_config.json").read_text()) == {
        "processor_class": "InternVLProcessor", "image_seq_length": config.image_seq_length}
    image_config = json.loads((dst / "preprocessor_config.json").read_text())
    assert (image_config["crop_to_patches"], image_config["max_patches"]) == (True, 12)  # the source's max_dynamic_patch
    processor = AutoImageProcessor.from_pretrained(dst)  # the PIL GotOcr2 processor here (no torchvision)
    from PIL import Image

    image = Image.new("RGB", (896, 448), (90, 120, 30))
    patches = count_tiles(896, 448, max_tiles=12)
    assert processor(images=image, return_tensors="pt")["num_patches"].tolist() == [patches]

    tok = AutoTokenizer.from_pretrained(dst)
    assert (tok.start_image_token, tok.end_image_token, tok.context_image_token) == (IMG_START, IMG_END, IMG_CONTEXT)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in this image?"}]}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.count(IMG_CONTEXT) == 1 and "<image>" not in text
    # InternVLProcessor expands each <IMG_CONTEXT> into <img> + context x image_seq_length x patches + </img>
    expanded = text.replace(IMG_CONTEXT, IMG_START + IMG_CONTEXT * config.image_seq_length * patches + IMG_END)
    record = {"id": "p", "image": "a.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat is in this image?"}, {"from": "gpt", "value": "Two cars."}]}
    template = json.loads((converted[backbone]["src"] / "config.json").read_text())["template"]
    expected = Encoder(tok, template, config.image_seq_length).encode(record, [patches], generation=True).input_ids
    assert tok(expanded, add_special_tokens=False)["input_ids"] == expected


@pytest.mark.skipif(not _torchvision_imports(), reason="InternVLProcessor needs torchvision (its video processor)")
@pytest.mark.parametrize("backbone", BACKBONES)
def test_converted_folder_runs_with_auto_processor(backbone, converted):
    from PIL import Image
    from transformers import AutoProcessor

    dst = converted[backbone]["dst"]
    processor = AutoProcessor.from_pretrained(dst)
    model = AutoModelForImageTextToText.from_pretrained(dst).eval()
    messages = [{"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (896, 448))},
                                             {"type": "text", "text": "What is in this image?"}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    assert inputs["pixel_values"].shape[0] == 3  # 2 tiles + thumbnail
    output = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert output.shape[1] == inputs["input_ids"].shape[1] + 2
