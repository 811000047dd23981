"""
Patchify C++ core: patch tiler, flat max-over-patches index, fused IVFPQ scanner, re-rank scorer
"""
from __future__ import annotations
import collections.abc
import numpy
import numpy.typing
import typing
class FlatPatchIndex:
    """
    Exact max-over-patches index (float32 or float16 storage). Use patchify.index.FlatIndex.
    """
    def __init__(self, dim: typing.SupportsInt | typing.SupportsIndex, float16: bool = False) -> None:
        ...
    def add(self, vectors: numpy.ndarray, patch_ids: numpy.ndarray, image_ids: numpy.ndarray) -> None:
        """
        (n, dim) float32 (or float16 into a float16 index) vectors with (n,) int64 patch and image ids, all C-contiguous; all-or-nothing
        """
    def nbytes(self) -> int:
        ...
    def patch_ids_view(self) -> numpy.ndarray:
        """
        Read-only view of the patch id of each stored row; invalid after add/remove_images
        """
    def remove_images(self, image_ids: numpy.ndarray) -> int:
        """
        Removes every patch of these (n,) int64 image ids; returns the number of patches removed
        """
    def row_image_ids(self) -> numpy.typing.NDArray[numpy.int64]:
        """
        Image id of each stored row (a copy)
        """
    def search(self, queries: numpy.ndarray, k: typing.SupportsInt | typing.SupportsIndex, num_threads: typing.SupportsInt | typing.SupportsIndex = 0) -> tuple:
        """
        (nq, dim) float32 C-contiguous queries -> (scores, image ids, patch ids), each (nq, min(k, n_images)), best first
        """
    def vectors_view(self) -> numpy.ndarray:
        """
        Read-only view of the stored vectors (rows grouped by image); invalid after add/remove_images
        """
    @property
    def dim(self) -> int:
        ...
    @property
    def float16(self) -> bool:
        ...
    @property
    def kernel(self) -> str:
        """
        'avx2' (AVX2+FMA+F16C) or 'generic'; settable, for tests and benchmarks
        """
    @kernel.setter
    def kernel(self, arg1: str) -> None:
        ...
    @property
    def n_images(self) -> int:
        ...
    @property
    def ntotal(self) -> int:
        ...
class IVFPQScanner:
    """
    Fused max-over-patches ADC scanner over a faiss IndexIVFPQ's or IndexIVFPQFastScan's inverted lists (inner product, by_residual). Built by patchify.index.ivfpq.
    """
    def __init__(self, coarse_centroids: numpy.ndarray, pq_centroids: numpy.ndarray, nbits: typing.SupportsInt | typing.SupportsIndex, packed4: bool = False) -> None:
        """
        coarse_centroids (nlist, dim) and pq_centroids (M, 2^nbits, dim / M), float32 C-contiguous (copied). packed4: the lists hold 4-bit codes in faiss's fast-scan blocks of 32 vectors, scanned with uint8 tables in SIMD registers (scores quantised as faiss's fast-scan search quantises them).
        """
    def coarse_probe(self, query: numpy.ndarray, nprobe: typing.SupportsInt | typing.SupportsIndex) -> numpy.typing.NDArray[numpy.int64]:
        """
        The native coarse search's probed lists for one query.
        """
    def search(self, queries: numpy.ndarray, probes: numpy.ndarray, k: typing.SupportsInt | typing.SupportsIndex, num_threads: typing.SupportsInt | typing.SupportsIndex = 0) -> tuple:
        """
        Top-k images per query: (scores, image_ids, patch_ids), each (nq, min(k, num_images)), padded with -inf / -1 where a query reaches fewer images.
        """
    def search_native(self, queries: numpy.ndarray, nprobe: typing.SupportsInt | typing.SupportsIndex, k: typing.SupportsInt | typing.SupportsIndex, num_threads: typing.SupportsInt | typing.SupportsIndex = 0) -> tuple:
        """
        As search, with the coarse search (top-nprobe centroids by inner product) done in C++ too.
        """
    def set_image_map(self, patch_to_image: numpy.ndarray, num_images: typing.SupportsInt | typing.SupportsIndex) -> None:
        """
        int32 array indexed by patch id giving the image id (-1: removed); image ids are < num_images.
        """
    def set_lists(self, codes: collections.abc.Sequence[numpy.ndarray], ids: collections.abc.Sequence[numpy.ndarray], images: collections.abc.Sequence[numpy.ndarray] = []) -> None:
        """
        One uint8 code array (n * code_size bytes, or whole fast-scan blocks) and one int64 id array per inverted list (views of faiss's memory), and optionally each list's int32 image ids in list order (saves a map lookup per scanned code).
        """
