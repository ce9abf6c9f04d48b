"""Images decoded as displayed: EXIF orientation, 16-bit and float pixels, and the report saying so.

The orientation table is the EXIF 2.32 definition (tag 0x0112), written here with numpy, independently of
PIL's `ImageOps.exif_transpose` that adapt uses.
"""

from __future__ import annotations

import json

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

import formatters
from adapt.data.images import decode_array, decode_rgb, image_size
from formatters.base import run

DISPLAYED = {  # stored (H, W, C) -> displayed, per EXIF orientation value
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1, :],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, k=-1),
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    8: lambda a: np.rot90(a, k=1),
}
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _save_with_orientation(array: np.ndarray, path, orientation: int) -> None:
    image = Image.fromarray(array)
    exif = image.getexif()
    exif[0x0112] = orientation
    image.save(path, exif=exif.tobytes())


@SETTINGS
@given(orientation=st.integers(1, 8), pixels=arrays(np.uint8, st.tuples(st.integers(1, 9), st.integers(1, 9),
                                                                         st.just(3))))
def test_exif_orientation_is_applied_exactly(tmp_path, orientation, pixels):
    path = tmp_path / f"o{orientation}.png"
    _save_with_orientation(pixels, path, orientation)
    expected = DISPLAYED[orientation](pixels)
    decoded = np.asarray(decode_rgb(path))
    assert np.array_equal(decoded, expected) and np.array_equal(decode_array(path), expected)
    assert image_size(path) == (expected.shape[1], expected.shape[0])
    assert decode_rgb(path).info["adapt_normalized"] == ([] if orientation == 1 else [f"EXIF orientation {orientation} applied"])


def test_rotated_jpeg_box_lands_on_the_displayed_pixels(tmp_path):
    """The case of the issue: a phone JPEG stored landscape with orientation 6; the box is in displayed
    (portrait) coordinates and must cover the white object on the pixels training sees."""
    stored = np.zeros((60, 100, 3), np.uint8)
    stored[:20, :30] = 255  # top-left when stored -> top-right once rotated 90 degrees clockwise
    path = tmp_path / "phone.jpg"
    _save_with_orientation(stored, path, 6)
    pixels = decode_array(path)  # the JPEG fast path of training
    assert pixels.shape == (100, 60, 3) and image_size(path) == (60, 100)
    box_x1, box_y1, box_x2, box_y2 = 40, 0, 60, 30  # displayed coordinates of the object
    assert pixels[box_y1:box_y2, box_x1:box_x2].mean() > 200 and pixels[:, :30].mean() < 30


@SETTINGS
@given(arrays(np.uint16, st.tuples(st.integers(1, 8), st.integers(1, 8)), elements=st.integers(256, 65535)))
def test_16_bit_png_is_scaled_by_the_16_bit_range(tmp_path, pixels):
    path = tmp_path / "deep.png"
    Image.fromarray(pixels).save(path)
    decoded = np.asarray(decode_rgb(path))
    expected = np.rint(pixels.astype(np.float64) * 255 / 65535).astype(np.uint8)
    assert np.array_equal(decoded[..., 0], expected) and np.array_equal(decode_array(path)[..., 1], expected)


@SETTINGS
@given(arrays(np.float32, st.tuples(st.integers(1, 8), st.integers(1, 8)),
              elements=st.floats(0, 1, width=32)))
def test_float_tiff_in_0_1_is_scaled_by_255(tmp_path, pixels):
    path = tmp_path / "float.tif"
    Image.fromarray(pixels, mode="F").save(path)
    decoded = np.asarray(decode_rgb(path))[..., 2]
    assert np.abs(decoded.astype(int) - np.rint(pixels.astype(np.float64) * 255)).max() <= 0


def test_float_tiff_outside_0_1_uses_its_observed_range(tmp_path):
    pixels = np.array([[-2.0, 0.0], [2.0, 6.0]], np.float32)
    path = tmp_path / "hu.tif"
    Image.fromarray(pixels, mode="F").save(path)
    image = decode_rgb(path)
    assert np.asarray(image)[..., 0].tolist() == [[0, 64], [128, 255]]
    assert image.info["adapt_normalized"] == ["F image scaled from its range -2..6"]


def test_formatter_report_says_what_was_done(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray(np.full((8, 8), 40000, np.uint16)).save(src / "deep.png")
    _save_with_orientation(np.zeros((8, 12, 3), np.uint8), src / "turned.png", 8)
    rows = [{"id": name, "image": f"{name}.png",
             "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]}
            for name in ("deep", "turned")]
    (src / "ann.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    report = run(formatters.get("general"), src / "ann.jsonl", tmp_path / "out", progress=False)
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["stats"]["images_normalized"] == {"16-bit image scaled by 65535/255": 1,
                                                   "EXIF orientation 8 applied": 1}
    assert report.warnings and saved["warnings"] == report.warnings
