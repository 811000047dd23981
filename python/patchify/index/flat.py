"""Exact ("flat") patch index: every stored patch vector is compared with every query in C++.

An image's score is the max inner product over its patches (vectors are expected L2-normalised, so this is the
max cosine similarity); search returns the top-k images, best first, each with its winning patch. Ties: larger
score first, then the smaller image id; within an image the smaller patch id wins.

Storage is float32 or float16 (half the memory and memory traffic; queries and arithmetic stay float32).
Search releases the GIL and runs on `num_threads` threads (0 = all cores): query batches split over threads and
a single query splits the database. `numpy_reference_search` is the plain numpy definition used by tests and
benchmarks.
"""
from __future__ import annotations

import numbers
import tokenize
from pathlib import Path

import numpy as np

from .. import _core
from ..config import FlatConfig
from ..errors import IndexFormatError
from .base import check_ids, check_queries, check_vectors, result_width

VECTORS_FILE = "flat_vectors.npy"
PATCH_IDS_FILE = "flat_patch_ids.npy"
IMAGE_IDS_FILE = "flat_image_ids.npy"


class FlatIndex:
    """Exact max-over-patches index; implements `patchify.index.base.PatchIndex`.

    >>> index = FlatIndex(384, dtype="float16")
    >>> index.add(vectors, patch_ids, image_ids)
    >>> scores, images, patches = index.search(queries, k=10)
    """

    kind = "flat"
    dim: int
    dtype: str
    num_threads: int
    _core: _core.FlatPatchIndex

    def __init__(self, dim: int, dtype: str = FlatConfig.dtype, num_threads: int = 0) -> None:
        if not isinstance(dim, numbers.Integral) or dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        dtype = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
        FlatConfig(dtype=dtype)  # validates
        self.dim = int(dim)
        self.dtype = dtype
        self.num_threads = int(num_threads)
        self._core = _core.FlatPatchIndex(self.dim, float16=dtype == "float16")

    def __repr__(self) -> str:
        return f"FlatIndex(dim={self.dim}, dtype={self.dtype!r}, ntotal={self.ntotal}, images={self.n_images})"

    # ------------------------------------------------------------------ PatchIndex protocol
    @property
    def config(self) -> FlatConfig:
        return FlatConfig(dtype=self.dtype)

    @property
    def ntotal(self) -> int:
        """Number of stored patch vectors."""
        return int(self._core.ntotal)

    @property
    def n_images(self) -> int:
        return int(self._core.n_images)

    @property
    def is_trained(self) -> bool:
        return True  # nothing to learn

    def train(self, vectors: np.ndarray) -> None:
        """No-op: an exact index needs no training (kept for the PatchIndex contract)."""

    def add(self, vectors: np.ndarray, patch_ids: np.ndarray, image_ids: np.ndarray) -> None:
        """Appends (n, dim) vectors with one patch id and one image id each (ids >= 0).

        float32 C-contiguous input (and float16 into a float16 index) is read without a copy; other float dtypes
        are converted. Patches of an image may arrive over several calls: the index regroups them (slower)."""
        vectors = self._vectors(vectors, "vectors")
        n = vectors.shape[0]
        patch_ids = check_ids(patch_ids, "patch_ids", n)
        image_ids = check_ids(image_ids, "image_ids", n)
        self._core.add(vectors, patch_ids, image_ids)

    def remove_images(self, image_ids: np.ndarray) -> int:
        """Removes every patch of these images; returns the number of patches removed (unknown ids count 0)."""
        return int(self._core.remove_images(check_ids(np.atleast_1d(np.asarray(image_ids)), "image_ids", -1)))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Top-k images for each query: (scores float32, image ids int64, winning patch ids int64), each
        (nq, min(k, images stored)), best first. A 1-D query is a batch of one."""
        queries = check_queries(queries, self.dim)
        k = result_width(k, self.n_images)
        if k == 0:
            return (np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64),
                    np.zeros((len(queries), 0), np.int64))
        return self._core.search(queries, k, self.num_threads)

    def stored_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """Copies of the stored vectors (n, dim) in the index's dtype and their patch ids (n,), rows grouped by
        image (e.g. to re-learn a transform of them)."""
        return np.array(self._core.vectors_view()), np.array(self._core.patch_ids_view(), dtype=np.int64)

    def nbytes(self) -> int:
        """Bytes of memory the index holds (vectors, ids and the per-image tables)."""
        return int(self._core.nbytes())

    def save_files(self, directory: Path | str) -> list[str]:
        """Writes the vectors and their patch ids (rows grouped by image) into `directory`, no settings; returns
        the file names. Do not add/remove from other threads while saving."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        # Views of the C++ buffers: np.save streams them, so a large index is not duplicated in memory.
        np.save(directory / VECTORS_FILE, self._core.vectors_view(), allow_pickle=False)
        np.save(directory / PATCH_IDS_FILE, self._core.patch_ids_view(), allow_pickle=False)
        return [VECTORS_FILE, PATCH_IDS_FILE]

    @classmethod
    def load_files(cls, directory: Path | str, config: FlatConfig, dim: int, patch_image: np.ndarray,
                   num_threads: int = 0) -> "FlatIndex":
        """Reads what `save_files` wrote; the image of each patch comes from the caller's patch table
        (patch id -> image id, -1 = removed)."""
        directory = Path(directory)
        vectors, patch_ids = cls._read_rows(directory, dim)
        patch_image = np.asarray(patch_image)
        if len(patch_ids) and (patch_ids.min() < 0 or patch_ids.max() >= len(patch_image)):
            raise IndexFormatError(f"{directory / PATCH_IDS_FILE}: patch ids outside the patch table "
                                   f"(0..{len(patch_image) - 1})")
        image_ids = patch_image[patch_ids].astype(np.int64)
        if (image_ids < 0).any() or (patch_image >= 0).sum() != len(patch_ids):
            raise IndexFormatError(f"{directory / PATCH_IDS_FILE}: {len(patch_ids)} stored patches do not match "
                                   f"the {(patch_image >= 0).sum()} patches of images not removed")
        return cls._from_rows(directory, vectors, patch_ids, image_ids, config.dtype, num_threads)

    def save(self, directory: Path | str) -> None:
        """Standalone persistence (an index used without the engine): `save_files` plus flat_image_ids.npy."""
        self.save_files(directory)
        np.save(Path(directory) / IMAGE_IDS_FILE, self._core.row_image_ids(), allow_pickle=False)

    @classmethod
    def load(cls, directory: Path | str, dim: int | None = None, num_threads: int = 0) -> "FlatIndex":
        """Reads what `save` wrote. `dim`, when given, must match the stored vectors. Missing, corrupt or
        inconsistent files raise IndexFormatError (a ValueError) naming the file."""
        directory = Path(directory)
        vectors, patch_ids = cls._read_rows(directory, dim)
        image_ids = _load_npy(directory / IMAGE_IDS_FILE)
        if image_ids.ndim != 1 or image_ids.shape[0] != len(patch_ids) or image_ids.dtype != np.int64:
            raise IndexFormatError(f"{directory / IMAGE_IDS_FILE}: expected {len(patch_ids)} int64 ids, got "
                                   f"{image_ids.dtype} with shape {image_ids.shape}")
        return cls._from_rows(directory, vectors, patch_ids, image_ids, vectors.dtype.name, num_threads)

    @staticmethod
    def _read_rows(directory: Path, dim: int | None) -> tuple[np.ndarray, np.ndarray]:
        vectors = _load_npy(directory / VECTORS_FILE)
        patch_ids = _load_npy(directory / PATCH_IDS_FILE)
        if vectors.ndim != 2 or vectors.dtype not in (np.float32, np.float16):
            raise IndexFormatError(f"{directory / VECTORS_FILE}: expected a 2-D float32/float16 array, "
                                   f"got {vectors.dtype} with shape {vectors.shape}")
        if dim is not None and vectors.shape[1] != dim:
            raise IndexFormatError(f"{directory / VECTORS_FILE}: vectors have dimension {vectors.shape[1]}, "
                                   f"expected {dim}")
        if patch_ids.ndim != 1 or patch_ids.shape[0] != vectors.shape[0] or patch_ids.dtype != np.int64:
            raise IndexFormatError(f"{directory / PATCH_IDS_FILE}: expected {vectors.shape[0]} int64 ids, got "
                                   f"{patch_ids.dtype} with shape {patch_ids.shape}")
        return vectors, patch_ids

    @classmethod
    def _from_rows(cls, directory: Path, vectors: np.ndarray, patch_ids: np.ndarray, image_ids: np.ndarray,
                   dtype: str, num_threads: int) -> "FlatIndex":
        if vectors.dtype.name != dtype:
            raise IndexFormatError(f"{directory / VECTORS_FILE}: {vectors.dtype} vectors, the settings say {dtype}")
        index = cls(vectors.shape[1], dtype=dtype, num_threads=num_threads)
        try:
            index._core.add(np.ascontiguousarray(vectors), patch_ids, image_ids)
        except ValueError as exc:
            raise IndexFormatError(f"{directory}: corrupt flat index ({exc})") from None
        return index

    # ------------------------------------------------------------------ extras
    @property
    def kernel(self) -> str:
        """The C++ kernel in use: 'avx2' (AVX2/FMA/F16C) or 'generic' (portable); settable for testing."""
        return str(self._core.kernel)

    @kernel.setter
    def kernel(self, name: str) -> None:
        self._core.kernel = name

    def _vectors(self, vectors: np.ndarray, name: str) -> np.ndarray:
        return check_vectors(vectors, self.dim, name, keep_float16=self.dtype == "float16")


