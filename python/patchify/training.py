"""Which vectors train a compressed index (the IVF coarse quantiser and the PQ codebooks).

The codebooks are most accurate where their training vectors are dense, so the choice of training set decides
where quantisation error lands. Sources:

- "all" (default): a uniform random subsample of the database patches. Unbiased; the safe choice.
- "given": vectors the caller supplies (`given=`), e.g. from a representative held-out collection.
- "gt-aligned": supervised. Queries are object crops, so train on what object crops look like: the caller passes
  the vectors of crops cut at ground-truth boxes (`given=`, embedded with the same backbone). Optionally
  `boxes=(patch_boxes, gt_boxes)` also selects the database patches whose box overlaps (IoU >= 0.3) a ground-truth
  box of their image. Because ground truth is usually small, the rest is topped up with a uniform sample of
  database patches so that the quantiser still covers the whole collection (every patch must be encoded).
- "salient": unsupervised, needs no ground truth. For each image keep the patches most similar to the image's
  global (grid-1, whole image) vector, plus that global vector. Why: the global descriptor summarises what the
  image is about (its dominant object); patches that agree with it cover that content, while the ones that
  disagree are mostly background, sky, borders and blank regions - near-duplicates across the collection that
  dominate a uniform sample and waste centroids on content nobody queries for. Queries are object crops, so
  codebooks trained on object-like patches put their resolution where the ranking is decided.

The result is at most `max_vectors` rows (uniformly subsampled with `seed`), float32 and C-contiguous.
"""
from __future__ import annotations

import numpy as np

from .config import MAX_TRAINING_VECTORS as DEFAULT_MAX_VECTORS
from .config import TRAINING_SOURCES as SOURCES
SALIENT_FRACTION = 0.5  # share of each image's sub-patches kept by "salient"
GT_IOU = 0.3


def select_training_vectors(source: str, vectors: np.ndarray, image_ids: np.ndarray,
                            patch_grids: np.ndarray | None = None, *, boxes: tuple[np.ndarray, dict] | None = None,
                            given: np.ndarray | None = None, max_vectors: int = DEFAULT_MAX_VECTORS,
                            seed: int = 0) -> np.ndarray:
    """Training vectors for an index, chosen by `source` (see the module docstring).

    vectors: (n, d) database patches; image_ids: (n,) their image; patch_grids: (n,) grid size of each patch
    (1 = whole image), needed by "salient"; given: (g, d) caller vectors for "given" / "gt-aligned";
    boxes: for "gt-aligned", (patch_boxes (n, 4) [x0, y0, x1, y1], {image id: (b, 4) ground-truth boxes}).
    """
    if source not in SOURCES:
        raise ValueError(f"training source must be one of {SOURCES}, got {source!r}")
    if max_vectors < 1:
        raise ValueError(f"max_vectors must be >= 1, got {max_vectors}")
    x = np.asarray(vectors, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"vectors must be (n, d), got shape {x.shape}")
    image_ids = np.asarray(image_ids).reshape(-1)
    if len(image_ids) != len(x):
        raise ValueError(f"{len(x)} vectors but {len(image_ids)} image ids")
    rng = np.random.default_rng(seed)

    if source == "all":
        return _subsample(x, max_vectors, rng)
    if source == "given":
        return _subsample(_check_given(given, x.shape[1], source), max_vectors, rng)
    if source == "gt-aligned":
        gt = _check_given(given, x.shape[1], source)
        aligned = _gt_aligned_mask(boxes, image_ids) if boxes is not None else np.zeros(len(x), bool)
        picked = _subsample(np.concatenate([gt, x[aligned]]), max_vectors, rng)
        room = max_vectors - len(picked)  # top up from the patches not picked yet
        if room <= 0:
            return picked
        return np.ascontiguousarray(np.concatenate([picked, _subsample(x[~aligned], room, rng)]))
    # salient
    if patch_grids is None:
        raise ValueError("training source 'salient' needs patch_grids (the grid size of each patch, 1 = whole image)")
    return _subsample(x[salient_mask(x, image_ids, patch_grids)], max_vectors, rng)


