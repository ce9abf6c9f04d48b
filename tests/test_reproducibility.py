"""Same config and seed, same run: the mixture, the held-out sets, the batches, the pixels (JPEG
augmentation included) and, on CPU, the weights after a few steps. A different seed changes them.
Across processes too (a resumed run or a dataloader worker is another process, with another
PYTHONHASHSEED), and every run records the package versions it ran with in config.yaml.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from adapt import api
from adapt.data import mixing
from adapt.errors import AdaptError
from adapt.training.trainer import MixtureDataset, RankBatchSampler, TrainConfig, make_builder, train

REPO = Path(__file__).resolve().parents[1]


def _conv(question: str, answer: str) -> list[dict[str, str]]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def write_entries(root: Path, n_images: int = 4, n_text: int = 2) -> list[tuple[dict, str]]:
    """Noise images of one tile (JPEG re-compression changes noise visibly) and short text rows."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    entries = []
    for i in range(n_images):
        Image.fromarray(rng.integers(0, 256, (448, 448, 3), dtype=np.uint8)).save(root / f"noise{i}.png")
        entries.append(
            (
                {
                    "id": f"img{i}",
                    "image": f"noise{i}.png",
                    "conversations": _conv("<image>\nWhich?", f"N{i}"),
                },
                str(root),
            )
        )
    for i in range(n_text):
        entries.append(
            (
                {"id": f"txt{i}", "conversations": _conv(f"Count to {i + 2}.", " ".join("123"[: i + 2]))},
                str(root),
            )
        )
    return entries


# ------------------------------------------------------------------------------------ the mixture


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> tuple[Path, Path]:
    from formatters.synthetic.general import write_general_demo
    from formatters.synthetic.sources import write_class_folders

    base = tmp_path_factory.mktemp("sources")
    return (
        write_class_folders(base / "aid", per_class=3, size=(64, 64)),
        write_general_demo(base / "general", n=8, seed=0, image_share=0.0),
    )


def _prepare(sources: tuple[Path, Path], folder: Path, seed: int, tiny) -> dict[str, bytes]:
    """`api.prepare_data` (format, hold out, mix, save) into `folder`; the files it wrote."""
    aid, general = sources
    config = api.RunConfig(
        domain="remote_sensing",
        seed=seed,
        general_ratio=0.25,
        data=[{"kind": "classification", "path": str(aid), "name": "aid"}],
        general=[{"kind": "general", "path": str(general), "name": "general"}],
        eval={"holdout": 2, "general_holdout": 2},
    )
    domain, train_config, eval_settings = api.resolve(config)
    api.prepare_data(config, domain, train_config, eval_settings, folder, tiny)
    return {
        name: (folder / name).read_bytes()
        for name in ("mixture/mixture.jsonl", "mixture/manifest.json", "heldout.json")
    }


def _ids(files: dict[str, bytes]) -> list[str]:
    return [json.loads(line)["id"] for line in files["mixture/mixture.jsonl"].decode().splitlines()]


def test_same_seed_same_mixture_and_holdout_other_seed_other_order(sources, tmp_path, tiny):
    first = _prepare(sources, tmp_path / "a", 0, tiny)
    second = _prepare(sources, tmp_path / "b", 0, tiny)
    assert first == second  # byte for byte: records, order, manifest (with sha256), held-out sets
    manifest = json.loads(first["mixture/manifest.json"])
    assert manifest["samples"] == {"domain": 10, "general": 3, "total": 13}  # 12 - 2 held out; round(10 / 3)
    other = _prepare(sources, tmp_path / "c", 1, tiny)
    assert _ids(other) != _ids(first)
    assert json.loads(other["heldout.json"]) != json.loads(first["heldout.json"])


# ------------------------------------------------------------------------------------ the batches


def _sampler(seed: int, *, pack: bool = True, world_size: int = 1, rank: int = 0) -> RankBatchSampler:
    rng = np.random.default_rng(7)
    lengths = rng.integers(50, 900, 40).tolist()
    tiles = rng.integers(0, 4, 40).tolist()
    return RankBatchSampler(
        lengths,
        tiles,
        pack=pack,
        batch_size=3,
        max_tokens=2000,
        max_tiles=8,
        seed=seed,
        world_size=world_size,
        rank=rank,
    )


