"""Disk cache of patch embeddings, so an image is encoded once per backbone whatever the grid level.

Grid levels nest (L3's patches contain L0..L2's), so an entry written for grids (1, 2, 3, 4) also serves any
subset of those grids: evaluations that sweep L0..L3 encode every image once.
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any, Sequence

import numpy as np


def default_cache_root() -> Path:
    root = os.environ.get("PATCHIFY_CACHE_DIR")
    return Path(root) if root else Path.home() / ".cache" / "patchify"


def content_key(data: bytes | np.ndarray) -> str:
    """A stable key for an image's content (file bytes, or array bytes plus shape and dtype)."""
    digest = hashlib.sha1()
    if isinstance(data, np.ndarray):
        digest.update(f"{data.dtype}{data.shape}".encode())
        digest.update(np.ascontiguousarray(data).tobytes())
    else:
        digest.update(data)
    return digest.hexdigest()


class EmbeddingCache:
    """Maps (image content, backbone, overlap, cell sizing) to the patch vectors of every grid encoded so far.
    cell_sizing: how cells were sized for the backbone when not all at its input size (e.g. {"fit": 196, "max":
    224}); None for fixed-size cells, whose entries keep the namespace they had before cell sizing existed."""

    def __init__(self, directory: str | os.PathLike, backbone_identity: dict[str, Any], overlap: float,
                 cell_sizing: dict[str, Any] | None = None) -> None:
        key: dict[str, Any] = {"backbone": backbone_identity, "overlap": round(float(overlap), 6)}
        if cell_sizing is not None:
            key["cell_sizing"] = cell_sizing
        namespace = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        self.directory = Path(directory) / namespace
        self.directory.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.npz"

    def _read(self, key: str) -> tuple[list[int], np.ndarray, int, int] | None:
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as entry:
                cached_grids = [int(g) for g in entry["grids"]]
                vectors = entry["vectors"]
                width, height = (int(v) for v in entry["size"])
        except (OSError, ValueError, KeyError):
            return None  # a damaged entry is a miss; the next put rewrites it
        if len(vectors) != sum(g * g for g in cached_grids):
            return None
        return cached_grids, vectors, width, height

    @staticmethod
    def _rows(cached_grids: Sequence[int], grids: Sequence[int]) -> np.ndarray:
        starts = np.cumsum([0] + [g * g for g in cached_grids])
        return np.concatenate([np.arange(starts[i], starts[i + 1]) for i in (list(cached_grids).index(g)
                                                                             for g in grids)])

    def get(self, key: str, grids: Sequence[int]) -> tuple[np.ndarray, int, int] | None:
        """(vectors for `grids` in that order, width, height), or None when any grid is missing."""
        entry = self._read(key)
        if entry is None or not set(grids) <= set(entry[0]):
            return None
        cached_grids, vectors, width, height = entry
        return vectors[self._rows(cached_grids, grids)], width, height

    def put(self, key: str, grids: Sequence[int], vectors: np.ndarray, width: int, height: int) -> None:
        """Stores `grids`' vectors, keeping the other grids an existing entry for this image holds (e.g. the 4x4
        cells a whitening learned from, next to the indexed levels)."""
        entry = self._read(key)
        if entry is not None and entry[2:] == (width, height) and not set(entry[0]) <= set(grids):
            old_grids, old_vectors = entry[0], entry[1]
            merged = sorted(set(old_grids) | set(grids))
            parts = [vectors[self._rows(grids, [g])] if g in grids else old_vectors[self._rows(old_grids, [g])]
                     for g in merged]
            grids, vectors = merged, np.concatenate(parts)
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.npz")
        np.savez(staging, grids=np.asarray(grids, dtype=np.int32), vectors=vectors.astype(np.float32),
                 size=np.asarray([width, height], dtype=np.int64))
        os.replace(staging, path)
