"""Ray executors: encoder actors that build shards, and shard actors that search them. The only module importing ray.

Why actors and tasks, not Ray Data: a shard is the unit of work, of retry and of resume, and its output is a saved
index written by the worker that encoded it: nothing needs Ray Data's streaming between stages (the patch vectors
would travel through the object store to a writer only to be written next to where they were made), and
`ray[data]` adds pyarrow and pandas (~150 MB) to an install that needs neither. An `ActorPool` of encoder actors
(one backbone session each, a GPU each when the cluster has GPUs) takes the shards as they come; a shard whose
actor raises (a backbone or driver error, a lost node) is retried by Ray (`max_task_retries`, `retry_exceptions`,
`max_restarts`), and a shard that still fails stops the build with the error; the shards already written are kept
for the re-run.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import ray
from ray.util import ActorPool

from ..engine import Patchify
from .build import BuildSpec, ShardWorker
from .sharded import ShardCandidates, shard_candidates

DEFAULT_RETRIES = 2  # a failed shard is tried again this many times (and its actor restarted this many times)


def connect(address: str | None = None, **init_options: Any) -> None:
    """Connects this process to a Ray cluster unless it already is: address "auto" (the cluster this node belongs
    to, e.g. started with `ray start` or `ray up`), "ray://host:10001" (a remote cluster's client port), or None
    (a cluster of this machine alone, started here)."""
    if not ray.is_initialized():
        ray.init(address=address, **init_options)


def _cluster_gpus() -> float:
    return float(ray.cluster_resources().get("GPU", 0))


class RayBuild:
    """Builds shards on `num_actors` encoder actors (default: one per GPU of the cluster, else 2), each with
    num_cpus CPUs and gpus_per_actor GPUs (default: 1 when the cluster has GPUs, else 0). The actor that learns the
    shared training goes on to build shards; the actors end with the build."""

    def __init__(self, num_actors: int | None = None, *, num_cpus: float = 1, gpus_per_actor: float | None = None,
                 retries: int = DEFAULT_RETRIES) -> None:
        self.num_actors = num_actors
        self.num_cpus = num_cpus
        self.gpus_per_actor = gpus_per_actor
        self.retries = retries
        self._actors: list[Any] = []

    def _start(self, spec: BuildSpec, count: int) -> list[Any]:
        """At least `count` actors (started lazily: each one builds its backbone)."""
        connect()
        gpus = self.gpus_per_actor if self.gpus_per_actor is not None else (1.0 if _cluster_gpus() else 0.0)
        cls = ray.remote(num_cpus=self.num_cpus, num_gpus=gpus, max_restarts=self.retries,
                         max_task_retries=self.retries)(ShardWorker)
        self._actors += [cls.remote(spec) for _ in range(count - len(self._actors))]
        return self._actors

    def _count(self) -> int:
        if self.num_actors is not None:
            return max(1, int(self.num_actors))
        return max(1, int(_cluster_gpus())) if _cluster_gpus() else 2

    def learn(self, spec: BuildSpec, sample: Sequence[str]) -> dict[str, Any]:
        actor = self._start(spec, 1)[0]
        try:
            return ray.get(actor.learn.options(retry_exceptions=True).remote(list(sample)))
        except BaseException:
            self._stop()
            raise

    def build(self, spec: BuildSpec, shards: Sequence[tuple[int, list[str]]]) -> Iterator[dict[str, Any]]:
        try:
            if shards:
                pool = ActorPool(self._start(spec, min(self._count(), len(shards))))
                # Each shard's marker as soon as its shard is written, in completion order.
                yield from pool.map_unordered(
                    lambda actor, shard: actor.build.options(retry_exceptions=True).remote(*shard), list(shards))
        finally:
            self._stop()

    def _stop(self) -> None:
        for actor in self._actors:
            ray.kill(actor)
        self._actors = []


class ShardSearchActor:
    """One loaded shard (Ray actor): answers `candidates` with global ids."""

    def __init__(self, folder: str, first_image_id: int, first_patch_id: int, num_threads: int, verify: bool) -> None:
        self._engine = Patchify.load(folder, num_threads=num_threads, verify=verify)
        self._offsets = (first_image_id, first_patch_id)

    def candidates(self, queries: np.ndarray, k: int) -> ShardCandidates:
        return shard_candidates(self._engine, queries, k, *self._offsets)

    def ready(self) -> bool:
        return True


class RayShards:
    """One actor per shard (num_cpus each, reserved while it lives: the cluster must have them for every shard;
    memory: bytes reserved per actor, the usual way to spread large shards over nodes; the shard's search uses
    num_threads threads, 0 = the node's cores). A query batch is put in the object store once and every actor
    reads it."""

    def __init__(self, directory: Path, shards: Sequence[dict[str, Any]], *, num_threads: int = 0,
                 verify: bool = False, num_cpus: float = 1, memory: int | None = None, address: str | None = None,
                 start_timeout_s: float = 300.0) -> None:
        connect(address)
        resources: dict[str, Any] = {"num_cpus": num_cpus} if memory is None else {"num_cpus": num_cpus,
                                                                                      "memory": memory}
        cls: Any = ray.remote(max_restarts=DEFAULT_RETRIES, max_task_retries=DEFAULT_RETRIES,
                              **resources)(ShardSearchActor)
        self._actors: list[Any] = [cls.remote(str(directory / shard["path"]), int(shard["first_image_id"]),
                                   int(shard["first_patch_id"]), num_threads, verify) for shard in shards]
        # Load errors surface here, not at the first search; so does a cluster too small for every shard (Ray
        # would otherwise wait for resources forever).
        pending = [actor.ready.remote() for actor in self._actors]
        ready, waiting = ray.wait(pending, num_returns=len(pending), timeout=start_timeout_s)
        if waiting:
            self.close()
            raise RuntimeError(f"only {len(ready)} of {len(pending)} shard actors started within {start_timeout_s:g} s:"
                               f" the cluster ({ray.cluster_resources()}) lacks num_cpus={num_cpus} (memory={memory})"
                               " for each shard; lower num_cpus or add nodes")
        ray.get(ready)

    def candidates(self, queries: np.ndarray, k: int) -> list[ShardCandidates]:
        shared = ray.put(queries)
        return ray.get([actor.candidates.remote(shared, k) for actor in self._actors])

    def ping(self) -> float:
        """One empty call to every shard actor at once (a health check): the seconds until all answered, i.e. the
        fan-out's round trip without any search."""
        started = time.perf_counter()
        ray.get([actor.ready.remote() for actor in self._actors])
        return time.perf_counter() - started

    def close(self) -> None:
        for actor in self._actors:
            ray.kill(actor)
        self._actors = []
