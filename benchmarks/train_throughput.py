"""Training throughput: adapt's fast path vs the plain HF Trainer path, per Mini-InternVL size and mode.

Models: the random-init presets `mini-internvl2-1b`, `-2b`, `-4b` (adapt.checkpoints.models.PRESETS: the exact
shapes of InternVL2-1B / 2B / 4B; random weights change no FLOP and no byte). Tuning modes: full,
partial (`mlp+llm`: projector + LLM, vision frozen) and LoRA (r=16 on the LLM projections, projector
trained). Data, written once to a temp dir: driving-like samples (one 2688x896 JPEG -> 13 tiles, i.e.
3,328 image tokens, plus a few hundred question/answer tokens) mixed with short general samples
(25%: half text-only, half one 448x448 tile).

Per configuration, both paths train the same model (same seed) on the same samples for the same
number of optimizer steps, row for row (the fast path's packed rows; the baseline pads the same
samples to the longest of the row):
  baseline  plain `transformers.Trainer`: samples padded to the longest in the batch (no packing),
            float32 tiles normalised on the host (in the dataloader workers), full-vocabulary logits
            and the model's own loss, SDPA attention (HF's default).
  fast      `adapt.training.trainer.train`: packed rows with varlen attention on a GPU (`attn_implementation:
            auto`: flash_attn's if installed, else PyTorch's built-in FlashAttention-2 varlen; SDPA
            per sample on CPU), uint8 tiles normalised on the device, logits only at
            supervised positions, pinned memory + non-blocking copies, workers sized to the machine;
            gradient checkpointing per module (the same choice as the baseline's).
`--ablate` adds fast-path rows with one optimisation switched off at a time (`-pack`, `logits=full`,
`normalize=host`, `attn=sdpa`, `gc=...`, `workers=0`, `-pin`), each a TrainConfig switch.

Printed per row: real (non-padding) tokens/s and samples/s per GPU (one process), seconds per step,
MFU, peak GPU memory while training (torch.cuda.max_memory_allocated, reset when training starts),
and the share of step time the loop waited for the dataloader (from the end of one step to the start
of the next; the device is synchronised at each step end). The first `--warmup` steps are run but
not measured.

MFU = model FLOPs of the measured steps / their wall time / peak dense bf16 FLOP/s (H100 SXM and
H200: 989 TFLOP/s, detected from torch.cuda.get_device_name; `--peak-tflops` overrides). Model FLOPs
count useful work only, the same for the same samples whatever the path (padding and unsupervised
logits are waste, not work), so baseline and fast MFU differ exactly as their throughput. Per
optimizer step, with T tokens, S supervised positions, n tiles, P = 1025 patch tokens per tile
(1024 + CLS), N = weights of the Linear/Conv layers (embeddings and norms excluded):
  vision   n * (2 * N_vit * P + 4 * L_vit * d_vit * P^2) * (3 if the tower trains else 1)
           (frozen: forward only; nothing below it needs a gradient, so no backward through it)
  mlp      n * 256 * 2 * N_mlp * (1 + [mlp trains] + [vision trains])
  LLM      2 * N_llm * T * (2 + [LLM weights train]): forward + input gradients (always: something
           below trains) + weight gradients: 6 * N_llm * T for full and mlp+llm, 4 * N_llm * T for LoRA
  LoRA     6 * N_lora * T
  attention 12 * L_llm * d_attn * sum over samples of len^2 (varlen; no causal discount, as PaLM)
  lm_head  2 * V * d * S * (2 + [lm_head trains])

GPU run (one H100 or H200; a few minutes per size, an estimate: split by size if commands are time-limited):
    python benchmarks/train_throughput.py --sizes 1b 2b 4b --modes full partial lora --steps 20
    python benchmarks/train_throughput.py --sizes 1b --modes full --steps 20 --ablate all
CPU smoke (CI, tests/test_benchmarks.py): python benchmarks/train_throughput.py --smoke
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.utils import logging as hf_logging

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_pipeline import ANSWER, QUESTION, driving_like_jpeg  # noqa: E402

from adapt.checkpoints.models import load  # noqa: E402
from adapt.data.samples import Sample, plan_all  # noqa: E402
from adapt.data.templates import IGNORE_INDEX  # noqa: E402
from adapt.data.tiling import normalize  # noqa: E402
from adapt.errors import Report  # noqa: E402
from adapt.training.attention import resolve_attn_implementation  # noqa: E402
from adapt.training.trainer import (  # noqa: E402
    RankBatchSampler,
    TrainConfig,
    apply_tuning_mode,
    enable_gradient_checkpointing,
    make_builder,
    precision_flags,
    resolve_workers,
    train,
)

SIZES = {"tiny": "tiny", "1b": "mini-internvl2-1b", "2b": "mini-internvl2-2b", "4b": "mini-internvl2-4b"}
MODES = {"full": {"mode": "full"}, "partial": {"mode": "partial", "partial": "mlp+llm"}, "lora": {"mode": "lora"}}
GC_AUTO = {"tiny": "none", "1b": "none", "2b": "all", "4b": "all"}  # as configs/driving/*.yaml
ABLATIONS = ("pack", "logits", "normalize", "attn", "gc", "workers", "pin")
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0),
               ("A100", 312.0), ("L40S", 362.0))
PATCH_TOKENS = (448 // 14) ** 2 + 1
FLOP_FORMULA = """model FLOPs per optimizer step (useful work only, the same for every path of a size x mode):
  vision    n_tiles * (2*N_vit*P + 4*L_vit*d_vit*P^2) * (3 if the tower trains else 1), P = 1025 patch tokens
  mlp       n_tiles * 256 * 2*N_mlp * (1 + [mlp trains] + [vision trains])
  LLM       2*N_llm*T * (2 + [LLM weights train])  (= 6*N*T full / mlp+llm, 4*N*T LoRA's frozen base)
  LoRA      6*N_lora*T
  attention 12*L_llm*d_attn * sum(len_i^2) over the samples of the row (varlen, no causal discount)
  lm_head   2*V*d*S * (2 + [lm_head trains]), S = supervised positions
  N = weights of Linear/Conv layers (embeddings, norms excluded); T = real tokens (no padding)
MFU = model FLOPs / step time / peak dense bf16 FLOP/s of the device"""

GENERAL_TEXT = [("Name a colour that rhymes with bed.", "Red."),
                ("What is the capital of France?", "Paris is the capital of France."),
                ("Give two prime numbers larger than ten.", "Eleven and thirteen."),
                ("Summarise: the meeting moved from Monday to Wednesday at noon.",
                 "The meeting is now on Wednesday at noon.")]


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------
def write_entries(root: Path, n: int) -> list[tuple[dict[str, Any], str]]:
    """n records over two image files written once: 75% driving (13 tiles), 25% general."""
    if not (root / "stitched.jpg").exists():
        driving_like_jpeg(root / "stitched.jpg")
        rng = np.random.default_rng(1)
        Image.fromarray(rng.integers(0, 256, (448, 448, 3), dtype=np.uint8)).save(root / "general.jpg", quality=90)
    entries = []
    for i in range(n):
        if i % 8 == 7:
            record = {"id": f"g{i}", "image": "general.jpg", "conversations": [
                {"from": "human", "value": "<image>\nWhat does this picture show?"},
                {"from": "gpt", "value": "Coloured noise without any recognisable object."}]}
        elif i % 8 == 3:
            question, answer = GENERAL_TEXT[(i // 8) % len(GENERAL_TEXT)]
            record = {"id": f"t{i}", "conversations": [{"from": "human", "value": question},
                                                       {"from": "gpt", "value": answer}]}
        else:
            record = {"id": f"d{i}", "image": "stitched.jpg", "conversations": [
                {"from": "human", "value": "<image>\n" + QUESTION}, {"from": "gpt", "value": ANSWER * (1 + i % 3)}]}
        entries.append((record, str(root)))
    return entries


@dataclass
class Plan:
    """The rows both paths train on, in the order the fast path's sampler yields them."""

    entries: list[tuple[dict[str, Any], str]]
    rows: list[list[int]]  # indices into entries, one list per optimizer step
    lengths: list[int]
    tiles: list[int]
    supervised: list[int]


def plan_rows(root: Path, loaded, config: TrainConfig, total_steps: int) -> Plan:
    """Enough records for `total_steps` rows, and the rows `adapt.training.trainer.train` will make of them
    (the same plan and sampler as train(), one rank), so the baseline can replay them."""
    n = 4 * total_steps
    builder = make_builder(loaded, config)
    while True:
        entries = write_entries(root, n)
        planned = plan_all(builder, entries, Report(name="bench"))
        assert all(p is not None for p in planned), "a synthetic record was dropped"
        lengths, tiles = [p.length for p in planned], [p.tiles for p in planned]
        sampler = RankBatchSampler(lengths, tiles, pack=config.pack, batch_size=config.per_device_train_batch_size,
                                   max_tokens=config.pack_tokens, max_tiles=config.pack_tiles, seed=config.seed)
        if len(sampler) >= total_steps:
            rows = [[i for i, _, _ in row] for row in sampler][:total_steps]
            return Plan(entries, rows, lengths, tiles, [p.supervised for p in planned])
        n *= 2


class RowDataset(Dataset):
    """The baseline's items: one planned row (a list of samples) per optimizer step."""

    def __init__(self, plan: Plan, builder) -> None:
        self.plan, self.builder = plan, builder

    def __len__(self) -> int:
        return len(self.plan.rows)

    def __getitem__(self, k: int) -> list[Sample]:
        return [self.builder.build(*self.plan.entries[i], index=i) for i in self.plan.rows[k]]


class PaddedFloatCollator:
    """What a user gets without adapt: pad to the longest sample, float32 tiles normalised on the
    host, labels for the model's own (full-vocabulary) loss."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, items: list[list[Sample]]) -> dict[str, torch.Tensor]:
        samples = [s for row in items for s in row]
        width = max(len(s) for s in samples)
        ids = torch.full((len(samples), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(samples), width), dtype=torch.long)
        for row, s in enumerate(samples):
            ids[row, :len(s)], labels[row, :len(s)], mask[row, :len(s)] = s.input_ids, s.labels, 1
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        tiles = [s.tiles for s in samples if s.tiles is not None]
        if tiles:
            batch["pixel_values"] = normalize(torch.cat(tiles), torch.float32)
        return batch


# ----------------------------------------------------------------------------------------------
# measurement
# ----------------------------------------------------------------------------------------------
class StepTimer(TrainerCallback):
    """Wall time of every optimizer step and the part spent before it started (fetching the batch).

    The Trainer fetches a step's batches between the previous on_step_end and this on_step_begin;
    the device is synchronised at each step end so that gap is time the GPU sat idle waiting for data.
    Checkpoint saving is switched off: it is not what is measured.
    """

    def __init__(self) -> None:
        self.start = 0.0
        self.begins: list[float] = []
        self.ends: list[float] = []

    @staticmethod
    def _now() -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):
        if torch.cuda.is_available():  # the peak of training, not of building the model (fp32 then bf16)
            torch.cuda.reset_peak_memory_stats()
        self.start = self._now()

    def on_step_begin(self, args, state, control, **kwargs):
        self.begins.append(time.perf_counter())

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(self._now())
        control.should_save = False
        return control

    def measured(self, warmup: int) -> tuple[list[float], list[float]]:
        """(step seconds, data-wait seconds) of the steps after the warm-up."""
        previous = [self.start, *self.ends[:-1]]
        steps = [end - prev for end, prev in zip(self.ends, previous)]
        waits = [begin - prev for begin, prev in zip(self.begins, previous)]
        return steps[warmup:], waits[warmup:]


@dataclass
class ModelShape:
    n_vit: int
    vit_layers: int
    vit_width: int
    n_mlp: int
    n_llm: int
    n_lora: int
    llm_layers: int
    attn_width: int
    n_head: int
    vision_trains: bool
    mlp_trains: bool
    llm_trains: bool
    head_trains: bool


def model_shape(model: torch.nn.Module) -> ModelShape:
    """Matmul weight counts per part, and which parts train (after the tuning mode is applied)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    counts = {"vision": 0, "mlp": 0, "llm": 0, "lora": 0, "head": 0}
    trains = dict.fromkeys(counts, False)
    for name, module in base.named_modules():
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) or "original_module" in name:
            continue  # peft keeps an untrained copy of modules_to_save that never runs
        part = ("lora" if "lora_" in name else "vision" if "vision_tower" in name else
                "mlp" if "multi_modal_projector" in name else "llm" if "language_model" in name else "head")
        counts[part] += module.weight.numel()
        trains[part] |= any(p.requires_grad for p in module.parameters())
    vision, text = base.config.vision_config, base.config.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return ModelShape(counts["vision"], vision.num_hidden_layers, vision.hidden_size, counts["mlp"], counts["llm"],
                      counts["lora"], text.num_hidden_layers, text.num_attention_heads * head_dim, counts["head"],
                      trains["vision"], trains["mlp"], trains["llm"], trains["head"])


