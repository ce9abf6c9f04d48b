"""Remote sensing: scene classification, referring-expression grounding and VQA on aerial images,
as Mini-InternVL-DA-RS.

Real data: `--data classification=/data/AID` (one folder per class), `--data grounding=/data/DIOR-RSVG?split=train`
(VOC xml + split files), `--data rsvqa=/data/RSVQA_LR?split=train`.
Metrics: classification accuracy, grounding Acc@IoU>=0.5, VQA exact match closed / open.
"""

from __future__ import annotations

from pathlib import Path

from domains.recipe import DataSource, Domain


def demo(folder: Path, seed: int) -> tuple[list[DataSource], list[DataSource]]:
    from formatters.synthetic.general import write_general_demo
    from formatters.synthetic.sources import write_class_folders, write_dior_rsvg, write_rsvqa

    write_class_folders(folder / "aid", per_class=8)
    return ([DataSource("classification", str(folder / "aid"), name="aid"),
             DataSource("grounding", str(write_dior_rsvg(folder / "dior_rsvg", n_images=12)), name="dior_rsvg"),
             DataSource("rsvqa", str(write_rsvqa(folder / "rsvqa")), {"split": "train"}, name="rsvqa")],
            [DataSource("general", str(write_general_demo(folder / "general", n=32, seed=seed)), name="demo_general")])


REMOTE_SENSING = Domain(
    name="remote_sensing",
    summary="Remote sensing: AID / UC Merced classification, DIOR-RSVG grounding, RSVQA",
    sources=[DataSource("classification", "/data/AID", name="aid"),
             DataSource("grounding", "/data/DIOR-RSVG", {"split": "train"}, name="dior_rsvg"),
             DataSource("rsvqa", "/data/RSVQA_LR", {"split": "train"}, name="rsvqa")],
    train={"num_train_epochs": 1},
    eval={"max_new_tokens": 48},
    demo=demo,
    demo_train={"learning_rate": 1e-3, "num_train_epochs": 3, "pack_tokens": 8192, "pack_tiles": 28, "dataloader_num_workers": 1},
    demo_eval={"holdout": 0.25, "general_holdout": 16, "max_new_tokens": 16, "batch_size": 8},
    examples=["adapt run --domain remote_sensing --general-ratio 0.25 --model /models/InternVL2-4B-hf "
              "--data classification=/data/AID --data 'grounding=/data/DIOR-RSVG?split=train' "
              "--data 'rsvqa=/data/RSVQA_LR?split=train' --general /data/internvl_sft/meta.json"],
)
