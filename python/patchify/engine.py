"""The `Patchify` engine: images in, ranked images with winning boxes out.

Pipeline for database images: decode (Pillow, threads) -> tile into multi-scale grid patches (C++) -> encode
(ONNX backbone) -> add to a patch index (flat or IVFPQ). A query is one global descriptor; an image's score is
the max similarity over its patches, and the winning patch's box says where the match is.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

import numpy as np

from . import _core, storage
from .embedding_cache import EmbeddingCache, content_key, default_cache_root
from .images import ImageError, ImageSource, describe_source, load_rgb
from .tiling import grid_sizes, prepare_whole_images, tile_images

if TYPE_CHECKING:
    from .backbones import Backbone
    from .index.base import PatchIndex

DEFAULT_BACKBONE = "dinov2_vits14"


@dataclass(frozen=True)
class Hit:
    """One retrieved image: its score is the best patch's similarity; `box` (x0, y0, x1, y1, original pixels,
    exclusive max) is where that patch lies, `level` its grid level (0 = whole image)."""

    rank: int
    image_id: int
    path: str
    score: float
    box: tuple[int, int, int, int]
    level: int
    grid: int
    cell: int
    patch_id: int


@dataclass(frozen=True)
class SkippedImage:
    source: str
    reason: str


@dataclass
class AddReport:
    """What `add_images` did: ids of the images added (in input order), patches added, and every input that was
    skipped with the reason. Nothing else is lost when a file is bad.

    `timings` says where the `seconds` went, in seconds per stage. "decode", "tile", "encode" and "index" are
    wall-clock time of the calling thread, so they add up to at most `seconds`; "decode" is the time it *waited*
    for decoded images (decoding runs in worker threads, overlapped with encoding). "decode_cpu" is the decode
    time summed over the worker threads (cache look-ups included): it can exceed the wait, and `seconds`."""

    image_ids: list[int] = field(default_factory=list)
    n_patches: int = 0
    skipped: list[SkippedImage] = field(default_factory=list)
    seconds: float = 0.0
    from_cache: int = 0
    timings: dict[str, float] = field(
        default_factory=lambda: {"decode": 0.0, "decode_cpu": 0.0, "tile": 0.0, "encode": 0.0, "index": 0.0})

    @property
    def n_images(self) -> int:
        return len(self.image_ids)

    def __str__(self) -> str:
        lines = [f"{self.n_images} images, {self.n_patches} patches in {self.seconds:.1f} s"
                 f" ({self.from_cache} from the embedding cache), {len(self.skipped)} skipped"]
        lines += [f"  skipped {s.source}: {s.reason}" for s in self.skipped]
        return "\n".join(lines)


@dataclass
class _Encoded:
    name: str
    width: int
    height: int
    vectors: np.ndarray
    boxes: np.ndarray
    grid: np.ndarray
    cell: np.ndarray
    cached: bool


class Patchify:
    """Patch-wise instance retrieval engine.

    >>> engine = Patchify(backbone="dinov2_vits14", levels=2, index="flat")
    >>> report = engine.add_images(["a.jpg", "b.png"])
    >>> hits = engine.search("query.jpg", k=10)
    >>> hits[0].path, hits[0].score, hits[0].box
    """

    def __init__(
        self,
        backbone: "str | Backbone" = DEFAULT_BACKBONE,
        levels: int | None = 2,
        index: str = "flat",
        *,
        grids: Sequence[int] | None = None,
        overlap: float = 0.0,
        dtype: str = "float32",
        nlist: int | None = None,
        m: int = 48,
        nbits: int = 8,
        nprobe: int = 16,
        training_source: str = "all",
        training_vectors: np.ndarray | None = None,
        batch_size: int = 32,
        num_threads: int = 0,
        embedding_cache: bool | str | os.PathLike | None = None,
        progress: bool = False,
    ) -> None:
        # `levels=L` is the paper's L0..L3; `grids=[1, 2, 4]` picks grid sizes explicitly and wins over levels.
        self.grids = grid_sizes(grids=grids) if grids is not None else grid_sizes(levels)
        if not 0.0 <= float(overlap) < 0.5:
            raise ValueError(f"overlap must be in [0, 0.5), got {overlap}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.overlap = float(overlap)
        self.index_spec = str(index)
        self.index_options: dict[str, Any] = {
            "dtype": dtype, "nlist": nlist, "m": m, "nbits": nbits, "nprobe": nprobe,
        }
        from .training import SOURCES

        if training_source not in SOURCES:
            raise ValueError(f"training_source must be one of {SOURCES}, got {training_source!r}")
        self.training_source = training_source
        # For training_source "given" / "gt-aligned": e.g. embeddings of crops at ground-truth boxes.
        self.training_vectors = None if training_vectors is None else np.asarray(training_vectors, np.float32)
        self.batch_size = int(batch_size)
        self.num_threads = int(num_threads)
        self.progress = progress
        self._backbone: Backbone | None = None
        self._backbone_name = backbone if isinstance(backbone, str) else backbone.name
        if not isinstance(backbone, str):
            self._backbone = backbone
        self._expected_identity: dict[str, Any] | None = None
        self._cache_setting = embedding_cache
        self._cache: EmbeddingCache | None = None
        self._index: PatchIndex | None = None
        self.images: list[dict[str, Any]] = []
        self._patch_image = np.zeros(0, np.int64)
        self._boxes = np.zeros((0, 4), np.int32)
        self._grid = np.zeros(0, np.int16)
        self._cell = np.zeros(0, np.int16)

    # ------------------------------------------------------------------ properties
    @property
    def levels(self) -> tuple[int, ...]:
        return tuple(g - 1 for g in self.grids)

    @property
    def backbone(self) -> "Backbone":
        """The encoder, loaded on first use (searching by vector never loads it)."""
        if self._backbone is None:
            from .backbones import load_backbone

            self._backbone = load_backbone(self._backbone_name, num_threads=self.num_threads)
        if self._expected_identity is not None:
            _check_identity(self._expected_identity, self._backbone.identity)
            self._expected_identity = None
        return self._backbone

    @property
    def index(self) -> "PatchIndex | None":
        return self._index

    @property
    def n_images(self) -> int:
        return sum(1 for image in self.images if not image.get("removed"))

    @property
    def n_patches(self) -> int:
        return 0 if self._index is None else self._index.ntotal

    def __len__(self) -> int:
        return self.n_images

    def __repr__(self) -> str:
        return (f"Patchify(backbone={self._backbone_name!r}, levels={list(self.levels)}, index={self.index_spec!r}, "
                f"images={self.n_images}, patches={self.n_patches})")

    # ------------------------------------------------------------------ adding
    def add_images(self, sources: Iterable[ImageSource], *, progress: bool | None = None) -> AddReport:
        """Decodes, tiles, encodes and indexes `sources` (paths, PIL images or HxWx3 arrays).

        Bad inputs (missing, corrupt, truncated, non-image, too large) are skipped and listed in the report with
        their reason; every other image is indexed.
        """
        started = time.perf_counter()
        sources = list(sources)
        report = AddReport()
        encoded: list[_Encoded] = []
        for item in self._encode_database(sources, report, self.progress if progress is None else progress):
            encoded.append(item)
        if encoded:
            index_started = time.perf_counter()
            self._index_encoded(encoded, report)
            report.timings["index"] += time.perf_counter() - index_started
        report.seconds = time.perf_counter() - started
        return report

    def _encode_database(self, sources: list[ImageSource], report: AddReport, progress: bool) -> Iterator[_Encoded]:
        from tqdm.auto import tqdm

        per_image = sum(g * g for g in self.grids)
        chunk = max(1, -(-self.batch_size // per_image))
        bar = tqdm(total=len(sources), unit="img", desc="indexing", disable=not progress)
        with ThreadPoolExecutor(max_workers=max(1, min(4, _core.hardware_threads()))) as pool:
            chunks = [sources[i:i + chunk] for i in range(0, len(sources), chunk)]
            waited = time.perf_counter()
            for loaded, decode_seconds in _prefetch(pool, self._read_chunk, chunks, ahead=2):
                report.timings["decode"] += time.perf_counter() - waited
                report.timings["decode_cpu"] += decode_seconds
                fresh = [item for item in loaded if isinstance(item, tuple)]
                encoded = iter(self._encode_pixels(fresh, report))
                for item in loaded:  # keep input order: cache hits and fresh encodings interleave
                    if isinstance(item, SkippedImage):
                        report.skipped.append(item)
                    elif isinstance(item, _Encoded):
                        report.from_cache += 1
                        yield item
                    else:
                        result = next(encoded)
                        if result is not None:
                            yield result
                bar.update(len(loaded))
                # Restarted after the consumer has used the chunk: the next wait is for decoding alone.
                waited = time.perf_counter()
        bar.close()

    def _read_chunk(self, sources: list[ImageSource]) -> tuple[list[Any], float]:
        """Runs in a worker thread: `_read` for each source, and the seconds it took (summed by the caller, so
        no shared counter needs a lock)."""
        started = time.perf_counter()
        return [self._read(s) for s in sources], time.perf_counter() - started

    def _read(self, source: ImageSource) -> "SkippedImage | _Encoded | tuple[str, np.ndarray, str | None]":
        """Decoded pixels, a cache hit, or the reason the source is unusable."""
        name = describe_source(source)
        try:
            key = None
            cache = self._embedding_cache()
            if cache is not None:
                key = self._cache_key(source)
                hit = cache.get(key, self.grids) if key else None
                if hit is not None:
                    vectors, width, height = hit
                    boxes, grid, cell = _core.patch_boxes(height, width, list(self.grids), self.overlap)
                    return _Encoded(name, width, height, vectors, boxes, grid.astype(np.int16),
                                    cell.astype(np.int16), cached=True)
            return name, load_rgb(source), key
        except ImageError as exc:
            return SkippedImage(name, exc.reason)
        except (OSError, ValueError) as exc:
            return SkippedImage(name, str(exc))

    def _encode_pixels(self, items: list[tuple[str, np.ndarray, str | None]],
                       report: AddReport) -> list[_Encoded | None]:
        """Encodings aligned with `items`; None (and a report entry) for an image that cannot be tiled."""
        if not items:
            return []
        backbone = self.backbone
        started = time.perf_counter()
        try:
            batch = tile_images([pixels for _, pixels, _ in items], self.grids, backbone.preprocess,
                                overlap=self.overlap, num_threads=self.num_threads)
        except ValueError as exc:
            report.timings["tile"] += time.perf_counter() - started  # the retries below time themselves
            # One bad image (e.g. smaller than the finest grid) must not sink its neighbours: retry one by one.
            if len(items) == 1:
                report.skipped.append(SkippedImage(items[0][0], str(exc)))
                return [None]
            return [self._encode_pixels([item], report)[0] for item in items]
        tiled = time.perf_counter()
        report.timings["tile"] += tiled - started
        vectors = backbone.encode(batch.pixels, batch_size=self.batch_size)
        report.timings["encode"] += time.perf_counter() - tiled
        cache = self._embedding_cache()
        results: list[_Encoded | None] = []
        for i, (name, pixels, key) in enumerate(items):
            rows = batch.image_index == i
            item = _Encoded(name, pixels.shape[1], pixels.shape[0], vectors[rows], batch.boxes[rows],
                            batch.grid[rows].astype(np.int16), batch.cell[rows].astype(np.int16), cached=False)
            if cache is not None and key is not None:
                cache.put(key, self.grids, item.vectors, item.width, item.height)
            results.append(item)
        return results

    def _index_encoded(self, encoded: list[_Encoded], report: AddReport) -> None:
        vectors = np.concatenate([e.vectors for e in encoded]).astype(np.float32, copy=False)
        first_image = len(self.images)
        first_patch = len(self._patch_image)
        image_ids = np.concatenate([np.full(len(e.vectors), first_image + i, np.int64) for i, e in enumerate(encoded)])
        patch_ids = np.arange(first_patch, first_patch + len(vectors), dtype=np.int64)
        index = self._ensure_index(vectors.shape[1])
        if not index.is_trained:
            from .training import select_training_vectors

            grids = np.concatenate([e.grid for e in encoded])
            index.train(select_training_vectors(self.training_source, vectors, image_ids, patch_grids=grids,
                                                given=self.training_vectors))
        index.add(vectors, patch_ids, image_ids)
        for e in encoded:
            self.images.append({"id": len(self.images), "path": e.name, "width": e.width, "height": e.height})
        self._patch_image = np.concatenate([self._patch_image, image_ids])
        self._boxes = np.concatenate([self._boxes, *[e.boxes.astype(np.int32) for e in encoded]])
        self._grid = np.concatenate([self._grid, *[e.grid for e in encoded]])
        self._cell = np.concatenate([self._cell, *[e.cell for e in encoded]])
        report.image_ids.extend(range(first_image, len(self.images)))
        report.n_patches += len(vectors)

    def _ensure_index(self, dim: int) -> "PatchIndex":
        if self._index is None:
            self._index = _make_index(self.index_spec, dim, self.index_options, self.num_threads)
        elif self._index.dim != dim:
            raise ValueError(f"vectors have dimension {dim}, the index holds {self._index.dim}")
        return self._index

    def remove_images(self, image_ids: Sequence[int]) -> int:
        """Removes images (and all their patches) by id; returns the number of patches removed."""
        ids = np.asarray(list(image_ids), dtype=np.int64)
        bad = [int(i) for i in ids if not 0 <= i < len(self.images) or self.images[int(i)].get("removed")]
        if bad:
            raise ValueError(f"image_ids not in the index: {bad[:10]}")
        removed = self._index.remove_images(ids) if self._index is not None and len(ids) else 0
        for i in ids:
            self.images[int(i)]["removed"] = True
        return removed

    # ------------------------------------------------------------------ searching
    def embed_query(self, query: ImageSource | np.ndarray) -> np.ndarray:
        """The query's global descriptor (whole image, L2-normalised); a 1-D vector is passed through."""
        return self.embed_queries([query])[0]

    def embed_queries(self, queries: Sequence[ImageSource | np.ndarray]) -> np.ndarray:
        vectors: list[np.ndarray | None] = []
        images: list[tuple[int, np.ndarray]] = []
        for i, query in enumerate(queries):
            if isinstance(query, np.ndarray) and query.ndim == 1:
                vectors.append(_normalise_query_vector(query, i, self._index.dim if self._index else None))
            else:
                try:
                    images.append((i, load_rgb(query)))
                except ImageError as exc:
                    raise ValueError(f"query {i} ({exc.source}): {exc.reason}") from None
                vectors.append(None)
        if images:
            backbone = self.backbone
            pixels = prepare_whole_images([img for _, img in images], backbone.preprocess, num_threads=self.num_threads)
            encoded = backbone.encode(pixels, batch_size=self.batch_size)
            for (i, _), vector in zip(images, encoded):
                vectors[i] = vector
        if not vectors:
            dim = self._index.dim if self._index is not None else 0
            return np.zeros((0, dim), np.float32)
        return np.stack(vectors).astype(np.float32, copy=False)  # type: ignore[arg-type]

    def search(self, query: ImageSource | np.ndarray, k: int = 10) -> list[Hit]:
        """Top-k images for one query (path, PIL image, HxWx3 array, or a descriptor vector)."""
        return self.search_batch([query], k=k)[0]

    def search_batch(self, queries: Sequence[ImageSource | np.ndarray], k: int = 10) -> list[list[Hit]]:
        """Top-k images for each query; a 2-D float array is taken as a batch of descriptor vectors."""
        if isinstance(queries, np.ndarray) and queries.ndim == 2:
            queries = list(queries)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if self._index is None or self._index.ntotal == 0:
            raise ValueError("the index is empty: add images before searching")
        vectors = self.embed_queries(list(queries))
        scores, image_ids, patch_ids = self._index.search(vectors, k)
        return [self._hits(scores[q], image_ids[q], patch_ids[q]) for q in range(len(vectors))]

    def _hits(self, scores: np.ndarray, image_ids: np.ndarray, patch_ids: np.ndarray) -> list[Hit]:
        hits = []
        for rank, (score, image, patch) in enumerate(zip(scores, image_ids, patch_ids)):
            if image < 0:
                break
            box = tuple(int(v) for v in self._boxes[patch])
            grid = int(self._grid[patch])
            hits.append(Hit(rank=rank, image_id=int(image), path=self.images[int(image)]["path"], score=float(score),
                            box=box, level=grid - 1, grid=grid, cell=int(self._cell[patch]),  # type: ignore[arg-type]
                            patch_id=int(patch)))
        return hits

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | os.PathLike) -> Path:
        """Writes the index to `directory` atomically (a crash leaves the previous index intact)."""
        if self._index is None:
            raise ValueError("nothing to save: the index is empty")
        directory = Path(directory)
        backbone = self._backbone
        identity = backbone.identity if backbone is not None else self._expected_identity
        with storage.atomic_directory(directory) as staging:
            self._index.save(staging)
            storage.save_tables(staging, self.images, self._patch_image, self._boxes, self._grid, self._cell)
            storage.write_json(staging / storage.MANIFEST, {
                "format": storage.FORMAT_NAME,
                "format_version": storage.FORMAT_VERSION,
                "patchify_version": _core.__version__,
                "backbone": {"name": self._backbone_name, "identity": identity,
                             "weights": getattr(backbone, "weights", None) if backbone else self._saved_weights},
                "grids": list(self.grids),
                "overlap": self.overlap,
                "index": {"spec": self.index_spec, "kind": self._index.kind, "options": self.index_options,
                          "dim": self._index.dim},
                "n_images": len(self.images),
                "n_patches": int(len(self._patch_image)),
                "training_source": self.training_source,
            })
        return directory

    _saved_weights: str | None = None

    @classmethod
    def load(cls, directory: str | os.PathLike, *, backbone: "str | Backbone | None" = None,
             num_threads: int = 0, embedding_cache: bool | str | os.PathLike | None = None) -> "Patchify":
        """Loads an index saved by `save`. The backbone is loaded lazily and must match the one that built it."""
        directory = Path(directory)
        manifest = storage.read_manifest(directory)
        saved = manifest["backbone"]
        if backbone is None:
            backbone = saved["name"]
        options = manifest["index"]["options"]
        engine = cls(backbone=backbone, grids=manifest["grids"], index=manifest["index"]["spec"],
                     overlap=manifest["overlap"], num_threads=num_threads, embedding_cache=embedding_cache,
                     training_source=manifest.get("training_source", "all"), **options)
        engine._saved_weights = saved.get("weights")
        if saved.get("identity") is not None:
            if engine._backbone is not None:
                _check_identity(saved["identity"], engine._backbone.identity)
            else:
                engine._expected_identity = saved["identity"]
        engine.images, tables = storage.load_tables(directory, int(manifest["n_patches"]))
        if len(engine.images) != int(manifest["n_images"]):
            raise storage.IndexFormatError(
                f"{directory / storage.IMAGES}: {len(engine.images)} images, manifest says {manifest['n_images']}")
        engine._patch_image = tables["image"].astype(np.int64)
        engine._boxes = tables["box"].astype(np.int32)
        engine._grid = tables["grid"].astype(np.int16)
        engine._cell = tables["cell"].astype(np.int16)
        engine._index = _load_index(manifest["index"], directory, num_threads)
        return engine

    # ------------------------------------------------------------------ helpers
    def _embedding_cache(self) -> EmbeddingCache | None:
        if self._cache_setting in (None, False):
            return None
        if self._cache is None:
            root = default_cache_root() / "embeddings" if self._cache_setting is True else Path(self._cache_setting)
            self._cache = EmbeddingCache(root, self.backbone.identity, self.overlap)
        return self._cache

    @staticmethod
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


