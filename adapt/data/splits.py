"""Held-out splits that do not leak: whole groups go to held-out, and no image is on both sides.

Neighbouring nuScenes samples of one scene are near-duplicates, several questions share one image,
a patient's studies look alike, and a video's frames are one clip: a per-sample split puts their
twins in training and inflates held-out scores. So each record belongs to a group, by the first of

  scene (meta.scene_token: nuScenes, DriveLM) > patient (meta.patient_id) > study (meta.study_uid)
  > video (the record's video, or meta.clip for extracted frames) > image (its image paths) > sample,

whole groups are drawn until the requested number of held-out records is reached, and then every
training record whose image file has the same content (SHA-256) as a held-out image is dropped from
training and counted. `split_by_group` returns the account of this for the mixture manifest.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

from adapt.data.mixing import Source, content_key
from adapt.data.records import Record, images_of
from adapt.errors import AdaptError

GROUPINGS = ("scene", "patient", "study", "video", "image", "sample")


def holdout_group(record: Record, finer_than: frozenset[str] = frozenset()) -> tuple[str, str]:
    """(grouping, key) of a record: the coarsest unit its near-duplicates share, skipping the groupings
    in `finer_than` (used when a source is a single scene, patient, ...)."""
    meta = record.get("meta") or {}
    for grouping, field in (("scene", "scene_token"), ("patient", "patient_id"), ("study", "study_uid")):
        if meta.get(field) and grouping not in finer_than:
            return grouping, str(meta[field])
    if (record.get("video") or meta.get("clip")) and "video" not in finer_than:
        return "video", str(record.get("video") or meta["clip"])
    images = images_of(record)
    if images and "image" not in finer_than:
        return "image", "\n".join(sorted(images))
    return "sample", content_key(record)


def _groups(records: list[Record]) -> tuple[list[tuple[str, str]], list[str]]:
    """Each record's group, refined while the whole source is one group (one scene cannot be split
    into train and held-out); returns the keys and the groupings given up."""
    skipped: set[str] = set()
    while True:
        keys = [holdout_group(record, frozenset(skipped)) for record in records]
        distinct = set(keys)
        if len(distinct) > 1 or not records or keys[0][0] == "sample":
            return keys, sorted(skipped, key=GROUPINGS.index)
        skipped.add(keys[0][0])


def _target(n_or_fraction: int | float, distinct: int, name: str) -> int:
    if isinstance(n_or_fraction, bool) or not isinstance(n_or_fraction, (int, float)):
        raise AdaptError(f"held-out size {n_or_fraction!r} for {name!r} must be a count or a fraction in (0, 1)")
    if isinstance(n_or_fraction, float):
        if not 0 < n_or_fraction < 1:
            raise AdaptError(f"held-out fraction {n_or_fraction} for {name!r} must be in (0, 1)",
                             hint="pass an integer for a count of samples")
        return round(n_or_fraction * distinct)
    if not 0 <= n_or_fraction <= distinct:
        raise AdaptError(f"held-out size {n_or_fraction} for {name!r} must be between 0 and its {distinct} "
                         "distinct records")
    return n_or_fraction


def _file_hash(path: Path) -> str | None:
    try:
        with open(path, "rb") as handle:
            return hashlib.file_digest(handle, "sha256").hexdigest()
    except OSError:
        return None


def _image_files(record: Record, root: str) -> list[Path]:
    return [Path(root) / p for p in images_of(record)]


def split_by_group(source: Source, n_or_fraction: int | float, seed: int) -> tuple[Source, Source, dict[str, Any]]:
    """(train, heldout, account): about `n_or_fraction` distinct held-out records (a count, or a share
    of the distinct records), drawn as whole groups in a seeded order; at least one group stays in
    training. The account names the groupings used, the groups drawn and the training records
    dropped because their image content is also held out. An Arrow-backed source is split on its key
    columns (`arrow.split_rows`, the same split without reading its records)."""
    from adapt.data.arrow import Rows, split_rows

    if isinstance(source.records, Rows):
        return split_rows(source, n_or_fraction, seed)
    keys, given_up = _groups(source.records)
    members: dict[tuple[str, str], set[str]] = {}
    for record, key in zip(source.records, keys):
        members.setdefault(key, set()).add(content_key(record))
    groups = list(members)
    target = _target(n_or_fraction, len({c for m in members.values() for c in m}), source.name)
    order = random.Random(f"adapt.holdout:{seed}:{source.name}").sample(range(len(groups)), len(groups))
    chosen: set[tuple[str, str]] = set()
    held_count = 0
    for index in order[:-1]:  # the last group in the order always trains
        if held_count >= target:
            break
        chosen.add(groups[index])
        held_count += len(members[groups[index]])
    held, seen, train = [], set(), []
    for record, key in zip(source.records, keys):
        if key in chosen:
            identity = content_key(record)
            if identity not in seen:
                seen.add(identity)
                held.append(record)
        else:
            train.append(record)
    train, leaked = _drop_shared_images(train, held, source.root)
    common = {"name": source.name, "root": source.root, "kind": source.kind, "weight": source.weight,
              "max_tiles": source.max_tiles}
    account = {"grouping": dict(Counter(grouping for grouping, _ in members)),
               "heldout_groups": dict(Counter(grouping for grouping, _ in chosen)),
               "heldout_records": len(held), "train_records_dropped_same_image": leaked,
               "single_group_refined": given_up}
    return Source(records=train, **common), Source(records=held, **common), account


def _drop_shared_images(train: list[Record], held: list[Record], root: str) -> tuple[list[Record], int]:
    """Training records without any image whose bytes equal a held-out image's. Only files whose size
    matches a held-out file's are hashed, so a large training set costs a stat per image."""
    held_files = {path for record in held for path in _image_files(record, root)}
    sizes = {path.stat().st_size for path in held_files if path.is_file()}
    if not sizes:
        return train, 0
    held_hashes = {_file_hash(path) for path in held_files if path.is_file()} - {None}
    hashes: dict[Path, str | None] = {}

    def shares_image(record: Record) -> bool:
        for path in _image_files(record, root):
            if path.is_file() and path.stat().st_size in sizes:
                if path not in hashes:
                    hashes[path] = _file_hash(path)
                if hashes[path] in held_hashes:
                    return True
        return False

    kept = [record for record in train if not shares_image(record)]
    return kept, len(train) - len(kept)


def take_fraction(source: Source, fraction: float, seed: int) -> Source:
    """A seeded sample of round(fraction * n) of the source's records (at least one), in their order:
    the domain-data-amount ablation (RunConfig.domain_fraction). The first records of one seeded
    permutation, so a smaller share is a subset of a larger one. 1.0 returns the source unchanged."""
    if fraction >= 1 or not source.records:
        return source
    total = len(source.records)
    order = random.Random(f"adapt.fraction:{seed}:{source.name}").sample(range(total), total)
    keep = sorted(order[:max(1, round(fraction * total))])
    from adapt.data.arrow import Rows

    records = source.records
    kept = records.view(records.positions[keep]) if isinstance(records, Rows) else [records[i] for i in keep]
    return replace(source, records=kept)