def row_flops(shape: ModelShape, lengths: list[int], tiles: int, supervised: int, image_tokens: int) -> float:
    """Model FLOPs of one optimizer step over one row (see FLOP_FORMULA)."""
    tokens = sum(lengths)
    vision = tiles * (2 * shape.n_vit * PATCH_TOKENS + 4 * shape.vit_layers * shape.vit_width * PATCH_TOKENS ** 2)
    vision *= 3 if shape.vision_trains else 1
    mlp = tiles * image_tokens * 2 * shape.n_mlp * (1 + shape.mlp_trains + shape.vision_trains)
    llm = 2 * shape.n_llm * tokens * (2 + shape.llm_trains)
    lora = 6 * shape.n_lora * tokens
    attention = 12 * shape.llm_layers * shape.attn_width * sum(n * n for n in lengths)
    head = 2 * shape.n_head * supervised * (2 + shape.head_trains)
    return float(vision + mlp + llm + lora + attention + head)


@dataclass
class Result:
    size: str
    mode: str
    path: str
    steps: int = 0
    tokens: int = 0
    samples: int = 0
    seconds: float = 0.0
    wait: float = 0.0
    flops: float = 0.0
    peak_bytes: int | None = None
    error: str | None = None
    notes: list[str] = field(default_factory=list)


