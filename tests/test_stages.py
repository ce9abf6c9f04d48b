"""Staged runs train exactly each stage's declared parameters, in order, and a run interrupted
inside a stage resumes to the same weights as an uninterrupted one.

The tiny random-init model, one image row and two text rows, lr 1e-2, no warmup or decay (a weight
changes exactly when a gradient reaches it)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import FAST, changed, snapshot, write_records
from transformers import TrainerCallback

from adapt.checkpoints.models import load
from adapt.errors import AdaptError
from adapt.training.stages import STAGE_MARKER, parse_stages, stage_config, train_stages
from adapt.training.trainer import TrainConfig, last_complete_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

PROJECTOR = "model.multi_modal_projector."
LLM_LAYER_1 = "model.language_model.layers.1."
# stage 1: projector only (the InternVL 2.5 warm-up); stage 2: one LLM layer and the projector by pattern
STAGES = [
    {"name": "projector", "mode": "partial", "partial": "mlp", "max_steps": 2, "learning_rate": 2e-2},
    {"name": "llm", "mode": "partial", "trainable": [r"model\.language_model\.layers\.1\..*",
                                                   r"model\.multi_modal_projector\..*"],
     "max_steps": 3, "save_steps": 1, "lr_scheduler_type": "cosine"},
]
BASE = TrainConfig(**FAST)  # one packed row per step: every step sees the image (the projector gets a gradient)


class StageSnapshots(TrainerCallback):
    """Weights as each stage's optimizer first sees them, by stage folder."""

    def __init__(self) -> None:
        self.start: dict[str, dict[str, torch.Tensor]] = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.start[Path(args.output_dir).parent.name] = snapshot(model)


class InterruptInStage(TrainerCallback):
    """Stop the run as optimizer step `step` of the stage in `folder` begins (a kill, in process)."""

    def __init__(self, folder: str, step: int) -> None:
        self.folder, self.step = folder, step

    def on_step_begin(self, args, state, control, **kwargs):
        if Path(args.output_dir).parent.name == self.folder and state.global_step + 1 == self.step:
            raise KeyboardInterrupt


@pytest.fixture(scope="module")
def entries(tmp_path_factory):
    return write_records(tmp_path_factory.mktemp("records"), n_images=1, n_text=2)


def _run(entries, run_dir, *, resume=False, callbacks=()):
    loaded = load("tiny", seed=0)
    after: dict[str, dict[str, torch.Tensor]] = {}
    result = train_stages(loaded, parse_stages(STAGES), lambda stage: entries, BASE, run_dir, resume=resume,
                          after_stage=lambda stage, trained: after.update({stage.name: snapshot(trained.model)}),
                          callbacks=callbacks, progress=False)
    return result, after


@pytest.fixture(scope="module")
def reference(entries, tmp_path_factory):
    """The uninterrupted run, with one thread like the tests' runs (bit-exact comparison)."""
    run_dir = tmp_path_factory.mktemp("reference")
    starts = StageSnapshots()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result, after = _run(entries, run_dir, callbacks=[starts])
    finally:
        torch.set_num_threads(threads)
    return run_dir, result, after, starts.start


def test_each_stage_trains_exactly_its_declared_parameters(reference):
    run_dir, result, after, start = reference
    assert result.steps == {"projector": 2, "llm": 3}
    first = changed(start["1-projector"], after["projector"])
    assert first and first == {n for n in start["1-projector"] if n.startswith(PROJECTOR)}
    second = changed(start["2-llm"], after["llm"])
    assert second == {n for n in start["2-llm"] if n.startswith((PROJECTOR, LLM_LAYER_1))}
    assert not changed(after["projector"], start["2-llm"])  # stage 2 starts from stage 1's weights
    assert all((run_dir / "stages" / f / STAGE_MARKER).is_file() for f in ("1-projector", "2-llm"))


def test_interrupted_inside_a_stage_resumes_to_identical_weights(entries, reference, tmp_path):
    _, expected, _, _ = reference
    run_dir = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        _run(entries, run_dir, callbacks=[InterruptInStage("2-llm", 3)])
    assert (run_dir / "stages" / "1-projector" / STAGE_MARKER).is_file()
    assert not (run_dir / "stages" / "2-llm" / STAGE_MARKER).exists()
    assert last_complete_checkpoint(run_dir / "stages" / "2-llm" / "checkpoints").name == "checkpoint-2"
    resumed, after = _run(entries, run_dir, resume=True)
    assert list(resumed.results) == ["llm"] and resumed.results["llm"].steps == 3  # stage 1 not trained again
    reference_weights, resumed_weights = snapshot(expected.model), snapshot(resumed.model)
    assert reference_weights.keys() == resumed_weights.keys()
    assert not changed(reference_weights, resumed_weights)


