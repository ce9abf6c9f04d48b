"""Medical imaging: radiology / pathology VQA and labelled DICOM studies, as Mini-InternVL-DA-Medical.

Real data (any subset): `--data vqa-rad=/data/vqa_rad/VQA_RAD_public.json`, `--data slake=/data/slake`,
`--data pmc-vqa=/data/pmc_vqa?split=train`, `--data pathvqa=/data/pathvqa?split=train`,
`--data 'dicom=/data/studies?labels=labels.csv&window=lung'`.
Metrics: VQA exact match split closed / open (+ open recall), classification accuracy.

The demo writes CT-like scans in the VQA-RAD, SLAKE and DICOM formats whose answers are read off the
pixels: is there a lesion (VQA-RAD, yes/no), is it on the left or the right (SLAKE) and normal /
nodule / effusion (DICOM classification), every question balanced over its answers and every scan a
different file (see formatters/synthetic/pixel_tasks.py).
"""

from __future__ import annotations

from pathlib import Path

from domains.recipe import DEMO_TRAIN, DataSource, Domain

MEDICAL_DEMO_TRAIN = {**DEMO_TRAIN, "num_train_epochs": 18, "system": "none", "pack_tiles": 4}


def demo(folder: Path, seed: int) -> tuple[list[DataSource], list[DataSource]]:
    from formatters.synthetic.general import write_general_demo
    from formatters.synthetic.pixel_tasks import write_dicom_demo, write_slake_demo, write_vqa_rad_demo

    return ([DataSource("vqa-rad", str(write_vqa_rad_demo(folder / "vqa_rad", 64)), name="vqa_rad"),
             DataSource("slake", str(write_slake_demo(folder / "slake", 64)), name="slake"),
             DataSource("dicom", str(write_dicom_demo(folder / "dicom", 12)), name="dicom")],
            [DataSource("general", str(write_general_demo(folder / "general", n=48, seed=seed)),
                        name="demo_general")])


MEDICAL = Domain(
    name="medical",
    summary="Medical imaging: VQA-RAD, SLAKE, PMC-VQA, PathVQA, DICOM studies",
    sources=[DataSource("vqa-rad", "/data/vqa_rad/VQA_RAD_public.json", name="vqa_rad"),
             DataSource("slake", "/data/slake", {"split": "train"}, name="slake")],
    train={"num_train_epochs": 1},
    eval={"max_new_tokens": 32},
    demo=demo,
    # As the driving demo: one 448 tile per image, a high learning rate and no system message, so the
    # random-init tiny model learns the three question types in ~4.6 CPU minutes (at 15 epochs it had
    # not yet: README); packs of 4 images give more optimizer steps for the same compute.
    demo_train=MEDICAL_DEMO_TRAIN,
    demo_eval={"holdout": 0.25, "general_holdout": 16, "max_new_tokens": 12, "batch_size": 8, "blind": True},
    examples=["adapt run --domain medical --general-ratio 0.25 --model /models/InternVL2-2B-hf "
              "--data vqa-rad=/data/vqa_rad/VQA_RAD_public.json --data slake=/data/slake "
              "--general /data/internvl_sft/meta.json"],
)
