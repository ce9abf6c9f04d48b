"""Time to the first training step and peak memory of `adapt run` over large InternVL-format pools.

Builds, per size, a general pool (an InternVL meta .json + JSONL: ~80% image rows over a pool of 64
JPEGs, ~15-word questions, ~40-word answers) and a domain set of 10% of it, then runs the real
`api.run` (what `adapt run --data general=DOMAIN --general META --general-ratio 0.25 --max-steps 2`
runs: tiny model, 32-sample evaluation by default) in a fresh process per measurement, until the trainer logs
that the first training batch is ready (`first training step` in the run log). Printed per size:
wall time to that step (and how much of it the formatting phase, which includes reading the Arrow
tables, and the base model's evaluation took), CPU time (user+sys of the run and every process it
started, sampled from /proc) and the peak RSS of the run process (wait4 ru_maxrss; and, sampled from
/proc, its anonymous and file-backed parts: pages of memory-mapped tables count as file-backed),
cold (an empty shared data folder: formatting, Arrow tables, planning) and warm (the same folder
again: everything cached), and the growth between sizes.

`--baseline SRC` runs the same measurements with the adapt package found in SRC (e.g. a `git archive`
of the commit before Arrow-backed data: one process, no cache), for the "old path" columns.

    python benchmarks/prep_scale.py --sizes 250000,500000,1000000
    python benchmarks/prep_scale.py --sizes 2000,4000 --work /tmp/prep --baseline /tmp/adapt-before
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIRST_STEP = "first training step: its batch is ready (unix time "


def build_pool(folder: Path, general: int, domain: int, seed: int = 0) -> tuple[Path, Path]:
    """(domain JSONL, general InternVL meta file) under folder, sharing one pool of 64 JPEGs."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from filter_scale import row, write_pool

    meta, domain_file = folder / "general" / "meta.json", folder / "domain" / "domain.jsonl"
    if meta.is_file() and domain_file.is_file():
        return domain_file, meta
    for part, n, offset in (("general", general, 0), ("domain", domain, 10**9)):
        rng = random.Random(seed + offset)
        images = write_pool(folder / part / "images", 64, seed)
        target = folder / part / ("pool.jsonl" if part == "general" else "domain.tmp")
        with open(target, "w", encoding="utf-8") as handle:
            for i in range(n):
                handle.write(json.dumps(row(offset + i, rng, images), ensure_ascii=False) + "\n")
    os.replace(folder / "domain" / "domain.tmp", domain_file)
    meta.write_text(json.dumps({"pool": {"root": ".", "annotation": "pool.jsonl", "repeat_time": 1}}))
    return domain_file, meta


def preformat(shared: Path, domain: Path, general: Path) -> None:
    """The formatted folders a run looks for (`<shared>/formatted/<label>/meta.json`), naming the pool
    files in place: `api.format_source` then reuses them instead of formatting."""
    pool = general.parent / "pool.jsonl"
    for label, annotation in (("general-domain.jsonl", domain), ("general-meta.json", pool)):
        folder = shared / "formatted" / label
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "meta.json").write_text(json.dumps({label: {"root": str(annotation.parent.resolve()),
                                                              "annotation": str(annotation.resolve())}}))


def child(spec: dict) -> None:
    """One `adapt run` in this process (what `adapt run` calls), its first step written to the run log."""
    from transformers import TrainerCallback

    from adapt import api, console
    from adapt.config import RunConfig

    logged = console.LogToRunLog.on_step_begin  # the run log's first-step line (a baseline may lack it)

    def on_step_begin(self, args, state, control, **kwargs):
        if logged is not TrainerCallback.on_step_begin:
            logged(self, args, state, control, **kwargs)
        else:
            console.log(f"{FIRST_STEP}{time.time():.3f})")
        os._exit(0)  # measured up to the first batch, not the model's first forward pass

    console.LogToRunLog.on_step_begin = on_step_begin
    fields = {"num_proc": spec["num_proc"]} if spec.get("num_proc") else {}
    config = RunConfig(domain="driving", data=[{"kind": "general", "path": spec["domain"],
                                                "options": {"verify_images": "header"}}],
                       general=[{"kind": "general", "path": spec["general"], "options": {"verify_images": "header"}}],
                       general_ratio=0.25, runs_dir=spec["runs"], name=spec["name"],
                       train={"max_steps": 2, "save_steps": 1000, "dataloader_num_workers": 0},
                       eval={"holdout": spec["eval"] // 2, "general_holdout": spec["eval"] - spec["eval"] // 2,
                             "max_new_tokens": 8}, **fields)
    api.run(config, shared_dir=spec["shared"], export=False, progress=False)


