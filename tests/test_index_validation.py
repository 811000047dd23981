"""Both index kinds reject the same bad input with the same message (the checks live in patchify.index.base),
and leave the index unchanged when they do."""
from __future__ import annotations

import numpy as np
import pytest

from patchify.index.flat import FlatIndex
from patchify.index.ivfpq import IVFPQIndex

DIM = 8


def flat_index() -> FlatIndex:
    return FlatIndex(DIM)


def ivfpq_index() -> IVFPQIndex:
    index = IVFPQIndex(DIM, nlist=2, m=2, nbits=4, nprobe=2)
    x = np.random.default_rng(0).standard_normal((index.min_training_vectors(), DIM)).astype(np.float32)
    index.train(x / np.linalg.norm(x, axis=1, keepdims=True))
    return index


@pytest.fixture(params=[flat_index, ivfpq_index], ids=["flat", "ivfpq"])
def index(request):
    index = request.param()
    x = np.eye(DIM, dtype=np.float32)[:4]
    index.add(x, np.arange(4), np.array([0, 0, 1, 1]))
    return index


GOOD = np.eye(DIM, dtype=np.float32)[4:6]


@pytest.mark.parametrize("vectors, patch_ids, image_ids, message", [
    (GOOD[0], [10], [5], "vectors must be 2-D"),
    (np.ones((2, DIM + 1), np.float32), [10, 11], [5, 5], "vectors have dimension 9, the index holds 8"),
    (GOOD.astype(np.int32), [10, 11], [5, 5], "vectors must be a float array"),
    (np.where(np.eye(2, DIM) > 0, np.nan, 0.0), [10, 11], [5, 5], "vectors: row 0 contains NaN"),
    (GOOD, [10], [5, 5], "patch_ids must be 1-D with 2 entries"),
    (GOOD, [10.0, 11.5], [5, 5], "patch_ids must be integers"),
    (GOOD, [10, 11], [5, -1], "image_ids must be >= 0"),
])
def test_add_rejects_bad_input(index, vectors, patch_ids, image_ids, message):
    before = index.ntotal
    with pytest.raises(ValueError, match=message):
        index.add(np.asarray(vectors), np.asarray(patch_ids), np.asarray(image_ids))
    assert index.ntotal == before


@pytest.mark.parametrize("queries, k, message", [
    (np.ones((2, 3), np.float32), 2, "queries have dimension 3, the index holds 8"),
    (np.ones((1, 1, DIM), np.float32), 2, "queries must be"),
    (np.array(["a"] * DIM), 2, "queries must be a float array"),
    (np.vstack([GOOD[0], np.full(DIM, np.inf)]), 2, "query 1 contains NaN or infinity"),
    (GOOD, 0, "k must be >= 1"),
    (GOOD, 2.5, "k must be an integer"),
    (GOOD, True, "k must be an integer"),
])
def test_search_rejects_bad_input(index, queries, k, message):
    with pytest.raises(ValueError, match=message):
        index.search(queries, k)


def test_remove_rejects_non_integer_ids_and_accepts_a_scalar(index):
    with pytest.raises(ValueError, match="image_ids must be integers"):
        index.remove_images(np.array([0.5]))
    assert index.remove_images(1) == 2
    assert index.ntotal == 2
