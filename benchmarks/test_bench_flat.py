"""pytest-benchmark for the flat index (small: 5k images x 14 patches x 384-d, so it runs in seconds).

    PYTHONPATH=python python -m pytest benchmarks/test_bench_flat.py --benchmark-enable

The full-size comparison with numpy, faiss and the memory-bandwidth bound is benchmarks/bench_flat.py.
"""
from __future__ import annotations

import numpy as np
import pytest

from patchify.index.flat import FlatIndex, numpy_reference_search

N_IMAGES, PATCHES, DIM, K = 5_000, 14, 384, 10


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((N_IMAGES * PATCHES, DIM), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    queries = rng.standard_normal((64, DIM), dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    image_ids = np.repeat(np.arange(N_IMAGES, dtype=np.int64), PATCHES)
    return vectors, np.arange(len(vectors), dtype=np.int64), image_ids, queries


@pytest.fixture(scope="module", params=["float32", "float16"])
def index(request, data):
    vectors, patch_ids, image_ids, _ = data
    index = FlatIndex(DIM, dtype=request.param)
    index.add(vectors, patch_ids, image_ids)
    return index


@pytest.mark.parametrize("batch", [1, 64])
def test_flat_search(benchmark, index, data, batch):
    queries = data[3][:batch]
    scores, images, _ = benchmark(index.search, queries, K)
    assert images.shape == (batch, K) and (images >= 0).all()


def test_numpy_reference_batch1(benchmark, data):
    vectors, patch_ids, image_ids, queries = data
    benchmark(numpy_reference_search, vectors, image_ids, queries[:1], K, patch_ids)
