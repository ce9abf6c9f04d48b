"""Preference optimisation (DPO, and InternVL 2.5-MPO's loss mix) on TRL's DPOTrainer.

A `preference` record: {"id", "image" (optional, one path or a list), "prompt" (the human turn, with
<image> placeholders as in conversations), "chosen", "rejected", "meta" (optional, e.g. task and
answer for the task metrics)}. Everything goes through TRL's public DPOTrainer and DPOConfig; adapt
adds the data path, because TRL's own vision path runs a HF processor and InternVL here is tiled and
templated by adapt (adapt.data.tiling / templates, so training, evaluation and generation see the
same prompt). What had to be adapted, and why:
  * the dataset TRL sees holds the text (TRL tokenises it for its own bookkeeping) and a `pair`
    index; `PreferenceCollator` ignores TRL's token ids and builds both sequences with adapt's
    SampleBuilder (tiles, image tokens, template), so no `image` column may reach TRL (that would
    switch it to its processor path);
  * the batch is TRL's layout: all chosen rows, then all rejected rows, right padded, with
    `completion_mask` from adapt's labels (the answer tokens), and `pixel_values` holding the tiles
    of the chosen rows then of the rejected rows (InternVL fills image tokens in batch order), already
    normalised: TRL passes every batch key except its own to the model as is;
  * `remove_unused_columns=False`, so the `pair` index reaches the collator;
  * full training needs an explicit reference model (TRL would load one from the hub id otherwise).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import Field
from pydantic.dataclasses import dataclass as checked_dataclass
from transformers import TrainerCallback

from adapt.checkpoints.models import Loaded
from adapt.data.records import Record
from adapt.data.samples import Sample, SampleBuilder
from adapt.data.templates import IGNORE_INDEX
from adapt.data.tiling import normalize
from adapt.errors import AdaptError
from adapt.training.trainer import (
    LLM_LORA_TARGETS,
    CompletedCheckpoints,
    PostTrainOptions,
    TrainConfig,
    last_complete_checkpoint,
    make_builder,
    precision_flags,
)

# TRL's loss types and weights; "mpo" is InternVL 2.5-MPO's mix (preference + quality + generation),
# with the weights TRL's DPOConfig documents for it.
LOSS_PRESETS: dict[str, tuple[list[str], list[float]]] = {
    "dpo": (["sigmoid"], [1.0]),
    "mpo": (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0]),
}

PreferencePair = tuple[Record, str]  # (preference record, image root)


@checked_dataclass
class PreferenceConfig(PostTrainOptions):
    """A preference stage: the loss mix, beta, batch shape and length on top of the shared post-training
    options (ranges declared here; `adapt dpo --opt key=value` is checked against them)."""

    loss: str = "mpo"  # a LOSS_PRESETS name
    beta: Annotated[float, Field(gt=0)] = 0.1
    lr_scheduler_type: str = "constant"
    warmup_steps: Annotated[float, Field(ge=0)] = 0.0  # below 1: a share of the steps (TrainingArguments' rule)
    per_device_train_batch_size: Annotated[int, Field(ge=1)] = 2  # pairs per micro-batch
    gradient_accumulation_steps: Annotated[int, Field(ge=1)] = 1
    max_length: Annotated[int, Field(ge=1)] = 8192
    extra: dict[str, Any] = field(default_factory=dict)  # further DPOConfig fields, passed as given

    def validate(self) -> None:
        super().validate()
        if self.loss not in LOSS_PRESETS:
            raise AdaptError(f"unknown preference loss {self.loss!r}", hint=f"use one of: {', '.join(LOSS_PRESETS)}")


def pair_records(pair: Record) -> tuple[Record, Record]:
    """The chosen and the rejected conversation of a preference record (same prompt and images)."""
    base = {k: v for k, v in pair.items() if k not in ("prompt", "chosen", "rejected", "conversations")}
    return tuple({**base, "id": f"{pair.get('id', 'pair')}:{side}",  # type: ignore[return-value]
                  "conversations": [{"from": "human", "value": pair["prompt"]},
                                    {"from": "gpt", "value": pair[side]}]} for side in ("chosen", "rejected"))


class PreferenceCollator:
    """Rows {"pair": i} -> TRL's DPO batch built by adapt: [chosen..., rejected...] right padded,
    completion_mask over the answer tokens, pixel_values in the same row order."""

    def __init__(self, builder: SampleBuilder, pairs: Sequence[PreferencePair], pad_token_id: int,
                 dtype: torch.dtype = torch.float32) -> None:
        self.builder, self.pairs, self.pad_token_id, self.dtype = builder, list(pairs), pad_token_id, dtype

    def samples(self, index: int) -> tuple[Sample, Sample]:
        record, root = self.pairs[index]
        chosen, rejected = pair_records(record)
        return (self.builder.build(chosen, root, index=index), self.builder.build(rejected, root, index=index))

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        built = [self.samples(int(row["pair"])) for row in rows]
        ordered = [c for c, _ in built] + [r for _, r in built]
        width = max(len(s) for s in ordered)
        ids = torch.full((len(ordered), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        completion = torch.zeros_like(ids)
        for row, sample in enumerate(ordered):
            ids[row, :len(sample)] = sample.input_ids
            mask[row, :len(sample)] = 1
            completion[row, :len(sample)] = (sample.labels != IGNORE_INDEX).long()
        batch = {"input_ids": ids, "attention_mask": mask, "completion_mask": completion}
        tiles = [s.tiles for s in ordered if s.tiles is not None]
        if tiles:
            batch["pixel_values"] = normalize(torch.cat(tiles), self.dtype)
        return batch


def _dtype(model: torch.nn.Module) -> torch.dtype:
    return next(p for p in model.parameters() if p.is_floating_point()).dtype


def pair_builder(loaded: Loaded, config: PreferenceConfig, *, train: bool) -> SampleBuilder:
    """The SampleBuilder both sides of a pair are built with (the tiling and template of training)."""
    return make_builder(loaded, TrainConfig(max_tiles=config.max_tiles, max_length=config.max_length,
                                            seed=config.seed), train=train)


@torch.no_grad()
def preference_scores(loaded: Loaded, pairs: Sequence[PreferencePair], *, max_tiles: int = 6,
                      batch_size: int = 4) -> dict[str, float | int | None]:
    """Held-out preference accuracy (share of pairs whose chosen answer the model finds more likely
    than the rejected one, summed log-probabilities) and mean margin (chosen minus rejected log-prob).
    Absolute, not relative to a reference model, so the value before training means something."""
    if not pairs:
        return {"accuracy": None, "margin": None, "pairs": 0}
    model = loaded.model
    was_training = model.training
    model.eval()
    builder = pair_builder(loaded, PreferenceConfig(max_tiles=max_tiles), train=False)
    collator = PreferenceCollator(builder, pairs, loaded.tokenizer.pad_token_id, _dtype(model))
    device = next(model.parameters()).device
    margins: list[float] = []
    for start in range(0, len(pairs), batch_size):
        rows = [{"pair": i} for i in range(start, min(start + batch_size, len(pairs)))]
        batch = {k: v.to(device) for k, v in collator(rows).items()}
        completion = batch.pop("completion_mask")
        logits = model(**batch, use_cache=False).logits[:, :-1].float()
        targets = batch["input_ids"][:, 1:]
        token_logps = torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]
        sums = (token_logps * completion[:, 1:]).sum(-1)
        chosen, rejected = sums.chunk(2)
        margins += (chosen - rejected).tolist()
    model.train(was_training)
    return {"accuracy": sum(m > 0 for m in margins) / len(margins), "margin": sum(margins) / len(margins),
            "pairs": len(margins)}


@dataclass
class PreferenceResult:
    model: torch.nn.Module
    steps: int
    log_history: list[dict[str, Any]]


def train_preference(loaded: Loaded, pairs: Sequence[PreferencePair], config: PreferenceConfig,
                     output_dir: str | Path, *, resume: bool = False, callbacks: Sequence[TrainerCallback] = (),
                     progress: bool = True) -> PreferenceResult:
    """DPO / MPO on (preference record, root) pairs with TRL's DPOTrainer; full or LoRA."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    config.validate()
    if not pairs:
        raise AdaptError("no preference pair to train on")
    loss_type, loss_weights = LOSS_PRESETS[config.loss]
    precision = precision_flags(config.precision)
    model = loaded.model
    for p in model.parameters():
        p.requires_grad_(config.mode == "full")
    args = DPOConfig(
        output_dir=str(output_dir), loss_type=loss_type, loss_weights=loss_weights, beta=config.beta,
        learning_rate=config.learning_rate, lr_scheduler_type=config.lr_scheduler_type, warmup_steps=config.warmup_steps,
        num_train_epochs=config.num_train_epochs, max_steps=config.max_steps,
        per_device_train_batch_size=config.per_device_train_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps, save_steps=config.save_steps,
        logging_steps=config.logging_steps, seed=config.seed, data_seed=config.seed, remove_unused_columns=False,
        max_length=None, gradient_checkpointing=False, dataloader_num_workers=0, report_to="none",
        use_cpu=not torch.cuda.is_available(), disable_tqdm=not progress, **precision, **config.extra)
    text = {"prompt": [r["prompt"] for r, _ in pairs], "chosen": [r["chosen"] for r, _ in pairs],
            "rejected": [r["rejected"] for r, _ in pairs], "pair": list(range(len(pairs)))}
    lora = None
    if config.mode == "lora":
        lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, target_modules=LLM_LORA_TARGETS,
                          lora_dropout=0.0)
    collator = PreferenceCollator(pair_builder(loaded, config, train=True), pairs, loaded.tokenizer.pad_token_id,
                                  _dtype(model))
    trainer = DPOTrainer(model=model, ref_model=copy.deepcopy(model).eval() if lora is None else None, args=args,
                         data_collator=collator, train_dataset=Dataset.from_dict(text),
                         processing_class=loaded.tokenizer, peft_config=lora,
                         callbacks=[CompletedCheckpoints(), *callbacks])
    checkpoint = last_complete_checkpoint(output_dir) if resume else None
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    return PreferenceResult(trainer.model, trainer.state.global_step, list(trainer.state.log_history))
