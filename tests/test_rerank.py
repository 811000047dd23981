"""Two-stage IVFPQ search: the re-rank store against faiss's scalar quantiser and numpy, the second stage against
exact search, and the store saved, memory-mapped, added to and removed from."""
from __future__ import annotations

import numpy as np
import pytest

from patchify.config import default_rerank_shortlist
from patchify.index.flat import numpy_reference_search
from patchify.index.ivfpq import IVFPQIndex
from patchify.errors import CoreError
from patchify.index.rerank import GlobalFusion, ImagePatches, RerankStore

DIM, M = 32, 8


def clustered(n_images: int, per_image: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Images whose patches share a centre: what makes the max over patches meaningful."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_images, DIM)).astype(np.float32)
    x = np.repeat(centres, per_image, axis=0) + 0.7 * rng.standard_normal((n_images * per_image, DIM))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    return x, np.repeat(np.arange(n_images), per_image)


def trained(rerank: str | None, **settings) -> tuple[IVFPQIndex, np.ndarray, np.ndarray]:
    x, images = clustered(2000)
    index = IVFPQIndex(DIM, nlist=16, m=M, nbits=4, nprobe=16, rerank=rerank, **settings)
    index.train(x)
    index.add(x, np.arange(len(x)), images)
    return index, x, images


def queries(x: np.ndarray, n: int = 20, seed: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q = x[rng.integers(0, len(x), n)] + 0.3 * rng.standard_normal((n, DIM)).astype(np.float32)
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def test_int8_rows_equal_faiss_scalar_quantizer_and_float16_equals_numpy():
    faiss = pytest.importorskip("faiss")
    x, _ = clustered(100)
    store = RerankStore(DIM, "int8")
    store.train(x)
    store.add(x, np.arange(len(x)))
    sq = faiss.ScalarQuantizer(DIM, faiss.ScalarQuantizer.QT_8bit)
    sq.train(x)
    np.testing.assert_array_equal(store.rows(np.arange(10, 20)), sq.decode(sq.compute_codes(x[10:20])))
    assert np.abs(store.rows(np.arange(len(x))) - x).max() < 0.02
    half = RerankStore(DIM, "float16")
    half.add(x, np.arange(len(x)))
    np.testing.assert_array_equal(half.rows(np.array([5, 3])), x[[5, 3]].astype(np.float16).astype(np.float32))
    assert half.code_size == 2 * DIM and store.code_size == DIM


@pytest.mark.parametrize("codec", ["float16", "int8"])
def test_scorer_is_the_max_over_each_images_patches_of_the_decoded_rows(codec):
    x, images = clustered(50)
    store = RerankStore(DIM, codec)
    store.train(x)
    store.add(x, np.arange(len(x)))
    q = queries(x, 3)
    candidates = np.array([[7, 2, 31], [0, -1, 49], [5, 5, 6]])
    best, winners = store.max_over_images(q, candidates, ImagePatches(images.astype(np.int32), 50))
    decoded = store.rows(np.arange(len(x)))  # numpy reference: decode every row, then the inner products
    for qi in range(3):
        exact = decoded @ q[qi]
        for j, image in enumerate(candidates[qi]):
            if image < 0:
                assert best[qi, j] == -np.inf and winners[qi, j] == -1
                continue
            rows = np.flatnonzero(images == image)
            assert best[qi, j] == pytest.approx(exact[rows].max(), abs=1e-5)
            assert exact[winners[qi, j]] == pytest.approx(exact[rows].max(), abs=1e-5)
            assert images[winners[qi, j]] == image


@pytest.mark.parametrize("codec", ["float16", "int8"])
def test_top_over_images_is_max_over_images_sorted_in_numpy(codec):
    """The C++ selection against numpy's stable argsort of max_over_images (what the two-stage search did before):
    same order, ties (an image listed twice) in candidate order, first-stage scores carried, blanks last."""
    x, images = clustered(50)
    store = RerankStore(DIM, codec)
    store.train(x)
    store.add(x, np.arange(len(x)))
    q = queries(x, 3)
    patches = ImagePatches(images.astype(np.int32), 50)
    candidates = np.array([[7, 2, 31, 2, 9], [0, -1, 49, -1, 3], [5, 5, 6, 40, 5]])
    first = np.arange(15, dtype=np.float32).reshape(3, 5) + 100
    best, winners = store.max_over_images(q, candidates, patches)
    for k in (0, 1, 3, 5):
        order = np.argsort(-best, axis=1, kind="stable")[:, :k]
        found = np.isfinite(np.take_along_axis(best, order, axis=1))
        got = store.top_over_images(q, candidates, first, k, patches)
        expected = (np.where(found, np.take_along_axis(first, order, axis=1), -np.inf),
                    np.take_along_axis(best, order, axis=1),
                    np.where(found, np.take_along_axis(candidates, order, axis=1), -1),
                    np.where(found, np.take_along_axis(winners, order, axis=1), -1))
        for g, e in zip(got, expected):
            assert g.shape == (3, k)
            np.testing.assert_array_equal(g, e)
    # fused with each image's whole-image row (the numpy fusion the engine did before it moved into C++)
    whole = np.array([np.flatnonzero(images == i)[0] if i % 4 else -1 for i in range(50)])
    fusion = GlobalFusion(whole, 0.25)
    has = candidates >= 0
    whole_ids = np.where(has, whole[np.where(has, candidates, 0)], -1)
    fused = best.copy()
    rows, cols = np.nonzero(whole_ids >= 0)
    g = np.einsum("nd,nd->n", store.rows(whole_ids[rows, cols]), q[rows])
    fused[rows, cols] = 0.25 * g + 0.75 * best[rows, cols]
    order = np.argsort(-fused, axis=1, kind="stable")
    got_first, got_scores, got_images, got_patches = store.top_over_images(q, candidates, first, 5, patches,
                                                                           fusion=fusion)
    np.testing.assert_allclose(got_scores, np.take_along_axis(fused, order, axis=1), atol=1e-5)
    np.testing.assert_array_equal(got_images, np.where(has, candidates, -1)[np.arange(3)[:, None], order])
    np.testing.assert_array_equal(got_patches, np.take_along_axis(winners, order, axis=1))
    np.testing.assert_array_equal(got_first, np.where(has, first, -np.inf)[np.arange(3)[:, None], order])
    assert not np.array_equal(got_scores, store.top_over_images(q, candidates, first, 5, patches)[1])
    with pytest.raises(ValueError, match="global_weight"):
        store.top_over_images(q, candidates, first, 5, patches, fusion=GlobalFusion(whole, 1.5))
    with pytest.raises(CoreError, match="whole_patch entries"):
        store.top_over_images(q, candidates, first, 5, patches, fusion=GlobalFusion(whole[:10], 0.25))
    with pytest.raises(ValueError, match="k: expected 0 <= k <= 5"):
        store.top_over_images(q, candidates, first, 6, patches)
    with pytest.raises(ValueError, match="candidate_scores"):
        store.top_over_images(q, candidates, first[:, :4], 2, patches)


@pytest.mark.parametrize("codec", ["float16", "int8"])
def test_second_stage_over_every_image_equals_exact_search(codec):
    index, x, images = trained(codec, rerank_shortlist=2000)  # the shortlist is every image: no first-stage loss
    q = queries(x)
    scores, ids, patches = index.search(q, 10)
    ref_scores, ref_ids, _ = numpy_reference_search(x, images, q, 10)
    tolerance = 1e-3 if codec == "float16" else 2e-2
    np.testing.assert_allclose(scores, ref_scores, atol=tolerance)
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, ref_ids)])  # int8 may swap near-ties
    assert overlap >= (0.99 if codec == "float16" else 0.95)
    assert (images[patches] == ids).all()


