"""Learned whitening and global + patch fusion: against faiss and numpy references, through the engine, saved and
loaded. Vectors are synthetic (clustered, anisotropic) and go in through add_embeddings: no backbone needed."""
from __future__ import annotations

import numpy as np
import pytest

from patchify import Patchify
from patchify.config import DEFAULT_GLOBAL_WEIGHT, WhiteningConfig
from patchify.errors import IndexFormatError
from patchify.fusion import fold, unfold
from patchify.records import NewImage, PatchTable
from patchify.whitening import Whitening

DIM = 32
GRIDS = (1, 2)  # level 1: 5 patches per image, the first the whole image


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _anisotropic(n: int, seed: int = 0) -> np.ndarray:
    """Unit vectors dominated by a shared direction and a few strong axes, like raw backbone vectors."""
    rng = np.random.default_rng(seed)
    scales = np.geomspace(3.0, 0.05, DIM)
    return _unit(rng.normal(size=(n, DIM)) * scales + 4.0 * np.eye(DIM)[0])


def _images(n_images: int, seed: int) -> tuple[np.ndarray, PatchTable, list[NewImage]]:
    vectors = _anisotropic(n_images * 5, seed)
    image = np.repeat(np.arange(n_images), 5)
    grid = np.tile([1, 2, 2, 2, 2], n_images)
    cell = np.tile([0, 0, 1, 2, 3], n_images)
    box = np.tile(np.array([[0, 0, 8, 8], [0, 0, 4, 4], [4, 0, 8, 4], [0, 4, 4, 8], [4, 4, 8, 8]]), (n_images, 1))
    images = [NewImage(f"img{seed}_{i}", 8, 8) for i in range(n_images)]
    return vectors, PatchTable(image, box, grid, cell), images


def _engine(thumbnail_backbone, **settings) -> Patchify:
    return Patchify(backbone=thumbnail_backbone, grids=GRIDS, **settings)


# ---------------------------------------------------------------------------------------------- the transform
def test_whitening_without_shrinkage_matches_faiss_pca_matrix():
    faiss = pytest.importorskip("faiss")
    x = _anisotropic(2000)
    ours = Whitening.learn(x, WhiteningConfig(power=-0.5, shrinkage=0.0))
    pca = faiss.PCAMatrix(DIM, DIM, -0.5)
    pca.train(x)
    reference = _unit(pca.apply(x))
    y = ours.apply(x)
    # Axes may differ in sign: compare what search sees, the inner products between transformed vectors.
    np.testing.assert_allclose(y[:200] @ y[:200].T, reference[:200] @ reference[:200].T, atol=2e-4)
    # Whitened: the learning set's covariance is (a multiple of) the identity before re-normalisation.
    centred = (x - ours.mean) @ ours.projection
    cov = np.cov(centred, rowvar=False)
    np.testing.assert_allclose(cov / cov[0, 0], np.eye(DIM), atol=1e-3)


def test_shrinkage_keeps_small_axes_from_blowing_up_and_dims_reduce():
    x = _anisotropic(500)
    full = Whitening.learn(x, WhiteningConfig(shrinkage=0.0))
    shrunk = Whitening.learn(x, WhiteningConfig(shrinkage=1.0))
    gain = lambda w: np.linalg.norm(w.projection, axis=0)  # noqa: E731 - per-axis scale
    assert gain(full)[-1] / gain(full)[0] > 10 * gain(shrunk)[-1] / gain(shrunk)[0]
    reduced = Whitening.learn(x, WhiteningConfig(dims=8))
    assert reduced.apply(x).shape == (500, 8) and not reduced.invertible
    np.testing.assert_allclose(np.linalg.norm(reduced.apply(x), axis=1), 1.0, atol=1e-5)
    assert full.apply(x[0]).shape == (DIM,)


def test_recover_inverts_apply_for_unit_vectors():
    x = _anisotropic(300, seed=3)
    w = Whitening.learn(x, WhiteningConfig())
    other = _anisotropic(50, seed=4)  # not in the learning set
    np.testing.assert_allclose(w.recover(w.apply(other)), other, atol=1e-4)


