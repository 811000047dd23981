"""The contract every patch index (flat, IVFPQ) fulfils, so the engine can hold either."""
from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class PatchIndex(Protocol):
    """Stores L2-normalised patch vectors, each tagged with a global patch id and the id of its image, and
    ranks images for a query by the max inner product over their patches.

    search() returns three (nq, k) arrays: scores (float32, best first), image ids and winning patch ids
    (int64); rows with fewer than k images are padded with -inf / -1.
    """

    kind: str
    dim: int
    num_threads: int

    @property
    def ntotal(self) -> int: ...

    @property
    def is_trained(self) -> bool: ...

    def train(self, vectors: np.ndarray) -> None: ...

    def add(self, vectors: np.ndarray, patch_ids: np.ndarray, image_ids: np.ndarray) -> None: ...

    def remove_images(self, image_ids: np.ndarray) -> int: ...

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...

    def nbytes(self) -> int: ...

    def save(self, directory: Path) -> None: ...