def test_a_lora_stage_is_merged_before_the_next_stage(entries, tmp_path):
    stages = parse_stages([{"name": "adapters", "mode": "lora", "lora_r": 4, "max_steps": 1},
                           {"name": "projector", "mode": "partial", "partial": "mlp", "max_steps": 1}])
    loaded = load("tiny", seed=0)
    names = set(snapshot(loaded.model))
    result = train_stages(loaded, stages, lambda stage: entries, BASE, tmp_path / "run", progress=False)
    assert set(snapshot(result.model)) == names  # plain parameter names again: no adapter left


@pytest.mark.parametrize("raw, message", [
    ([], "non-empty list"),
    ([{"mode": "full"}], "unique name"),
    ([{"name": "a", "mode": "full"}, {"name": "a", "mode": "full"}], "unique name"),
    ([{"name": "a", "learning_rate": 1e-4}], "does not say what it trains"),
])
def test_bad_stage_lists_are_refused(raw, message):
    with pytest.raises(AdaptError, match=message):
        parse_stages(raw)


def test_adapt_run_refuses_a_bad_stage_before_any_step(tmp_path):
    from adapt import api

    config = api.RunConfig(runs_dir=str(tmp_path), name="bad", stages=[{"name": "x", "mode": "partial", "partial": "vit"}])
    with pytest.raises(AdaptError, match="stage x: unknown partial preset"):
        api.run(config, progress=False)
    assert not (tmp_path / "bad").exists()


def test_stage_options_are_checked_and_do_not_inherit_the_tuning_mode():
    base = TrainConfig(mode="partial", partial="mlp", learning_rate=1e-5)
    (stage,) = parse_stages([{"name": "full", "mode": "full", "learning_rate": 4e-5}])
    config = stage_config(base, stage)
    assert (config.mode, config.partial, config.learning_rate) == ("full", None, 4e-5)
    (bad,) = parse_stages([{"name": "x", "mode": "partial", "partial": "vit"}])
    with pytest.raises(AdaptError, match="stage x: unknown partial preset"):
        stage_config(base, bad)


def test_shipped_internvl2_5_recipe_resolves_to_its_stages():
    from adapt import api

    path = Path(__file__).parent.parent / "configs" / "recipes" / "internvl2_5_stages.yaml"
    config = api.load_config_file(path)
    _, train_config, _ = api.resolve(config)
    stages = parse_stages(config.stages, path)
    configs = {stage.name: stage_config(train_config, stage) for stage in stages}
    assert list(configs) == ["projector", "full"]
    assert (configs["projector"].mode, configs["projector"].partial) == ("partial", "mlp")
    assert configs["projector"].learning_rate == pytest.approx(2e-4)
    assert configs["full"].mode == "full" and configs["full"].learning_rate == pytest.approx(4e-5)
    assert all(c.loss_reduction == "square" and c.pack_tiles == 48 for c in configs.values())


@pytest.mark.slow
def test_adapt_run_with_stages_evaluates_after_each_and_exports(tmp_path):
    """`adapt run` with a stages list: one run directory, one folder per stage, an evaluation after
    each stage, the export at the end; the CLI's --resume skips the finished stages."""
    from adapt import api
    from adapt.cli import main
    from formatters.synthetic.sources import write_class_folders

    aid = write_class_folders(tmp_path / "aid", per_class=2, size=(64, 64))
    config = api.RunConfig(
        domain="remote_sensing", general_ratio=0.0, runs_dir=str(tmp_path / "runs"), name="staged",
        data=[{"kind": "classification", "path": str(aid), "name": "aid"}],
        eval={"holdout": 2, "max_new_tokens": 4},
        train={"max_tiles": 1, "dataloader_num_workers": 0, "logging_steps": 1, "pack_tokens": 4096, "pack_tiles": 8},
        stages=[{"name": "projector", "mode": "partial", "partial": "mlp", "max_steps": 1, "learning_rate": 1e-3},
                {"name": "full", "mode": "full", "max_steps": 1, "learning_rate": 1e-4}])
    result = api.run(config, progress=False)
    run_dir = tmp_path / "runs" / "staged"
    assert result.steps == 2
    for name in ("1-projector", "2-full"):
        assert (run_dir / "stages" / name / STAGE_MARKER).is_file()
        assert (run_dir / "eval" / f"stage-{name}.json").is_file()
    assert (run_dir / "eval" / "after.json").is_file() and result.export_dir is not None
    assert not (run_dir / "checkpoints").exists()  # no single-stage training ran beside the stages
    assert main(["run", "--resume", str(run_dir), "--no-export", "--quiet"]) == 0
