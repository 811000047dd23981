"""Searching a sharded index: the query encoded once, its vector sent to every shard, the shards' results merged.

Exact across shards: an image lives in one shard, and every shard holds its images exactly as one engine would
(same backbone, tiling, whitening, global + patch fusion; IVFPQ: one training shared by all, see
patchify.distributed.build), so an image's scores do not depend on which shard holds it. A flat (or one-stage
IVFPQ) shard's top k therefore holds every image of the global top k that it owns, and the merge is a top k of
the union. A two-stage IVFPQ search re-ranks a shortlist of the best `shortlist(k)` images by first-stage (PQ)
score: each shard returns its own shortlist with both scores, the merge keeps the global best `shortlist(k)` by
first-stage score (each shard's shortlist holds its members of that set) and ranks those by their final score -
what one index holding every image returns (ties at a cut aside).

Each shard applies the whitening itself (one (dim x dim) product per query: identical in every shard, and cheaper
than a second code path that takes whitened queries).

Two ways to hold the shards, behind one interface (`ShardSearcher`): `LocalShards` loads them in this process;
`patchify.distributed.ray_backend.RayShards` holds one per Ray actor, so shards larger than one machine's memory
are searched in parallel on several.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, Sequence

import numpy as np

from ..config import IVFPQConfig, TilingConfig, index_config_from_dict, precision_of, rerank_shortlist_size
from ..encoder import Encoder
from ..engine import Patchify
from ..index.base import check_k, result_width
from ..query_front import QueryFront
from .. import store
from ..records import Hit, ImageRecord
from . import layout

if TYPE_CHECKING:
    from ..backbones import Backbone
    from ..config import IndexConfig


@dataclass
class ShardCandidates:
    """One shard's candidates for a batch of queries, ids already global: (nq, c) arrays sorted by score, and
    what a `Hit` needs about each (so the merge needs no second round trip to the shards)."""

    first_scores: np.ndarray
    scores: np.ndarray
    image_ids: np.ndarray
    patch_ids: np.ndarray
    boxes: np.ndarray  # (nq, c, 4)
    grids: np.ndarray
    cells: np.ndarray
    names: list[list[str]]


def shard_candidates(engine: Patchify, queries: np.ndarray, k: int, first_image_id: int,
                     first_patch_id: int) -> ShardCandidates:
    """Runs in the shard's process: its `search_candidates`, with global ids and the hits' details."""
    first, scores, images, patches = engine.search_candidates(queries, k)
    found = images >= 0
    table = engine.patches
    rows = np.where(found, patches, 0)
    names = [[engine.images[int(i)].name if i >= 0 else "" for i in row] for row in images]
    return ShardCandidates(first, scores, np.where(found, images + first_image_id, -1),
                           np.where(found, patches + first_patch_id, -1), table.box[rows], table.grid[rows],
                           table.cell[rows], names)


@dataclass
class MergedResults:
    """The merged top k: (nq, width) arrays as `Patchify.search_vectors` returns them, and the hits."""

    scores: np.ndarray
    image_ids: np.ndarray
    patch_ids: np.ndarray
    hits: list[list[Hit]]


def merge_candidates(parts: Sequence[ShardCandidates], k: int, n_images: int, shortlist: int | None) -> MergedResults:
    """The top k over all shards' candidates (width min(k, n_images), padded with -inf / -1). shortlist: for a
    two-stage IVFPQ index, how many images by first-stage score the single index would re-rank (None: flat or
    one-stage: candidates compete on their score alone). Ties are broken by image id."""
    width = result_width(k, n_images)
    first = np.concatenate([p.first_scores for p in parts], axis=1)
    scores = np.concatenate([p.scores for p in parts], axis=1).astype(np.float32)
    images = np.concatenate([p.image_ids for p in parts], axis=1)
    patches = np.concatenate([p.patch_ids for p in parts], axis=1)
    boxes = np.concatenate([p.boxes for p in parts], axis=1)
    grids = np.concatenate([p.grids for p in parts], axis=1)
    cells = np.concatenate([p.cells for p in parts], axis=1)
    nq = len(scores)
    names = [[name for p in parts for name in p.names[q]] for q in range(nq)]
    scores = np.where(images >= 0, scores, -np.inf)
    if shortlist is not None and first.shape[1] > shortlist:
        # Only the global shortlist by first-stage score competes: the images a single index would re-rank.
        by_first = np.argsort(-np.where(images >= 0, first, -np.inf), axis=1, kind="stable")
        outside = np.zeros(scores.shape, bool)
        np.put_along_axis(outside, by_first[:, shortlist:], True, axis=1)
        scores = np.where(outside, -np.inf, scores)
    order = np.lexsort((images, -scores), axis=1)[:, :width]  # by score, then image id
    top = np.take_along_axis(scores, order, axis=1)
    found = np.isfinite(top)
    top_images = np.where(found, np.take_along_axis(images, order, axis=1), -1)
    top_patches = np.where(found, np.take_along_axis(patches, order, axis=1), -1)
    hits = []
    for q in range(nq):
        row = []
        for rank, column in enumerate(order[q]):
            if not found[q, rank]:
                break
            x0, y0, x1, y1 = (int(v) for v in boxes[q, column])
            grid = int(grids[q, column])
            row.append(Hit(rank=rank, image_id=int(images[q, column]), path=names[q][column],
                           score=float(scores[q, column]), box=(x0, y0, x1, y1), level=grid - 1, grid=grid,
                           cell=int(cells[q, column]), patch_id=int(patches[q, column])))
        hits.append(row)
    return MergedResults(top.astype(np.float32), top_images, top_patches, hits)


class ShardSearcher(Protocol):
    """Holds the shards and asks each for its candidates (in shard order)."""

    def candidates(self, queries: np.ndarray, k: int) -> list[ShardCandidates]: ...

    def close(self) -> None: ...


class LocalShards:
    """Every shard loaded in this process, searched one after the other (each search uses num_threads)."""

    def __init__(self, directory: Path, shards: Sequence[dict[str, Any]], *, num_threads: int = 0,
                 verify: bool = False) -> None:
        self._shards = [(Patchify.load(directory / shard["path"], num_threads=num_threads, verify=verify),
                         int(shard["first_image_id"]), int(shard["first_patch_id"])) for shard in shards]

    def candidates(self, queries: np.ndarray, k: int) -> list[ShardCandidates]:
        return [shard_candidates(engine, queries, k, first_image, first_patch)
                for engine, first_image, first_patch in self._shards]

    def close(self) -> None:
        self._shards = []


class ShardedIndex(QueryFront):
    """A sharded index, searched like one engine: `search`, `search_batch`, `search_vectors`, `embed_query(ies)`,
    `n_images`, as `Patchify` has them (patchify.query_front: so a server can hold either).

    >>> index = ShardedIndex.load("index-sharded")                 # shards in this process
    >>> index = ShardedIndex.load("index-sharded", executor="ray")  # one Ray actor per shard (ray.init() first)
    >>> index.search("query.jpg", k=10)[0].path

    The query is encoded once, here (the backbone loads on the first image query; searching by vector never loads
    it), and its vector goes to every shard. Read-only: rebuild (or build another) to add images.
    """

    def __init__(self, directory: Path, manifest: dict[str, Any], shards: ShardSearcher, encoder: Encoder) -> None:
        self._directory = directory
        self._manifest = manifest
        self._shards = shards
        self._encoder = encoder
        self._config = index_config_from_dict({k: v for k, v in manifest["index"].items() if k != "dim"})
        self._images: list[ImageRecord] | None = None

    @classmethod
    def load(cls, directory: str | os.PathLike, *, backbone: "str | Backbone | None" = None,
             executor: "str | ShardSearcher" = "local", num_threads: int = 0, verify: bool = False,
             **ray_options: Any) -> "ShardedIndex":
        """executor: "local" (every shard in this process), "ray" (one actor per shard on the Ray cluster this
        process is connected to; ray_options go to `RayShards`: e.g. num_cpus per actor), or a ShardSearcher.
        backbone: as `Patchify.load` (must match the one that built it)."""
        directory = Path(directory).absolute()  # the shard actors may run in another folder, or on other nodes
        manifest = layout.read_manifest(directory)
        shards = [shard for shard in manifest["shards"] if shard["n_images"]]
        if executor == "local":
            searcher: ShardSearcher = LocalShards(directory, shards, num_threads=num_threads, verify=verify)
        elif executor == "ray":
            from .ray_backend import RayShards

            searcher = RayShards(directory, shards, num_threads=num_threads, verify=verify, **ray_options)
        elif isinstance(executor, str):
            raise ValueError(f"executor must be 'local', 'ray' or a ShardSearcher, got {executor!r}")
        else:
            searcher = executor
        saved = manifest["backbone"]
        encoder = Encoder(saved["name"] if backbone is None else backbone,
                          TilingConfig.from_dict(manifest["tiling"]), num_threads=num_threads,
                          expected_identity=saved["identity"], check_name=backbone is not None,
                          precision=precision_of(saved["identity"]))
        return cls(directory, manifest, searcher, encoder)

    def close(self) -> None:
        """Releases the shards (ends the Ray actors)."""
        self._shards.close()

    def __enter__(self) -> "ShardedIndex":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ what it holds
    @property
    def directory(self) -> Path:
        return self._directory

    @property
    def manifest(self) -> dict[str, Any]:
        """The sharded-index manifest (patchify.distributed.layout): shards, offsets, settings."""
        return self._manifest

    @property
    def n_shards(self) -> int:
        return len(self._manifest["shards"])

    @property
    def n_images(self) -> int:
        return int(self._manifest["n_images"])

    @property
    def n_patches(self) -> int:
        return int(self._manifest["n_patches"])

    def __len__(self) -> int:
        return self.n_images

    @property
    def index_config(self) -> "IndexConfig":
        return self._config

    @property
    def images(self) -> "list[ImageRecord]":
        """Every image's record by global id (read from the shards' images.json on first use, ids made global), as
        `Patchify.images`."""
        if self._images is None:
            records: list[ImageRecord] = []
            for shard in self._manifest["shards"]:
                if not shard["n_images"]:
                    continue
                first = int(shard["first_image_id"])
                for record in store.load_image_records(self._directory / shard["path"]):
                    records.append(dataclasses.replace(record, id=first + record.id))
            self._images = records
        return self._images

    @property
    def input_dim(self) -> int:
        return int(self._manifest["input_dim"])

    def __repr__(self) -> str:
        return (f"ShardedIndex({str(self._directory)!r}, shards={self.n_shards}, index={self._config!r}, "
                f"images={self.n_images}, patches={self.n_patches})")

    # ------------------------------------------------------------------ searching
    def _check_searchable(self) -> None:
        """Always: a sharded index holds at least one image (its build refuses otherwise)."""

    def _ranked_hits(self, vectors: np.ndarray, k: int) -> list[list[Hit]]:
        return self._merged(vectors, k).hits

    def search_vectors(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """As `Patchify.search_vectors`: backbone descriptors (nq, dim) -> (scores, global image ids, global patch
        ids), each (nq, min(k, images))."""
        merged = self._merged(queries, k)
        return merged.scores, merged.image_ids, merged.patch_ids

    def _merged(self, queries: np.ndarray, k: int) -> MergedResults:
        k = check_k(k)
        queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        if queries.ndim != 2 or queries.shape[1] != self.input_dim:
            raise ValueError(f"queries must be (nq, {self.input_dim}) descriptors, got shape {queries.shape}")
        return merge_candidates(self._shards.candidates(queries, k), k, self.n_images, self._shortlist(k))

    def _shortlist(self, k: int) -> int | None:
        """The shortlist a single two-stage IVFPQ index of all the images would re-rank for a top-k search."""
        config = self._config
        if not isinstance(config, IVFPQConfig) or config.rerank is None:
            return None
        return result_width(rerank_shortlist_size(min(k, self.n_images), config.rerank_shortlist, config.nbits),
                            self.n_images)
