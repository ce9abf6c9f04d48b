"""Reinforcement learning with task rewards on TRL's GRPOTrainer.

Rewards are adapt's metrics on each sampled answer (adapt.evaluation.rewards: grounding IoU on the
0..1000 grid, classification / VQA exact match, DriveLM accuracy) plus a format reward, weighted.
Generation goes through adapt's prompt builder (SampleBuilder with generation=True, the template and
tiling that training and evaluation use), so the policy is rewarded on the prompt it is evaluated on.

What had to be adapted in TRL, and why (all through the public GRPOTrainer / GRPOConfig, with two
internal methods overridden in a subclass):
  * TRL renders prompts with a HF processor's chat template; InternVL here is tiled and templated by
    adapt, so generation uses TRL's public `rollout_func` hook: the dataset's `prompt` column carries
    the record's key, and the rollout builds the real prompt (image tokens included) with adapt;
  * TRL re-runs the processor on the images to get `pixel_values` for the loss; instead,
    `_generate_and_score_completions` is extended to attach adapt's tiles (normalised) with
    `num_images` / `num_tiles`, which TRL's InternVL path (tile-indexed pixel values) already
    splits, shuffles and slices per micro-batch;
  * log-probabilities TRL computes inside generation (old policy, reference) get the same tiles via
    `_get_per_token_logps_and_entropies` when TRL has none to pass.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import Field
from pydantic.dataclasses import dataclass as checked_dataclass
from transformers import TrainerCallback

from adapt.checkpoints.models import Loaded
from adapt.data.records import Record
from adapt.data.samples import SampleBuilder
from adapt.data.tiling import normalize
from adapt.errors import AdaptError
from adapt.evaluation.evaluator import generate
from adapt.evaluation.rewards import format_reward, task_reward
from adapt.training.trainer import (
    LLM_LORA_TARGETS,
    CompletedCheckpoints,
    PostTrainOptions,
    TrainConfig,
    last_complete_checkpoint,
    make_builder,
    precision_flags,
)

Entry = tuple[Record, str]


@checked_dataclass
class RLConfig(PostTrainOptions):
    """A GRPO stage: group size, sampling and reward weights on top of the shared post-training options."""

    learning_rate: Annotated[float, Field(gt=0)] = 1e-6
    prompts_per_step: Annotated[int, Field(ge=1)] = 2
    generations: Annotated[int, Field(ge=1)] = 4  # answers sampled per prompt (the GRPO group)
    max_new_tokens: Annotated[int, Field(ge=1)] = 64
    temperature: Annotated[float, Field(gt=0)] = 1.0
    beta: Annotated[float, Field(ge=0)] = 0.0  # KL to the starting model (TRL's default 0: no reference model kept)
    task_weight: Annotated[float, Field(ge=0)] = 1.0
    format_weight: Annotated[float, Field(ge=0)] = 0.1

    def validate(self) -> None:
        super().validate()
        if self.generations < 2:
            raise AdaptError("GRPO needs at least 2 generations per prompt (advantages are relative to the group)")


def _key(record: Record, index: int) -> str:
    return f"{index}:{record.get('id', index)}"


def grpo_trainer(entries: Sequence[Entry], builder: SampleBuilder, tokenizer: Any, **kwargs: Any):
    """TRL's GRPOTrainer (subclassed for adapt's tiles) generating through adapt's prompt builder."""
    from trl import GRPOTrainer

    lookup = {_key(record, i): (record, root, i) for i, (record, root) in enumerate(entries)}

    class Trainer(GRPOTrainer):
        tiles: list[torch.Tensor | None] | None = None  # this generation batch's tiles, row by row

        def _generate_and_score_completions(self, inputs):
            output = super()._generate_and_score_completions(inputs)
            if self.tiles is not None and any(t is not None for t in self.tiles):
                output.update(_tile_fields(self.tiles, _dtype(self.model), output["prompt_ids"].device))
            self.tiles = None
            return output

        def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep,
                                               batch_size=None, compute_entropy=False, compute_aux_loss=False,
                                               pixel_values=None, num_tiles=None, num_images=None, **rest):
            if pixel_values is None and self.tiles is not None and any(t is not None for t in self.tiles):
                fields = _tile_fields(self.tiles, _dtype(model), input_ids.device)
                pixel_values, num_tiles, num_images = (fields["pixel_values"], fields["num_tiles"],
                                                       fields["num_images"])
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy, compute_aux_loss,
                pixel_values=pixel_values, num_tiles=num_tiles, num_images=num_images, **rest)

    def rollout(prompts: list[str], trainer: Trainer) -> dict[str, Any]:
        model = trainer.accelerator.unwrap_model(trainer.model)
        samples = [builder.build(lookup[key][0], lookup[key][1], index=lookup[key][2], generation=True)
                   for key in prompts]
        trainer.tiles = [s.tiles for s in samples]
        completions = _sample(model, samples, tokenizer, builder, trainer.args.max_completion_length,
                              trainer.args.temperature)
        return {"prompt_ids": [s.input_ids.tolist() for s in samples], "completion_ids": completions,
                "logprobs": None}

    return Trainer(rollout_func=rollout, processing_class=tokenizer, **kwargs)


def _dtype(model: torch.nn.Module) -> torch.dtype:
    return next(p for p in model.parameters() if p.is_floating_point()).dtype


