"""Cells encoded at about their own size ("fit") and the backbone precision, recorded with an index.

The encoder's fit path is checked against a reference made of the obviously-right pieces: Pillow's crop + resize
of each box (tiling.pillow_reference_patch) at the size `cell_input_sizes` gives, then the backbone."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import ResizableThumbnailBackbone, ThumbnailBackbone
from PIL import Image

from patchify import Patchify
from patchify.config import MIN_FIT_INPUT_SIZE, TilingConfig
from patchify.encoder import Encoder
from patchify.records import AddReport
from patchify.tiling import cell_input_sizes, patch_boxes, pillow_reference_patch


def test_fit_sizes_follow_the_cells_pixels() -> None:
    fit = TilingConfig(grids=(1, 2, 3, 4), cell_sizing="fit", min_input_size=112)
    # A 348 px GroceryStore photo: whole image capped at 224; 174 px cells -> 168; 116 -> 112; 87 -> the floor.
    assert cell_input_sizes(348, 348, fit.grids, fit, 224, 14) == (224, 168, 112, 112)
    # A 640 x 480 photo: cells of 320 x 240 (geometric mean 277) are capped; 4x4 cells (160 x 120: 139) -> 140.
    assert cell_input_sizes(480, 640, fit.grids, fit, 224, 14) == (224, 224, 182, 140)
    # The floor is rounded up to a multiple of the patch size; overlap grows the cells.
    assert cell_input_sizes(348, 348, (4,), dataclasses.replace(fit, min_input_size=100), 224, 14) == (112,)
    assert cell_input_sizes(348, 348, (4,), dataclasses.replace(fit, min_input_size=20), 224, 14) == (84,)
    overlapping = dataclasses.replace(fit, min_input_size=20, overlap=0.25)
    assert cell_input_sizes(348, 348, (4,), overlapping, 224, 14) == (126,)
    fixed = dataclasses.replace(fit, cell_sizing="fixed")
    assert cell_input_sizes(348, 348, fixed.grids, fixed, 224, 14) == (224, 224, 224, 224)
    with pytest.raises(ValueError, match="patch size"):
        cell_input_sizes(348, 348, fit.grids, fit, 224, None)


def test_tiling_settings_are_checked_and_round_trip() -> None:
    with pytest.raises(ValueError, match="cell_sizing must be one of fit, fixed"):
        TilingConfig(cell_sizing="adaptive")
    with pytest.raises(ValueError, match="min_input_size"):
        TilingConfig(min_input_size=0)
    config = TilingConfig(grids=(1, 2), cell_sizing="fit", min_input_size=140)
    assert TilingConfig.from_dict(config.to_dict()) == config
    # Indexes saved before cell sizing existed resized every cell to the input size.
    assert TilingConfig.from_dict({"grids": [1, 2], "overlap": 0.0, "input_size": None}).cell_sizing == "fixed"


def test_fit_encoding_equals_pillow_reference(photos: list[Path]) -> None:
    backbone = ResizableThumbnailBackbone(input_size=256)
    tiling = TilingConfig(grids=(1, 2, 3), cell_sizing="fit", min_input_size=16)
    encoder = Encoder(backbone, tiling)
    sources = [photos[0], photos[5], photos[11]]
    batches = list(encoder.encode_images(sources, AddReport()))
    vectors = np.concatenate([b.vectors for b in batches])
    patches = [b.patches for b in batches]
    row = 0
    for source, table in zip(sources, (p for b in batches for p in _per_image(b))):
        pixels = np.asarray(Image.open(source).convert("RGB"))
        boxes, grid, cell = patch_boxes(pixels.shape[0], pixels.shape[1], tiling.grids)
        np.testing.assert_array_equal(table.box, boxes)  # the patch order of tiling.patch_boxes
        np.testing.assert_array_equal(table.grid, grid)
        sizes = cell_input_sizes(pixels.shape[0], pixels.shape[1], tiling.grids, tiling, 256, 8)
        assert len(set(sizes)) > 1  # the photo really exercises several sizes
        for box, g in zip(boxes, grid):
            size = sizes[list(tiling.grids).index(int(g))]
            preprocess = dataclasses.replace(backbone.preprocess, input_size=size)
            reference = backbone.encode(pillow_reference_patch(pixels, box, preprocess)[None])[0]
            # Pillow and the C++ tiler agree to float rounding (tests/test_tiler.py), so do the thumbnails.
            np.testing.assert_allclose(vectors[row], reference, atol=2e-5)
            row += 1
    assert row == len(vectors) and len(patches) >= 1
    assert max(backbone.sizes) <= 256 and min(backbone.sizes) >= 16


def _per_image(batch):
    for i in range(len(batch.images)):
        yield batch.patches.select(batch.patches.image == i)


def test_fit_falls_back_to_fixed_cells_on_a_fixed_size_backbone(photos: list[Path]) -> None:
    engine = Patchify(ThumbnailBackbone(), level=1, cell_sizing="fit")
    assert engine.tiling.cell_sizing == "fixed"  # recorded as what was done


def test_index_records_its_encoding_and_reloads_it(tmp_path: Path, photos: list[Path]) -> None:
    backbone = ResizableThumbnailBackbone(input_size=64)
    engine = Patchify(backbone, level=2, cell_sizing="fit")
    engine.add_images(photos[:4])
    assert engine.tiling.cell_sizing == "fit" and engine.tiling.min_input_size == MIN_FIT_INPUT_SIZE
    engine.save(tmp_path / "index")
    manifest = json.loads((tmp_path / "index" / "manifest.json").read_text())
    assert manifest["tiling"]["cell_sizing"] == "fit"
    loaded = Patchify.load(tmp_path / "index", backbone=ResizableThumbnailBackbone(input_size=64))
    assert loaded.tiling == engine.tiling
    hits = loaded.search(photos[2], k=1)
    assert hits[0].image_id == 2


def test_engine_refuses_cell_sizing_with_a_tiling() -> None:
    with pytest.raises(ValueError, match="not both"):
        Patchify(ThumbnailBackbone(), tiling=TilingConfig(), cell_sizing="fixed")


def test_embedding_cache_keeps_modes_apart(tmp_path: Path, photos: list[Path]) -> None:
    backbone = ResizableThumbnailBackbone(input_size=256)
    fit = Encoder(backbone, TilingConfig(grids=(1, 3), cell_sizing="fit", min_input_size=16), embedding_cache=tmp_path)
    fixed = Encoder(backbone, TilingConfig(grids=(1, 3), cell_sizing="fixed"), embedding_cache=tmp_path)
    (first,) = fit.encode_images([photos[0]], AddReport())
    (other,) = fixed.encode_images([photos[0]], AddReport())
    assert first.from_cache == 0 and other.from_cache == 0  # not served the other mode's vectors
    assert not np.allclose(first.vectors[1:], other.vectors[1:])
    (again,) = fit.encode_images([photos[0]], AddReport())
    assert again.from_cache == 1
    np.testing.assert_array_equal(again.vectors, first.vectors)
