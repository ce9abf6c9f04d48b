"""Autonomous driving: nuScenes six-camera scenes (+ DriveLM QA), as Mini-InternVL-DA-Drive.

Real data: `--data driving=/data/nuscenes?version=v1.0-trainval&drivelm=/data/drivelm/v1_1_train_nus.json`.
Without DriveLM the questions are generated from the nuScenes annotations (grounding, region,
which-camera perception). Metrics: DriveLM accuracy, language (BLEU/ROUGE-L/CIDEr) and match scores,
grounding Acc@0.5, region accuracy.

The demo writes a synthetic nuScenes v1.0-mini (loaded by the real devkit) whose objects are painted
into the cameras that see them, and asks "Which camera sees the car?" with answers balanced over
the six cameras: a model that ignores the pixels scores 1/6.
"""

from __future__ import annotations

from pathlib import Path

from domains.recipe import DEMO_TRAIN, DataSource, Domain


def demo(folder: Path, seed: int) -> tuple[list[DataSource], list[DataSource]]:
    from formatters.synthetic.general import write_general_demo
    from formatters.synthetic.nuscenes import write_nuscenes

    # 24 short scenes: held-out questions come from whole scenes the model never saw (adapt.data.splits),
    # so the demo has to learn the cameras from the pixels, not recognise a scene
    nuscenes = write_nuscenes(folder / "nuscenes", n_scenes=24, samples_per_scene=8, seed=seed, distractors=False)
    general = write_general_demo(folder / "general", n=96, seed=seed)
    return ([DataSource("driving", str(nuscenes), {"questions": "perception", "seed": seed}, name="nuscenes")],
            [DataSource("general", str(general), name="demo_general")])


DRIVING = Domain(
    name="driving",
    summary="Autonomous driving: nuScenes 6-camera scenes stitched 2x3, DriveLM QA",
    sources=[DataSource("driving", "/data/nuscenes", {"version": "v1.0-trainval",
                                                      "drivelm": "/data/drivelm/v1_1_train_nus.json"},
                        name="nuscenes")],
    train={"num_train_epochs": 1},
    eval={"max_new_tokens": 96},
    demo=demo,
    # The CPU demo keeps the real pipeline (nuScenes -> stitched 2688x896 -> records -> mixture ->
    # packed training) but gives each image one 448 tile (the whole stitched view), so the random-init
    # tiny model learns the camera question in a few minutes on two cores; real runs use 12 tiles.
    # 192 samples x 10 epochs; no system message: the official one is 155 tokens of the tiny tokenizer, a
    # third of each demo sequence on CPU, and means nothing to a random-init model (real runs keep it)
    demo_train={**DEMO_TRAIN, "num_train_epochs": 10, "system": "none"},
    demo_eval={"holdout": 0.25, "general_holdout": 24, "max_new_tokens": 12, "batch_size": 8, "blind": True},
    examples=["adapt run --domain driving --general-ratio 0.25 --model /models/InternVL2-1B-hf "
              "--data 'driving=/data/nuscenes?version=v1.0-trainval&drivelm=/data/drivelm/v1_1_train_nus.json' "
              "--general /data/internvl_sft/meta.json"],
)
