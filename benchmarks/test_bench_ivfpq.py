"""pytest-benchmark view of the fused IVFPQ scanner (small synthetic collection, seconds to run):

    PYTHONPATH=python python -m pytest benchmarks/test_bench_ivfpq.py --benchmark-enable

Compares, at equal nprobe: the fused scanner (top-10 images), faiss's own IVFPQ search for 10 patches (a), and
faiss with a patch-level k' followed by a numpy group-by (b). Without --benchmark-enable (the project default)
each runs once as a smoke test. The full-size benchmark is benchmarks/bench_ivfpq.py.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from bench_ivfpq import group_top_images, make_queries, synthetic  # noqa: E402

from patchify.index.ivfpq import IVFPQIndex  # noqa: E402

IMAGES, PER_IMAGE, DIM, NLIST, M, NPROBE, K, K_PRIME = 2000, 14, 64, 128, 16, 8, 10, 256


@pytest.fixture(scope="module")
def setup():
    x = synthetic(IMAGES, PER_IMAGE, DIM, seed=0)
    images = np.repeat(np.arange(IMAGES), PER_IMAGE)
    index = IVFPQIndex(DIM, nlist=NLIST, m=M, nprobe=NPROBE, num_threads=1, train_iterations=3)
    index.train(x[:: 2])
    index.add(x, np.arange(len(x)), images)
    queries = make_queries(x, 64, seed=0)
    index.search(queries[:1], K)  # list views built once, as after any add
    ivf = index.faiss_index
    ivf.nprobe = NPROBE
    return index, ivf, queries


def test_fused_single_query(benchmark, setup):
    index, _, q = setup
    scores, images, _ = benchmark(index.search, q[:1], K)
    assert images.shape == (1, K) and scores[0, 0] >= scores[0, -1]


def test_faiss_k10_single_query(benchmark, setup):
    _, ivf, q = setup
    benchmark(ivf.search, q[:1], K)


def test_faiss_kprime_group_single_query(benchmark, setup):
    index, ivf, q = setup
    patch_map = index.patch_image_map().astype(np.int64)

    def run():
        D, I = ivf.search(q[:1], K_PRIME)
        return group_top_images(D, I, patch_map, K)

    benchmark(run)


def test_fused_batch64(benchmark, setup):
    index, _, q = setup
    _, images, _ = benchmark(index.search, q, K)
    assert images.shape == (64, K)


def test_faiss_k10_batch64(benchmark, setup):
    _, ivf, q = setup
    benchmark(ivf.search, q, K)
