"""The C++ tiler against its Pillow reference (`pillow_reference_patch`), plus boxes, order, dtypes and errors.

Tolerance: the tiler implements Pillow's fixed-point resampler, so patches are expected to be bit-identical;
the assertions allow 1e-6 after normalisation (far below one grey level, 1/255/std ~ 0.017).
"""
from __future__ import annotations

import re

import numpy as np
import pytest

from patchify import _core
from patchify.errors import CoreError
from patchify.images import load_rgb
from patchify.preprocess import Preprocess
from patchify.tiling import (TileBatch, grid_sizes, patch_boxes, patches_per_image, pillow_reference_patch,
                             prepare_whole_images, tile_images)

TOL = 1e-6
GREY_LEVEL = 1.0 / 255.0 / 0.229  # one grey level after normalisation, largest over the ImageNet std


def random_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def smooth_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Gradients plus noise: exercises negative bicubic lobes and clipping less randomly than pure noise."""
    y, x = np.mgrid[0:height, 0:width]
    rng = np.random.default_rng(seed)
    base = np.stack([x * 255 / max(width - 1, 1), y * 255 / max(height - 1, 1), (x + y) % 256], axis=-1)
    return np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)


def assert_matches_reference(images, batch: TileBatch, preprocess: Preprocess) -> None:
    assert len(batch.pixels) == len(batch.boxes)
    worst = 0.0
    for k in range(len(batch.boxes)):
        ref = pillow_reference_patch(images[int(batch.image_index[k])], batch.boxes[k], preprocess)
        got = batch.pixels[k].astype(np.float32)
        worst = max(worst, float(np.abs(ref - got).max()))
    assert worst <= TOL, f"max abs diff {worst} ({worst / GREY_LEVEL:.3f} grey levels)"


# ------------------------------------------------------------------------------------------------ grids & boxes
@pytest.mark.parametrize("levels, grids, count", [(0, (1,), 1), (1, (1, 2), 5), (2, (1, 2, 3), 14),
                                                  (3, (1, 2, 3, 4), 30)])
def test_levels_grids_and_counts(levels, grids, count):
    assert grid_sizes(levels) == grids
    assert grid_sizes(grids=list(grids)) == grids
    assert patches_per_image(grids) == count
    boxes, grid, cell = patch_boxes(480, 640, grids)
    assert boxes.shape == (count, 4) and boxes.dtype == np.int32
    assert grid.dtype == np.int32 and cell.dtype == np.int32
    # Order: grid by grid, each row-major.
    expected_grid = np.concatenate([np.full(g * g, g) for g in grids])
    expected_cell = np.concatenate([np.arange(g * g) for g in grids])
    np.testing.assert_array_equal(grid, expected_grid)
    np.testing.assert_array_equal(cell, expected_cell)


def test_grid_sizes_validation():
    assert grid_sizes(grids=[1, 3]) == (1, 3)
    assert grid_sizes(grids=[4, 1, 2]) == (1, 2, 4)
    for bad in (dict(level=-1), dict(level=True), dict(level=[1, 3]), dict(grids=[]), dict(grids=[0]),
                dict(grids=[2, 2]), dict(grids=[1.5]), dict(grids="12"), dict(), dict(level=1, grids=[1])):
        with pytest.raises(ValueError):
            grid_sizes(**bad)


@pytest.mark.parametrize("height, width", [(7, 10), (480, 640), (101, 37), (4, 4)])
def test_box_rule_tiles_exactly(height, width):
    grids = (1, 2, 3, 4)
    boxes, grid, cell = patch_boxes(height, width, grids)
    for g in grids:
        sel = grid == g
        b = boxes[sel]
        rows, cols = np.divmod(cell[sel], g)
        np.testing.assert_array_equal(b[:, 0], cols * width // g)
        np.testing.assert_array_equal(b[:, 2], (cols + 1) * width // g)
        np.testing.assert_array_equal(b[:, 1], rows * height // g)
        np.testing.assert_array_equal(b[:, 3], (rows + 1) * height // g)
        coverage = np.zeros((height, width), np.int32)
        for x0, y0, x1, y1 in b:
            coverage[y0:y1, x0:x1] += 1
        assert (coverage == 1).all()


def test_overlap_enlarges_and_clips():
    plain, _, _ = patch_boxes(100, 200, [2])
    boxes, _, _ = patch_boxes(100, 200, [2], overlap=0.25)
    # Cells are 100 x 50: sides move out by 25 and round(12.5) = 13 pixels, clipped at the image border.
    np.testing.assert_array_equal(plain[0], [0, 0, 100, 50])
    np.testing.assert_array_equal(boxes[0], [0, 0, 125, 63])
    np.testing.assert_array_equal(boxes[3], [75, 37, 200, 100])
    whole, _, _ = patch_boxes(100, 200, [1], overlap=0.4)
    np.testing.assert_array_equal(whole[0], [0, 0, 200, 100])
    with pytest.raises(ValueError, match="overlap"):
        patch_boxes(100, 200, [2], overlap=-0.1)
    with pytest.raises(ValueError, match="overlap"):
        patch_boxes(100, 200, [2], overlap=1.0)


# ------------------------------------------------------------------------------------------------ pixels
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_matches_pillow_on_real_photos(photos, interpolation):
    preprocess = Preprocess(input_size=224, interpolation=interpolation)
    images = [load_rgb(p) for p in photos[:4]]
    batch = tile_images(images, grid_sizes(3), preprocess)
    assert batch.pixels.shape == (4 * 30, 3, 224, 224) and batch.pixels.dtype == np.float32
    assert_matches_reference(images, batch, preprocess)


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
@pytest.mark.parametrize("size", [1, 5, 32, 97])
@pytest.mark.parametrize("shape", [(1, 1), (3, 200), (61, 47), (120, 90)])
def test_matches_pillow_up_and_down(interpolation, size, shape):
    """Up-scaling, down-scaling and mixed (one axis each way), odd sizes, 1-pixel images."""
    preprocess = Preprocess(input_size=size, interpolation=interpolation)
    images = [smooth_image(*shape, seed=1), random_image(*shape, seed=2)]
    grids = grid_sizes(min(2, min(shape) - 1))
    batch = tile_images(images, grids, preprocess, overlap=0.1)
    assert_matches_reference(images, batch, preprocess)


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_matches_pillow_on_random_shapes(interpolation):
    """Random crop shapes around the output size: covers both pass orders Pillow picks (vertical first when the
    height shrinks much more than the width) and every up/down combination."""
    rng = np.random.default_rng(42)
    for trial in range(60):
        size = int(rng.integers(8, 40))
        height, width = (int(v) for v in rng.integers(1, 4 * size, size=2))
        preprocess = Preprocess(input_size=size, interpolation=interpolation)
        image = random_image(height, width, seed=trial)
        batch = tile_images([image], (1,), preprocess)
        assert_matches_reference([image], batch, preprocess)


def test_strided_and_non_contiguous_input():
    preprocess = Preprocess(input_size=40, interpolation="bicubic")
    base = smooth_image(150, 260, seed=3)
    views = [base[10:140, 20:250], base[::2, ::3], base[:, ::-1], base[..., ::-1],
             np.asfortranarray(base), base.transpose(1, 0, 2)]
    batch = tile_images(views, (1, 2, 3), preprocess)
    expected = tile_images([np.ascontiguousarray(v) for v in views], (1, 2, 3), preprocess)
    np.testing.assert_array_equal(batch.pixels, expected.pixels)
    np.testing.assert_array_equal(batch.boxes, expected.boxes)
    assert_matches_reference(views, batch, preprocess)


def test_float16_output_and_out_buffer():
    preprocess = Preprocess(input_size=48)
    images = [smooth_image(90, 120, seed=4), random_image(60, 50, seed=5)]
    f32 = tile_images(images, (1, 2), preprocess)
    f16 = tile_images(images, (1, 2), preprocess, dtype=np.float16)
    assert f16.pixels.dtype == np.float16
    np.testing.assert_array_equal(f16.pixels, f32.pixels.astype(np.float16))  # same rounding as numpy

    out = np.full((12, 3, 48, 48), np.nan, np.float32)  # bigger than needed: only the first 10 rows are written
    batch = tile_images(images, (1, 2), preprocess, out=out)
    assert np.shares_memory(batch.pixels, out) and batch.pixels.shape[0] == 10
    np.testing.assert_array_equal(out[:10], f32.pixels)
    assert np.isnan(out[10:]).all()


def test_batch_metadata_and_whole_images():
    preprocess = Preprocess(input_size=16, interpolation="bilinear")
    images = [random_image(30, 40, seed=6), random_image(50, 20, seed=7), random_image(9, 9, seed=8)]
    batch = tile_images(images, (1, 2, 3), preprocess)
    np.testing.assert_array_equal(batch.image_index, np.repeat([0, 1, 2], 14))
    np.testing.assert_array_equal(batch.level, batch.grid - 1)
    assert len(batch) == 42
    for i, img in enumerate(images):
        boxes, grid, cell = patch_boxes(img.shape[0], img.shape[1], (1, 2, 3))
        rows = batch.image_index == i
        np.testing.assert_array_equal(batch.boxes[rows], boxes)
        np.testing.assert_array_equal(batch.grid[rows], grid)
        np.testing.assert_array_equal(batch.cell[rows], cell)
    whole = prepare_whole_images(images, preprocess)
    np.testing.assert_array_equal(whole, batch.pixels[batch.grid == 1])
    empty = tile_images([], (1, 2), preprocess)
    assert empty.pixels.shape == (0, 3, 16, 16) and empty.boxes.shape == (0, 4)


def test_threads_give_identical_output(photos):
    preprocess = Preprocess(input_size=64)
    images = [load_rgb(p) for p in photos[:6]]
    one = tile_images(images, (1, 2, 3, 4), preprocess, num_threads=1)
    for threads in (2, 3, 0):
        other = tile_images(images, (1, 2, 3, 4), preprocess, num_threads=threads)
        np.testing.assert_array_equal(one.pixels, other.pixels)
        np.testing.assert_array_equal(one.boxes, other.boxes)


def test_huge_and_elongated_images():
    preprocess = Preprocess(input_size=32, interpolation="bicubic")
    images = [smooth_image(1, 9000, seed=9), smooth_image(3000, 2, seed=10), smooth_image(2500, 3500, seed=11)]
    batch = tile_images(images, (1,), preprocess)
    assert_matches_reference(images, batch, preprocess)


# ------------------------------------------------------------------------------------------------ errors
def test_image_smaller_than_grid_names_image_and_size():
    preprocess = Preprocess(input_size=8)
    images = [random_image(20, 20), random_image(2, 50)]
    with pytest.raises(ValueError, match=r"image 1: .*2x50 .*4x4 grid"):
        tile_images(images, (1, 2, 3, 4), preprocess)
    with pytest.raises(ValueError, match="smaller than"):
        patch_boxes(3, 3, (1, 4))


@pytest.mark.parametrize("bad, message", [
    (np.zeros((10, 10, 3), np.float32), r"images\[1\].*uint8"),
    (np.zeros((10, 10), np.uint8), r"images\[1\].*\(H, W, 3\)"),
    (np.zeros((10, 10, 4), np.uint8), r"images\[1\].*shape \(10, 10, 4\)"),
    (np.zeros((0, 10, 3), np.uint8), r"images\[1\].*empty"),
    ([[1, 2, 3]], r"images\[1\].*numpy"),
])
def test_bad_images_raise_value_error(bad, message):
    with pytest.raises(ValueError, match=message):
        tile_images([random_image(10, 10), bad], (1,), Preprocess(input_size=8))


def test_single_array_instead_of_list():
    preprocess = Preprocess(input_size=8)
    image = random_image(10, 12)
    with pytest.raises(ValueError, match="wrap a single image in a list"):
        tile_images(image, (1,), preprocess)
    stacked = tile_images(np.stack([image, image]), (1,), preprocess)  # (N, H, W, 3) is a sequence of images
    np.testing.assert_array_equal(stacked.pixels[0], stacked.pixels[1])


def test_bad_out_raises_value_error():
    preprocess = Preprocess(input_size=8)
    images = [random_image(10, 10)]
    for out, message in [
        (np.zeros((4, 3, 8, 8), np.float32), "out holds 4 patches, 5 are needed"),
        (np.zeros((5, 3, 8, 8), np.float64), "float32 or float16"),
        (np.zeros((5, 3, 8, 8), ">f4"), "float32 or float16"),
        (np.zeros((5, 3, 9, 8), np.float32), r"shape \(N, 3, 8, 8\)"),
        (np.zeros((5, 8, 8, 3), np.float32), r"shape \(N, 3, 8, 8\)"),
        (np.zeros((5, 3, 8, 16), np.float32)[..., ::2], "C-contiguous"),
    ]:
        with pytest.raises(ValueError, match=message):
            tile_images(images, (1, 2), preprocess, out=out)
    readonly = np.zeros((5, 3, 8, 8), np.float32)
    readonly.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        tile_images(images, (1, 2), preprocess, out=readonly)
    with pytest.raises(ValueError, match="dtype"):
        tile_images(images, (1, 2), preprocess, dtype=np.int32)


def test_core_rejects_bad_arguments():
    out = np.zeros((1, 3, 8, 8), np.float32)
    img = [random_image(10, 10)]
    # Every error of the core is a CoreError (a ValueError) with the C++ message; arrays are never converted.
    with pytest.raises(CoreError, match=re.escape("out: expected a writeable C-contiguous float32 or float16 array of "
                                                  "shape (N, 3, 8, 8), got a float64 array of shape (1, 3, 8, 8)")):
        _core.tile_images(img, [1], 8, [0, 0, 0], [1, 1, 1], "bicubic", 0.0, out.astype(np.float64), 1)
    with pytest.raises(CoreError, match=re.escape("images[0]: expected a uint8 array of shape (H, W, 3) (any "
                                                  "strides), got an int64 array of shape (10, 10, 3)")):
        _core.tile_images([img[0].astype(np.int64)], [1], 8, [0, 0, 0], [1, 1, 1], "bicubic", 0.0, out, 1)
    with pytest.raises(CoreError, match="smaller than"):
        _core.patch_boxes(3, 3, [1, 4])
    with pytest.raises(ValueError, match="interpolation"):
        _core.tile_images(img, [1], 8, [0, 0, 0], [1, 1, 1], "nearest", 0.0, out, 1)
    with pytest.raises(ValueError, match="std"):
        _core.tile_images(img, [1], 8, [0, 0, 0], [1, 0, 1], "bicubic", 0.0, out, 1)
    with pytest.raises(ValueError, match="grid"):
        _core.tile_images(img, [0], 8, [0, 0, 0], [1, 1, 1], "bicubic", 0.0, out, 1)