def peak_tflops(override: float | None) -> float | None:
    if override:
        return override
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((value for key, value in PEAK_TFLOPS if key in name), None)


# ----------------------------------------------------------------------------------------------
# the two paths
# ----------------------------------------------------------------------------------------------
def load_model(preset: str, dtype: str | None):
    """The preset's random-init model, built directly on the GPU when there is one (a 4B CPU init is slow)."""
    device = torch.device("cuda") if torch.cuda.is_available() else contextlib.nullcontext()
    with device:
        return load(preset, dtype=dtype, seed=0)


def run_fast(plan: Plan, preset: str, dtype: str | None, config: TrainConfig,
             out: Path) -> tuple[StepTimer, ModelShape]:
    timer = StepTimer()
    result = train(load_model(preset, dtype), plan.entries, config, out, callbacks=[timer], progress=False)
    return timer, model_shape(result.model)


def run_baseline(plan: Plan, preset: str, dtype: str | None, config: TrainConfig, workers: int,
                 out: Path) -> tuple[StepTimer, ModelShape]:
    loaded = load_model(preset, dtype)
    model = apply_tuning_mode(loaded.model, config)
    model.config.use_cache = False
    enable_gradient_checkpointing(model, config.gradient_checkpointing)
    shape = model_shape(model)
    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=1, max_steps=len(plan.rows),
        learning_rate=config.learning_rate, lr_scheduler_type=config.lr_scheduler_type, warmup_steps=config.warmup_steps,
        weight_decay=config.weight_decay, max_grad_norm=config.max_grad_norm, logging_steps=10**9,
        save_strategy="no", report_to="none", remove_unused_columns=False, dataloader_num_workers=workers,
        train_sampling_strategy="sequential", use_cpu=not torch.cuda.is_available(), disable_tqdm=True,
        seed=config.seed, **precision_flags(config.precision))
    timer = StepTimer()
    trainer = Trainer(model=model, args=args, train_dataset=RowDataset(plan, make_builder(loaded, config)),
                      data_collator=PaddedFloatCollator(loaded.tokenizer.pad_token_id), callbacks=[timer])
    trainer.train()
    return timer, shape