def test_learning_needs_two_vectors_and_valid_settings():
    with pytest.raises(ValueError, match="at least 2"):
        Whitening.learn(_anisotropic(1))
    with pytest.raises(ValueError, match="dims=64"):
        Whitening.learn(_anisotropic(10), WhiteningConfig(dims=64))
    for bad in ({"power": 0.5}, {"shrinkage": -1}, {"dims": 1}, {"min_vectors": 0}, {"power": float("nan")}):
        with pytest.raises(ValueError, match="whitening"):
            WhiteningConfig(**bad)  # type: ignore[arg-type]
    # A learning set smaller than the dimension works with shrinkage (the default).
    assert np.isfinite(Whitening.learn(_anisotropic(5)).projection).all()


# ---------------------------------------------------------------------------------------------- fusion
def _brute_force_fused(patches: np.ndarray, image: np.ndarray, grid: np.ndarray, queries: np.ndarray, k: int,
                       weight: float) -> tuple[np.ndarray, np.ndarray]:
    """The definition, spelled out: w * <q, whole-image patch> + (1 - w) * max over the image's patches."""
    sims = queries @ patches.T
    n_images = int(image.max()) + 1
    fused = np.empty((len(queries), n_images), np.float32)
    for i in range(n_images):
        rows = image == i
        whole = np.flatnonzero(rows & (grid == 1))[0]
        fused[:, i] = weight * sims[:, whole] + (1 - weight) * sims[:, rows].max(axis=1)
    order = np.argsort(-fused, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(fused, order, axis=1), order


def test_fold_and_unfold_are_inverse_and_keep_the_whole_image_row():
    vectors, table, _ = _images(30, seed=5)
    folded = fold(vectors, table.grid, table.image, 0.3)
    np.testing.assert_array_equal(folded[table.grid == 1], vectors[table.grid == 1])
    np.testing.assert_allclose(unfold(folded, table.grid, table.image, 0.3), vectors, atol=1e-6)
    assert fold(vectors, table.grid, table.image, 0.0) is vectors


@pytest.mark.parametrize("weight", [0.1, 0.25, 0.6])
def test_fused_search_equals_the_definition(thumbnail_backbone, weight):
    engine = _engine(thumbnail_backbone, whitening="none", global_weight=weight)
    vectors, table, images = _images(300, seed=5)
    engine.add_embeddings(vectors, table, images)
    queries = _anisotropic(40, seed=6)
    scores, ids, patch_ids = engine.search_vectors(queries, 10)
    ref_scores, ref_ids = _brute_force_fused(vectors, table.image, table.grid, queries, 10, weight)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)
    assert (ids == ref_ids).mean() > 0.99  # float rounding may swap exact ties
    # The winning patch is the plain max's: the fusion adds the same amount to every patch of an image.
    sims = queries @ vectors.T
    for q in range(len(queries)):
        rows = np.flatnonzero(table.image == ids[q, 0])
        assert patch_ids[q, 0] == rows[sims[q, rows].argmax()]


# ---------------------------------------------------------------------------------------------- the engine
def test_engine_learns_at_first_add_and_searches_in_whitened_space(thumbnail_backbone):
    engine = _engine(thumbnail_backbone)
    vectors, table, images = _images(100, seed=0)  # 500 patches >= min_vectors
    engine.add_embeddings(vectors, table, images)
    w = engine.whitening
    assert w is not None and w.learned_on_vectors == 500 and w.learned_on_images == 100
    assert engine.effective_global_weight == DEFAULT_GLOBAL_WEIGHT
    query = vectors[5]  # image 1's whole-image patch (rows 5..9 are image 1's)
    hits = engine.search(query, k=3)
    assert hits[0].image_id == 1 and hits[0].patch_id == 5
    assert hits[0].score == pytest.approx(1.0, abs=2e-3)  # both terms are 1; the global vector is held as float16
    whitened = w.apply(vectors)
    second = hits[1]
    rows = np.flatnonzero(table.image == second.image_id)
    expected = DEFAULT_GLOBAL_WEIGHT * float(whitened[5] @ whitened[rows[0]]) + \
        (1 - DEFAULT_GLOBAL_WEIGHT) * float((whitened[rows] @ whitened[5]).max())
    assert second.score == pytest.approx(expected, abs=2e-3)
    engine.global_weight = 0.0  # the paper's plain max: a whitened cosine, 1 for the patch itself
    assert engine.search(vectors[7], k=1)[0].score == pytest.approx(1.0, abs=1e-5)