def _epochs(sampler: RankBatchSampler, n: int = 3) -> list[list[list[tuple[int, int, bool]]]]:
    out = []
    for epoch in range(n):
        sampler.set_epoch(epoch)
        out.append(list(sampler))
    return out


@pytest.mark.parametrize("pack", [True, False])
def test_batch_sampler_same_seed_same_rows_and_order(pack):
    first, second = _sampler(0, pack=pack), _sampler(0, pack=pack)
    assert first.rows == second.rows
    epochs = _epochs(first)
    assert epochs == _epochs(second)
    assert epochs[0] != epochs[1]  # each epoch reshuffles the rows...
    for batches in epochs:  # ...and still shows every sample exactly once
        assert sorted(i for batch in batches for i, _, _ in batch) == list(range(40))
    other = _sampler(1, pack=pack)
    assert _epochs(other) != epochs


def test_batch_sampler_ranks_split_each_epoch_exactly():
    for epoch in range(2):
        seen = []
        for rank in range(3):
            sampler = _sampler(0, world_size=3, rank=rank)
            sampler.set_epoch(epoch)
            seen += [i for batch in sampler for i, _, padding in batch if not padding]
        assert sorted(seen) == list(range(40))


# ------------------------------------------------------------------------------------- the pixels


def _sample_digest(sample) -> str:
    digest = hashlib.sha256()
    for tensor in (sample.input_ids, sample.labels, sample.tiles):
        if tensor is not None:
            digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def test_samples_with_jpeg_augmentation_are_seeded(tmp_path, tiny):
    entries = write_entries(tmp_path / "data")
    config = TrainConfig(jpeg_augment=True, max_tiles=1, seed=0)

    def dataset(cfg: TrainConfig) -> MixtureDataset:
        return MixtureDataset(entries, make_builder(tiny, cfg))

    first, second = dataset(config), dataset(config)
    items = [(i, epoch, False) for epoch in (0, 1) for i in range(len(entries))]
    digests = [_sample_digest(first[item]) for item in items]
    assert digests == [_sample_digest(second[item]) for item in reversed(items)][::-1]  # any access order
    images = range(4)
    assert any(digests[i] != digests[len(entries) + i] for i in images)  # a new epoch, new JPEG qualities
    plain = dataset(TrainConfig(jpeg_augment=False, max_tiles=1, seed=0))
    assert all(
        not torch.equal(first[(i, 0, False)].tiles, plain[(i, 0, False)].tiles) for i in images
    )  # it is on
    reseeded = dataset(TrainConfig(jpeg_augment=True, max_tiles=1, seed=1))
    assert any(_sample_digest(reseeded[(i, 0, False)]) != digests[i] for i in images)


PROBE = """
import hashlib, json, sys
import numpy as np
from adapt.checkpoints.models import tiny_tokenizer
from adapt.data.samples import SampleBuilder
from adapt.data.templates import Encoder
from adapt.data.tiling import TilingPolicy
sys.path.insert(0, "tests")
from test_reproducibility import _epochs, _sample_digest, _sampler, mixture_ids
entries = json.loads(sys.argv[1])
builder = SampleBuilder(Encoder(tiny_tokenizer(), "internvl2_5"), TilingPolicy(1, 1, True, True), seed=3)
samples = [_sample_digest(builder.build(r, root, index=i, epoch=2)) for i, (r, root) in enumerate(entries)]
print(json.dumps({"mixture": mixture_ids(), "batches": _epochs(_sampler(5), 2), "samples": samples}))
"""


def mixture_ids() -> list[str]:
    """A seeded mix over in-memory sources (string seeds inside): the ids in order."""

    def source(name: str, kind: str, n: int, weight: float = 1.0) -> mixing.Source:
        return mixing.Source(
            name=name,
            root=".",
            kind=kind,
            weight=weight,
            records=[{"id": f"{name}{i}", "conversations": _conv(f"q{i}", "a")} for i in range(n)],
        )

    mixture = mixing.mix(
        [source("d1", "domain", 9), source("d2", "domain", 5)],
        [source("g1", "general", 6), source("g2", "general", 4, 3.0)],
        general_ratio=0.4,
        seed=11,
        upsample=True,
    )  # g2 repeats: each pass in its own seeded order
    return [record["id"] for record, _ in mixture.entries]


