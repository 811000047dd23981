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
from typing import TYPE_CHECKING, Any, Iterable, Sequence, Union

import numpy as np
from PIL import Image

from . import _core, store
from .config import (DEFAULT_BACKBONE, DEFAULT_BATCH_SIZE, DEFAULT_GLOBAL_WEIGHT, DEFAULT_PRECISION,
                     DEFAULT_WHITENING, MAX_TRAINING_VECTORS, FlatConfig, IndexConfig, IVFPQConfig, TilingConfig,
                     WhiteningConfig, check_global_weight, index_config, precision_of)
from .encoder import EncodedBatch, Encoder
from .fusion import fold, unfold, whole_image_rows
from .images import ImageSource, list_image_files
from .index.base import check_k
from .index.rerank import GlobalFusion
from .query_front import QueryFront
from .records import AddReport, Hit, ImageRecord, NewImage, PatchTable, SkippedImage
from .training import select_training_vectors
from .whitening import LearningSet, Whitening, learning_images

if TYPE_CHECKING:
    from .backbones import Backbone
    from .index.base import PatchIndex

__all__ = ["AddReport", "Hit", "Patchify", "SkippedImage"]

# An index that still has to learn (its whitening, IVFPQ codebooks) buffers this many patch vectors of the first
# add, learns from them, then streams the rest.
TRAINING_BUFFER = MAX_TRAINING_VECTORS
WhiteningSetting = Union[str, bool, WhiteningConfig, Whitening, None]