def test_two_stage_recovers_what_pq_alone_loses():
    one, x, images = trained(None)
    two, _, _ = trained("float16")
    q = queries(x, 50)
    _, exact, _ = numpy_reference_search(x, images, q, 10)
    recall = lambda ids: np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, exact)])  # noqa: E731
    one_recall, two_recall = recall(one.search(q, 10)[1]), recall(two.search(q, 10)[1])
    assert two_recall > one_recall + 0.3 and two_recall > 0.75  # 4-bit PQ on 32-d: the first stage is coarse
    # 4-bit codes look twice as deep as 8-bit ones by default (10 x k, at least 100); a setting overrides both.
    assert two.nbits == 4 and two.shortlist(10) == 200 and two.shortlist(50) == 1000
    assert default_rerank_shortlist(10, 8) == 100 and default_rerank_shortlist(50, 8) == 500
    two.rerank_shortlist = 30
    assert two.shortlist(10) == 30 and two.shortlist(50) == 50 and two.config.rerank == "float16"


@pytest.mark.parametrize("storage", ["ram", "mmap"])
def test_store_saves_loads_memory_maps_and_takes_more_patches(tmp_path, storage):
    index, x, images = trained("int8", rerank_storage=storage)
    q = queries(x)
    before = index.search(q, 10)
    index.save(tmp_path / "a")
    loaded = IVFPQIndex.load(tmp_path / "a")
    assert loaded.rerank_store.memory_mapped == (storage == "mmap")
    for a, b in zip(before, loaded.search(q, 10)):
        np.testing.assert_array_equal(a, b)
    more, more_images = clustered(30, seed=9)
    loaded.add(more, np.arange(len(x), len(x) + len(more)), more_images + 2000)
    hits = loaded.search(more[:1], 1)
    assert hits[1][0, 0] == 2000 and hits[2][0, 0] == len(x)
    if storage == "mmap":
        assert loaded.rerank_store.ram_bytes() < index.rerank_store.ram_bytes()
    loaded.save(tmp_path / "b")  # memory-mapped rows + the RAM tail, written together
    again = IVFPQIndex.load(tmp_path / "b")
    assert again.rerank_store.n_rows == len(x) + len(more)
    np.testing.assert_array_equal(again.search(q, 10)[1], loaded.search(q, 10)[1])