def fast_variants(ablate: set[str], config: TrainConfig, plan: Plan, on_gpu: bool,
                  gc_variants: list[str]) -> list[tuple[str, dict]]:
    """(row label, TrainConfig overrides) of the fast path and of each requested ablation."""
    variants = [("fast", {})]
    if "pack" in ablate:
        per_row = max(1, round(sum(len(r) for r in plan.rows) / len(plan.rows)))
        variants.append(("fast -pack", {"pack": False, "per_device_train_batch_size": per_row}))
    if "logits" in ablate:
        variants.append(("fast logits=full", {"logits": "full"}))
    if "normalize" in ablate:
        variants.append(("fast normalize=host", {"normalize": "host"}))
    half = config.precision != "fp32"
    if "attn" in ablate and resolve_attn_implementation(config.attn_implementation, half) != "sdpa":
        variants.append(("fast attn=sdpa", {"attn_implementation": "sdpa"}))
    if "gc" in ablate:
        variants += [(f"fast gc={choice}", {"gradient_checkpointing": choice})
                     for choice in gc_variants if choice != config.gradient_checkpointing]
    if "workers" in ablate and resolve_workers(config.dataloader_num_workers) != 0:
        variants.append(("fast dataloader_num_workers=0", {"dataloader_num_workers": 0}))
    if "pin" in ablate and on_gpu:
        variants.append(("fast -pin", {"dataloader_pin_memory": False}))
    return variants


