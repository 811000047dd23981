"""IVFPQIndex: the fused C++ scanner must reproduce faiss exactly - every patch score equals faiss's own distance
for that id, and the image ranking equals a numpy group-by over faiss's exhaustive patch results at the same
nprobe - after training, after later adds, after removals and after save/load."""
from __future__ import annotations

import json
import re

import numpy as np
from PIL import Image
import pytest
from conftest import clustered_patches

from patchify import _core
from patchify.errors import CoreError
from patchify.index.base import PatchIndex
from patchify.index.ivfpq import IVFPQIndex, auto_nlist
from patchify.errors import IndexFormatError

DIM, M, NLIST = 32, 8, 32
PATCHES_PER_IMAGE = 7


def clustered(n_images: int, seed: int, first_image: int = 0) -> tuple[np.ndarray, np.ndarray]:
    return clustered_patches(n_images, seed, dim=DIM, per_image=PATCHES_PER_IMAGE, themes=40, spread=0.6,
                             first_image=first_image)


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    return clustered(1500, seed=1)  # 10500 patches: enough for 39 x 256 PQ training points


@pytest.fixture(scope="module")
def trained_faiss(data):
    """A trained IndexIVFPQ shared by the tests (copied per test). faiss's PQ k-means is the slow part, so it runs
    only a few iterations here: codebook quality is irrelevant to the equality checks. IVFPQIndex.train itself
    is exercised (with small codebooks) in test_training_size_checks_and_auto_nlist."""
    import faiss

    x, _ = data
    ivf = faiss.index_factory(DIM, f"IVF{NLIST},PQ{M}x8", faiss.METRIC_INNER_PRODUCT)
    ivf.do_polysemous_training = False  # as IVFPQIndex.train does
    ivf.cp.niter = 4
    ivf.pq.cp.niter = 4
    ivf.train(x)
    return ivf


def fresh(trained, coarse: str = "native") -> IVFPQIndex:
    import faiss

    # One stage: these tests hold the fused scanner to faiss's own distances (the re-rank has its own tests).
    return IVFPQIndex.from_faiss(faiss.clone_index(trained), nprobe=4, num_threads=2, coarse=coarse, rerank=None)


def queries(n: int = 6, seed: int = 5) -> np.ndarray:
    x, _ = clustered(n, seed=seed)
    return x[::PATCHES_PER_IMAGE].copy()


