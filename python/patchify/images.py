"""Decoding any image a user may hand us into the HxWx3 uint8 RGB array the tiler expects.

Every failure is an `ImageError` that names the source, so batch work can skip the file, report why and go on.
"""
from __future__ import annotations

import io
import os
import threading
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageError, ImageTooLargeError

ImageSource = Union[str, os.PathLike, Image.Image, np.ndarray]

# Decompression-bomb guard: a 20k x 20k photo is the largest we decode by default. It is the only limit: Pillow's
# own (Image.MAX_IMAGE_PIXELS, ~89.5 MP) is replaced by it inside `load_rgb` calls (see _bomb_check).
DEFAULT_MAX_PIXELS = 400_000_000

_WHITE = (255, 255, 255)


def describe_source(source: object) -> str:
    """A short human name for an image source, used in reports and errors."""
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    if isinstance(source, Image.Image):
        return getattr(source, "filename", "") or f"<PIL image {source.mode} {source.size[0]}x{source.size[1]}>"
    if isinstance(source, np.ndarray):
        return f"<array {source.dtype} {'x'.join(map(str, source.shape))}>"
    return f"<{type(source).__name__}>"


def load_rgb(source: ImageSource, *, max_pixels: int | None = None) -> np.ndarray:
    """Returns the image as a C-contiguous HxWx3 uint8 RGB array.

    Files and PIL images are rotated upright by their EXIF orientation; grayscale, palette, CMYK and other modes
    are converted to RGB; transparent pixels are composited over white; 16-bit and 32-bit integer images are
    scaled to 8 bits. Raises `ImageError` naming the source on anything unusable.

    `max_pixels` (None = DEFAULT_MAX_PIXELS) refuses larger images before decoding them (from the header's size);
    it replaces Pillow's decompression-bomb limit for this call only (Image.MAX_IMAGE_PIXELS is left alone).
    """
    max_pixels = _checked_max_pixels(max_pixels)
    name = describe_source(source)
    if isinstance(source, np.ndarray):
        return _array_to_rgb(source, name, max_pixels)
    if isinstance(source, Image.Image):
        return _pil_to_rgb(source, name, max_pixels)
    if isinstance(source, (str, os.PathLike)):
        return _decode_file(Path(source), name, max_pixels)
    raise ImageError(name, "expected a file path, a PIL image or an HxWx3 uint8 numpy array")


def decode_bytes(data: bytes, name: str, *, max_pixels: int | None = None) -> np.ndarray:
    """`load_rgb` for an encoded image held in memory (e.g. an HTTP upload): the same checks, conversions and
    errors, which name it `name`."""
    max_pixels = _checked_max_pixels(max_pixels)
    if not data:
        raise ImageError(name, "empty file")
    return _decode_file(io.BytesIO(data), name, max_pixels)


def _checked_max_pixels(max_pixels: int | None) -> int:
    """max_pixels as given to load_rgb / decode_bytes: None = DEFAULT_MAX_PIXELS, else a positive integer."""
    if max_pixels is None:
        return DEFAULT_MAX_PIXELS
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, (int, np.integer)) or max_pixels < 1:
        raise ValueError(f"max_pixels must be a positive integer or None, got {max_pixels!r}")
    return int(max_pixels)


def _decode_file(file: "Path | io.BytesIO", name: str, max_pixels: int) -> np.ndarray:
    outer = getattr(_call_limit, "max_pixels", None)
    _call_limit.max_pixels = max_pixels  # for decoding and for EXIF rotation (Pillow checks sizes in both)
    try:
        return _pil_to_rgb(_open_file(file, name, max_pixels), name, max_pixels)
    finally:
        _call_limit.max_pixels = outer


class _TooLarge(Image.DecompressionBombError):
    def __init__(self, size: tuple[int, int], max_pixels: int) -> None:
        super().__init__(f"{size[0]}x{size[1]} pixels > {max_pixels}")
        self.size = size


# The max_pixels of the `load_rgb` call running on this thread (None outside one).
_call_limit = threading.local()
_pillow_bomb_check = getattr(Image, "_decompression_bomb_check", None)


def _bomb_check(size: tuple[int, int], *args: object, **kwargs: object) -> None:
    """Pillow's decompression-bomb check, which Pillow runs on the header's size in Image.open and on frame and
    tile sizes while decoding. Inside a `load_rgb` call it applies that call's max_pixels instead of
    Image.MAX_IMAGE_PIXELS (else a 10000x9000 photo would be refused whatever max_pixels says); everywhere else
    it is Pillow's own check, unchanged. A thread-local limit, not a temporary change of MAX_IMAGE_PIXELS: that
    global would leak to the user's other threads and race with our decoding threads."""
    limit = getattr(_call_limit, "max_pixels", None)
    if limit is None:
        assert _pillow_bomb_check is not None
        _pillow_bomb_check(size, *args, **kwargs)
        return
    width, height = (int(v) for v in size)
    if width * height > limit:
        raise _TooLarge((width, height), limit)