def salient_mask(vectors: np.ndarray, image_ids: np.ndarray, patch_grids: np.ndarray,
                 fraction: float = SALIENT_FRACTION) -> np.ndarray:
    """Boolean mask: per image, its global vector and the ceil(fraction * n_sub) sub-patches most similar to it.
    Images without a grid-1 patch use the normalised mean of their patches as the global vector."""
    grids = np.asarray(patch_grids).reshape(-1)
    if len(grids) != len(vectors):
        raise ValueError(f"{len(vectors)} vectors but {len(grids)} patch grids")
    _, inv = np.unique(image_ids, return_inverse=True)
    n_img = int(inv.max()) + 1 if len(inv) else 0
    glob = np.zeros((n_img, vectors.shape[1]), np.float32)
    np.add.at(glob, inv, vectors)  # fallback: mean direction of the image's patches
    whole = grids == 1
    glob[inv[whole]] = vectors[whole]
    glob /= np.maximum(np.linalg.norm(glob, axis=1, keepdims=True), 1e-12)
    sim = np.einsum("ij,ij->i", vectors, glob[inv])
    sim[whole] = np.inf  # the global vector itself is always kept
    # Rank within image: sort by (image, -similarity) and count the position inside each image's run.
    order = np.lexsort((-sim, inv))
    sorted_inv = inv[order]
    start = np.searchsorted(sorted_inv, sorted_inv, side="left")
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order)) - start
    n_sub = np.bincount(inv[~whole], minlength=n_img)
    keep_sub = np.ceil(fraction * n_sub).astype(np.int64)
    n_whole = np.bincount(inv[whole], minlength=n_img)
    return rank < (keep_sub + n_whole)[inv]


def _gt_aligned_mask(boxes: tuple[np.ndarray, dict], image_ids: np.ndarray) -> np.ndarray:
    patch_boxes, gt_boxes = boxes
    patch_boxes = np.asarray(patch_boxes, dtype=np.float64)
    if patch_boxes.shape != (len(image_ids), 4):
        raise ValueError(f"patch boxes must be ({len(image_ids)}, 4), got {patch_boxes.shape}")
    mask = np.zeros(len(image_ids), bool)
    for image, gts in gt_boxes.items():
        rows = np.flatnonzero(image_ids == image)
        g = np.asarray(gts, dtype=np.float64).reshape(-1, 4)
        if len(rows) == 0 or len(g) == 0:
            continue
        p = patch_boxes[rows][:, None, :]
        iw = np.clip(np.minimum(p[..., 2], g[:, 2]) - np.maximum(p[..., 0], g[:, 0]), 0, None)
        ih = np.clip(np.minimum(p[..., 3], g[:, 3]) - np.maximum(p[..., 1], g[:, 1]), 0, None)
        inter = iw * ih
        area_p = (p[..., 2] - p[..., 0]) * (p[..., 3] - p[..., 1])
        area_g = (g[:, 2] - g[:, 0]) * (g[:, 3] - g[:, 1])
        iou = inter / np.maximum(area_p + area_g - inter, 1e-12)
        mask[rows[(iou >= GT_IOU).any(axis=1)]] = True
    return mask


def _check_given(given: np.ndarray | None, dim: int, source: str) -> np.ndarray:
    if given is None:
        raise ValueError(f"training source {source!r} needs given=(n, {dim}) vectors (Patchify(training_vectors=...))"
                         + (" (the ground-truth crops' vectors)" if source == "gt-aligned" else ""))
    g = np.asarray(given, dtype=np.float32)
    if g.ndim != 2 or g.shape[1] != dim or len(g) == 0:
        raise ValueError(f"given vectors must be a non-empty (n, {dim}) array, got shape {g.shape}")
    return g


def _subsample(x: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    if n <= 0:
        return x[:0]
    if len(x) > n:
        x = x[np.sort(rng.choice(len(x), n, replace=False))]
    return np.ascontiguousarray(x, dtype=np.float32)