def faiss_patch_results(index: IVFPQIndex, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """faiss's exhaustive patch-level results at the index's nprobe (k = everything in the probed lists)."""
    ivf = index.faiss_index
    ivf.nprobe = index.nprobe
    return ivf.search(q, int(ivf.ntotal))


def reference_images(index: IVFPQIndex, q: np.ndarray, k: int):
    """numpy group-by over faiss's exhaustive patch results: max per image, ties by patch id, then image id."""
    D, I = faiss_patch_results(index, q)
    out = []
    for d, ids in zip(D, I):
        keep = ids >= 0
        d, ids = d[keep], ids[keep]
        imgs = index.patch_image_map()[ids].astype(np.int64)
        order = np.lexsort((ids, -d))  # best score first, ties -> smaller patch id
        _, first = np.unique(imgs[order], return_index=True)
        best = order[first]
        rank = np.lexsort((imgs[best], -d[best]))[:k]
        out.append((d[best][rank], imgs[best][rank], ids[best][rank]))
    return out


def assert_matches_faiss(index: IVFPQIndex, q: np.ndarray, k: int = 10) -> None:
    # 1) every patch score equals faiss's distance for that id
    D, I = faiss_patch_results(index, q)
    for qi in range(len(q)):
        ids, scores = index.patch_scores(q[qi])
        faiss_scores = dict(zip(I[qi][I[qi] >= 0].tolist(), D[qi][I[qi] >= 0].tolist()))
        assert sorted(ids.tolist()) == sorted(faiss_scores)  # same probed patches
        np.testing.assert_allclose(scores, [faiss_scores[i] for i in ids.tolist()], atol=1e-4)
    # 2) image ranking equals the numpy group-by (float summation order may differ by ~1e-7: allow ties only)
    s, imgs, patches = index.search(q, k)
    for qi, (rs, rimgs, rpatches) in enumerate(reference_images(index, q, k)):
        n = len(rimgs)
        np.testing.assert_allclose(s[qi, :n], rs, atol=1e-4)
        near_tie = np.abs(np.diff(rs)) < 1e-5 if n > 1 else np.zeros(0, bool)
        if not near_tie.any():
            np.testing.assert_array_equal(imgs[qi, :n], rimgs)
            np.testing.assert_array_equal(patches[qi, :n], rpatches)
        else:
            assert set(imgs[qi, :n][rs < rs[-1] - 1e-5]) == set(rimgs[rs < rs[-1] - 1e-5])
        assert np.all(imgs[qi, n:] == -1) and np.all(np.isneginf(s[qi, n:]))


@pytest.mark.parametrize("coarse", ["native", "faiss"])
@pytest.mark.parametrize("nprobe", [1, 4, NLIST])
def test_scores_and_ranking_equal_faiss(trained_faiss, data, nprobe, coarse):
    index = fresh(trained_faiss, coarse)
    x, images = data
    index.add(x, np.arange(len(x)), images)
    index.nprobe = nprobe
    assert_matches_faiss(index, queries())
    assert isinstance(index, PatchIndex)


def test_native_coarse_search_probes_what_faiss_probes(trained_faiss, data):
    index = fresh(trained_faiss)
    x, images = data
    index.add(x, np.arange(len(x)), images)
    q = queries(30)
    for nprobe in (1, 5, NLIST + 3):  # more than nlist pads with -1, like faiss
        index.nprobe = nprobe
        faiss_probes = index.probe(q)
        for qi in range(len(q)):
            np.testing.assert_array_equal(index.coarse_probe(q[qi], nprobe)[: faiss_probes.shape[1]],
                                          faiss_probes[qi])
    index.nprobe = 4
    native = index.search(q, 10)
    index.coarse = "faiss"
    for a, b in zip(native, index.search(q, 10)):
        np.testing.assert_array_equal(a, b)


def test_threads_agree_and_single_query(trained_faiss, data):
    index = fresh(trained_faiss)
    x, images = data
    index.add(x, np.arange(len(x)), images)
    q = queries(20)
    index.num_threads = 1
    one = index.search(q, 7)
    index.num_threads = 4
    many = index.search(q, 7)
    for a, b in zip(one, many):
        np.testing.assert_array_equal(a, b)
    single = index.search(q[3], 7)  # a 1-D query is one row
    np.testing.assert_array_equal(single[1], one[1][3:4])


def test_add_after_training_and_remove(trained_faiss, data):
    index = fresh(trained_faiss)
    x, images = data
    half = len(x) // 2
    index.add(x[:half], np.arange(half), images[:half])
    index.add(x[half:], np.arange(half, len(x)), images[half:])  # added after training, in a second batch
    more, more_images = clustered(100, seed=9, first_image=int(images.max()) + 1)
    index.add(more, np.arange(len(x), len(x) + len(more)), more_images)
    assert index.ntotal == len(x) + len(more)
    q = np.concatenate([queries(), more[:3 * PATCHES_PER_IMAGE:PATCHES_PER_IMAGE]])
    assert_matches_faiss(index, q)

    _, top, _ = index.search(q, 5)
    gone = np.unique(top[:, :2])
    removed = index.remove_images(gone)
    assert removed == PATCHES_PER_IMAGE * len(gone)
    assert index.ntotal == len(x) + len(more) - removed
    _, after, _ = index.search(q, 50)
    assert not np.isin(after, gone).any()
    assert_matches_faiss(index, q)
    assert index.remove_images(gone) == 0  # already gone

    with pytest.raises(ValueError, match="already in the index"):
        index.add(x[:1], np.array([len(x) - 1]), np.array([0]))


def test_save_load_roundtrip_and_errors(trained_faiss, data, tmp_path):
    index = fresh(trained_faiss)
    x, images = data
    index.add(x, np.arange(len(x)), images)
    index.remove_images(np.array([0, 5, 7]))
    index.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ivfpq_index.faiss", "ivfpq_meta.json",
                                                          "ivfpq_patch_image.npy"]
    loaded = IVFPQIndex.load(tmp_path)
    assert (loaded.ntotal, loaded.nlist, loaded.m, loaded.nbits, loaded.nprobe) == (index.ntotal, NLIST, M, 8, 4)
    q = queries()
    for a, b in zip(index.search(q, 10), loaded.search(q, 10)):
        np.testing.assert_array_equal(a, b)
    assert_matches_faiss(loaded, q)
    assert loaded.nbytes() == index.nbytes()
    # adding to a loaded index works too
    more, more_images = clustered(20, seed=11, first_image=5000)
    loaded.add(more, np.arange(len(x), len(x) + len(more)), more_images)
    assert_matches_faiss(loaded, q)

    meta_path = tmp_path / "ivfpq_meta.json"
    meta = json.loads(meta_path.read_text())
    meta["format_version"] = 99
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(IndexFormatError, match="version 99"):
        IVFPQIndex.load(tmp_path)
    meta["format_version"] = 1
    meta["ntotal"] = 3
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(IndexFormatError, match="does not match"):
        IVFPQIndex.load(tmp_path)
    (tmp_path / "ivfpq_patch_image.npy").unlink()
    with pytest.raises(IndexFormatError, match="missing ivfpq_patch_image.npy"):
        IVFPQIndex.load(tmp_path)


