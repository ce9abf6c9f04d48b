"""Remote sensing: scene classification, referring-expression grounding and VQA on aerial images,
as Mini-InternVL-DA-RS.

Real data: `--data classification=/data/AID` (one folder per class), `--data grounding=/data/DIOR-RSVG?split=train`
(VOC xml + split files), `--data rsvqa=/data/RSVQA_LR?split=train`.
Metrics: classification accuracy, grounding Acc@IoU>=0.5, VQA exact match closed / open.

The demo writes AID class folders (class = patch colour), DIOR-RSVG objects on a coarse 2x2 grid of
positions (the expression names colour and category, not the place; the tiles carry a fixed
illumination gradient so the random-init model can tell where a patch is) and RSVQA tiles asking
water presence (yes/no) and building count (0..3), every tile a different file (see
formatters/synthetic/pixel_tasks.py).
"""

from __future__ import annotations

from pathlib import Path

from domains.recipe import DEMO_TRAIN, DataSource, Domain

# Grounding is the slowest task kind to learn (its box is one of four cells), so it has the most
# images (96); AID learns its colours within a few hundred steps (32 images); RSVQA's two question
# types need 56 tiles (112 questions: with 40, water presence was not learned at seed 1). 13 epochs
# of packs of 4 tiles with the cosine schedule, about 5 CPU minutes: measured, every task kind clears
# chance (README, "Reading the report").
REMOTE_SENSING_DEMO_TRAIN = {**DEMO_TRAIN, "num_train_epochs": 13, "system": "none", "pack_tiles": 4}


def demo(folder: Path, seed: int) -> tuple[list[DataSource], list[DataSource]]:
    from formatters.synthetic.general import write_general_demo
    from formatters.synthetic.pixel_tasks import write_aid_demo, write_dior_rsvg_grid, write_rsvqa_demo

    return ([DataSource("classification", str(write_aid_demo(folder / "aid", 8)), name="aid"),
             DataSource("grounding", str(write_dior_rsvg_grid(folder / "dior_rsvg", 24)), {"split": "train"},
                        name="dior_rsvg"),
             DataSource("rsvqa", str(write_rsvqa_demo(folder / "rsvqa", 56)), {"split": "train"}, name="rsvqa")],
            [DataSource("general", str(write_general_demo(folder / "general", n=48, seed=seed)),
                        name="demo_general")])


REMOTE_SENSING = Domain(
    name="remote_sensing",
    summary="Remote sensing: AID / UC Merced classification, DIOR-RSVG grounding, RSVQA",
    sources=[DataSource("classification", "/data/AID", name="aid"),
             DataSource("grounding", "/data/DIOR-RSVG", {"split": "train"}, name="dior_rsvg"),
             DataSource("rsvqa", "/data/RSVQA_LR", {"split": "train"}, name="rsvqa")],
    train={"num_train_epochs": 1},
    eval={"max_new_tokens": 48},
    demo=demo,
    # As the driving demo: one 448 tile per image, a high learning rate, no system message (see
    # domains/medical.py); grounding answers need up to 30 tokens with the end token
    # (<ref>the white storagetank</ref><box>[[562, 562, 938, 938]]</box>).
    demo_train=REMOTE_SENSING_DEMO_TRAIN,
    demo_eval={"holdout": 0.25, "general_holdout": 16, "max_new_tokens": 32, "batch_size": 8, "blind": True},
    examples=["adapt run --domain remote_sensing --general-ratio 0.25 --model /models/InternVL2-4B-hf "
              "--data classification=/data/AID --data 'grounding=/data/DIOR-RSVG?split=train' "
              "--data 'rsvqa=/data/RSVQA_LR?split=train' --general /data/internvl_sft/meta.json"],
)
