"""FlatIndex (exact max-over-patches search in C++) against the numpy definition, plus its contract: add/remove,
validation, save/load, both storage dtypes and both kernels."""
from __future__ import annotations

import re

import numpy as np
import pytest

from patchify.errors import CoreError, PatchifyError
from patchify.index.base import PatchIndex
from patchify.index.flat import FlatIndex, numpy_reference_search
from patchify.errors import IndexFormatError

KERNELS = ["avx2", "generic"]


def _unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    v = rng.standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _database(rng: np.random.Generator, n_images: int, dim: int, max_patches: int = 14):
    """Images with varying patch counts; image ids and patch ids deliberately not equal to row numbers."""
    counts = rng.integers(1, max_patches + 1, n_images)
    image_ids = np.repeat(rng.permutation(10 * n_images)[:n_images] + 5, counts).astype(np.int64)
    n = int(counts.sum())
    patch_ids = (rng.permutation(n) * 3 + 7).astype(np.int64)
    return _unit(rng, n, dim), patch_ids, image_ids


def _make(dim: int, dtype: str, kernel: str, threads: int = 2) -> FlatIndex:
    index = FlatIndex(dim, dtype=dtype, num_threads=threads)
    if kernel == "avx2" and index.kernel != "avx2":
        pytest.skip("CPU lacks AVX2/FMA/F16C")
    index.kernel = kernel
    return index


def _stored(vectors: np.ndarray, dtype: str) -> np.ndarray:
    return vectors.astype(np.float16).astype(np.float32) if dtype == "float16" else vectors


def _assert_same(got, expected, atol=2e-6):
    """Equal to the reference; where two images' scores are within rounding, their order may differ."""
    gs, gi, gp = got
    es, ei, ep = expected
    np.testing.assert_allclose(gs, es, atol=atol, rtol=0)
    for q in range(len(gs)):
        for j in range(gs.shape[1]):
            if gi[q, j] != ei[q, j]:
                near = np.abs(es[q] - es[q, j]) <= 2 * atol
                assert gi[q, j] in ei[q][near] or (es[q, j] == -np.inf), (q, j)
            else:
                assert gp[q, j] == ep[q, j] or abs(gs[q, j] - es[q, j]) <= atol, (q, j)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dim,nq,threads", [(384, 1, 2), (384, 9, 2), (50, 5, 1), (3, 70, 3)])
def test_matches_numpy_reference(dtype, kernel, dim, nq, threads):
    rng = np.random.default_rng(dim * 100 + nq)
    vectors, patch_ids, image_ids = _database(rng, 700, dim)
    index = _make(dim, dtype, kernel, threads)
    index.add(vectors, patch_ids, image_ids)
    queries = _unit(rng, nq, dim)
    got = index.search(queries, 25)
    expected = numpy_reference_search(_stored(vectors, dtype), image_ids, queries, 25, patch_ids=patch_ids)
    _assert_same(got, expected)
    assert got[0].dtype == np.float32 and got[1].dtype == np.int64 and got[2].dtype == np.int64


@pytest.mark.parametrize("kernel", KERNELS)
def test_ties_smaller_image_then_smaller_patch(kernel):
    dim = 16
    base = _unit(np.random.default_rng(1), 3, dim)
    # Images 9, 4, 6 hold the same best vector (tie on score); within image 4, patches 30 and 12 tie.
    vectors = np.stack([base[1], base[0], base[2], base[0], base[0], base[0], base[1]])
    image_ids = np.array([9, 9, 6, 6, 4, 4, 4])
    patch_ids = np.array([1, 2, 3, 5, 30, 12, 40])
    index = _make(dim, "float32", kernel)
    index.add(vectors, patch_ids, image_ids)
    scores, images, patches = index.search(base[0], 3)
    assert images.tolist() == [[4, 6, 9]]
    assert patches.tolist() == [[12, 5, 2]]
    np.testing.assert_allclose(scores, 1.0, atol=1e-6)
    expected = numpy_reference_search(vectors, image_ids, base[0], 3, patch_ids=patch_ids)
    assert expected[1].tolist() == [[4, 6, 9]] and expected[2].tolist() == [[12, 5, 2]]


