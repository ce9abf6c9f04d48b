"""Training modes move exactly the weights they claim to, the loss reductions reach the optimizer as
defined, and an exported model reproduces the trained one.

Every run: the random-init tiny model, one one-tile image row and two text rows, 2 optimizer
steps with lr 1e-2, no warmup and no weight decay (so a weight changes only when a gradient
reaches it, and every weight that gets one does change)."""

from __future__ import annotations

import math
import re

import pytest
import torch
from helpers import changed, fast_config, snapshot, write_records
from transformers import AutoModelForImageTextToText, TrainerCallback

from adapt.checkpoints.export import export_model
from adapt.checkpoints.models import load
from adapt.data.templates import IGNORE_INDEX
from adapt.data.tiling import normalize
from adapt.errors import AdaptError
from adapt.training.trainer import TrainConfig, apply_tuning_mode, make_builder, train

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread, the cores are shared

PROJECTOR = "model.multi_modal_projector."
LLM = "model.language_model."
VISION = "model.vision_tower."
LORA_R = 4
# The modules each LoRA variant must wrap, written out by hand (not the engine's regexes).
LLM_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VISION_LINEARS = ("q_proj", "k_proj", "v_proj", "projection_layer", "fc1", "fc2")


class StartSnapshot(TrainerCallback):
    """Parameters as the optimizer first sees them (after freezing / LoRA wrapping)."""

    def __init__(self) -> None:
        self.before: dict[str, torch.Tensor] = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.before = snapshot(model)


@pytest.fixture(scope="module")
def entries(tmp_path_factory):
    return write_records(tmp_path_factory.mktemp("records"), n_images=1, n_text=2)


def _train(entries, tmp_path, steps: int = 2, **overrides):
    loaded = load("tiny", seed=0)
    start = StartSnapshot()
    config = fast_config(max_steps=steps, **overrides)
    result = train(loaded, entries, config, tmp_path / "out", callbacks=[start], progress=False)
    print(result.trainable)
    assert result.steps == steps
    return loaded, result, start.before, snapshot(result.model)


@pytest.fixture(scope="module")
def shared(entries, tmp_path_factory):
    """Runs that several tests inspect (the full run, the plain LoRA run), trained once."""
    cache: dict[str, tuple] = {}

    def get(mode: str):
        if mode not in cache:
            options = {"lora": {"mode": "lora", "lora_r": LORA_R, "lora_alpha": 8}, "full": {"mode": "full"}}[mode]
            cache[mode] = _train(entries, tmp_path_factory.mktemp(mode), **options)
        return cache[mode]

    return get


def _counts(trainable: str) -> tuple[int, int]:
    match = re.fullmatch(r"trainable parameters: ([\d,]+) of ([\d,]+) \(.*%\)", trainable)
    assert match, trainable
    return int(match.group(1).replace(",", "")), int(match.group(2).replace(",", ""))


def _base_params() -> dict[str, int]:
    return {name: p.numel() for name, p in load("tiny", seed=0).model.named_parameters()}


# ----------------------------------------------------------------------------------------------
# full and partial
# ----------------------------------------------------------------------------------------------
PARTIAL_EXPECTED = {
    "mlp": (PROJECTOR,),
    "mlp+llm": (PROJECTOR, LLM),
    "vit-last-1": (PROJECTOR, LLM, "model.vision_tower.encoder.layer.1."),
}


def test_full_mode_trains_every_parameter(shared):
    _, result, before, after = shared("full")
    assert changed(before, after) == set(before)
    total = sum(_base_params().values())
    assert _counts(result.trainable) == (total, total)
    assert all(torch.isfinite(p).all() for p in after.values())


@pytest.mark.parametrize("preset", sorted(PARTIAL_EXPECTED))
def test_partial_presets_train_only_their_modules(entries, tmp_path, preset):
    _, result, before, after = _train(entries, tmp_path, mode="partial", partial=preset)
    expected = {name for name in before if name.startswith(PARTIAL_EXPECTED[preset])}
    assert expected and expected != set(before)
    assert changed(before, after) == expected
    base = _base_params()
    assert _counts(result.trainable) == (sum(base[n] for n in expected), sum(base.values()))


