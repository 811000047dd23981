"""The served index: one engine, its folder, and the locking that lets searches run while images are added.

Concurrency, and why a readers-writer lock rather than copy-on-write of the engine: the engine changes in place
(the index appends rows, the patch table and the image records grow), so copy-on-write would copy the whole index
(every patch vector) for each add. Instead each add or remove:

1. decodes and encodes its images with no lock held (the backbone is the slow part: ~0.1-0.2 s per image on a
   CPU with the default one), in parallel with searches and with other adds' encoding;
2. takes the writers' mutex (one change of the engine and its folder at a time), then the lock exclusively for
   `add_embeddings` alone: appending a few images' rows, milliseconds (the first add that learns the whitening or
   trains an IVFPQ index takes longer: once per index);
3. saves the folder holding only the writers' mutex: a save only reads the engine, and only writers change it, so
   searches go on while it writes (its cost grows with the index) and still see a consistent engine.

Searches hold the lock shared, only around the index search itself (a query image is encoded before): they run
in parallel (the C++ search releases the GIL) and a search sees an image whole or not at all. A waiting writer
keeps new searches out until it has had its turn, so a stream of searches cannot starve adds.
"""
from __future__ import annotations

import hashlib
import io
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image

from .. import store
from ..config import ServeConfig
from ..encoder import EncodedBatch
from ..engine import Patchify
from ..errors import ImageError, ReadOnlyIndexError
from ..images import decode_bytes
from ..records import AddReport, Hit, ImageRecord, NewImage, SkippedImage

if TYPE_CHECKING:
    from ..backbones import Backbone
    from ..distributed import ShardedIndex

# The file suffix an uploaded image is stored under, by Pillow's format name (so the browser is told its type).
_SUFFIXES = {"JPEG": ".jpg", "PNG": ".png", "GIF": ".gif", "WEBP": ".webp", "BMP": ".bmp", "TIFF": ".tif",
             "PPM": ".ppm", "MPO": ".jpg"}


class ReadWriteLock:
    """Many readers or one writer; a waiting writer keeps new readers out. (The standard library has none.)"""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._readers = 0
        self._writing = False
        self._writers_waiting = 0

    @contextmanager
    def reading(self) -> Iterator[None]:
        with self._condition:
            while self._writing or self._writers_waiting:
                self._condition.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._condition:
                self._readers -= 1
                if self._readers == 0:
                    self._condition.notify_all()

    @contextmanager
    def writing(self) -> Iterator[None]:
        with self._condition:
            self._writers_waiting += 1
            try:
                while self._writing or self._readers:
                    self._condition.wait()
            finally:
                self._writers_waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._condition:
                self._writing = False
                self._condition.notify_all()


@dataclass
class Upload:
    """An uploaded file: the name the client gave (for messages only: it never becomes a path) and its bytes."""

    filename: str
    data: bytes


@dataclass
class AddResult:
    """What an add did: the new images (id, stored name, the client's file name), patches added, and every upload
    skipped with its reason (the others are added regardless)."""

    images: list[dict[str, Any]] = field(default_factory=list)
    n_patches: int = 0
    skipped: list[SkippedImage] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class _Staged:
    upload: Upload
    stored_name: str  # the image record's name: OWNED_IMAGES/<content hash><suffix>, relative to the folder
    batch: EncodedBatch


class UnknownImageError(LookupError):
    """Image ids that are not (or no longer) in the served index."""

    def __init__(self, image_ids: Sequence[int]) -> None:
        super().__init__(f"no image {', '.join(map(str, image_ids))} in the index")
        self.image_ids = list(image_ids)


