"""InternVL's dynamic high-resolution tiling, exactly, producing uint8 tiles.

The grid rule (InternVL 1.5+ `dynamic_preprocess`): candidate grids (cols, rows) with
min_tiles <= cols*rows <= max_tiles sorted by cols*rows; pick the one whose cols/rows is closest to
the image's width/height; on an exact tie a later (larger) grid wins only if the image area exceeds
half of that grid's area. Resize the whole image (aspect not kept, bicubic) to (448*cols, 448*rows),
cut row-major, and append a 448x448 thumbnail only when there is more than one tile.

Tiles stay uint8 (N, 3, 448, 448) on the host: a float copy is 4x the bytes to move and normalise
in Python. `normalize` runs on the device, once per batch.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import simplejpeg
import torch
from PIL import Image

from adapt.data.images import resize

TILE = 448
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@lru_cache(maxsize=64)
def candidate_grids(min_tiles: int, max_tiles: int) -> tuple[tuple[int, int], ...]:
    """The candidate (cols, rows) grids in InternVL's order.

    Built exactly as the official code does (a set sorted by area), so that the order among grids of
    equal area, which decides some exact ties, is the same as theirs.
    """
    ratios = {
        (i, j)
        for n in range(min_tiles, max_tiles + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_tiles <= i * j <= max_tiles
    }
    return tuple(sorted(ratios, key=lambda r: r[0] * r[1]))


def choose_grid(width: int, height: int, min_tiles: int = 1, max_tiles: int = 12,
                tile: int = TILE) -> tuple[int, int]:
    """(cols, rows) InternVL picks for a width x height image."""
    aspect = width / height
    area = width * height
    best_diff, best = float("inf"), (1, 1)
    for cols, rows in candidate_grids(min_tiles, max_tiles):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best_diff, best = diff, (cols, rows)
        elif diff == best_diff and area > 0.5 * tile * tile * cols * rows:
            best = (cols, rows)
    return best


def count_tiles(width: int, height: int, min_tiles: int = 1, max_tiles: int = 12, thumbnail: bool = True) -> int:
    """Tiles (thumbnail included) an image becomes, without decoding it."""
    cols, rows = choose_grid(width, height, min_tiles, max_tiles)
    n = cols * rows
    return n + 1 if thumbnail and n > 1 else n


def tile_budget(max_tiles: int, n_images: int) -> int:
    """Per-image tile budget of a multi-image sample: max(1, max_tiles // n_images)."""
    return max(1, max_tiles // max(1, n_images))


@dataclass(frozen=True)
class TilingPolicy:
    """How images of one dataset become tiles."""

    min_tiles: int = 1
    max_tiles: int = 12
    thumbnail: bool = True
    jpeg_augment: bool = False  # InternVL2.5: re-compress each tile at quality ~ U[75, 100]
    multi_image_max_tiles: int | None = None  # a multi-image sample's whole budget (None: max_tiles, as InternVL)

    def for_images(self, n_images: int) -> TilingPolicy:
        total = self.max_tiles if n_images <= 1 else min(self.max_tiles, self.multi_image_max_tiles or self.max_tiles)
        budget = tile_budget(total, n_images)
        return TilingPolicy(min(self.min_tiles, budget), budget, self.thumbnail, self.jpeg_augment)


def _chw_tiles(array: np.ndarray, cols: int, rows: int) -> np.ndarray:
    """(rows*T, cols*T, 3) HWC -> (rows*cols, 3, T, T), row-major, one copy."""
    tiles = array.reshape(rows, TILE, cols, TILE, 3).transpose(0, 2, 4, 1, 3)
    return np.ascontiguousarray(tiles).reshape(rows * cols, 3, TILE, TILE)


def _jpeg_roundtrip(tile_chw: np.ndarray, quality: int) -> np.ndarray:
    encoded = simplejpeg.encode_jpeg(np.ascontiguousarray(tile_chw.transpose(1, 2, 0)), quality=quality,
                                     colorspace="RGB")
    return simplejpeg.decode_jpeg(encoded, colorspace="RGB").transpose(2, 0, 1)


def tile_image(image: Image.Image | np.ndarray, policy: TilingPolicy | None = None,
               rng: random.Random | None = None, resample: str = "torch") -> np.ndarray:
    """Cut one RGB image into InternVL tiles: uint8 array (N, 3, 448, 448), thumbnail last."""
    policy = policy or TilingPolicy()
    array = np.asarray(image) if isinstance(image, Image.Image) else image
    height, width = array.shape[:2]
    cols, rows = choose_grid(width, height, policy.min_tiles, policy.max_tiles)
    tiles = _chw_tiles(resize(array, TILE * cols, TILE * rows, resample), cols, rows)
    if policy.thumbnail and cols * rows > 1:
        thumb = resize(array, TILE, TILE, resample).transpose(2, 0, 1)
        tiles = np.concatenate([tiles, thumb[None]], axis=0)
    if policy.jpeg_augment:
        rng = rng or random.Random()
        tiles = np.stack([_jpeg_roundtrip(t, rng.randint(75, 100)) for t in tiles])
    return tiles


def single_tile(image: Image.Image | np.ndarray, resample: str = "torch") -> np.ndarray:
    """One 448x448 tile of the whole image (video frames): (1, 3, 448, 448) uint8."""
    array = np.asarray(image) if isinstance(image, Image.Image) else image
    return np.ascontiguousarray(resize(array, TILE, TILE, resample).transpose(2, 0, 1))[None]


def normalize(tiles: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> ImageNet-normalised `dtype`, wherever the tensor lives (ideally the GPU)."""
    if tiles.dtype != torch.uint8:
        return tiles.to(dtype)
    mean = torch.tensor(IMAGENET_MEAN, device=tiles.device, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(IMAGENET_STD, device=tiles.device, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    return ((tiles.float() - mean) / std).to(dtype)