def test_explicit_trainable_patterns(entries, tmp_path):
    patterns = [r"model\.language_model\.layers\.1\.mlp\..*", r"model\.vision_tower\.embeddings\.cls_token"]
    _, result, before, after = _train(entries, tmp_path, mode="partial", trainable=patterns)
    expected = {"model.language_model.layers.1.mlp.gate_proj.weight", "model.language_model.layers.1.mlp.up_proj.weight",
                "model.language_model.layers.1.mlp.down_proj.weight", "model.vision_tower.embeddings.cls_token"}
    assert changed(before, after) == expected
    base = _base_params()
    assert _counts(result.trainable) == (sum(base[n] for n in expected), sum(base.values()))


# ----------------------------------------------------------------------------------------------
# LoRA
# ----------------------------------------------------------------------------------------------
def _original_name(peft_name: str) -> str:
    """The plain model's name of a PEFT-wrapped base weight."""
    name = peft_name.removeprefix("base_model.model.")
    return name.replace(".base_layer.", ".").replace(".original_module.", ".")


def _lora_expected_count(vision: bool, projector: bool) -> int:
    model = load("tiny", seed=0).model
    count = 0
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, torch.nn.Linear) and (
                (name.startswith(LLM) and leaf in LLM_LINEARS) or (vision and name.startswith(VISION)
                                                                   and leaf in VISION_LINEARS)):
            count += LORA_R * (module.in_features + module.out_features)
    if projector:
        count += sum(p.numel() for n, p in model.named_parameters() if n.startswith(PROJECTOR))
    return count


@pytest.mark.parametrize(("vision", "projector"), [(False, True), (True, True), (False, False)],
                         ids=["llm", "llm+vision", "llm-frozen-projector"])
def test_lora_trains_adapters_only(entries, tmp_path, shared, vision, projector):
    if not vision and projector:
        _, result, before, after = shared("lora")
    else:
        _, result, before, after = _train(entries, tmp_path, mode="lora", lora_r=LORA_R, lora_alpha=8,
                                          lora_vision=vision, lora_train_projector=projector)
    lora = {n for n in before if "lora_" in n}
    copies = {n for n in before if ".modules_to_save." in n}
    base = set(before) - lora - copies
    moved = changed(before, after)

    assert moved == lora | copies  # every adapter weight learned, no base weight moved
    assert {_original_name(n) for n in base} == set(_base_params())  # base weights all accounted for
    original = load("tiny", seed=0).model.state_dict()
    assert all(torch.equal(after[n], original[_original_name(n)]) for n in base)
    assert any(n.startswith(f"base_model.model.{VISION}") for n in lora) == vision
    assert any(n.startswith(f"base_model.model.{LLM}") for n in lora)
    assert bool(copies) == projector
    assert all(PROJECTOR in n for n in copies)

    trainable, total = _counts(result.trainable)
    expected = _lora_expected_count(vision, projector)
    assert trainable == expected
    assert total == sum(_base_params().values()) + expected  # every trainable weight is a new one


# ----------------------------------------------------------------------------------------------
# loss reduction and gradient checkpointing
# ----------------------------------------------------------------------------------------------
def _expected_first_loss(entries, reduction: str) -> float:
    """The loss of step 1 from per-sample CE of the untrained model, each sample run on its own."""
    loaded = load("tiny", seed=0)
    builder = make_builder(loaded, TrainConfig())
    numerator = denominator = 0.0
    with torch.no_grad():
        for index, (record, root) in enumerate(entries):
            sample = builder.build(record, root, index=index, epoch=0)
            kwargs = {"pixel_values": normalize(sample.tiles)} if sample.tiles is not None else {}
            logits = loaded.model(input_ids=sample.input_ids[None], **kwargs).logits[0, :-1]
            targets = sample.labels[1:]
            mask = targets != IGNORE_INDEX
            ce = torch.nn.functional.cross_entropy(logits[mask].double(), targets[mask], reduction="sum").item()
            n = int(mask.sum())
            weight = {"token": 1.0, "sample": 1.0 / n, "square": 1.0 / math.sqrt(n)}[reduction]
            numerator += weight * ce
            denominator += weight * n
    return numerator / denominator


def test_loss_reductions_weight_samples_as_defined(entries, tmp_path, shared):
    """The first logged loss (before any update) against the reduction's formula; square is the
    default, so the shared full run is its case."""
    expected = {r: _expected_first_loss(entries, r) for r in ("token", "sample", "square")}
    # the rows have different numbers of supervised tokens, so the three reductions must differ
    assert len({round(v, 3) for v in expected.values()}) == 3
    for reduction, value in expected.items():
        if reduction == "square":
            _, result, before, after = shared("full")
        else:
            _, result, before, after = _train(entries, tmp_path / reduction, steps=1, loss_reduction=reduction)
        first = next(row["loss"] for row in result.log_history if "loss" in row)
        assert first == pytest.approx(value, rel=1e-4), reduction
        assert changed(before, after) == set(before)  # it trains


