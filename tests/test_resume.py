"""A run killed with SIGKILL (inside a step, or inside a checkpoint save) and resumed ends with the
same weights as an uninterrupted run, consuming every sample exactly once per epoch; a half-written
checkpoint is never resumed from; a diverging loss stops with the last good checkpoint intact, or
is skipped without touching the weights.

The crash runs are real processes (`tests/helpers.py` as a script) on 3 image + 3 text rows,
2 samples per step, 2 epochs (6 steps), a checkpoint every 2 steps, one CPU thread each."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import changed, fast_config, snapshot, write_records
from safetensors.torch import load_file
from transformers import InternVLForConditionalGeneration, TrainerCallback

from adapt.checkpoints.models import load
from adapt.errors import AdaptError
from adapt.training import trainer as training
from adapt.training.trainer import COMPLETE_MARKER, DivergenceError, last_complete_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread, the cores are shared

HELPER = Path(__file__).with_name("helpers.py")
STEPS_PER_EPOCH, EPOCHS = 3, 2
CRASH_CONFIG = {"mode": "full", "pack": False, "per_device_train_batch_size": 2, "num_train_epochs": EPOCHS, "save_steps": 2,
                "learning_rate": 1e-2, "lr_scheduler_type": "cosine", "warmup_steps": 0.2, "weight_decay": 0.01,
                "dataloader_num_workers": 0, "logging_steps": 1}


def _spec(tmp: Path, name: str, entries, config: dict, **extra) -> Path:
    out = tmp / name
    spec = {"entries": entries, "config": config, "out": str(out), "log": str(tmp / f"{name}.log"), **extra}
    path = tmp / f"{name}-{len(list(tmp.glob(f'{name}-*.json')))}.json"
    path.write_text(json.dumps(spec))
    return path


def _start(spec: Path) -> subprocess.Popen:
    # CPU only, one thread: bit-exact comparisons between processes
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.Popen([sys.executable, str(HELPER), str(spec)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _lines(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []


def _finish(process: subprocess.Popen) -> None:
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-3000:]


def _kill_when_hanging(process: subprocess.Popen, log: Path) -> dict:
    """Wait for the child to report that it hangs where asked, then SIGKILL it."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        hanging = [line for line in _lines(log) if "hanging" in line]
        if hanging:
            process.send_signal(signal.SIGKILL)
            process.communicate(timeout=60)
            assert process.returncode == -signal.SIGKILL
            return hanging[0]
        if process.poll() is not None:
            pytest.fail(f"the child ended before hanging: {process.communicate()[0][-3000:]}")
        time.sleep(0.1)
    process.kill()
    pytest.fail("the child never reached the point where it should hang")


def _steps(lines: list[dict]) -> dict[int, list[str]]:
    return {line["step"]: line["ids"] for line in lines if "ids" in line}


@pytest.fixture(scope="module")
def crash(tmp_path_factory):
    """Reference run, run (a) killed inside step 5 (checkpoint-4 complete), run (b) killed while
    saving checkpoint-4 (checkpoint-2 complete); the kills run beside the reference, one thread each."""
    tmp = tmp_path_factory.mktemp("crash")
    entries = write_records(tmp / "data", n_images=3, n_text=3)
    reference = _start(_spec(tmp, "reference", entries, CRASH_CONFIG))
    in_step = _start(_spec(tmp, "in_step", entries, CRASH_CONFIG, hang_in_step=5))
    hung_step = _kill_when_hanging(in_step, tmp / "in_step.log")
    in_save = _start(_spec(tmp, "in_save", entries, CRASH_CONFIG, hang_in_save=4))
    hung_save = _kill_when_hanging(in_save, tmp / "in_save.log")
    _finish(reference)
    return {"tmp": tmp, "entries": entries, "hung": {"in_step": hung_step, "in_save": hung_save}}


def _resume(crash, name: str) -> None:
    _finish(_start(_spec(crash["tmp"], name, crash["entries"], CRASH_CONFIG, resume=True)))


