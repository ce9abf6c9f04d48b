"""Samples, padding, packing and loss reduction on the tiny model (CPU)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from adapt.data.batching import Collator, pack_bins, per_sample_losses, token_weights, weighted_loss
from adapt.data.samples import SampleBuilder, SampleDropped, plan_all
from adapt.data.templates import IGNORE_INDEX, Encoder
from adapt.data.tiling import TilingPolicy, normalize
from adapt.errors import Report


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for name, size in [("wide.jpg", (900, 448)), ("small.png", (300, 300)), ("tall.jpg", (448, 900))]:
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(root / name)
    return root


def _rec(i, image, q, a):
    r = {"id": f"r{i}", "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
    if image:
        r["image"] = image
    return r


RECORDS = [
    _rec(0, "wide.jpg", "<image>\nDescribe the image.", "A noisy picture with many colors."),
    _rec(1, None, "What is two plus two?", "four"),
    _rec(2, ["small.png", "tall.jpg"], "<image>\n<image>\nWhich is taller?", "The second one."),
    _rec(3, "small.png", "<image>\nColor?", "gray"),
]


@pytest.fixture(scope="module")
def builder(tiny):
    enc = Encoder(tiny.tokenizer, tiny.template, tokens_per_tile=tiny.tokens_per_tile)
    return SampleBuilder(enc, TilingPolicy(max_tiles=6), max_length=4096)


def _forward(model, batch):
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
    if "pixel_values" in batch:
        inputs["pixel_values"] = normalize(batch["pixel_values"])
    with torch.no_grad():
        return model(**inputs, use_cache=False).logits


def test_plan_matches_built_sample(builder, data_root):
    for i, record in enumerate(RECORDS):
        planned = builder.plan(record, data_root)
        sample = builder.build(record, data_root, index=i)
        assert planned.length == len(sample)
        assert planned.tiles == (0 if sample.tiles is None else sample.tiles.shape[0])
        assert planned.supervised == sample.n_supervised


def test_packed_losses_equal_one_by_one(tiny, builder, data_root):
    model = tiny.model.eval()
    samples = [builder.build(r, data_root, index=i) for i, r in enumerate(RECORDS)]
    pad_id = tiny.tokenizer.pad_token_id
    single = {}
    for i, s in enumerate(samples):
        batch = Collator(pad_id, pack=False)([s])
        single[i] = per_sample_losses(_forward(model, batch), batch["labels"], batch["sample_index"])[0]
    packed = Collator(pad_id, pack=True)(samples)
    assert packed["input_ids"].shape[0] == 1 and packed["pixel_values"].dtype == torch.uint8
    losses = per_sample_losses(_forward(model, packed), packed["labels"], packed["sample_index"])
    padded = Collator(pad_id, pack=False)(samples)
    losses_padded = per_sample_losses(_forward(model, padded), padded["labels"], padded["sample_index"])
    for i in range(len(samples)):
        assert abs(losses[i] - single[i]) < 1e-5, (i, losses[i], single[i])
        assert abs(losses_padded[i] - single[i]) < 1e-5


def test_reductions_weights():
    labels = torch.tensor([IGNORE_INDEX, IGNORE_INDEX, 5, 6, 7, 8])
    assert torch.equal(token_weights(labels, "token"), torch.tensor([0, 0, 1, 1, 1, 1.0]))
    assert torch.allclose(token_weights(labels, "sample"), torch.tensor([0, 0, .25, .25, .25, .25]))
    assert torch.allclose(token_weights(labels, "square"), torch.tensor([0, 0, .5, .5, .5, .5]))
    # label 0 is never a target
    assert token_weights(torch.tensor([3, 4]), "token").tolist() == [0.0, 1.0]


@pytest.mark.parametrize("reduction", ["token", "sample", "square"])
def test_gradient_accumulation_equals_big_batch(reduction):
    """Micro-batches normalised by the step's total weight sum to the big-batch loss and gradient."""
    torch.manual_seed(0)
    vocab = 11
    logits = torch.randn(4, 9, vocab, requires_grad=True)
    labels = torch.randint(0, vocab, (4, 9))
    labels[:, :3] = IGNORE_INDEX
    labels[1, 3:7] = IGNORE_INDEX  # samples of different supervised lengths
    weights = torch.stack([token_weights(row, reduction) for row in labels])
    big = weighted_loss(logits, labels, weights)
    g_big, = torch.autograd.grad(big, logits)
    total = weights[:, 1:].sum()
    acc = sum(weighted_loss(logits[i:i + 2], labels[i:i + 2], weights[i:i + 2], total) for i in (0, 2))
    g_acc, = torch.autograd.grad(acc, logits)
    assert torch.allclose(big, acc, atol=1e-6) and torch.allclose(g_big, g_acc, atol=1e-7)
    if reduction == "sample":  # every sample weighs the same whatever its length
        per = [weighted_loss(logits[i:i + 1], labels[i:i + 1], weights[i:i + 1]) for i in range(4)]
        assert torch.allclose(big, torch.stack(per).mean(), atol=1e-6)


def test_truncation_never_cuts_an_image(tiny, data_root):
    enc = Encoder(tiny.tokenizer, tiny.template, tokens_per_tile=tiny.tokens_per_tile)
    long_answer = " ".join(["word"] * 300)
    record = _rec(9, "wide.jpg", "<image>\nDescribe.", long_answer)
    full = SampleBuilder(enc, max_length=100000).plan(record, data_root)
    # a limit inside the image span: dropped, with the reason
    with pytest.raises(SampleDropped, match="inside image 1"):
        SampleBuilder(enc, max_length=200).plan(record, data_root)
    # a limit after the image but inside the answer: truncated, image intact, still supervised
    limit = full.length - 50
    sample = SampleBuilder(enc, max_length=limit).build(record, data_root)
    context = tiny.model.config.image_token_id
    assert len(sample) == limit and int((sample.input_ids == context).sum()) == sample.tiles.shape[0] * 256
    # a limit that leaves no supervised token: dropped
    prompt_only = next(i for i, v in enumerate(sample.labels.tolist()) if v != IGNORE_INDEX)
    with pytest.raises(SampleDropped, match="no supervised token"):
        SampleBuilder(enc, max_length=prompt_only).plan(record, data_root)


def test_plan_all_counts_drops_with_ids(builder, data_root):
    bad = _rec(7, "missing.jpg", "<image>\nQ", "A")
    report = Report()
    planned = plan_all(builder, [(RECORDS[1], str(data_root)), (bad, str(data_root))], report)
    assert planned[0] is not None and planned[1] is None
    assert report.skipped == 1 and "r7" in str(report.skips[0])


def test_pack_bins_respects_budgets():
    rng = np.random.default_rng(0)
    lengths = [int(x) for x in rng.integers(50, 3500, 200)]
    tiles = [int(x) for x in rng.integers(0, 14, 200)]
    bins = pack_bins(lengths, tiles, max_tokens=8192, max_tiles=24, seed=1)
    assert sorted(i for b in bins for i in b) == list(range(200))
    for b in bins:
        assert sum(lengths[i] for i in b) <= 8192 and sum(tiles[i] for i in b) <= 24
    fill = sum(lengths) / (len(bins) * 8192)
    assert fill > 0.7, fill
    assert pack_bins(lengths, tiles, max_tokens=8192, max_tiles=24, seed=1) == bins
    assert math.isfinite(fill)
