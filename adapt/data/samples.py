"""Record -> Sample: images to uint8 tiles, conversation to token ids and labels.

One function (`SampleBuilder.build`) serves training, evaluation and the inspect notebook, so what
the model is evaluated on is built exactly like what it was trained on.

`SampleBuilder.plan` measures a record's exact length from image headers alone (no decode), so
over-long samples are dropped and counted before training, and packing knows every length.
Truncation never cuts inside an image span: such a sample is dropped with its id in the report.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from adapt.data.images import decode_array, image_size
from adapt.data.records import Record, images_of
from adapt.data.templates import IGNORE_INDEX, Encoded, Encoder
from adapt.data.text import record_problems, tokenizer_special_tokens
from adapt.data.tiling import TilingPolicy, count_tiles, single_tile, tile_image
from adapt.errors import AdaptError, Report
from adapt.fileio import resolve_inside

DEFAULT_VIDEO_FRAMES = 8


@dataclass
class Sample:
    """What the collator consumes. `tiles` is uint8 (N, 3, 448, 448); `labels` aligned with ids."""

    id: str
    input_ids: torch.Tensor
    labels: torch.Tensor
    tiles: torch.Tensor | None
    tiles_per_image: list[int]
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def n_supervised(self) -> int:
        return int((self.labels[1:] != IGNORE_INDEX).sum())


def supervised_count(labels: list[int]) -> int:
    """Labels that train a prediction (the first position predicts nothing), counted in C (list.count):
    a sample with images has thousands of labels and planning counts them for every record."""
    rest = labels[1:]
    return len(rest) - rest.count(IGNORE_INDEX)


class SampleDropped(Exception):
    """A record that cannot become a training sample (too long, no supervised token, bad image)."""


@dataclass
class Planned:
    """A record's exact shape before any image is decoded."""

    length: int
    tiles: int
    supervised: int