def _assert_same_as_reference(crash, name: str, resumed_from: int) -> None:
    tmp = crash["tmp"]
    reference = load_file(tmp / "reference" / "final.safetensors")
    resumed = load_file(tmp / name / "final.safetensors")
    assert reference.keys() == resumed.keys()
    different = [k for k in reference if not torch.equal(reference[k], resumed[k])]
    assert not different, f"{len(different)} tensors differ from the uninterrupted run, e.g. {different[:3]}"

    lines = _lines(tmp / f"{name}.log")  # the killed process's lines, then the resumed one's
    hung = [i for i, line in enumerate(lines) if "hanging" in line]
    assert len(hung) == 1 and "done" in lines[-1]
    killed, after = lines[:hung[0]], lines[hung[0] + 1:]
    first_resumed = min(line["step"] for line in after if "ids" in line)
    assert first_resumed == resumed_from + 1
    consumed = {step: ids for step, ids in _steps(killed).items() if step <= resumed_from} | _steps(after)
    expected = _steps(_lines(tmp / "reference.log"))
    assert consumed == expected  # same batches, same order
    for epoch in range(EPOCHS):
        ids = [i for step in range(epoch * STEPS_PER_EPOCH + 1, (epoch + 1) * STEPS_PER_EPOCH + 1)
               for i in consumed[step]]
        assert sorted(ids) == sorted(record["id"] for record, _ in crash["entries"]), f"epoch {epoch}"


def test_reference_run_sees_every_sample_once_per_epoch(crash):
    steps = _steps(_lines(crash["tmp"] / "reference.log"))
    assert sorted(steps) == list(range(1, STEPS_PER_EPOCH * EPOCHS + 1))
    ids = sorted(record["id"] for record, _ in crash["entries"])
    first = [i for s in (1, 2, 3) for i in steps[s]]
    second = [i for s in (4, 5, 6) for i in steps[s]]
    assert sorted(first) == sorted(second) == ids
    assert first != second  # each epoch has its own order


def test_killed_inside_a_step_resumes_to_the_same_weights(crash):
    out = crash["tmp"] / "in_step"
    assert crash["hung"]["in_step"]["step"] == 5
    assert (out / "checkpoint-4" / COMPLETE_MARKER).is_file()
    assert last_complete_checkpoint(out) == out / "checkpoint-4"
    _resume(crash, "in_step")
    _assert_same_as_reference(crash, "in_step", resumed_from=4)


def test_killed_while_saving_resumes_from_the_previous_checkpoint(crash):
    out = crash["tmp"] / "in_save"
    half = out / "checkpoint-4"
    assert crash["hung"]["in_save"]["folder"] == str(half)
    assert (half / "model.safetensors").is_file() and not (half / COMPLETE_MARKER).exists()
    assert (out / "checkpoint-2" / COMPLETE_MARKER).is_file()
    assert last_complete_checkpoint(out) == out / "checkpoint-2"
    assert not half.exists() and (out / ".incomplete-checkpoint-4").is_dir()  # set aside, never resumed from
    _resume(crash, "in_save")
    _assert_same_as_reference(crash, "in_save", resumed_from=2)
    assert (out / "checkpoint-6" / COMPLETE_MARKER).is_file()


class Interrupt(Exception):
    pass


