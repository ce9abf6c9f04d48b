"""Fine-tuning on the HF Trainer: tuning modes, packed batches, the InternVL loss, safe checkpoints.

The Trainer (with accelerate underneath) owns the loop, optimizer, scheduler, mixed precision,
DDP / FSDP / DeepSpeed, logging and checkpoint/resume; this module adds what it does not know:
  * tuning modes: full, partial presets (mlp, mlp+llm, vit-last-N) or patterns, LoRA (peft);
  * a rank-aware batch sampler over packed rows: every sample once per epoch across all ranks,
    the same order for the same seed, and the same batches after a resume;
  * uint8 tiles normalised on the device, logits computed only where a label is supervised
    (the vocabulary projection of 3k image tokens is the largest tensor of a step otherwise);
  * per-sample (varlen) attention over packed rows (`attn_implementation: auto`, see adapt.training.attention),
    per-module gradient checkpointing, pinned non-blocking copies, workers sized to the machine
    (each switchable, so benchmarks/train_throughput.py can show what it buys);
  * the token / sample / square loss reduction normalised over the whole optimizer step;
  * a divergence guard and checkpoints that count only once completely written.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import typing
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
from pydantic import ConfigDict, Field, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass as pydantic_dataclass
from torch.utils.data import DataLoader, Dataset, Sampler
from transformers import PreTrainedModel, Trainer, TrainerCallback, TrainingArguments
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask
from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_callback import PrinterCallback, TrainerState

from adapt import console
from adapt.checkpoints.models import Loaded, count_parameters
from adapt.checkpoints.pickles import pickles_refused
from adapt.config import available_cores
from adapt.data.batching import Collator, pack_flat
from adapt.data.mixing import Plans
from adapt.data.records import Record
from adapt.data.samples import SampleBuilder, SampleDropped
from adapt.data.templates import IGNORE_INDEX, Encoder
from adapt.data.tiling import TilingPolicy, normalize
from adapt.errors import AdaptError, Report, validation_error
from adapt.fileio import atomic_write_text
from adapt.training.attention import resolve_attn_implementation

MODES = ("full", "partial", "lora")
PARTIAL_PRESETS = ("mlp", "mlp+llm", "vit-last-N")
LLM_LORA_TARGETS = (r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|qkv_proj|gate_proj|up_proj|down_proj"
                    r"|gate_up_proj)")
VISION_LORA_TARGETS = r".*vision_tower.*\.(q_proj|k_proj|v_proj|projection_layer|fc1|fc2)"
COMPLETE_MARKER = "adapt-complete.json"
# What a sample that fails to decode at training time becomes (with its labels ignored).
STAND_IN: Record = {"id": "dropped", "conversations": [{"from": "human", "value": "."},
                                                  {"from": "gpt", "value": "."}]}
CHECKPOINTING = ("none", "llm", "vision", "all")
LOGITS = ("supervised", "full")
NORMALIZE_ON = ("device", "host")


# TrainingArguments fields adapt sets from its own options (or must own, like the output folder):
# passing them through would silently fight adapt's choice.
ADAPT_OWNED_ARGUMENTS = ("output_dir", "bf16", "fp16", "use_cpu", "remove_unused_columns", "gradient_checkpointing",
                         "accelerator_config", "ddp_find_unused_parameters", "average_tokens_across_devices",
                         "disable_tqdm", "logging_dir")


@pydantic_dataclass(config=ConfigDict(extra="forbid"))
class TrainConfig:
    """Every knob of a training run (the Mini-InternVL recipe by default); saved with the run.

    Options that mean what a `transformers.TrainingArguments` field means carry its name; any other
    TrainingArguments field (optim, adam_beta2, eval_strategy, ...) goes into `training_arguments`
    and reaches the Trainer unchanged. Types and ranges are checked here, where they are declared."""

    mode: str = "full"
    partial: str | None = None  # mlp | mlp+llm | vit-last-N (e.g. vit-last-4)
    trainable: list[str] = field(default_factory=list)  # explicit regexes over parameter names (partial)
    lora_r: Annotated[int, Field(ge=1)] = 16
    lora_alpha: Annotated[int, Field(ge=1)] = 32
    lora_dropout: Annotated[float, Field(ge=0, lt=1)] = 0.05
    lora_targets: str | None = None  # regex; default: the LLM's attention and MLP projections
    lora_vision: bool = False
    lora_train_projector: bool = True
    qlora: bool = False
    learning_rate: Annotated[float, Field(gt=0)] = 1e-5
    lr_scheduler_type: str = "cosine"
    warmup_steps: Annotated[float, Field(ge=0)] = 0.03  # below 1: a share of the steps (TrainingArguments' rule)
    weight_decay: Annotated[float, Field(ge=0)] = 0.01
    num_train_epochs: Annotated[float, Field(gt=0)] = 1.0
    max_steps: Annotated[int, Field(ge=-1)] = -1
    per_device_train_batch_size: Annotated[int, Field(ge=1)] = 1  # samples per micro-batch when not packing
    pack: bool = True
    pack_tokens: Annotated[int, Field(ge=1)] = 16384
    pack_tiles: Annotated[int, Field(ge=1)] = 48
    gradient_accumulation_steps: Annotated[int, Field(ge=1)] = 1
    loss_reduction: str = "square"
    max_length: Annotated[int, Field(ge=1)] = 8192
    max_tiles: Annotated[int, Field(ge=1)] = 12
    # per image kind: a multi-image sample's whole budget, shared by its images (None: max_tiles, as
    # InternVL); a video frame is always one tile (InternVL's rule)
    multi_image_max_tiles: Annotated[int, Field(ge=1)] | None = None
    min_tiles: Annotated[int, Field(ge=1)] = 1
    jpeg_augment: bool = False
    precision: str = "auto"  # auto (bf16 on a GPU that has it, else fp32) | bf16 | fp16 | fp32
    gradient_checkpointing: bool | str = "none"  # none | llm | vision | all (true = all, false = none)
    attn_implementation: str = "auto"  # auto (flash_attn or torch varlen on a GPU, sdpa_varlen on CPU) | sdpa | eager | flash_attention_2 | torch_varlen | sdpa_varlen
    logits: str = "supervised"  # supervised (logits only where a label is) | full (every position; to compare)
    normalize: str = "device"  # device (uint8 tiles, normalised there) | host (float in the worker; to compare)
    save_steps: Annotated[int, Field(ge=1)] = 500
    save_total_limit: Annotated[int, Field(ge=0)] = 2
    logging_steps: Annotated[int, Field(ge=1)] = 10
    seed: Annotated[int, Field(ge=0)] = 0
    dataloader_num_workers: Annotated[int, Field(ge=0)] | None = None  # None: min(8, cpus // ranks per node) on a GPU, 2 on CPU
    dataloader_pin_memory: bool = True  # pinned host batches and non-blocking copies to the GPU
    on_nan: str = "stop"  # stop | skip
    system: str | None = None
    max_grad_norm: Annotated[float, Field(ge=0)] = 1.0
    training_arguments: dict[str, Any] = field(default_factory=dict)  # other TrainingArguments fields

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, path: str | Path | None = None, section: str = "train") -> TrainConfig:
        """Options from a run config, a recipe, `--train-opt` strings or a notebook dict: adapt's own,
        then any other TrainingArguments field (passed through), else a user error naming the key."""
        own = {f.name for f in fields(cls)} - {"training_arguments"}
        passed = {key: value for key, value in data.items() if key not in own}
        known = training_argument_fields()
        unknown = sorted(set(passed) - set(known) - {"training_arguments"})
        if unknown:
            raise AdaptError(f"unknown training option(s): {', '.join(f'{section}.{k}' for k in unknown)}", path=path,
                             hint="adapt's options are the fields of adapt.training.trainer.TrainConfig; any other "
                                  "transformers.TrainingArguments field is passed to the Trainer")
        owned = sorted(set(passed) & set(ADAPT_OWNED_ARGUMENTS))
        if owned:
            raise AdaptError(f"training option(s) {', '.join(owned)} are set by adapt itself", path=path,
                             hint="use precision (bf16/fp16), gradient_checkpointing (none|llm|vision|all) and the "
                                  "run directory instead")
        extra = {**passed.pop("training_arguments", {}), **passed}
        for key, value in extra.items():
            try:
                checked = TypeAdapter(known[key]).validate_python(value)
                extra[key] = checked.value if isinstance(checked, Enum) else checked  # plain values for config.yaml
            except ValidationError as err:
                raise validation_error(err, value, path=path, prefix=f"{section}.{key}",
                                       hint=f"{key} is a transformers.TrainingArguments field; see its type there") from None
        values = {key: value for key, value in data.items() if key in own}
        try:
            return cls(**values, training_arguments=extra)
        except ValidationError as err:
            raise validation_error(err, values, path=path, prefix=section,
                                   hint="each option's type and range is declared in adapt.training.trainer.TrainConfig") from None

    def validate(self) -> None:
        if self.mode not in MODES:
            raise AdaptError(f"unknown training mode {self.mode!r}", hint=f"choose one of: {', '.join(MODES)}")
        if self.mode == "partial" and not (self.partial or self.trainable):
            raise AdaptError("partial training needs a preset (--partial mlp | mlp+llm | vit-last-N) or patterns")
        if self.partial and not re.fullmatch(r"mlp|mlp\+llm|vit-last-\d+", self.partial):
            raise AdaptError(f"unknown partial preset {self.partial!r}", hint="use mlp, mlp+llm or vit-last-N (N a number)")
        if self.loss_reduction not in ("token", "sample", "square"):
            raise AdaptError(f"unknown loss reduction {self.loss_reduction!r}", hint="use token, sample or square")
        if self.on_nan not in ("stop", "skip"):
            raise AdaptError(f"unknown on_nan policy {self.on_nan!r}", hint="use stop or skip")
        if self.precision not in ("auto", "bf16", "fp16", "fp32"):
            raise AdaptError(f"unknown precision {self.precision!r}", hint="use auto, bf16, fp16 or fp32")
        self.gradient_checkpointing = checkpointing_choice(self.gradient_checkpointing)
        if self.logits not in LOGITS:
            raise AdaptError(f"unknown logits choice {self.logits!r}", hint="use supervised or full")
        if self.normalize not in NORMALIZE_ON:
            raise AdaptError(f"unknown normalize choice {self.normalize!r}", hint="use device or host")
        if self.save_total_limit == 1:  # the Trainer deletes the previous one before the new one is marked complete
            raise AdaptError("save_total_limit 1 can leave no complete checkpoint when a run is killed while saving",
                             hint="keep at least 2 (the default), or 0 to keep every checkpoint")

    def to_dict(self) -> dict[str, Any]:
        """The options as saved in config.yaml and the model card (plain values only)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