def hardware_threads() -> int:
    """
    Number of threads used when num_threads <= 0.
    """
def ivfpq_patch_scores(scanner: IVFPQScanner, query: numpy.ndarray, probes: numpy.ndarray) -> tuple[numpy.typing.NDArray[numpy.int64], numpy.typing.NDArray[numpy.float32]]:
    """
    Test hook: every (patch id, score) the scanner computes for one query over the probed lists.
    """
def patch_boxes(height: typing.SupportsInt | typing.SupportsIndex, width: typing.SupportsInt | typing.SupportsIndex, grids: collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex], overlap: typing.SupportsFloat | typing.SupportsIndex = 0.0) -> tuple:
    """
    Patch boxes of one image: (boxes int32 (P, 4) x0 y0 x1 y1, grid int32 (P,), cell int32 (P,)).
    """
def rerank_max(codec: str, base: numpy.ndarray, tail: numpy.ndarray, vmin: numpy.ndarray, vdiff: numpy.ndarray, starts: numpy.ndarray, patch_ids: numpy.ndarray, queries: numpy.ndarray, candidates: numpy.ndarray, num_threads: typing.SupportsInt | typing.SupportsIndex = 0) -> tuple[numpy.typing.NDArray[numpy.float32], numpy.typing.NDArray[numpy.int64]]:
    """
    Second stage of a compressed search: for candidates (nq, r) image ids (-1 = none), the max inner product over every patch of each image (image i's patch ids: patch_ids[starts[i]:starts[i+1]]), read from uint8 code rows indexed by patch id (rows [0, len(base)) in base, the rest in tail): float16 (2*dim bytes) or faiss QT_8bit (dim bytes; vmin, vdiff float32 (dim,)). Returns (best (nq, r) float32, -inf for none; winner (nq, r) int64 patch ids, -1 for none).
    """
def rerank_top(codec: str, base: numpy.ndarray, tail: numpy.ndarray, vmin: numpy.ndarray, vdiff: numpy.ndarray, starts: numpy.ndarray, patch_ids: numpy.ndarray, queries: numpy.ndarray, candidates: numpy.ndarray, candidate_scores: numpy.ndarray, k: typing.SupportsInt | typing.SupportsIndex, whole_patch: numpy.ndarray, global_weight: typing.SupportsFloat | typing.SupportsIndex, num_threads: typing.SupportsInt | typing.SupportsIndex = 0) -> tuple[numpy.typing.NDArray[numpy.float32], numpy.typing.NDArray[numpy.float32], numpy.typing.NDArray[numpy.int64], numpy.typing.NDArray[numpy.int64]]:
    """
    rerank_max, then each query's k best candidates by that score, best first (ties in candidate order): the whole second stage of a top-k search. candidate_scores (nq, r) float32: the first stage's scores, carried along. global_weight in [0, 1] (0: none): an image with a whole-image patch (whole_patch (n_images,) int64, by image id, -1 for none; read only when global_weight > 0) scores global_weight * its whole-image score + (1 - global_weight) * its best patch score. Returns (first-stage scores, scores, image ids, patch ids), (nq, k) each; -inf / -1 where no image.
    """
def tile_images(images: collections.abc.Sequence, grids: collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex], input_size: typing.SupportsInt | typing.SupportsIndex, mean: typing.Annotated[collections.abc.Sequence[typing.SupportsFloat | typing.SupportsIndex], "FixedSize(3)"], std: typing.Annotated[collections.abc.Sequence[typing.SupportsFloat | typing.SupportsIndex], "FixedSize(3)"], interpolation: str, overlap: typing.SupportsFloat | typing.SupportsIndex, out: numpy.ndarray, num_threads: typing.SupportsInt | typing.SupportsIndex = 0) -> tuple:
    """
    Tiles HxWx3 uint8 images (any strides) into grid patches, resized (Pillow-exact) and normalised into `out` (N, 3, s, s) float32/float16, C-contiguous, in place. Returns (boxes (P, 4), image (P,), grid (P,), cell (P,)) int32.
    """
MAX_GRID: int = 256
__version__: str = '0.1.0.dev0'
