"""Multi-scale grid patches: which boxes, and their pixels ready for the backbone.

Levels nest: ``level=L`` uses the grids 1x1, 2x2, ..., (L+1)x(L+1), i.e. 1, 5, 14, 30 patches per image for
L = 0..3. Cell (r, c) of a g x g grid on an H x W image spans x in [floor(c*W/g), floor((c+1)*W/g)) and y likewise,
so the cells tile the image exactly; with ``overlap`` each side moves out by round(overlap * cell extent), clipped
to the image. Patch order per image: grid by grid (ascending), each row-major.

The heavy lifting (crop, Pillow-exact antialiased resize, normalisation into one NCHW batch, in parallel) is
the C++ core; `pillow_reference_patch` is the slow, obviously-right reference it is tested against.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image

from . import _core
from .config import MAX_GRID, TilingConfig, check_grids, grids_for_level
from .preprocess import Preprocess

__all__ = ["MAX_GRID", "TileBatch", "grid_sizes", "patch_boxes", "patches_per_image", "cell_input_sizes", "tile_images",
           "prepare_whole_images", "pillow_reference_patch"]

_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
_OUT_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))


def grid_sizes(level: int | None = None, *, grids: Sequence[int] | None = None) -> tuple[int, ...]:
    """The grid sizes to tile with, ascending: ``level=L`` -> (1, ..., L+1); or explicit ``grids`` (e.g.
    ``grids=[1, 3]``), validated and sorted. Exactly one of the two."""
    if (level is None) == (grids is None):
        raise ValueError("give exactly one of level (an int >= 0) or grids (a list of grid sizes)")
    return grids_for_level(level) if level is not None else check_grids(grids)  # type: ignore[arg-type]


def cell_input_sizes(height: int, width: int, grids: Sequence[int], tiling: TilingConfig, input_size: int,
                     patch_size: int | None) -> tuple[int, ...]:
    """The side each grid's cells of an H x W image are resized to, per grid (see TilingConfig.cell_sizing).

    "fixed": `input_size` for every grid. "fit": the cell's own extent (geometric mean of its width and height,
    overlap included) rounded to a multiple of `patch_size`, at least `tiling.min_input_size` (rounded up to a
    multiple) and at most `input_size`. Why: a ViT's cost is proportional to its tokens, and a cell upsampled to
    `input_size` pays for tokens its pixels cannot fill (a 4x4 cell of a 348 px photo is 87 px: 256 tokens at 224 px,
    64 at 112). The floor keeps a few tokens of context for tiny cells."""
    if tiling.cell_sizing == "fixed":
        return tuple(int(input_size) for _ in grids)
    if not patch_size:
        raise ValueError("cell_sizing='fit' needs the backbone's patch size (a backbone taking several input sizes)")
    floor = -(-int(tiling.min_input_size) // patch_size) * patch_size
    sizes = []
    for g in grids:
        side = math.sqrt((height / g) * (width / g)) * (1.0 + 2.0 * tiling.overlap if g > 1 else 1.0)
        sizes.append(min(int(input_size), max(floor, int(round(side / patch_size)) * patch_size)))
    return tuple(sizes)


def patches_per_image(grids: Sequence[int]) -> int:
    """Number of patches each image yields: sum of g*g."""
    return sum(int(g) * int(g) for g in grids)


def patch_boxes(height: int, width: int, grids: Sequence[int], overlap: float = 0.0
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(boxes int32 (P, 4) as x0, y0, x1, y1 with exclusive max, grid int32 (P,), cell int32 (P,)) of one
    image, in patch order. Raises ValueError if the image is smaller than the finest grid."""
    return _core.patch_boxes(int(height), int(width), [int(g) for g in grids], float(overlap))


@dataclass
class TileBatch:
    """Patches of a batch of images: ``pixels`` (P, 3, s, s) normalised, and per patch its box (original pixels
    of its image), the index of its image in the input list, its grid size and its cell (row-major)."""

    pixels: np.ndarray
    boxes: np.ndarray
    image_index: np.ndarray
    grid: np.ndarray
    cell: np.ndarray

    @property
    def level(self) -> np.ndarray:
        """Grid level of each patch (0 = whole image, 1 = 2x2 cell, ...)."""
        return self.grid - 1

    def __len__(self) -> int:
        return len(self.boxes)


def tile_images(images: Sequence[np.ndarray], grids: Sequence[int], preprocess: Preprocess, *,
                overlap: float = 0.0, dtype: np.dtype | type = np.float32, out: np.ndarray | None = None,
                num_threads: int = 0) -> TileBatch:
    """Tiles HxWx3 uint8 RGB images (any strides) into the patches of ``grids`` and writes each one, resized to
    ``preprocess.input_size`` with its interpolation (as Pillow's ``crop(box).resize``) and normalised, into one
    NCHW batch. ``out`` (float32 or float16, C-contiguous, at least P patches) is filled in place when given;
    ``pixels`` is then its first P rows. Raises ValueError naming the image that is not a usable array or is
    smaller than the finest grid."""
    if isinstance(images, np.ndarray) and images.ndim != 4:
        raise ValueError(f"images must be a sequence of (H, W, 3) arrays or an (N, H, W, 3) array, got an array of "
                         f"shape {images.shape}; wrap a single image in a list")
    images = list(images)
    grids = [int(g) for g in grids]
    size = int(preprocess.input_size)
    n = len(images) * patches_per_image(grids)
    if out is None:
        dtype = np.dtype(dtype)
        if dtype not in _OUT_DTYPES:
            raise ValueError(f"dtype must be float32 or float16, got {dtype}")
        out = np.empty((n, 3, size, size), dtype=dtype)
    elif not isinstance(out, np.ndarray):
        raise ValueError(f"out must be a numpy array, got {type(out).__name__}")
    boxes, image_index, grid, cell = _core.tile_images(
        images, grids, size, [float(v) for v in preprocess.mean], [float(v) for v in preprocess.std],
        preprocess.interpolation, float(overlap), out, int(num_threads))
    return TileBatch(pixels=out[:n], boxes=boxes, image_index=image_index, grid=grid, cell=cell)


def prepare_whole_images(images: Sequence[np.ndarray], preprocess: Preprocess, *, dtype: np.dtype | type = np.float32,
                         num_threads: int = 0) -> np.ndarray:
    """Each whole image (grid 1) resized and normalised: (N, 3, s, s), as queries are embedded."""
    return tile_images(images, (1,), preprocess, dtype=dtype, num_threads=num_threads).pixels


def pillow_reference_patch(image: np.ndarray | Image.Image, box: Sequence[int], preprocess: Preprocess) -> np.ndarray:
    """Reference for one patch, with Pillow and numpy only: crop, resize, scale to [0, 1] and normalise in
    float32. Returns (3, s, s) float32. Accepts an already converted PIL image to skip the per-call copy."""
    pil = image if isinstance(image, Image.Image) else Image.fromarray(np.ascontiguousarray(image))
    if pil.mode != "RGB":
        pil = pil.convert("RGB")
    size = int(preprocess.input_size)
    x0, y0, x1, y1 = (int(v) for v in box)
    patch = pil.crop((x0, y0, x1, y1)).resize((size, size), _RESAMPLE[preprocess.interpolation])
    mean = np.asarray(preprocess.mean, dtype=np.float32)
    std = np.asarray(preprocess.std, dtype=np.float32)
    pixels = np.asarray(patch, dtype=np.float32) / np.float32(255.0)
    return np.ascontiguousarray(((pixels - mean) / std).transpose(2, 0, 1))