@pydantic_dataclass
class PostTrainOptions:
    """What a post-training stage (`adapt dpo`, `adapt grpo`) shares: full or LoRA, the optimisation
    knobs under TrainingArguments' names, and checkpointing/logging; each stage adds its own."""

    mode: str = "full"  # full | lora
    lora_r: Annotated[int, Field(ge=1)] = 16
    lora_alpha: Annotated[int, Field(ge=1)] = 32
    learning_rate: Annotated[float, Field(gt=0)] = 5e-6
    num_train_epochs: Annotated[float, Field(gt=0)] = 1.0
    max_steps: Annotated[int, Field(ge=-1)] = -1
    max_tiles: Annotated[int, Field(ge=1)] = 6
    precision: str = "auto"  # auto | bf16 | fp16 | fp32
    save_steps: Annotated[int, Field(ge=1)] = 500
    logging_steps: Annotated[int, Field(ge=1)] = 10
    seed: Annotated[int, Field(ge=0)] = 0

    def validate(self) -> None:
        if self.mode not in ("full", "lora"):
            raise AdaptError(f"post-training mode {self.mode!r} is not full or lora")
        if self.precision not in ("auto", "bf16", "fp16", "fp32"):
            raise AdaptError(f"unknown precision {self.precision!r}", hint="use auto, bf16, fp16 or fp32")