def test_removed_images_leave_both_stages():
    index, x, images = trained("float16")
    q = x[images == 5][:1]
    assert index.search(q, 1)[1][0, 0] == 5
    index.remove_images(np.array([5]))
    assert 5 not in index.search(q, 50)[1][0]
    with pytest.raises(ValueError, match="rerank"):
        IVFPQIndex(DIM, m=M, rerank="int4")


def test_image_patches_extended_by_new_images_equals_a_rebuild():
    _, images = clustered(30)
    patch_image = images.astype(np.int32)
    built = ImagePatches(patch_image[:60], 10)  # images 0..9
    more_ids = np.arange(60, 180)[::-1].copy()  # out of order on purpose
    extended = built.extended(more_ids, images[60:180][::-1].copy(), 30)
    full = ImagePatches(patch_image, 30)
    np.testing.assert_array_equal(extended.starts, full.starts)
    for image in range(30):
        a, b = extended.starts[image], extended.starts[image + 1]
        assert sorted(extended.patch_ids[a:b]) == sorted(full.patch_ids[a:b])


def test_adds_between_searches_keep_the_second_stage_right():
    index, x, images = trained("float16")
    q = queries(x, 5)
    index.search(q, 5)  # builds image -> patches
    more, more_images = clustered(20, seed=4)
    index.add(more, np.arange(len(x), len(x) + len(more)), more_images + 2000)  # extended, not rebuilt
    all_x, all_images = np.concatenate([x, more]), np.concatenate([images, more_images + 2000])
    index.rerank_shortlist = 2020  # every image: the second stage alone decides
    scores, ids, _ = index.search(q, 10)
    ref_scores, ref_ids, _ = numpy_reference_search(all_x, all_images, q, 10)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-3)
    index.remove_images(np.array([int(ids[0, 0])]))
    assert int(ids[0, 0]) not in index.search(q, 10)[1][0]


def test_the_binding_checks_every_array_and_id():
    from patchify import _core

    rows = np.zeros((10, DIM), np.uint8)
    empty = np.zeros((0, DIM), np.uint8)
    ranges = np.zeros(6, np.float32)
    vmin, vdiff = np.zeros(DIM, np.float32), np.ones(DIM, np.float32)
    starts, patch_ids = np.array([0, 5, 10]), np.arange(10)
    q = np.ones((1, DIM), np.float32)
    best, winner = _core.rerank_max("int8", rows, empty, vmin, vdiff, starts, patch_ids, q, np.array([[1, -1]]))
    assert winner[0, 0] in range(5, 10) and winner[0, 1] == -1 and best[0, 1] == -np.inf
    bad = [
        ("codec", dict(codec="int4")),
        ("candidate image id 2 >= 2 images", dict(candidates=np.array([[2]]))),
        ("no stored row", dict(patch_ids=np.array([0, 1, 2, 3, 4, 50, 6, 7, 8, 9]))),
        ("vmin", dict(vmin=ranges)),
        ("queries", dict(queries=np.ones((1, DIM), np.float64))),
        ("base", dict(base=np.zeros((10, DIM + 1), np.uint8))),
        ("not offsets", dict(starts=np.array([0, 7, 3]))),
    ]
    for message, change in bad:
        args = dict(codec="int8", base=rows, tail=empty, vmin=vmin, vdiff=vdiff, starts=starts,
                    patch_ids=patch_ids, queries=q, candidates=np.array([[0, 1]]))
        args.update(change)
        with pytest.raises(CoreError, match=message):
            _core.rerank_max(**args)