class SampleBuilder:
    """Builds samples for one tokenizer/template/tiling policy."""

    def __init__(self, encoder: Encoder, policy: TilingPolicy | None = None, *, max_length: int = 8192,
                 video_frames: int = DEFAULT_VIDEO_FRAMES, train: bool = True, seed: int = 0,
                 resample: str = "torch") -> None:
        self.encoder, self.policy, self.max_length = encoder, policy or TilingPolicy(), max_length
        self.resample = resample
        self.video_frames, self.train, self.seed = video_frames, train, seed
        self.special_tokens = tokenizer_special_tokens(encoder.tokenizer)  # text must never become these ids
        # (root, path) -> (width, height): pools reuse a few images across many records, so each file's
        # header is read (and its path checked) once per builder, not once per record
        self._sizes: dict[tuple[str, str], tuple[int, int]] = {}

    # -- shapes --------------------------------------------------------------------------------
    def policy_for(self, record: Record) -> TilingPolicy:
        # a dataset's own limit (meta file max_dynamic_patch) can lower the run's, never raise it
        max_tiles = min(int(record.get("meta", {}).get("max_tiles") or self.policy.max_tiles), self.policy.max_tiles)
        base = TilingPolicy(min(self.policy.min_tiles, max_tiles), max_tiles, self.policy.thumbnail,
                            self.policy.jpeg_augment and self.train, self.policy.multi_image_max_tiles)
        return base.for_images(len(images_of(record)))

    def frames_of(self, record: Record) -> int:
        return int(record.get("meta", {}).get("num_frames") or self.video_frames)

    def tiles_from_headers(self, record: Record, root: str | Path) -> list[int]:
        if record.get("video"):
            return [1] * self.frames_of(record)
        policy = self.policy_for(record)
        out = []
        for rel in images_of(record):
            key = (str(root), rel)
            if key not in self._sizes:
                self._sizes[key] = image_size(resolve_inside(root, rel))
            out.append(count_tiles(*self._sizes[key], policy.min_tiles, policy.max_tiles, policy.thumbnail))
        return out

    def plan(self, record: Record, root: str | Path) -> Planned:
        """Exact length, tiles and supervised tokens; raises SampleDropped for unusable records."""
        marked = record_problems(record, self.special_tokens)
        if marked:
            raise SampleDropped("; ".join(marked))
        try:
            tiles = self.tiles_from_headers(record, root)
        except (OSError, SyntaxError, Image.DecompressionBombError) as err:
            raise SampleDropped(f"unreadable image ({err})") from None
        except AdaptError as err:
            raise SampleDropped(err.message) from None
        encoded = self._fit(self.encoder.encode(record, tiles), record)
        return Planned(len(encoded), sum(tiles), supervised_count(encoded.labels))

    def plan_many(self, records: list[Record], root: str | Path) -> list[Planned | SampleDropped]:
        """`plan` of several records (a dropped one as its SampleDropped), the text of all of them
        tokenized in one batched call (`Encoder.encode_many`): the same results as `plan` one by one."""
        out: list[Planned | SampleDropped | None] = [None] * len(records)
        todo: list[tuple[int, Record, list[int]]] = []
        for i, record in enumerate(records):
            marked = record_problems(record, self.special_tokens)
            if marked:
                out[i] = SampleDropped("; ".join(marked))
                continue
            try:
                todo.append((i, record, self.tiles_from_headers(record, root)))
            except (OSError, SyntaxError, Image.DecompressionBombError) as err:
                out[i] = SampleDropped(f"unreadable image ({err})")
            except AdaptError as err:
                out[i] = SampleDropped(err.message)
        encoded = self.encoder.encode_many([(record, tiles) for _, record, tiles in todo])
        for (i, record, tiles), one in zip(todo, encoded):
            try:
                fitted = self._fit(one, record)
                out[i] = Planned(len(fitted), sum(tiles), supervised_count(fitted.labels))
            except SampleDropped as err:
                out[i] = err
        return out  # type: ignore[return-value]

    def _fit(self, encoded: Encoded, record: Record) -> Encoded:
        """Truncate to max_length, unless that would cut an image span or leave nothing to learn."""
        limit = self.max_length
        if len(encoded) > limit:
            cut = [i for i, (start, end) in enumerate(encoded.image_spans) if end > limit]
            if cut:
                raise SampleDropped(f"{len(encoded)} tokens exceed max_length {limit} and the cut would fall inside "
                                    f"image {cut[0] + 1}'s tokens (raise --max-length or lower --max-tiles)")
            encoded = Encoded(encoded.input_ids[:limit], encoded.labels[:limit], encoded.image_spans)
        if self.train and not supervised_count(encoded.labels):
            raise SampleDropped("no supervised token left" + (" after truncation" if len(encoded) == limit else ""))
        return encoded

    # -- pixels --------------------------------------------------------------------------------
    def load_tiles(self, record: Record, root: str | Path, rng: random.Random) -> tuple[np.ndarray | None, list[int]]:
        if record.get("video"):
            from adapt.data.video import read_frames

            frames = read_frames(resolve_inside(root, record["video"]), self.frames_of(record),
                                 random_offset=self.train, seed=rng.randrange(2**31))
            return np.concatenate([single_tile(f, self.resample) for f in frames]), [1] * len(frames)
        paths = images_of(record)
        if not paths:
            return None, []
        policy = self.policy_for(record)
        arrays = [tile_image(decode_array(resolve_inside(root, rel)), policy, rng, self.resample) for rel in paths]
        return (arrays[0] if len(arrays) == 1 else np.concatenate(arrays)), [len(a) for a in arrays]

    def build(self, record: Record, root: str | Path, *, index: int = 0, epoch: int = 0,
              generation: bool = False) -> Sample:
        """The sample for `record` (images resolved inside `root`). Augmentation is seeded by
        (seed, epoch, index), so a resumed run sees the same pixels as an uninterrupted one."""
        rng = random.Random(hash((self.seed, epoch, index)) & 0xFFFFFFFF)
        try:
            tiles, tiles_per_image = self.load_tiles(record, root, rng)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            raise SampleDropped(f"unreadable image or video ({err})") from None
        except AdaptError as err:
            raise SampleDropped(err.message) from None
        marked = record_problems(record, self.special_tokens)
        if marked:
            raise SampleDropped("; ".join(marked))
        encoded = self.encoder.encode(record, tiles_per_image, generation=generation)
        if not generation:
            encoded = self._fit(encoded, record)
        return Sample(
            id=str(record.get("id", index)),
            input_ids=torch.tensor(encoded.input_ids, dtype=torch.long),
            labels=torch.tensor(encoded.labels, dtype=torch.long),
            tiles=torch.from_numpy(tiles) if tiles is not None else None,
            tiles_per_image=tiles_per_image,
            meta=record.get("meta", {}),
        )


def plan_all(builder: SampleBuilder, entries: Sequence[tuple[Record, str]], report: Report, *,
             progress: Any = None) -> list[Planned | None]:
    """Plan every (record, root); dropped ones become None and are counted in `report` with their id.
    `progress` (a tqdm, the planning phase's display) counts the entries planned."""
    out: list[Planned | None] = []
    for i, (record, root) in enumerate(entries):
        if progress is not None:
            progress.update()
        try:
            out.append(builder.plan(record, root))
        except SampleDropped as err:
            report.skip(f"dropped: {err}", path=record.get("meta", {}).get("source"), row=i, id=str(record.get("id")))
            out.append(None)
    return out