class ServedIndex:
    """A saved index opened for serving: searches, adds and removes that persist to its folder atomically."""

    def __init__(self, directory: str | os.PathLike, engine: "Patchify | ShardedIndex", config: ServeConfig) -> None:
        self.directory = Path(directory)
        self.config = config
        self._engine = engine
        # A sharded index (patchify.distributed) is searched like an engine but read-only: adds and removes refused.
        self.read_only = not isinstance(engine, Patchify)
        self._lock = ReadWriteLock()
        self._writer = threading.Lock()  # one add or remove (engine change + save) at a time

    @classmethod
    def open(cls, directory: str | os.PathLike, config: ServeConfig | None = None, *,
             backbone: "str | Backbone | None" = None) -> "ServedIndex":
        """Loads the index in `directory` (finishing a save a crash interrupted between its renames), loads its
        backbone now (not on the first request, where two requests would race to load it) and deletes image files
        that a crash left behind unrecorded."""
        directory = Path(directory)
        from ..distributed.layout import is_sharded_index

        if is_sharded_index(directory):  # shards searched in this process; built by `patchify index --ray/--shard-size`
            from ..distributed import ShardedIndex

            sharded = ShardedIndex.load(directory, backbone=backbone)
            _ = sharded.backbone
            return cls(directory, sharded, config or ServeConfig())
        store.recover_interrupted_save(directory)
        engine = Patchify.load(directory, backbone=backbone)
        _ = engine.backbone
        served = cls(directory, engine, config or ServeConfig())
        served._delete_unrecorded_images()
        return served

    @property
    def engine(self) -> "Patchify | ShardedIndex":
        return self._engine

    @property
    def images(self) -> Sequence[ImageRecord]:
        """Every image's record by id (removed ones included, flagged)."""
        return self._engine.images

    # ------------------------------------------------------------------ reading
    def decode(self, upload: Upload) -> np.ndarray:
        """The upload's pixels (HxWx3 uint8), or an ImageError naming the client's file name."""
        return decode_bytes(upload.data, upload.filename or "upload", max_pixels=self.config.max_pixels)

    def search_images(self, images: Iterable[np.ndarray], k: int) -> list[list[Hit]]:
        """Top-k images for each query image (decoded pixels, already cropped to the query box). Each is embedded
        before the next is drawn, so a generator of decodes keeps one decoded upload in memory at a time (16 uploads
        of 40 MP held at once would be ~2 GB per request)."""
        vectors = np.stack([self._engine.embed_query(image) for image in images])  # the backbone, before any lock
        return self.search_vectors(vectors, k)

    def search_vectors(self, vectors: np.ndarray, k: int) -> list[list[Hit]]:
        """Top-k images for each descriptor row; the library checks dimension, finiteness, k and emptiness."""
        with self._lock.reading():
            return self._engine.search_batch(list(np.atleast_2d(vectors)), k=k)

    def info(self) -> dict[str, Any]:
        with self._lock.reading():
            engine = self._engine
            common = {"n_images": engine.n_images, "n_patches": engine.n_patches, "n_records": len(engine.images),
                      "index_config": engine.index_config.to_dict(), "dim": engine.input_dim,
                      "read_only": self.read_only}
            if isinstance(engine, Patchify):
                return {**common, "whitened": engine.whitening is not None,
                        "global_weight": engine.effective_global_weight}
            return {**common, "n_shards": engine.n_shards}

    def record(self, image_id: int) -> ImageRecord | None:
        """The image's record, None if no such image (or removed)."""
        images = self.images
        if not 0 <= image_id < len(images) or images[image_id].removed:
            return None
        return images[image_id]

    def image_file(self, image_id: int) -> Path | None:
        """The file of a database image, from its record only (never from a request): an uploaded image lives in
        the index folder; others are where `patchify index` found them (absolute, or relative to the server's
        working directory, as `patchify search` reads them). None if unknown or not on disk."""
        record = self.record(image_id)
        if record is None:
            return None
        name = Path(record.name)
        path = self.directory / name if name.parts[:1] == (store.OWNED_IMAGES,) else name
        return path if path.is_file() else None

    # ------------------------------------------------------------------ writing
    def _writable(self) -> Patchify:
        if not isinstance(self._engine, Patchify):
            raise ReadOnlyIndexError(f"{self.directory} is a sharded index: read-only (build it again with the new "
                                     "images to add them)")
        return self._engine

    def add(self, uploads: Sequence[Upload]) -> AddResult:
        """Adds the uploads that decode and tile; skips (and reports) the others. Persisted before it returns."""
        engine = self._writable()
        started = time.perf_counter()
        result = AddResult()
        staged = [item for item in (self._encode(upload, result) for upload in uploads) if item is not None]
        if staged:
            batch = EncodedBatch.merge([item.batch for item in staged])
            with self._writer:
                for item in staged:
                    self._store_file(item)
                with self._lock.writing():
                    ids = engine.add_embeddings(batch.vectors, batch.patches, batch.images)
                engine.save(self.directory)
            result.images = [{"id": image_id, "name": item.stored_name, "filename": item.upload.filename}
                             for image_id, item in zip(ids, staged)]
            result.n_patches = len(batch.vectors)
        result.seconds = time.perf_counter() - started
        return result

    def remove(self, image_ids: Sequence[int]) -> int:
        """Removes images by id; returns the patches removed. Persisted. UnknownImageError for an id that is not
        (or no longer) in the index, checked under the writer lock, so two removals of one image cannot both pass."""
        engine = self._writable()
        with self._writer:
            unknown = [image_id for image_id in image_ids if self.record(image_id) is None]
            if unknown:
                raise UnknownImageError(unknown)
            with self._lock.writing():
                removed = engine.remove_images(image_ids)
            engine.save(self.directory)
        return removed

    def _encode(self, upload: Upload, result: AddResult) -> _Staged | None:
        name = upload.filename or "upload"
        try:
            pixels = self.decode(upload)
        except ImageError as exc:
            result.skipped.append(SkippedImage(name, exc.reason))
            return None
        report = AddReport()
        batches = list(self._writable().encoder.encode_images([pixels], report))
        if not batches:  # the tiler refused it (e.g. smaller than the finest grid)
            reason = report.skipped[0].reason if report.skipped else "could not be encoded"
            result.skipped.append(SkippedImage(name, reason))
            return None
        batch = EncodedBatch.merge(batches)
        stored = f"{store.OWNED_IMAGES}/{hashlib.sha256(upload.data).hexdigest()[:32]}{_suffix(upload.data)}"
        image = batch.images[0]
        batch.images = [NewImage(stored, image.width, image.height)]
        return _Staged(upload, stored, batch)

    def _store_file(self, item: _Staged) -> None:
        """Writes the upload into the index folder (write + rename: never a half file under its final name). The
        next save carries it into the new folder; a crash before that save leaves it unrecorded, and `open`
        deletes it."""
        path = self.directory / item.stored_name
        if path.is_file():
            return  # the same bytes were uploaded before: the name is their hash
        path.parent.mkdir(exist_ok=True)
        partial = path.with_name(f".{path.name}.partial")
        partial.write_bytes(item.upload.data)
        os.replace(partial, path)

    def _delete_unrecorded_images(self) -> None:
        folder = self.directory / store.OWNED_IMAGES
        if not folder.is_dir():
            return
        recorded = {Path(image.name).name for image in self.images
                    if Path(image.name).parts[:1] == (store.OWNED_IMAGES,)}
        for path in folder.iterdir():
            if path.is_file() and path.name not in recorded:
                path.unlink()


def _suffix(data: bytes) -> str:
    """The file suffix of an image that has already decoded (reads its header again, nothing more)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return _SUFFIXES.get(image.format or "", ".img")
    except Exception:  # decoded a moment ago, so unreachable in practice; a suffix is not worth failing for
        return ".img"
