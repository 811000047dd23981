"""Global + patch score fusion: image score = w * global score + (1 - w) * best patch score.

Why: patches win where the object is small (the max finds it), the global descriptor wins where the object fills
much of the photo (a cell cuts it into pieces). On whitened vectors a small global weight keeps the first and
recovers most of the second (benchmarks/RESULTS.md, "Retrieval quality"); w = 0 is the paper's plain max.

The global score of an image is the similarity of the query to the image's whole-image (grid 1) patch, kept per
image in `GlobalDescriptors` (float16, in the index's vector space). The index ranks by the max; fusion re-scores a
shortlist of images and is exact for an exact index: the global patch is one of the image's patches, so
global <= max and fused = w * global + (1 - w) * max <= max. An image outside a shortlist of the R best by max has
fused <= max <= the R-th max; so once the k-th best fused score in the shortlist reaches the R-th max, no image
outside can enter the top k. Otherwise the shortlist doubles (bounded by the images stored).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from .errors import IndexFormatError

GLOBAL_DESCRIPTORS_FILE = "global_descriptors.npy"
# First shortlist: this many times k images (at least MIN_SHORTLIST); doubled until the bound above holds.
SHORTLIST_FACTOR = 4
MIN_SHORTLIST = 64

SearchFunction = Callable[[np.ndarray, int], "tuple[np.ndarray, np.ndarray, np.ndarray]"]


class GlobalDescriptors:
    """Per image id, its whole-image vector (float16, NaN row = the image has none, e.g. grids without 1 or a
    removed image). Grows by amortised doubling."""

    def __init__(self, dim: int, rows: np.ndarray | None = None) -> None:
        self.dim = int(dim)
        self._rows = rows if rows is not None else np.empty((0, self.dim), np.float16)
        self._n = len(self._rows)

    def __len__(self) -> int:
        return self._n

    @property
    def rows(self) -> np.ndarray:
        return self._rows[:self._n]

    def nbytes(self) -> int:
        return int(self._n * self.dim * 2)

    def append(self, n_images: int, positions: np.ndarray, vectors: np.ndarray) -> None:
        """Adds `n_images` rows; image `positions[i]` (0..n_images-1, relative to the first new image) gets
        `vectors[i]`, the others a NaN row."""
        new = np.full((n_images, self.dim), np.nan, np.float16)
        if len(positions):
            new[np.asarray(positions, np.int64)] = np.asarray(vectors, np.float32)
        need = self._n + n_images
        if need > len(self._rows):
            grown = np.empty((max(need, 2 * len(self._rows), 16), self.dim), np.float16)
            grown[:self._n] = self._rows[:self._n]
            self._rows = grown
        self._rows[self._n:need] = new
        self._n = need

    def forget(self, image_ids: np.ndarray) -> None:
        """Removed images keep their row (ids are never reused) but lose their vector."""
        self._rows[np.asarray(image_ids, np.int64)] = np.nan

    def scores(self, queries: np.ndarray, image_ids: np.ndarray) -> np.ndarray:
        """(nq, R) similarity of query q to the global vector of image_ids[q, r] (NaN where the image has none or
        the id is -1 padding)."""
        valid = image_ids >= 0
        rows = self._rows[np.where(valid, image_ids, 0)].astype(np.float32)  # (nq, R, d)
        out = np.einsum("qrd,qd->qr", rows, queries.astype(np.float32))
        out[~valid] = np.nan
        return out

    def save_file(self, directory: Path) -> str:
        np.save(Path(directory) / GLOBAL_DESCRIPTORS_FILE, self.rows, allow_pickle=False)
        return GLOBAL_DESCRIPTORS_FILE

    @classmethod
    def load_file(cls, directory: Path, dim: int, n_images: int) -> "GlobalDescriptors":
        path = Path(directory) / GLOBAL_DESCRIPTORS_FILE
        try:
            rows = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise IndexFormatError(f"{path}: corrupt or incomplete ({exc})") from None
        if rows.dtype != np.float16 or rows.shape != (n_images, dim):
            raise IndexFormatError(f"{path}: {rows.dtype} array of shape {rows.shape}, expected float16 "
                                   f"({n_images}, {dim})")
        return cls(dim, np.ascontiguousarray(rows))


def fused_search(search: SearchFunction, queries: np.ndarray, k: int, weight: float,
                 descriptors: GlobalDescriptors, n_images: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-k images by w * global + (1 - w) * max for each query: (scores, image ids, winning patch ids), each
    (nq, kk), kk = min(k, n_images), padded with -inf / -1 like `PatchIndex.search`. `search(queries, r)` is the
    index's max-over-patches search. Images without a global vector score their max."""
    nq = len(queries)
    width = min(k, n_images)
    out_scores = np.full((nq, width), -np.inf, np.float32)
    out_images = np.full((nq, width), -1, np.int64)
    out_patches = np.full((nq, width), -1, np.int64)
    pending = np.arange(nq)
    shortlist = min(n_images, max(SHORTLIST_FACTOR * k, MIN_SHORTLIST))
    while len(pending):
        scores, images, patches = search(queries[pending], shortlist)
        global_scores = descriptors.scores(queries[pending], images)
        fused = np.where(np.isnan(global_scores), scores, weight * global_scores + (1.0 - weight) * scores)
        fused = np.where(images >= 0, fused, -np.inf).astype(np.float32)
        order = np.argsort(-fused, axis=1, kind="stable")[:, :width]
        top = np.take_along_axis(fused, order, axis=1)
        # Bound on any image outside the shortlist: the shortlist's last max score (its rows are sorted best first).
        complete = images.shape[1] >= n_images or shortlist >= n_images
        if complete:
            done = np.ones(len(pending), bool)
        else:
            bound = scores[:, -1]
            done = (images[:, -1] < 0) | (top[:, -1] >= bound)
        rows = pending[done]
        out_scores[rows, :top.shape[1]] = top[done]
        out_images[rows, :top.shape[1]] = np.take_along_axis(images, order, axis=1)[done]
        out_patches[rows, :top.shape[1]] = np.take_along_axis(patches, order, axis=1)[done]
        pending = pending[~done]
        shortlist = min(n_images, 2 * shortlist)
    return out_scores, out_images, out_patches