def _tile_fields(tiles: Sequence[torch.Tensor | None], dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
    present = [t for t in tiles if t is not None]
    return {"pixel_values": normalize(torch.cat(present).to(device), dtype),
            "num_images": [int(t is not None) for t in tiles],
            "num_tiles": [0 if t is None else int(t.shape[0]) for t in tiles]}


@torch.no_grad()
def _sample(model: torch.nn.Module, samples: Sequence, tokenizer: Any, builder: SampleBuilder, max_new_tokens: int,
            temperature: float) -> list[list[int]]:
    """One sampled answer per prompt (left padded, as evaluation generates), cut after the first stop token."""
    width = max(len(s) for s in samples)
    device = next(model.parameters()).device
    ids = torch.full((len(samples), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, s in enumerate(samples):
        ids[row, width - len(s):] = s.input_ids
        mask[row, width - len(s):] = 1
    kwargs: dict[str, Any] = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
    tiles = [s.tiles for s in samples if s.tiles is not None]
    if tiles:
        kwargs["pixel_values"] = normalize(torch.cat(tiles).to(device), _dtype(model))
    stop = builder.encoder.stop_token_ids()
    was_training = model.training
    model.eval()
    generated = model.generate(**kwargs, do_sample=True, temperature=temperature, max_new_tokens=max_new_tokens,
                               eos_token_id=stop, pad_token_id=tokenizer.pad_token_id)
    model.train(was_training)
    out = []
    for row in generated[:, width:].tolist():
        cut = next((i for i, token in enumerate(row) if token in stop), None)
        out.append(row if cut is None else row[:cut + 1])
    return out


def reward_functions(entries: Sequence[Entry]) -> list[Callable[..., list[float]]]:
    """TRL reward functions (task metric, format) for rows keyed by `prompt`."""
    lookup = {_key(record, i): record for i, (record, _) in enumerate(entries)}

    def task(prompts: list[str], completions: list[str], **_: Any) -> list[float]:
        return [task_reward(lookup[key], answer) for key, answer in zip(prompts, completions)]

    def answer_format(prompts: list[str], completions: list[str], **_: Any) -> list[float]:
        return [format_reward(lookup[key], answer) for key, answer in zip(prompts, completions)]

    return [task, answer_format]


def mean_reward(loaded: Loaded, entries: Sequence[Entry], config: RLConfig, *, samples: int = 0) -> dict[str, float]:
    """Held-out task and format rewards and their weighted sum (what GRPO maximises, measured where it
    did not train): of greedy answers as evaluation generates them, or, with `samples` > 0, the
    expected reward of the policy, over that many seeded sampled answers per prompt."""
    builder = make_builder(loaded, TrainConfig(max_tiles=config.max_tiles, seed=config.seed), train=False)
    if samples:
        torch.manual_seed(config.seed)
        rows = [(r, root) for r, root in entries for _ in range(samples)]
        built = [builder.build(r, root, index=i, generation=True) for i, (r, root) in enumerate(rows)]
        ids = _sample(loaded.model, built, loaded.tokenizer, builder, config.max_new_tokens, config.temperature)
        answers: list[str | None] = [loaded.tokenizer.decode(a, skip_special_tokens=True).strip() for a in ids]
    else:
        rows = list(entries)
        answers = generate(loaded, builder, rows, max_new_tokens=config.max_new_tokens)
    task = [task_reward(r, a) for (r, _), a in zip(rows, answers)]
    form = [format_reward(r, a) for (r, _), a in zip(rows, answers)]
    n = max(len(rows), 1)
    return {"task": sum(task) / n, "format": sum(form) / n,
            "reward": (config.task_weight * sum(task) + config.format_weight * sum(form)) / n}


@dataclass
class RLResult:
    model: torch.nn.Module
    steps: int
    log_history: list[dict[str, Any]]


def train_grpo(loaded: Loaded, entries: Sequence[Entry], config: RLConfig, output_dir: str | Path, *,
               resume: bool = False, callbacks: Sequence[TrainerCallback] = (), progress: bool = True) -> RLResult:
    """GRPO on labelled (record, root) entries with adapt's task and format rewards; full or LoRA."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import GRPOConfig

    config.validate()
    if not entries:
        raise AdaptError("no prompt to train on")
    precision = precision_flags(config.precision)
    args = GRPOConfig(
        output_dir=str(output_dir), learning_rate=config.learning_rate, max_steps=config.max_steps,
        num_train_epochs=config.num_train_epochs, per_device_train_batch_size=config.prompts_per_step * config.generations,
        num_generations=config.generations, max_completion_length=config.max_new_tokens,
        temperature=config.temperature, beta=config.beta, reward_weights=[config.task_weight, config.format_weight],
        save_steps=config.save_steps, logging_steps=config.logging_steps, seed=config.seed, data_seed=config.seed,
        gradient_checkpointing=False, dataloader_num_workers=0, report_to="none", use_cpu=not torch.cuda.is_available(),
        disable_tqdm=not progress, **precision)
    lora = None
    if config.mode == "lora":
        lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, target_modules=LLM_LORA_TARGETS,
                          lora_dropout=0.0)
    else:
        for p in loaded.model.parameters():
            p.requires_grad_(True)
    builder = make_builder(loaded, TrainConfig(max_tiles=config.max_tiles, seed=config.seed), train=False)
    dataset = Dataset.from_dict({"prompt": [_key(record, i) for i, (record, _) in enumerate(entries)]})
    trainer = grpo_trainer(entries, builder, loaded.tokenizer, model=loaded.model,
                           reward_funcs=reward_functions(entries), args=args, train_dataset=dataset,
                           peft_config=lora, callbacks=[CompletedCheckpoints(), *callbacks])
    checkpoint = last_complete_checkpoint(output_dir) if resume else None
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    return RLResult(trainer.model, trainer.state.global_step, list(trainer.state.log_history))
