"""`RetrievalDataset`: what every benchmark loader returns (database and query paths plus ground truth).

Database images are identified by their index in `database`; the ground truth (`positives`, `junk`, `boxes`)
uses those indices, so `groundtruth()` plugs straight into `patchify.metrics.evaluate_rankings`, and
`evaluate(hits_per_query)` maps engine hits back to indices through their paths.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..metrics import QueryGroundTruth, RetrievalEvaluation, evaluate_rankings, rankings_from_hits

Box = tuple[float, float, float, float]


@dataclass
class RetrievalDataset:
    """database[i] / queries[q]: image paths. positives[q], junk[q]: database indices. boxes[q][i]: ground-truth
    boxes (x0, y0, x1, y1, exclusive max, database-image pixels) of the query's object in database image i
    (absent when the benchmark has none). query_boxes[q]: the object's box in the query image, or None."""

    name: str
    root: Path
    database: list[Path]
    queries: list[Path]
    positives: list[list[int]]
    junk: list[list[int]] = field(default_factory=list)
    boxes: list[dict[int, list[Box]]] = field(default_factory=list)
    query_boxes: list[Box | None] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        nq = len(self.queries)
        self.junk = self.junk or [[] for _ in range(nq)]
        self.boxes = self.boxes or [{} for _ in range(nq)]
        self.query_boxes = self.query_boxes or [None] * nq
        for name in ("positives", "junk", "boxes", "query_boxes"):
            if len(getattr(self, name)) != nq:
                raise ValueError(f"{self.name}: {len(getattr(self, name))} {name} for {nq} queries")
        self._index: dict[str, int] | None = None

    @property
    def n_queries(self) -> int:
        return len(self.queries)

    def groundtruth(self) -> list[QueryGroundTruth]:
        """Per query ground truth keyed by database index, for `metrics.evaluate_rankings`."""
        return [QueryGroundTruth(frozenset(p), frozenset(j), {i: tuple(b) for i, b in bx.items()})
                for p, j, bx in zip(self.positives, self.junk, self.boxes, strict=True)]

    def subsample(self, every: int) -> "RetrievalDataset":
        """Every `every`-th database image (spread over the database, e.g. over products sorted by name), with the
        ground truth renumbered; queries unchanged. For quicker comparisons on a slow encoder."""
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an integer >= 1, got {every!r}")
        kept = list(range(0, len(self.database), every))
        new_index = {old: new for new, old in enumerate(kept)}

        def renumber(ids: list[int]) -> list[int]:
            return [new_index[i] for i in ids if i in new_index]

        return RetrievalDataset(
            name=f"{self.name} (every {every})" if every > 1 else self.name, root=self.root,
            database=[self.database[i] for i in kept], queries=list(self.queries),
            positives=[renumber(p) for p in self.positives], junk=[renumber(j) for j in self.junk],
            boxes=[{new_index[i]: b for i, b in bx.items() if i in new_index} for bx in self.boxes],
            query_boxes=list(self.query_boxes), info=dict(self.info))

    def index_of(self, path: str | os.PathLike) -> int:
        """Database index of a path as given to the engine (exact string or the same file resolved)."""
        if self._index is None:
            self._index = {}
            for i, p in enumerate(self.database):
                self._index[os.fspath(p)] = i
                self._index[os.path.realpath(p)] = i
        key = os.fspath(path)
        if key in self._index:
            return self._index[key]
        return self._index[os.path.realpath(key)]

    def query_image(self, q: int) -> np.ndarray:
        """Query q's pixels (HxWx3 uint8), cut to its object box when the benchmark gives one (as revisited
        Oxford/Paris do)."""
        from ..images import load_rgb

        pixels = load_rgb(self.queries[q])
        box = self.query_boxes[q]
        if box is None:
            return pixels
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        crop = pixels[max(0, y0):max(y0 + 1, y1), max(0, x0):max(x0 + 1, x1)]
        return np.ascontiguousarray(crop)

    def evaluate(self, hits_per_query: Sequence[Sequence[Any]], **kwargs: Any) -> RetrievalEvaluation:
        """Evaluate engine results (one list of `Hit` per query, in query order); kwargs go to
        `evaluate_rankings` (map_k, recall_ks, variant, ties)."""
        rankings, boxes, scores = rankings_from_hits(hits_per_query, id_of=lambda h: self.index_of(h.path))
        return evaluate_rankings(rankings, boxes, self.groundtruth(), scores=scores,
                                 query_ids=[q.name for q in self.queries], **kwargs)


def read_xywh_boxes(path: Path) -> list[Box]:
    """Boxes from a text file of "x y w h" lines (INSTRE, ILIAS) -> [(x0, y0, x1, y1)]; [] when missing/empty."""
    if not path.is_file():
        return []
    rows = [line.replace(",", " ").split() for line in path.read_text().splitlines()]
    arr = np.array([[float(v) for v in r[:4]] for r in rows if len(r) >= 4], dtype=np.float64).reshape(-1, 4)
    return [(x, y, x + w, y + h) for x, y, w, h in arr.tolist()]


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def list_images(folder: Path) -> list[Path]:
    """Image files directly in `folder`, sorted by name (deterministic order)."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
