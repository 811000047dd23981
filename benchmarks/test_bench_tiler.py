"""pytest-benchmark timings of the tiler (small: 4 photos, L2 = 14 patches each, 224x224 bicubic).

    PYTHONPATH=python python -m pytest benchmarks/test_bench_tiler.py --benchmark-enable

(benchmarks are disabled by default in pyproject's addopts; without --benchmark-enable each runs once, as a test.)
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from patchify.images import load_rgb
from patchify.preprocess import Preprocess
from patchify.tiling import grid_sizes, patches_per_image, pillow_reference_patch, tile_images

PHOTOS = sorted((Path(__file__).resolve().parents[1] / "data" / "photos").glob("*"))[:4]
PREPROCESS = Preprocess(input_size=224, interpolation="bicubic")
GRIDS = grid_sizes(2)


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    return [load_rgb(p) for p in PHOTOS]


@pytest.mark.parametrize("threads", [1, 2])
def test_tiler(benchmark, images, threads):
    out = np.empty((len(images) * patches_per_image(GRIDS), 3, 224, 224), np.float32)
    batch = benchmark(tile_images, images, GRIDS, PREPROCESS, out=out, num_threads=threads)
    assert len(batch) == len(out)


def test_pillow_reference(benchmark, images):
    pil_images = [Image.fromarray(img) for img in images]
    boxes = tile_images(images, GRIDS, PREPROCESS).boxes
    per_image = patches_per_image(GRIDS)

    def reference() -> list[np.ndarray]:
        return [pillow_reference_patch(pil_images[k // per_image], box, PREPROCESS) for k, box in enumerate(boxes)]

    assert len(benchmark(reference)) == len(boxes)