def _normalise_query_vector(vector: np.ndarray, position: int, dim: int | None) -> np.ndarray:
    if not np.issubdtype(vector.dtype, np.number):
        raise ValueError(f"query {position}: descriptor must be numeric, got dtype {vector.dtype}")
    if dim is not None and vector.shape[0] != dim:
        raise ValueError(f"query {position}: descriptor has {vector.shape[0]} dimensions, the index holds {dim}")
    vector = vector.astype(np.float32)
    norm = float(np.linalg.norm(vector))
    if not np.isfinite(norm) or norm == 0.0:
        raise ValueError(f"query {position}: descriptor is zero or not finite")
    return vector / norm


def _check_identity(expected: dict[str, Any], actual: dict[str, Any]) -> None:
    differing = sorted(k for k in set(expected) | set(actual) if expected.get(k) != actual.get(k))
    if differing:
        details = ", ".join(f"{k}: index {expected.get(k)!r} vs backbone {actual.get(k)!r}" for k in differing)
        raise ValueError(f"backbone mismatch: this index was built with a different backbone ({details})")


def _make_index(spec: str, dim: int, options: dict[str, Any], num_threads: int) -> "PatchIndex":
    if spec == "flat":
        from .index.flat import FlatIndex

        return FlatIndex(dim, dtype=options["dtype"], num_threads=num_threads)
    from .index.ivfpq import IVFPQIndex

    if spec == "ivfpq":
        return IVFPQIndex(dim, nlist=options["nlist"], m=options["m"], nbits=options["nbits"],
                          nprobe=options["nprobe"], num_threads=num_threads)
    if spec.upper().startswith("IVF"):
        return IVFPQIndex(dim, factory=spec, nprobe=options["nprobe"], num_threads=num_threads)
    raise ValueError(f"index must be 'flat', 'ivfpq' or a faiss IVF..,PQ.. factory string, got {spec!r}")


def _load_index(meta: dict[str, Any], directory: Path, num_threads: int) -> "PatchIndex":
    if meta["kind"] == "flat":
        from .index.flat import FlatIndex

        index: PatchIndex = FlatIndex.load(directory, dim=int(meta["dim"]))
    elif meta["kind"] == "ivfpq":
        from .index.ivfpq import IVFPQIndex

        index = IVFPQIndex.load(directory)
        if "nprobe" in meta.get("options", {}):
            index.nprobe = int(meta["options"]["nprobe"])
    else:
        raise storage.IndexFormatError(f"{directory}: unknown index kind {meta['kind']!r}")
    index.num_threads = num_threads
    return index
