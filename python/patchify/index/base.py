"""The contract every patch index (flat, IVFPQ) fulfils, so the engine can hold either."""
from __future__ import annotations

import numbers
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    from ..config import IndexConfig


@runtime_checkable
class PatchIndex(Protocol):
    """Stores L2-normalised patch vectors, each tagged with a global patch id and the id of its image, and
    ranks images for a query by the max inner product over their patches.

    search() returns three (nq, kk) arrays, kk = min(k, images stored) so that memory never depends on k alone:
    scores (float32, best first), image ids and winning patch ids (int64); rows with fewer than kk images are
    padded with -inf / -1.

    save_files() writes the index's data (no settings: `config` says them, and the caller stores it) and returns
    the file names; each kind has a `load_files` class method taking the config back.
    """

    kind: str
    dim: int
    num_threads: int

    @property
    def config(self) -> "IndexConfig": ...

    @property
    def ntotal(self) -> int: ...

    @property
    def n_images(self) -> int: ...

    @property
    def is_trained(self) -> bool: ...

    def train(self, vectors: np.ndarray) -> None: ...

    def add(self, vectors: np.ndarray, patch_ids: np.ndarray, image_ids: np.ndarray) -> None: ...

    def remove_images(self, image_ids: np.ndarray) -> int: ...

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...

    def nbytes(self) -> int: ...

    def save_files(self, directory: Path) -> list[str]: ...


# Input checks shared by every index, so that flat and IVFPQ reject the same bad input with the same message.

def check_vectors(vectors: np.ndarray, dim: int, name: str, *, keep_float16: bool = False) -> np.ndarray:
    """(n, dim) finite floats as a C-contiguous float32 array (float16 kept as is with keep_float16), without a
    copy when the input already is one."""
    vectors = np.asarray(vectors)
    if vectors.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n, {dim}), got shape {vectors.shape}")
    if vectors.shape[1] != dim:
        raise ValueError(f"{name} have dimension {vectors.shape[1]}, the index holds {dim}")
    if not np.issubdtype(vectors.dtype, np.floating):
        raise ValueError(f"{name} must be a float array, got dtype {vectors.dtype}")
    keep_half = keep_float16 and vectors.dtype == np.float16
    vectors = np.ascontiguousarray(vectors, dtype=np.float16 if keep_half else np.float32)
    _check_finite(vectors, f"{name}: row")
    return vectors


def check_queries(queries: np.ndarray, dim: int) -> np.ndarray:
    """(nq, dim) float32 queries; a 1-D query is a batch of one."""
    queries = np.asarray(queries)
    if queries.ndim == 1:
        queries = queries[None, :]
    if queries.ndim != 2:
        raise ValueError(f"queries must be (nq, {dim}) or ({dim},), got shape {queries.shape}")
    if queries.dtype.kind != "f":
        raise ValueError(f"queries must be a float array, got dtype {queries.dtype}")
    if queries.shape[1] != dim:
        raise ValueError(f"queries have dimension {queries.shape[1]}, the index holds {dim}")
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    _check_finite(queries, "query")
    return queries


def _check_finite(rows: np.ndarray, what: str) -> None:
    """Raises naming the first row with a NaN or infinity. One numpy pass when all is well: a one-query search
    takes ~0.2 ms, and each numpy call here runs with cold caches after the last scan (measured ~3-5 us each); the
    offending row is looked for only on failure."""
    if not np.isfinite(rows).all():
        finite = np.isfinite(rows).all(axis=1)
        raise ValueError(f"{what} {int(np.flatnonzero(~finite)[0])} contains NaN or infinity")


def check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise ValueError(f"k must be an integer >= 1, got {k!r}"[:200])
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return int(k)


def result_width(k: int, n_images: int) -> int:
    """Columns of a search result: min(k, n_images). A search never allocates for more images than exist, so
    k = 10**20 costs what k = n_images costs."""
    return min(check_k(k), max(int(n_images), 0))


def check_ids(ids: np.ndarray, name: str, n: int) -> np.ndarray:
    """n non-negative integer ids as C-contiguous int64 (n = -1 accepts any length)."""
    ids = np.asarray(ids)
    if ids.ndim != 1 or (n >= 0 and ids.shape[0] != n):
        expected = f"1-D with {n} entries (one per vector)" if n >= 0 else "1-D"
        raise ValueError(f"{name} must be {expected}, got shape {ids.shape}")
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{name} must be integers, got dtype {ids.dtype}")
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    if ids.size and ids.min() < 0:
        raise ValueError(f"{name} must be >= 0, got {int(ids.min())}")
    return ids
