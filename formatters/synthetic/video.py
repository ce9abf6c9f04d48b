"""Tiny video datasets: clips encoded with PyAV and frame folders whose pixels encode the frame index.

Frame i of every clip and frame folder is a uniform grey of level FRAME_STEP * i, so a decoded
frame tells which source frame it is (`frame_index_of`), with room for codec error (±FRAME_STEP/2).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import av
import numpy as np
from PIL import Image

FRAME_STEP = 10
MAX_FRAMES = 256 // FRAME_STEP  # frames whose grey level still fits in a byte
SIZE = (64, 48)  # width, height


def _grey(index: int) -> np.ndarray:
    if not 0 <= index < MAX_FRAMES:
        raise ValueError(f"frame {index} cannot be encoded as a grey level (0..{MAX_FRAMES - 1})")
    return np.full((SIZE[1], SIZE[0], 3), FRAME_STEP * index, dtype=np.uint8)


def frame_index_of(image: Image.Image) -> int:
    """The source frame index a decoded frame shows (its mean grey level / FRAME_STEP, rounded)."""
    return round(float(np.asarray(image.convert("L"), dtype=np.float64).mean()) / FRAME_STEP)


def write_clip(path: str | Path, n_frames: int = 24, fps: int = 24) -> Path:
    """Encode an n-frame clip (H.264 with B-frames where libx264 exists, else MPEG-4 part 2).

    The container follows the suffix: .mp4 stores a frame count, .mkv does not (stream.frames == 0).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = SIZE[0], SIZE[1], "yuv420p"
        stream.options = {"crf": "10", "bf": "2", "g": "12"} if codec == "libx264" else {"qscale": "2"}
        for i in range(n_frames):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(_grey(i), format="rgb24")))
        container.mux(stream.encode())
    return path


def write_frame_folder(folder: str | Path, n_frames: int = 12) -> Path:
    """frame_1.png .. frame_n.png (1-based, unpadded: sorting them as text would put frame_10 before frame_2)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_frames):
        Image.fromarray(_grey(i)).save(folder / f"frame_{i + 1}.png")
    return folder


def write_video_dataset(root: str | Path) -> Path:
    """A clip folder with annotations.csv (video,question,answer) and labels.jsonl (video,label).

    clips/clip.mp4 (24 frames), clips/clip.mkv (24 frames, no header frame count), clips/short.mp4
    (4 frames), clips/broken.mp4 (not a video), frames/clip_a/ (12 PNG frames).
    annotations.csv lines (header = 1): 2 clip.mp4 "yes", 3 clip.mkv open, 4 frames/clip_a open,
    5 short.mp4, 6 broken.mp4, 7 missing.mp4. labels.jsonl: clip.mp4 "walking", clip.mkv "running".
    Returns the folder.
    """
    root = Path(root)
    write_clip(root / "clips" / "clip.mp4", 24)
    write_clip(root / "clips" / "clip.mkv", 24)
    write_clip(root / "clips" / "short.mp4", 4)
    (root / "clips" / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4)
    write_frame_folder(root / "frames" / "clip_a", 12)
    rows = [("clips/clip.mp4", "Does the scene get brighter?", "yes"),
            ("clips/clip.mkv", "What changes over time?", "the brightness increases"),
            ("frames/clip_a", "What changes over time?", "the brightness increases"),
            ("clips/short.mp4", "Is the clip long?", "no"),
            ("clips/broken.mp4", "What is shown?", "nothing"),
            ("clips/missing.mp4", "What is shown?", "nothing")]
    with open(root / "annotations.csv", "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([("video", "question", "answer"), *rows])
    labels = [{"video": "clips/clip.mp4", "label": "walking"}, {"video": "clips/clip.mkv", "label": "running"}]
    (root / "labels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in labels), encoding="utf-8")
    return root
