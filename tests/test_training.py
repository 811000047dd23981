"""select_training_vectors: every source returns float32 (n, d) training rows chosen as documented."""
from __future__ import annotations

import numpy as np
import pytest

from patchify.training import SOURCES, salient_mask, select_training_vectors

D = 16


def database(n_images: int = 50, seed: int = 0):
    """Each image: one global (grid-1) vector and 4 + 9 sub-patches (grids 2 and 3); the first 4 sub-patches of
    each image are near its global vector (the "object"), the rest are random (the "background")."""
    rng = np.random.default_rng(seed)
    rows, images, grids = [], [], []
    for img in range(n_images):
        g = rng.standard_normal(D)
        g /= np.linalg.norm(g)
        sub = rng.standard_normal((13, D))
        sub[:4] = g + 0.2 * sub[:4]
        rows += [g[None], sub]
        images += [img] * 14
        grids += [1] + [2] * 4 + [3] * 9
    x = np.concatenate(rows).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, np.array(images), np.array(grids)


def as_set(rows: np.ndarray) -> set[bytes]:
    return {r.tobytes() for r in np.asarray(rows, np.float32)}


def test_all_subsamples_deterministically():
    x, images, grids = database()
    full = select_training_vectors("all", x, images)
    np.testing.assert_array_equal(full, x)
    a = select_training_vectors("all", x, images, max_vectors=100, seed=3)
    b = select_training_vectors("all", x, images, max_vectors=100, seed=3)
    assert a.shape == (100, D) and a.dtype == np.float32 and a.flags.c_contiguous
    np.testing.assert_array_equal(a, b)
    assert as_set(a) <= as_set(x)
    assert not np.array_equal(a, select_training_vectors("all", x, images, max_vectors=100, seed=4))


def test_given_uses_only_the_callers_vectors():
    x, images, _ = database()
    given = np.random.default_rng(1).standard_normal((30, D)).astype(np.float32)
    np.testing.assert_array_equal(select_training_vectors("given", x, images, given=given), given)
    assert len(select_training_vectors("given", x, images, given=given, max_vectors=10)) == 10
    with pytest.raises(ValueError, match="needs given"):
        select_training_vectors("given", x, images)
    with pytest.raises(ValueError, match=r"\(n, 16\)"):
        select_training_vectors("given", x, images, given=given[:, :5])


def test_gt_aligned_keeps_gt_crops_and_aligned_patches_then_tops_up():
    x, images, _ = database(20)
    gt = np.random.default_rng(2).standard_normal((5, D)).astype(np.float32)
    # Patch boxes: pretend patch j of an image covers [j, 0, j + 10, 10]; image 3's gt box matches patch 2 exactly.
    patch_boxes = np.array([[j % 14, 0, j % 14 + 10, 10] for j in range(len(x))], np.float32)
    out = select_training_vectors("gt-aligned", x, images, given=gt, boxes=(patch_boxes, {3: [[2, 0, 12, 10]]}),
                                  max_vectors=40)
    assert out.shape == (40, D)
    rows = as_set(out)
    assert as_set(gt) <= rows  # every ground-truth crop
    aligned = np.flatnonzero((images == 3) & (np.abs(patch_boxes[:, 0] - 2) <= 3))  # IoU >= 0.3 with the gt box
    assert as_set(x[aligned]) <= rows
    assert len(rows - as_set(gt)) == 35  # topped up with database patches
    # Without boxes: gt crops plus a uniform top-up; with a tight budget only (a sample of) gt crops.
    assert as_set(gt) <= as_set(select_training_vectors("gt-aligned", x, images, given=gt, max_vectors=100))
    assert len(select_training_vectors("gt-aligned", x, images, given=gt, max_vectors=3)) == 3
    with pytest.raises(ValueError, match="ground-truth crops"):
        select_training_vectors("gt-aligned", x, images)


def test_salient_keeps_global_and_object_patches():
    x, images, grids = database()
    mask = salient_mask(x, images, grids)
    per_image = mask.reshape(-1, 14)
    assert per_image[:, 0].all()  # the global vector
    assert per_image[:, 1:5].all()  # the 4 "object" patches are the most similar to it
    assert per_image.sum(axis=1).tolist() == [1 + 7] * 50  # global + ceil(0.5 * 13) sub-patches
    out = select_training_vectors("salient", x, images, patch_grids=grids)
    assert as_set(out) == as_set(x[mask])
    with pytest.raises(ValueError, match="needs patch_grids"):
        select_training_vectors("salient", x, images)


def test_salient_without_global_patch_uses_mean_direction():
    x, images, grids = database(5)
    keep = grids != 1
    mask = salient_mask(x[keep], images[keep], grids[keep])
    # The object patches dominate the mean direction, so they are still selected.
    assert mask.sum() == 5 * 7 and mask.reshape(-1, 13)[:, :4].mean() >= 0.9


def test_unknown_source_and_bad_shapes():
    x, images, _ = database(3)
    with pytest.raises(ValueError, match="must be one of"):
        select_training_vectors("random", x, images)
    with pytest.raises(ValueError, match="image ids"):
        select_training_vectors("all", x, images[:-1])
    assert set(SOURCES) == {"all", "given", "gt-aligned", "salient"}