def measure(result: Result, plan: Plan, warmup: int, image_tokens: int, fn, *args: Any) -> Result:
    """Run one configuration (`fn(*args)` -> (timer, shape)) and fill `result` from its measured steps.
    An error becomes a row that says so (OOM, or the exception's name with its traceback on stderr),
    so one configuration that does not fit leaves the others measured."""
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()
        if torch.cuda.memory_allocated() > 2**30:  # the previous configuration was not freed: peaks would be off
            result.notes.append(f"{torch.cuda.memory_allocated() / 2**30:.1f} GiB still allocated before the run")
    try:
        timer, shape = fn(*args)
    except torch.OutOfMemoryError:
        result.error = "OOM"
    except Exception as err:  # noqa: BLE001 (reported in the table and on stderr; the other rows still run)
        traceback.print_exc()
        result.error = type(err).__name__
        result.notes.append(f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
    if torch.cuda.is_available():
        result.peak_bytes = torch.cuda.max_memory_allocated()
    gc.collect()
    if result.error:
        return result
    steps, waits = timer.measured(warmup)
    rows = plan.rows[warmup:warmup + len(steps)]
    result.steps, result.seconds, result.wait = len(steps), sum(steps), sum(waits)
    result.tokens = sum(plan.lengths[i] for row in rows for i in row)
    result.samples = sum(len(row) for row in rows)
    result.flops = sum(row_flops(shape, [plan.lengths[i] for i in row], sum(plan.tiles[i] for i in row),
                                 sum(plan.supervised[i] for i in row), image_tokens) for row in rows)
    return result


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------
def describe_data(plan: Plan) -> str:
    driving = next(i for i, (record, _) in enumerate(plan.entries) if record["id"].startswith("d"))
    tokens = [sum(plan.lengths[i] for i in row) for row in plan.rows]
    per_row = np.mean([len(r) for r in plan.rows])
    n_tiles = plan.tiles[driving]
    return (f"data: driving sample of {n_tiles} tile{'s' * (n_tiles != 1)}, {plan.lengths[driving]} tokens "
            f"({plan.lengths[driving] - 256 * plan.tiles[driving]} text); rows of {per_row:.1f} "
            f"samples, {np.mean(tokens):,.0f} tokens on average")


def table(results: list[Result], peak: float | None) -> str:
    head = ["size", "mode", "path", "steps", "tokens/s", "samples/s", "s/step", "MFU", "peak GiB", "data wait",
            "vs baseline"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    baselines = {(r.size, r.mode): r for r in results if r.path == "baseline" and not r.error}
    for r in results:
        if r.error:
            cells = [r.size, r.mode, r.path, r.error] + ["-"] * (len(head) - 4)
        else:
            base = baselines.get((r.size, r.mode))
            tokens_s = r.tokens / r.seconds
            ratio = f"{tokens_s / (base.tokens / base.seconds):.2f}x" if base else "-"
            mfu = f"{100 * r.flops / r.seconds / (peak * 1e12):.1f}%" if peak else "-"
            memory = f"{r.peak_bytes / 2**30:.1f}" if r.peak_bytes is not None else "-"
            cells = [r.size, r.mode, r.path, str(r.steps), f"{tokens_s:,.0f}", f"{r.samples / r.seconds:.2f}",
                     f"{r.seconds / r.steps:.3f}", mfu, memory, f"{100 * r.wait / r.seconds:.1f}%", ratio]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def progress(result: Result) -> None:
    """One line per finished configuration (stderr), so a run cut short still leaves its figures."""
    if result.error:
        figures = result.error
    else:
        figures = f"{result.tokens / result.seconds:,.0f} tokens/s, {result.seconds / result.steps:.3f} s/step"
    print(f"  {result.size} {result.mode} {result.path}: {figures}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["1b", "2b", "4b"], choices=sorted(SIZES))
    parser.add_argument("--modes", nargs="+", default=["full", "partial", "lora"], choices=sorted(MODES))
    parser.add_argument("--steps", type=int, default=20, help="measured optimizer steps per configuration")
    parser.add_argument("--warmup", type=int, default=3, help="steps run before measuring")
    parser.add_argument("--ablate", nargs="*", default=[], choices=[*ABLATIONS, "all"],
                        help="also run the fast path with each of these switched off")
    parser.add_argument("--ablate-modes", nargs="*", default=None, help="modes to ablate (default: all of --modes)")
    parser.add_argument("--gc-variants", nargs="+", default=["none", "llm", "all"],
                        choices=["none", "llm", "vision", "all"],
                        help="checkpointing choices the gc ablation tries (besides the one in use)")
    parser.add_argument("--gradient-checkpointing", default="auto", choices=["auto", "none", "llm", "vision", "all"],
                        help="for both paths; auto: none for 1b, all for 2b/4b (as configs/driving)")
    parser.add_argument("--pack-tokens", type=int, default=16384)
    parser.add_argument("--pack-tiles", type=int, default=48)
    parser.add_argument("--max-tiles", type=int, default=12)
    parser.add_argument("--workers", type=int, default=None, help="dataloader workers (default: adapt's choice)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak dense bf16 TFLOP/s of the device")
    parser.add_argument("--smoke", action="store_true",
                        help="CPU check of the whole script (CI): tiny model, 1 + 2 steps, one-tile driving "
                             "samples, small rows, ablations on full only")
    args = parser.parse_args(argv)
    if args.smoke:
        torch.set_num_threads(1)  # CI shares two cores: OpenMP threads waiting on each other cost more than they give
        args.sizes, args.modes, args.steps, args.warmup = ["tiny"], ["full", "partial", "lora"], 2, 1
        args.pack_tokens, args.pack_tiles, args.max_tiles, args.workers = 1280, 3, 1, 0
        args.ablate, args.ablate_modes, args.gc_variants = ["pack", "logits", "normalize", "gc"], ["full"], ["all"]
    if "all" in args.ablate:
        args.ablate = list(ABLATIONS)
    return args


def main(argv: list[str] | None = None) -> list[Result]:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    hf_logging.set_verbosity_error()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    on_gpu = torch.cuda.is_available()
    precision = "bf16" if on_gpu and torch.cuda.is_bf16_supported() else "fp32"
    dtype = "bf16" if precision == "bf16" else None
    peak = peak_tflops(args.peak_tflops)
    device = torch.cuda.get_device_name() if on_gpu else "CPU (no GPU: timings are not GPU figures)"
    total = args.warmup + args.steps
    ablate_modes = set(args.modes if args.ablate_modes is None else args.ablate_modes)
    results: list[Result] = []
    summary = ""
    attention = resolve_attn_implementation("auto", precision != "fp32")
    print(f"device: {device}; precision {precision}; peak {peak or '-'} TFLOP/s; fast-path attention {attention}; "
          f"{args.steps} measured steps after {args.warmup} warm-up steps per row", flush=True)
    # the Trainer prints its own summaries: keep stdout for the table
    with tempfile.TemporaryDirectory(prefix="adapt-throughput-") as tmp, contextlib.redirect_stdout(sys.stderr):
        root = Path(tmp) / "data"
        root.mkdir()
        for size in args.sizes:
            preset = SIZES[size]
            checkpointing = GC_AUTO[size] if args.gradient_checkpointing == "auto" else args.gradient_checkpointing
            for mode in args.modes:
                config = TrainConfig(**MODES[mode], max_steps=total, pack_tokens=args.pack_tokens,
                                     pack_tiles=args.pack_tiles, max_tiles=args.max_tiles, precision=precision,
                                     gradient_checkpointing=checkpointing, attn_implementation="auto",
                                     dataloader_num_workers=args.workers, logging_steps=10**9, save_steps=10**9, warmup_steps=0.0)
                config.validate()
                with torch.device("meta"):  # planning needs the tokenizer and the geometry only
                    source = load(preset, seed=0)
                plan = plan_rows(root, source, config, total)
                summary = summary or describe_data(plan)
                workers = resolve_workers(config.dataloader_num_workers)
                results.append(measure(Result(size, mode, "baseline"), plan, args.warmup, source.tokens_per_tile,
                                       run_baseline, plan, preset, dtype, config, workers,
                                       Path(tmp) / f"{size}-{mode}-baseline"))
                progress(results[-1])
                ablations = set(args.ablate) if mode in ablate_modes else set()
                for label, overrides in fast_variants(ablations, config, plan, on_gpu, args.gc_variants):
                    variant = TrainConfig(**{**config.to_dict(), **overrides})
                    variant.validate()
                    variant_plan = plan if variant.pack else plan_rows(root, source, variant, total)
                    out = Path(tmp) / f"{size}-{mode}-{label.replace(' ', '_')}"
                    row = Result(size, mode, label)
                    results.append(measure(row, variant_plan, args.warmup, source.tokens_per_tile,
                                           run_fast, variant_plan, preset, dtype, variant, out))
                    progress(results[-1])
    print(summary)
    print()
    print(table(results, peak))
    print()
    for r in results:
        base = next((b for b in results if (b.size, b.mode, b.path) == (r.size, r.mode, "baseline")), None)
        if r.path == "fast" and base is not None and not r.error and not base.error:
            print(f"speed-up fast vs baseline, {r.size} {r.mode}: "
                  f"{(r.tokens / r.seconds) / (base.tokens / base.seconds):.2f}x tokens/s")
    for r in results:
        for note in r.notes:
            print(f"note, {r.size} {r.mode} {r.path}: {note}")
    print()
    print(FLOP_FORMULA)
    return results


if __name__ == "__main__":
    main()
