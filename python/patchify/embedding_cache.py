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
    """Maps (image content, backbone, overlap) to the patch vectors of every grid encoded so far."""

    def __init__(self, directory: str | os.PathLike, backbone_identity: dict[str, Any], overlap: float) -> None:
        namespace = hashlib.sha1(
            json.dumps({"backbone": backbone_identity, "overlap": round(float(overlap), 6)}, sort_keys=True).encode()
        ).hexdigest()[:16]
        self.directory = Path(directory) / namespace
        self.directory.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.npz"

    def get(self, key: str, grids: Sequence[int]) -> tuple[np.ndarray, int, int] | None:
        """(vectors for `grids` in that order, width, height), or None when any grid is missing."""
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
        if not set(grids) <= set(cached_grids):
            return None
        starts = np.cumsum([0] + [g * g for g in cached_grids])
        rows = np.concatenate([np.arange(starts[i], starts[i + 1]) for i in (cached_grids.index(g) for g in grids)])
        return vectors[rows], width, height

    def put(self, key: str, grids: Sequence[int], vectors: np.ndarray, width: int, height: int) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.npz")
        np.savez(staging, grids=np.asarray(grids, dtype=np.int32), vectors=vectors.astype(np.float32),
                 size=np.asarray([width, height], dtype=np.int64))
        os.replace(staging, path)
