"""Convert an original OpenGVLab InternVL checkpoint (remote-code `InternVLChatModel`) to the HF-native
`InternVLForConditionalGeneration` layout.

The Mini-InternVL family (Mini-InternVL-Chat-2B/4B-V1-5, InternVL2-1B/2B/4B, the Mini-InternVL2-*-DA-*
domain models) exists only in the original layout: `vision_model.*` (InternViT, fused `attn.qkv`),
`mlp1.{0,1,3}` (LayerNorm, Linear, GELU, Linear) and `language_model.*` (Qwen2 / InternLM2 / Phi-3 /
Llama). The conversion is exact, weight for weight:

- InternViT: `attn.qkv` rows are [q; k; v] -> q/k/v_proj; `attn.proj` -> `projection_layer`;
  `ls1/ls2` -> `lambda_1/2`; `norm1/2` -> `layernorm_before/after`; InternViT-6B's qk-norm
  (RMSNorm over all heads, `norm_type` rms_norm) maps to the native `q_norm/k_norm`.
- InternLM2 -> Llama: `wqkv` rows are grouped [kv_heads, (q_per_kv + 2), head_dim]: per kv head its
  queries, then its key, then its value; both use the same rotate-half RoPE, so no permutation.
- Pixel shuffle: the native model implements `ps_version="v2"` only (see `_check_pixel_shuffle`).

Every source tensor is used exactly once and every native parameter is written exactly once; anything
else is refused before a byte is written, and the output folder appears in one rename.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from adapt.checkpoints.export import write_processor_configs, write_tokenizer
from adapt.checkpoints.pickles import load_safely
from adapt.data.templates import IMAGE_SPECIAL_TOKENS, TEMPLATES, chat_template_for
from adapt.errors import AdaptError
from adapt.fileio import atomic_dir

log = logging.getLogger(__name__)

MAX_SHARD_BYTES = 4 * 1024**3
DEFAULT_MAX_TILES = 12  # InternVL's max_dynamic_patch when an original config.json names none
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}
_SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}

# Defaults of the original config classes, for fields an original config.json may leave out
# (InternVL `configuration_intern_vit.InternVisionConfig`, InternLM2 `InternLM2Config`).
VISION_DEFAULTS: dict[str, Any] = dict(
    num_channels=3, patch_size=14, image_size=224, qkv_bias=False, hidden_size=3200, num_attention_heads=25,
    intermediate_size=12800, qk_normalization=True, num_hidden_layers=48, hidden_act="gelu", norm_type="rms_norm",
    layer_norm_eps=1e-6, dropout=0.0, attention_dropout=0.0, initializer_range=0.02, initializer_factor=0.1)
INTERNLM2_DEFAULTS: dict[str, Any] = dict(
    hidden_act="silu", max_position_embeddings=2048, initializer_range=0.02, rms_norm_eps=1e-6, bias=True,
    rope_theta=10000.0, rope_scaling=None, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1,
    eos_token_id=2)

# llm_config["architectures"][0] -> (family, native text model_type)
LLM_ARCHS = {"Qwen2ForCausalLM": ("direct", "qwen2"), "Phi3ForCausalLM": ("direct", "phi3"),
             "LlamaForCausalLM": ("direct", "llama"), "InternLM2ForCausalLM": ("internlm2", "llama")}
# Native PreTrainedConfig fields that describe the run, not the architecture: never copied from llm_config.
_GENERIC_FIELDS = {"transformers_version", "architectures", "output_hidden_states", "return_dict", "dtype",
                   "chunk_size_feed_forward", "is_encoder_decoder", "id2label", "label2id", "problem_type"}


# --------------------------------------------------------------------------------------------- source

_NUMBERED_SHARD = re.compile(r"^(?P<stem>.+)-(?P<n>\d+)-of-(?P<total>\d+)\.(?P<ext>safetensors|bin)$")


def _check_numbered_shards(root: Path, files: list[Path]) -> None:
    """Shards named `model-00001-of-00004.safetensors` announce how many there are: name the missing ones
    (without an index nothing else would notice, and the conversion would fail later on a missing tensor)."""
    expected: set[str] = set()
    for path in files:
        match = _NUMBERED_SHARD.match(path.name)
        if match:
            width, total = len(match["n"]), int(match["total"])
            expected |= {f"{match['stem']}-{i:0{width}d}-of-{match['total']}.{match['ext']}" for i in range(1, total + 1)}
    missing = sorted(expected - {path.name for path in files})
    if missing:
        raise AdaptError(f"weight shard(s) missing: {', '.join(missing)}", path=root,
                         hint="the download is incomplete; fetch the missing file(s) of the checkpoint")


class _Source:
    """The tensors of an original checkpoint by key: safetensors read lazily, `.bin` shards loaded once
    with `torch.load(weights_only=True)` (no arbitrary unpickling)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.weight_map: dict[str, str] | None = None  # from an index file, checked against the shards
        self.files: dict[str, Path] = {}  # key -> file
        self._handles: dict[Path, Any] = {}
        self._loaded: dict[str, torch.Tensor] = {}
        safetensors = self._listed(root / "model.safetensors.index.json") or sorted(root.glob("model*.safetensors"))
        _check_numbered_shards(root, safetensors or sorted(root.glob("pytorch_model*.bin")))
        if safetensors:
            self.kind = "safetensors"
            for path in safetensors:
                stored = self._handle(path).keys()  # a safetensors handle is not iterable itself
                for key in stored:
                    self._add(key, path)
        else:
            bins = self._listed(root / "pytorch_model.bin.index.json") or sorted(root.glob("pytorch_model*.bin"))
            if not bins:
                raise AdaptError("no weights found (model*.safetensors or pytorch_model*.bin)", path=root,
                                 hint="point at the original checkpoint folder (the one with config.json)")
            self.kind = "bin"
            for path in bins:
                for key, tensor in _load_bin(path).items():
                    self._add(key, path)
                    self._loaded[key] = tensor
        self._check_index()

    def _listed(self, index: Path) -> list[Path]:
        if not index.is_file():
            return []
        try:
            self.weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as err:
            raise AdaptError(f"unreadable index file ({err})", path=index) from None
        files = sorted({self.root / name for name in self.weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise AdaptError(f"weight shards listed in the index are missing: {', '.join(missing)}", path=index,
                             hint="download the complete checkpoint")
        return files

    def _check_index(self) -> None:
        if self.weight_map is None:
            return
        actual = {key: path.name for key, path in self.files.items()}
        if actual != self.weight_map:
            wrong = sorted(set(actual.items()) ^ set(self.weight_map.items()))[:10]
            raise AdaptError(f"the index does not match the shards' contents (e.g. {wrong})", path=self.root,
                             hint="the download is incomplete or the index is stale; re-download the checkpoint")

    def _add(self, key: str, path: Path) -> None:
        if key in self.files:
            raise AdaptError(f"tensor {key!r} appears in both {self.files[key].name} and {path.name}", path=self.root)
        self.files[key] = path

    def _handle(self, path: Path) -> Any:
        from safetensors import SafetensorError, safe_open

        if path not in self._handles:
            try:
                self._handles[path] = safe_open(str(path), framework="pt")
            except (SafetensorError, OSError) as err:
                raise AdaptError(f"not a readable safetensors file ({err})", path=path) from None
        return self._handles[path]

    def names(self) -> list[str]:
        return list(self.files)

    def meta(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        if self.kind == "bin":
            tensor = self._loaded[key]
            return tuple(tensor.shape), tensor.dtype
        sliced = self._handle(self.files[key]).get_slice(key)
        return tuple(sliced.get_shape()), _SAFETENSORS_DTYPES[sliced.get_dtype()]

    def get(self, key: str) -> torch.Tensor:
        if self.kind == "bin":
            return self._loaded[key]
        return self._handle(self.files[key]).get_tensor(key)


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    state = load_safely(path)  # refused pickles become adapt's message, never torch's weights_only=False advice
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise AdaptError("this .bin shard is not a plain state dict of tensors", path=path)
    return state


# ----------------------------------------------------------------------------------------------- plan

Transform = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class _Output:
    key: str  # native key
    transform: Transform | None  # None: the tensor as it is


@dataclass
class _Plan:
    outputs: dict[str, list[_Output]]  # source key -> what it becomes ([] for dropped derived buffers)
    dropped: dict[str, str]  # source key -> why it is written nowhere (tied lm_head, rotary buffers)


def _split_rows(parts: list[int], index: int) -> Transform:
    start = sum(parts[:index])

    def split(t: torch.Tensor) -> torch.Tensor:
        if t.shape[0] != sum(parts):
            raise ValueError(f"{t.shape[0]} rows, expected {sum(parts)} ({' + '.join(map(str, parts))})")
        return t[start:start + parts[index]]

    return split


def _split_wqkv(num_heads: int, num_kv: int, head_dim: int, which: str) -> Transform:
    """InternLM2 `wqkv` rows: [kv_heads, (q_per_kv + 2), head_dim]; q heads in (kv, group) order, which is
    the order Llama's repeat_kv pairs query head i with kv head i // q_per_kv."""
    groups = num_heads // num_kv

    def split(t: torch.Tensor) -> torch.Tensor:
        grouped = t.reshape(num_kv, groups + 2, head_dim, *t.shape[1:])
        part = {"q": grouped[:, :groups], "k": grouped[:, groups], "v": grouped[:, groups + 1]}[which]
        return part.reshape(-1, *t.shape[1:])

    return split


def _resample_positions(target_grid: int) -> Transform:
    """What InternViT does to its position embedding on every forward (`_get_pos_embed`: float32 bicubic,
    align_corners=False, then cast to the model's dtype, which the writer does), done once, so the native
    model needs no interpolation."""

    def resample(t: torch.Tensor) -> torch.Tensor:
        grid = math.isqrt(t.shape[1] - 1)
        if grid == target_grid:
            return t
        patches = t[:, 1:].float().reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
        patches = torch.nn.functional.interpolate(patches, size=(target_grid, target_grid), mode="bicubic",
                                                  align_corners=False)
        patches = patches.reshape(1, -1, target_grid * target_grid).permute(0, 2, 1)
        return torch.cat([t[:, :1].float(), patches], dim=1)

    return resample


def _vision_rules(vision: dict[str, Any], target_grid: int) -> list[tuple[str, Callable[[re.Match], list[_Output]]]]:
    hidden = vision["hidden_size"]
    base = "model.vision_tower."

    def same(name: str) -> Callable[[re.Match], list[_Output]]:
        return lambda m: [_Output(base + m.expand(name), None)]

    def qkv(m: re.Match) -> list[_Output]:
        layer, kind = m.group(1), m.group(2)
        return [_Output(f"{base}encoder.layer.{layer}.attention.{p}_proj.{kind}", _split_rows([hidden] * 3, i))
                for i, p in enumerate("qkv")]

    return [
        (r"vision_model\.embeddings\.class_embedding", same("embeddings.cls_token")),
        (r"vision_model\.embeddings\.position_embedding",
         lambda m: [_Output(base + "embeddings.position_embeddings", _resample_positions(target_grid))]),
        (r"vision_model\.embeddings\.patch_embedding\.(weight|bias)", same(r"embeddings.patch_embeddings.projection.\1")),
        (r"vision_model\.encoder\.layers\.(\d+)\.attn\.qkv\.(weight|bias)", qkv),
        (r"vision_model\.encoder\.layers\.(\d+)\.attn\.proj\.(weight|bias)",
         same(r"encoder.layer.\1.attention.projection_layer.\2")),
        (r"vision_model\.encoder\.layers\.(\d+)\.attn\.(q_norm|k_norm)\.weight", same(r"encoder.layer.\1.attention.\2.weight")),
        (r"vision_model\.encoder\.layers\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)", same(r"encoder.layer.\1.mlp.\2.\3")),
        (r"vision_model\.encoder\.layers\.(\d+)\.norm1\.(weight|bias)", same(r"encoder.layer.\1.layernorm_before.\2")),
        (r"vision_model\.encoder\.layers\.(\d+)\.norm2\.(weight|bias)", same(r"encoder.layer.\1.layernorm_after.\2")),
        (r"vision_model\.encoder\.layers\.(\d+)\.ls([12])", same(r"encoder.layer.\1.lambda_\2")),
    ]


def _projector_rules() -> list[tuple[str, Callable[[re.Match], list[_Output]]]]:
    names = {"0": "layer_norm", "1": "linear_1", "3": "linear_2"}
    return [(r"mlp1\.([013])\.(weight|bias)",
             lambda m: [_Output(f"model.multi_modal_projector.{names[m.group(1)]}.{m.group(2)}", None)])]


def _llm_rules(family: str, text: Any) -> list[tuple[str, Callable[[re.Match], list[_Output]]]]:
    base = "model.language_model."
    if family == "direct":  # Qwen2 / Phi-3 / Llama: the native module tree is the original's
        return [(r"language_model\.model\.(.+)", lambda m: [_Output(base + m.group(1), None)]),
                (r"language_model\.lm_head\.weight", lambda m: [_Output("lm_head.weight", None)])]
    heads, kv, head_dim = text.num_attention_heads, text.num_key_value_heads, text.head_dim
    renames = {"attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj",
               "feed_forward.w3": "mlp.up_proj", "feed_forward.w2": "mlp.down_proj",
               "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}

    def wqkv(m: re.Match) -> list[_Output]:
        layer, kind = m.group(1), m.group(2)
        return [_Output(f"{base}layers.{layer}.self_attn.{p}_proj.{kind}", _split_wqkv(heads, kv, head_dim, p))
                for p in "qkv"]

    return [
        (r"language_model\.model\.tok_embeddings\.weight", lambda m: [_Output(base + "embed_tokens.weight", None)]),
        (r"language_model\.model\.norm\.weight", lambda m: [_Output(base + "norm.weight", None)]),
        (r"language_model\.output\.weight", lambda m: [_Output("lm_head.weight", None)]),
        (r"language_model\.model\.layers\.(\d+)\.attention\.wqkv\.(weight|bias)", wqkv),
        (r"language_model\.model\.layers\.(\d+)\.(attention\.wo|feed_forward\.w[123]|attention_norm|ffn_norm)"
         r"\.(weight|bias)",
         lambda m: [_Output(f"{base}layers.{m.group(1)}.{renames[m.group(2)]}.{m.group(3)}", None)]),
    ]


_ROTARY_BUFFER = re.compile(r"language_model\.model\.(layers\.\d+\.(self_attn|attention)\.)?rotary_emb\.inv_freq")


def _plan(source: _Source, vision: dict[str, Any], target_grid: int, family: str, text: Any,
          tie: bool) -> _Plan:
    rules = [(re.compile(p), f) for p, f in
             _vision_rules(vision, target_grid) + _projector_rules() + _llm_rules(family, text)]
    outputs: dict[str, list[_Output]] = {}
    dropped: dict[str, str] = {}
    unmapped: list[str] = []
    for key in source.names():
        if _ROTARY_BUFFER.fullmatch(key):
            _check_inv_freq(source, key, text)
            outputs[key], dropped[key] = [], "rotary inv_freq buffer (recomputed from rope_theta)"
            continue
        for pattern, make in rules:
            match = pattern.fullmatch(key)
            if match:
                outputs[key] = make(match)
                break
        else:
            unmapped.append(key)
    if unmapped:
        lora = any("lora_" in k for k in unmapped)
        raise AdaptError(f"{len(unmapped)} source tensors have no native counterpart: " + ", ".join(unmapped[:40])
                         + (" ..." if len(unmapped) > 40 else ""), path=source.root,
                         hint="merge LoRA adapters into the weights first (the original `merge_lora.py`)" if lora
                         else "this is not an InternVL2 / Mini-InternVL checkpoint layout this converter knows")
    lm_head = [k for k, outs in outputs.items() if any(o.key == "lm_head.weight" for o in outs)]
    if tie and lm_head:
        embed = next(k for k, outs in outputs.items()
                     if any(o.key == "model.language_model.embed_tokens.weight" for o in outs))
        if not torch.equal(source.get(lm_head[0]), source.get(embed)):
            raise AdaptError(f"llm_config says tie_word_embeddings but {lm_head[0]} differs from {embed}",
                             path=source.root, hint="fix tie_word_embeddings in config.json's llm_config")
        outputs[lm_head[0]], dropped[lm_head[0]] = [], "tied to the input embedding"
    return _Plan(outputs, dropped)


def _check_inv_freq(source: _Source, key: str, text: Any) -> None:
    """Old `.bin` checkpoints saved RoPE's inv_freq; it must be the one rope_theta gives, or we would drop
    information the native model cannot recompute."""
    dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    theta = text.rope_parameters["rope_theta"]
    expected = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    found = source.get(key).float()
    if found.shape != expected.shape or not torch.allclose(found, expected, rtol=1e-3):
        raise AdaptError(f"{key} does not match rope_theta={theta}", path=source.root,
                         hint="the checkpoint's RoPE differs from its config; it cannot be converted faithfully")


def _check_against_native(plan: _Plan, source: _Source, config: Any) -> dict[str, tuple[int, ...]]:
    """Every native parameter gets exactly one tensor of its exact shape, nothing else is written."""
    from transformers import InternVLForConditionalGeneration

    with torch.device("meta"):
        native = InternVLForConditionalGeneration(config)
    tied = set(native.all_tied_weights_keys)
    expected = {k: tuple(v.shape) for k, v in native.state_dict().items() if k not in tied}
    written: dict[str, tuple[int, ...]] = {}
    origin: dict[str, str] = {}
    problems = []
    for key, outs in plan.outputs.items():
        shape, _ = source.meta(key)
        for out in outs:
            if out.key in origin:
                problems.append(f"{out.key} from both {origin[out.key]} and {key}")
            origin[out.key] = key
            meta = torch.empty(shape, device="meta")
            try:
                written[out.key] = tuple((out.transform(meta) if out.transform else meta).shape)
            except (RuntimeError, ValueError) as err:
                problems.append(f"{key} {shape} cannot become {out.key}: {str(err).splitlines()[0]}")
    unexpected = sorted(origin[k] for k in written.keys() - expected.keys())
    missing = sorted(expected.keys() - written.keys())
    wrong = sorted(f"{origin[k]} {written[k]} -> {k} {expected[k]}" for k in written.keys() & expected.keys()
                   if written[k] != expected[k])
    if unexpected:
        problems.append("source tensors with no native counterpart: " + ", ".join(unexpected[:40]))
    if missing:
        problems.append("native parameters the checkpoint lacks: " + ", ".join(missing[:40]))
    if wrong:
        problems.append("shape mismatches: " + "; ".join(wrong[:20]))
    if problems:
        raise AdaptError("the checkpoint does not match its config.json: " + " | ".join(problems),
                         path=source.root, hint="the config.json and the weights disagree; re-download the checkpoint")
    return written


# --------------------------------------------------------------------------------------------- config

def _read_config(src: Path) -> dict[str, Any]:
    path = src / "config.json"
    if not path.is_file():
        raise AdaptError("no config.json", path=src, hint="point at the original checkpoint folder")
    try:
        config = json.loads(path.read_text())
    except ValueError as err:
        raise AdaptError(f"config.json is not valid JSON ({err})", path=path) from None
    if config.get("model_type") == "internvl":
        raise AdaptError("this checkpoint is already in the HF-native InternVL layout", path=path,
                         hint="use it directly; no conversion needed")
    for field in ("vision_config", "llm_config"):
        if not isinstance(config.get(field), dict):
            raise AdaptError(f"config.json has no {field}: not an original OpenGVLab InternVL checkpoint", path=path)
    return config


def _check_pixel_shuffle(config: dict[str, Any], path: Path) -> float:
    """The native model implements InternVL's ps_version "v2". "v1" skips the final permute, so the LLM
    receives each tile's tokens in column-major (transposed) order. No weight change can undo that: the
    ViT is equivariant to the order of patches, but patch (r, c)'s embedding only sees the pixels of
    patch (r, c), so the token at sequence slot (r, c) can never be made to carry patch (c, r)."""
    version = config.get("ps_version", "v1")  # InternVLChatConfig's own default
    if version != "v2":
        raise AdaptError(
            f"ps_version {version!r}{'' if 'ps_version' in config else ' (config.json has no ps_version: the original default)'}"
            " feeds the LLM each tile's image tokens transposed (column-major); the native InternVL model"
            " implements only ps_version 'v2' (row-major) and no weight-side change can reorder the tokens",
            path=path / "config.json",
            hint="v1 is used by InternVL-Chat-V1-1 / V1-2 / V1-2-Plus; Mini-InternVL-Chat-*-V1-5, InternVL2 / 2.5 / 3"
                 " and the Mini-InternVL2 DA models use v2 and convert; run a v1 checkpoint with its original code")
    ratio = float(config.get("downsample_ratio", 0.5))
    if ratio <= 0 or not float(1 / ratio).is_integer():
        raise AdaptError(f"downsample_ratio {ratio} is not 1/n", path=path / "config.json",
                         hint="the native pixel shuffle needs 1/downsample_ratio to be an integer (InternVL uses 0.5)")
    return ratio


def _vision_config(config: dict[str, Any], path: Path) -> tuple[dict[str, Any], Any, int]:
    from transformers.models.internvl import InternVLVisionConfig

    vision = {**VISION_DEFAULTS, **{k: v for k, v in config["vision_config"].items() if v is not None}}
    image_size = int(config.get("force_image_size") or vision["image_size"])
    patch = int(vision["patch_size"])
    if image_size % patch:
        raise AdaptError(f"image size {image_size} is not a multiple of patch size {patch}", path=path)
    if vision["norm_type"] not in ("layer_norm", "rms_norm"):
        raise AdaptError(f"vision norm_type {vision['norm_type']!r} is unknown", path=path)
    if vision["qk_normalization"] and vision["layer_norm_eps"] != 1e-6:
        raise AdaptError(f"qk-norm with layer_norm_eps={vision['layer_norm_eps']}: the native q_norm/k_norm use 1e-6",
                         path=path, hint="this vision tower cannot be converted exactly")
    native = InternVLVisionConfig(
        hidden_size=vision["hidden_size"], num_hidden_layers=vision["num_hidden_layers"],
        num_attention_heads=vision["num_attention_heads"], intermediate_size=vision["intermediate_size"],
        hidden_act=vision["hidden_act"], layer_norm_eps=vision["layer_norm_eps"], norm_type=vision["norm_type"],
        attention_bias=bool(vision["qkv_bias"]), use_qk_norm=bool(vision["qk_normalization"]),
        attention_dropout=vision["attention_dropout"], projection_dropout=vision["dropout"],
        hidden_dropout_prob=0.0, initializer_range=vision["initializer_range"],
        layer_scale_init_value=vision["initializer_factor"], image_size=image_size, patch_size=patch,
        num_channels=vision["num_channels"], use_absolute_position_embeddings=True, use_mean_pooling=True,
        use_mask_token=False)
    return vision, native, image_size // patch


def _text_config(llm: dict[str, Any], path: Path) -> tuple[str, Any]:
    from transformers import CONFIG_MAPPING, LlamaConfig

    arch = (llm.get("architectures") or [None])[0]
    if arch not in LLM_ARCHS:
        raise AdaptError(f"language model {arch!r} is not supported", path=path,
                         hint="supported: " + ", ".join(LLM_ARCHS))
    family, model_type = LLM_ARCHS[arch]
    if family == "internlm2":
        cfg = {**INTERNLM2_DEFAULTS, **{k: v for k, v in llm.items() if v is not None}}
        if cfg.get("rope_pos_id_version", "default") not in ("default", None):
            raise AdaptError(f"InternLM2 rope_pos_id_version {cfg['rope_pos_id_version']!r} (V2PE) has no native "
                             "equivalent", path=path)
        heads = cfg["num_attention_heads"]
        kv = cfg.get("num_key_value_heads") or heads
        if cfg["hidden_size"] % heads or heads % kv:
            raise AdaptError(f"InternLM2 heads {heads}/{kv} do not divide hidden size {cfg['hidden_size']}", path=path)
        scaling = cfg["rope_scaling"]
        rope = {"rope_type": "default", "rope_theta": float(cfg["rope_theta"])}
        if scaling:
            if scaling.get("type") not in ("linear", "dynamic"):
                raise AdaptError(f"InternLM2 rope_scaling type {scaling.get('type')!r} is unknown", path=path)
            rope.update(rope_type=scaling["type"], factor=float(scaling["factor"]))
        text = LlamaConfig(
            vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=heads, num_key_value_heads=kv,
            head_dim=cfg["hidden_size"] // heads, hidden_act=cfg["hidden_act"],
            max_position_embeddings=cfg["max_position_embeddings"], initializer_range=cfg["initializer_range"],
            rms_norm_eps=cfg["rms_norm_eps"], attention_bias=bool(cfg["bias"]), mlp_bias=False,
            rope_parameters=rope, tie_word_embeddings=bool(cfg["tie_word_embeddings"]),
            pad_token_id=cfg["pad_token_id"], bos_token_id=cfg["bos_token_id"], eos_token_id=cfg["eos_token_id"])
        return family, text
    config_class = CONFIG_MAPPING[model_type]
    fields = {f for f in getattr(config_class, "__dataclass_fields__", {})} - _GENERIC_FIELDS
    kwargs = {k: v for k, v in llm.items() if k in fields and k != "rope_parameters"}
    if llm.get("rope_parameters"):
        kwargs["rope_parameters"] = llm["rope_parameters"]
    else:
        kwargs["rope_scaling"] = dict(llm["rope_scaling"]) if llm.get("rope_scaling") else None
        if "rope_theta" in llm:
            kwargs["rope_theta"] = llm["rope_theta"]
    scaling = kwargs.get("rope_scaling")
    if scaling and "type" in scaling:  # transformers 4.x spelling
        scaling["rope_type"] = scaling.pop("type")
    if model_type == "phi3" and scaling and scaling.get("rope_type") in ("su", "longrope", "yarn"):
        # Phi-3's "su" (and its old "yarn") is LongRoPE: short/long factors switched at the pretraining
        # length, cos/sin scaled by sqrt(1 + ln(max/original) / ln(original)).
        original = llm.get("original_max_position_embeddings", 4096)
        scaling.update(rope_type="longrope")
        scaling.setdefault("original_max_position_embeddings", original)
        scaling.setdefault("factor", llm.get("max_position_embeddings", original) / original)
    kwargs.setdefault("tie_word_embeddings", False)  # the 4.x default of Qwen2 / Phi-3 / Llama configs
    try:
        return family, config_class(**kwargs)
    except (ValueError, KeyError, TypeError) as err:
        raise AdaptError(f"llm_config cannot be expressed as a native {model_type} config: {err}", path=path) from None


# ------------------------------------------------------------------------------------------ tokenizer

def _internlm2_tokenizer(src: Path, tokenizer_config: dict[str, Any]) -> Any:
    """InternLM2's tokenizer is remote code around a sentencepiece BPE model; build the equivalent fast
    tokenizer from `tokenizer.model` the way InternLM's own `InternLM2Converter` does (vocab and score-ranked
    merges, byte fallback, added tokens at their ids), with the model's own normalizer spec honoured (dummy
    prefix, extra-whitespace removal), and no sentencepiece package needed."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast
    from transformers.tokenization_utils_base import generate_merges

    model_file = src / "tokenizer.model"
    if not model_file.is_file():
        raise AdaptError("InternLM2 tokenizer without tokenizer.model", path=src,
                         hint="copy tokenizer.model from the original checkpoint")
    try:
        from transformers.convert_slow_tokenizer import import_protobuf

        proto = import_protobuf().ModelProto()
        proto.ParseFromString(model_file.read_bytes())
    except ImportError:
        raise AdaptError("converting the InternLM2 tokenizer needs the protobuf package", path=model_file,
                         hint="pip install protobuf") from None
    except Exception as err:  # a corrupt protobuf raises DecodeError, whose module varies by protobuf backend
        raise AdaptError(f"tokenizer.model is not a sentencepiece model ({err})", path=model_file) from None
    if proto.trainer_spec.model_type != 2:
        raise AdaptError("InternLM2's tokenizer.model should be a sentencepiece BPE model", path=model_file)
    added = {int(i): spec for i, spec in (tokenizer_config.get("added_tokens_decoder") or {}).items()}
    vocab = [piece.piece for piece in proto.pieces]
    scores = [piece.score for piece in proto.pieces]
    for i, spec in added.items():
        if i < len(vocab):
            vocab[i] = spec["content"]
    ranked = {piece: i for i, piece in enumerate(vocab)}
    merges = generate_merges(ranked, list(zip(vocab, scores)))
    tokenizer = Tokenizer(BPE(ranked, merges, unk_token=proto.trainer_spec.unk_piece, fuse_unk=True, byte_fallback=True))
    specials = [AddedToken(spec["content"], special=spec.get("special", True), normalized=False,
                           lstrip=spec.get("lstrip", False), rstrip=spec.get("rstrip", False),
                           single_word=spec.get("single_word", False)) for _, spec in sorted(added.items())]
    tokenizer.add_special_tokens(specials)
    for i, spec in added.items():
        if tokenizer.token_to_id(spec["content"]) != i:
            raise AdaptError(f"added token {spec['content']!r} should have id {i}, but the ids are not contiguous",
                             path=src / "tokenizer_config.json")
    spec, steps = proto.normalizer_spec, []  # sentencepiece's normalization, in its order
    if spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:
        steps += [normalizers.Strip(), normalizers.Replace(Regex(" {2,}"), " ")]
    if spec.add_dummy_prefix:
        steps.append(normalizers.Prepend("▁"))
    tokenizer.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(content=" ", left=1)])

    def token(name: str, default: str) -> str:
        value = tokenizer_config.get(name, default)
        return value["content"] if isinstance(value, dict) else value

    bos, eos = token("bos_token", "<s>"), token("eos_token", "</s>")
    add_bos, add_eos = tokenizer_config.get("add_bos_token", True), tokenizer_config.get("add_eos_token", False)
    single = " ".join(([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else []))
    pair = single + " " + " ".join(([f"{bos}:1"] if add_bos else []) + ["$B:1"] + ([f"{eos}:1"] if add_eos else []))
    tokenizer.post_processor = processors.TemplateProcessing(
        single=single, pair=pair,
        special_tokens=[(t, tokenizer.token_to_id(t)) for t in dict.fromkeys((bos, eos)) if tokenizer.token_to_id(t) is not None])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=bos, eos_token=eos, unk_token=token("unk_token", "<unk>"),
        pad_token=token("pad_token", "</s>"), padding_side=tokenizer_config.get("padding_side", "right"),
        model_max_length=tokenizer_config.get("model_max_length", 32768), clean_up_tokenization_spaces=False)


def _load_tokenizer(src: Path, family: str) -> Any:
    from transformers import AutoTokenizer

    config_file = src / "tokenizer_config.json"
    tokenizer_config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    if family == "internlm2" or tokenizer_config.get("tokenizer_class") in ("InternLM2Tokenizer", "InternLM2TokenizerFast"):
        return _internlm2_tokenizer(src, tokenizer_config)
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # silence "model of type internvl_chat" from peeking at config.json
    try:
        return AutoTokenizer.from_pretrained(src, trust_remote_code=False)
    except (OSError, ValueError, ImportError, KeyError) as err:
        raise AdaptError(f"cannot load the tokenizer offline without remote code ({str(err).splitlines()[0][:200]})",
                         path=src, hint="the folder needs tokenizer.json (or vocab.json + merges.txt) with "
                         "tokenizer_config.json; a sentencepiece-only tokenizer.model also needs `pip install sentencepiece`"
                         ) from None
    finally:
        hf_logging.set_verbosity(verbosity)


def _prepare_tokenizer(tokenizer: Any, vocab_size: int, template: str | None, src: Path) -> int:
    """Make InternVL's special tokens present and inside the embedding; set the chat template. Returns the
    id of `<IMG_CONTEXT>`."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in IMAGE_SPECIAL_TOKENS if t not in vocab]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
        log.warning("tokenizer lacked %s: added (their embedding rows were never trained)", ", ".join(missing))
    top = max(tokenizer.get_vocab().values()) + 1
    if top > vocab_size:
        beyond = sorted((i, t) for t, i in tokenizer.get_vocab().items() if i >= vocab_size)[:10]
        raise AdaptError(f"the tokenizer has ids up to {top - 1} but the embedding has only {vocab_size} rows "
                         f"(e.g. {beyond})", path=src,
                         hint="tokens were added without resizing the embeddings; this checkpoint is inconsistent")
    if top < vocab_size:
        log.info("embedding has %d rows for %d token ids (padded rows are never produced by the tokenizer)",
                 vocab_size, top)
    if template in TEMPLATES:
        tokenizer.chat_template = chat_template_for(tokenizer, template)
    else:
        log.warning("no chat template for template %r; keeping the tokenizer's own", template)
    return tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")


def _stop_token_ids(tokenizer: Any, template: str | None, eos: Any) -> list[int]:
    """The ids generation should stop at: the template's end-of-turn tokens, then the LLM's eos."""
    names = TEMPLATES[template].stop if template in TEMPLATES else ()
    vocab = tokenizer.get_vocab()
    ids = [vocab[n] for n in names if n in vocab]
    for e in eos if isinstance(eos, list) else [eos]:
        if e is not None and e not in ids:
            ids.append(e)
    return ids


# ------------------------------------------------------------------------------------------------ API

def convert_checkpoint(src: str | Path, dst: str | Path, *, overwrite: bool = False, dtype: str | None = None) -> Path:
    """Convert the original InternVL checkpoint folder `src` to an HF-native one at `dst` (written atomically).

    `dtype` ("bf16", "fp16", "fp32", ...) casts the floating weights; None keeps the checkpoint's own.
    """
    from transformers import GenerationConfig, InternVLConfig

    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise AdaptError("checkpoint folder not found", path=src)
    if dst.exists() and not overwrite:
        raise AdaptError("output folder already exists", path=dst, hint="choose another output, or pass overwrite")
    if dtype is not None and dtype not in DTYPES:
        raise AdaptError(f"unknown dtype {dtype!r}", hint="use one of: " + ", ".join(DTYPES))
    config = _read_config(src)
    ratio = _check_pixel_shuffle(config, src)
    vision, vision_config, grid = _vision_config(config, src / "config.json")
    family, text_config = _text_config(config["llm_config"], src / "config.json")
    if grid % int(1 / ratio):
        raise AdaptError(f"patch grid {grid} is not divisible by 1/downsample_ratio", path=src / "config.json")
    select_layer = int(config.get("select_layer", -1))
    if not -vision["num_hidden_layers"] - 1 <= select_layer <= vision["num_hidden_layers"]:
        raise AdaptError(f"select_layer {select_layer} is outside the {vision['num_hidden_layers']}-layer ViT",
                         path=src / "config.json")
    template = config.get("template")

    source = _Source(src)
    lm_head_present = any(k in source.files for k in ("language_model.lm_head.weight", "language_model.output.weight"))
    tie = bool(text_config.tie_word_embeddings)
    if not tie and not lm_head_present:
        raise AdaptError("the checkpoint has no LM head and llm_config does not tie it to the embedding", path=src)
    text_config.tie_word_embeddings = tie
    tokenizer = _load_tokenizer(src, family)
    image_token_id = _prepare_tokenizer(tokenizer, text_config.vocab_size, template, src)
    extras = {k: config[k] for k in ("template", "dynamic_image_size", "use_thumbnail", "min_dynamic_patch",
                                      "max_dynamic_patch") if k in config}
    native = InternVLConfig(
        vision_config=vision_config, text_config=text_config, image_token_id=image_token_id,
        image_seq_length=int(grid * grid * ratio * ratio), downsample_ratio=ratio, projector_hidden_act="gelu",
        vision_feature_layer=select_layer, vision_feature_select_strategy="default", tie_word_embeddings=tie,
        architectures=["InternVLForConditionalGeneration"], **extras)

    plan = _plan(source, vision, grid, family, text_config, tie)
    expected = _check_against_native(plan, source, native)
    out_dtype = DTYPES[dtype] if dtype else None
    dtypes = Counter(out_dtype or source.meta(k)[1] for k in plan.outputs)
    native.dtype = str(dtypes.most_common(1)[0][0]).removeprefix("torch.")
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else text_config.bos_token_id
    generation = GenerationConfig(bos_token_id=bos,
                                  eos_token_id=_stop_token_ids(tokenizer, template, text_config.eos_token_id),
                                  pad_token_id=tokenizer.pad_token_id)

    with atomic_dir(dst, overwrite=overwrite) as tmp:
        used = _write_weights(source, plan, tmp, out_dtype)
        once = Counter(source.names())
        if used != once:  # each source tensor consumed exactly once
            raise AssertionError(f"source tensors not used exactly once: {sorted((used - once) + (once - used))[:10]}")
        written = _written_keys(tmp)
        if written != set(expected):
            raise AssertionError(f"written keys differ from the plan: {sorted(written ^ set(expected))[:10]}")
        native.save_pretrained(tmp)
        generation.save_pretrained(tmp)
        if template in TEMPLATES:  # laid out as the official -hf releases: the processor expands <IMG_CONTEXT>
            write_tokenizer(tmp, tokenizer, template)
        else:
            tokenizer.save_pretrained(tmp)
        max_tiles = int(config.get("max_dynamic_patch", DEFAULT_MAX_TILES)) if config.get("dynamic_image_size", True) else 1
        write_processor_configs(tmp, native, max_tiles)
        _check_tokenizer_roundtrip(tokenizer, tmp)
    for key, why in plan.dropped.items():
        log.info("not written: %s (%s)", key, why)
    log.info("converted %s -> %s (%s LLM, %d tensors, %s)", src, dst, family, len(expected), native.dtype)
    return dst


def _write_weights(source: _Source, plan: _Plan, out: Path, dtype: torch.dtype | None) -> Counter:
    """Write the native tensors shard by shard (each source tensor read once), with an index when sharded."""
    from safetensors.torch import save_file

    def nbytes(key: str) -> int:
        shape, src_dtype = source.meta(key)
        return math.prod(shape) * (dtype or src_dtype).itemsize

    shards: list[list[str]] = [[]]
    size = 0
    for key in plan.outputs:
        if shards[-1] and size + nbytes(key) > MAX_SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes(key)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    used: Counter = Counter()
    weight_map: dict[str, str] = {}
    total = 0
    for name, keys in zip(names, shards):
        tensors: dict[str, torch.Tensor] = {}
        for key in keys:
            tensor = source.get(key)
            used[key] += 1
            for output in plan.outputs[key]:
                converted = output.transform(tensor) if output.transform else tensor
                if converted.is_floating_point():
                    converted = converted.to(dtype or tensor.dtype)
                tensors[output.key] = converted.clone(memory_format=torch.contiguous_format)
                weight_map[output.key] = name
                total += tensors[output.key].numel() * tensors[output.key].element_size()
        save_file(tensors, str(out / name), metadata={"format": "pt"})
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return used


def _written_keys(out: Path) -> set[str]:
    from safetensors import safe_open

    keys: set[str] = set()
    for path in out.glob("model*.safetensors"):
        with safe_open(str(path), framework="pt") as handle:
            keys.update(handle.keys())
    return keys


def _check_tokenizer_roundtrip(tokenizer: Any, out: Path) -> None:
    """The saved tokenizer must reload offline (AutoTokenizer) and encode like the one we built."""
    from transformers import AutoTokenizer

    reloaded = AutoTokenizer.from_pretrained(out)
    probe = ("Hello world!\n<img><IMG_CONTEXT><IMG_CONTEXT></img> <ref>a cat</ref><box>[[1, 2, 998, 999]]</box>"
             " <quad>x</quad> naïve 你好  spaces")
    for text in (probe, " " + probe):
        if reloaded(text)["input_ids"] != tokenizer(text)["input_ids"]:
            raise AdaptError("the converted tokenizer does not reload identically", path=out,
                             hint="please report this with the checkpoint's tokenizer files")
