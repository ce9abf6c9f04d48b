"""Filter rules 1-3 plus the contamination check over many InternVL-format records.

Generates `--records` JSONL rows (~80% image rows over a pool of `--pool` JPEGs, ~15-word questions,
~40-word answers, with a few exact/normalised duplicates, looping answers, empty answers and copies of
evaluation samples planted), an evaluation set of 1000 rows, then streams the JSONL through
`DataFilter.check` in a fresh process per pool size, so the peak RSS is the filter's own. Each distinct
image file is read and hashed once; memory holds one 8-byte key per kept sample, not the pool.

    python benchmarks/filter_scale.py                      # 1M records, pools of 64 and 1024 JPEGs
    python benchmarks/filter_scale.py --records 2000 --pools 8 --smoke
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from adapt.data.filtering import DataFilter, FilterConfig, TextVerdict, text_verdict
from adapt.data.records import write_jsonl

WORDS = ["car", "truck", "bus", "pedestrian", "cyclist", "lane", "road", "sign", "light", "left", "right", "front", "back", "side", "parked", "moving", "crossing", "intersection", "traffic", "signal", "red", "green", "yellow", "white", "black", "blue", "vehicle", "driver", "camera", "view", "distance", "near", "far", "slow", "fast", "stop", "turn", "merge", "highway", "street", "building", "tree", "sky", "cloud", "rain", "wet", "dry", "shadow", "sun", "night", "day", "morning", "evening", "lesion", "lung", "heart", "bone", "scan", "image", "region", "field", "river", "forest", "desert", "city", "farm", "harbour", "airport", "bridge", "ship", "plane", "roof", "tower", "park", "school"]


CONFIG = FilterConfig(remove_contaminated=True)  # rules 1-3 and contamination, model scoring off


def write_pool(folder: Path, n: int, seed: int) -> list[str]:
    """`n` distinct 640x480 JPEGs (smooth random pictures)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = []
    for i in range(n):
        small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((640, 480), Image.Resampling.BICUBIC).save(folder / f"{i:05d}.jpg", quality=85)
        names.append(f"{folder.name}/{i:05d}.jpg")
    return names


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choices(WORDS, k=n)).capitalize() + "."


def row(i: int, rng: random.Random, images: list[str]) -> dict:
    question = sentence(rng, 15)[:-1] + "?"
    out = {"id": str(i), "conversations": [{"from": "human", "value": question},
                                           {"from": "gpt", "value": sentence(rng, 40)}]}
    if rng.random() < 0.8:
        out["image"] = rng.choice(images)
        out["conversations"][0]["value"] = "<image>\n" + question
    return out


def generate(folder: Path, n_records: int, pool: int, seed: int = 0) -> tuple[Path, Path]:
    """(training JSONL, evaluation JSONL) under folder, sharing one image root."""
    rng = random.Random(seed)
    images = write_pool(folder / "images", pool, seed)
    eval_images = write_pool(folder / "eval_images", 8, seed + 1)
    evaluation = [row(-i - 1, rng, eval_images) for i in range(1000)]
    write_jsonl(folder / "eval.jsonl", evaluation)
    with open(folder / "train.jsonl", "w", encoding="utf-8") as handle:
        recent: list[dict] = []
        for i in range(n_records):
            pick = rng.random()
            if pick < 0.02 and recent:  # a normalised duplicate of a recent row
                record = json.loads(json.dumps(rng.choice(recent)))
                record["conversations"][1]["value"] = "  " + record["conversations"][1]["value"].upper()
            elif pick < 0.03:  # a looping answer
                record = row(i, rng, images)
                record["conversations"][1]["value"] = "The car is parked on the left. " * 12
            elif pick < 0.035:  # an empty answer that slipped through (markup only)
                record = row(i, rng, images)
                record["conversations"][1]["value"] = "<br>"
            elif pick < 0.036:  # an evaluation sample copied into training
                record = json.loads(json.dumps(rng.choice(evaluation)))
            else:
                record = row(i, rng, images)
            record["id"] = str(i)
            recent = (recent + [record])[-100:]
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return folder / "train.jsonl", folder / "eval.jsonl"


def _verdicts(lines: list[bytes]) -> list[TextVerdict]:
    """The text-only rules for a chunk of JSONL lines (in a worker process)."""
    return [text_verdict(json.loads(line), CONFIG) for line in lines]


def _chunks(path: Path, size: int):
    with open(path, "rb") as handle:
        while lines := handle.readlines(size * 400):
            yield lines


def measure(train: Path, evaluation: Path, workers: int, chunk: int = 20000) -> dict:
    """Stream `train` through the filter: workers run the text rules on chunks of lines, this process
    the stateful ones (images, contamination, duplicates) in file order. Time, CPU and peak RSS."""
    start, cpu_start = time.perf_counter(), time.process_time()
    data_filter = DataFilter(CONFIG)
    data_filter.load_evaluation([evaluation])
    root, n = str(train.parent), 0
    check, loads = data_filter.check, json.loads
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        chunks = _chunks(train, chunk)
        pending = [(lines, pool.apply_async(_verdicts, (lines,))) for lines in itertools.islice(chunks, workers + 1)]
        while pending:
            lines, result = pending.pop(0)
            for line, verdict in zip(lines, result.get()):
                check(loads(line), root, "train", verdict)
            n += len(lines)
            pending += [(more, pool.apply_async(_verdicts, (more,))) for more in itertools.islice(chunks, 1)]
    seconds = time.perf_counter() - start
    main_cpu = time.process_time() - cpu_start
    workers_cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    workers_cpu = workers_cpu.ru_utime + workers_cpu.ru_stime
    report = data_filter.report.to_dict()
    return {"records": n, "workers": workers, "seconds": round(seconds, 2), "records_per_s": round(n / seconds),
            "cpu_seconds": round(main_cpu + workers_cpu, 2), "main_cpu_seconds": round(main_cpu, 2),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "worker_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024),
            "kept": report["sources"]["train"]["kept"], "removed": report["removed"],
            "distinct_images": len(data_filter.images.by_path)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--pools", type=int, nargs="+", default=[64, 1024])
    parser.add_argument("--smoke", action="store_true", help="no time limit check (for tests)")
    parser.add_argument("--limit-s", type=float, default=60.0)
    parser.add_argument("--workers", type=int, default=2, help="processes for the text rules (2: this machine's cores)")
    parser.add_argument("--measure", nargs=2, metavar=("TRAIN", "EVAL"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(Path(args.measure[0]), Path(args.measure[1]), args.workers)))
        return 0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for pool in args.pools:
            folder = Path(tmp) / f"pool{pool}"
            train, evaluation = generate(folder, args.records, pool)
            out = subprocess.run([sys.executable, __file__, "--measure", str(train), str(evaluation),
                                  "--workers", str(args.workers)],
                                 check=True, capture_output=True, text=True).stdout
            rows.append({"pool": pool, **json.loads(out)})
            print(json.dumps(rows[-1]), flush=True)
    print("| pool | records | seconds | records/s | CPU s (all / main) | peak RSS MiB (main / worker) |\n"
          "|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['pool']} | {r['records']} | {r['seconds']} | {r['records_per_s']} | "
              f"{r['cpu_seconds']} / {r['main_cpu_seconds']} | "
              f"{r['peak_rss_mib']} / {r['worker_peak_rss_mib']} |")
    slow = [r for r in rows if r["seconds"] > args.limit_s]
    if slow and not args.smoke:
        print(f"slower than {args.limit_s} s: {slow}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
