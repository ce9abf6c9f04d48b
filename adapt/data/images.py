"""The one place images are opened: decode to RGB uint8, resize.

Formatters, training, evaluation and notebooks all read pixels through this module, so every path sees
the same modes, orientation and value ranges.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import simplejpeg
import torch
from PIL import ExifTags, Image, ImageOps

NOTES_KEY = "adapt_normalized"  # image.info key listing what decode_rgb did beyond a plain decode
_ROTATING = {5, 6, 7, 8}  # EXIF orientations that swap width and height


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(ExifTags.Base.Orientation, 1) or 1)
    except (ValueError, TypeError, SyntaxError, OSError):  # a broken EXIF block: use the pixels as stored
        return 1


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) as displayed, from the header only: EXIF orientations 5-8 swap the stored sides."""
    with Image.open(path) as image:
        width, height = image.size
        return (height, width) if _orientation(image) in _ROTATING else (width, height)


def _to_uint8(image: Image.Image) -> tuple[Image.Image, str | None]:
    """Wide-range pixels (16/32-bit integers, floats) scaled by their real range to 0..255.

    PIL's own conversion clips them (a 16-bit PNG turns all-white, a 0..1 float TIFF black). Integers
    up to 65535 are scaled by the 16-bit range; floats within 0..1 by 255; anything else by its
    observed minimum and maximum.
    """
    if image.mode not in ("I", "F") and not image.mode.startswith("I;16"):
        return image, None
    array = np.asarray(image).astype(np.float64)
    if not np.isfinite(array).all():
        raise ValueError("image has NaN or infinite pixel values")
    low, high = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
    if image.mode == "F" and low >= 0 and high <= 1:
        scaled, note = array * 255, "float 0..1 image scaled by 255"
    elif image.mode != "F" and low >= 0 and high <= 255:
        scaled, note = array, None
    elif image.mode != "F" and low >= 0 and high <= 65535:
        scaled, note = array / 257, "16-bit image scaled by 65535/255"
    else:
        span = high - low or 1.0
        scaled, note = (array - low) / span * 255, f"{image.mode} image scaled from its range {low:g}..{high:g}"
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8)), note


def decode_rgb(data: bytes | str | Path) -> Image.Image:
    """Decode an image file (path or bytes) to a PIL RGB image, as displayed; raises for corrupt or
    truncated input. EXIF orientation is applied (boxes are drawn on the displayed image) and wide-range
    pixels are scaled by their real range; what was done is listed in `image.info[NOTES_KEY]`."""
    image = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
    image.load()  # force a full decode now so truncation is detected here, not later
    notes = []
    orientation = _orientation(image)
    if orientation != 1:
        image = ImageOps.exif_transpose(image)
        notes.append(f"EXIF orientation {orientation} applied")
    image, note = _to_uint8(image)
    notes += [note] if note else []
    out = image.convert("RGB") if image.mode != "RGB" else image
    out.info[NOTES_KEY] = notes
    return out


def decode_array(path: str | Path) -> np.ndarray:
    """Decode to an (H, W, 3) uint8 array, JPEGs through simplejpeg.

    simplejpeg is libjpeg-turbo with the same defaults as PIL (accurate IDCT, fancy upsampling), so the
    pixels are identical, but it decodes straight into one numpy buffer (no PIL image, no convert copy).
    It ignores EXIF orientation, so rotated JPEGs go through `decode_rgb`.
    """
    with open(path, "rb") as handle:
        data = handle.read()
    if data[:3] == b"\xff\xd8\xff" and _orientation(Image.open(io.BytesIO(data))) == 1:
        try:
            return simplejpeg.decode_jpeg(data, colorspace="RGB")
        except ValueError:
            pass  # CMYK and other exotic JPEGs: let PIL handle (or reject) them
    return np.asarray(decode_rgb(data))


def resize(array: np.ndarray, width: int, height: int, resample: str = "torch") -> np.ndarray:
    """Bicubic resize of an (H, W, 3) uint8 array.

    "pil" is bit-exact with the official pipeline. "torch" (default) uses PyTorch's antialiased uint8
    bicubic kernel when no side grows: 8x faster than PIL on a 2688x896 -> 448x448 thumbnail and
    within one grey level of PIL; upscaling differs more at edges, so it stays on PIL
    (tests/test_tiling.py measures both).
    """
    if array.shape[1] == width and array.shape[0] == height:
        return array
    if resample == "pil" or width > array.shape[1] or height > array.shape[0]:
        return np.asarray(Image.fromarray(array).resize((width, height), Image.Resampling.BICUBIC))
    with warnings.catch_warnings():  # read-only arrays (PIL-backed) are fine: the kernel never writes its input
        warnings.simplefilter("ignore", UserWarning)
        tensor = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)[None]
    out = torch.nn.functional.interpolate(tensor, size=(height, width), mode="bicubic", antialias=True)
    return out[0].permute(1, 2, 0).numpy()


def difference_hash(data: bytes, hash_size: int = 8) -> tuple[int, int, int]:
    """(dHash, width, height) of an encoded image: a perceptual hash for near-duplicate detection.

    The definition is imagehash's `dhash` (grey, LANCZOS resize to (hash_size + 1) x hash_size, bit set
    where a pixel is brighter than its left neighbour, bits row-major, first bit most significant).
    imagehash itself is not used: it needs PyWavelets (not in this environment) and SciPy, and decodes
    the whole image (10.0 ms CPU for a 1600x900 JPEG), while here a JPEG is decoded at 1/8 scale through
    libjpeg's DCT scaling (`draft`, 1.8 ms); the hash stays within a few bits of the full-decode one and
    re-encoded copies land within a few bits (tests/test_filtering.py).
    """
    image = Image.open(io.BytesIO(data))
    width, height = image.size
    image.draft("L", (hash_size * 4, hash_size * 4))  # JPEG only; a no-op for other formats
    grey = np.asarray(image.convert("L").resize((hash_size + 1, hash_size), Image.Resampling.LANCZOS),
                      dtype=np.int16)
    bits = (grey[:, 1:] > grey[:, :-1]).ravel()
    return int.from_bytes(np.packbits(bits).tobytes(), "big"), width, height
