"""The data that flows between the encoder, the engine, the index and the store.

- `ImageRecord`: one database image (id, name, size, removed flag).
- `PatchTable`: per patch, its image, box, grid and cell, as parallel numpy arrays (row i = patch i). Tables grow
  by amortised doubling, so adding batch after batch is linear in the number of patches.
- `Hit`, `SkippedImage`, `AddReport`: what searches and adds return.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

from .errors import PatchifyError


@dataclass(frozen=True)
class ImageRecord:
    """A database image. `name` is its path as given (or a description for in-memory images); width and height
    are its pixels after EXIF rotation; `removed` images keep their id (ids are never reused)."""

    id: int
    name: str
    width: int
    height: int
    removed: bool = False

    def to_dict(self) -> dict[str, object]:
        data: dict[str, object] = {"id": self.id, "name": self.name, "width": self.width, "height": self.height}
        if self.removed:
            data["removed"] = True
        return data

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> "ImageRecord":
        # Format v1 called the name "path".
        name = data["name"] if "name" in data else data["path"]
        return cls(id=int(data["id"]), name=str(name), width=int(data["width"]),  # type: ignore[call-overload]
                   height=int(data["height"]), removed=bool(data.get("removed", False)))  # type: ignore[call-overload]


@dataclass(frozen=True)
class NewImage:
    """An image about to be added with `Patchify.add_embeddings`: its name and size in pixels."""

    name: str
    width: int
    height: int


_COLUMNS = {"image": (np.int64, ()), "box": (np.int32, (4,)), "grid": (np.int16, ()), "cell": (np.int16, ())}


class PatchTable:
    """Per patch: `image` (int64: the image id, or in a batch the position of its image in that batch), `box`
    (int32 (n, 4): x0, y0, x1, y1 in the image's pixels, exclusive max), `grid` (int16: grid size, 1 = whole
    image) and `cell` (int16: row-major cell in its grid)."""

    __slots__ = ("_columns", "_n")

    def __init__(self, image: np.ndarray, box: np.ndarray, grid: np.ndarray, cell: np.ndarray) -> None:
        given = {"image": image, "box": box, "grid": grid, "cell": cell}
        n = len(np.asarray(image))
        columns = {}
        for name, (dtype, tail) in _COLUMNS.items():
            array = np.asarray(given[name])
            if array.shape != (n, *tail):
                raise PatchifyError(f"patch table column {name!r} has shape {array.shape}, expected {(n, *tail)}")
            if array.size and not np.issubdtype(array.dtype, np.integer):
                raise PatchifyError(f"patch table column {name!r} must be integers, got {array.dtype}")
            columns[name] = np.ascontiguousarray(array, dtype=dtype)
        self._columns = columns
        self._n = n

    @classmethod
    def empty(cls) -> "PatchTable":
        return cls(np.zeros(0, np.int64), np.zeros((0, 4), np.int32), np.zeros(0, np.int16), np.zeros(0, np.int16))

    @classmethod
    def concatenate(cls, tables: Iterable["PatchTable"]) -> "PatchTable":
        tables = list(tables)
        if not tables:
            return cls.empty()
        return cls(*(np.concatenate([t._column(name) for t in tables]) for name in _COLUMNS))

    def __len__(self) -> int:
        return self._n

    def __repr__(self) -> str:
        return f"PatchTable({self._n} patches)"

    def _column(self, name: str) -> np.ndarray:
        return self._columns[name][: self._n]

    @property
    def image(self) -> np.ndarray:
        return self._column("image")

    @property
    def box(self) -> np.ndarray:
        return self._column("box")

    @property
    def grid(self) -> np.ndarray:
        return self._column("grid")

    @property
    def cell(self) -> np.ndarray:
        return self._column("cell")

    @property
    def level(self) -> np.ndarray:
        """Grid level of each patch (0 = whole image)."""
        return self.grid.astype(np.int16) - 1

    def select(self, rows: np.ndarray) -> "PatchTable":
        """The rows picked by a boolean mask or an index array, as a new table."""
        return PatchTable(*(self._column(name)[rows] for name in _COLUMNS))

    def with_image(self, image: np.ndarray) -> "PatchTable":
        """The same patches assigned to other images (e.g. batch positions -> image ids)."""
        return PatchTable(image, self.box, self.grid, self.cell)

    def append(self, other: "PatchTable") -> None:
        """Appends `other`'s rows in place (capacity doubles, so repeated appends cost linear time overall)."""
        need = self._n + len(other)
        capacity = len(self._columns["image"])
        if need > capacity:
            grown = max(need, 2 * capacity, 1024)
            for name, (dtype, tail) in _COLUMNS.items():
                bigger = np.empty((grown, *tail), dtype)
                bigger[: self._n] = self._columns[name][: self._n]
                self._columns[name] = bigger
        for name in _COLUMNS:
            self._columns[name][self._n: need] = other._column(name)
        self._n = need

    def arrays(self) -> dict[str, np.ndarray]:
        """The columns by name (views: do not modify)."""
        return {name: self._column(name) for name in _COLUMNS}


@dataclass(frozen=True)
class Hit:
    """One retrieved image: its score is the best patch's similarity; `box` (x0, y0, x1, y1, original pixels,
    exclusive max) is where that patch lies, `level` its grid level (0 = whole image). `path` is the image's name
    as it was added (its path for files)."""

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
    for decoded and tiled images (decoding and tiling run in worker threads, overlapped with encoding; "tile" is
    what the calling thread tiled itself: images a worker could not tile together, retried one by one).
    "decode_cpu" and "tile_cpu" are the decode (cache look-ups included) and tile times summed over the worker
    threads: they can exceed the wait, and `seconds`.

    `notes`: what happened to the index itself during this add, in words: the whitening learned, an IVFPQ index
    trained, or still searched exactly because it has too few patches to train."""

    image_ids: list[int] = field(default_factory=list)
    n_patches: int = 0
    skipped: list[SkippedImage] = field(default_factory=list)
    seconds: float = 0.0
    from_cache: int = 0
    timings: dict[str, float] = field(
        default_factory=lambda: {"decode": 0.0, "decode_cpu": 0.0, "tile": 0.0, "tile_cpu": 0.0, "encode": 0.0,
                                 "index": 0.0})
    notes: list[str] = field(default_factory=list)

    @property
    def n_images(self) -> int:
        return len(self.image_ids)

    def __str__(self) -> str:
        lines = [f"{self.n_images} images, {self.n_patches} patches in {self.seconds:.1f} s"
                 f" ({self.from_cache} from the embedding cache), {len(self.skipped)} skipped"]
        lines += [f"  {note}" for note in self.notes]
        lines += [f"  skipped {s.source}: {s.reason}" for s in self.skipped]
        return "\n".join(lines)
