"""The encoder: image sources in, batches of (patch vectors, patch table) out.

Owns the backbone (loaded on first use), the tiling settings and the embedding cache. Database images flow
decode (Pillow, worker threads, a few chunks ahead) -> tile (C++) -> encode (ONNX backbone), one chunk of images
at a time, so memory is bounded by a chunk whatever the number of sources; queries are encoded whole (one global
descriptor each). Other encoders (another tiling mode, another runtime) plug in by offering the same two methods:
`encode_images` and `embed_queries`.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np

from . import _core
from .config import (DEFAULT_BACKBONE, DEFAULT_BATCH_SIZE, DEFAULT_PRECISION, EXPORT_PRECISION, TilingConfig,
                     check_precision)
from .embedding_cache import EmbeddingCache, content_key, default_cache_root
from .errors import BackboneMismatchError, ImageError
from .images import ImageSource, describe_source, load_rgb
from .records import AddReport, NewImage, PatchTable, SkippedImage
from .tiling import TileBatch, cell_input_sizes, prepare_whole_images, tile_images

if TYPE_CHECKING:
    from .backbones import Backbone
    from .preprocess import Preprocess


@dataclass
class EncodedBatch:
    """Encoded images: `vectors` (n, dim) float32, L2-normalised, one row per patch; `patches` says whose and where
    each row is (`patches.image` = position in `images`). `from_cache`: how many of the images the embedding cache
    served."""

    vectors: np.ndarray
    patches: PatchTable
    images: list[NewImage]
    from_cache: int = 0

    @classmethod
    def merge(cls, batches: Sequence["EncodedBatch"]) -> "EncodedBatch":
        """Batches as one (image positions renumbered)."""
        if not batches:
            return cls(np.zeros((0, 0), np.float32), PatchTable.empty(), [])
        offsets = np.cumsum([0] + [len(b.images) for b in batches])
        patches = PatchTable.concatenate(b.patches.with_image(b.patches.image + offsets[i])
                                         for i, b in enumerate(batches))
        return cls(np.concatenate([b.vectors for b in batches]).astype(np.float32, copy=False), patches,
                   [image for b in batches for image in b.images], sum(b.from_cache for b in batches))


class Encoder:
    """Backbone + tiling + embedding cache.

    backbone: a registered name (loaded lazily: searching by vector never loads it) or a backbone object (anything
    with `encode`, `preprocess`, `identity`, `name`, `weights`). precision: what a named backbone runs in ("fp32",
    "int8", "fp16"; a backbone object runs in its own). expected_identity: the identity an index was built with;
    the backbone is checked against it when first used (BackboneMismatchError). embedding_cache: None/False (off),
    True (the user cache) or a folder.

    With `tiling.cell_sizing == "fit"` each grid's cells are encoded at about their own size (see
    tiling.cell_input_sizes); a backbone that takes one input size only gets "fixed" cells instead (the tiling is
    updated when it loads, so an index records what was done)."""

    def __init__(self, backbone: "str | Backbone" = DEFAULT_BACKBONE, tiling: TilingConfig | None = None, *,
                 batch_size: int = DEFAULT_BATCH_SIZE, num_threads: int = 0,
                 embedding_cache: bool | str | os.PathLike | None = None,
                 expected_identity: dict[str, Any] | None = None, check_name: bool = True,
                 log: Callable[[str], None] | None = None, precision: str = DEFAULT_PRECISION) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if isinstance(num_threads, bool) or not isinstance(num_threads, int):
            raise ValueError(f"num_threads must be an integer (0 = all cores), got {num_threads!r}")
        self.tiling = tiling or TilingConfig()
        self.batch_size = batch_size
        self.num_threads = num_threads
        self._log = log or (lambda message: print(message, file=sys.stderr))
        if isinstance(backbone, str):
            if check_name:  # off for a loaded index: searching it by vector must not need its backbone
                from .backbones import check_backbone_name

                check_backbone_name(backbone)
            self._backbone: Backbone | None = None
            self._backbone_name = backbone
            self.precision = check_precision(precision)
        else:
            self._backbone = backbone
            self._backbone_name = backbone.name
            self.precision = getattr(backbone, "precision", EXPORT_PRECISION)
            self._resolve_cell_sizing()
        self._expected_identity = expected_identity
        if self._backbone is not None and expected_identity is not None:
            check_identity(expected_identity, self._backbone.identity)
        self._cache_setting = embedding_cache
        self._cache: EmbeddingCache | None = None

    # ------------------------------------------------------------------ the backbone
    @property
    def backbone_name(self) -> str:
        return self._backbone_name

    @property
    def backbone_loaded(self) -> bool:
        return self._backbone is not None

    @property
    def backbone(self) -> "Backbone":
        """The backbone, loaded on first use and checked against the index's identity."""
        if self._backbone is None:
            from .backbones import load_backbone

            self._backbone = load_backbone(self._backbone_name, num_threads=self.num_threads,
                                           precision=self.precision)
            self._resolve_cell_sizing()
        if self._expected_identity is not None:
            check_identity(self._expected_identity, self._backbone.identity)
            self._expected_identity = None
        return self._backbone

    def identity(self) -> dict[str, Any] | None:
        """The backbone's identity without loading it (the expected one while it is not loaded)."""
        return self._backbone.identity if self._backbone is not None else self._expected_identity

    def _resolve_cell_sizing(self) -> None:
        if self.tiling.cell_sizing == "fit" and getattr(self._backbone, "patch_size", None) is None:
            self.tiling = dataclasses.replace(self.tiling, cell_sizing="fixed")

    def preprocess(self, size: int | None = None) -> "Preprocess":
        """How patches are prepared: the backbone's preprocessing at `size` (default: the tiling's input size)."""
        backbone = self.backbone
        preprocess = backbone.preprocess
        size = size or self.tiling.input_size
        if size is None or size == preprocess.input_size:
            return preprocess
        accepts = getattr(backbone, "accepts_input_size", None)
        if accepts is None or not accepts(size):
            # Refused here, not deep in onnxruntime.
            patch = getattr(backbone, "patch_size", None)
            takes = f"{preprocess.input_size} px only (a fixed-size export)" if patch is None else \
                f"sides that are multiples of {patch} px"
            raise ValueError(f"input size {size} px: backbone {self._backbone_name!r} takes {takes}")
        return dataclasses.replace(preprocess, input_size=int(size))

    def cell_sizes(self, height: int, width: int) -> tuple[int, ...]:
        """The side each grid's cells of an H x W image are encoded at (tiling.cell_input_sizes)."""
        backbone = self.backbone
        return cell_input_sizes(height, width, self.tiling.grids, self.tiling,
                                self.tiling.input_size or backbone.preprocess.input_size,
                                getattr(backbone, "patch_size", None))

    # ------------------------------------------------------------------ database images
    def encode_grid_cells(self, sources: Sequence[ImageSource], grid: int, max_images: int, *,
                          progress: bool = False) -> tuple[np.ndarray, int]:
        """Vectors of the grid x grid cells of (up to) the first `max_images` sources, e.g. to learn a whitening
        from, not to index: same backbone, preprocessing and embedding cache, this tiling's overlap. Unusable
        sources are passed over silently (the indexing pass reports them). Returns (vectors, images encoded)."""
        tiling = dataclasses.replace(self.tiling, grids=(grid,))
        cells = Encoder(self.backbone, tiling, batch_size=self.batch_size, num_threads=self.num_threads,
                        embedding_cache=self._cache_setting, log=self._log)
        vectors, n_images = [], 0
        for batch in cells.encode_images(list(sources)[:max_images], AddReport(), progress=progress):
            vectors.append(batch.vectors)
            n_images += len(batch.images)
        if not vectors:
            return np.zeros((0, 0), np.float32), 0
        return np.concatenate(vectors), n_images

    def encode_images(self, sources: Sequence[ImageSource], report: AddReport, *,
                      progress: bool = False) -> Iterator[EncodedBatch]:
        """Encodes `sources` chunk by chunk (a chunk holds about `batch_size` patches), in input order. Unusable
        sources are appended to `report.skipped` with their reason; timings and cache hits are added to
        `report`."""
        from tqdm.auto import tqdm

        if sources and not self.backbone_loaded:
            if progress:
                self._log(f"loading backbone {self._backbone_name} (the first use exports it to ONNX: up to a "
                          "minute)...")
            _ = self.backbone
        chunk = max(1, -(-self.batch_size // self.tiling.patches_per_image))
        chunks = [sources[i:i + chunk] for i in range(0, len(sources), chunk)]
        bar = tqdm(total=len(sources), unit="img", desc="indexing", disable=not progress)
        with ThreadPoolExecutor(max_workers=max(1, min(4, _core.hardware_threads()))) as pool:
            waited = time.perf_counter()
            for loaded, tiled, decode_seconds, tile_seconds in _prefetch(pool, self._prepare_chunk, chunks, ahead=2):
                report.timings["decode"] += time.perf_counter() - waited
                report.timings["decode_cpu"] += decode_seconds
                report.timings["tile_cpu"] += tile_seconds
                fresh = [item for item in loaded if isinstance(item, tuple)]
                encoded = iter(self._encode_pixels(fresh, report, tiled))
                batch: list[EncodedBatch] = []
                for item in loaded:  # keep input order: cache hits and fresh encodings interleave
                    if isinstance(item, SkippedImage):
                        report.skipped.append(item)
                    elif isinstance(item, EncodedBatch):
                        batch.append(item)
                    else:
                        result = next(encoded)
                        if result is not None:
                            batch.append(result)
                if batch:
                    yield EncodedBatch.merge(batch)
                bar.update(len(loaded))
                # Restarted after the consumer has used the chunk: the next wait is for decoding alone.
                waited = time.perf_counter()
        bar.close()

    def _prepare_chunk(self, sources: Sequence[ImageSource]
                       ) -> tuple[list[Any], "list[tuple[list[int], TileBatch]] | None", float, float]:
        """Runs in a worker thread: `_read` for each source, then the chunk's fresh images tiled into backbone
        batches, so that the next chunk is decoded and tiled while the backbone encodes this one (on a GPU the
        tiler would otherwise leave it idle; the C++ tiler releases the GIL). Returns (items, tiled parts or None
        when some image cannot be tiled: `_encode_pixels` then sorts it out one by one, decode seconds, tile
        seconds), the seconds summed by the caller so that no shared counter needs a lock."""
        started = time.perf_counter()
        items = [self._read(s) for s in sources]
        decoded = time.perf_counter()
        fresh = [item for item in items if isinstance(item, tuple)]
        try:
            tiled = self._tile(fresh) if fresh else []
        except ValueError:
            tiled = None
        return items, tiled, decoded - started, time.perf_counter() - decoded

    def _read(self, source: ImageSource) -> "SkippedImage | EncodedBatch | tuple[str, np.ndarray, str | None]":
        """Decoded pixels, a cache hit (a one-image batch), or the reason the source is unusable."""
        name = describe_source(source)
        try:
            key = None
            cache = self.embedding_cache()
            if cache is not None:
                key = _cache_key(source)
                hit = cache.get(key, self.tiling.grids) if key else None
                if hit is not None:
                    vectors, width, height = hit
                    boxes, grid, cell = _core.patch_boxes(height, width, list(self.tiling.grids), self.tiling.overlap)
                    patches = PatchTable(np.zeros(len(vectors), np.int64), boxes, grid, cell)
                    return EncodedBatch(vectors, patches, [NewImage(name, width, height)], from_cache=1)
            return name, load_rgb(source), key
        except ImageError as exc:
            return SkippedImage(name, exc.reason)
        except (OSError, ValueError) as exc:
            return SkippedImage(name, str(exc))

    def _encode_pixels(self, items: list[tuple[str, np.ndarray, str | None]], report: AddReport,
                       tiled: "list[tuple[list[int], TileBatch]] | None" = None) -> list[EncodedBatch | None]:
        """One-image batches aligned with `items` (tiled here unless `tiled` holds their parts already); None (and a
        report entry) for an image that cannot be tiled."""
        if not items:
            return []
        backbone = self.backbone
        started = time.perf_counter()
        try:
            parts = tiled if tiled is not None else self._tile(items)
        except ValueError as exc:
            report.timings["tile"] += time.perf_counter() - started  # the retries below time themselves
            # One bad image (e.g. smaller than the finest grid) must not sink its neighbours: retry one by one.
            if len(items) == 1:
                # The tiler numbers images within its call ("image 0: ..."); the report names the source instead.
                report.skipped.append(SkippedImage(items[0][0], str(exc).replace("image 0: ", "")))
                return [None]
            return [self._encode_pixels([item], report)[0] for item in items]
        encoding = time.perf_counter()
        report.timings["tile"] += encoding - started
        vectors = [backbone.encode(batch.pixels) for _, batch in parts]  # in calls of the backbone's own size
        report.timings["encode"] += time.perf_counter() - encoding
        cache = self.embedding_cache()
        results: list[EncodedBatch | None] = []
        for i, (name, pixels, key) in enumerate(items):
            # Each part holds some grids of some images; an image's patches go grid by grid (the parts are in grid
            # order), cells row-major within a grid: the patch order of tiling.patch_boxes.
            pieces = []
            for (positions, part), part_vectors in zip(parts, vectors):
                if i in positions:
                    rows = part.image_index == positions.index(i)
                    pieces.append((part_vectors[rows], part.boxes[rows], part.grid[rows], part.cell[rows]))
            own_vectors, boxes, grid, cell = (np.concatenate(column) for column in zip(*pieces))
            patches = PatchTable(np.zeros(len(own_vectors), np.int64), boxes, grid, cell)
            image = NewImage(name, pixels.shape[1], pixels.shape[0])
            item = EncodedBatch(own_vectors, patches, [image])
            if cache is not None and key is not None:
                cache.put(key, self.tiling.grids, item.vectors, image.width, image.height)
            results.append(item)
        return results

    def _tile(self, items: list[tuple[str, np.ndarray, str | None]]) -> list[tuple[list[int], TileBatch]]:
        """The items' patches as backbone batches of one input size each: [(positions of the images in `items`,
        their patches of one grid at one size)], in grid order. With fixed cells: one batch of every grid."""
        images = [pixels for _, pixels, _ in items]
        if self.tiling.cell_sizing == "fixed":
            batch = tile_images(images, self.tiling.grids, self.preprocess(), overlap=self.tiling.overlap,
                                num_threads=self.num_threads)
            return [(list(range(len(images))), batch)]
        sizes = [self.cell_sizes(*pixels.shape[:2]) for pixels in images]
        parts = []
        for g, grid in enumerate(self.tiling.grids):
            for size in sorted({s[g] for s in sizes}):
                positions = [i for i, s in enumerate(sizes) if s[g] == size]
                batch = tile_images([images[i] for i in positions], (grid,), self.preprocess(size),
                                    overlap=self.tiling.overlap, num_threads=self.num_threads)
                parts.append((positions, batch))
        return parts

    # ------------------------------------------------------------------ queries
    def embed_queries(self, queries: Sequence[ImageSource | np.ndarray], dim: int | None = None) -> np.ndarray:
        """(n, dim) float32 L2-normalised global descriptors. A 1-D numeric array is taken as a descriptor
        (checked against `dim` and normalised); anything else is an image, encoded whole."""
        vectors: list[np.ndarray | None] = []
        images: list[tuple[int, np.ndarray]] = []
        for i, query in enumerate(queries):
            if isinstance(query, np.ndarray) and query.ndim == 1:
                vectors.append(normalise_query_vector(query, i, dim))
            else:
                try:
                    images.append((i, load_rgb(query)))
                except ImageError as exc:
                    raise ImageError(exc.source, f"query {i}: {exc.reason}") from None
                vectors.append(None)
        if images:
            backbone = self.backbone
            pixels = prepare_whole_images([img for _, img in images], backbone.preprocess,
                                          num_threads=self.num_threads)
            encoded = backbone.encode(pixels)
            for (i, _), vector in zip(images, encoded):
                vectors[i] = vector
        if not vectors:
            return np.zeros((0, dim or 0), np.float32)
        return np.stack(vectors).astype(np.float32, copy=False)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ the embedding cache
    def embedding_cache(self) -> EmbeddingCache | None:
        if self._cache_setting in (None, False):
            return None
        if self._cache is None:
            setting = self._cache_setting
            root = default_cache_root() / "embeddings" if setting is True else Path(setting)  # type: ignore[arg-type]
            sizing = ({"fit": self.tiling.min_input_size, "max": self.tiling.input_size}
                      if self.tiling.cell_sizing == "fit" else None)
            self._cache = EmbeddingCache(root, self.backbone.identity, self.tiling.overlap, sizing)
        return self._cache


def _cache_key(source: ImageSource) -> str | None:
    if isinstance(source, (str, os.PathLike)):
        try:
            return content_key(Path(source).read_bytes())
        except OSError:
            return None  # load_rgb reports the real problem
    if isinstance(source, np.ndarray):
        return content_key(source)
    return None  # PIL images carry no stable content to key on cheaply


def _prefetch(pool: ThreadPoolExecutor, work: Any, items: Sequence[Any], ahead: int) -> Iterator[Any]:
    """Yields work(item) in order while up to `ahead` later items are already being processed, so decoding
    overlaps encoding without holding the whole collection in memory."""
    futures = [pool.submit(work, item) for item in items[:ahead]]
    for i in range(len(items)):
        if i + ahead < len(items):
            futures.append(pool.submit(work, items[i + ahead]))
        yield futures[i].result()
        futures[i] = None  # type: ignore[call-overload]  # release the decoded pixels


def normalise_query_vector(vector: np.ndarray, position: int, dim: int | None) -> np.ndarray:
    """A descriptor given as a query: numeric, finite, non-zero, of the index dimension; returned L2-normalised."""
    if not np.issubdtype(vector.dtype, np.number):
        raise ValueError(f"query {position}: descriptor must be numeric, got dtype {vector.dtype}")
    if dim is not None and vector.shape[0] != dim:
        raise ValueError(f"query {position}: descriptor has {vector.shape[0]} dimensions, the index holds {dim}")
    vector = vector.astype(np.float32)
    norm = float(np.linalg.norm(vector))
    if not np.isfinite(norm) or norm == 0.0:
        raise ValueError(f"query {position}: descriptor is zero or not finite")
    return vector / norm


def check_identity(expected: dict[str, Any], actual: dict[str, Any]) -> None:
    """Refuses a backbone whose identity (model, weights, preprocessing, dim) differs from an index's."""
    differing = sorted(k for k in set(expected) | set(actual) if expected.get(k) != actual.get(k))
    if differing:
        details = ", ".join(f"{k}: index {expected.get(k)!r} vs backbone {actual.get(k)!r}" for k in differing)
        raise BackboneMismatchError(f"backbone mismatch: this index was built with a different backbone ({details})")
