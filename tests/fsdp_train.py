"""FSDP on CPU ranks (gloo), launched by tests/test_distributed.py with the shipped
configs/accelerate/fsdp.yaml (not a test module itself):

    python -m accelerate.commands.launch --config_file configs/accelerate/fsdp.yaml --num_processes 2 \\
        tests/fsdp_train.py FIXTURE OUT

Three runs on the tiny model, each rank writing what it saw to OUT/rank<R>.json:

1. `adapt`'s trainer under the config as shipped: accelerate refuses before training (its error is
   recorded: `fsdp_cpu_ram_efficient_loading` turns on `sync_module_states`, which it does not
   support on CPU).
2. The same with those two settings off: it trains, but accelerate (1.16) enables FSDP only on
   accelerator devices, so the CPU ranks run as DDP (recorded: the distributed type, the FSDP units
   found, the parameter elements each rank holds).
3. torch's own FSDP2 (`fully_shard`) on the layer classes the config names, trained with adapt's
   sample builder and loss: the parameters are sharded over the ranks, and the gathered weights
   are saved as a whole HF model under OUT/fsdp2 by rank 0.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from adapt.checkpoints.models import load
from adapt.data.batching import Collator
from adapt.training.trainer import TrainConfig, make_builder, supervised_loss, train

STEPS = 2


class ShardProbe(TrainerCallback):
    """After every optimizer step: the parameter elements this rank holds (with FSDP's
    use_orig_params those outside its shard are empty views) and the FSDP units per layer class."""

    def __init__(self) -> None:
        self.held: list[int] = []
        self.wrapped: dict[str, int] = {}

    def on_step_end(self, args, state, control, model=None, **kwargs) -> None:
        from torch.distributed.fsdp import FullyShardedDataParallel

        self.held.append(sum(p.numel() for p in model.parameters()))
        self.wrapped = {}
        for unit in model.modules():
            if isinstance(unit, FullyShardedDataParallel):
                self.wrapped[type(unit.module).__name__] = self.wrapped.get(type(unit.module).__name__, 0) + 1


def config() -> TrainConfig:
    return TrainConfig(mode="full", learning_rate=1e-3, lr_scheduler_type="constant", warmup_steps=0.0,
                       weight_decay=0.0, max_steps=STEPS, pack=False, per_device_train_batch_size=1,
                       gradient_accumulation_steps=1, max_tiles=1, max_length=1024, logging_steps=1,
                       save_steps=STEPS, dataloader_num_workers=0, seed=0, precision="fp32",
                       dataloader_pin_memory=False)


def with_trainer(fixture: Path, records: list[dict], out: Path) -> dict[str, Any]:
    from accelerate.state import AcceleratorState

    probe = ShardProbe()
    result = train(load("tiny", seed=0), [(r, str(fixture)) for r in records], config(), out, progress=False,
                   callbacks=[probe])
    losses = [h["loss"] for h in result.log_history if "loss" in h and "train_runtime" not in h]
    return {"losses": losses, "held": probe.held, "wrapped": probe.wrapped,
            "distributed_type": AcceleratorState().distributed_type.name}


def with_fully_shard(fixture: Path, records: list[dict], out: Path, rank: int, world: int) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard

    loaded = load("tiny", seed=0)
    model = loaded.model
    layers = set(os.environ["FSDP_TRANSFORMER_CLS_TO_WRAP"].split(","))
    for module in list(model.modules()):
        if type(module).__name__ in layers:
            fully_shard(module)
    fully_shard(model)
    held = sum(p.to_local().numel() for p in model.parameters())
    builder, collator = make_builder(loaded, config()), Collator(loaded.tokenizer.pad_token_id, pack=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for step in range(STEPS + 2):
        index = (step * world + rank) % len(records)
        batch = collator([builder.build(records[index], str(fixture), index=index, epoch=0)])
        weight = batch["loss_weights"][:, 1:].sum()
        loss = supervised_loss(model, batch, weight)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    whole = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        saved = load("tiny", seed=0)
        saved.model.load_state_dict(whole)
        saved.model.save_pretrained(out)
        loaded.tokenizer.save_pretrained(out)
    return {"losses": losses, "held": held, "layers": sorted(layers)}


def main(fixture: str, out: str) -> None:
    from accelerate import PartialState

    state = PartialState(cpu=True)
    fixture_dir, out_dir = Path(fixture), Path(out)
    records = [json.loads(line) for line in (fixture_dir / "records.jsonl").read_text().splitlines()]
    report: dict[str, Any] = {"world_size": state.num_processes,
                              "total": sum(p.numel() for p in load("tiny", seed=0).model.parameters())}
    try:
        with_trainer(fixture_dir, records, out_dir / "shipped")
        report["shipped"] = "trained"
    except RuntimeError as err:
        report["shipped"] = str(err)
    os.environ["FSDP_SYNC_MODULE_STATES"] = os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "false"
    report["trainer"] = with_trainer(fixture_dir, records, out_dir / "trainer")
    state.wait_for_everyone()
    report["fully_shard"] = with_fully_shard(fixture_dir, records, out_dir / "fsdp2", state.process_index,
                                             state.num_processes)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"rank{state.process_index}.json").write_text(json.dumps(report))
    state.wait_for_everyone()
    state.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