if _pillow_bomb_check is not None and getattr(_pillow_bomb_check, "__name__", "") != "_bomb_check":
    Image._decompression_bomb_check = _bomb_check
# Else (a Pillow without this hook) Pillow's own limit still applies on top of ours.


def _open_file(path: "Path | io.BytesIO", name: str, max_pixels: int) -> Image.Image:
    if isinstance(path, Path) and not path.exists():
        raise ImageError(name, "file not found")
    if isinstance(path, Path) and path.is_dir():
        raise ImageError(name, "is a directory, not an image file")
    try:
        image = Image.open(path)  # reads the header only; _bomb_check refuses a too large size here
        _check_size(image.size, name, max_pixels)
        image.load()  # decode now, so truncation surfaces here and not in the tiler
    except ImageError:
        raise
    except _TooLarge as exc:
        width, height = exc.size
        raise ImageTooLargeError(name, f"too large: {width}x{height} = {width * height} pixels > "
                                       f"max_pixels={max_pixels}") from None
    except UnidentifiedImageError:
        raise ImageError(name, "not a recognised image format") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLargeError(name, f"too large to decode safely ({exc})") from None
    except OSError as exc:
        raise ImageError(name, f"corrupt or truncated image ({exc})") from None
    except (ValueError, SyntaxError, EOFError) as exc:
        raise ImageError(name, f"corrupt image ({exc})") from None
    return image


def _check_size(size: tuple[int, int], name: str, max_pixels: int) -> None:
    width, height = size
    if width < 1 or height < 1:
        raise ImageError(name, f"empty image ({width}x{height})")
    if width * height > max_pixels:
        raise ImageTooLargeError(name, f"too large: {width}x{height} = {width * height} pixels > "
                                       f"max_pixels={max_pixels}")


def _pil_to_rgb(image: Image.Image, name: str, max_pixels: int) -> np.ndarray:
    _check_size(image.size, name, max_pixels)
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # a broken EXIF block must not cost us the pixels
        pass
    mode = image.mode
    if mode == "RGB":
        return np.ascontiguousarray(np.asarray(image, dtype=np.uint8))
    if mode.startswith("I") or mode == "F":
        return _array_to_rgb(np.asarray(image), name, max_pixels)
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE + (255,))
        return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"), dtype=np.uint8)
    try:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (ValueError, OSError) as exc:
        raise ImageError(name, f"cannot convert image mode {mode!r} to RGB ({exc})") from None


def _to_uint8(values: np.ndarray, name: str) -> np.ndarray:
    if values.dtype == np.uint8:
        return values
    if values.dtype == np.bool_:
        return values.astype(np.uint8) * 255
    if np.issubdtype(values.dtype, np.integer):
        high = int(values.max()) if values.size else 0
        if values.min() < 0:
            raise ImageError(name, f"negative pixel values in a {values.dtype} image")
        if high <= 255:
            return values.astype(np.uint8)
        if high <= 65535:  # 16-bit data, whatever the container type
            return ((values.astype(np.uint32) + 128) // 257).astype(np.uint8)
        return np.round(values / high * 255).astype(np.uint8)
    if np.issubdtype(values.dtype, np.floating):
        if not np.all(np.isfinite(values)):
            raise ImageError(name, "image contains NaN or infinite values")
        scale = 255.0 if values.size and float(values.max()) <= 1.0 else 1.0
        return np.clip(np.round(values * scale), 0, 255).astype(np.uint8)
    raise ImageError(name, f"unsupported pixel dtype {values.dtype}")


def _array_to_rgb(array: np.ndarray, name: str, max_pixels: int) -> np.ndarray:
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise ImageError(name, f"expected an HxW, HxWx3 or HxWx4 array, got shape {array.shape}")
    _check_size((array.shape[1], array.shape[0]), name, max_pixels)
    pixels = _to_uint8(array, name)
    if pixels.shape[2] == 1:
        pixels = np.repeat(pixels, 3, axis=2)
    elif pixels.shape[2] == 4:
        alpha = pixels[:, :, 3:4].astype(np.float32) / 255.0
        pixels = np.round(pixels[:, :, :3] * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
    return np.ascontiguousarray(pixels)


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".jfif"}


def list_image_files(folder: str | os.PathLike, *, recursive: bool = True) -> list[Path]:
    """Every non-hidden file under `folder`, sorted. Non-image files are included on purpose: the indexer
    tries them and reports why they were skipped instead of silently ignoring them."""
    root = Path(folder)
    if not root.exists():
        raise FileNotFoundError(f"{root}: folder not found")
    if not root.is_dir():
        raise NotADirectoryError(f"{root}: not a folder")
    pattern = root.rglob("*") if recursive else root.glob("*")
    files = [
        p for p in pattern
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    ]
    return sorted(files)