class Patchify(QueryFront):
    """Patch-wise instance retrieval engine.

    >>> engine = Patchify(backbone="dinov2_vits14", level=2, index="flat")
    >>> report = engine.add_images(["a.jpg", "b.png"])      # or a folder
    >>> hits = engine.search("query.jpg", k=10)
    >>> hits[0].path, hits[0].score, hits[0].box

    level=L cuts each image into the grids 1..L+1 (default DEFAULT_LEVEL); `grids=[1, 3]` picks grid sizes instead;
    `tiling=TilingConfig(...)` gives every tiling setting at once. index: "flat", "ivfpq", a faiss factory string
    ("IVF1024,PQ48x8") or an index config; `index_settings` (dtype; nlist, m, nbits, nprobe, training_source)
    override its fields. training_vectors: for training_source "given" / "gt-aligned".

    whitening: "learned" (default: PCA whitening learned at the first add, on the 4x4 cells of up to 256 of its
    images; see patchify.whitening and WhiteningConfig),
    a WhiteningConfig (learned with those settings), a Whitening learned elsewhere (used as is), or "none" (the
    paper's raw cosines). global_weight: image score = w * whole-image score + (1 - w) * best patch score
    (0 = the plain max; None = DEFAULT_GLOBAL_WEIGHT once the index is whitened, 0 while it holds raw cosines); a
    search setting, changeable at any time.

    precision: what the backbone runs in ("int8" by default, "fp32", "fp16" for CUDA); cell_sizing: "fit" (default:
    each cell encoded at about its own pixel size) or "fixed" (every cell at the backbone's input size, the paper's
    crop mode). Both are recorded in the index; queries are encoded like its images. Defaults: patchify.config.
    """

    training_vectors: np.ndarray | None
    progress: bool

    def __init__(self, backbone: "str | Backbone" = DEFAULT_BACKBONE, level: int | None = None,
                 index: "str | IndexConfig" = "flat", *, grids: Sequence[int] | None = None, overlap: float = 0.0,
                 tiling: TilingConfig | None = None, training_vectors: np.ndarray | None = None,
                 batch_size: int = DEFAULT_BATCH_SIZE, num_threads: int = 0,
                 embedding_cache: bool | str | os.PathLike | None = None, progress: bool = False,
                 whitening: WhiteningSetting = "learned", global_weight: float | None = None,
                 precision: str = DEFAULT_PRECISION, cell_sizing: str | None = None,
                 **index_settings: Any) -> None:
        if "levels" in index_settings:
            raise ValueError("Patchify takes level=L (the finest grid level: grids 1..L+1) or grids=[...]; "
                             "levels= names a list of levels (patchify eval)")
        tiling = TilingConfig.from_settings(tiling, level, grids, overlap, cell_sizing)
        self._compose(Encoder(backbone, tiling, batch_size=batch_size, num_threads=num_threads,
                              embedding_cache=embedding_cache, precision=precision),
                      index_config(index, **index_settings))
        self._whitening_config, self._whitening = whitening_setting(whitening)
        self.global_weight = global_weight
        # For training_source "given" / "gt-aligned": e.g. embeddings of crops at ground-truth boxes.
        self.training_vectors = None if training_vectors is None else np.asarray(training_vectors, np.float32)
        self.progress = progress

    def _compose(self, encoder: Encoder, config: IndexConfig, index: "PatchIndex | None" = None,
                 images: list[ImageRecord] | None = None, patches: PatchTable | None = None,
                 saved_backbone: store.BackboneRecord | None = None,
                 whitening_config: WhiteningConfig | None = None, whitening: Whitening | None = None,
                 global_weight: float | None = None, folded_weight: float = 0.0) -> None:
        """The engine's state, in one place for both construction and `load`."""
        self._encoder = encoder
        self._index_config = config
        self._index = index
        # What to learn (None: no whitening) and what was learned (None: not yet, or none wanted).
        self._whitening_config = whitening_config
        self._whitening = whitening
        # The fusion setting (None: the default rule) and the weight the stored vectors are folded with
        # (patchify.fusion): equal to effective_global_weight whenever the index exists.
        self._global_weight = check_global_weight(global_weight)
        self._folded_weight = float(folded_weight)
        self._whole_cache: np.ndarray | None = None  # per image, its whole-image patch id (IVFPQ fusion)
        self._images = images if images is not None else []
        self._patches = patches if patches is not None else PatchTable.empty()
        self._saved_backbone = saved_backbone  # set by load: says which backbone built it
        # The folder it was loaded from or last saved to: its image files (store.OWNED_IMAGES, named by the image
        # records) go with every save, wherever it goes.
        self._folder: Path | None = None
        self.training_vectors = None
        self.progress = False

    # ------------------------------------------------------------------ what it holds
    @property
    def index(self) -> "PatchIndex | None":
        return self._index

    @property
    def index_config(self) -> IndexConfig:
        """The index settings as they are now (read from the index once it exists: a changed nprobe shows). An IVFPQ
        engine still searching exactly (`exact_until_trained`) shows its IVFPQ settings."""
        if self._index is None or self.exact_until_trained is not None:
            return self._index_config
        return self._index.config

    @property
    def whitening(self) -> Whitening | None:
        """The learned whitening (None: raw vectors, or not learned yet: see `whitening_config`)."""
        return self._whitening

    @property
    def whitening_config(self) -> WhiteningConfig | None:
        """The whitening settings (None: the index holds raw backbone vectors)."""
        return self._whitening_config

    @property
    def global_weight(self) -> float | None:
        """The fusion setting as given (None: the default rule); `effective_global_weight` is what searches use."""
        return self._global_weight

    @global_weight.setter
    def global_weight(self, value: float | None) -> None:
        """Changing it re-folds a flat index's vectors once (O(patches), see patchify.fusion); an IVFPQ index fuses
        in its second stage, so the change is free."""
        value = check_global_weight(value)
        if value is not None and value > 0 and 1 not in self.grids:
            raise ValueError(f"global_weight > 0 needs the whole image (grid 1) among the grids {list(self.grids)}")
        weight = self._weight_for(value, self._whitening is not None)
        if self._folds() and self._index is not None and self._index.ntotal and weight != self._folded_weight:
            self._refold(weight)
        self._global_weight = value

    @property
    def effective_global_weight(self) -> float:
        """The weight searches use: the setting, or under the default rule DEFAULT_GLOBAL_WEIGHT when the index
        holds whitened vectors, else 0 (plain max). 0 when the grids lack the whole image, and for an IVFPQ index
        without a re-rank store (the fusion needs the second stage's exact scores)."""
        if self._index is not None and not self._folds() and getattr(self._index, "rerank_store", None) is None:
            return 0.0
        return self._weight_for(self._global_weight, self._whitening is not None)

    def _folds(self) -> bool:
        """Whether the fusion is folded into the stored vectors: a flat index (or an IVFPQ engine's flat index
        while it is too small to train). An IVFPQ index keeps plain vectors and fuses in its second stage: folded
        vectors would pull each image's patches into fewer coarse lists, and the first stage would reach fewer
        images (composite L3: 63 instead of 90 of 140 per query at nprobe 16, mAP 0.646 instead of 0.684)."""
        if self._index is None:
            return self.exact_until_trained is not None or isinstance(self._index_config, FlatConfig)
        return isinstance(self._index.config, FlatConfig)

    def _weight_for(self, setting: float | None, whitened: bool) -> float:
        if 1 not in self.grids:
            return 0.0
        if setting is not None:
            return setting
        return DEFAULT_GLOBAL_WEIGHT if whitened else 0.0

    def _refold(self, weight: float) -> None:
        """Re-folds a flat index's stored vectors for another global weight (see patchify.fusion)."""
        vectors, patch_ids, grid, image = self._unfolded_flat_rows()
        self._rebuild_flat(fold(vectors, grid, image, weight), patch_ids, image)
        self._folded_weight = weight

    def _unfolded_flat_rows(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The flat index's rows with the fusion taken out: (vectors, patch ids, grid, image id) per row."""
        from .index.flat import FlatIndex

        assert isinstance(self._index, FlatIndex)  # callers check: only a flat index holds folded vectors
        stored, patch_ids = self._index.stored_vectors()
        grid, image = self._patches.grid[patch_ids], self._patches.image[patch_ids]
        return unfold(stored, grid, image, self._folded_weight), patch_ids, grid, image

    def _rebuild_flat(self, vectors: np.ndarray, patch_ids: np.ndarray, image_ids: np.ndarray) -> None:
        """Replaces the flat index with one holding these rows (same storage dtype and threads)."""
        from .index.flat import FlatIndex

        old = self._index
        assert isinstance(old, FlatIndex)
        rebuilt = FlatIndex(vectors.shape[1], dtype=old.dtype, num_threads=old.num_threads)
        rebuilt.add(vectors, patch_ids, image_ids)
        self._index = rebuilt

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
        whitening = self._whitening or self._whitening_config or "none"
        return (f"Patchify(backbone={self._encoder.backbone_name!r}, levels={list(self.levels)}, "
                f"index={self.index_config!r}, whitening={whitening!r}, global_weight={self._global_weight}, "
                f"images={self.n_images}, patches={self.n_patches})")

    # ------------------------------------------------------------------ adding
    def add_images(self, sources: "ImageSource | Iterable[ImageSource]", *,
                   progress: bool | None = None) -> AddReport:
        """Decodes, tiles, encodes and indexes `sources`: a folder (its image files, recursively), one image
        (path, PIL image, HxWx3 array) or a list of them. Work streams chunk by chunk: memory is bounded by a chunk
        (the first add of an index that learns - whitening, IVFPQ - buffers up to TRAINING_BUFFER patches to learn
        on).

        Bad inputs (missing, corrupt, truncated, non-image, too large) are skipped and listed in the report with
        their reason; every other image is indexed.
        """
        started = time.perf_counter()
        items = _source_list(sources)
        self._check_training_source()
        report = AddReport()
        learned_before, staged_before = self._whitening, self.exact_until_trained
        pending: list[EncodedBatch] = []  # only while the index waits for enough vectors to learn from
        show = self.progress if progress is None else progress
        learning = self._encode_learning_cells(items, show)
        for batch in self._encoder.encode_images(items, report, progress=show):
            report.from_cache += batch.from_cache
            if self._needs_learning():
                pending.append(batch)
                if sum(len(b.vectors) for b in pending) < TRAINING_BUFFER:
                    continue
                batch, pending = EncodedBatch.merge(pending), []
            self._add_batch(batch, report, learning)
        if pending:
            self._add_batch(EncodedBatch.merge(pending), report, learning)
        if learned_before is None and self._whitening is not None:
            w = self._whitening
            report.notes.append(f"whitening learned on {w.learned_on_vectors:,} {w.learned_from} of "
                                f"{w.learned_on_images:,} images in {w.seconds:.2f} s")
        need = self.exact_until_trained
        if need is not None:
            source = self._index_config.training_source if isinstance(self._index_config, IVFPQConfig) else "all"
            report.notes.append(f"IVFPQ needs {need:,} training patches (training source {source!r}) and the index "
                                f"holds {self.n_patches:,} patches: searched exactly (flat) until then")
        elif staged_before is not None and self._index is not None:
            report.notes.append(f"IVFPQ trained on the {self.n_patches:,} patches held so far "
                                f"({self.index_config!r}); compressed search from now on")
        report.seconds = time.perf_counter() - started
        return report

    def _needs_learning(self) -> bool:
        """True until the whitening (if any) is learned and an IVFPQ index is trained."""
        if self._whitening_config is not None and self._whitening is None:
            return True
        if self._index is None:
            return isinstance(self._index_config, IVFPQConfig)
        return not self._index.is_trained

    def _encode_learning_cells(self, items: Sequence[ImageSource], progress: bool) -> LearningSet | None:
        """The whitening's learning cells (WhiteningConfig.learn_grid) of learn_images sources spread over all, when the
        whitening is still to learn and the index does not hold that grid itself; else None."""
        config = self._whitening_config
        if self._whitening is not None or config is None or config.learn_grid is None or \
                config.learn_grid in self.grids:
            return None
        grid = config.learn_grid
        if len(items) * grid * grid < config.min_vectors:
            return None  # too few images to learn from here: the index learns later, on what it then holds
        chosen = [items[i] for i in learning_images(len(items), config.learn_images)]
        vectors, n_images = self._encoder.encode_grid_cells(chosen, grid, len(chosen), progress=progress)
        return LearningSet(vectors, n_images, f"{grid}x{grid} cells") if len(vectors) else None

    def _add_batch(self, batch: EncodedBatch, report: AddReport, learning: LearningSet | None = None) -> None:
        started = time.perf_counter()
        ids = self.add_embeddings(batch.vectors, batch.patches, batch.images, whitening_vectors=learning)
        report.image_ids.extend(ids)
        report.n_patches += len(batch.vectors)
        report.timings["index"] += time.perf_counter() - started

    def add_embeddings(self, vectors: np.ndarray, patches: PatchTable, images: Sequence[NewImage], *,
                       whitening_vectors: "np.ndarray | LearningSet | None" = None) -> list[int]:
        """Indexes precomputed patch vectors: `vectors` (n, dim) L2-normalised, `patches` their table (n rows;
        `patches.image` = position in `images`; grids must be among this engine's), `images` the new images' names
        and sizes. Returns the new image ids. Nothing is changed when the call fails.

        whitening_vectors: what the whitening learns from if this call learns it (backbone vectors, e.g. the
        WhiteningConfig.learn_grid cells of some of these images); default: the learn_grid rows of `patches`
        when the engine indexes that grid, else all of `vectors`."""
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
        self._check_input_dim(vectors.shape[1])
        first_image, first_patch = len(self._images), len(self._patches)
        image_ids = patches.image + first_image
        patch_ids = np.arange(first_patch, first_patch + len(patches), dtype=np.int64)
        whitening, config = self._whitening, self._whitening_config
        held = self._index.ntotal if self._index is not None else 0
        trains_now = self._trains_ivfpq_now(held + len(vectors))
        if whitening is None and config is not None and held == 0:
            learning = _learning_set(config, vectors, patches, len(images), whitening_vectors)
            if len(learning.vectors) >= config.min_vectors or trains_now:
                whitening = Whitening.learn(learning.vectors, config, n_images=learning.n_images,
                                            learned_from=learning.description)
        if whitening is not None:
            vectors = whitening.apply(vectors)
        training = None
        if trains_now:
            # An IVFPQ index trains on everything it has: the vectors held exactly so far, and these; a training
            # source that selects (e.g. "salient") may leave too few, and then the index waits for more.
            assert isinstance(self._index_config, IVFPQConfig)
            if held:  # the flat index it searched exactly so far
                old_vectors, old_ids, old_grids, old_ids_images = self._unfolded_flat_rows()
            else:
                old_vectors, old_ids = np.zeros((0, vectors.shape[1]), np.float32), np.zeros(0, np.int64)
                old_grids, old_ids_images = self._patches.grid[old_ids], self._patches.image[old_ids]
            training = select_training_vectors(
                self._index_config.training_source, np.concatenate([old_vectors, vectors]),
                np.concatenate([old_ids_images, image_ids]), patch_grids=np.concatenate([old_grids, patches.grid]),
                given=self._training_vectors_in_index_space(whitening))
            trains_now = len(training) >= self._index_config.min_training_vectors()
        if trains_now or not self._folds():
            weight = 0.0  # an IVFPQ index stores plain vectors
        elif self._index is None or self._index.ntotal == 0:
            weight = self._weight_for(self._global_weight, whitening is not None)
        else:
            weight = self._folded_weight
        vectors = fold(vectors, patches.grid, patches.image, weight)
        index = self._index
        if trains_now:
            assert isinstance(self._index_config, IVFPQConfig) and training is not None
            index = self._index_config.create(vectors.shape[1], self._encoder.num_threads)
            index.train(training)
            if len(old_ids):
                index.add(old_vectors, old_ids, old_ids_images)
        elif index is None:
            # Flat: the configured one; IVFPQ with too few vectors to train: exact (flat) until there are enough.
            config_now = self._index_config if isinstance(self._index_config, FlatConfig) else FlatConfig()
            index = config_now.create(vectors.shape[1], self._encoder.num_threads)
        index.add(vectors, patch_ids, image_ids)
        # Committed: nothing below can fail on the caller's input.
        self._index, self._whitening, self._folded_weight = index, whitening, weight
        self._images.extend(ImageRecord(first_image + i, image.name, int(image.width), int(image.height))
                            for i, image in enumerate(images))
        self._patches.append(patches.with_image(image_ids))
        if self._whole_cache is not None and len(self._whole_cache) == first_image:  # extend, do not recompute
            new_rows = whole_image_rows(patches.grid, patches.image, len(images))
            self._whole_cache = np.concatenate([self._whole_cache, np.where(new_rows >= 0, new_rows + first_patch,
                                                                            -1)])
        if self._whitening is None and config is not None and isinstance(index.config, FlatConfig):
            # A flat index holding raw vectors until it had enough to learn from (the first adds were small):
            # learn now on the learning vectors given, else on everything it holds.
            given = None if whitening_vectors is None else _learning_set(config, vectors, patches, len(images),
                                                                         whitening_vectors)
            if given is not None and len(given.vectors) >= config.min_vectors:
                self.relearn_whitening(config, whitening_vectors=given)
            elif index.ntotal >= config.min_vectors:
                self.relearn_whitening(config)
        return list(range(first_image, len(self._images)))

    @property
    def exact_until_trained(self) -> int | None:
        """For an IVFPQ engine that has not yet had enough patches to train its codebooks: the number it needs
        (until then its patches are held and searched exactly, in a flat index); None otherwise."""
        if not isinstance(self._index_config, IVFPQConfig):
            return None
        if self._index is not None and not isinstance(self._index.config, FlatConfig):
            return None
        return self._index_config.min_training_vectors()

    def _trains_ivfpq_now(self, total: int) -> bool:
        need = self.exact_until_trained
        return need is not None and total >= need

    @property
    def input_dim(self) -> int | None:
        """Dimension of the vectors the engine takes (the backbone's), once known."""
        if self._whitening is not None:
            return self._whitening.input_dim
        return self._index.dim if self._index is not None else None

    def _check_input_dim(self, dim: int) -> None:
        expected = self.input_dim
        if expected is not None and dim != expected:
            raise ValueError(f"vectors have dimension {dim}, the index takes {expected}")

    def _training_vectors_in_index_space(self, whitening: Whitening | None) -> np.ndarray | None:
        """training_vectors are backbone vectors: the codebooks learn in the index's (whitened) space."""
        if self.training_vectors is None or whitening is None:
            return self.training_vectors
        return whitening.apply(self.training_vectors)

    def relearn_whitening(self, config: WhiteningConfig | None = None, *,
                          whitening_vectors: "np.ndarray | LearningSet | None" = None) -> Whitening:
        """Learns the whitening again on every patch the index holds now (after many adds, the first add's sample
        may no longer represent the database) and re-indexes them; `config` changes its settings (default: the
        current ones; this also whitens an index built with whitening="none"). Flat indexes only, and only with
        every dimension kept: the stored vectors are turned back into the backbone's exactly
        (`Whitening.recover`), so no image is read. An IVFPQ index holds codes trained in the old space: rebuild
        it instead. whitening_vectors: backbone vectors to learn from instead of the stored patches (as in
        add_embeddings). Returns the new whitening; the index is unchanged when this fails."""
        from .index.flat import FlatIndex

        config = config or self._whitening_config or DEFAULT_WHITENING
        if not isinstance(config, WhiteningConfig):
            raise ValueError(f"config must be a WhiteningConfig, got {type(config).__name__}")
        index = self._index
        if index is None or index.ntotal == 0:
            raise ValueError("the index is empty: nothing to learn the whitening from")
        if not isinstance(index, FlatIndex):
            raise ValueError("relearn_whitening works on flat indexes: IVFPQ codes were trained in the old whitened "
                             "space, so rebuild the index (add the images to a new engine; the embedding cache "
                             "makes that a disk read, not a backbone pass)")
        if self._whitening is not None and not self._whitening.invertible:
            raise ValueError(f"the current whitening keeps {self._whitening.output_dim} of "
                             f"{self._whitening.input_dim} dimensions: the backbone's vectors cannot be recovered; "
                             "rebuild the index")
        stored, patch_ids, grids, image_ids = self._unfolded_flat_rows()
        raw = stored if self._whitening is None else self._whitening.recover(stored)
        learning = _learning_set(config, raw, self._patches.select(patch_ids), self.n_images, whitening_vectors,
                                 limit=False)
        whitening = Whitening.learn(learning.vectors, config, n_images=learning.n_images,
                                    learned_from=learning.description)
        weight = self._weight_for(self._global_weight, True)
        self._rebuild_flat(fold(whitening.apply(raw), grids, image_ids, weight), patch_ids, image_ids)
        self._whitening, self._whitening_config, self._folded_weight = whitening, config, weight
        return whitening

    def _check_training_source(self) -> None:
        """Refuses before any encoding what training would refuse after it: a training source that needs vectors
        nobody gave. (Too few patches to train is not an error: the engine searches exactly until there are
        enough, see `exact_until_trained`.)"""
        config = self._index_config
        if isinstance(config, IVFPQConfig) and self.exact_until_trained is not None and \
                config.training_source in ("given", "gt-aligned") and self.training_vectors is None:
            raise ValueError(f"training_source {config.training_source!r} needs training_vectors=(n, dim) vectors")

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
    def _check_searchable(self) -> None:
        if self._index is None or self._index.ntotal == 0:
            raise ValueError("the index is empty: add images before searching")

    def _ranked_hits(self, vectors: np.ndarray, k: int) -> list[list[Hit]]:
        scores, image_ids, patch_ids = self.search_vectors(vectors, k)
        return [self._hits(scores[q], image_ids[q], patch_ids[q]) for q in range(len(vectors))]

    def search_vectors(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The ranking behind `search_batch`, as arrays: queries (nq, dim) backbone descriptors -> (scores, image
        ids, winning patch ids), each (nq, min(k, images)), best first, padded with -inf / -1. Applies the
        whitening; the global + patch fusion is folded into the stored vectors (patchify.fusion)."""
        k = check_k(k)
        self._check_searchable()
        queries = self._index_space(queries)
        weight = self.effective_global_weight
        if weight > 0 and not self._folds():
            return self._fused_second_stage(queries, k, weight)
        assert self._index is not None  # _check_searchable
        return self._index.search(queries, k)

    def search_candidates(self, queries: np.ndarray, k: int
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """What `search_vectors` chooses its top k from, for merging the results of engines that share their
        training (the shards of patchify.distributed): (first-stage scores, scores, image ids, winning patch ids),
        each (nq, c), sorted by score. A two-stage IVFPQ index gives its whole shortlist: its top k are the best k by
        score among the best `shortlist(k)` by first-stage (PQ) score. Flat and one-stage IVFPQ give their top k
        (first-stage score = score)."""
        from .index.ivfpq import IVFPQIndex

        k = check_k(k)
        self._check_searchable()
        index = self._index
        if not isinstance(index, IVFPQIndex) or index.rerank_store is None:
            scores, images, patches = self.search_vectors(queries, k)
            return scores, scores, images, patches
        queries = self._index_space(queries)
        weight = self.effective_global_weight
        if weight > 0:
            return self._fused_shortlist(queries, k, weight)
        return index.search_shortlist_scored(queries, k)

    def _index_space(self, queries: np.ndarray) -> np.ndarray:
        """Backbone descriptors (nq, dim) as the index compares them: float32, whitened when the index is."""
        queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        self._check_input_dim(queries.shape[1])
        return self._whitening.apply(queries) if self._whitening is not None else queries

    def start_from_trained(self, index: "PatchIndex") -> None:
        """Gives this empty engine a trained, empty index to fill (e.g. IVFPQ codebooks trained once, on a sample,
        for every shard of a sharded index: `IVFPQIndex.trained_copy`), so that engines sharing it hold comparable
        codes. An engine that whitens must have its whitening already (given as `whitening=`): the index was
        trained in that space."""
        if self._index is not None or self._images:
            raise ValueError("start_from_trained needs an empty engine")
        if not index.is_trained or index.ntotal:
            raise ValueError("start_from_trained takes a trained, empty index")
        if self._whitening_config is not None and self._whitening is None:
            raise ValueError("this engine still has to learn its whitening: give the one the index was trained "
                             "with (whitening=Whitening)")
        if self._whitening is not None and self._whitening.output_dim != index.dim:
            raise ValueError(f"the index holds dimension {index.dim}, the whitening gives {self._whitening.output_dim}")
        self._index, self._index_config = index, index.config

    def _fused_second_stage(self, queries: np.ndarray, k: int, weight: float
                            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """IVFPQ: the second stage's exact best-patch scores of the whole shortlist, fused with each image's
        whole-image score read from the re-rank store, top k of those (in the C++ second stage)."""
        from .index.ivfpq import IVFPQIndex

        index = self._index
        assert isinstance(index, IVFPQIndex) and index.rerank_store is not None
        return index.search(queries, k, fusion=self._global_fusion(weight))

    def _fused_shortlist(self, queries: np.ndarray, k: int, weight: float
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """IVFPQ: the whole shortlist of a top-k search, each image's exact best-patch score fused with its
        whole-image score read from the re-rank store, sorted by that: (first-stage scores, fused scores, image
        ids, patch ids)."""
        from .index.ivfpq import IVFPQIndex

        index = self._index
        assert isinstance(index, IVFPQIndex) and index.rerank_store is not None
        return index.search_shortlist_scored(queries, k, fusion=self._global_fusion(weight))

    def _global_fusion(self, weight: float) -> GlobalFusion:
        return GlobalFusion(self._whole_image_patches(), weight)

    def _whole_image_patches(self) -> np.ndarray:
        """Per image id, the patch id of its whole image (grid 1), -1 if none; built once, extended by adds."""
        cached = self._whole_cache
        if cached is not None and len(cached) == len(self._images):
            return cached
        self._whole_cache = whole_image_rows(self._patches.grid, self._patches.image, len(self._images))
        return self._whole_cache

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
        staging = self._index_config if self.exact_until_trained is not None else None
        saved_to = store.save(directory, backbone=record, tiling=self.tiling, index=self._index, images=self._images,
                              target_index=staging, owned_images_from=self._folder,
                              patches=self._patches, whitening_config=self._whitening_config,
                              whitening=self._whitening, global_weight=self._global_weight,
                              folded_weight=self._folded_weight, patchify_version=_core.__version__)
        self._folder = saved_to
        return saved_to

    @classmethod
    def load(cls, directory: str | os.PathLike, *, backbone: "str | Backbone | None" = None,
             num_threads: int = 0, embedding_cache: bool | str | os.PathLike | None = None,
             verify: bool = False) -> "Patchify":
        """Loads an index saved by `save` (any supported format version). The backbone is loaded lazily and must
        match the one that built it (BackboneMismatchError). verify=True checks every file's sha256."""
        saved = store.load(directory, num_threads=num_threads, verify=verify)
        engine = cls.__new__(cls)  # __init__ would build a fresh encoder and check the saved backbone's name
        # Queries (and added images) are encoded at the precision the index was built with.
        encoder = Encoder(saved.backbone.name if backbone is None else backbone, saved.tiling,
                          num_threads=num_threads, embedding_cache=embedding_cache,
                          expected_identity=saved.backbone.identity, check_name=backbone is not None,
                          precision=precision_of(saved.backbone.identity))
        engine._compose(encoder, saved.target_index or saved.index.config, saved.index, saved.images,
                        saved.patches, saved.backbone, saved.whitening_config, saved.whitening,
                        saved.global_weight, saved.folded_weight)
        engine._folder = Path(directory)
        return engine


def _learning_set(config: WhiteningConfig, vectors: np.ndarray, patches: PatchTable, n_images: int,
                  given: "np.ndarray | LearningSet | None", *, limit: bool = True) -> LearningSet:
    """What a whitening learns from: the vectors given, else the rows of config.learn_grid (of learn_images images
    spread over the batch, unless not `limit`) when there are enough of them, else every vector."""
    if given is not None:
        learning = given if isinstance(given, LearningSet) else LearningSet(np.asarray(given, np.float32), n_images,
                                                                            "given vectors")
        if learning.vectors.ndim != 2 or learning.vectors.shape[1] != vectors.shape[1]:
            raise ValueError(f"whitening_vectors must be (n, {vectors.shape[1]}) like the patch vectors, got shape "
                             f"{learning.vectors.shape}")
        return learning
    if config.learn_grid is not None:
        cells = LearningSet.of_grid_cells(config, vectors, patches.grid, patches.image, n_images, limit=limit)
        if len(cells.vectors) >= config.min_vectors:
            return cells
    return LearningSet(vectors, n_images, "indexed patches")


def whitening_setting(setting: WhiteningSetting) -> tuple[WhiteningConfig | None, Whitening | None]:
    """(what to learn, what is already learned) from the `whitening=` argument."""
    if setting is None or setting is False or setting == "none":
        return None, None
    if setting == "learned" or setting is True:
        return DEFAULT_WHITENING, None
    if isinstance(setting, WhiteningConfig):
        return setting, None
    if isinstance(setting, Whitening):
        return setting.config, setting
    raise ValueError(f"whitening must be 'learned', 'none', a WhiteningConfig or a Whitening, got {setting!r}"[:200])


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

