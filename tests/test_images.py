"""Decoding of every kind of input a user may hand the engine, and clear errors for the rest."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from patchify.errors import ImageTooLargeError
from patchify.images import ImageError, list_image_files, load_rgb


def _save(image: Image.Image, path: Path, **kwargs) -> Path:
    image.save(path, **kwargs)
    return path


def test_rgb_jpeg_round_trip(photos):
    pixels = load_rgb(photos[0])
    assert pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3
    assert pixels.flags.c_contiguous
    assert pixels.shape[:2] == Image.open(photos[0]).size[::-1]


def test_grayscale_palette_cmyk_become_rgb(tmp_path):
    gray = Image.fromarray(np.arange(64 * 48, dtype=np.uint8).reshape(48, 64) % 251)
    for mode, suffix in [("L", ".png"), ("P", ".png"), ("CMYK", ".jpg"), ("1", ".png")]:
        path = _save(gray.convert(mode), tmp_path / f"img_{mode}{suffix}")
        pixels = load_rgb(path)
        assert pixels.shape == (48, 64, 3), mode
    rgb = load_rgb(tmp_path / "img_L.png")
    assert np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], np.asarray(gray))


def test_alpha_is_composited_over_white(tmp_path):
    rgba = np.zeros((10, 10, 4), np.uint8)
    rgba[..., 0] = 200  # red, half of it transparent
    rgba[:, :5, 3] = 255
    pixels = load_rgb(_save(Image.fromarray(rgba, "RGBA"), tmp_path / "a.png"))
    assert tuple(pixels[0, 0]) == (200, 0, 0)
    assert tuple(pixels[0, 9]) == (255, 255, 255)
    assert np.array_equal(load_rgb(rgba), pixels)  # arrays follow the same rule


def test_sixteen_bit_is_scaled(tmp_path):
    values = (np.arange(20 * 30, dtype=np.uint16).reshape(20, 30) * 100).astype(np.uint16)
    path = _save(Image.fromarray(values), tmp_path / "deep.png")
    pixels = load_rgb(path)
    expected = ((values.astype(np.uint32) + 128) // 257).astype(np.uint8)
    assert np.array_equal(pixels[..., 0], expected)
    assert np.array_equal(load_rgb(values), pixels)


def test_exif_rotation_is_applied(tmp_path):
    wide = Image.new("RGB", (40, 20), (10, 20, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = _save(wide, tmp_path / "rotated.jpg", exif=exif)
    assert load_rgb(path).shape == (40, 20, 3)


def test_float_arrays(tmp_path):
    unit = np.full((4, 5, 3), 0.5, np.float32)
    assert load_rgb(unit)[0, 0, 0] == 128
    with pytest.raises(ImageError, match="NaN"):
        load_rgb(np.full((4, 5, 3), np.nan, np.float32))


@pytest.mark.parametrize("shape", [(5,), (4, 5, 2), (4, 5, 3, 1), (0, 5, 3)])
def test_bad_array_shapes_are_named(shape):
    with pytest.raises(ImageError, match="array"):
        load_rgb(np.zeros(shape, np.uint8))


def test_corrupt_truncated_and_non_images_name_the_file(tmp_path, photos):
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(photos[0].read_bytes()[:2000])
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 100)
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    for path, reason in [(truncated, "truncated"), (garbage, "corrupt|not a recognised"),
                         (text, "not a recognised"), (tmp_path / "missing.jpg", "not found"), (tmp_path, "directory")]:
        with pytest.raises(ImageError, match=reason) as info:
            load_rgb(path)
        assert str(path) in str(info.value)


def test_huge_images_are_refused_before_decoding(tmp_path):
    path = _save(Image.new("RGB", (300, 200)), tmp_path / "big.png")
    with pytest.raises(ImageTooLargeError, match="too large"):
        load_rgb(path, max_pixels=300 * 200 - 1)
    assert load_rgb(path, max_pixels=300 * 200).shape == (200, 300, 3)


def _constant_png(path: Path, width: int, height: int) -> Path:
    """A black 8-bit grayscale PNG written row by row: a 90 MP file costs ~90 kB and no 90 MB buffer."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compressor = zlib.compressobj(9)
    row = b"\x00" * (width + 1)  # filter byte 0, then the pixels
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def test_one_pixel_limit_ours_not_pillows(tmp_path):
    """A 90 MP photo is over Pillow's own decompression-bomb limit (Image.MAX_IMAGE_PIXELS, ~89.5 MP) but under
    ours: it decodes with the default limit, is refused by a lower max_pixels before decoding, and Pillow's global
    setting is left as it was for everyone else."""
    path = _constant_png(tmp_path / "large.png", 10000, 9000)
    before = Image.MAX_IMAGE_PIXELS
    assert before is not None and 10000 * 9000 > before
    with pytest.raises(ImageTooLargeError) as info:
        load_rgb(path, max_pixels=50_000_000)
    assert str(path) in str(info.value) and "max_pixels=50000000" in str(info.value)
    assert "10000x9000" in str(info.value)
    pixels = load_rgb(path)
    assert pixels.shape == (9000, 10000, 3) and pixels.dtype == np.uint8 and not pixels[::997, ::991].any()
    del pixels
    assert load_rgb(path, max_pixels=None).shape == (9000, 10000, 3)  # None = the default
    assert Image.MAX_IMAGE_PIXELS == before
    # Outside our calls Pillow's own check is untouched: it still warns about this file.
    with pytest.warns(Image.DecompressionBombWarning):
        Image.open(path).close()
    with pytest.raises(ValueError, match="max_pixels"):
        load_rgb(path, max_pixels=0)


def test_pil_images_and_unsupported_types():
    image = Image.new("RGB", (7, 3), (1, 2, 3))
    assert load_rgb(image).shape == (3, 7, 3)
    with pytest.raises(ImageError, match="expected a file path"):
        load_rgb(io.BytesIO(b"x"))  # type: ignore[arg-type]


def test_list_image_files(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.jpg").write_bytes(b"x")
    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / ".hidden.jpg").write_bytes(b"x")
    assert [p.name for p in list_image_files(tmp_path)] == ["a.png", "b.jpg"]
    with pytest.raises(FileNotFoundError):
        list_image_files(tmp_path / "nope")


def test_decode_bytes_checks_like_load_rgb(tmp_path):
    """Uploads are decoded from memory with load_rgb's checks and conversions, errors naming the upload."""
    from patchify.images import decode_bytes

    photo = sorted((Path(__file__).resolve().parents[1] / "data" / "photos").glob("*.jpg"))[0]
    data = photo.read_bytes()
    np.testing.assert_array_equal(decode_bytes(data, "a.jpg"), load_rgb(photo))
    for payload, words in ((b"", "empty file"), (b"plain text", "not a recognised image format"),
                           (data[: len(data) // 2], "truncated")):
        with pytest.raises(ImageError, match=words) as caught:
            decode_bytes(payload, "upload.jpg")
        assert caught.value.source == "upload.jpg"
    bomb = io.BytesIO()
    Image.new("1", (5000, 5000)).save(bomb, format="PNG")
    with pytest.raises(ImageTooLargeError, match="too large"):
        decode_bytes(bomb.getvalue(), "bomb.png", max_pixels=1_000_000)
    for bad in (0, True, 2.5):  # the same max_pixels checks as load_rgb
        with pytest.raises(ValueError, match="max_pixels must be a positive integer"):
            decode_bytes(data, "a.jpg", max_pixels=bad)