def test_small_first_adds_hold_raw_vectors_until_min_vectors_then_learn_on_all(thumbnail_backbone):
    one_go = _engine(thumbnail_backbone)
    in_parts = _engine(thumbnail_backbone)
    min_vectors = WhiteningConfig().min_vectors
    parts = [_images(5, seed=s) for s in (1, 2, 3)]  # 25 patches each
    assert 50 < min_vectors <= 75
    for part in parts:
        in_parts.add_embeddings(*part)
        if in_parts.n_patches < min_vectors:
            assert in_parts.whitening is None and in_parts.effective_global_weight == 0.0
    assert in_parts.whitening is not None and in_parts.whitening.learned_on_vectors == 75
    one_go.add_embeddings(np.concatenate([p[0] for p in parts]), PatchTable.concatenate(
        [p[1].with_image(p[1].image + 5 * i) for i, p in enumerate(parts)]), [im for p in parts for im in p[2]])
    queries = _anisotropic(20, seed=11)
    a, b = in_parts.search_vectors(queries, 5), one_go.search_vectors(queries, 5)
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_allclose(a[0], b[0], atol=1e-5)


def test_relearn_whitening_equals_learning_on_everything(thumbnail_backbone):
    engine = _engine(thumbnail_backbone)
    first, later = _images(60, seed=1), _images(200, seed=2)
    engine.add_embeddings(*first)
    assert engine.whitening is not None and engine.whitening.learned_on_vectors == 300
    engine.add_embeddings(*later)
    assert engine.whitening.learned_on_vectors == 300  # incremental adds keep the transform
    relearned = engine.relearn_whitening()
    assert relearned.learned_on_vectors == 1300 and engine.whitening is relearned
    reference = Whitening.learn(np.concatenate([first[0], later[0]]), WhiteningConfig())
    queries = _anisotropic(10, seed=12)
    np.testing.assert_allclose(relearned.apply(queries) @ relearned.apply(later[0][:50]).T,
                               reference.apply(queries) @ reference.apply(later[0][:50]).T, atol=1e-4)
    hits = engine.search(later[0][12], k=1)[0]  # a patch of the second add's image 2 (image id 62)
    assert hits.image_id == 62 and hits.patch_id == 300 + 12


def test_relearn_refuses_what_it_cannot_do_and_changes_nothing(thumbnail_backbone):
    vectors, table, images = _images(400, seed=0)
    ivfpq = _engine(thumbnail_backbone, index="ivfpq", nlist=2, m=4, nbits=4)
    ivfpq.add_embeddings(vectors, table, images)
    assert ivfpq.whitening is not None and ivfpq.index.dim == DIM
    with pytest.raises(ValueError, match="rebuild"):
        ivfpq.relearn_whitening()
    reduced = _engine(thumbnail_backbone, whitening=WhiteningConfig(dims=16))
    reduced.add_embeddings(vectors, table, images)
    assert reduced.index.dim == 16
    before = reduced.search_vectors(vectors[:3], 4)
    with pytest.raises(ValueError, match="16 of 32"):
        reduced.relearn_whitening()
    np.testing.assert_array_equal(reduced.search_vectors(vectors[:3], 4)[1], before[1])


def test_ivfpq_codebooks_learn_in_the_whitened_space(thumbnail_backbone):
    vectors, table, images = _images(400, seed=0)
    engine = _engine(thumbnail_backbone, index="ivfpq", nlist=2, m=4, nbits=4, whitening=WhiteningConfig(dims=16))
    engine.add_embeddings(vectors, table, images)
    assert engine.index.dim == engine.whitening.output_dim == 16
    hits = engine.search(vectors[5 * 17], k=5)  # image 17's whole-image patch
    assert 17 in [h.image_id for h in hits]


def test_whitening_none_and_a_given_whitening(thumbnail_backbone):
    vectors, table, images = _images(100, seed=0)
    raw = _engine(thumbnail_backbone, whitening="none")
    raw.add_embeddings(vectors, table, images)
    assert raw.whitening is None and raw.effective_global_weight == 0.0
    assert raw.search(vectors[3], k=1)[0].score == pytest.approx(1.0, abs=1e-5)
    shipped = Whitening.learn(_anisotropic(1000, seed=9))  # learned elsewhere, used as is
    given = _engine(thumbnail_backbone, whitening=shipped)
    given.add_embeddings(*_images(2, seed=0))  # 10 patches, fewer than min_vectors: nothing to learn
    assert given.whitening is shipped
    with pytest.raises(ValueError, match="whitening must be"):
        _engine(thumbnail_backbone, whitening="pca")
    with pytest.raises(ValueError, match="global_weight"):
        _engine(thumbnail_backbone, global_weight=1.5)
    with pytest.raises(ValueError, match="grid 1"):
        Patchify(backbone=thumbnail_backbone, grids=[2, 3], global_weight=0.5)