def test_protocol_and_basic_properties():
    index = FlatIndex(8)
    assert isinstance(index, PatchIndex)
    assert index.kind == "flat" and index.dim == 8 and index.is_trained and index.ntotal == 0
    index.train(np.zeros((3, 8), np.float32))  # no-op
    scores, images, patches = index.search(np.ones(8, np.float32), 4)  # empty index: no columns
    assert scores.shape == images.shape == patches.shape == (1, 0)


def test_results_are_as_wide_as_the_images_when_k_is_larger():
    rng = np.random.default_rng(2)
    index = FlatIndex(32)
    index.add(_unit(rng, 5, 32), np.arange(5), np.array([0, 0, 1, 1, 2]))
    for k in (5, 2**40, 10**20):  # memory follows the number of images, never k alone
        scores, images, patches = index.search(_unit(rng, 2, 32), k)
        assert scores.shape == images.shape == patches.shape == (2, 3)
        assert sorted(images[0].tolist()) == [0, 1, 2] and np.isfinite(scores).all()
    for bad in ("5", None, 2.5, 0):
        with pytest.raises(ValueError, match="k must be"):
            index.search(_unit(rng, 1, 32), bad)
    assert scores.dtype == np.float32 and images.dtype == patches.dtype == np.int64


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_add_in_pieces_and_remove(dtype):
    rng = np.random.default_rng(3)
    vectors, patch_ids, image_ids = _database(rng, 300, 24)
    index = FlatIndex(24, dtype=dtype)
    # Three batches that split images across calls and interleave them: the index must regroup.
    perm = rng.permutation(len(vectors))
    for part in np.array_split(perm, 3):
        index.add(vectors[part], patch_ids[part], image_ids[part])
    assert index.ntotal == len(vectors) and index.n_images == 300
    queries = _unit(rng, 4, 24)
    stored = _stored(vectors, dtype)
    _assert_same(index.search(queries, 50), numpy_reference_search(stored, image_ids, queries, 50, patch_ids=patch_ids))

    doomed = np.unique(image_ids)[::3]
    removed = index.remove_images(np.append(doomed, 10**9))  # unknown ids are ignored
    keep = ~np.isin(image_ids, doomed)
    assert removed == int((~keep).sum()) and index.ntotal == int(keep.sum())
    got = index.search(queries, 50)
    assert not np.isin(got[1], doomed).any()
    _assert_same(got, numpy_reference_search(stored[keep], image_ids[keep], queries, 50, patch_ids=patch_ids[keep]))
    assert index.remove_images(doomed) == 0
    assert index.remove_images(np.unique(image_ids)) == int(keep.sum()) and index.ntotal == 0


def test_float16_storage_rounds_like_numpy_and_halves_memory():
    rng = np.random.default_rng(4)
    vectors = _unit(rng, 200, 64)
    vectors[0, :6] = [1e-7, -3e-6, 6.1e-5, 65504.0, 0.33325195, -0.0]  # subnormal, tiny, max, tie cases
    vectors[1, :4] = [2049.0, 2051.0, 1.0 + 2**-11, 1.0 + 3 * 2**-11]  # exact round-to-nearest-even ties
    for kernel in KERNELS:
        index = _make(64, "float16", kernel)
        index.add(vectors, np.arange(200), np.arange(200))
        stored = index._core.vectors_view()
        assert stored.dtype == np.float16
        np.testing.assert_array_equal(stored.view(np.uint16), vectors.astype(np.float16).view(np.uint16))
    f32 = FlatIndex(64)
    f32.add(vectors, np.arange(200), np.arange(200))
    assert index.nbytes() < 0.7 * f32.nbytes()
    assert f32.nbytes() >= vectors.nbytes


