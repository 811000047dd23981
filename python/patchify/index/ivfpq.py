"""Compressed patch index: faiss IndexIVFPQ storage (IndexIVFPQFastScan for 4-bit codes), searched by our fused
C++ max-over-patches scanner.

faiss does what it is good at: training the coarse quantiser and the PQ codebooks, encoding patches (residuals
w.r.t. their coarse centroid, `by_residual`), maintaining the inverted lists, removing ids, reading and writing
the index. The C++ extension (`_core.IVFPQScanner`, cpp/src/patchify/ivfpq_scan.h) picks the `nprobe` lists
(coarse="native", default: exactly the lists of an fp32 search over the centroids, found through an int8 copy of
them with an error bound and exact rescoring of the near-ties, in the same GIL-free call) or takes faiss's own
quantizer.search result (coarse="faiss"), then scans those lists' PQ codes with faiss's inner-product ADC
arithmetic and keeps the best patch per *image* in the same pass, returning the top-k images directly. Asking
faiss for a patch-level top-k' and grouping in numpy would need a large k' (an image's patches crowd the top of the
list).

faiss ids are our global patch ids; a dense int32 array maps patch id -> image id (-1 once removed). The C++
core never links faiss: it reads faiss's inverted lists through numpy views (faiss.rev_swig_ptr) that are
rebuilt after every add/remove, because faiss may reallocate its lists.

nbits=4 (the default, with m=32) stores the codes in faiss's fast-scan layout (IndexIVFPQFastScan: 4-bit codes in
blocks of 32 vectors, M/2 bytes per patch) and the scanner reads them with uint8 lookup tables held in SIMD registers
(cpp/src/patchify/pq4_fastscan.h), still keeping the best patch per image inside the scan; first-stage scores are
then quantised as faiss's own fast-scan search quantises them. Indexes saved with nbits=4 before the fast-scan
layout existed hold a plain IndexIVFPQ and are still read and scanned as such (the faiss file says which layout it
holds).

Two stages by default (rerank="int8"): the scanner shortlists the best `shortlist(k)` images by PQ scores, then
every patch of those images is scored from a finer copy of the vectors (patchify.index.rerank, C++ in
cpp/src/patchify/rerank.h): the max over PQ approximations rewards the images whose quantisation errors are
largest, and the re-rank puts flat's accuracy back (benchmarks/RESULTS.md). `first_stage` is the scanner alone.

Not safe for concurrent mutation: do not add/remove from one thread while another searches.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .. import _core
from ..config import MIN_POINTS_PER_CENTROID, IVFPQConfig, rerank_shortlist_size
from ..errors import IndexFormatError
from .base import check_ids, check_queries, check_vectors, result_width
from .rerank import GlobalFusion, ImagePatches, RerankStore

FORMAT_NAME = "patchify-ivfpq"
FORMAT_VERSION = 1
INDEX_FILE = "ivfpq_index.faiss"
MAP_FILE = "ivfpq_patch_image.npy"
META_FILE = "ivfpq_meta.json"



def _faiss() -> Any:
    import faiss  # imported lazily: only this index needs it

    return faiss


def auto_nlist(n_train: int) -> int:
    """~4 sqrt(n) coarse lists (the usual faiss rule of thumb), capped so that each centroid still gets at least
    MIN_POINTS_PER_CENTROID training points."""
    return max(1, min(int(round(4.0 * math.sqrt(max(n_train, 1)))), n_train // MIN_POINTS_PER_CENTROID))


class IVFPQIndex:
    """Inner-product IVFPQ over L2-normalised patch vectors; fulfils `PatchIndex`.

    nlist=None picks ~4 sqrt(n_train) lists at train time. `factory` takes a faiss spec "IVF<nlist>,PQ<m>[x<nbits>]"
    instead of nlist/m/nbits. `nprobe` and `num_threads` may be changed at any time; num_threads <= 0 uses all
    hardware threads for batches (one query runs on the calling thread). faiss's own threads (training, adding,
    the coarse search) follow faiss.omp_set_num_threads.
    """

    kind = "ivfpq"

    def __init__(self, dim: int, nlist: int | None = IVFPQConfig.nlist, m: int = IVFPQConfig.m,
                 nbits: int = IVFPQConfig.nbits, nprobe: int = IVFPQConfig.nprobe, num_threads: int = 0, *,
                 factory: str | None = None, train_iterations: int | None = None, coarse: str = "native",
                 training_source: str = IVFPQConfig.training_source, rerank: str | None = IVFPQConfig.rerank,
                 rerank_shortlist: int | None = IVFPQConfig.rerank_shortlist,
                 rerank_storage: str = IVFPQConfig.rerank_storage) -> None:
        if factory is not None:
            parsed = IVFPQConfig.from_factory(factory)
            nlist, m, nbits = parsed.nlist, parsed.m, parsed.nbits
        # The config checks each setting's range; what depends on the dimension is checked here.
        checked = IVFPQConfig(nlist=nlist, m=m, nbits=nbits, nprobe=nprobe, training_source=training_source,
                              rerank=rerank, rerank_shortlist=rerank_shortlist, rerank_storage=rerank_storage)
        rerank = checked.rerank  # "none" spelled out means None
        if dim <= 0:
            raise ValueError(f"dim must be positive, got {dim}")
        if dim % m:
            raise ValueError(f"m (PQ sub-quantisers, {m}) must divide the dimension {dim}")
        if coarse not in ("native", "faiss"):
            raise ValueError(f"coarse must be 'native' or 'faiss', got {coarse!r}")
        self.dim = int(dim)
        self.training_source = training_source  # recorded with the index: which vectors trained its codebooks
        self.nlist = None if nlist is None else int(nlist)
        self.m = int(m)
        self.nbits = int(nbits)
        self.nprobe = int(nprobe)
        self.num_threads = int(num_threads)
        # k-means iterations for the coarse quantiser and the PQ codebooks (None: faiss's default, 25). Fewer
        # iterations train much faster at a small cost in recall - benchmarks use that on large collections.
        self.train_iterations = train_iterations
        # Coarse search (which lists to probe): "native" runs it inside the same GIL-free C++ call as the scan;
        # "faiss" asks faiss's quantiser from Python (bit-exact faiss probes, one more Python round trip). They
        # differ only when two centroids tie to float rounding at the nprobe boundary.
        self.coarse = coarse
        self._index: Any = None  # faiss.IndexIVFPQ or IndexIVFPQFastScan once trained
        self._map = np.zeros(0, np.int32)  # patch id -> image id, -1 = absent
        self._num_images = 0  # max image id + 1 ever added (sizes the scanner's dense per-image scratch)
        self._scanner: Any = None
        self._lists_stale = True
        # Second stage: the finer copy of the vectors, and image -> patch ids (rebuilt lazily after add/remove).
        self.rerank_shortlist = rerank_shortlist
        self.rerank_storage = rerank_storage
        self._rerank = RerankStore(self.dim, rerank) if rerank is not None else None
        self._image_patches: ImagePatches | None = None

    # ------------------------------------------------------------------ state
    @classmethod
    def from_faiss(cls, faiss_index: Any, *, nprobe: int = IVFPQConfig.nprobe, num_threads: int = 0,
                   coarse: str = "native", rerank: str | None = IVFPQConfig.rerank) -> "IVFPQIndex":
        """Wraps a trained, empty faiss IndexIVFPQ or IndexIVFPQFastScan (bbs 32; inner product, by residual), e.g.
        one trained elsewhere. An int8 re-rank store learns its ranges from the first vectors added."""
        ivf = _checked_faiss_index(faiss_index, "faiss_index")
        if ivf.ntotal:
            raise ValueError(f"from_faiss takes an empty trained index (it holds {ivf.ntotal} vectors): patch -> "
                             "image ids are only known for vectors added through IVFPQIndex.add")
        self = cls(int(ivf.d), nlist=int(ivf.nlist), m=int(ivf.pq.M), nbits=int(ivf.pq.nbits), nprobe=nprobe,
                   num_threads=num_threads, coarse=coarse, rerank=rerank)
        self._index = ivf
        self._build_scanner()
        return self

    def trained_copy(self) -> "IVFPQIndex":
        """An empty index with this one's training (coarse quantiser, PQ codebooks, int8 re-rank ranges) and
        settings. Indexes sharing one training hold comparable codes and scores, so their results merge exactly
        (the shards of patchify.distributed)."""
        if not self.is_trained:
            raise ValueError("trained_copy: the index is not trained")
        ivf = _faiss().clone_index(self._index)
        ivf.reset()  # drops the vectors and ids, keeps the quantiser and codebooks
        copy = type(self)(self.dim, nlist=self.nlist, m=self.m, nbits=self.nbits, nprobe=self.nprobe,
                          num_threads=self.num_threads, train_iterations=self.train_iterations, coarse=self.coarse,
                          training_source=self.training_source, rerank=self.rerank,
                          rerank_shortlist=self.rerank_shortlist, rerank_storage=self.rerank_storage)
        copy._index = ivf
        if self._rerank is not None:
            copy._rerank = self._rerank.trained_copy()
        copy._build_scanner()
        return copy

    @property
    def config(self) -> IVFPQConfig:
        """The settings as they are now (nlist as trained, nprobe as last set)."""
        return IVFPQConfig(nlist=self.nlist, m=self.m, nbits=self.nbits, nprobe=int(self.nprobe),
                           training_source=self.training_source, rerank=self.rerank,
                           rerank_shortlist=self.rerank_shortlist, rerank_storage=self.rerank_storage)

    @property
    def fast_scan(self) -> bool:
        """Whether the codes are (or, untrained, will be) in faiss's 4-bit fast-scan layout: nbits=4, except an
        index loaded from a plain faiss IndexIVFPQ with 4-bit codes (saved before this layout existed)."""
        if self._index is not None:
            return _is_fast_scan(self._index)
        return self.nbits == 4

    @property
    def rerank(self) -> str | None:
        """The re-rank store's codec (None: one-stage search)."""
        return self._rerank.codec if self._rerank is not None else None

    @property
    def rerank_store(self) -> RerankStore | None:
        return self._rerank

    @property
    def ntotal(self) -> int:
        return 0 if self._index is None else int(self._index.ntotal)

    @property
    def n_images(self) -> int:
        """Images with at least one patch in the index."""
        live = self._map[self._map >= 0]
        return int(len(np.unique(live)))

    def patch_image_map(self) -> np.ndarray:
        """Read-only int32 array: patch id -> image id (-1: never added or removed)."""
        view = self._map.view()
        view.flags.writeable = False
        return view

    @property
    def is_trained(self) -> bool:
        return self._index is not None and bool(self._index.is_trained)

    def min_training_vectors(self, nlist: int | None = None) -> int:
        """Training vectors needed: MIN_POINTS_PER_CENTROID per coarse list and per PQ centroid (2^nbits)."""
        return self.config.min_training_vectors(nlist)

    def train(self, vectors: np.ndarray) -> None:
        faiss = _faiss()
        x = check_vectors(vectors, self.dim, "training vectors")
        need = self.min_training_vectors()
        if len(x) < need:
            what = f"nlist={self.nlist}, " if self.nlist else ""
            raise ValueError(
                f"IVFPQ training needs at least {need} vectors ({MIN_POINTS_PER_CENTROID} per centroid for "
                f"{what}{1 << self.nbits} PQ centroids), got {len(x)}; index more patches, lower nlist/nbits, "
                "or use the flat index")
        nlist = self.nlist or auto_nlist(len(x))
        if self.fast_scan:
            # The fast-scan layout (blocks of 32, "fs" = bbs 32). faiss leaves by_residual off for inner product by
            # default; on, as for the 8-bit index: residuals w.r.t. the coarse centroid quantise more finely, and
            # the scanner adds <q, centroid> per list.
            index = faiss.index_factory(self.dim, f"IVF{nlist},PQ{self.m}x4fs", faiss.METRIC_INNER_PRODUCT)
            index.by_residual = True
        else:
            # The factory gives an IndexIVFPQ that owns its flat inner-product quantiser; by_residual is the default.
            index = faiss.index_factory(self.dim, f"IVF{nlist},PQ{self.m}x{self.nbits}", faiss.METRIC_INNER_PRODUCT)
            # Polysemous training (re-ordering PQ centroids so that Hamming distance on codes mimics the true
            # distance) only serves faiss's polysemous filtering, which we never use, and costs minutes at 8 bits.
            index.do_polysemous_training = False
        if self.train_iterations is not None:
            index.cp.niter = index.pq.cp.niter = int(self.train_iterations)
        index.train(x)
        if self._rerank is not None:
            self._rerank.train(x)
        self._index = index
        self.nlist = nlist
        self._build_scanner()

    def add(self, vectors: np.ndarray, patch_ids: np.ndarray, image_ids: np.ndarray) -> None:
        if not self.is_trained:
            raise RuntimeError("IVFPQIndex.add: train() the index first")
        x = check_vectors(vectors, self.dim, "vectors")
        pids = check_ids(patch_ids, "patch_ids", len(x))
        imgs = check_ids(image_ids, "image_ids", len(x))
        if len(x) == 0:
            return
        if imgs.max() >= np.iinfo(np.int32).max:  # the scanner's patch -> image map is int32
            raise ValueError(f"image_ids must be below 2^31 - 1, got {int(imgs.max())}")
        if len(np.unique(pids)) != len(pids):
            raise ValueError("duplicate patch ids in one add() call")
        known = pids[pids < len(self._map)]
        if np.any(self._map[known] >= 0):
            raise ValueError(f"patch ids already in the index: {known[self._map[known] >= 0][:10].tolist()}")
        if self._rerank is not None:  # first: it checks the ids, and nothing is changed when it refuses
            if not self._rerank.is_trained:  # wrapped with from_faiss: no training vectors were seen
                self._rerank.train(x)
            self._rerank.add(x, pids)
        self._index.add_with_ids(x, pids)
        # Copy-on-write: the scanner holds a pointer to the current map until it is handed the new one.
        new_map = np.full(max(len(self._map), int(pids.max()) + 1), -1, np.int32)
        new_map[: len(self._map)] = self._map
        new_map[pids] = imgs.astype(np.int32)
        self._map = new_map
        images_before = self._num_images
        self._num_images = max(self._num_images, int(imgs.max()) + 1)
        self._lists_stale = True
        if self._image_patches is not None and int(imgs.min()) >= images_before:
            self._image_patches = self._image_patches.extended(pids, imgs, self._num_images)
        else:  # patches of images already indexed: rebuilt at the next two-stage search
            self._image_patches = None

    def remove_images(self, image_ids: np.ndarray) -> int:
        ids = check_ids(np.atleast_1d(np.asarray(image_ids)), "image_ids", -1)
        if self._index is None or len(ids) == 0:
            return 0
        patches = np.flatnonzero(np.isin(self._map, ids)).astype(np.int64)
        if len(patches) == 0:
            return 0
        removed = int(self._index.remove_ids(patches))
        new_map = self._map.copy()
        new_map[patches] = -1
        self._map = new_map
        self._lists_stale = True
        return removed  # image -> patches stays valid: the first stage never returns a removed image

    # ------------------------------------------------------------------ search
    def search(self, queries: np.ndarray, k: int, fusion: GlobalFusion | None = None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Top-k images per query: (scores, image ids, patch ids), each (nq, min(k, images stored)), best first;
        padded with -inf / -1 where the probed lists hold fewer images. fusion: global + patch fusion in the
        second stage (needs the re-rank store)."""
        q, k = self._checked(queries, k)
        self._check_fusion(fusion)
        if k == 0:  # no image to rank: no columns, whatever k is
            return _no_columns(len(q))
        if self._rerank is None:
            return self._first_stage(q, k)
        return self._two_stage_scored(q, k, fusion=fusion)[1:]

    def first_stage(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The fused scanner alone (PQ scores, no re-rank), as `search` returns it."""
        q, k = self._checked(queries, k)
        return self._first_stage(q, k) if k else _no_columns(len(q))

    def _checked(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, int]:
        """Queries as float32 (nq, dim) and the result width: min(k, images), 0 for an empty index."""
        q = check_queries(queries, self.dim)
        width = result_width(k, self._num_images)  # checks k, also on an empty index
        return q, (width if self.ntotal else 0)

    def _first_stage(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        scanner = self._ready_scanner()
        if self.coarse == "native":
            return scanner.search_native(q, self._nprobe(), k, self.num_threads)
        return scanner.search(q, self.probe(q), k, self.num_threads)

    def shortlist(self, k: int) -> int:
        """Images the first stage hands to the second for a top-k search."""
        return rerank_shortlist_size(k, self.rerank_shortlist, self.nbits)

    def search_shortlist(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All `shortlist(k)` images of a top-k two-stage search, re-scored and sorted: (nq, shortlist) arrays as
        `search` returns them (for re-ranking them further, e.g. global + patch fusion)."""
        if self._rerank is None:
            raise ValueError("search_shortlist needs the re-rank store (rerank='int8' or 'float16')")
        q, k = self._checked(queries, k)
        if k == 0:
            return _no_columns(len(q))
        return self.search_shortlist_scored(q, k)[1:]

    def search_shortlist_scored(self, queries: np.ndarray, k: int, fusion: GlobalFusion | None = None
                                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """`search_shortlist` with each image's first-stage (PQ) score in front: (first-stage scores, scores, image
        ids, patch ids). The top k of a two-stage search are the best k by score among the best shortlist(k) by
        first-stage score, so indexes sharing one training merge exactly with these (patchify.distributed).
        fusion: as in `search`, the scores fused and the shortlist sorted by them."""
        if self._rerank is None:
            raise ValueError("search_shortlist_scored needs the re-rank store (rerank='int8' or 'float16')")
        q, k = self._checked(queries, k)
        if k == 0:
            return (np.zeros((len(q), 0), np.float32), *_no_columns(len(q)))
        width = result_width(self.shortlist(k), self._num_images)
        return self._two_stage_scored(q, width, shortlist=width, fusion=fusion)

    def _check_fusion(self, fusion: GlobalFusion | None) -> None:
        if fusion is not None and self._rerank is None:
            raise ValueError("fusion needs the re-rank store (rerank='int8' or 'float16')")

    def _two_stage_scored(self, q: np.ndarray, k: int, shortlist: int | None = None,
                          fusion: GlobalFusion | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The fused scanner's best `shortlist(k)` images (or `shortlist` of them) re-scored from the re-rank store
        (max over each one's patches, fused with its whole-image score when `fusion` is given), the top k of those,
        each image's first-stage score in front: (first-stage scores, scores, image ids, patch ids)."""
        assert self._rerank is not None
        width = shortlist if shortlist is not None else result_width(self.shortlist(k), self._num_images)
        first_scores, first_images, _ = self._first_stage(q, width)
        if self._image_patches is None:
            self._image_patches = ImagePatches(self._map, self._num_images)
        return self._rerank.top_over_images(q, first_images, first_scores, k, self._image_patches, self.num_threads,
                                            fusion)

    def _nprobe(self) -> int:
        return max(1, min(int(self.nprobe), int(self._index.nlist)))

    def coarse_probe(self, query: np.ndarray, nprobe: int) -> np.ndarray:
        """The lists the native (C++) coarse search visits for one query."""
        q = check_queries(query, self.dim)
        return self._ready_scanner().coarse_probe(q[0], int(nprobe))

    def probe(self, queries: np.ndarray) -> np.ndarray:
        """The inverted lists faiss itself would visit: the quantiser's top-nprobe lists per query (nq, nprobe)."""
        _, lists = self._index.quantizer.search(queries, self._nprobe())
        return lists

    def patch_scores(self, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Every (patch id, score) the scanner computes for one query at the current nprobe (for tests/debugging)."""
        q = check_queries(query, self.dim)
        if len(q) != 1:
            raise ValueError("patch_scores takes one query")
        return _core.ivfpq_patch_scores(self._ready_scanner(), q[0], self.probe(q)[0])

    @property
    def faiss_index(self) -> Any:
        """The underlying faiss.IndexIVFPQ or IndexIVFPQFastScan (read-only use: mutate through add/remove_images)."""
        return self._index

    def nbytes(self) -> int:
        """First stage + the re-rank store's RAM (`first_stage_nbytes`, `RerankStore.ram_bytes`)."""
        rerank = self._rerank.ram_bytes() if self._rerank is not None else 0
        return self.first_stage_nbytes() + rerank

    def first_stage_nbytes(self) -> int:
        """RAM of the first stage: PQ codes as stored (fast-scan: whole blocks of 32 vectors per list) + faiss ids
        (int64) + the patch -> image map (int32, indexed by patch id) + for the byte-per-code layouts the same map
        in inverted-list order (int32 per indexed patch, which the scanner reads for every code; the fast-scan
        scanner looks up only the codes that pass its threshold, in the map)."""
        if self._index is None:
            return int(self._map.nbytes)
        if self.fast_scan:
            invlists = self._index.invlists
            list_bytes = _list_code_bytes(invlists, fast_scan=True)
            codes = sum(list_bytes(int(invlists.list_size(list_no))) for list_no in range(self._index.nlist))
            return int(codes + self.ntotal * 8 + self._map.nbytes)
        return int(self.ntotal * (self._index.code_size + 8 + 4) + self._map.nbytes)

    # ------------------------------------------------------------------ persistence
    def save_files(self, directory: Path) -> list[str]:
        """Writes the faiss index (codes, lists, codebooks) into `directory`, no settings; returns the file names.
        The patch -> image map and the settings are the caller's to store (patchify.store)."""
        if self._index is None:
            raise ValueError("IVFPQIndex.save: nothing to save, the index is not trained")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        _faiss().write_index(self._index, str(directory / INDEX_FILE))
        return [INDEX_FILE, *(self._rerank.save_files(directory) if self._rerank is not None else [])]

    @classmethod
    def load_files(cls, directory: Path, config: IVFPQConfig, dim: int, patch_image: np.ndarray, n_images: int,
                   num_threads: int = 0) -> "IVFPQIndex":
        """Reads what `save_files` wrote; settings and the patch -> image map (-1 = removed) come from the
        caller. Errors name the file."""
        path = Path(directory) / INDEX_FILE
        if not path.is_file():
            raise IndexFormatError(f"{path}: missing from the index folder")
        try:
            ivf = _checked_faiss_index(_faiss().read_index(str(path)), str(path))
        except (RuntimeError, ValueError) as exc:
            raise IndexFormatError(f"{path}: corrupt or not an inner-product IVFPQ index ({exc})") from None
        except MemoryError as exc:  # faiss allocates what a (damaged) size field says before reading it
            raise IndexFormatError(f"{path}: corrupt (a size field asks for more memory than there is: {exc})"
                                   ) from None
        if (ivf.d, ivf.pq.M, ivf.pq.nbits) != (dim, config.m, config.nbits) or \
                (config.nlist is not None and ivf.nlist != config.nlist):
            raise IndexFormatError(f"{path}: d/nlist/M/nbits {ivf.d}/{ivf.nlist}/{ivf.pq.M}/{ivf.pq.nbits} do not "
                                   f"match the manifest's {dim}/{config.nlist}/{config.m}/{config.nbits}")
        patch_map = np.ascontiguousarray(patch_image, dtype=np.int32)
        if int((patch_map >= 0).sum()) != ivf.ntotal:
            raise IndexFormatError(f"{path}: {ivf.ntotal} indexed patches, the patch table has "
                                   f"{int((patch_map >= 0).sum())} of images not removed")
        _check_list_ids(ivf, patch_map, path)
        self = cls(dim, nlist=int(ivf.nlist), m=config.m, nbits=config.nbits, nprobe=config.nprobe,
                   num_threads=num_threads, training_source=config.training_source, rerank=config.rerank,
                   rerank_shortlist=config.rerank_shortlist, rerank_storage=config.rerank_storage)
        if config.rerank is not None:
            self._rerank = RerankStore.load_files(Path(directory), dim, config.rerank,
                                                  mmap=config.rerank_storage == "mmap")
            if self._rerank.n_rows < len(patch_map):
                raise IndexFormatError(f"{Path(directory)}: the re-rank store holds {self._rerank.n_rows} patches, "
                                       f"the patch table {len(patch_map)}")
        self._index = ivf
        self._map = patch_map
        self._num_images = int(n_images)
        self._build_scanner()
        return self

    def save(self, directory: Path) -> None:
        """Standalone persistence (an index used without the engine): the faiss file plus the patch -> image map
        and the settings. The engine's saved folders use `save_files` and keep those in their manifest."""
        directory = Path(directory)
        self.save_files(directory)
        np.save(directory / MAP_FILE, self._map)
        meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "dim": self.dim, "ntotal": self.ntotal,
                "num_images": self._num_images, **self.config.to_dict()}
        (directory / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, directory: Path, num_threads: int = 0) -> "IVFPQIndex":
        """Reads what `save` wrote."""
        directory = Path(directory)
        paths = [directory / name for name in (META_FILE, INDEX_FILE, MAP_FILE)]
        missing = [p.name for p in paths if not p.exists()]
        if missing:
            raise IndexFormatError(f"{directory}: not an IVFPQ index, missing {', '.join(missing)}")
        try:
            meta = json.loads(paths[0].read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise IndexFormatError(f"{paths[0]}: unreadable IVFPQ metadata ({exc})") from exc
        if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
            raise IndexFormatError(f"{paths[0]}: not {FORMAT_NAME} metadata")
        if meta.get("format_version") != FORMAT_VERSION:
            raise IndexFormatError(f"{paths[0]}: IVFPQ format version {meta.get('format_version')!r} is not "
                                   f"supported (this Patchify reads version {FORMAT_VERSION})")
        try:
            patch_map = np.load(paths[2], allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise IndexFormatError(f"{paths[2]}: corrupt ({exc})") from None
        if patch_map.dtype != np.int32 or patch_map.ndim != 1 or int((patch_map >= 0).sum()) != meta["ntotal"]:
            raise IndexFormatError(f"{paths[2]}: patch -> image map does not match the {meta['ntotal']} indexed "
                                   "patches")
        config = IVFPQConfig(nlist=meta["nlist"], m=meta["m"], nbits=meta["nbits"], nprobe=meta["nprobe"],
                             training_source=meta.get("training_source", IVFPQConfig.training_source),
                             rerank=meta.get("rerank"), rerank_shortlist=meta.get("rerank_shortlist"),
                             rerank_storage=meta.get("rerank_storage", IVFPQConfig.rerank_storage))
        try:
            return cls.load_files(directory, config, int(meta["dim"]), patch_map, int(meta["num_images"]),
                                  num_threads=num_threads)
        except IndexFormatError as exc:
            raise IndexFormatError(f"{directory}: {INDEX_FILE} does not match {META_FILE} ({exc})") from None

    # ------------------------------------------------------------------ internals
    def _build_scanner(self) -> None:
        faiss = _faiss()
        ivf = self._index
        coarse = ivf.quantizer.reconstruct_n(0, ivf.nlist)
        pq = faiss.vector_to_array(ivf.pq.centroids).reshape(ivf.pq.M, ivf.pq.ksub, ivf.pq.dsub)
        self._scanner = _core.IVFPQScanner(coarse, pq, int(ivf.pq.nbits), packed4=_is_fast_scan(ivf))
        self._lists_stale = True

    def _ready_scanner(self) -> Any:
        if self._lists_stale:
            faiss = _faiss()
            invlists = self._index.invlists
            fast_scan = self.fast_scan
            list_bytes = _list_code_bytes(invlists, fast_scan)
            empty_codes, empty_ids = np.zeros(0, np.uint8), np.zeros(0, np.int64)
            codes, ids, images = [], [], []
            for list_no in range(self._index.nlist):
                n = int(invlists.list_size(list_no))
                if n == 0:
                    codes.append(empty_codes)
                    ids.append(empty_ids)
                else:  # views of faiss's own memory (Array/BlockInvertedLists): nothing is copied
                    codes.append(faiss.rev_swig_ptr(invlists.get_codes(list_no), list_bytes(n)))
                    ids.append(faiss.rev_swig_ptr(invlists.get_ids(list_no), n))
                # The map in list order: the byte-code scan then reads image ids sequentially (no cache miss per
                # code). The fast-scan scan looks up only the codes that pass its threshold: not kept.
                if not fast_scan:
                    images.append(self._map[ids[-1]])
            self._scanner.set_lists(codes, ids, [] if fast_scan else images)
            self._scanner.set_image_map(self._map, self._num_images)
            self._lists_stale = False
        return self._scanner


def _no_columns(nq: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.zeros((nq, 0), np.float32), np.zeros((nq, 0), np.int64), np.zeros((nq, 0), np.int64)


def _check_list_ids(ivf: Any, patch_map: np.ndarray, path: Path) -> None:
    """The inverted lists must hold each patch of the images not removed exactly once: the ids index the patch
    table and the map, so a damaged id would fail the search (or, negative, silently name another patch)."""
    faiss = _faiss()
    invlists = ivf.invlists
    sizes = [int(invlists.list_size(list_no)) for list_no in range(ivf.nlist)]
    ids = [faiss.rev_swig_ptr(invlists.get_ids(list_no), n).copy() for list_no, n in enumerate(sizes) if n]
    stored = np.sort(np.concatenate(ids)) if ids else np.zeros(0, np.int64)
    if not np.array_equal(stored, np.flatnonzero(patch_map >= 0)):
        raise IndexFormatError(f"{path}: the inverted lists' patch ids do not match the patch table's patches of "
                               "images not removed (damaged ids)")


def _is_fast_scan(index: Any) -> bool:
    return isinstance(index, _faiss().IndexIVFPQFastScan)


def _list_code_bytes(invlists: Any, fast_scan: bool) -> Callable[[int], int]:
    """Bytes of codes faiss holds for a list of n: whole blocks of 32 in BlockInvertedLists (fast-scan), n x
    code_size in ArrayInvertedLists. The geometry is read once (a downcast per list cost ~2 ms per rebuild at
    nlist 1024)."""
    if not fast_scan:
        code_size = int(invlists.code_size)
        return lambda n: n * code_size
    blocks = _faiss().downcast_InvertedLists(invlists)
    per_block, block_size = int(blocks.n_per_block), int(blocks.block_size)
    return lambda n: -(-n // per_block) * block_size


def _checked_faiss_index(index: Any, what: str) -> Any:
    faiss = _faiss()
    fast_scan = isinstance(index, faiss.IndexIVFPQFastScan)
    if not (isinstance(index, faiss.IndexIVFPQ) or fast_scan) or index.metric_type != faiss.METRIC_INNER_PRODUCT \
            or not index.by_residual or not index.is_trained:
        raise ValueError(f"{what}: expected a trained inner-product, by-residual faiss IndexIVFPQ or "
                         "IndexIVFPQFastScan")
    if fast_scan and (int(index.bbs) != 32 or int(index.pq.nbits) != 4 or int(index.pq.M) > 256):
        raise ValueError(f"{what}: a fast-scan index needs blocks of 32 (bbs), 4-bit codes and M <= 256; got bbs "
                         f"{index.bbs}, nbits {index.pq.nbits}, M {index.pq.M}")
    return index