def test_changing_the_global_weight_refolds_a_flat_index(thumbnail_backbone):
    vectors, table, images = _images(400, seed=0)
    changed = _engine(thumbnail_backbone, global_weight=0.25)
    changed.add_embeddings(vectors, table, images)
    changed.global_weight = 0.5
    built = _engine(thumbnail_backbone, global_weight=0.5)
    built.add_embeddings(vectors, table, images)
    queries = _anisotropic(10, seed=4)
    for a, b in zip(changed.search_vectors(queries, 5), built.search_vectors(queries, 5)):
        np.testing.assert_allclose(a, b, atol=1e-5)
    changed.global_weight = 0.0  # back to the plain max
    assert changed.search(vectors[7], k=1)[0].score == pytest.approx(1.0, abs=1e-5)
    one_stage = _engine(thumbnail_backbone, index="ivfpq", nlist=2, m=4, nbits=4, rerank="none")
    one_stage.add_embeddings(vectors, table, images)
    assert one_stage.effective_global_weight == 0.0  # fusion needs the second stage's exact scores


def test_ivfpq_fuses_in_its_second_stage_as_defined(thumbnail_backbone):
    vectors, table, images = _images(300, seed=5)
    engine = _engine(thumbnail_backbone, whitening="none", index="ivfpq", nlist=2, m=4, nbits=4,
                     rerank="float16", rerank_shortlist=300, global_weight=0.25)  # every image re-scored
    engine.add_embeddings(vectors, table, images)
    queries = _anisotropic(20, seed=6)
    for weight in (0.25, 0.6):  # a search-time setting for IVFPQ: nothing is re-folded
        engine.global_weight = weight
        scores, ids, _ = engine.search_vectors(queries, 10)
        ref_scores, ref_ids = _brute_force_fused(vectors, table.image, table.grid, queries, 10, weight)
        np.testing.assert_allclose(scores, ref_scores, atol=2e-3)  # float16 copies
        assert (ids == ref_ids).mean() > 0.95
    # Images added after a search (the whole-image rows are extended, not recomputed) are fused the same way.
    more, more_table, more_images = _images(20, seed=8)
    engine.add_embeddings(more, more_table, more_images)
    engine.index.rerank_shortlist = 320
    all_vectors = np.concatenate([vectors, more])
    all_image = np.concatenate([table.image, more_table.image + 300])
    all_grid = np.concatenate([table.grid, more_table.grid])
    scores, ids, _ = engine.search_vectors(queries, 10)
    ref_scores, ref_ids = _brute_force_fused(all_vectors, all_image, all_grid, queries, 10, 0.6)
    np.testing.assert_allclose(scores, ref_scores, atol=2e-3)
    assert (ids == ref_ids).mean() > 0.95


def test_removed_images_never_come_back_through_fusion(thumbnail_backbone):
    engine = _engine(thumbnail_backbone)
    vectors, table, images = _images(100, seed=0)
    engine.add_embeddings(vectors, table, images)
    engine.remove_images([1])
    hits = engine.search(vectors[7], k=100)
    assert 1 not in [h.image_id for h in hits] and len(hits) == 99


def test_whitening_fusion_and_pending_state_survive_save_and_load(thumbnail_backbone, tmp_path):
    engine = _engine(thumbnail_backbone, global_weight=0.5)
    vectors, table, images = _images(100, seed=0)
    engine.add_embeddings(vectors, table, images)
    engine.save(tmp_path / "a")
    loaded = Patchify.load(tmp_path / "a", backbone=thumbnail_backbone)
    assert loaded.global_weight == 0.5 and loaded.whitening.learned_on_vectors == 500
    queries = _anisotropic(5, seed=3)
    for before, after in zip(engine.search_vectors(queries, 5), loaded.search_vectors(queries, 5)):
        np.testing.assert_allclose(before, after, atol=1e-6)
    # Saved before it had enough vectors to learn: still learns after loading.
    pending = _engine(thumbnail_backbone, whitening=WhiteningConfig(power=-0.25))
    pending.add_embeddings(*_images(2, seed=1))  # 10 patches: fewer than min_vectors
    pending.save(tmp_path / "b")
    reloaded = Patchify.load(tmp_path / "b", backbone=thumbnail_backbone)
    assert reloaded.whitening is None and reloaded.whitening_config == WhiteningConfig(power=-0.25)
    reloaded.add_embeddings(*_images(60, seed=2))
    assert reloaded.whitening is not None and reloaded.whitening.config.power == -0.25
    # A damaged whitening file is named.
    (tmp_path / "a" / "whitening.npz").write_bytes(b"not a zip file at all, but the same length?")
    with pytest.raises(IndexFormatError, match="whitening.npz"):
        Patchify.load(tmp_path / "a", backbone=thumbnail_backbone, verify=True)


