"""Throughput of the driving formatter with one and with several processes, and where its time goes.

    python benchmarks/format_driving.py [--samples 48] [--num-proc 1 2] [--seed 0]

Writes a synthetic nuScenes dataset (six 1600x900 cameras a sample) to a temporary folder and
formats it with `formatters.base.run` (the same path `adapt format driving --num-proc N` takes)
once per `--num-proc` value, printing for each the wall time, samples per second and CPU seconds
per sample (this process and its workers, without the one-time import of torch and the
formatter in the worker server, about 1-2 s), then the speed-up of each over the first and whether
every output file (records.jsonl, meta.json, report.json, the stitched JPEGs) is byte-identical to
the first run's. Wall time covers `run()` end to end: devkit load, planning, starting the workers,
stitching, merging. It also prints the share of the image time spent in JPEG decode, resize and
JPEG encode (`report.timing`, summed over processes), and decodes the same camera files with PIL
and with simplejpeg, checking the pixels are identical (the formatter decodes with simplejpeg).
"""

from __future__ import annotations

import argparse
import io
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import simplejpeg
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapt.config import available_cores  # noqa: E402
from formatters.base import run  # noqa: E402
from formatters.driving import DRIVING  # noqa: E402
from formatters.synthetic.nuscenes import write_nuscenes  # noqa: E402

STEPS = ("decode", "resize", "label", "encode", "write")


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


def different_files(a: Path, b: Path) -> list[str]:
    """Relative paths whose bytes differ between two folders, or that only one of them has."""
    files = {p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file()}
    other = {p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file()}
    return sorted((files ^ other) | {f for f in files & other if (a / f).read_bytes() != (b / f).read_bytes()})


def cpu_seconds() -> float:
    """User + system CPU of this process (the workers' own is in `report.timing["worker_cpu"]`)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    return own.ru_utime + own.ru_stime


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=48, help="samples in the synthetic dataset (default 48)")
    parser.add_argument("--num-proc", type=int, nargs="+", default=[1, 2],
                        help="process counts to compare, the first is the reference (default: 1 2)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.samples < 1:
        parser.error("--samples must be at least 1")
    if min(args.num_proc) < 1:
        parser.error("--num-proc values must be at least 1")
    per_scene = min(args.samples, 6)
    n_scenes = -(-args.samples // per_scene)
    n_samples = n_scenes * per_scene

    with tempfile.TemporaryDirectory(prefix="adapt-bench-driving-") as tmp:
        t0 = time.perf_counter()
        root = write_nuscenes(Path(tmp) / "nuscenes", n_scenes=n_scenes, samples_per_scene=per_scene, seed=args.seed)
        print(f"dataset: {n_samples} samples x 6 cameras (1600x900), written in {time.perf_counter() - t0:.2f} s "
              f"({available_cores()} cores available)")
        results = []
        for i, num_proc in enumerate(args.num_proc):
            out = Path(tmp) / f"out-{i}"
            cpu0, t1 = cpu_seconds(), time.perf_counter()
            report = run(DRIVING, root, out, progress=False, num_proc=num_proc)
            wall, cpu = time.perf_counter() - t1, cpu_seconds() - cpu0 + report.timing.get("worker_cpu", 0.0)
            results.append((num_proc, out, report, wall, cpu))
            print(f"num_proc={num_proc}: {report.written} records, {report.skipped} skipped, {wall:.2f} s wall -> "
                  f"{n_samples / wall:.2f} samples/s, {cpu / n_samples:.3f} CPU s/sample, "
                  f"{int(report.timing.get('workers', 0))} worker processes")
        _, first_out, first_report, first_wall, _ = results[0]
        for num_proc, out, _, wall, _ in results[1:]:
            differ = different_files(first_out, out)
            print(f"speed-up num_proc={num_proc} vs num_proc={results[0][0]}: {first_wall / wall:.2f}x; "
                  f"byte-identical output: {not differ}" + (f" (differ: {', '.join(differ[:5])})" if differ else ""))
        pil_ms, sj_ms, same = compare_decoders(sorted((root / "samples").rglob("*.jpg"))[:24])

    timing = first_report.timing
    images = sum(timing[step] for step in STEPS)
    print(f"time per step, num_proc={results[0][0]} (plan: devkit load, annotations and questions):")
    for step in ("plan", *STEPS):
        share = f"  {100 * timing[step] / images:5.1f} % of image time" if step in STEPS else ""
        print(f"  {step:<8} {timing[step]:7.3f} s{share}")
    print(f"JPEG decode per camera: PIL {pil_ms:.1f} ms, simplejpeg {sj_ms:.1f} ms, identical pixels: {same}")


if __name__ == "__main__":
    main()