def test_float16_input_into_float16_index_is_taken_as_is():
    rng = np.random.default_rng(5)
    half = _unit(rng, 30, 16).astype(np.float16)
    index = FlatIndex(16, dtype="float16")
    index.add(half, np.arange(30), np.arange(30) // 3)
    np.testing.assert_array_equal(index._core.vectors_view(), half)


def test_validation_errors():
    index = FlatIndex(8)
    good = np.ones((2, 8), np.float32)
    ids = np.arange(2)
    with pytest.raises(ValueError, match="dimension 7"):
        index.add(np.ones((2, 7), np.float32), ids, ids)
    with pytest.raises(ValueError, match="2-D"):
        index.add(np.ones(8, np.float32), ids[:1], ids[:1])
    with pytest.raises(ValueError, match="float array"):
        index.add(np.ones((2, 8), np.int32), ids, ids)
    with pytest.raises(ValueError, match="NaN"):
        index.add(np.where(np.eye(2, 8) > 0, np.nan, 0.0), ids, ids)
    with pytest.raises(ValueError, match="one per vector"):
        index.add(good, ids[:1], ids)
    with pytest.raises(ValueError, match="integers"):
        index.add(good, ids.astype(float), ids)
    with pytest.raises(ValueError, match=">= 0"):
        index.add(good, ids, -ids - 1)
    assert index.ntotal == 0  # nothing was half-added
    index.add(good, ids, ids)
    with pytest.raises(ValueError, match="k must be >= 1"):
        index.search(good, 0)
    with pytest.raises(ValueError, match="integer"):
        index.search(good, 2.5)
    with pytest.raises(ValueError, match="dimension 9"):
        index.search(np.ones((1, 9), np.float32), 1)
    with pytest.raises(ValueError, match="query 1 contains NaN"):
        index.search(np.stack([good[0], np.full(8, np.nan)]), 1)
    with pytest.raises(ValueError, match="float array"):
        index.search(np.ones((1, 8), np.int64), 1)
    with pytest.raises(ValueError, match="dtype"):
        FlatIndex(8, dtype="int8")
    with pytest.raises(ValueError, match="dim"):
        FlatIndex(0)
    with pytest.raises(ValueError, match="float16 range"):
        FlatIndex(8, dtype="float16").add(good * 1e5, ids, ids)


def test_core_rejects_what_it_would_have_to_copy():
    """The binding never converts: each mismatch is a CoreError (a ValueError) naming the argument, what was expected
    and what was given."""
    core = FlatIndex(8)._core
    ids = np.arange(4, dtype=np.int64)
    with pytest.raises(CoreError, match=re.escape("vectors: expected a C-contiguous float32 or float16 array of shape "
                                                  "(n, 8), got a non-C-contiguous float32 array of shape (4, 8)")):
        core.add(np.ones((4, 16), np.float32)[:, ::2], ids, ids)
    with pytest.raises(CoreError, match=re.escape("patch_ids: expected a C-contiguous int64 array of shape (4,), got "
                                                  "an int32 array of shape (4,)")):
        core.add(np.ones((4, 8), np.float32), ids.astype(np.int32), ids)
    with pytest.raises(CoreError, match=re.escape("image_ids: expected a C-contiguous int64 array of shape (4,), got "
                                                  "an int64 array of shape (3,)")):
        core.add(np.ones((4, 8), np.float32), ids, ids[:3])
    with pytest.raises(CoreError, match=r"float32 or float16 .* got a float64 array"):
        core.add(np.ones((4, 8), np.float64), ids, ids)
    with pytest.raises(CoreError, match=r"float32 or float16 .* got a >f4 array"):  # byte order matters too
        core.add(np.ones((4, 8), ">f4"), ids, ids)
    with pytest.raises(CoreError, match="float16"):
        core.add(np.ones((4, 8), np.float16), ids, ids)  # float16 into a float32 index
    assert core.ntotal == 0
    with pytest.raises(CoreError, match=re.escape("queries: expected a C-contiguous float32 array of shape (nq, 8), "
                                                  "got a float64 array of shape (1, 8)")):
        core.search(np.ones((1, 8)), 1, 1)
    with pytest.raises(CoreError, match="k: expected an integer >= 1, got 0"):
        core.search(np.ones((1, 8), np.float32), 0, 1)
    with pytest.raises(CoreError, match=re.escape("image_ids: expected a C-contiguous int64 array of shape (n,), got "
                                                  "a float64 array of shape (2,)")):
        core.remove_images(np.zeros(2))
    with pytest.raises(CoreError, match="NaN") as raised:
        core.search(np.full((1, 8), np.nan, np.float32), 1, 1)
    assert isinstance(raised.value, ValueError) and isinstance(raised.value, PatchifyError)
    with pytest.raises(CoreError, match="kernel must be"):
        core.kernel = "sse9"


def test_huge_k_costs_no_memory():
    """search(q, k) returns (nq, min(k, n_images)) whatever k is: k = 2**62 must not allocate by k."""
    rng = np.random.default_rng(12)
    vectors = _unit(rng, 20, 16)
    queries = _unit(rng, 3, 16)
    index = FlatIndex(16)
    assert [a.shape for a in index.search(queries, 2**62)] == [(3, 0)] * 3  # empty index: no columns
    index.add(vectors, np.arange(20), np.arange(20) // 4)  # 5 images
    for huge in (index.search(queries, 2**62), index._core.search(queries, 2**62, 1)):
        assert [a.shape for a in huge] == [(3, 5)] * 3
        for a, b in zip(huge, index.search(queries, 5)):
            np.testing.assert_array_equal(a, b)
    index.remove_images(np.array([0, 1]))
    assert [a.shape for a in index.search(queries, 2**62)] == [(3, 3)] * 3


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_save_load_roundtrip(tmp_path, dtype):
    rng = np.random.default_rng(6)
    vectors, patch_ids, image_ids = _database(rng, 120, 20)
    index = FlatIndex(20, dtype=dtype)
    index.add(vectors, patch_ids, image_ids)
    index.save(tmp_path / "idx")
    assert sorted(p.name for p in (tmp_path / "idx").iterdir()) == [
        "flat_image_ids.npy", "flat_patch_ids.npy", "flat_vectors.npy"]
    loaded = FlatIndex.load(tmp_path / "idx", dim=20, num_threads=1)
    assert loaded.dtype == dtype and loaded.ntotal == index.ntotal and loaded.num_threads == 1
    queries = _unit(rng, 3, 20)
    for a, b in zip(index.search(queries, 10), loaded.search(queries, 10)):
        np.testing.assert_array_equal(a, b)


def test_load_errors(tmp_path):
    index = FlatIndex(6)
    index.add(_unit(np.random.default_rng(7), 4, 6), np.arange(4), np.arange(4))
    index.save(tmp_path)
    with pytest.raises(ValueError, match="dimension 6, expected 5"):
        FlatIndex.load(tmp_path, dim=5)
    (tmp_path / "flat_vectors.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(IndexFormatError, match="flat_vectors.npy: corrupt"):
        FlatIndex.load(tmp_path, dim=6)
    index.save(tmp_path)
    np.save(tmp_path / "flat_image_ids.npy", np.arange(3))
    with pytest.raises(IndexFormatError, match="flat_image_ids.npy"):
        FlatIndex.load(tmp_path)
    (tmp_path / "flat_patch_ids.npy").unlink()
    with pytest.raises(IndexFormatError, match="flat_patch_ids.npy: missing"):
        FlatIndex.load(tmp_path)


def test_large_batch_threads_agree():
    """Query blocks x database chunks: every thread count gives the same answer."""
    rng = np.random.default_rng(8)
    vectors, patch_ids, image_ids = _database(rng, 3000, 40)
    index = FlatIndex(40)
    index.add(vectors, patch_ids, image_ids)
    queries = _unit(rng, 130, 40)
    results = []
    for threads in (1, 2, 5):
        index.num_threads = threads
        results.append(index.search(queries, 7))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)
    _assert_same(results[0], numpy_reference_search(vectors, image_ids, queries, 7, patch_ids=patch_ids))


def test_image_continued_across_calls_and_huge_k():
    rng = np.random.default_rng(9)
    vectors = _unit(rng, 10, 12)
    image_ids = np.array([0, 0, 1, 1, 1, 1, 2, 2, 2, 3])
    whole = FlatIndex(12)
    whole.add(vectors, np.arange(10), image_ids)
    pieces = FlatIndex(12)
    for lo, hi in ((0, 3), (3, 5), (5, 10)):  # image 1 spans all three calls
        pieces.add(vectors[lo:hi], np.arange(lo, hi), image_ids[lo:hi])
    assert pieces.n_images == 4
    for a, b in zip(whole.search(vectors[:3], 4), pieces.search(vectors[:3], 4)):
        np.testing.assert_array_equal(a, b)
    scores, images, _ = pieces.search(vectors[:1], 100_000)  # k far beyond the images: as wide as the images
    assert images.shape == (1, 4) and sorted(images[0].tolist()) == [0, 1, 2, 3]
