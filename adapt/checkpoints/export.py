"""Write a fine-tuned model as a self-contained HF-native InternVL folder, merged, checked, atomic.

The folder has the layout of the `-hf` InternVL checkpoints (OpenGVLab/InternVL3-1B-hf), so
`AutoModelForImageTextToText`, `AutoProcessor`, vLLM and LMDeploy load it with no adapt code:

    model.safetensors (+ index)   config.json (with `template`)   generation_config.json (stop ids)
    tokenizer.json / tokenizer_config.json / chat_template.jinja (image tokens named for the processor)
    preprocessor_config.json (GotOcr2 image processor: dynamic tiles, ImageNet mean/std)
    processor_config.json (InternVLProcessor, image_seq_length)   video_preprocessor_config.json
    README.md (model card)

A PEFT model is merged on a CPU copy (peft's own `merge_and_unload`), so the caller's adapter model
is never touched and can keep training; the copy costs host memory for one set of weights. Before
the folder is renamed into place it is reloaded with `AutoModelForImageTextToText` (CPU, fp32) and
its logits on a probe prompt with an image are compared with the caller's model: an export that
dropped the adapter, lost a module or mis-named weights never lands (the LoRA checkpoints that
"cannot be merged or served" users report against the peers). Call it on one process only.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForImageTextToText, GenerationConfig, PreTrainedModel

from adapt.checkpoints.models import torch_dtype
from adapt.data.templates import IMG_CONTEXT, IMG_END, IMG_START, Encoder, chat_template_for, get_template
from adapt.data.tiling import IMAGENET_MEAN, IMAGENET_STD, normalize
from adapt.errors import AdaptError
from adapt.fileio import atomic_dir

PROCESSOR_CLASS = "InternVLProcessor"
VIDEO_TOKEN = "<video>"
BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, as the -hf processor configs store it
EXACT_ATOL = EXACT_RTOL = 1e-4  # fp32 on CPU: merged vs unmerged LoRA differ by rounding only
# Reduced precision (bf16/fp16 weights, or a GPU source): relative L2 error of the logits. bf16
# compute of a healthy model stays near 1e-2; a lost module or unmerged adapter is far larger.
LOW_PRECISION_REL_TOL = 0.05
LEFTOVER_ADAPTER_KEYS = ("lora_", ".base_layer.", "modules_to_save", "original_module")


def export_model(model: Any, tokenizer: Any, template: str, out: str | Path, *, card: dict | None = None,
                 overwrite: bool = False, max_tiles: int = 12, dtype: str | None = None,
                 verify: bool = True) -> Path:
    """Export `model` (plain InternVL or a PeftModel around one) to `out`; returns `out`.

    `dtype` ("bf16", "fp16", "fp32"; None keeps the model's) is the dtype of the written weights.
    `max_tiles` is the tile budget written into the image processor config. `card` feeds README.md
    (base_model, domain, mixture, metrics, training, ...; what is present is rendered).
    With `verify`, a reloaded copy must reproduce the caller's logits or nothing is written.
    """
    get_template(template)
    if max_tiles < 1:
        raise AdaptError(f"max_tiles must be at least 1, got {max_tiles}", hint="pass --max-tiles 12 (InternVL default)")
    stop_ids = Encoder(tokenizer, template).stop_token_ids()  # also checks the image tokens exist
    target = torch_dtype(dtype) if dtype is not None else None
    out = Path(out)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        base = model.get_base_model() if _is_peft(model) else model
        inputs = _probe_inputs(base.config, tokenizer) if verify else None
        reference = _logits(model, inputs) if verify else None
        exported = _exportable(model, target)
        exported.save_pretrained(tmp)  # transformers 5 always writes safetensors
        _patch_json(tmp / "config.json", {"template": template})
        _write_generation_config(tmp, exported, tokenizer, stop_ids)
        write_tokenizer(tmp, tokenizer, template)
        write_processor_configs(tmp, exported.config, max_tiles)
        (tmp / "README.md").write_text(model_card(card or {}, name=out.name, template=template,
                                                  max_tiles=max_tiles, config=exported.config), encoding="utf-8")
        if verify:
            exact = target in (None, torch.float32) and _is_fp32_cpu(model)
            _verify(tmp, inputs, reference, exact)
    return out


def _is_peft(model: Any) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # peft is a dependency, but a plain model needs none of it
        return False
    return isinstance(model, PeftModel)


def _is_fp32_cpu(model: torch.nn.Module) -> bool:
    return all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters())


def _exportable(model: Any, target: torch.dtype | None) -> PreTrainedModel:
    """The plain InternVL model to save: the caller's own, or a merged / converted CPU copy."""
    base = model.get_base_model() if _is_peft(model) else model
    if getattr(base, "hf_quantizer", None) is not None or getattr(base, "is_quantized", False):
        raise AdaptError("cannot export a quantized base model: merging needs full-precision weights",
                         hint="reload the base in bf16, load the adapter with PeftModel.from_pretrained, export that")
    if _is_peft(model):
        # Merge in fp32 when fp32 is asked for; otherwise in the training dtype (peft upcasts the delta).
        merged = _cpu_copy(model, torch.float32 if target == torch.float32 else None).merge_and_unload()
        exported = merged.to(target) if target is not None else merged
    elif target is not None and any(p.dtype != target for p in model.parameters() if p.is_floating_point()):
        exported = _cpu_copy(model, target)
    else:
        exported = model
    leftovers = [k for k in exported.state_dict() if any(m in k for m in LEFTOVER_ADAPTER_KEYS)]
    if leftovers:
        raise AdaptError(f"the model still carries adapter weights after merging ({leftovers[0]}, ...)",
                         hint="wrap adapters with peft (get_peft_model / PeftModel.from_pretrained) so they can be merged")
    return exported


def _cpu_copy(model: torch.nn.Module, dtype: torch.dtype | None) -> Any:
    """deepcopy whose parameters and buffers are fresh CPU tensors (optionally cast): a GPU model is
    not duplicated on the GPU, and ties between parameters survive (the memo is keyed by object)."""
    memo: dict[int, Any] = {}
    for param in model.parameters():
        if id(param) not in memo:
            memo[id(param)] = torch.nn.Parameter(_cpu_tensor(param, dtype), requires_grad=param.requires_grad)
    for buffer in model.buffers():
        if id(buffer) not in memo:
            memo[id(buffer)] = _cpu_tensor(buffer, dtype)
    return copy.deepcopy(model, memo)


def _cpu_tensor(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    cast = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
    return tensor.detach().to(device="cpu", dtype=cast, copy=True)


def _probe_inputs(config: Any, tokenizer: Any) -> dict[str, torch.Tensor]:
    """A short prompt with one random (seeded) tile: the smallest input that runs every module."""
    size = config.vision_config.image_size
    height, width = (size, size) if isinstance(size, int) else size
    tile = torch.randint(0, 256, (1, 3, height, width), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    start, end = tokenizer.convert_tokens_to_ids([IMG_START, IMG_END])
    text = tokenizer("Describe the image:", add_special_tokens=False)["input_ids"]
    answer = tokenizer(" It shows a road.", add_special_tokens=False)["input_ids"]
    ids = text + [start] + [config.image_token_id] * config.image_seq_length + [end] + answer
    return {"input_ids": torch.tensor([ids]), "pixel_values": normalize(tile)}


@torch.no_grad()
def _logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """fp32 CPU logits of `model` in eval mode; each module's train/eval flag is put back after."""
    modes = {module: module.training for module in model.modules()}
    param = next(p for p in model.parameters() if p.is_floating_point())
    try:
        model.eval()
        output = model(input_ids=inputs["input_ids"].to(param.device),
                       pixel_values=inputs["pixel_values"].to(param.device, param.dtype))
    finally:
        for module, training in modes.items():
            module.training = training
    return output.logits.float().cpu()


def _verify(folder: Path, inputs: dict[str, torch.Tensor], reference: torch.Tensor, exact: bool) -> None:
    """Reload the written folder as a user would and require the caller's logits back."""
    reloaded = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32)
    got = _logits(reloaded, inputs)
    del reloaded
    if got.shape != reference.shape:
        raise AdaptError(f"export check failed: reloaded logits have shape {tuple(got.shape)}, the model gave "
                         f"{tuple(reference.shape)}; nothing was written", hint="this is a bug in adapt: please report it")
    max_diff = (got - reference).abs().max().item()
    rel = ((got - reference).norm() / reference.norm().clamp_min(1e-12)).item()
    ok = torch.allclose(got, reference, atol=EXACT_ATOL, rtol=EXACT_RTOL) if exact else rel <= LOW_PRECISION_REL_TOL
    if not ok:
        raise AdaptError(f"export check failed: the reloaded model's logits differ from the trained model's "
                         f"(max |diff| {max_diff:.3g}, relative L2 {rel:.3g}); nothing was written",
                         hint="an adapter or module was lost in the merge; export with verify=False only to debug")


def _patch_json(path: Path, updates: dict[str, Any]) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    data.update(updates)
    _write_json(path, data)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_generation_config(folder: Path, model: PreTrainedModel, tokenizer: Any, stop_ids: list[int]) -> None:
    """Generation stops at the template's end-of-turn token(s), not only at the text model's eos."""
    generation = copy.deepcopy(model.generation_config) if model.generation_config is not None else GenerationConfig()
    generation.eos_token_id = stop_ids
    # A config marked as derived from the model config gets re-derived from it by `generate`, eos included.
    generation._from_model_config = False
    generation.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    generation.save_pretrained(folder)


def hf_chat_template(template: str, tokenizer: Any) -> str:
    """The family chat template with image parts rendered as `<IMG_CONTEXT>`, the placeholder the -hf
    InternVLProcessor (and vLLM) expands into `<img>` + context tokens + `</img>` per image."""
    return chat_template_for(tokenizer, template, image_token=IMG_CONTEXT)


def write_tokenizer(folder: Path, tokenizer: Any, template: str) -> None:
    """Save the tokenizer, then name the image tokens the way InternVLProcessor looks them up
    (`tokenizer.context_image_token` etc.); the caller's tokenizer object is not modified."""
    tokenizer.save_pretrained(folder)
    chat = hf_chat_template(template, tokenizer)
    (folder / "chat_template.jinja").write_text(chat, encoding="utf-8")
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    names = {"start_image_token": IMG_START, "end_image_token": IMG_END, "context_image_token": IMG_CONTEXT,
             "video_token": VIDEO_TOKEN}
    for key, token in names.items():
        config.setdefault(key, token)
        if isinstance(config.get("model_specific_special_tokens"), dict):
            config["model_specific_special_tokens"].setdefault(key, token)
    for loading_flag in ("is_local", "local_files_only"):  # how this process loaded it, not tokenizer data
        config.pop(loading_flag, None)
    config["processor_class"] = PROCESSOR_CLASS
    config["chat_template"] = chat  # older readers look here; chat_template.jinja wins where both exist
    _write_json(config_path, config)


def write_processor_configs(folder: Path, config: Any, max_tiles: int) -> None:
    """The -hf processor files: GotOcr2 image processor with InternVL's dynamic tiling, and the
    InternVLProcessor's tokens-per-tile. Tiling and normalisation match `adapt.data.tiling`."""
    size = config.vision_config.image_size
    height, width = (size, size) if isinstance(size, int) else size
    pixels = {
        "processor_class": PROCESSOR_CLASS, "do_resize": True, "size": {"height": height, "width": width},
        "resample": BICUBIC, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": list(IMAGENET_MEAN), "image_std": list(IMAGENET_STD), "do_convert_rgb": True,
        "data_format": "channels_first", "default_to_square": True,
    }
    _write_json(folder / "preprocessor_config.json", {
        "image_processor_type": "GotOcr2ImageProcessorFast", **pixels,
        "crop_to_patches": True, "min_patches": 1, "max_patches": max_tiles,
    })
    _write_json(folder / "video_preprocessor_config.json", {
        "video_processor_type": "InternVLVideoProcessor", **pixels, "do_sample_frames": False, "initial_shift": True,
    })
    _write_json(folder / "processor_config.json", {
        "processor_class": PROCESSOR_CLASS, "image_seq_length": int(config.image_seq_length),
    })


def model_card(card: dict[str, Any], *, name: str, template: str, max_tiles: int, config: Any) -> str:
    """README.md from a free-form `card` dict; known keys get sections, the rest a details list."""
    card = dict(card)
    base = card.pop("base_model", None)
    domain = card.pop("domain", None)
    mixture = card.pop("mixture", None)
    metrics = card.pop("metrics", None)
    training = card.pop("training", None)
    repo = card.pop("repo_id", None) or name
    title = card.pop("name", None) or name
    license_ = card.pop("license", None)

    tags = ["internvl", "adapt", "image-text-to-text"] + ([f"domain:{domain}"] if domain else [])
    front = ["---", "library_name: transformers", "pipeline_tag: image-text-to-text"]
    if base:
        front.append(f"base_model: {base}")
    if license_:
        front.append(f"license: {license_}")
    front += ["tags:"] + [f"- {tag}" for tag in tags] + ["---", ""]

    lines = front + [f"# {title}", ""]
    summary = "An InternVL vision-language model"
    summary += f" fine-tuned from `{base}`" if base else " fine-tuned"
    summary += f" for the **{domain}** domain" if domain else ""
    lines += [summary + " with adapt.", ""]
    if training is not None:
        lines += ["## Training", ""] + _describe(training, "Setting", "Value") + [""]
    if mixture is not None:
        lines += ["## Data mixture", ""] + _describe(mixture, "Dataset", "Weight") + [""]
    if metrics is not None:
        lines += ["## Evaluation", ""] + _describe(metrics, "Metric", "Value", group="Benchmark") + [""]
    if card:
        lines += ["## Details", ""] + _describe(card, "Key", "Value") + [""]

    tokens = int(config.image_seq_length)
    lines += [
        "## Prompt format", "",
        f"Chat template `{template}` (in `chat_template.jinja`). Each image is cut into up to {max_tiles} "
        f"448x448 tiles (plus a thumbnail when there is more than one) and written as `<img>` + "
        f"`<IMG_CONTEXT>` x ({tokens} x tiles) + `</img>`; `AutoProcessor` does this for you.", "",
        "## Use with transformers", "",
        "```python",
        "import torch",
        "from transformers import AutoModelForImageTextToText, AutoProcessor",
        "",
        f'model = AutoModelForImageTextToText.from_pretrained("{repo}", dtype=torch.bfloat16, device_map="auto")',
        f'processor = AutoProcessor.from_pretrained("{repo}")  # needs torchvision (InternVL video processor)',
        'messages = [{"role": "user", "content": [{"type": "image", "url": "image.jpg"},',
        '                                         {"type": "text", "text": "Describe the image."}]}]',
        "inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,",
        '                                       return_dict=True, return_tensors="pt").to(model.device, torch.bfloat16)',
        "output = model.generate(**inputs, max_new_tokens=256)",
        'print(processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))',
        "```", "",
        "## Use with vLLM", "",
        "```bash",
        f"vllm serve {repo} --max-model-len 8192 --limit-mm-per-prompt '{{\"image\": 4}}'",
        "```", "",
        "```python",
        "from vllm import LLM, SamplingParams",
        "",
        f'llm = LLM(model="{repo}", max_model_len=8192)',
        'messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///path/image.jpg"}},',
        '                                         {"type": "text", "text": "Describe the image."}]}]',
        "print(llm.chat(messages, SamplingParams(max_tokens=256))[0].outputs[0].text)",
        "```", "",
    ]
    return "\n".join(lines)


def _describe(value: Any, key_header: str, value_header: str, group: str | None = None) -> list[str]:
    """A dict (flat, or of dicts: one row per `group`) or a list of dicts as a markdown table; a
    scalar or a list of scalars as text."""
    if isinstance(value, dict):
        if value and all(isinstance(v, dict) for v in value.values()):
            columns = _columns(value.values())
            rows = [[key] + [v.get(c, "") for c in columns] for key, v in value.items()]
            return _table([group or key_header] + columns, rows)
        return _table([key_header, value_header], [[key, v] for key, v in value.items()])
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        columns = _columns(value)
        return _table(columns, [[v.get(c, "") for c in columns] for v in value])
    if isinstance(value, list):
        return [f"- {_cell(v)}" for v in value]
    return [str(value)]


def _columns(rows: Any) -> list[str]:
    columns: list[str] = []
    for row in rows:
        columns += [str(c) for c in row if str(c) not in columns]
    return columns


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]


def _cell(value: Any) -> str:
    if isinstance(value, float):
        text = f"{value:.4g}"
    elif isinstance(value, (dict, list)):
        text = json.dumps(value, ensure_ascii=False)
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")