def _load_npy(path: Path) -> np.ndarray:
    if not path.is_file():
        raise IndexFormatError(f"{path}: missing from the index folder")
    try:
        return np.load(path, allow_pickle=False)
    # Truncated or garbled .npy; numpy parses a garbled header with tokenize, which raises its own TokenError.
    except (ValueError, OSError, EOFError, SyntaxError, tokenize.TokenError) as exc:
        raise IndexFormatError(f"{path}: corrupt ({exc})") from None


def numpy_reference_search(vectors: np.ndarray, image_ids: np.ndarray, queries: np.ndarray, k: int,
                           patch_ids: np.ndarray | None = None, query_batch: int = 8,
                           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The definition of flat search in plain numpy: score(image) = max over its patches of <query, patch>;
    top-k images by (-score, image id); the winning patch is the best one (smaller patch id on ties).

    Returns (scores, image ids, patch ids), each (nq, k), padded with -inf / -1. Without `patch_ids` the row
    numbers of `vectors` stand in for patch ids. Queries are processed `query_batch` at a time to bound memory.
    """
    vectors = np.asarray(vectors, dtype=np.float32)
    queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
    image_ids = np.asarray(image_ids, dtype=np.int64)
    n = len(vectors)
    patch_ids = np.arange(n, dtype=np.int64) if patch_ids is None else np.asarray(patch_ids, dtype=np.int64)
    nq = len(queries)
    scores = np.full((nq, k), -np.inf, np.float32)
    out_images = np.full((nq, k), -1, np.int64)
    out_patches = np.full((nq, k), -1, np.int64)
    if n == 0:
        return scores, out_images, out_patches
    order = np.lexsort((patch_ids, image_ids))  # rows grouped by image, patch ids ascending within an image
    sorted_vectors = vectors[order]
    sorted_images = image_ids[order]
    sorted_patches = patch_ids[order]
    images, starts, counts = np.unique(sorted_images, return_index=True, return_counts=True)
    kk = min(k, len(images))
    for q0 in range(0, nq, query_batch):
        sims = queries[q0:q0 + query_batch] @ sorted_vectors.T                        # (b, n)
        best = np.maximum.reduceat(sims, starts, axis=1)                              # (b, images)
        # First row (= smallest patch id) reaching the image's max.
        hit = sims == np.repeat(best, counts, axis=1)
        first = np.minimum.reduceat(np.where(hit, np.arange(n), n), starts, axis=1)
        for b in range(len(best)):
            row = best[b]
            cut = np.partition(row, len(row) - kk)[len(row) - kk] if kk < len(row) else -np.inf
            cand = np.flatnonzero(row >= cut)                                         # keeps boundary ties
            top = cand[np.lexsort((images[cand], -row[cand]))][:kk]
            scores[q0 + b, :kk] = row[top]
            out_images[q0 + b, :kk] = images[top]
            out_patches[q0 + b, :kk] = sorted_patches[first[b, top]]
    return scores, out_images, out_patches
