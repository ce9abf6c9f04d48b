"""Medical imaging: radiology / pathology VQA and labelled DICOM studies, as Mini-InternVL-DA-Medical.

Real data (any subset): `--data vqa-rad=/data/vqa_rad/VQA_RAD_public.json`, `--data slake=/data/slake`,
`--data pmc-vqa=/data/pmc_vqa?split=train`, `--data pathvqa=/data/pathvqa?split=train`,
`--data 'dicom=/data/studies?labels=labels.csv&window=lung'`.
Metrics: VQA exact match split closed / open (+ open recall), classification accuracy.
"""

from __future__ import annotations

from pathlib import Path

from domains.recipe import DataSource, Domain


def demo(folder: Path, seed: int) -> tuple[list[DataSource], list[DataSource]]:
    from formatters.synthetic.general import write_general_demo
    from formatters.synthetic.medical import write_dicom_folder, write_slake, write_vqa_rad

    return ([DataSource("vqa-rad", str(write_vqa_rad(folder / "vqa_rad")), name="vqa_rad"),
             DataSource("slake", str(write_slake(folder / "slake")), name="slake"),
             DataSource("dicom", str(write_dicom_folder(folder / "dicom")), name="dicom")],
            [DataSource("general", str(write_general_demo(folder / "general", n=32, seed=seed)), name="demo_general")])


MEDICAL = Domain(
    name="medical",
    summary="Medical imaging: VQA-RAD, SLAKE, PMC-VQA, PathVQA, DICOM studies",
    sources=[DataSource("vqa-rad", "/data/vqa_rad/VQA_RAD_public.json", name="vqa_rad"),
             DataSource("slake", "/data/slake", {"split": "train"}, name="slake")],
    train={"num_train_epochs": 1},
    eval={"max_new_tokens": 32},
    demo=demo,
    demo_train={"learning_rate": 1e-3, "num_train_epochs": 3, "pack_tokens": 8192, "pack_tiles": 28, "dataloader_num_workers": 1},
    demo_eval={"holdout": 0.25, "general_holdout": 16, "max_new_tokens": 16, "batch_size": 8},
    examples=["adapt run --domain medical --general-ratio 0.25 --model /models/InternVL2-2B-hf "
              "--data vqa-rad=/data/vqa_rad/VQA_RAD_public.json --data slake=/data/slake "
              "--general /data/internvl_sft/meta.json"],
)