class InterruptAt(TrainerCallback):
    """Stop the run (in process) as optimizer step `step` begins."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            raise Interrupt


def test_lora_resume_restores_adapters_projector_and_dropout_rng(tmp_path):
    """LoRA checkpoints are adapter files (peft's loader, not the full-model one), the projector is a
    modules_to_save copy, and lora_dropout draws random numbers: all must come back on resume."""
    entries = write_records(tmp_path / "data")
    config = {**CRASH_CONFIG, "mode": "lora", "lora_r": 4, "lora_dropout": 0.2, "save_steps": 3}
    reference = training.train(load("tiny", seed=0), entries, fast_config(**config), tmp_path / "reference",
                               progress=False)
    out = tmp_path / "interrupted"
    with pytest.raises(Interrupt):  # 2 steps per epoch: checkpoint-3 sits inside the second epoch
        training.train(load("tiny", seed=0), entries, fast_config(**config), out, callbacks=[InterruptAt(4)],
                       progress=False)
    assert last_complete_checkpoint(out) == out / "checkpoint-3"
    assert (out / "checkpoint-3" / "adapter_model.safetensors").is_file()
    resumed = training.train(load("tiny", seed=0), entries, fast_config(**config), out, resume=True, progress=False)
    assert resumed.steps == reference.steps == 4
    expected, got = snapshot(reference.model), snapshot(resumed.model)
    assert expected.keys() == got.keys() and any(".modules_to_save." in k for k in got)
    assert not changed(expected, got)


def test_last_complete_checkpoint_orders_by_step_and_skips_unmarked(tmp_path):
    for name, marked in (("checkpoint-2", True), ("checkpoint-9", True), ("checkpoint-10", False),
                         ("checkpoint-x", True), ("checkpoint-11.tmp", True)):
        (tmp_path / name).mkdir()
        if marked:
            (tmp_path / name / COMPLETE_MARKER).write_text("{}")
    (tmp_path / "checkpoint-12").write_text("a file, not a checkpoint")
    assert last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-9"
    assert (tmp_path / ".incomplete-checkpoint-10").is_dir()
    assert last_complete_checkpoint(tmp_path / "missing") is None


# ----------------------------------------------------------------------------------------------
# divergence guard (in process)
# ----------------------------------------------------------------------------------------------
class StepSnapshots(TrainerCallback):
    def __init__(self) -> None:
        self.weights: dict[int, dict[str, torch.Tensor]] = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.weights[state.global_step] = snapshot(model)


@pytest.fixture
def nan_from_step(monkeypatch):
    """Make the loss NaN from optimizer step `k` on (one micro-batch per step), keeping its graph."""
    real = training.supervised_loss
    calls = {"n": 0, "from": None}

    def loss(*args, **kwargs):
        calls["n"] += 1
        value = real(*args, **kwargs)
        return value * float("nan") if calls["n"] >= calls["from"] else value

    monkeypatch.setattr(training, "supervised_loss", loss)
    return lambda k: calls.update({"from": k})


@pytest.fixture(scope="module")
def entries(tmp_path_factory):
    return write_records(tmp_path_factory.mktemp("records"))


def test_nan_stops_with_the_step_and_a_loadable_checkpoint_then_resumes(entries, tmp_path, nan_from_step):
    nan_from_step(3)
    steps = StepSnapshots()
    out = tmp_path / "checkpoints"
    config = fast_config(max_steps=4, save_steps=1, on_nan="stop")
    with pytest.raises(DivergenceError) as caught:
        training.train(load("tiny", seed=0), entries, config, out, callbacks=[steps], progress=False)
    assert isinstance(caught.value, AdaptError)
    message = str(caught.value)
    assert "at step 3" in message and str(out / "checkpoint-2") in message
    assert sorted(steps.weights) == [1, 2]

    assert last_complete_checkpoint(out) == out / "checkpoint-2"
    saved = snapshot(InternVLForConditionalGeneration.from_pretrained(out / "checkpoint-2"))
    assert saved.keys() == steps.weights[2].keys() and not changed(steps.weights[2], saved)
    assert all(torch.isfinite(v).all() for v in saved.values())

    nan_from_step(10**9)  # the data problem is fixed: the run goes on from checkpoint-2
    resumed = StepSnapshots()
    result = training.train(load("tiny", seed=0), entries, config, out, resume=True, callbacks=[resumed],
                            progress=False)
    assert result.steps == 4 and sorted(resumed.weights) == [3, 4]
    assert all(math.isfinite(row["loss"]) for row in result.log_history if "loss" in row)


def test_nan_skip_leaves_the_weights_of_skipped_steps_untouched(entries, tmp_path, nan_from_step):
    nan_from_step(2)
    steps = StepSnapshots()
    config = fast_config(max_steps=4, on_nan="skip", weight_decay=0.1)  # decay would move weights too
    result = training.train(load("tiny", seed=0), entries, config, tmp_path / "out", callbacks=[steps],
                            progress=False)
    assert result.steps == 4 and result.skipped_steps == 3
    final = snapshot(result.model)
    assert all(torch.isfinite(v).all() for v in final.values())
    assert changed(steps.weights[1], final) == set()  # steps 2-4 were all skipped
    first = load("tiny", seed=0).model
    assert changed(snapshot(first), steps.weights[1])  # step 1 did train


def test_a_fresh_run_refuses_a_folder_with_checkpoints(entries, tmp_path):
    """Otherwise a later resume would take the newest checkpoint there, whichever run wrote it."""
    out = tmp_path / "out"
    training.train(load("tiny", seed=0), entries, fast_config(max_steps=1), out, progress=False)
    assert last_complete_checkpoint(out) == out / "checkpoint-1"
    with pytest.raises(AdaptError, match="already holds checkpoints of an earlier run"):
        training.train(load("tiny", seed=0), entries, fast_config(max_steps=1), out, progress=False)


def test_resuming_a_finished_run_loads_it_without_another_step(entries, tmp_path):
    """The Trainer's own resume skips to the saved step and then trains one more before it checks
    max_steps (a sweep resumed after its evaluation was killed trained 3 steps of 2): a finished
    run is loaded as it ended."""
    config = fast_config(max_steps=2, save_steps=2)
    first = training.train(load("tiny", seed=0), entries, config, tmp_path / "out", progress=False)
    again = training.train(load("tiny", seed=0), entries, config, tmp_path / "out", resume=True, progress=False)
    assert (first.steps, again.steps) == (2, 2)
    assert not changed(snapshot(first.model), snapshot(again.model))
    assert changed(snapshot(load("tiny", seed=0).model), snapshot(again.model))  # the trained weights, not the base
