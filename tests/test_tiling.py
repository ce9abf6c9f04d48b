"""Tiling must pick exactly InternVL's grid and cut exactly InternVL's tiles."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from adapt.data.tiling import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TilingPolicy,
    choose_grid,
    count_tiles,
    normalize,
    tile_budget,
    tile_image,
)


# --- the official code, transcribed from OpenGVLab/InternVL (internvl/train/dataset.py) ---------
def official_find_closest_aspect_ratio(aspect_ratio, target_ratios, width, height, image_size):
    best_ratio_diff = float("inf")
    best_ratio = (1, 1)
    area = width * height
    for ratio in target_ratios:
        target_aspect_ratio = ratio[0] / ratio[1]
        ratio_diff = abs(aspect_ratio - target_aspect_ratio)
        if ratio_diff < best_ratio_diff:
            best_ratio_diff = ratio_diff
            best_ratio = ratio
        elif ratio_diff == best_ratio_diff:  # noqa: SIM102 (kept as the official code writes it)
            if area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
                best_ratio = ratio
    return best_ratio


def official_dynamic_preprocess(image, min_num=1, max_num=12, image_size=448, use_thumbnail=False):
    orig_width, orig_height = image.size
    aspect_ratio = orig_width / orig_height
    target_ratios = {(i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1)
                     if i * j <= max_num and i * j >= min_num}
    target_ratios = sorted(target_ratios, key=lambda x: x[0] * x[1])
    target_aspect_ratio = official_find_closest_aspect_ratio(aspect_ratio, target_ratios, orig_width, orig_height,
                                                             image_size)
    target_width = image_size * target_aspect_ratio[0]
    target_height = image_size * target_aspect_ratio[1]
    blocks = target_aspect_ratio[0] * target_aspect_ratio[1]
    resized_img = image.resize((target_width, target_height))
    processed_images = []
    for i in range(blocks):
        box = ((i % (target_width // image_size)) * image_size, (i // (target_width // image_size)) * image_size,
               ((i % (target_width // image_size)) + 1) * image_size,
               ((i // (target_width // image_size)) + 1) * image_size)
        processed_images.append(resized_img.crop(box))
    if use_thumbnail and len(processed_images) != 1:
        processed_images.append(image.resize((image_size, image_size)))
    return processed_images, target_aspect_ratio


def _official_grid(width, height, lo=1, hi=12):
    ratios = sorted({(i, j) for n in range(lo, hi + 1) for i in range(1, n + 1) for j in range(1, n + 1)
                     if lo <= i * j <= hi}, key=lambda x: x[0] * x[1])
    return official_find_closest_aspect_ratio(width / height, ratios, width, height, 448)


def test_grid_matches_official_on_random_sizes():
    rng = random.Random(1234)
    sizes = [(rng.randint(16, 5000), rng.randint(16, 5000)) for _ in range(400)]
    for w, h in sizes:
        for lo, hi in [(1, 12), (1, 6), (2, 40), (1, 1)]:
            assert choose_grid(w, h, lo, hi) == _official_grid(w, h, lo, hi), (w, h, lo, hi)


def test_grid_exact_ties():
    # Square images tie between (1,1), (2,2), (3,3): the larger grid wins only when the image is
    # bigger than half its area. 448x448 keeps (1,1); 640x640 (> 0.5*4*448^2) goes to (2,2).
    assert choose_grid(448, 448) == (1, 1)
    assert choose_grid(640, 640) == (2, 2)
    assert choose_grid(1000, 1000) == (3, 3)
    # aspect 1.25 is equidistant from 1:2 and 2:1 (|1.25-0.5| == |1.25-2|) and from other pairs.
    ties = [(560, 448), (1120, 896), (2240, 1792), (100, 80)]
    for w, h in ties:
        assert choose_grid(w, h) == _official_grid(w, h), (w, h)
    # exact ties on many aspect ratios built from grid pairs
    for a in range(1, 13):
        for b in range(1, 13):
            for scale in (10, 300, 448, 900):
                w, h = a * scale, b * scale
                assert choose_grid(w, h) == _official_grid(w, h), (w, h)


def test_stitched_driving_image_is_six_by_two():
    assert choose_grid(2688, 896) == (6, 2)
    assert count_tiles(2688, 896) == 13


def _photo_like(w, h, seed=0):
    """Smooth gradients plus mild noise: closer to camera images than white noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 // max(w, 1), y * 255 // max(h, 1), (x + y) % 256], -1)
    return np.clip(base + rng.integers(-20, 20, base.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("w,h", [(1000, 600), (300, 900), (448, 448), (2688, 896)])
def test_tiles_equal_official_crops(w, h):
    image = Image.fromarray(_photo_like(w, h))
    theirs, _ = official_dynamic_preprocess(image, max_num=12, use_thumbnail=True)
    exact = tile_image(image, TilingPolicy(max_tiles=12, thumbnail=True), resample="pil")
    fast = tile_image(np.asarray(image), TilingPolicy(max_tiles=12, thumbnail=True))
    assert exact.dtype == fast.dtype == np.uint8 and exact.shape == fast.shape == (len(theirs), 3, 448, 448)
    for mine, quick, ref in zip(exact, fast, theirs):
        ref = np.asarray(ref).transpose(2, 0, 1)
        assert np.array_equal(mine, ref)  # the PIL path is bit-exact
        diff = np.abs(quick.astype(int) - ref.astype(int))
        assert diff.max() <= 2 and diff.mean() < 0.05, (diff.max(), diff.mean())  # the fast path: +-1 grey level


def test_simplejpeg_decode_equals_pil(tmp_path):
    from adapt.data.images import decode_array

    path = tmp_path / "x.jpg"
    Image.fromarray(_photo_like(900, 300)).save(path, quality=90)
    assert np.array_equal(decode_array(path), np.asarray(Image.open(path).convert("RGB")))


def test_thumbnail_only_with_several_tiles():
    image = Image.new("RGB", (448, 448), "red")
    assert tile_image(image).shape[0] == 1
    assert tile_image(Image.new("RGB", (900, 448))).shape[0] == 3


def test_multi_image_budget():
    assert tile_budget(12, 1) == 12 and tile_budget(12, 6) == 2 and tile_budget(12, 20) == 1
    policy = TilingPolicy(max_tiles=12).for_images(6)
    assert policy.max_tiles == 2 and count_tiles(2688, 896, max_tiles=policy.max_tiles) == 3


def test_jpeg_augmentation_is_seeded_and_mild():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (600, 900, 3), dtype=np.uint8))
    policy = TilingPolicy(jpeg_augment=True)
    a = tile_image(image, policy, random.Random(7))
    b = tile_image(image, policy, random.Random(7))
    c = tile_image(image, policy, random.Random(8))
    plain = tile_image(image, TilingPolicy())
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert a.shape == plain.shape and not np.array_equal(a, plain)


def test_normalize_matches_imagenet_float_path():
    tiles = torch.randint(0, 256, (2, 3, 448, 448), dtype=torch.uint8)
    expected = (tiles.float() / 255.0 - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(
        IMAGENET_STD).view(1, 3, 1, 1)
    assert torch.allclose(normalize(tiles), expected, atol=1e-5)


@pytest.mark.parametrize("w,h", [(1, 1), (5000, 16), (16, 5000)])
def test_extreme_aspects(w, h):
    cols, rows = choose_grid(w, h)
    assert 1 <= cols * rows <= 12
