"""The benchmark scripts run end to end (CPU, reduced sizes) and print the rows they promise.

Timing values are not checked (CPU figures mean nothing for a GPU benchmark), only that every
configuration produced a complete, well-formed row.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NUMBER = r"[\d,]+(\.\d+)?"


def _run(*args: str, timeout: int = 300) -> str:
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_train_throughput_smoke_table():
    out = _run("benchmarks/train_throughput.py", "--smoke")
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| tiny |"):
            assert len(cells) == 11, line
            rows[(cells[1], cells[2])] = cells
    expected = {("full", p) for p in ("baseline", "fast", "fast -pack", "fast logits=full", "fast normalize=host",
                                      "fast gc=all")}
    expected |= {(mode, p) for mode in ("partial", "lora") for p in ("baseline", "fast")}
    assert set(rows) == expected
    for (mode, path), cells in rows.items():
        _, _, _, steps, tokens, samples, step_s, mfu, memory, wait, ratio = cells
        assert steps == "2", (mode, path)
        for value in (tokens, samples, step_s):
            assert re.fullmatch(NUMBER, value) and float(value.replace(",", "")) > 0, (mode, path, value)
        assert mfu == "-" and memory == "-"  # no GPU: no peak FLOP/s, no GPU memory
        assert re.fullmatch(r"\d+\.\d%", wait) and re.fullmatch(r"\d+\.\d\dx", ratio)
        if path == "baseline":
            assert ratio == "1.00x"
    for mode in ("full", "partial", "lora"):
        assert re.search(rf"speed-up fast vs baseline, tiny {mode}: {NUMBER}x tokens/s", out), mode
    assert "12*L_llm*d_attn * sum(len_i^2)" in out and "6*N*T" in out  # the FLOP formula is printed
    assert re.search(r"data: driving sample of 1 tile, \d+ tokens", out)


def test_data_pipeline_runs():
    out = _run("benchmarks/data_pipeline.py", "--repeat", "3")
    assert "13 tiles" in out
    for label in ("adapt sample builder", "official recipe", "bare JPEG decode"):
        assert re.search(rf"{label}\s*:\s*{NUMBER} ms", out), label
    assert re.search(rf"speed-up vs official :\s*{NUMBER}x", out)


def test_filter_scale_smoke():
    import json

    out = _run("benchmarks/filter_scale.py", "--records", "3000", "--pools", "4", "16", "--smoke")
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [r["pool"] for r in rows] == [4, 16]
    for r in rows:
        assert r["records"] == 3000 and r["distinct_images"] == r["pool"] + 8  # training pool + evaluation pool
        assert {"duplicate", "repetition", "markup_only", "contaminated"} <= set(r["removed"])
        assert r["kept"] + sum(r["removed"].values()) == 3000
    assert re.search(rf"\| 16 \| 3000 \| {NUMBER} \| \d+ \| {NUMBER} / {NUMBER} \| \d+ / \d+ \|", out)


def test_format_driving_one_and_two_processes_write_the_same_bytes():
    out = _run("benchmarks/format_driving.py", "--samples", "18", "--num-proc", "1", "2")
    assert re.search(rf"num_proc=1: 126 records, 0 skipped, {NUMBER} s wall -> {NUMBER} samples/s, {NUMBER} CPU "
                     r"s/sample, 0 worker processes", out), out
    assert re.search(r"num_proc=2: 126 records, .* 2 worker processes", out), out
    assert re.search(rf"speed-up num_proc=2 vs num_proc=1: {NUMBER}x; byte-identical output: True", out), out
    for step in ("plan", "decode", "resize", "encode"):
        assert re.search(rf"  {step} +{NUMBER} s", out), step


@pytest.mark.slow
def test_prep_scale_smoke(tmp_path):
    """Two tiny pool sizes through the real `api.run`, cold then warm: one JSON row per measurement
    and the table; the warm run reads the cached Arrow tables (its log shows no formatting or planning)."""
    import json

    out = _run("benchmarks/prep_scale.py", "--sizes", "200,400", "--eval-samples", "2", "--num-proc", "1",
               "--work", str(tmp_path), timeout=600)
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [(r["general"], r["domain"], r["phase"]) for r in rows] == \
        [(200, 20, "cold"), (200, 20, "warm"), (400, 40, "cold"), (400, 40, "warm")]
    assert all(r["first_step_s"] > 0 and r["peak_rss_mb"] > 0 for r in rows)
    assert re.search(rf"\| new \| 400 \+ 40 \| warm \| {NUMBER} \| {NUMBER} / {NUMBER} \| {NUMBER} \| \d+ \| \d+ / \d+ \|", out)
    assert re.search(r"new warm: peak RSS 200 -> 400 general records: [+-]\d+\.\d%", out)
    warm_logs = sorted(tmp_path.glob("runs/new-400-warm-*/logs/run.log"))
    assert len(warm_logs) == 1 and "wrote" not in warm_logs[0].read_text()  # formatting reused
    assert (tmp_path / "shared-new-400" / "arrow").is_dir()
