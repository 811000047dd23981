"""Scale-out: a sharded index built and searched in this process or on a Ray cluster.

`build_sharded_index` writes shards (each a normal saved index) plus a manifest, learning the whitening and the
IVFPQ training once for all; `ShardedIndex` searches them with the query encoded once and merges the shards' results
exactly. Ray is optional: only `patchify.distributed.ray_backend` imports it (`pip install "patchify[ray]"`).
"""
from __future__ import annotations

from .build import BuildSpec, LocalBuild, ShardedBuildReport, build_sharded_index, save_sharded_index
from .layout import is_sharded_index
from .sharded import LocalShards, ShardedIndex

__all__ = ["BuildSpec", "LocalBuild", "LocalShards", "ShardedBuildReport", "ShardedIndex", "build_sharded_index",
           "is_sharded_index", "save_sharded_index"]