def measure(spec: dict, src: Path, timeout: float) -> dict:
    """Spawn one run (it ends itself once its first training batch is ready); wall, CPU and peak RSS."""
    log = Path(spec["runs"]) / spec["name"] / "logs" / "run.log"
    errors = Path(spec["runs"]) / f"{spec['name']}.stderr"
    errors.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(src), "TOKENIZERS_PARALLELISM": "false"}
    started = time.time()
    with open(errors, "w") as stderr:
        process = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)],
                                   env=env, stdout=subprocess.DEVNULL, stderr=stderr)
        timer = threading.Timer(timeout, process.kill)
        timer.start()
        peaks, cpu = {"RssAnon": 0, "RssFile": 0}, {}
        sampler = threading.Thread(target=_sample, args=(process.pid, peaks, cpu), daemon=True)
        sampler.start()
        _, _, usage = os.wait4(process.pid, 0)  # peak RSS: ru_maxrss
        timer.cancel()
        sampler.join()
    lines = log.read_text(encoding="utf-8").splitlines() if log.is_file() else []
    first = [float(line.split(FIRST_STEP)[1].rstrip(")")) for line in lines if FIRST_STEP in line]
    if not first:
        raise SystemExit(f"run {spec['name']} ended without a first step:\n{errors.read_text()[-3000:]}")
    phases = {name: sum(float(line.split(f"{name} done in ")[1].split()[0]) for line in lines
                        if f"{name} done in " in line) for name in ("formatting", "evaluation (before)")}
    return {"first_step_s": round(first[0] - started, 1), "cpu_s": round(sum(cpu.values()), 1),
            "formatting_s": round(phases["formatting"], 1), "eval_s": round(phases["evaluation (before)"], 1),
            "peak_rss_mb": round(usage.ru_maxrss / 1024), "peak_anon_mb": round(peaks["RssAnon"] / 1024),
            "peak_file_mb": round(peaks["RssFile"] / 1024)}


def _sample(pid: int, peaks: dict[str, int], cpu: dict[int, float]) -> None:
    """Every 50 ms: the peak anonymous and file-backed resident KiB of `pid` (/proc; ru_maxrss counts
    the pages of memory-mapped Arrow files it has read too, which the kernel can drop at any time), and
    the CPU seconds of it and of each of its descendants (formatting and Arrow workers fork from a
    forkserver the run does not reap, so wait4 does not count them; a process's last <50 ms may be missed)."""
    status = Path(f"/proc/{pid}/status")
    tick = os.sysconf("SC_CLK_TCK")
    while True:
        try:
            lines = status.read_text().splitlines()
        except OSError:
            return
        if not lines or any(line.startswith("State:") and "Z" in line for line in lines):
            return
        for line in lines:
            key, _, value = line.partition(":")
            if key in peaks:
                peaks[key] = max(peaks[key], int(value.split()[0]))
        parents: dict[int, tuple[int, float]] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                parents[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
        for child, (parent, seconds) in parents.items():
            ancestor = pid if child == pid else parent
            while ancestor not in (0, 1, pid) and ancestor in parents:
                ancestor = parents[ancestor][0]
            if ancestor == pid:
                cpu[child] = max(cpu.get(child, 0.0), seconds)
        time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="250000,500000,1000000", help="general pool sizes (domain: 10%%)")
    parser.add_argument("--work", default=None, help="folder for pools and runs (default: a temp folder)")
    parser.add_argument("--baseline", default=None, help="a source tree of the previous adapt, run for comparison")
    parser.add_argument("--num-proc", type=int, default=None, help="data-preparation processes (default: all cores)")
    parser.add_argument("--eval-samples", type=int, default=32, help="held-out samples evaluated before training "
                        "(half domain, half general; cold runs only, warm runs reuse the base evaluation)")
    parser.add_argument("--preformatted", action="store_true",
                        help="give each run the pools as already-formatted folders (meta.json naming the pool JSONL), "
                             "so cold runs measure reading, splitting, mixing and planning without the formatters")
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(json.loads(args.child))
    import tempfile

    work = Path(args.work or tempfile.mkdtemp(prefix="prep_scale-"))
    implementations = [("new", REPO)] + ([("old", Path(args.baseline).resolve())] if args.baseline else [])
    rows = []
    for size in [int(s) for s in args.sizes.split(",")]:
        domain, general = build_pool(work / f"pool-{size}", size, max(1, size // 10))
        for label, src in implementations:
            shared = work / f"shared-{label}-{size}"
            shutil.rmtree(shared, ignore_errors=True)
            if args.preformatted:
                preformat(shared, domain, general)
            for phase in ("cold", "warm"):
                spec = {"domain": str(domain), "general": str(general), "shared": str(shared), "num_proc": args.num_proc,
                        "eval": args.eval_samples,
                        "runs": str(work / "runs"), "name": f"{label}-{size}-{phase}-{time.time_ns()}"}
                result = {"impl": label, "general": size, "domain": max(1, size // 10), "phase": phase,
                          **measure(spec, src, args.timeout)}
                print(json.dumps(result), flush=True)
                rows.append(result)
    print("\n| impl | general + domain | phase | first step (s) | of which formatting / base eval (s) "
          "| CPU (s) | peak RSS (MB) | anon / file-backed (MB) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['impl']} | {r['general']} + {r['domain']} | {r['phase']} | {r['first_step_s']} "
              f"| {r['formatting_s']} / {r['eval_s']} | {r['cpu_s']} | {r['peak_rss_mb']} "
              f"| {r['peak_anon_mb']} / {r['peak_file_mb']} |")
    for label, _ in implementations:
        for phase in ("cold", "warm"):
            mine = [r for r in rows if r["impl"] == label and r["phase"] == phase]
            if len(mine) > 1:
                growth = 100 * (mine[-1]["peak_rss_mb"] / mine[0]["peak_rss_mb"] - 1)
                print(f"{label} {phase}: peak RSS {mine[0]['general']} -> {mine[-1]['general']} general records: "
                      f"{growth:+.1f}%")


if __name__ == "__main__":
    main()