def test_same_order_and_pixels_in_another_process(tmp_path):
    """A resumed run or a dataloader worker is another process with its own string-hash seed."""
    from adapt.checkpoints.models import tiny_tokenizer
    from adapt.data.samples import SampleBuilder
    from adapt.data.templates import Encoder
    from adapt.data.tiling import TilingPolicy

    entries = write_entries(tmp_path / "data", n_images=2, n_text=1)
    builder = SampleBuilder(Encoder(tiny_tokenizer(), "internvl2_5"), TilingPolicy(1, 1, True, True), seed=3)
    here = {
        "mixture": mixture_ids(),
        "batches": json.loads(json.dumps(_epochs(_sampler(5), 2))),
        "samples": [
            _sample_digest(builder.build(r, root, index=i, epoch=2)) for i, (r, root) in enumerate(entries)
        ],
    }
    result = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(entries)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONHASHSEED": "12345", "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == here


# ------------------------------------------------------------------------------------ the weights


def _train(
    entries: list[tuple[dict, str]], folder: Path, seed: int
) -> tuple[dict[str, torch.Tensor], list[float]]:
    from adapt.checkpoints.models import load

    config = TrainConfig(
        max_steps=3,
        pack=False,
        per_device_train_batch_size=2,
        dataloader_num_workers=0,
        jpeg_augment=True,
        max_tiles=1,
        learning_rate=1e-3,
        warmup_steps=0.0,
        lr_scheduler_type="constant",
        save_steps=1000,
        logging_steps=1,
        seed=seed,
    )
    result = train(load("tiny", seed=0), entries, config, folder, progress=False)
    assert result.steps == 3
    weights = {name: p.detach().clone() for name, p in result.model.named_parameters()}
    return weights, [h["loss"] for h in result.log_history if "loss" in h]


def test_same_seed_same_weights_on_cpu(tmp_path, one_thread):
    from adapt.checkpoints.models import load

    entries = write_entries(tmp_path / "data")
    initial = {name: p.detach().clone() for name, p in load("tiny", seed=0).model.named_parameters()}
    first, losses = _train(entries, tmp_path / "a", seed=0)
    second, losses_again = _train(entries, tmp_path / "b", seed=0)
    assert losses == losses_again and len(losses) == 3
    assert first.keys() == second.keys() == initial.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert sum(not torch.equal(first[name], initial[name]) for name in first) > len(first) // 2  # it trained
    other, _ = _train(entries, tmp_path / "c", seed=1)  # another order and other JPEG qualities
    assert any(not torch.equal(first[name], other[name]) for name in first)


# ----------------------------------------------------------------------------------- the versions


def test_package_versions_are_recorded_in_the_run_config(tmp_path):
    import accelerate
    import peft
    import transformers

    versions = api.package_versions()
    assert versions["torch"] == torch.__version__ and versions["transformers"] == transformers.__version__
    assert versions["peft"] == peft.__version__ and versions["accelerate"] == accelerate.__version__
    assert {"python", "trl", "datasets", "numpy", "pillow", "adapt"} <= versions.keys()
    assert "not installed" not in versions.values()
    # config.yaml is written before any data step, so a run that stops once started records them (one
    # that cannot start, like a missing source, is refused before it has a run directory)
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"id": f"t{i}", "conversations": [
        {"from": "human", "value": f"Count to {i + 2}, please, slowly and carefully."},
        {"from": "gpt", "value": " ".join(str(k) for k in range(1, i + 3))}]}) + "\n" for i in range(8)))
    config = api.RunConfig(
        domain="remote_sensing",
        general_ratio=0.0,
        seed=4,
        runs_dir=str(tmp_path),
        name="run",
        data=[{"kind": "general", "path": str(rows), "name": "rows"}],
        train={"max_length": 8},  # every sample is dropped at planning: the run stops in training
    )
    with pytest.raises(AdaptError, match="no usable training sample"):
        api.run(config, export=False, progress=False)
    import yaml

    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["versions"] == versions
    assert saved["run"]["seed"] == 4 and saved["train"]["seed"] == 4