def test_gradient_checkpointing_gives_the_same_update(entries, tmp_path, shared):
    _, _, before, plain = shared("full")
    _, _, _, checkpointed = _train(entries, tmp_path, mode="full", gradient_checkpointing=True)
    assert changed(before, checkpointed) == set(before)
    for name, value in plain.items():
        torch.testing.assert_close(checkpointed[name], value, atol=1e-5, rtol=1e-5, msg=name)


def test_gradient_checkpointing_with_lora(entries, tmp_path):
    """One step: lora_B (zero at init) and the projector copy get gradients through the recomputed
    activations (lora_A only from step 2 on, once B is non-zero)."""
    _, _, before, after = _train(entries, tmp_path, steps=1, mode="lora", lora_r=LORA_R,
                                 gradient_checkpointing=True)
    assert changed(before, after) == {n for n in before if "lora_B" in n or ".modules_to_save." in n}


# ----------------------------------------------------------------------------------------------
# user errors
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("options", "message"), [
    ({"mode": "freeze"}, "unknown training mode 'freeze'"),
    ({"mode": "partial"}, "partial training needs a preset"),
    ({"mode": "partial", "partial": "attention"}, "unknown partial preset 'attention'"),
    ({"mode": "partial", "partial": "vit-last-3"}, "vit-last-3: the vision tower has 2 layers"),
    ({"mode": "partial", "trainable": [r"model\.nothing\..*"]}, "no parameter matches"),
    ({"mode": "lora", "lora_targets": r".*\.not_a_module"}, "no module matches the LoRA targets"),
    pytest.param({"mode": "lora", "qlora": True}, "QLoRA needs a CUDA GPU",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="QLoRA is allowed with a GPU")),
    ({"loss_reduction": "mean"}, "unknown loss reduction 'mean'"),
    ({"save_total_limit": 1}, "save_total_limit 1 can leave no complete checkpoint"),
])
def test_bad_training_options_are_user_errors(entries, tmp_path, options, message):
    with pytest.raises(AdaptError, match=re.escape(message)):
        train(load("tiny", seed=0), entries, fast_config(max_steps=1, **options), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_unknown_option_names_are_user_errors():
    with pytest.raises(AdaptError, match="unknown training option"):
        TrainConfig.from_dict({"learning_rate": 1e-3, "lr": 1e-3})


@pytest.mark.skipif(torch.cuda.is_available(), reason="QLoRA is allowed with a GPU")
def test_qlora_refused_on_cpu_before_touching_the_model():
    model = load("tiny", seed=0).model
    with pytest.raises(AdaptError, match="QLoRA"):
        apply_tuning_mode(model, TrainConfig(mode="lora", qlora=True))
    assert type(model).__name__ == "InternVLForConditionalGeneration"


# ----------------------------------------------------------------------------------------------
# export reproduces the trained model
# ----------------------------------------------------------------------------------------------
def _probe(loaded, entries) -> dict[str, torch.Tensor]:
    record, root = entries[0]
    sample = make_builder(loaded, TrainConfig(), train=False).build(record, root)
    return {"input_ids": sample.input_ids[None], "pixel_values": normalize(sample.tiles)}


@torch.no_grad()
def _logits(model, inputs) -> torch.Tensor:
    model.eval()
    return model(**inputs).logits.float()


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_export_reloads_as_the_trained_model(entries, tmp_path, shared, mode):
    loaded, result, _, _ = shared(mode)
    inputs = _probe(loaded, entries)
    trained = _logits(result.model, inputs)
    untrained = _logits(load("tiny", seed=0).model, inputs)
    assert (trained - untrained).abs().max() > 1e-2  # training moved the outputs: the check below can fail

    folder = export_model(result.model, loaded.tokenizer, loaded.template, tmp_path / "export")
    assert not any("lora" in p.name or "adapter" in p.name for p in folder.iterdir())
    reloaded = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32)
    torch.testing.assert_close(_logits(reloaded, inputs), trained, atol=1e-4, rtol=1e-4)
