"""Video frames for InternVL: segment sampling, decoding with PyAV, frame folders, the frame prompt.

InternVL feeds a clip as n frames of one tile each: split the clip into n equal segments and take
the middle frame of each (a random frame per segment when training with augmentation), then write
`Frame-1: <image>\\nFrame-2: <image>\\n...` where the `<video>` placeholder was.

Frame counts in container headers lie (`stream.frames` is 0 for Matroska/WebM and can disagree
with what decodes for MP4 edit lists), so the count used to place segments is always the number
of frames that actually decode: a cheap demux pass gives the first guess, the decode pass checks
it, and a mismatch re-selects on the true count. This module is called per sample at training
time, so it depends only on PyAV and Pillow (no torch import).
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import av
from PIL import Image

from adapt.data.images import decode_rgb
from adapt.data.records import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER
from adapt.errors import AdaptError

VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".gif")
FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
_DIGITS = re.compile(r"(\d+)")


class TooFewFrames(AdaptError):
    """A clip shorter than the frames asked for: callers skip it or fail, knowing both counts."""

    def __init__(self, available: int, requested: int, *, path: str | Path | None = None) -> None:
        self.available, self.requested = available, requested
        super().__init__(f"has {available} frame(s), fewer than the {requested} requested", path=path,
                         hint="ask for fewer frames (num_frames), drop the clip, or pass allow_fewer=True")


def segment_frame_indices(n_total: int, n_frames: int, *, random_offset: bool = False,
                          rng: random.Random | None = None) -> list[int]:
    """Frame indices of n equal segments of an n_total-frame clip: each segment's middle frame, or a
    uniformly random frame inside each segment when `random_offset` (training augmentation).

    Segment k is [k*n_total//n, (k+1)*n_total//n); its middle is the upper middle for even sizes,
    as InternVL's `get_index` picks. Needs n_total >= n_frames >= 1 (every segment non-empty).
    """
    if n_frames < 1:
        raise AdaptError(f"the number of frames must be at least 1, got {n_frames}")
    if n_total < n_frames:
        raise TooFewFrames(n_total, n_frames)
    rng = rng or random.Random()
    indices = []
    for k in range(n_frames):
        start, end = k * n_total // n_frames, (k + 1) * n_total // n_frames
        indices.append(rng.randrange(start, end) if random_offset else (start + end) // 2)
    return indices


def video_prompt(n_frames: int) -> str:
    """`Frame-1: <image>\\nFrame-2: <image>...` (no trailing newline), InternVL's training form."""
    return "\n".join(f"Frame-{i + 1}: {IMAGE_PLACEHOLDER}" for i in range(n_frames))


def expand_video_placeholder(text: str, n_frames: int) -> str:
    """Replace `<video>` (and the newline after it, if any) by the frame prompt plus a newline."""
    if f"{VIDEO_PLACEHOLDER}\n" in text:
        return text.replace(f"{VIDEO_PLACEHOLDER}\n", video_prompt(n_frames) + "\n", 1)
    return text.replace(VIDEO_PLACEHOLDER, video_prompt(n_frames) + "\n", 1)


def _choose(path: str | Path, n_total: int, n_frames: int, random_offset: bool, seed: int | None,
            allow_fewer: bool) -> list[int]:
    if n_total == 0:
        raise AdaptError("no frames found", path=path, hint="check that it is a readable video or a folder of frame images")
    if n_total < n_frames:
        if allow_fewer:
            return list(range(n_total))
        raise TooFewFrames(n_total, n_frames, path=path)
    return segment_frame_indices(n_total, n_frames, random_offset=random_offset, rng=random.Random(seed))


def _open(path: str | Path) -> av.container.InputContainer:
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError) as err:
        raise AdaptError(f"cannot open video ({err})", path=path, hint="check the file exists and is a video") from None
    if not container.streams.video:
        container.close()
        raise AdaptError("file has no video stream", path=path)
    return container


def _count_packets(path: str | Path) -> int:
    """Frames according to the demuxer (one packet per frame): fast, no decoding, usually exact."""
    with _open(path) as container:
        stream = container.streams.video[0]
        try:
            return sum(1 for packet in container.demux(stream) if packet.size > 0)
        except av.FFmpegError as err:
            raise AdaptError(f"video is corrupt ({err})", path=path) from None


def _decode(path: str | Path, wanted: set[int]) -> tuple[dict[int, Image.Image], int]:
    """Decode every frame in presentation order; keep the `wanted` ones as RGB images; return the count."""
    kept: dict[int, Image.Image] = {}
    count = 0
    with _open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        try:
            for frame in container.decode(stream):
                if count in wanted:
                    kept[count] = frame.to_image()
                count += 1
        except av.FFmpegError as err:
            raise AdaptError(f"video does not decode after frame {count} ({err})", path=path) from None
    return kept, count


def count_video_frames(path: str | Path) -> int:
    """Frames that actually decode (full decode: the only count that cannot be wrong)."""
    return _decode(path, set())[1]


def read_video_frames(path: str | Path, n_frames: int, *, random_offset: bool = False, seed: int | None = None,
                      allow_fewer: bool = False) -> list[Image.Image]:
    """The n segment frames of a video file as RGB PIL images, in time order.

    A clip with fewer than n frames raises `TooFewFrames` (an `AdaptError`) naming the file and both
    counts, unless `allow_fewer`, which returns all of its frames.
    """
    guess = _count_packets(path)
    enough = guess >= n_frames or (allow_fewer and guess > 0)
    indices = _choose(path, guess, n_frames, random_offset, seed, allow_fewer) if enough else []
    kept, decoded = _decode(path, set(indices))
    if decoded != guess or not enough:  # the demuxer's count was wrong: place the segments on the true count
        indices = _choose(path, decoded, n_frames, random_offset, seed, allow_fewer)
        kept, _ = _decode(path, set(indices))
    return [kept[i] for i in indices]


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part.lower() for part in _DIGITS.split(name)]


def frame_files(folder: str | Path) -> list[Path]:
    """The image files of a frame folder in natural order (frame_2 before frame_10); hidden files ignored."""
    folder = Path(folder)
    if not folder.is_dir():
        raise AdaptError("frame folder not found", path=folder)
    files = [p for p in folder.iterdir()
             if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in FRAME_EXTENSIONS]
    return sorted(files, key=lambda p: _natural_key(p.name))


def read_frame_folder(folder: str | Path, n_frames: int, *, random_offset: bool = False, seed: int | None = None,
                      allow_fewer: bool = False) -> list[Image.Image]:
    """The n segment frames of a folder of frame images (sorted naturally) as RGB PIL images."""
    files = frame_files(folder)
    indices = _choose(folder, len(files), n_frames, random_offset, seed, allow_fewer)
    frames = []
    for i in indices:
        try:
            frames.append(decode_rgb(files[i]))  # decodes fully: truncation raises here
        except (OSError, SyntaxError, ValueError) as err:
            raise AdaptError(f"frame {files[i].name} does not decode ({err})", path=folder) from None
    return frames


def read_frames(path: str | Path, n_frames: int, *, random_offset: bool = False, seed: int | None = None,
                allow_fewer: bool = False) -> list[Image.Image]:
    """Frames of a video file or of a frame folder, whichever `path` is."""
    reader = read_frame_folder if Path(path).is_dir() else read_video_frames
    return reader(path, n_frames, random_offset=random_offset, seed=seed, allow_fewer=allow_fewer)
