"""The export writes a folder that plain transformers reloads into the same model (LoRA merged), with
the tokenizer, chat template, generation stops and processor files the -hf InternVL checkpoints ship,
and a folder only ever appears complete."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import (
    AutoImageProcessor,
    AutoModelForImageTextToText,
    AutoTokenizer,
    GenerationConfig,
    InternVLForConditionalGeneration,
)

from adapt.checkpoints import export
from adapt.checkpoints.export import export_model
from adapt.checkpoints.models import load
from adapt.data.templates import IMG_CONTEXT, IMG_END, IMG_START, TEMPLATES, Encoder
from adapt.data.tiling import TilingPolicy, count_tiles, normalize, tile_image
from adapt.errors import AdaptError

LLM_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
CARD = {"base_model": "OpenGVLab/InternVL3-1B-hf", "domain": "remote sensing",
        "mixture": {"rsvqa_hr": 0.6, "general": 0.4},
        "metrics": {"rsvqa_hr": {"accuracy": 0.8125, "bleu_4": 0.3377}},
        "training": {"mode": "lora", "r": 8, "lr": 4e-5}, "seed": 7}


def _record(question="What is in this image?"):
    return {"id": "p", "image": "a.jpg", "conversations": [{"from": "human", "value": f"<image>\n{question}"},
                                                            {"from": "gpt", "value": "Two cars."}]}


@pytest.fixture(scope="module")
def probe(tiny_tokenizer):
    """A 896x448 image -> 2 tiles + thumbnail, placed by the training encoder (not by the exporter)."""
    pixels = np.random.default_rng(0).integers(0, 256, (448, 896, 3), dtype=np.uint8)
    tiles = torch.from_numpy(tile_image(pixels))
    ids = Encoder(tiny_tokenizer, "internvl2_5", 256).encode(_record(), [len(tiles)]).input_ids
    return {"input_ids": torch.tensor([ids]), "pixel_values": normalize(tiles)}


@torch.no_grad()
def _logits(model, probe):
    model.eval()
    return model(**probe).logits


def _weight_keys(folder):
    keys = []
    for shard in folder.glob("*.safetensors"):
        with safe_open(shard, "pt") as handle:
            keys += list(handle.keys())
    return keys


def _lora(target_modules, seed, modules_to_save=None):
    """A fresh tiny model with a LoRA whose B matrices are non-zero (a trained adapter)."""
    loaded = load("tiny", seed=seed)
    model = get_peft_model(loaded.model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1,
                                                    target_modules=target_modules, modules_to_save=modules_to_save))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    return model, loaded


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    return export_model(tiny.model, tiny.tokenizer, tiny.template, tmp_path_factory.mktemp("exp") / "tiny-rs",
                        card=CARD, max_tiles=6)


def test_plain_export_reloads_with_same_logits(tiny, exported, probe):
    expected = _logits(tiny.model, probe)
    for cls in (AutoModelForImageTextToText, InternVLForConditionalGeneration):
        reloaded = cls.from_pretrained(exported, dtype=torch.float32)
        assert isinstance(reloaded, InternVLForConditionalGeneration)
        torch.testing.assert_close(_logits(reloaded, probe), expected, atol=1e-5, rtol=1e-5)
    assert json.loads((exported / "config.json").read_text())["template"] == "internvl2_5"
    assert not list(exported.parent.glob(".*partial"))


def test_lora_export_is_merged_and_caller_model_untouched(tmp_path, probe):
    model, loaded = _lora(LLM_TARGETS, seed=1)
    with model.disable_adapter():
        base_logits = _logits(model, probe)
    adapted = _logits(model, probe)
    assert (adapted - base_logits).abs().max() > 1e-2  # the adapter matters, so a lost merge shows
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    out = export_model(model, loaded.tokenizer, loaded.template, tmp_path / "lora")

    reloaded = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32)
    torch.testing.assert_close(_logits(reloaded, probe), adapted, atol=1e-4, rtol=1e-4)
    keys = _weight_keys(out)
    assert keys and not [k for k in keys if "lora_" in k or "base_layer" in k]
    # The caller keeps training: same adapter weights, still wrapped, still in train mode (dropout on).
    assert model.training and all(m.training for m in model.modules())
    after = model.state_dict()
    assert before.keys() == after.keys() and any("lora_A" in k for k in after)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_vision_lora_and_projector_modules_to_save(tmp_path, probe):
    model, loaded = _lora(r".*vision_tower.*\.(q_proj|v_proj)", seed=2, modules_to_save=["multi_modal_projector"])
    expected = _logits(model, probe)
    out = export_model(model, loaded.tokenizer, loaded.template, tmp_path / "vision")
    reloaded = InternVLForConditionalGeneration.from_pretrained(out, dtype=torch.float32)
    torch.testing.assert_close(_logits(reloaded, probe), expected, atol=1e-4, rtol=1e-4)
    assert not [k for k in _weight_keys(out) if "modules_to_save" in k or "original_module" in k or "lora_" in k]


def test_bf16_export_leaves_source_in_fp32(tiny, tmp_path, probe):
    out = export_model(tiny.model, tiny.tokenizer, tiny.template, tmp_path / "bf16", dtype="bf16")
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.bfloat16}
    assert {p.dtype for p in tiny.model.parameters()} == {torch.float32}
    reloaded = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32)
    expected = _logits(tiny.model, probe)
    assert ((_logits(reloaded, probe) - expected).norm() / expected.norm()) < 0.05


def test_tokenizer_and_chat_template_give_training_ids(tiny_tokenizer, exported):
    tok = AutoTokenizer.from_pretrained(exported)
    names = {"start_image_token": IMG_START, "end_image_token": IMG_END, "context_image_token": IMG_CONTEXT}
    for attr, token in names.items():  # what InternVLProcessor.__init__ reads off the tokenizer
        assert getattr(tok, attr) == token
        assert getattr(tok, attr + "_id") == tiny_tokenizer.convert_tokens_to_ids(token)
    assert tok.video_token == "<video>"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in this image?"}]}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.count(IMG_CONTEXT) == 1 and text.endswith("<|im_start|>assistant\n")
    # InternVLProcessor.replace_image_token: each <IMG_CONTEXT> -> <img> + ctx * 256 * patches + </img>
    patches = count_tiles(896, 448, max_tiles=6)
    expanded = text.replace(IMG_CONTEXT, IMG_START + IMG_CONTEXT * 256 * patches + IMG_END)
    expected = Encoder(tiny_tokenizer, "internvl2_5", 256).encode(_record(), [patches], generation=True).input_ids
    assert tok(expanded, add_special_tokens=False)["input_ids"] == expected


def test_generation_config_stops_at_end_of_turn(tiny_tokenizer, exported):
    generation = GenerationConfig.from_pretrained(exported)
    stops = tiny_tokenizer.convert_tokens_to_ids(list(TEMPLATES["internvl2_5"].stop))
    assert generation.eos_token_id == stops and tiny_tokenizer.convert_tokens_to_ids("<|im_end|>") in stops
    assert generation.pad_token_id == tiny_tokenizer.pad_token_id


def test_processor_files_reproduce_training_tiles(exported):
    config = json.loads((exported / "preprocessor_config.json").read_text())
    assert config["image_processor_type"] == "GotOcr2ImageProcessorFast"
    assert (config["crop_to_patches"], config["min_patches"], config["max_patches"]) == (True, 1, 6)
    assert config["size"] == {"height": 448, "width": 448} and config["resample"] == 3
    assert config["image_mean"] == [0.485, 0.456, 0.406] and config["image_std"] == [0.229, 0.224, 0.225]
    assert json.loads((exported / "processor_config.json").read_text()) == {
        "processor_class": "InternVLProcessor", "image_seq_length": 256}
    processor = AutoImageProcessor.from_pretrained(exported)  # PIL backend here (no torchvision)
    rng = np.random.default_rng(1)
    for width, height in [(896, 448), (300, 200), (1600, 900), (100, 500)]:
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        got = processor(images=Image.fromarray(pixels), return_tensors="pt")
        ours = normalize(torch.from_numpy(tile_image(pixels, TilingPolicy(max_tiles=6), resample="pil")))
        assert got["num_patches"].tolist() == [count_tiles(width, height, max_tiles=6)]
        torch.testing.assert_close(got["pixel_values"], ours, atol=1e-5, rtol=0)


def _torchvision_imports() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:  # the CPU machines here have only a CUDA wheel, or none
        return False
    return True


@pytest.mark.skipif(not _torchvision_imports(), reason="InternVLProcessor needs torchvision (its video processor)")
def test_exported_folder_runs_with_auto_processor(exported):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(exported)
    model = AutoModelForImageTextToText.from_pretrained(exported).eval()
    messages = [{"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (896, 448))},
                                             {"type": "text", "text": "What is in this image?"}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    assert inputs["pixel_values"].shape[0] == count_tiles(896, 448, max_tiles=6)
    output = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert output.shape[1] == inputs["input_ids"].shape[1] + 2


def test_model_card(exported):
    readme = (exported / "README.md").read_text()
    assert "base_model: OpenGVLab/InternVL3-1B-hf" in readme and "remote sensing" in readme
    assert "| rsvqa_hr | 0.8125 | 0.3377 |" in readme and "| Benchmark | accuracy | bleu_4 |" in readme
    assert "| rsvqa_hr | 0.6 |" in readme and "| lr | 4e-05 |" in readme and "| seed | 7 |" in readme
    assert "AutoModelForImageTextToText.from_pretrained" in readme and "vllm serve" in readme


def test_failed_export_leaves_no_folder(tiny, tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # a kill at the last step, after every file was written

    monkeypatch.setattr(export, "_verify", crash)
    with pytest.raises(KeyboardInterrupt):
        export_model(tiny.model, tiny.tokenizer, tiny.template, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_lost_adapter_is_caught(tmp_path, monkeypatch, probe):
    """An export that drops the adapter (unload instead of merge) must fail the check, not land."""
    model, loaded = _lora(LLM_TARGETS, seed=3)
    monkeypatch.setattr(export, "_exportable", lambda m, dtype: export._cpu_copy(m, None).unload())
    with pytest.raises(AdaptError, match="export check failed"):
        export_model(model, loaded.tokenizer, loaded.template, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_existing_folder_needs_overwrite(tiny, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    with pytest.raises(AdaptError, match="already exists"):
        export_model(tiny.model, tiny.tokenizer, tiny.template, out, verify=False)
    assert (out / "stale.txt").exists()
    export_model(tiny.model, tiny.tokenizer, tiny.template, out, overwrite=True, verify=False)
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").exists()