def test_older_indexes_keep_the_plain_max_and_can_fuse_when_flat(thumbnail_backbone):
    from pathlib import Path

    from conftest import ThumbnailBackbone
    from fixtures.make_index_fixtures import query

    saved = Path(__file__).resolve().parent / "fixtures" / "indices" / "v2"
    flat = Patchify.load(saved / "flat", backbone=ThumbnailBackbone())  # type: ignore[arg-type]
    assert flat.whitening is None and flat.effective_global_weight == 0.0
    plain = flat.search(query(), k=3)
    flat.global_weight = 0.25  # raw vectors, but the whole-image rows are there: re-folded
    fused = flat.search(query(), k=3)
    assert fused[0].score != pytest.approx(plain[0].score)
    ivfpq = Patchify.load(saved / "ivfpq", backbone=ThumbnailBackbone())  # type: ignore[arg-type]
    ivfpq.global_weight = 0.25  # version 2 had no re-rank store: its search stays the plain max
    assert ivfpq.effective_global_weight == 0.0


def test_add_images_learns_on_the_4x4_cells_and_reports_it(thumbnail_backbone, photos):
    engine = Patchify(backbone=thumbnail_backbone, level=2)
    calls = thumbnail_backbone.calls
    first = engine.add_images(photos[:3])  # 3 x 16 cells could not reach min_vectors (64): not even encoded
    assert first.notes == [] and engine.whitening is None
    assert thumbnail_backbone.calls - calls == 1  # the indexing pass only (one backbone call for 42 patches)
    second = engine.add_images(photos[3:8])  # this add's 5 images give 80 cells
    assert len(second.notes) == 1 and "whitening learned on 80 4x4 cells of 5 images" in second.notes[0]
    assert "whitening learned on 80 4x4 cells" in str(second)
    assert engine.add_images(photos[8:9]).notes == []  # kept, not re-learned
    # The same cells through add_embeddings: the same whitening.
    from patchify import AddReport, Encoder, TilingConfig

    encoded = list(Encoder(thumbnail_backbone, TilingConfig(grids=(4,))).encode_images(photos[3:8], AddReport()))
    reference = Whitening.learn(np.concatenate([b.vectors for b in encoded]), WhiteningConfig())
    np.testing.assert_allclose(engine.whitening.projection, reference.projection, atol=1e-5)
    # At L3 the index's own 4x4 cells serve: no second pass over the images.
    calls = thumbnail_backbone.calls
    fine = Patchify(backbone=thumbnail_backbone, level=3)
    fine.add_images(photos[:4])
    assert fine.whitening.learned_from == "4x4 cells" and fine.whitening.learned_on_vectors == 64
    assert thumbnail_backbone.calls - calls <= 4  # one pass: 120 patches in batches of 32


def test_ivfpq_with_a_selecting_training_source_waits_for_enough_selected_patches(thumbnail_backbone):
    engine = _engine(thumbnail_backbone, index="ivfpq", m=4, nbits=4, training_source="salient")
    need = engine.exact_until_trained
    assert need == 624
    engine.add_embeddings(*_images(150, seed=1))  # 750 patches, of which "salient" keeps 450: not enough
    assert engine.index.kind == "flat" and engine.exact_until_trained == need
    vectors, table, images = _images(100, seed=2)
    engine.add_embeddings(vectors, table, images)  # 1,250 patches, 750 kept: trained on them
    assert engine.index.kind == "ivfpq" and engine.exact_until_trained is None and engine.n_patches == 1250
    assert engine.search(vectors[5 * 40], k=1)[0].image_id == 150 + 40
