"""IVFPQIndex with nbits=4: faiss IndexIVFPQFastScan storage scanned by the fused C++ fast-scan scanner.

Held to faiss's own fast-scan search: every patch score within the lookup-table quantisation error of faiss's
distance for that id (both quantise the tables to uint8, each its own way) and of the exact float ADC score (the
codes unpacked with faiss's own CodePacker and decoded), and the same top images as a numpy group-by over faiss's
exhaustive fast-scan results at the same nprobe. The bit-exact checks (AVX2 vs portable kernel, quantised sums) are
in cpp/test/test_pq4_fastscan.cpp."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import clustered_patches

from patchify.config import IVFPQConfig
from patchify.index.ivfpq import IVFPQIndex

DIM, M, NLIST = 32, 16, 16
PER_IMAGE = 6


def clustered(n_images: int, seed: int, first_image: int = 0) -> tuple[np.ndarray, np.ndarray]:
    return clustered_patches(n_images, seed, dim=DIM, per_image=PER_IMAGE, themes=30, spread=0.5,
                             first_image=first_image)


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    return clustered(800, seed=3)


@pytest.fixture(scope="module")
def built(data) -> IVFPQIndex:
    x, images = data
    index = IVFPQIndex(DIM, nlist=NLIST, m=M, nbits=4, nprobe=4, num_threads=2, coarse="faiss", rerank=None,
                       train_iterations=6)
    index.train(x)
    index.add(x, np.arange(len(x)), images)
    return index


def queries(data, n: int = 8, seed: int = 7) -> np.ndarray:
    """Noisy copies of database patches (a query near some image, as a real one is)."""
    x, _ = data
    rng = np.random.default_rng(seed)
    q = x[rng.choice(len(x), n, replace=False)] + 0.05 * rng.standard_normal((n, DIM)).astype(np.float32)
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def exact_adc_scores(index: IVFPQIndex, q: np.ndarray) -> dict[int, float]:
    """Float ADC score of every patch in the probed lists: codes unpacked with faiss's CodePacker, decoded, scored
    as <q, centroid> + <q, decoded residual>."""
    import faiss

    ivf = index.faiss_index
    packer = ivf.get_CodePacker()
    invlists = faiss.downcast_InvertedLists(ivf.invlists)
    centroids = ivf.quantizer.reconstruct_n(0, ivf.nlist)
    out: dict[int, float] = {}
    for list_no in index.probe(q[None, :])[0]:
        n = int(invlists.list_size(int(list_no)))
        if list_no < 0 or n == 0:
            continue
        n_bytes = -(-n // 32) * int(invlists.block_size)
        blocks = faiss.rev_swig_ptr(invlists.get_codes(int(list_no)), n_bytes).reshape(-1, int(packer.block_size))
        ids = faiss.rev_swig_ptr(invlists.get_ids(int(list_no)), n).copy()
        codes = np.stack([packer.unpack_1(blocks, j) for j in range(n)])
        residuals = ivf.pq.decode(codes)
        scores = float(q @ centroids[list_no]) + residuals @ q
        out.update(zip(ids.tolist(), scores.tolist()))
    return out


def table_span(index: IVFPQIndex, q: np.ndarray) -> float:
    """The largest spread of one sub-quantiser's table: one uint8 step is span / 255."""
    import faiss

    pq = faiss.vector_to_array(index.faiss_index.pq.centroids).reshape(M, 16, DIM // M)
    tables = np.einsum("mcd,md->mc", pq, q.reshape(M, DIM // M))
    return float((tables.max(axis=1) - tables.min(axis=1)).max())


def test_layout_and_memory(built, data):
    import faiss

    x, _ = data
    assert built.fast_scan and isinstance(built.faiss_index, faiss.IndexIVFPQFastScan)
    assert built.faiss_index.by_residual and built.faiss_index.bbs == 32
    # Codes M/2 bytes per patch in whole blocks of 32 per list, the int64 id, the int32 patch -> image map; no map
    # in list order (the fast-scan scan looks up only the codes that pass its threshold).
    invlists = built.faiss_index.invlists
    blocks = sum(-(-int(invlists.list_size(list_no)) // 32) for list_no in range(NLIST))
    assert built.first_stage_nbytes() == blocks * 32 * M // 2 + len(x) * (8 + 4)
    assert blocks * 32 < len(x) + 32 * NLIST
    assert IVFPQConfig(nbits=4).create(DIM * 12).fast_scan and not IVFPQConfig(nbits=8).create(DIM * 12).fast_scan


def test_patch_scores_within_quantisation_error_of_faiss(built, data):
    ivf = built.faiss_index
    ivf.nprobe = built.nprobe
    q = queries(data)
    D, I = ivf.search(q, int(ivf.ntotal))
    for qi in range(len(q)):
        ids, scores = built.patch_scores(q[qi])
        keep = I[qi] >= 0
        faiss_scores = dict(zip(I[qi][keep].tolist(), D[qi][keep].tolist()))
        assert sorted(ids.tolist()) == sorted(faiss_scores)  # the same probed patches
        step = table_span(built, q[qi]) / 255
        exact = exact_adc_scores(built, q[qi])
        ours = np.asarray(scores, np.float64)
        theirs = np.array([faiss_scores[i] for i in ids.tolist()])
        truth = np.array([exact[i] for i in ids.tolist()])
        # Each of M table entries rounds by at most half a step.
        assert np.abs(ours - truth).max() <= 0.5 * M * step + 1e-5
        assert np.abs(ours - theirs).max() <= 2 * step  # faiss rounds the same tables nearly the same way
        # and typically far less: the roundings are independent
        assert np.abs(ours - truth).mean() < 0.25 * M * step / 2


def faiss_top_images(index: IVFPQIndex, q: np.ndarray, k: int) -> list[np.ndarray]:
    """faiss fast-scan search over everything probed, grouped by image (max), best k images."""
    ivf = index.faiss_index
    ivf.nprobe = index.nprobe
    D, I = ivf.search(q, int(ivf.ntotal))
    out = []
    for d, ids in zip(D, I):
        keep = ids >= 0
        imgs = index.patch_image_map()[ids[keep]]
        best: dict[int, float] = {}
        for img, score in zip(imgs.tolist(), d[keep].tolist()):
            best[img] = max(best.get(img, -np.inf), score)
        out.append(np.array(sorted(best, key=lambda i: (-best[i], i))[:k]))
    return out


def test_same_top_images_as_faiss_fast_scan_grouped(built, data):
    q = queries(data, 12)
    k = 5
    _, images, patches = built.first_stage(q, k)
    reference = faiss_top_images(built, q, k)
    for qi in range(len(q)):
        assert images[qi, 0] == reference[qi][0]  # the image the query was copied from
        # Two quantisations of the same tables: images within a step of each other may swap at the boundary.
        assert len(set(images[qi]) & set(reference[qi].tolist())) >= k - 1
        assert np.all(built.patch_image_map()[patches[qi]] == images[qi])


def test_threads_native_coarse_and_dense_path(built, data):
    q = queries(data, 10)
    built.num_threads = 1
    one = built.first_stage(q, 7)
    built.num_threads = 3
    many = built.first_stage(q, 7)
    for a, b in zip(one, many):
        np.testing.assert_array_equal(a, b)
    # k above the scanner's pruned top-k (256) goes through the dense per-image array: same leading images.
    wide = built.first_stage(q, 400)
    np.testing.assert_array_equal(wide[1][:, :7], one[1])
    np.testing.assert_array_equal(wide[0][:, :7], one[0])
    built.coarse = "native"
    native = built.first_stage(q, 7)
    built.coarse = "faiss"
    np.testing.assert_array_equal(native[1], one[1])


def test_add_remove_save_load(data, tmp_path):
    x, images = data
    index = IVFPQIndex(DIM, nlist=NLIST, m=M, nbits=4, nprobe=4, train_iterations=4)  # two-stage (int8 re-rank)
    index.train(x)
    half = len(x) // 2
    index.add(x[:half], np.arange(half), images[:half])
    index.add(x[half:], np.arange(half, len(x)), images[half:])
    q = queries(data, 6)
    # Two stages: the re-rank puts back exact scores; a query copied from a patch finds that patch's image.
    scores, top, _ = index.search(q, 5)
    exact = np.array([[float(np.max(x[images == img] @ qq)) for img in row] for qq, row in zip(q, top)])
    np.testing.assert_allclose(scores, exact, atol=0.02)  # int8 re-rank store
    gone = np.unique(top[:, 0])
    assert index.remove_images(gone) == PER_IMAGE * len(gone)
    _, after, _ = index.search(q, 20)
    assert not np.isin(after, gone).any()
    index.save(tmp_path)
    loaded = IVFPQIndex.load(tmp_path)
    assert loaded.fast_scan and loaded.nbits == 4
    for a, b in zip(index.search(q, 10), loaded.search(q, 10)):
        np.testing.assert_array_equal(a, b)
    assert loaded.first_stage_nbytes() == index.first_stage_nbytes()