def test_nbytes_counts_codes_ids_and_map(trained_faiss, data):
    index = fresh(trained_faiss)
    x, images = data
    index.add(x, np.arange(len(x)), images)
    # 8-bit codes: M bytes, int64 id, int32 map entry by patch id and again in list order
    assert index.nbytes() == len(x) * (M + 8) + len(x) * 4 + len(x) * 4


def test_training_size_checks_and_auto_nlist(data):
    x, _ = data
    with pytest.raises(ValueError, match=r"at least 9984 vectors.*got 5000"):
        IVFPQIndex(DIM, m=M, nbits=8).train(x[:5000])
    with pytest.raises(ValueError, match=r"at least 624 vectors.*got 600"):  # 4-bit (the default): 39 x 16
        IVFPQIndex(DIM, m=M).train(x[:600])
    with pytest.raises(ValueError, match=r"at least 39000 vectors"):
        IVFPQIndex(DIM, nlist=1000, m=M).train(x)
    assert auto_nlist(10_000) == 256 and auto_nlist(1_000_000) == 4000 and auto_nlist(100) == 2
    index = IVFPQIndex(DIM, nlist=None, m=4, nbits=6, rerank=None)  # 64 PQ centroids: 39 * 64 = 2496 suffice
    index.train(x[:3003])
    assert index.nlist == auto_nlist(3003) == 77  # capped: 3003 // 39
    index.add(x[:3003], np.arange(3003), np.arange(3003) // 7)
    assert_matches_faiss(index, queries(3))  # bit-packed 6-bit codes go through the generic decoder


def test_constructor_validation_and_factory():
    with pytest.raises(ValueError, match="must divide"):
        IVFPQIndex(30, m=8)
    with pytest.raises(ValueError, match="factory"):
        IVFPQIndex(32, factory="HNSW32")
    index = IVFPQIndex(32, factory="IVF64,PQ8x6", nprobe=3)
    assert (index.nlist, index.m, index.nbits, index.nprobe) == (64, 8, 6, 3)
    empty = index.search(np.ones((2, 32), np.float32), 3)  # nothing indexed: no columns
    assert [a.shape for a in empty] == [(2, 0)] * 3 and [a.dtype for a in empty] == [np.float32, np.int64, np.int64]
    with pytest.raises(RuntimeError, match="train"):
        index.add(np.ones((1, 32), np.float32), np.array([0]), np.array([0]))


def test_scanner_binding_validates_inputs():
    """The binding never converts: a wrong dtype, shape or layout is a CoreError naming the argument, saying what
    was expected and what was given."""
    coarse = np.zeros((4, 8), np.float32)
    pq = np.zeros((2, 256, 4), np.float32)
    with pytest.raises(CoreError, match=r"pq_centroids: expected .*M \* dsub = 8.*got a float32 array of shape "
                                        r"\(2, 256, 3\)"):
        _core.IVFPQScanner(coarse, np.zeros((2, 256, 3), np.float32), 8)
    with pytest.raises(CoreError, match=re.escape("coarse_centroids: expected a C-contiguous float32 array of shape "
                                                  "(nlist, dim), got a float64 array of shape (4, 8)")):
        _core.IVFPQScanner(coarse.astype(np.float64), pq, 8)
    with pytest.raises(CoreError, match=re.escape("pq_centroids: expected a C-contiguous float32 array of shape "
                                                  "(M, 16, dsub), got a float32 array of shape (2, 256, 4)")):
        _core.IVFPQScanner(coarse, pq, 4)
    scanner = _core.IVFPQScanner(coarse, pq, 8)
    with pytest.raises(CoreError, match="one codes and one ids"):
        scanner.set_lists([], [])
    with pytest.raises(CoreError, match="code bytes"):
        scanner.set_lists([np.zeros(3, np.uint8)] + [np.zeros(0, np.uint8)] * 3, [np.zeros(1, np.int64)] * 4)
    no_codes = [np.zeros(0, np.uint8)] * 4
    with pytest.raises(CoreError, match=re.escape("ids[0]: expected a C-contiguous int64 array of shape (n,), "
                                                  "got an int32 array of shape (0,)")):
        scanner.set_lists(no_codes, [np.zeros(0, np.int32)] * 4)
    scanner.set_lists(no_codes, [np.zeros(0, np.int64)] * 4)
    with pytest.raises(CoreError, match=re.escape("patch_to_image: expected a C-contiguous int32 array of shape "
                                                  "(n_patches,), got an int64 array of shape (3,)")):
        scanner.set_image_map(np.zeros(3, np.int64), 1)
    scanner.set_image_map(np.zeros(0, np.int32), 0)

    q = np.ones((2, 8), np.float32)
    probes = np.zeros((2, 1), np.int64)
    for bad, got in [(q.astype(np.float64), "a float64 array of shape (2, 8)"),
                     (np.ones((2, 16), np.float32)[:, ::2], "a non-C-contiguous float32 array of shape (2, 8)"),
                     (np.ones((2, 7), np.float32), "a float32 array of shape (2, 7)"),
                     (np.ones(8, np.float32), "a float32 array of shape (8,)")]:
        expected = f"queries: expected a C-contiguous float32 array of shape (nq, 8), got {got}"
        with pytest.raises(CoreError, match=re.escape(expected)):
            scanner.search(bad, probes, 3)
        with pytest.raises(CoreError, match=re.escape(expected)):
            scanner.search_native(bad, 2, 3)
    with pytest.raises(CoreError, match=re.escape("probes: expected a C-contiguous int64 array of shape (2, nprobe), "
                                                  "got an int32 array of shape (2, 1)")):
        scanner.search(q, probes.astype(np.int32), 3)
    with pytest.raises(CoreError, match=re.escape("query: expected a C-contiguous float32 array of shape (8,), got "
                                                  "a float64 array of shape (8,)")):
        scanner.coarse_probe(q[0].astype(np.float64), 2)
    with pytest.raises(CoreError, match="k: expected an integer >= 1, got 0"):
        scanner.search(q, probes, 0)
    # Nothing to report (num_images = 0): no columns, whatever k is.
    for result in (scanner.search(q, probes, 2**62), scanner.search_native(q, 2, 2**62)):
        assert [a.shape for a in result] == [(2, 0)] * 3
    # The core's std::out_of_range is a CoreError too (and so a ValueError).
    with pytest.raises(CoreError, match="probed list out of range"):
        _core.ivfpq_patch_scores(scanner, q[0], np.array([7], np.int64))


def test_huge_k_is_bounded_by_the_images(trained_faiss):
    """search(q, k) returns (nq, min(k, images)) whatever k is: k = 2**62 must not allocate by k."""
    index = fresh(trained_faiss)
    x, images = clustered(12, seed=3)
    index.add(x, np.arange(len(x)), images)
    q = queries(3)
    for coarse in ("native", "faiss"):
        index.coarse = coarse
        index.nprobe = NLIST  # every list: every image is reached
        huge = index.search(q, 2**62)
        assert [a.shape for a in huge] == [(3, 12)] * 3 and (huge[1] >= 0).all()
        for a, b in zip(huge, index.search(q, 12)):
            np.testing.assert_array_equal(a, b)
        index.nprobe = 1  # one list reaches fewer images: padded with -inf / -1 after the real hits
        s, imgs, patches = index.search(q, 2**62)
        assert imgs.shape == (3, 12) and (imgs == -1).any()
        reached = imgs >= 0
        assert (np.sort(reached, axis=1)[:, ::-1] == reached).all()  # hits first, padding after
        assert np.isneginf(s[~reached]).all() and (patches[~reached] == -1).all()
    scanner = index._ready_scanner()
    assert [a.shape for a in scanner.search_native(q, 2, 2**62)] == [(3, 12)] * 3


def test_engine_searches_exactly_until_it_can_train(photos, thumbnail_backbone, tmp_path):
    pytest.importorskip("patchify.tiling")  # the engine needs the tiler work
    from patchify.engine import Patchify

    engine = Patchify(backbone=thumbnail_backbone, level=2, index="ivfpq", m=8, nbits=4, nlist=4)
    report = engine.add_images(photos[:10])  # 140 patches: far fewer than the 624 the codebooks need
    assert engine.exact_until_trained == 624 and engine.index.kind == "flat"
    assert engine.index_config.kind == "ivfpq" and any("exactly" in note for note in report.notes)
    assert engine.search(photos[3], k=1)[0].image_id == 3
    engine.save(tmp_path / "staged")
    loaded = Patchify.load(tmp_path / "staged", backbone=thumbnail_backbone)
    assert loaded.exact_until_trained == 624 and loaded.index_config == engine.index_config
    # Enough patches: trained on everything held so far plus the new ones, then searched by IVFPQ + re-rank.
    more = [np.ascontiguousarray(np.asarray(Image.open(p).convert("RGB"))[:, ::-1]) for p in photos] * 2
    report = loaded.add_images(more)
    assert loaded.exact_until_trained is None and loaded.index.kind == "ivfpq" and loaded.index.ntotal == 700
    assert any("trained" in note for note in report.notes)
    assert loaded.search(photos[3], k=1)[0].image_id == 3
    # nbits=4: the fast-scan layout, saved (the faiss file says which layout) and read back as such.
    assert loaded.index.fast_scan
    loaded.save(tmp_path / "trained")
    again = Patchify.load(tmp_path / "trained", backbone=thumbnail_backbone)
    assert again.index.fast_scan and again.index.ntotal == 700
    first, second = loaded.search(photos[5], k=3), again.search(photos[5], k=3)
    assert [h.image_id for h in first] == [h.image_id for h in second] and first[0].image_id == 5