def training_argument_fields() -> dict[str, Any]:
    """TrainingArguments' field names and types (what a passed-through option is checked against)."""
    hints = typing.get_type_hints(TrainingArguments)
    return {f.name: hints.get(f.name, Any) for f in fields(TrainingArguments) if f.init}


def checkpointing_choice(value: bool | str) -> str:
    """The gradient checkpointing choice, accepting the old booleans (configs written before the choice)."""
    if isinstance(value, bool):
        return "all" if value else "none"
    if value not in CHECKPOINTING:
        raise AdaptError(f"unknown gradient_checkpointing choice {value!r}",
                         hint=f"use one of: {', '.join(CHECKPOINTING)} (where activations are recomputed)")
    return value


# ----------------------------------------------------------------------------------------------
# tuning modes
# ----------------------------------------------------------------------------------------------
def partial_patterns(preset: str, n_vision_layers: int) -> list[str]:
    """Regexes of trainable parameter names for a partial preset."""
    projector = r"model\.multi_modal_projector\..*"
    llm = [r"model\.language_model\..*", r"lm_head\..*"]
    if preset == "mlp":
        return [projector]
    if preset == "mlp+llm":
        return [projector, *llm]
    last = int(preset.rsplit("-", 1)[1])
    if not 0 < last <= n_vision_layers:
        raise AdaptError(f"vit-last-{last}: the vision tower has {n_vision_layers} layers")
    layers = "|".join(str(i) for i in range(n_vision_layers - last, n_vision_layers))
    return [projector, *llm, rf"model\.vision_tower\.encoder\.layer\.({layers})\..*"]


def apply_tuning_mode(model: torch.nn.Module, config: TrainConfig) -> torch.nn.Module:
    """Freeze/unfreeze or wrap with LoRA according to `config`; returns the model to train."""
    config.validate()
    if config.mode == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if config.mode == "partial":
        patterns = list(config.trainable)
        if config.partial:
            patterns += partial_patterns(config.partial, model.config.vision_config.num_hidden_layers)
        compiled = [re.compile(p) for p in patterns]
        matched = 0
        for name, p in model.named_parameters():
            train = any(c.fullmatch(name) for c in compiled)
            p.requires_grad_(train)
            matched += train
        if not matched:
            raise AdaptError(f"no parameter matches the trainable patterns {patterns}",
                             hint="patterns are full-match regexes over names like model.language_model.layers.0.mlp.up_proj.weight")
        return model
    if config.qlora and not torch.cuda.is_available():
        raise AdaptError("QLoRA needs a CUDA GPU and bitsandbytes", hint="use --mode lora on this machine")
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if config.qlora:
        if not getattr(model, "is_loaded_in_4bit", False):
            raise AdaptError("QLoRA needs the model loaded in 4 bits (adapt run loads it so with --train-opt qlora=true)",
                             hint="load with adapt.checkpoints.models.load(..., load_in_4bit=True)")
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=config.gradient_checkpointing not in (False, "none"))

    targets = config.lora_targets or LLM_LORA_TARGETS
    if config.lora_vision:
        targets = f"({targets})|({VISION_LORA_TARGETS})"
    if not any(re.fullmatch(targets, n) for n, _ in model.named_modules()):
        raise AdaptError(f"no module matches the LoRA targets {targets!r}",
                         hint="targets are a full-match regex over module names, e.g. .*language_model.*\\.q_proj")
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=targets,
                      modules_to_save=["multi_modal_projector"] if config.lora_train_projector else None)
    peft_model = get_peft_model(model, lora)
    if checkpointing_choice(config.gradient_checkpointing) != "none":
        peft_model.enable_input_require_grads()
    return peft_model


