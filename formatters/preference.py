"""Preference records: {"id", "image" (optional), "prompt", "chosen", "rejected", "meta" (optional)}.

Two sources:
  * JSONL pairs someone already has (`read_pairs`): every row is checked, a bad one is a counted skip
    naming file and row;
  * a model's own answers to labelled domain records (`pairs_from_generations`): several sampled
    answers per prompt, each scored with adapt's task metric (adapt.evaluation.rewards); the best
    becomes `chosen` (the reference answer when no sample is fully right) and the worst `rejected`,
    so a user builds pairs from labelled data without annotating preferences.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from adapt.checkpoints.models import Loaded
from adapt.data.records import IMAGE_PLACEHOLDER, Record, images_of
from adapt.data.samples import SampleBuilder, SampleDropped
from adapt.data.tiling import normalize
from adapt.errors import AdaptError, Report
from adapt.evaluation.evaluator import reference_answer
from adapt.evaluation.rewards import task_reward
from adapt.fileio import atomic_write_text, resolve_inside


def pair_problems(row: Any, root: str | Path | None = None) -> list[str]:
    """Everything wrong with a preference row (empty: usable)."""
    if not isinstance(row, dict):
        return [f"a preference row is a JSON object, not {type(row).__name__}"]
    found = [f"'{key}' must be a non-empty string" for key in ("prompt", "chosen", "rejected")
             if not isinstance(row.get(key), str) or not row[key].strip()]
    if found:
        return found
    if row["chosen"].strip() == row["rejected"].strip():
        found.append("chosen and rejected are the same answer")
    image = row.get("image")
    if image is not None and not (isinstance(image, str) or (isinstance(image, list) and image
                                                             and all(isinstance(p, str) for p in image))):
        return found + ["'image' must be a path or a list of paths"]
    paths = images_of(row)
    placeholders = row["prompt"].count(IMAGE_PLACEHOLDER)
    if len(paths) > 1 and placeholders != len(paths):
        found.append(f"{len(paths)} images but {placeholders} {IMAGE_PLACEHOLDER} placeholders in the prompt")
    if root is not None:
        for rel in paths:
            try:
                if not resolve_inside(root, rel).is_file():
                    found.append(f"image not found: {rel}")
            except AdaptError as err:
                found.append(err.message)
    return found


def read_pairs(path: str | Path, report: Report | None = None, *, root: str | Path | None = None) -> list[tuple[Record, str]]:
    """(preference record, image root) from a JSONL file; images are relative to `root` (default:
    the file's folder). Bad rows are skipped and counted in `report`."""
    path = Path(path)
    report = report or Report(name=f"preference pairs {path.name}")
    root = Path(root) if root is not None else path.parent
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise AdaptError("preference file not found", path=path) from None
    except UnicodeDecodeError:
        raise AdaptError("preference file is not UTF-8 text", path=path) from None
    out = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        report.read += 1
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            report.skip(f"not JSON ({err.msg})", path=path, row=number)
            continue
        found = pair_problems(row, root)
        if found:
            report.skip("; ".join(found), path=path, row=number, id=row.get("id") if isinstance(row, dict) else None)
            continue
        if len(images_of(row)) == 1 and IMAGE_PLACEHOLDER not in row["prompt"]:
            row["prompt"] = f"{IMAGE_PLACEHOLDER}\n{row['prompt']}"  # InternVL's single-image convention
        row.setdefault("id", f"{path.stem}:{number}")
        out.append((row, str(root)))
        report.written += 1
    return out


def write_pairs(path: str | Path, pairs: Sequence[Record]) -> None:
    atomic_write_text(Path(path), "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))


@torch.no_grad()
def sample_answers(loaded: Loaded, builder: SampleBuilder, record: Record, root: str, *, n: int, temperature: float,
                   max_new_tokens: int, index: int = 0) -> list[str]:
    """`n` sampled answers to the record's question, prompted exactly as training and evaluation do."""
    model = loaded.model.eval()
    sample = builder.build(record, root, index=index, generation=True)
    device = next(model.parameters()).device
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    kwargs: dict[str, Any] = {"input_ids": sample.input_ids[None].to(device)}
    if sample.tiles is not None:
        kwargs["pixel_values"] = normalize(sample.tiles.to(device), dtype)
    generated = model.generate(**kwargs, do_sample=True, temperature=temperature, num_return_sequences=n,
                               max_new_tokens=max_new_tokens, eos_token_id=builder.encoder.stop_token_ids(),
                               pad_token_id=loaded.tokenizer.pad_token_id)
    return [loaded.tokenizer.decode(row[len(sample):], skip_special_tokens=True).strip() for row in generated]


def pairs_from_generations(loaded: Loaded, builder: SampleBuilder, entries: Sequence[tuple[Record, str]], *,
                           n: int = 4, temperature: float = 1.0, max_new_tokens: int = 64,
                           report: Report | None = None) -> list[tuple[Record, str]]:
    """Preference pairs from labelled (record, root) entries: the model's sampled answers, scored
    by the record's task metric. A record whose every answer scores as well as the reference
    gives no pair (nothing to prefer), and is counted."""
    report = report or Report(name="preference pairs from generations")
    out = []
    for index, (record, root) in enumerate(entries):
        report.read += 1
        human = next((t["value"] for t in record["conversations"] if t["from"] == "human"), None)
        try:
            answers = sample_answers(loaded, builder, record, root, n=n, temperature=temperature,
                                     max_new_tokens=max_new_tokens, index=index)
        except SampleDropped as err:
            report.skip(f"unusable record ({err})", id=record.get("id"))
            continue
        reference = reference_answer(record)
        scored = sorted(((task_reward(record, a), a) for a in answers), key=lambda pair: pair[0])
        (worst, rejected), (best, chosen) = scored[0], scored[-1]
        if best < task_reward(record, reference):
            best, chosen = task_reward(record, reference), reference
        if worst >= best or rejected.strip() == chosen.strip():
            report.skip("no answer worse than the best one", id=record.get("id"))
            continue
        pair = {k: v for k, v in record.items() if k not in ("conversations",)}
        pair.update({"id": f"{record.get('id', index)}:pref", "prompt": human, "chosen": chosen, "rejected": rejected,
                     "meta": {**record.get("meta", {}), "chosen_score": best, "rejected_score": worst}})
        out.append((pair, root))
        report.written += 1
    return out
