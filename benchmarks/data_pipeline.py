"""Time per driving sample: adapt's sample builder vs the official recipe vs a bare JPEG decode.

One 2688x896 stitched JPEG -> 13 tiles (6x2 grid + thumbnail) -> token ids and labels.
  adapt:      SampleBuilder.build (simplejpeg decode, uint8 tiles, torch antialiased thumbnail,
              ids built from spans; normalisation is left to the device)
  reference:  the official InternVL recipe: PIL decode, dynamic_preprocess (resize, crops,
              thumbnail), per-tile float tensor + ImageNet normalise, prompt string with 3328
              <IMG_CONTEXT> tokens tokenized whole
  bare:       PIL decode of the same file (Image.open(...).convert("RGB"))
All single-threaded (as one dataloader worker is). Usage: python benchmarks/data_pipeline.py [--repeat N]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from adapt.checkpoints.models import tiny_tokenizer
from adapt.data.samples import SampleBuilder
from adapt.data.templates import SYSTEM_MESSAGES, Encoder
from adapt.data.tiling import IMAGENET_MEAN, IMAGENET_STD, TilingPolicy

QUESTION = ("The image shows six camera views stitched in two rows: top row CAM_FRONT_LEFT, CAM_FRONT, "
            "CAM_FRONT_RIGHT; bottom row CAM_BACK_LEFT, CAM_BACK, CAM_BACK_RIGHT. What are the important "
            "objects in the current scene? ") * 3
ANSWER = "There is a car to the front of the ego vehicle and a pedestrian to the back left. " * 4


def driving_like_jpeg(path: Path) -> None:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:896, 0:2688]
    base = np.stack([x * 255 // 2688, y * 255 // 896, (x // 7 + y // 5) % 256], -1)
    noisy = np.clip(base + rng.integers(-25, 25, base.shape), 0, 255).astype(np.uint8)
    Image.fromarray(noisy).save(path, quality=95)


def reference_sample(path: Path, tokenizer, mean: torch.Tensor, std: torch.Tensor) -> tuple:
    """The official per-sample work, transcribed (dynamic_preprocess + T.ToTensor/T.Normalize)."""
    image = Image.open(path).convert("RGB")
    w, h = image.size
    ratios = sorted({(i, j) for n in range(1, 13) for i in range(1, n + 1) for j in range(1, n + 1) if 1 <= i * j <= 12},
                    key=lambda r: r[0] * r[1])
    best, best_diff = (1, 1), float("inf")
    for r in ratios:
        diff = abs(w / h - r[0] / r[1])
        if diff < best_diff or (diff == best_diff and w * h > 0.5 * 448 * 448 * r[0] * r[1]):
            best, best_diff = (r if diff < best_diff or w * h > 0.5 * 448 * 448 * r[0] * r[1] else best), diff
    tw, th = 448 * best[0], 448 * best[1]
    resized = image.resize((tw, th))
    tiles = [resized.crop(((i % best[0]) * 448, (i // best[0]) * 448, (i % best[0] + 1) * 448, (i // best[0] + 1) * 448))
             for i in range(best[0] * best[1])]
    tiles.append(image.resize((448, 448)))
    pixel_values = torch.stack([
        (torch.from_numpy(np.array(t, dtype=np.uint8)).permute(2, 0, 1).float().div(255) - mean) / std for t in tiles
    ])
    prompt = (f"<|im_start|>system\n{SYSTEM_MESSAGES['internvl2_5']}<|im_end|>\n"  # the official default
              + "<|im_start|>user\n<img>" + "<IMG_CONTEXT>" * (256 * len(tiles)) + "</img>\n" + QUESTION
              + "<|im_end|>\n<|im_start|>assistant\n")
    ids = tokenizer(prompt + ANSWER + "<|im_end|>\n", add_special_tokens=False)["input_ids"]
    n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    labels = [-100] * n_prompt + ids[n_prompt:]
    return pixel_values, ids, labels


def timed(fn, repeat: int) -> float:
    fn()  # warm-up
    runs = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)
    tokenizer = tiny_tokenizer()
    builder = SampleBuilder(Encoder(tokenizer, "internvl2_5"), TilingPolicy(max_tiles=12), max_length=8192)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        driving_like_jpeg(root / "stitched.jpg")
        record = {"id": "bench", "image": "stitched.jpg", "conversations": [
            {"from": "human", "value": "<image>\n" + QUESTION}, {"from": "gpt", "value": ANSWER}]}
        sample = builder.build(record, root)
        assert sample.tiles.shape == (13, 3, 448, 448) and sample.tiles.dtype == torch.uint8
        ref_pixels, ref_ids, _ = reference_sample(root / "stitched.jpg", tokenizer, mean, std)
        assert ref_pixels.shape == (13, 3, 448, 448) and len(ref_ids) == len(sample)
        ours = timed(lambda: builder.build(record, root), args.repeat)
        reference = timed(lambda: reference_sample(root / "stitched.jpg", tokenizer, mean, std), args.repeat)
        bare = timed(lambda: Image.open(root / "stitched.jpg").convert("RGB"), args.repeat)
    print(f"per driving sample (2688x896 JPEG -> 13 tiles -> {len(sample)} tokens), median of {args.repeat}:")
    print(f"  adapt sample builder : {ours:7.2f} ms")
    print(f"  official recipe      : {reference:7.2f} ms")
    print(f"  bare JPEG decode     : {bare:7.2f} ms")
    print(f"  speed-up vs official : {reference / ours:5.2f}x   (goal >= 2.5x)")
    print(f"  adapt / bare decode  : {ours / bare:5.2f}x   (goal <= 1.5x)")


if __name__ == "__main__":
    main()