def enable_gradient_checkpointing(model: torch.nn.Module, which: bool | str) -> None:
    """Recompute activations in the LLM, the vision tower, or both (not the whole model blindly: the
    frozen tower of mlp+llm / LoRA keeps no activations anyway, and a 1B LLM may fit without)."""
    which = checkpointing_choice(which)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # under a peft wrapper
    parts = {"none": (), "llm": ("language_model",), "vision": ("vision_tower",),
             "all": ("language_model", "vision_tower")}[which]
    for name in parts:
        getattr(base.model, name).activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False})


def resolve_workers(workers: int | None, *, cuda: bool | None = None, cpus: int | None = None) -> int:
    """Dataloader workers: an explicit number is kept; by default enough to keep a GPU busy
    (min(8, cpus // ranks on this node)); on CPU, where they compete with the model, up to 2 on the
    cores besides the model's one, so none on a single core (a sweep's run pinned to its core): there
    a loader process only takes turns with the model's thread (two demo runs at once, each on its own
    core: 80 steps in 35 s without a worker, 55 s with one)."""
    if workers is not None:
        return workers
    cuda = torch.cuda.is_available() if cuda is None else cuda
    cpus = cpus or available_cores()
    if not cuda:
        return max(0, min(2, cpus - 1))
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    return max(1, min(8, cpus // max(1, local_ranks)))


def describe_trainable(model: torch.nn.Module) -> str:
    trainable, total = count_parameters(model)
    return f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.2f}%)"


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------
class MixtureDataset(Dataset):
    """Builds samples on demand (in dataloader workers). Items are (index, epoch, is_padding):
    the epoch seeds augmentation, so a resumed run sees the same pixels; padding items (only to
    even out the last step across ranks) carry no supervised token."""

    def __init__(self, entries: Sequence[tuple[Record, str]], builder: SampleBuilder,
                 keep: np.ndarray | None = None) -> None:
        # entries may be a lazy mixture view (records read from Arrow or mixture.jsonl on access): kept
        # as given, with `keep` (the usable entries' positions) instead of a copied list
        self.entries, self.builder = entries, builder
        self.keep = np.arange(len(entries)) if keep is None else keep

    def __len__(self) -> int:
        return len(self.keep)

    def __getitem__(self, item: tuple[int, int, bool]):
        index, epoch, padding = item
        record, root = self.entries[int(self.keep[index])]
        try:
            sample = self.builder.build(record, root, index=index, epoch=epoch)
        except SampleDropped as err:
            # Planned from image headers, but the pixels do not decode (a truncated file, or one that
            # broke since): say which, and put a stand-in without supervised tokens in its place, so a
            # batch holding only this sample does not stop the run.
            warnings.warn(f"sample {record.get('id', index)} dropped while training: {err}", RuntimeWarning,
                          stacklevel=1)
            sample = self.builder.build(STAND_IN, root, index=index, epoch=epoch)
            sample.id, padding = f"dropped:{record.get('id', index)}", True
        if padding:
            sample.labels.fill_(IGNORE_INDEX)
        return sample


class HostNormalized:
    """Collator wrapper that normalises tiles to float32 in the worker (`normalize: host`): the plain
    path, 4x the bytes to pin and copy; kept only so the device path's gain can be measured."""

    def __init__(self, collator: Collator) -> None:
        self.collator = collator

    def __call__(self, items: Sequence) -> dict[str, torch.Tensor]:
        batch = self.collator(items)
        if "pixel_values" in batch:
            batch["pixel_values"] = normalize(batch["pixel_values"], torch.float32)
        return batch


