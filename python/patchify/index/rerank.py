"""The re-rank store: a finer copy of every patch vector, for the second stage of a compressed search.

Why: the max over an image's patches of PQ-approximated scores rewards whichever image's quantisation errors are
largest, so IVFPQ alone loses much of what patches buy (benchmarks/RESULTS.md). The fused scanner is good at
finding the right images among millions (a shortlist of R); this store scores every patch of those R images from
float16 or 8-bit scalar-quantised vectors, so the final ranking, score and winning box are (near) exact.

Rows are indexed by patch id (the engine's ids are dense), `code_size` bytes each: float16 (2 bytes per dimension)
or faiss's ScalarQuantizer QT_8bit (1 byte per dimension, per-dimension min/max learned from the training vectors).
Rows of removed patches stay (ids are never reused) until the index is rebuilt.

Storage: in RAM, or memory-mapped from the saved index folder (`mmap=True` at load): then the operating system
pages in only the rows of shortlisted images, and patches added after loading go to a RAM tail until the next save.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import _core
from ..errors import IndexFormatError

CODECS = ("float16", "int8")
CODES_FILE = "rerank_codes.npy"
QUANTIZER_FILE = "rerank_sq.npy"


_NO_WHOLE_PATCH = np.zeros(0, np.int64)


@dataclass(frozen=True)
class GlobalFusion:
    """Global + patch fusion inside the second stage (the engine's `global_weight` on IVFPQ indexes): a shortlisted
    image with a whole-image (grid 1) patch scores weight * <q, that patch> + (1 - weight) * its best patch score;
    images without one keep their best patch score. whole_patch: per image id, its whole-image patch id, -1 if none
    (patchify.fusion.whole_image_rows)."""
    whole_patch: np.ndarray
    weight: float


def _faiss() -> Any:
    import faiss

    return faiss


class RerankStore:
    """Patch vectors by patch id, encoded with `codec` ("float16" or "int8")."""

    def __init__(self, dim: int, codec: str) -> None:
        if codec not in CODECS:
            raise ValueError(f"rerank codec must be one of {CODECS}, got {codec!r}")
        self.dim = int(dim)
        self.codec = codec
        self.code_size = 2 * self.dim if codec == "float16" else self.dim
        self._sq: Any = None  # faiss.ScalarQuantizer for int8, once trained
        # int8: its per-dimension minimum and range (faiss QT_8bit), what the C++ scorer reads; empty for float16
        self._vmin = self._vdiff = np.zeros(0, np.float32)
        self._base = np.zeros((0, self.code_size), np.uint8)  # memory-mapped rows (after load with mmap) or empty
        self._tail = np.zeros((0, self.code_size), np.uint8)  # rows in RAM, amortised growth
        self._n_tail = 0

    # ------------------------------------------------------------------ state
    @property
    def is_trained(self) -> bool:
        return self.codec == "float16" or self._sq is not None

    @property
    def n_rows(self) -> int:
        return len(self._base) + self._n_tail

    @property
    def memory_mapped(self) -> bool:
        return isinstance(self._base, np.memmap) and len(self._base) > 0

    def ram_bytes(self) -> int:
        """Bytes held in RAM (the memory-mapped rows are the page cache's, not counted)."""
        held = 0 if self.memory_mapped else self._base.nbytes
        return int(held + self._n_tail * self.code_size)

    def describe(self) -> str:
        where = "memory-mapped from the index folder" if self.memory_mapped else "in RAM"
        return f"{self.codec}, {self.code_size} bytes per patch, {where}"

    # ------------------------------------------------------------------ building
    def train(self, vectors: np.ndarray) -> None:
        """int8: learns each dimension's range from `vectors` (faiss ScalarQuantizer QT_8bit); float16: nothing."""
        if self.codec != "int8":
            return
        faiss = _faiss()
        sq = faiss.ScalarQuantizer(self.dim, faiss.ScalarQuantizer.QT_8bit)
        sq.train(np.ascontiguousarray(vectors, np.float32))
        self._set_quantizer(sq)

    def trained_copy(self) -> "RerankStore":
        """An empty store with this one's codec and int8 ranges."""
        copy = RerankStore(self.dim, self.codec)
        if self._sq is not None:
            copy._set_quantizer(self._sq)  # read-only from here on: encode/decode never change it
        return copy

    def _set_quantizer(self, sq: Any) -> None:
        self._sq = sq
        trained = _faiss().vector_to_array(sq.trained).astype(np.float32)
        self._vmin, self._vdiff = trained[:self.dim].copy(), trained[self.dim:].copy()

    def encode(self, vectors: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(vectors, np.float32)
        if self.codec == "float16":
            return x.astype(np.float16).view(np.uint8).reshape(len(x), self.code_size)
        if self._sq is None:
            raise RuntimeError("RerankStore: train() the int8 quantiser first")
        return self._sq.compute_codes(x)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        if self.codec == "float16":
            return np.ascontiguousarray(codes).view(np.float16).astype(np.float32)
        return self._sq.decode(np.ascontiguousarray(codes))

    def add(self, vectors: np.ndarray, patch_ids: np.ndarray) -> None:
        """Stores `vectors` at rows `patch_ids` (rows beyond the end grow the RAM tail)."""
        if len(patch_ids) == 0:
            return
        codes = self.encode(vectors)
        need = int(patch_ids.max()) + 1
        if need > self.n_rows:
            self._grow(need)
        in_base = patch_ids < len(self._base)
        if in_base.any():  # a memory-mapped row is read-only: only ids past it may be added after loading
            raise ValueError(f"patch ids {patch_ids[in_base][:5].tolist()} are already stored")
        self._tail[patch_ids - len(self._base)] = codes

    def _grow(self, n_rows: int) -> None:
        rows = n_rows - len(self._base)
        if rows > len(self._tail):
            grown = np.zeros((max(rows, 2 * len(self._tail), 1024), self.code_size), np.uint8)
            grown[:self._n_tail] = self._tail[:self._n_tail]
            self._tail = grown
        self._n_tail = rows

    # ------------------------------------------------------------------ scoring
    def _codes(self, patch_ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(patch_ids, np.int64)
        n_base = len(self._base)
        if n_base == 0:
            return self._tail[ids]
        codes = np.empty((len(ids), self.code_size), np.uint8)
        in_base = ids < n_base
        codes[in_base] = self._base[ids[in_base]]
        codes[~in_base] = self._tail[ids[~in_base] - n_base]
        return codes

    def rows(self, patch_ids: np.ndarray) -> np.ndarray:
        """Decoded float32 vectors (n, dim) of these patch ids."""
        return self.decode(self._codes(patch_ids))

    def max_over_images(self, queries: np.ndarray, candidates: np.ndarray, image_patches: "ImagePatches",
                        num_threads: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """For candidates (nq, r) image ids (-1 = none): the max score over each image's patches and the patch
        reaching it, (nq, r) each (-inf / -1 for none). The C++ scorer (cpp/src/patchify/rerank.h), GIL released."""
        return _core.rerank_max(*self._rows_and_images(image_patches), np.ascontiguousarray(queries, np.float32),
                                np.ascontiguousarray(candidates, np.int64), num_threads)

    def top_over_images(self, queries: np.ndarray, candidates: np.ndarray, candidate_scores: np.ndarray, k: int,
                        image_patches: "ImagePatches", num_threads: int = 0, fusion: "GlobalFusion | None" = None
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """`max_over_images` (fused with each image's whole-image score when `fusion` is given), then each query's k
        best candidates by that score, best first (ties in candidate order), in one C++ call: (first-stage scores
        carried from candidate_scores, scores, image ids, patch ids), (nq, k) each, -inf / -1 where no image.
        k <= candidates.shape[1]."""
        whole, weight = (fusion.whole_patch, fusion.weight) if fusion is not None else (_NO_WHOLE_PATCH, 0.0)
        return _core.rerank_top(*self._rows_and_images(image_patches), np.ascontiguousarray(queries, np.float32),
                                np.ascontiguousarray(candidates, np.int64),
                                np.ascontiguousarray(candidate_scores, np.float32), int(k),
                                np.ascontiguousarray(whole, np.int64), float(weight), num_threads)

    def _rows_and_images(self, image_patches: "ImagePatches"
                         ) -> tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The arguments both C++ scorers take first: codec, rows (saved base, RAM tail), int8 ranges, image ->
        patch ids."""
        return (self.codec, np.ascontiguousarray(self._base), self._tail[:self._n_tail], self._vmin, self._vdiff,
                image_patches.starts, image_patches.patch_ids)

    # ------------------------------------------------------------------ persistence
    def save_files(self, directory: Path) -> list[str]:
        directory = Path(directory)
        codes = np.lib.format.open_memmap(directory / CODES_FILE, mode="w+", dtype=np.uint8,
                                          shape=(self.n_rows, self.code_size))
        codes[:len(self._base)] = self._base
        codes[len(self._base):] = self._tail[:self._n_tail]
        codes.flush()
        del codes
        if self.codec == "float16":
            return [CODES_FILE]
        np.save(directory / QUANTIZER_FILE, _faiss().vector_to_array(self._sq.trained), allow_pickle=False)
        return [CODES_FILE, QUANTIZER_FILE]

    @classmethod
    def load_files(cls, directory: Path, dim: int, codec: str, *, mmap: bool) -> "RerankStore":
        self = cls(dim, codec)
        path = Path(directory) / CODES_FILE
        try:
            codes = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise IndexFormatError(f"{path}: corrupt or incomplete ({exc})") from None
        if codes.dtype != np.uint8 or codes.ndim != 2 or codes.shape[1] != self.code_size:
            raise IndexFormatError(f"{path}: {codes.dtype} array of shape {codes.shape}, expected uint8 rows of "
                                   f"{self.code_size} bytes ({codec}, dim {dim})")
        self._base = codes
        if codec == "int8":
            sq_path = Path(directory) / QUANTIZER_FILE
            try:
                trained = np.load(sq_path, allow_pickle=False)
            except (OSError, ValueError, EOFError) as exc:
                raise IndexFormatError(f"{sq_path}: corrupt or missing ({exc})") from None
            if trained.dtype != np.float32 or trained.shape != (2 * dim,):
                raise IndexFormatError(f"{sq_path}: expected {2 * dim} float32 ranges, got {trained.shape}")
            faiss = _faiss()
            sq = faiss.ScalarQuantizer(dim, faiss.ScalarQuantizer.QT_8bit)
            sq.trained.resize(2 * dim)
            faiss.copy_array_to_vector(trained, sq.trained)
            self._set_quantizer(sq)
        return self


class ImagePatches:
    """image id -> its patch ids (CSR built from the patch -> image map). Adds of new images extend it (a copy, no
    sort); removed images keep their entries, which nobody asks for (the first stage never returns them)."""

    def __init__(self, patch_image: np.ndarray, n_images: int, *, patch_ids: np.ndarray | None = None,
                 starts: np.ndarray | None = None) -> None:
        if patch_ids is not None and starts is not None:
            self.patch_ids, self.starts = patch_ids, starts
            return
        live = np.flatnonzero(patch_image >= 0)
        owners = patch_image[live]
        order = np.argsort(owners, kind="stable")
        self.patch_ids = live[order].astype(np.int64)
        self.starts = np.searchsorted(owners[order], np.arange(n_images + 1)).astype(np.int64)

    @property
    def n_images(self) -> int:
        return len(self.starts) - 1

    def extended(self, patch_ids: np.ndarray, image_ids: np.ndarray, n_images: int) -> "ImagePatches":
        """With the patches of images all new (ids >= n_images so far, < n_images)."""
        first = self.n_images
        order = np.argsort(image_ids, kind="stable")
        counts = np.bincount(image_ids - first, minlength=n_images - first)
        starts = np.concatenate([self.starts, self.starts[-1] + np.cumsum(counts)])
        return ImagePatches(np.zeros(0, np.int32), n_images,
                            patch_ids=np.concatenate([self.patch_ids, patch_ids[order]]), starts=starts)

    def ranges(self, image_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ids = np.asarray(image_ids, np.int64)
        return self.starts[ids], self.starts[ids + 1]

    def patch_ids_of(self, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
        counts = ends - starts
        if counts.sum() == 0:
            return np.zeros(0, np.int64)
        # positions starts[i] .. ends[i] - 1 for every i, without a Python loop
        base = np.repeat(starts - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
        return self.patch_ids[base + np.arange(counts.sum())]
