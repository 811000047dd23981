"""The `Patchify` engine: images in, ranked images with winning boxes out.

A composition, not a pipeline: the `Encoder` (patchify.encoder) turns images into batches of patch vectors and
their patch table; a patch index (patchify.index: flat or IVFPQ, built from its config in patchify.config) stores
the vectors; the engine keeps the image records and the patch table that turn an index hit into a named image and
a box; the store (patchify.store) owns the folder layout of a saved index. A query is one global descriptor; an
image's score is the max similarity over its patches, and the winning patch's box says where the match is.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np
from PIL import Image

from . import _core, store
from .config import (DEFAULT_BACKBONE, DEFAULT_BATCH_SIZE, DEFAULT_LEVEL, IndexConfig, IVFPQConfig, TilingConfig,
                     index_config)
from .encoder import EncodedBatch, Encoder
from .images import ImageSource, list_image_files
from .index.base import check_k
from .records import AddReport, Hit, ImageRecord, NewImage, PatchTable, SkippedImage
from .training import DEFAULT_MAX_VECTORS, select_training_vectors

if TYPE_CHECKING:
    from .backbones import Backbone
    from .index.base import PatchIndex

__all__ = ["AddReport", "Hit", "Patchify", "SkippedImage"]

# An untrained IVFPQ index buffers this many patch vectors, trains on them, then streams the rest.
TRAINING_BUFFER = DEFAULT_MAX_VECTORS


class Patchify:
    """Patch-wise instance retrieval engine.

    >>> engine = Patchify(backbone="dinov2_vits14", level=2, index="flat")
    >>> report = engine.add_images(["a.jpg", "b.png"])      # or a folder
    >>> hits = engine.search("query.jpg", k=10)
    >>> hits[0].path, hits[0].score, hits[0].box

    level=L cuts each image into the grids 1..L+1 (default DEFAULT_LEVEL); `grids=[1, 3]` picks grid sizes instead;
    `tiling=TilingConfig(...)` gives every tiling setting at once. index: "flat", "ivfpq", a faiss factory string
    ("IVF1024,PQ48x8") or an index config; `index_settings` (dtype; nlist, m, nbits, nprobe, training_source)
    override its fields. training_vectors: for training_source "given" / "gt-aligned".
    """

    training_vectors: np.ndarray | None
    progress: bool

    def __init__(self, backbone: "str | Backbone" = DEFAULT_BACKBONE, level: int | None = None,
                 index: "str | IndexConfig" = "flat", *, grids: Sequence[int] | None = None, overlap: float = 0.0,
                 tiling: TilingConfig | None = None, training_vectors: np.ndarray | None = None,
                 batch_size: int = DEFAULT_BATCH_SIZE, num_threads: int = 0,
                 embedding_cache: bool | str | os.PathLike | None = None, progress: bool = False,
                 **index_settings: Any) -> None:
        if "levels" in index_settings:
            raise ValueError("Patchify takes level=L (the finest grid level: grids 1..L+1) or grids=[...]; "
                             "levels= names a list of levels (patchify eval)")
        if tiling is not None and (level is not None or grids is not None or overlap):
            raise ValueError("give tiling=TilingConfig(...) or level/grids/overlap, not both")
        if level is not None and grids is not None:
            raise ValueError("give level (grids 1..level+1) or grids (explicit grid sizes), not both")
        if tiling is None:
            tiling = (TilingConfig(grids=tuple(grids), overlap=overlap) if grids is not None
                      else TilingConfig.for_level(DEFAULT_LEVEL if level is None else level, overlap=overlap))
        self._compose(Encoder(backbone, tiling, batch_size=batch_size, num_threads=num_threads,
                              embedding_cache=embedding_cache), index_config(index, **index_settings))
        # For training_source "given" / "gt-aligned": e.g. embeddings of crops at ground-truth boxes.
        self.training_vectors = None if training_vectors is None else np.asarray(training_vectors, np.float32)
        self.progress = progress

    def _compose(self, encoder: Encoder, config: IndexConfig, index: "PatchIndex | None" = None,
                 images: list[ImageRecord] | None = None, patches: PatchTable | None = None,
                 saved_backbone: store.BackboneRecord | None = None) -> None:
        """The engine's state, in one place for both construction and `load`."""
        self._encoder = encoder
        self._index_config = config
        self._index = index
        self._images = images if images is not None else []
        self._patches = patches if patches is not None else PatchTable.empty()
        self._saved_backbone = saved_backbone  # set by load: says which backbone built it
        self.training_vectors = None
        self.progress = False

    # ------------------------------------------------------------------ what it holds
    @property
    def encoder(self) -> Encoder:
        return self._encoder

    @property
    def tiling(self) -> TilingConfig:
        return self._encoder.tiling

    @property
    def grids(self) -> tuple[int, ...]:
        return self.tiling.grids

    @property
    def levels(self) -> tuple[int, ...]:
        return self.tiling.levels

    @property
    def backbone(self) -> "Backbone":
        """The encoder's backbone, loaded on first use (searching by vector never loads it)."""
        return self._encoder.backbone

    @property
    def index(self) -> "PatchIndex | None":
        return self._index

    @property
    def index_config(self) -> IndexConfig:
        """The index settings as they are now (read from the index once it exists: a changed nprobe shows)."""
        return self._index.config if self._index is not None else self._index_config

    @property
    def images(self) -> Sequence[ImageRecord]:
        """Image records by id (removed ones included, flagged). Read-only: change them through add/remove."""
        return self._images

    @property
    def patches(self) -> PatchTable:
        """The patch table: row = patch id."""
        return self._patches

    @property
    def n_images(self) -> int:
        return sum(1 for image in self._images if not image.removed)

    @property
    def n_patches(self) -> int:
        return 0 if self._index is None else self._index.ntotal

    def __len__(self) -> int:
        return self.n_images

    def __repr__(self) -> str:
        return (f"Patchify(backbone={self._encoder.backbone_name!r}, levels={list(self.levels)}, "
                f"index={self.index_config!r}, images={self.n_images}, patches={self.n_patches})")

    # ------------------------------------------------------------------ adding
    def add_images(self, sources: "ImageSource | Iterable[ImageSource]", *,
                   progress: bool | None = None) -> AddReport:
        """Decodes, tiles, encodes and indexes `sources`: a folder (its image files, recursively), one image
        (path, PIL image, HxWx3 array) or a list of them. Work streams chunk by chunk: memory is bounded by a chunk
        (an untrained IVFPQ index first buffers up to TRAINING_BUFFER patches to train on).

        Bad inputs (missing, corrupt, truncated, non-image, too large) are skipped and listed in the report with
        their reason; every other image is indexed.
        """
        started = time.perf_counter()
        items = _source_list(sources)
        self._check_can_train(len(items))
        report = AddReport()
        pending: list[EncodedBatch] = []  # only while an IVFPQ index waits for enough vectors to train on
        show = self.progress if progress is None else progress
        for batch in self._encoder.encode_images(items, report, progress=show):
            report.from_cache += batch.from_cache
            if self._index is None or not self._index.is_trained:
                if not isinstance(self._index_config, IVFPQConfig):
                    self._add_batch(batch, report)
                    continue
                pending.append(batch)
                if sum(len(b.vectors) for b in pending) < TRAINING_BUFFER:
                    continue
                batch, pending = EncodedBatch.merge(pending), []
            self._add_batch(batch, report)
        if pending:
            self._add_batch(EncodedBatch.merge(pending), report)
        report.seconds = time.perf_counter() - started
        return report

    def _add_batch(self, batch: EncodedBatch, report: AddReport) -> None:
        started = time.perf_counter()
        ids = self.add_embeddings(batch.vectors, batch.patches, batch.images)
        report.image_ids.extend(ids)
        report.n_patches += len(batch.vectors)
        report.timings["index"] += time.perf_counter() - started

    def add_embeddings(self, vectors: np.ndarray, patches: PatchTable, images: Sequence[NewImage]) -> list[int]:
        """Indexes precomputed patch vectors: `vectors` (n, dim) L2-normalised, `patches` their table (n rows;
        `patches.image` = position in `images`; grids must be among this engine's), `images` the new images' names
        and sizes. Returns the new image ids. Nothing is changed when the call fails."""
        if not isinstance(patches, PatchTable):
            raise ValueError(f"patches must be a PatchTable, got {type(patches).__name__}")
        images = list(images)
        if not all(isinstance(image, NewImage) for image in images):
            raise ValueError("images must be NewImage(name, width, height) records")
        vectors = np.asarray(vectors)
        if vectors.ndim != 2 or len(vectors) != len(patches):
            raise ValueError(f"vectors must be (n, dim) with one row per patch ({len(patches)}), got shape "
                             f"{vectors.shape}")
        if len(patches) and (patches.image.min() < 0 or patches.image.max() >= len(images)):
            raise ValueError(f"patches.image must be positions in images (0..{len(images) - 1})")
        unknown = sorted(set(np.unique(patches.grid).tolist()) - set(self.grids))
        if unknown:
            raise ValueError(f"patches of grids {unknown}: this engine's grids are {list(self.grids)}")
        if not images:
            return []
        first_image, first_patch = len(self._images), len(self._patches)
        image_ids = patches.image + first_image
        patch_ids = np.arange(first_patch, first_patch + len(patches), dtype=np.int64)
        index = self._ensure_index(vectors.shape[1])
        if not index.is_trained:
            source = self._index_config.training_source if isinstance(self._index_config, IVFPQConfig) else "all"
            index.train(select_training_vectors(source, vectors, image_ids, patch_grids=patches.grid,
                                                given=self.training_vectors))
        index.add(vectors, patch_ids, image_ids)
        self._images.extend(ImageRecord(first_image + i, image.name, int(image.width), int(image.height))
                            for i, image in enumerate(images))
        self._patches.append(patches.with_image(image_ids))
        return list(range(first_image, len(self._images)))

    def _ensure_index(self, dim: int) -> "PatchIndex":
        if self._index is None:
            self._index = self._index_config.create(dim, self._encoder.num_threads)
        elif self._index.dim != dim:
            raise ValueError(f"vectors have dimension {dim}, the index holds {self._index.dim}")
        return self._index

    def _check_can_train(self, n_sources: int) -> None:
        """Refuses before any encoding what training would refuse after it: too few patches for the codebooks, or
        a training source that needs vectors nobody gave."""
        config = self._index_config
        if not isinstance(config, IVFPQConfig) or (self._index is not None and self._index.is_trained):
            return
        if config.training_source in ("given", "gt-aligned") and self.training_vectors is None:
            raise ValueError(f"training_source {config.training_source!r} needs training_vectors=(n, dim) vectors")
        need = config.min_training_vectors()
        most = n_sources * self.tiling.patches_per_image
        if most < need:
            raise ValueError(f"IVFPQ training needs at least {need} patch vectors (nlist={config.nlist}, "
                             f"{1 << config.nbits} PQ centroids); {n_sources} images at grids {list(self.grids)} "
                             f"give at most {most}. Add more images at once, lower nlist/nbits, or use the flat index")

    def remove_images(self, image_ids: Sequence[int]) -> int:
        """Removes images (and all their patches) by id; returns the number of patches removed."""
        ids = np.asarray(list(image_ids), dtype=np.int64)
        bad = [int(i) for i in ids if not 0 <= i < len(self._images) or self._images[int(i)].removed]
        if bad:
            raise ValueError(f"image_ids not in the index: {bad[:10]}")
        removed = self._index.remove_images(ids) if self._index is not None and len(ids) else 0
        for i in ids:
            record = self._images[int(i)]
            self._images[int(i)] = ImageRecord(record.id, record.name, record.width, record.height, removed=True)
        return removed

    # ------------------------------------------------------------------ searching
    def embed_query(self, query: ImageSource | np.ndarray) -> np.ndarray:
        """The query's global descriptor (whole image, L2-normalised); a 1-D vector is passed through."""
        return self.embed_queries([query])[0]

    def embed_queries(self, queries: Sequence[ImageSource | np.ndarray]) -> np.ndarray:
        return self._encoder.embed_queries(queries, self._index.dim if self._index is not None else None)

    def search(self, query: ImageSource | np.ndarray, k: int = 10) -> list[Hit]:
        """Top-k images for one query: a path, PIL image, HxWx3 uint8 array, or a descriptor (a 1-D float
        vector, or a (1, dim) row)."""
        if isinstance(query, np.ndarray) and query.ndim == 2 and np.issubdtype(query.dtype, np.floating):
            if query.shape[0] != 1:
                raise ValueError(f"search takes one query; a ({query.shape[0]}, {query.shape[1]}) array is a batch: "
                                 "use search_batch")
            query = query[0]
        return self.search_batch([query], k=k)[0]

    def search_batch(self, queries: Sequence[ImageSource | np.ndarray], k: int = 10) -> list[list[Hit]]:
        """Top-k images for each query; a 2-D float array is taken as a batch of descriptor vectors. At most
        n_images hits per query, whatever k."""
        if isinstance(queries, np.ndarray) and queries.ndim == 2:
            queries = list(queries)
        k = check_k(k)
        if self._index is None or self._index.ntotal == 0:
            raise ValueError("the index is empty: add images before searching")
        vectors = self.embed_queries(list(queries))
        scores, image_ids, patch_ids = self._index.search(vectors, k)
        return [self._hits(scores[q], image_ids[q], patch_ids[q]) for q in range(len(vectors))]

    def _hits(self, scores: np.ndarray, image_ids: np.ndarray, patch_ids: np.ndarray) -> list[Hit]:
        hits = []
        boxes, grids, cells = self._patches.box, self._patches.grid, self._patches.cell
        for rank, (score, image, patch) in enumerate(zip(scores, image_ids, patch_ids)):
            if image < 0:
                break
            x0, y0, x1, y1 = (int(v) for v in boxes[patch])
            grid = int(grids[patch])
            hits.append(Hit(rank=rank, image_id=int(image), path=self._images[int(image)].name, score=float(score),
                            box=(x0, y0, x1, y1), level=grid - 1, grid=grid, cell=int(cells[patch]),
                            patch_id=int(patch)))
        return hits

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | os.PathLike) -> Path:
        """Writes the index to `directory` atomically (a crash leaves the previous index intact), every setting as
        it is now."""
        if self._index is None:
            raise ValueError("nothing to save: the index is empty")
        if self._encoder.backbone_loaded:
            backbone = self._encoder.backbone
            record = store.BackboneRecord(self._encoder.backbone_name, backbone.identity,
                                          getattr(backbone, "weights", None))
        else:
            saved = self._saved_backbone
            record = store.BackboneRecord(self._encoder.backbone_name, self._encoder.identity(),
                                          saved.weights if saved else None)
        return store.save(directory, backbone=record, tiling=self.tiling, index=self._index, images=self._images,
                          patches=self._patches, patchify_version=_core.__version__)

    @classmethod
    def load(cls, directory: str | os.PathLike, *, backbone: "str | Backbone | None" = None,
             num_threads: int = 0, embedding_cache: bool | str | os.PathLike | None = None,
             verify: bool = False) -> "Patchify":
        """Loads an index saved by `save` (any supported format version). The backbone is loaded lazily and must
        match the one that built it (BackboneMismatchError). verify=True checks every file's sha256."""
        saved = store.load(directory, num_threads=num_threads, verify=verify)
        engine = cls.__new__(cls)  # __init__ would build a fresh encoder and check the saved backbone's name
        encoder = Encoder(saved.backbone.name if backbone is None else backbone, saved.tiling,
                          num_threads=num_threads, embedding_cache=embedding_cache,
                          expected_identity=saved.backbone.identity, check_name=backbone is not None)
        engine._compose(encoder, saved.index.config, saved.index, saved.images, saved.patches, saved.backbone)
        return engine


def _source_list(sources: "ImageSource | Iterable[ImageSource]") -> list[ImageSource]:
    """What add_images was given, as a list of image sources: a folder means its files; one path, PIL image or
    HxWx3 array means itself."""
    if isinstance(sources, (str, os.PathLike)):
        path = Path(sources)
        return list(list_image_files(path)) if path.is_dir() else [sources]
    if isinstance(sources, Image.Image) or (isinstance(sources, np.ndarray) and sources.ndim == 3):
        return [sources]
    if isinstance(sources, (bytes, dict)) or not isinstance(sources, Iterable):
        raise ValueError(f"add_images takes a folder, an image or a list of images, got {type(sources).__name__}")
    return list(sources)