class RankBatchSampler(Sampler):
    """Seeded batches (packed rows or fixed-size groups), this rank's share only.

    The rows are fixed once (packing is seeded), and each epoch shuffles their order with
    seed + epoch, so every epoch has the same number of steps (the Trainer relies on it) and
    every sample appears exactly once per epoch across ranks. When the row count does not divide
    by the number of ranks, the last rows are re-split so that each rank gets one; if fewer samples
    than ranks remain, the missing ones are zero-weight padding.
    """

    def __init__(self, lengths: Sequence[int], tiles: Sequence[int], *, pack: bool, batch_size: int,
                 max_tokens: int, max_tiles: int, seed: int, world_size: int = 1, rank: int = 0) -> None:
        self.world_size, self.rank, self.seed, self.epoch = world_size, rank, seed, 0
        if pack:
            members, starts = pack_flat(lengths, tiles, max_tokens=max_tokens, max_tiles=max_tiles, seed=seed)
        else:
            order = list(range(len(lengths)))
            random.Random(seed).shuffle(order)
            members = np.array(order, dtype=np.int64)
            starts = np.append(np.arange(0, len(order), batch_size, dtype=np.int64), len(order))
        # the rows as flat arrays (sample index, padding flag) and row starts, not lists of tuples
        self.members, self.pads, self.starts = self._even_out(members, starts)

    def _even_out(self, members: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """When the rows do not divide by the ranks, the last ones are re-split so each rank gets one;
        a rank left without a sample gets the first leftover one as zero-weight padding."""
        world = self.world_size
        n_rows = len(starts) - 1
        tail = n_rows % world
        if not tail:
            return members, np.zeros(len(members), dtype=bool), starts
        kept = int(starts[n_rows - tail])
        left = members[kept:]
        parts = [left[r::world] if len(left[r::world]) else left[:1] for r in range(world)]
        pads = np.concatenate([np.zeros(kept, dtype=bool)] + [np.full(len(part), len(left[r::world]) == 0)
                                                             for r, part in enumerate(parts)])
        sizes = np.array([len(part) for part in parts], dtype=np.int64)
        starts = np.concatenate([starts[:n_rows - tail + 1], kept + np.cumsum(sizes)])
        return np.concatenate([members[:kept], *parts]), pads, starts

    @property
    def rows(self) -> list[list[tuple[int, bool]]]:
        """Each row's (sample index, padding) pairs (built on demand)."""
        return [self._row(k) for k in range(len(self.starts) - 1)]

    def _row(self, k: int) -> list[tuple[int, bool]]:
        a, b = int(self.starts[k]), int(self.starts[k + 1])
        return list(zip(self.members[a:b].tolist(), self.pads[a:b].tolist()))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _rounds(self) -> list[int]:
        """Row order of this epoch, shuffled by rounds of `world_size` rows so the evened-out last
        round stays together."""
        n_rounds = (len(self.starts) - 1) // self.world_size
        order = list(range(n_rounds))
        random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return [r * self.world_size + self.rank for r in order]

    def __iter__(self) -> Iterator[list[tuple[int, int, bool]]]:
        for row in self._rounds():
            yield [(i, self.epoch, pad) for i, pad in self._row(row)]

    def __len__(self) -> int:
        return (len(self.starts) - 1) // self.world_size


# ----------------------------------------------------------------------------------------------
# trainer
# ----------------------------------------------------------------------------------------------
class DivergenceError(AdaptError):
    pass


def varlen_kwargs(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Sample boundaries of a packed row (cu_seq_lens, max_length) for mask-free varlen attention
    (flash_attention_2, torch_varlen, sdpa_varlen), from the restarting position ids, once per step: left to HF,
    every layer would re-derive them and sync the device to do so. Empty for padded batches and for
    masked attention (SDPA, eager)."""
    config = getattr(model, "module", model).config  # DDP / FSDP / DeepSpeed keep the model in .module
    text_config = getattr(config, "text_config", config)
    implementation = getattr(text_config, "_attn_implementation", None)
    if ("position_ids" not in inputs or "attention_mask" in inputs or inputs["position_ids"].shape[0] != 1
            or ALL_MASK_ATTENTION_FUNCTIONS.get(implementation) is not flash_attention_mask):
        return {}
    (cu_q, cu_k), (max_q, max_k) = prepare_fa_kwargs_from_position_ids(inputs["position_ids"])
    return {"cu_seq_lens_q": cu_q, "cu_seq_lens_k": cu_k, "max_length_q": int(max_q), "max_length_k": int(max_k)}


def supervised_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], denominator: torch.Tensor | None,
                    logits: str = "supervised") -> torch.Tensor:
    """sum(w * CE) / denominator, with logits computed only at positions that predict a label
    (`logits="full"` projects every position and selects afterwards: same loss, to compare)."""
    labels, weights = batch["labels"], batch["loss_weights"]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = weights[:, 1:] > 0
    inputs: dict[str, Any] = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    inputs.update(varlen_kwargs(model, inputs))
    if "pixel_values" in batch:
        dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
        inputs["pixel_values"] = normalize(batch["pixel_values"], dtype)
    if not keep.any():  # nothing supervised (padding item): keep the graph, contribute zero
        out = model(**inputs, use_cache=False, logits_to_keep=1)
        return out.logits.sum() * 0.0
    if logits == "full":
        out = model(**inputs, use_cache=False)
        selected = out.logits[keep]
    else:
        out = model(**inputs, use_cache=False, logits_to_keep=keep)
        selected = out.logits
    selected = selected.float().reshape(-1, selected.shape[-1])
    targets = labels[:, 1:][keep[:, :-1]]
    w = weights[:, 1:][keep[:, :-1]].to(selected.dtype)
    ce = torch.nn.functional.cross_entropy(selected, targets, reduction="none")
    total = (ce * w).sum()
    return total / (w.sum() if denominator is None else denominator)


class AdaptTrainer(Trainer):
    """HF Trainer with adapt's sampler, loss and divergence guard."""

    loss_is_scaled_for_ga = True

    def __init__(self, *args: Any, batch_sampler_factory=None, on_nan: str = "stop", logits: str = "supervised",
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.batch_sampler_factory, self.on_nan, self.logits = batch_sampler_factory, on_nan, logits
        self.skipped_steps, self.nonfinite_in_step = 0, False
        if on_nan == "skip":
            self.add_callback(SkipNonFiniteSteps(self))

    def get_train_dataloader(self) -> DataLoader:
        sampler = self.batch_sampler_factory(self.args.world_size, self.args.process_index)
        workers = self.args.dataloader_num_workers
        loader = DataLoader(self.train_dataset, batch_sampler=sampler, collate_fn=self.data_collator,
                            num_workers=workers, pin_memory=self.args.dataloader_pin_memory and torch.cuda.is_available(),
                            persistent_workers=False, prefetch_factor=4 if workers else None)
        prepared = self.accelerator.prepare(loader)
        shard = getattr(prepared, "batch_sampler", None)
        if shard is not None and getattr(shard, "batch_sampler", None) is sampler:
            shard.num_processes, shard.process_index = 1, 0  # our sampler already shards by rank
        return prepared

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        """Checkpoint weights back in as `from_pretrained` reads them. The Trainer's own loader is a
        non-strict `load_state_dict` on the file's keys, but `save_pretrained` writes InternVL's hub
        names (language_model.model.* for model.language_model.*): nothing matched, and a resumed full
        or partial run silently went on from the base weights (transformers#43701)."""
        model = self.model if model is None else model
        if not isinstance(model, PreTrainedModel) or self.is_fsdp_enabled or self.is_deepspeed_enabled:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)  # PEFT adapters, sharded states
        dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        saved = type(model).from_pretrained(resume_from_checkpoint, dtype=dtype)
        model.load_state_dict(saved.state_dict(), strict=True)

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> torch.Tensor | None:
        """The loss denominator of one optimizer step: sum of loss weights over micro-batches and ranks."""
        if not batch_samples:
            return None
        total = sum(b["loss_weights"][:, 1:].sum() for b in batch_samples).to(device)
        if self.args.world_size > 1:
            total = self.accelerator.gather(total.reshape(1)).sum()
        return total

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        inputs.pop("sample_index", None)
        loss = supervised_loss(model, inputs, num_items_in_batch, logits=self.logits)
        if self.args.world_size > 1 and num_items_in_batch is not None:
            loss = loss * self.args.world_size  # DDP averages gradients; the denominator is already global
        if not torch.isfinite(loss):
            if self.on_nan == "skip":  # SkipNonFiniteSteps drops this step's update
                self.nonfinite_in_step = True
                return loss.nan_to_num(0.0, 0.0, 0.0) * 0.0  # a graph all the same, so every rank's backward runs
            step = self.state.global_step + 1
            complete = [path for _, path, done in _checkpoints(Path(self.args.output_dir)) if done]
            kept = (f"the last complete checkpoint {complete[-1]} is kept" if complete
                    else f"no checkpoint was complete yet in {self.args.output_dir}")
            raise DivergenceError(
                f"loss became {loss.item()} at step {step}; training stopped and {kept}",
                hint="lower the learning rate, check the data, resume with --resume, or set on_nan: skip")
        return (loss, None) if return_outputs else loss


class CompletedCheckpoints(TrainerCallback):
    """Marks a checkpoint complete only after the Trainer finished writing all of it."""

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                for path in folder.rglob("*"):
                    if path.is_file():
                        with open(path, "rb") as handle:
                            os.fsync(handle.fileno())
                atomic_write_text(folder / COMPLETE_MARKER, json.dumps({"step": state.global_step}))
        return control


class SkipNonFiniteSteps(TrainerCallback):
    """on_nan=skip: a step whose loss was not finite on any rank makes no update at all. Zeroed
    gradients are not enough: the NaN reaches them through the graph, and AdamW would still move
    every weight on its momentum; the optimizer skips parameters that have no gradient."""

    def __init__(self, trainer: AdaptTrainer) -> None:
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        trainer = self.trainer
        flag = torch.tensor(float(trainer.nonfinite_in_step), device=args.device)
        trainer.nonfinite_in_step = False
        if args.world_size > 1:
            flag = trainer.accelerator.reduce(flag, reduction="sum")
        if flag.item() > 0:
            trainer.model.zero_grad(set_to_none=True)
            trainer.skipped_steps += 1
        return control


def _checkpoints(folder: Path) -> list[tuple[int, Path, bool]]:
    """(step, path, complete) of each checkpoint-N folder, oldest first."""
    found = []
    for path in folder.glob("checkpoint-*") if folder.is_dir() else ():
        match = re.fullmatch(r"checkpoint-(\d+)", path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path, (path / COMPLETE_MARKER).is_file()))
    return sorted(found)


def last_complete_checkpoint(folder: str | Path, *, set_aside: bool = True) -> Path | None:
    """The newest checkpoint carrying the completion marker; half-written ones are set aside (renamed)
    unless `set_aside` is False, as for commands that only read a run (eval, export)."""
    complete = []
    for _, path, done in _checkpoints(Path(folder)):
        if done:
            complete.append(path)
        elif set_aside and int(os.environ.get("RANK", "0")) == 0:  # every rank reads the same answer; one moves folders
            aside = path.with_name(f".incomplete-{path.name}")
            shutil.rmtree(aside, ignore_errors=True)
            path.rename(aside)
    return complete[-1] if complete else None


# ----------------------------------------------------------------------------------------------
# the recipe
# ----------------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    model: torch.nn.Module
    steps: int
    samples: int
    dropped: Report
    log_history: list[dict[str, Any]]
    trainable: str
    # FSDP / ZeRO-3 leave each rank a shard of `model`: the gathered weights are written here so that
    # the main process can evaluate and export a whole model (None when `model` is whole everywhere).
    final_dir: Path | None = None
    skipped_steps: int = 0  # optimizer steps dropped for a non-finite loss (on_nan: skip)


def precision_flags(precision: str) -> dict[str, bool]:
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    if precision in ("bf16", "fp16") and not torch.cuda.is_available():
        raise AdaptError(f"{precision} training needs a GPU here", hint="use --precision fp32 (or auto) on CPU")
    return {"bf16": precision == "bf16", "fp16": precision == "fp16"}


def make_builder(loaded: Loaded, config: TrainConfig, *, train: bool = True) -> SampleBuilder:
    encoder = Encoder(loaded.tokenizer, loaded.template, tokens_per_tile=loaded.tokens_per_tile, system=config.system)
    policy = TilingPolicy(config.min_tiles, config.max_tiles, True, config.jpeg_augment, config.multi_image_max_tiles)
    return SampleBuilder(encoder, policy, max_length=config.max_length, train=train, seed=config.seed)


def train(loaded: Loaded, entries: Sequence[tuple[Record, str]], config: TrainConfig, output_dir: str | Path, *,
          resume: bool = False, logging_dir: str | Path | None = None, callbacks: Sequence[TrainerCallback] = (),
          progress: bool = True, plans: Plans | None = None) -> TrainResult:
    """Fine-tune `loaded.model` on `entries` (record, root) with `config`; checkpoints go to output_dir.
    `plans` (one per entry, e.g. the prepared mixture's, planned with this config's builder) are used
    as given; without them every entry is planned here."""
    config.validate()
    output_dir = Path(output_dir)
    if not resume and _checkpoints(output_dir):
        # a later --resume would take the newest of them, whichever run wrote it
        raise AdaptError("the output folder already holds checkpoints of an earlier run", path=output_dir,
                         hint="resume that run (adapt run --resume RUN_DIR), or train into a new folder")
    builder = make_builder(loaded, config)
    dropped = Report(name="samples")
    if plans is None or len(plans.length) != len(entries):
        with console.phase("planning", total=len(entries), unit="sample", show=progress) as bar:
            plans = Plans.compute(entries, builder.plan, progress=bar)
    for i in sorted(plans.drops):
        record = entries[i][0]
        dropped.skip(f"dropped: {plans.drops[i]}", path=record.get("meta", {}).get("source"), row=i,
                     id=str(record.get("id")))
    keep = np.flatnonzero(plans.length >= 0)
    if not len(keep):
        raise AdaptError("no usable training sample (every record was dropped)",
                         hint="see the dropped-sample report: " + "; ".join(str(s) for s in dropped.skips[:3]))
    lengths, tiles = plans.length[keep], plans.tiles[keep]
    if config.pack and int(lengths.max()) > config.pack_tokens:
        raise AdaptError(f"a sample of {int(lengths.max())} tokens exceeds pack_tokens {config.pack_tokens}",
                         hint="raise pack_tokens to at least max_length")

    precision = precision_flags(config.precision)
    model = apply_tuning_mode(loaded.model, config)
    model.config.use_cache = False
    enable_gradient_checkpointing(model, config.gradient_checkpointing)
    trainable = describe_trainable(model)

    if logging_dir is not None:
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(logging_dir)
    shared = ("learning_rate", "lr_scheduler_type", "warmup_steps", "weight_decay", "num_train_epochs", "max_steps",
              "gradient_accumulation_steps", "logging_steps", "save_steps", "save_total_limit", "seed",
              "dataloader_pin_memory", "max_grad_norm")  # adapt options that are TrainingArguments fields as such
    arguments = {
        **{name: getattr(config, name) for name in shared},
        "output_dir": str(output_dir), "per_device_train_batch_size": 1, "data_seed": config.seed,
        "remove_unused_columns": False, "dataloader_num_workers": resolve_workers(config.dataloader_num_workers),
        "accelerator_config": {"non_blocking": config.dataloader_pin_memory and torch.cuda.is_available()},
        "report_to": ["tensorboard"] if logging_dir is not None else "none",
        "use_cpu": not torch.cuda.is_available(), "disable_tqdm": not progress,
        "average_tokens_across_devices": True, "save_strategy": "steps", **precision,
        # a text-only row leaves the vision tower without gradients, which DDP must then not wait for
        "ddp_find_unused_parameters": bool((tiles == 0).any()),  # no tile: no image or video
        **config.training_arguments,
    }
    try:
        args = TrainingArguments(**arguments)
    except (ValueError, TypeError) as err:  # a passed-through combination the Trainer refuses
        raise AdaptError(f"transformers.TrainingArguments refused the training options: {err}",
                         hint="check the TrainingArguments fields given in the train section") from None
    collator = Collator(loaded.tokenizer.pad_token_id, pack=config.pack, loss_reduction=config.loss_reduction)
    if config.normalize == "host":
        collator = HostNormalized(collator)

    def sampler_factory(world_size: int, rank: int) -> RankBatchSampler:
        return RankBatchSampler(lengths, tiles, pack=config.pack, batch_size=config.per_device_train_batch_size,
                                max_tokens=config.pack_tokens, max_tiles=config.pack_tiles, seed=config.seed,
                                world_size=world_size, rank=rank)

    trainer = AdaptTrainer(model=model, args=args, train_dataset=MixtureDataset(entries, builder, keep),
                           data_collator=collator, batch_sampler_factory=sampler_factory, on_nan=config.on_nan,
                           logits=config.logits,
                           callbacks=[CompletedCheckpoints(), *callbacks])
    if not progress:  # without its bar the Trainer prints every loss line: quiet means quiet
        trainer.remove_callback(PrinterCallback)
    with args.main_process_first(local=False, desc="finding the last complete checkpoint"):
        # the main process sets half-written checkpoints aside first; the other ranks then agree with it
        checkpoint = last_complete_checkpoint(output_dir) if resume else None
    loaded_attn = loaded.model.config._attn_implementation
    attn = resolve_attn_implementation(config.attn_implementation, precision["bf16"] or precision["fp16"])
    if attn != loaded_attn:
        loaded.model.set_attn_implementation(attn)  # for this run only (varlen kernels where available)
    threads = torch.get_num_threads()
    if not torch.cuda.is_available():
        # on CPU the loader workers share the cores with the model's threads; oversubscribed, torch's
        # threads spin-wait and a step gets several times slower (measured on 2 cores: 160 s vs 650 s demo)
        cpus = available_cores()
        torch.set_num_threads(max(1, min(threads, cpus - resolve_workers(config.dataloader_num_workers))))
    try:
        with pickles_refused(checkpoint):  # a tampered optimizer.pt / rng_state.pth: adapt's message, never torch's advice
            if checkpoint is not None and finished(checkpoint) and not shards_parameters(trainer):
                # the Trainer's resume would skip to the saved step, then run one more step before it
                # checks max_steps: a finished run is loaded, not trained again
                trainer._load_from_checkpoint(str(checkpoint))
                trainer.state = TrainerState.load_from_json(str(checkpoint / TRAINER_STATE_NAME))
            else:
                trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    finally:
        torch.set_num_threads(threads)
        if attn != loaded_attn:  # a training choice: the varlen kernels cannot decode
            loaded.model.set_attn_implementation(loaded_attn)
    final_dir = None
    if shards_parameters(trainer):
        final_dir = output_dir / "final"
        trainer.save_model(str(final_dir))  # a collective: every rank gathers, the main process writes
    return TrainResult(model=trainer.model, steps=trainer.state.global_step, samples=len(keep), dropped=dropped,
                       log_history=list(trainer.state.log_history), trainable=trainable, final_dir=final_dir,
                       skipped_steps=trainer.skipped_steps)


def finished(checkpoint: Path) -> bool:
    """Whether a checkpoint was saved at the end of its run (its step is the run's last)."""
    path = checkpoint / TRAINER_STATE_NAME
    state = json.loads(path.read_text()) if path.is_file() else {}
    return 0 < state.get("max_steps", 0) <= state.get("global_step", 0)


def shards_parameters(trainer: Trainer) -> bool:
    """True under FSDP or DeepSpeed ZeRO-3, where no rank holds the whole trained model."""
    if trainer.is_fsdp_enabled:
        return True
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    return plugin is not None and plugin.zero_stage == 3
