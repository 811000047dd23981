"""Global + patch score fusion, folded into the stored vectors.

An image's score is w * global + (1 - w) * best patch, where global is the query's similarity to the image's
whole-image (grid 1) patch G. Why: patches win where the object is small (the max finds it), the whole image wins
where the object fills much of the photo (a cell cuts it into pieces); on whitened vectors a small w keeps the
first and recovers most of the second (benchmarks/RESULTS.md, "Retrieval quality"). w = 0 is the paper's plain max.

Because w * <q, G> is the same for every patch of the image,

    w * <q, G> + (1 - w) * max_p <q, v_p>  =  max_p <q, w * G + (1 - w) * v_p>,

so storing u_p = w * G + (1 - w) * v_p instead of v_p makes the index's own max-over-patches search return the
fused score exactly, at no cost at search time, and the winning patch (the box) is the same as the plain max's.
The whole-image patch itself stores u = G, so G, and from it every v_p, can be read back from a flat index
(`unfold`): changing w re-folds the stored vectors once, and no other table is kept.

Flat indexes only: an IVFPQ index keeps plain vectors (folded ones pull an image's patches into fewer coarse lists,
so the first stage reaches fewer images) and the engine fuses its second stage's exact scores instead.
"""
from __future__ import annotations

import numpy as np


def whole_image_rows(grid: np.ndarray, image: np.ndarray, n_images: int | None = None) -> np.ndarray:
    """Per image id (0 .. n_images - 1, default max id + 1), the row of its whole-image (grid 1) patch among these
    rows, -1 where it has none."""
    grid, image = np.asarray(grid), np.asarray(image)
    n = (int(image.max()) + 1 if len(image) else 0) if n_images is None else n_images
    lookup = np.full(n, -1, np.int64)
    whole = np.flatnonzero(grid == 1)
    lookup[image[whole]] = whole
    return lookup


def _global_rows(grid: np.ndarray, image: np.ndarray) -> np.ndarray:
    """For each row, the row of its image's whole-image patch (-1 if the image has none among these rows)."""
    image = np.asarray(image)
    if len(image) == 0:
        return np.zeros(0, np.int64)
    return whole_image_rows(grid, image)[image]


def fold(vectors: np.ndarray, grid: np.ndarray, image: np.ndarray, weight: float) -> np.ndarray:
    """u = weight * G + (1 - weight) * v for every row whose image has a whole-image row among these rows (G = that
    row); other rows unchanged. vectors (n, d) float32, grid and image (n,) per row (image ids >= 0)."""
    if weight == 0.0 or len(vectors) == 0:
        return vectors
    source = _global_rows(grid, image)
    has = (source >= 0) & (np.asarray(grid) != 1)  # the whole-image row itself stays G, bit for bit
    out = np.array(vectors, dtype=np.float32, copy=True)
    out[has] = weight * vectors[source[has]] + (1.0 - weight) * vectors[has]
    return out


def unfold(stored: np.ndarray, grid: np.ndarray, image: np.ndarray, weight: float) -> np.ndarray:
    """Inverse of `fold` (weight < 1): v = (u - weight * G) / (1 - weight), with G = the whole-image row's u."""
    if weight == 0.0 or len(stored) == 0:
        return np.asarray(stored, np.float32)
    if not weight < 1.0:
        raise ValueError("vectors folded with global_weight 1 keep only the whole image: they cannot be unfolded")
    source = _global_rows(grid, image)
    has = (source >= 0) & (np.asarray(grid) != 1)
    stored = np.asarray(stored, np.float32)
    out = stored.copy()
    out[has] = (stored[has] - weight * stored[source[has]]) / (1.0 - weight)
    return out
