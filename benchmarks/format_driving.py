"""Throughput of the driving formatter, and where its time goes.

    python benchmarks/format_driving.py [--samples 24] [--seed 0]

Writes a synthetic nuScenes dataset (six 1600x900 cameras a sample) to a temporary folder, formats
it with `formatters.base.run` (the same path `adapt format driving` takes) and prints samples per
second together with the share of the formatting time spent in JPEG decode, resize and JPEG encode,
as the formatter itself timed those steps in this run (`report.stats["timing_s"]`). It also decodes
the same camera files with PIL and with simplejpeg, checks the pixels are identical, and prints
both speeds (the formatter decodes with simplejpeg).
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import simplejpeg
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from formatters.base import run  # noqa: E402
from formatters.driving import DRIVING  # noqa: E402
from formatters.synthetic.nuscenes import write_nuscenes  # noqa: E402


def compare_decoders(files: list[Path], rounds: int = 3) -> tuple[float, float, bool]:
    """(PIL ms, simplejpeg ms) per camera image, best of `rounds`, and whether the pixels agree."""
    blobs = [f.read_bytes() for f in files]

    def with_pil(blob: bytes) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"))

    def with_simplejpeg(blob: bytes) -> np.ndarray:
        return simplejpeg.decode_jpeg(blob, colorspace="RGB")

    best = {with_pil: float("inf"), with_simplejpeg: float("inf")}
    for _ in range(rounds):
        for decode in best:
            t0 = time.perf_counter()
            for blob in blobs:
                decode(blob)
            best[decode] = min(best[decode], (time.perf_counter() - t0) / len(blobs) * 1000)
    same = all(np.array_equal(with_pil(b), with_simplejpeg(b)) for b in blobs)
    return best[with_pil], best[with_simplejpeg], same


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=24, help="samples in the synthetic dataset (default 24)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.samples < 1:
        parser.error("--samples must be at least 1")
    per_scene = min(args.samples, 6)
    n_scenes = -(-args.samples // per_scene)

    with tempfile.TemporaryDirectory(prefix="adapt-bench-driving-") as tmp:
        t0 = time.perf_counter()
        root = write_nuscenes(Path(tmp) / "nuscenes", n_scenes=n_scenes, samples_per_scene=per_scene, seed=args.seed)
        t1 = time.perf_counter()
        report = run(DRIVING, root, Path(tmp) / "out", progress=False)
        t2 = time.perf_counter()
        n_samples = n_scenes * per_scene
        timing = report.stats["timing_s"]
        pil_ms, sj_ms, same = compare_decoders(sorted((root / "samples").rglob("*.jpg"))[:24])

    formatting = timing["total"]
    print(f"dataset: {n_samples} samples x 6 cameras (1600x900), written in {t1 - t0:.2f} s")
    print(f"run():   {report.written} records, {report.skipped} skipped, {t2 - t1:.2f} s wall "
          f"(devkit load, tile counts and writing records included)")
    print(f"format:  {formatting:.2f} s -> {n_samples / formatting:.1f} samples/s "
          f"({n_samples / (t2 - t1):.1f} samples/s end to end)")
    for step in ("decode", "resize", "label", "encode", "write", "annotations"):
        print(f"  {step:<12} {timing[step]:7.3f} s  {100 * timing[step] / formatting:5.1f} %")
    print(f"JPEG decode per camera: PIL {pil_ms:.1f} ms, simplejpeg {sj_ms:.1f} ms, identical pixels: {same}")


if __name__ == "__main__":
    main()
