"""Samples -> batches: padding or packing, uint8 tiles, and the loss reduction weights.

Packing puts several samples in one row with position ids restarting at 0 for each; the HF
attention mask builder turns restarting positions into a block-diagonal causal mask (SDPA/eager),
and flash-attention varlen reads the same position ids, so no token attends across samples.

Loss reduction (InternVL2.5): each supervised token of a sample with n supervised tokens weighs
1 ("token"), 1/n ("sample") or 1/sqrt(n) ("square"); loss = sum(w * CE) / sum(w) where sum(w) runs
over the whole optimizer step (all micro-batches, all ranks), so gradient accumulation and data
parallelism give the same update as one big batch.
"""

from __future__ import annotations

import array
import math
import random
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from adapt.data.samples import Sample
from adapt.data.templates import IGNORE_INDEX

REDUCTIONS = ("token", "sample", "square")


def token_weights(labels: torch.Tensor, reduction: str) -> torch.Tensor:
    """Per-position weights of one sample's targets (position j weighs label j), zeros elsewhere."""
    supervised = labels != IGNORE_INDEX
    supervised[0] = False  # label 0 is never a target: nothing predicts it
    n = int(supervised.sum())
    if reduction == "token" or n == 0:
        scale = 1.0
    elif reduction == "sample":
        scale = 1.0 / n
    elif reduction == "square":
        scale = 1.0 / math.sqrt(n)
    else:
        raise ValueError(f"unknown loss reduction {reduction!r}; choose one of {REDUCTIONS}")
    return supervised.float() * scale


class Collator:
    """Pads (`pack=False`: one row per sample) or packs (`pack=True`: all samples in one row)."""

    def __init__(self, pad_token_id: int, *, pack: bool = False, loss_reduction: str = "square",
                 pad_to_multiple_of: int | None = None) -> None:
        if loss_reduction not in REDUCTIONS:
            raise ValueError(f"unknown loss reduction {loss_reduction!r}; choose one of {REDUCTIONS}")
        self.pad_token_id, self.pack, self.loss_reduction = pad_token_id, pack, loss_reduction
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, items: Sequence[Sample | None]) -> dict[str, torch.Tensor]:
        samples = [s for s in items if s is not None]
        if not samples:
            raise RuntimeError("every sample of this batch was dropped")
        tiles = [s.tiles for s in samples if s.tiles is not None]
        batch = self._pack(samples) if self.pack else self._pad(samples)
        if tiles:
            batch["pixel_values"] = torch.cat(tiles) if len(tiles) > 1 else tiles[0]
        return batch

    def _pack(self, samples: Sequence[Sample]) -> dict[str, torch.Tensor]:
        ids = torch.cat([s.input_ids for s in samples])[None]
        labels = torch.cat([s.labels for s in samples])[None]
        positions = torch.cat([torch.arange(len(s)) for s in samples])[None]
        weights = torch.cat([token_weights(s.labels, self.loss_reduction) for s in samples])[None]
        seq_index = torch.cat([torch.full((len(s),), i) for i, s in enumerate(samples)])[None]
        return {"input_ids": ids, "labels": labels, "position_ids": positions, "loss_weights": weights,
                "sample_index": seq_index}

    def _pad(self, samples: Sequence[Sample]) -> dict[str, torch.Tensor]:
        width = max(len(s) for s in samples)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        n = len(samples)
        ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        weights = torch.zeros((n, width))
        for row, s in enumerate(samples):
            ids[row, : len(s)] = s.input_ids
            labels[row, : len(s)] = s.labels
            mask[row, : len(s)] = 1
            weights[row, : len(s)] = token_weights(s.labels, self.loss_reduction)
        seq_index = torch.arange(n)[:, None].expand(n, width)
        return {"input_ids": ids, "labels": labels, "attention_mask": mask, "loss_weights": weights,
                "sample_index": seq_index}


def weighted_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
                  denominator: torch.Tensor | float | None = None) -> torch.Tensor:
    """sum(w * CE) / denominator (default: sum(w) of this batch), next-token shifted."""
    logits = logits[:, :-1].float()
    targets = labels[:, 1:]
    w = weights[:, 1:].to(logits.device)
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                         ignore_index=IGNORE_INDEX, reduction="none")
    total = (ce * w.reshape(-1)).sum()
    denom = w.sum() if denominator is None else denominator
    return total / denom


def per_sample_losses(logits: torch.Tensor, labels: torch.Tensor, sample_index: torch.Tensor) -> dict[int, float]:
    """Mean next-token CE of each sample in a (padded or packed) batch, keyed by its index."""
    ce = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels[:, 1:], ignore_index=IGNORE_INDEX,
                         reduction="none")
    mask = labels[:, 1:] != IGNORE_INDEX
    index = sample_index[:, 1:]
    out = {}
    for i in index[mask].unique().tolist():
        sel = mask & (index == i)
        out[int(i)] = float(ce[sel].mean())
    return out


def pack_bins(lengths: Sequence[int], tiles: Sequence[int], *, max_tokens: int, max_tiles: int,
              seed: int = 0, shuffle: bool = True, window: int = 64) -> list[list[int]]:
    """Group sample indices into rows of at most `max_tokens` tokens and `max_tiles` tiles.

    First-fit over a seeded shuffle, looking at the last `window` open rows only: linear time,
    keeps batches mixed, and fills rows well on mixtures of long driving and short general
    samples. A sample longer than `max_tokens` gets a row of its own.
    """
    members, starts = pack_flat(lengths, tiles, max_tokens=max_tokens, max_tiles=max_tiles, seed=seed,
                                shuffle=shuffle, window=window)
    return [members[a:b].tolist() for a, b in zip(starts[:-1], starts[1:])]


def pack_flat(lengths: Sequence[int], tiles: Sequence[int], *, max_tokens: int, max_tiles: int, seed: int = 0,
              shuffle: bool = True, window: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """`pack_bins` as two arrays: the rows' sample indices one after the other, and where each row
    starts (plus the end). A row leaves the window for good, so it is stored as soon as it does:
    only `window` rows are Python lists (a 1M-sample mixture's rows as lists were tens of MB)."""
    lengths, tiles = np.asarray(lengths, dtype=np.int64).tolist(), np.asarray(tiles, dtype=np.int64).tolist()
    order = list(range(len(lengths)))
    if shuffle:
        random.Random(seed).shuffle(order)
    members, sizes = array.array("q"), array.array("q")
    bins: list[list[int]] = []
    room: list[tuple[int, int]] = []
    for i in order:
        for b in range(len(room)):
            tok_left, tile_left = room[b]
            if lengths[i] <= tok_left and tiles[i] <= tile_left:
                bins[b].append(i)
                room[b] = (tok_left - lengths[i], tile_left - tiles[i])
                break
        else:
            bins.append([i])
            room.append((max_tokens - lengths[i], max_tiles - tiles[i]))
            if len(bins) > window:
                closed = bins.pop(0)
                room.pop(0)
                members.extend(closed)
                sizes.append(len(closed))
    for closed in bins:
        members.extend(closed)
        sizes.append(len(closed))
    starts = np.zeros(len(sizes) + 1, dtype=np.int64)
    np.cumsum(np.frombuffer(sizes, dtype=np.int64), out=starts[1:])
    return np.frombuffer(members, dtype=np.int64), starts
