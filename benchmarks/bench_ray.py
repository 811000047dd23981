"""Sharded index on Ray (patchify.distributed): indexing throughput vs encoder actors, search latency vs shards.

    python benchmarks/bench_ray.py                       # all three parts, figures for RESULTS.md
    python benchmarks/bench_ray.py --parts search --images 50000 --json out.json

Parts:
  index-cheap  indexing throughput with a cheap encoder (bench_indexing's CheapBackbone: 224 px patches like the real
               backbone's, mean-pooled: decoding and tiling cost what they cost, encoding nothing, so the framework's
               overhead shows):
               one engine's add_images in this process (the baseline), the sharded build in this process (shards of
               50), and on a local Ray cluster with 1 and 2 encoder actors, at N and 4N images: the fixed cost and
               the marginal cost per image, Ray's overhead per image = its marginal cost - the engine's.
  index-real   the same with the real backbone (dinov2_vits14, onnxruntime, 1 thread per encoder) on a handful of
               images at L1 (the CPU encodes ~5-10 patches/s).
  search-ivfpq the same for a two-stage IVFPQ index (nlist 256, PQ48x8, int8 re-rank; trained once on 50k of its
               vectors, the training shared by the single index and every shard), 2 and 4 shards: equality at scale.
  search       one flat index of N random images x 14 patches (L2, d=384, add_embeddings) against the same images in
               1, 2 and 4 shards, in this process and as Ray actors: single-query latency p50/p99 (k=10), the
               merged results checked equal to the single index's, and where the fan-out time goes: the slowest
               shard's search (timed alone, in process), the Ray round trip (an empty call to every actor, best of
               50), the merge, and the rest (queueing for the cores, copying the candidates).
Indexing uses whitening "none": the one-time learning on the sample is not what scales. Timings on a shared machine
drift: each configuration is timed once per round, rounds alternate, the best round is kept.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _source_tree  # noqa: E402,F401  (python/ on sys.path only for an in-place build)

from patchify import Patchify  # noqa: E402
from patchify.distributed import ShardedIndex, build_sharded_index, layout, save_sharded_index  # noqa: E402
from patchify.distributed.ray_backend import RayShards  # noqa: E402
from patchify.distributed.sharded import merge_candidates, shard_candidates  # noqa: E402
from patchify.records import NewImage, PatchTable  # noqa: E402

from bench_indexing import CheapBackbone  # noqa: E402  (decodes and tiles like the real backbone, encodes for free)

PHOTOS = Path(__file__).resolve().parents[1] / "data" / "photos"


def real_backbone() -> Any:
    """The default backbone with one onnxruntime thread (each encoder actor gets one of the two cores)."""
    from patchify.backbones import load_backbone

    return load_backbone("dinov2_vits14", num_threads=1)


def image_files(folder: Path, n: int) -> list[str]:
    """n image files: the shipped photos copied under distinct names (decoding cost included, as in real use)."""
    folder.mkdir(parents=True, exist_ok=True)
    photos = sorted(PHOTOS.glob("*"))
    paths = []
    for i in range(n):
        source = photos[i % len(photos)]
        target = folder / f"{i:05d}{source.suffix}"
        if not target.exists():
            shutil.copy(source, target)
        paths.append(str(target))
    return paths


def start_ray(num_cpus: int) -> Any:
    import ray

    # The actors unpickle CheapBackbone / real_backbone from this module: they need benchmarks/ on their path.
    path = os.pathsep.join([str(Path(__file__).resolve().parent), str(Path(_source_tree.__file__).resolve()
                                                                        .parents[1] / "python")])
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": path}})
    return ray


def bench_indexing(files: list[str], backbone: Any, level: int, shard_size: int, rounds: int, work: Path,
                   sizes: list[int]) -> dict[str, Any]:
    """Seconds per configuration and input size (best of rounds). Ray's time includes starting its actors (each
    builds its backbone): what a build pays. With two sizes n < m, the marginal cost per image, (t(m) - t(n)) /
    (m - n), separates the per-image cost from the fixed one (actor start, shared training, manifest)."""
    from patchify.distributed.ray_backend import RayBuild

    def in_process(n: int) -> float:
        engine = Patchify(backbone(), level=level, whitening="none", num_threads=1)
        started = time.perf_counter()
        engine.add_images(files[:n])
        return time.perf_counter() - started

    def sharded(executor: Any, n: int) -> float:
        out = work / "sharded"
        shutil.rmtree(out, ignore_errors=True)
        started = time.perf_counter()
        build_sharded_index(files[:n], out, backbone=backbone, level=level, whitening="none", shard_size=shard_size,
                            num_threads=1, executor=executor)
        seconds = time.perf_counter() - started
        shutil.rmtree(out, ignore_errors=True)
        return seconds

    configs = {"in-process engine": in_process, "sharded, in process": lambda n: sharded("local", n),
               "Ray, 1 actor": lambda n: sharded(RayBuild(num_actors=1), n),
               "Ray, 2 actors": lambda n: sharded(RayBuild(num_actors=2), n)}
    best = {(name, n): float("inf") for name in configs for n in sizes}
    for _ in range(rounds):
        for n in sizes:
            for name, run in configs.items():
                best[name, n] = min(best[name, n], run(n))
    results: dict[str, Any] = {}
    for name in configs:
        row: dict[str, Any] = {f"seconds_{n}": best[name, n] for n in sizes}
        row["images_per_s"] = sizes[-1] / best[name, sizes[-1]]
        row["vs_in_process"] = best["in-process engine", sizes[-1]] / best[name, sizes[-1]]
        if len(sizes) == 2:
            marginal = (best[name, sizes[1]] - best[name, sizes[0]]) / (sizes[1] - sizes[0])
            base = (best["in-process engine", sizes[1]] - best["in-process engine", sizes[0]]) / (sizes[1] - sizes[0])
            row.update(marginal_ms_per_image=1000 * marginal, fixed_s=best[name, sizes[0]] - sizes[0] * marginal,
                       marginal_overhead_ms_per_image=1000 * (marginal - base))
        results[name] = row
    return results


def random_engine(rng: np.random.Generator, n_images: int, dim: int, first: int, config: Any = "flat",
                  trained: Any = None) -> Patchify:
    """n_images x 14 patches (L2) of random unit vectors, raw (no whitening); IVFPQ: started from a copy of
    `trained`, so every engine made with it shares its codebooks."""
    per_image = 14
    grids = np.tile(np.array([1, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3, 3]), n_images)
    cells = np.tile(np.array([0, 0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 7, 8]), n_images)
    engine = Patchify(CheapBackbone(), level=2, whitening="none", index=config)
    if trained is not None:
        engine.start_from_trained(trained.trained_copy())
    chunk = 5000
    for start in range(0, n_images, chunk):
        m = min(chunk, n_images - start)
        vectors = rng.standard_normal((m * per_image, dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        rows = slice(start * per_image, (start + m) * per_image)
        table = PatchTable(np.repeat(np.arange(m), per_image), np.tile([[0, 0, 64, 64]], (m * per_image, 1)),
                           grids[rows], cells[rows])
        engine.add_embeddings(vectors, table, [NewImage(f"img{first + start + i}", 64, 64) for i in range(m)])
    return engine


def latencies(search: Any, queries: np.ndarray) -> dict[str, float]:
    times = []
    for q in queries:
        started = time.perf_counter()
        search(q[None, :])
        times.append(time.perf_counter() - started)
    ms = 1000 * np.array(times)
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "mean_ms": float(ms.mean())}


def bench_search(n_images: int, dim: int, n_queries: int, shard_counts: list[int], work: Path,
                 config: Any = "flat") -> dict[str, Any]:
    """Single-query latency (k=10) of one index vs the same images in shards, in process and on Ray; results
    checked equal; the fan-out split into shard search (in process, per shard), Ray round trip and merge."""
    k = 10
    rng = np.random.default_rng(0)
    queries = rng.standard_normal((n_queries, dim)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    results: dict[str, Any] = {}
    trained = None
    if config != "flat":  # one training for the single index and every shard: on 50k of the database's vectors
        sample = random_engine(np.random.default_rng(1), min(n_images, 50_000 // 14), dim, 0)
        vectors, _ = sample.index.stored_vectors()  # type: ignore[union-attr]
        started = time.perf_counter()
        trained = config.create(dim)
        trained.train(vectors)
        results["training_s"] = time.perf_counter() - started
    single = random_engine(np.random.default_rng(1), n_images, dim, 0, config, trained)
    single.search_vectors(queries[:2], k)  # warm
    results["single index"] = latencies(lambda q: single.search_vectors(q, k), queries)
    reference = single.search_vectors(queries, k)
    single = None  # type: ignore[assignment]  (its memory back before the shards are built)
    for count in shard_counts:
        # The same images, cut in `count` runs: regenerated from the same stream so the vectors are identical.
        gen = np.random.default_rng(1)
        sizes = [n_images // count + (1 if s < n_images % count else 0) for s in range(count)]
        engines, first = [], 0
        for size in sizes:
            engines.append(random_engine(gen, size, dim, first, config, trained))
            first += size
        folder = work / f"shards-{count}"
        shutil.rmtree(folder, ignore_errors=True)
        save_sharded_index(engines, folder)
        offsets = [(sum(sizes[:s]), sum(sizes[:s]) * 14) for s in range(count)]
        per_shard = [latencies(lambda q, e=e, o=o: shard_candidates(e, q, k, *o), queries)["mean_ms"]
                     for e, o in zip(engines, offsets)]
        parts = [shard_candidates(e, queries[:1], k, *o) for e, o in zip(engines, offsets)]
        merge = latencies(lambda q, parts=parts: merge_candidates(parts, k, n_images, None), queries)["mean_ms"]
        engines = parts = []
        for executor in ("local", "ray"):
            round_trip = 0.0
            searcher: Any = executor
            if executor == "ray":  # one actor per shard, a quarter CPU reserved each (4 fit on the 2 cores)
                searcher = RayShards(folder, layout.read_manifest(folder)["shards"], num_cpus=0.25, num_threads=1)
                round_trip = min(searcher.ping() for _ in range(50)) * 1000
            with ShardedIndex.load(folder, executor=searcher) as sharded:
                got = sharded.search_vectors(queries, k)
                equal = all(np.array_equal(a, b) for a, b in zip(got, reference))
                timing = latencies(lambda q: sharded.search_vectors(q, k), queries)
            name = f"{count} shard{'s' if count > 1 else ''}, {'in process' if executor == 'local' else 'Ray actors'}"
            results[name] = {**timing, "equal_to_single": equal, "shard_search_mean_ms": per_shard,
                             "merge_mean_ms": merge, "ray_round_trip_min_ms": round_trip,
                             "rest_mean_ms": timing["mean_ms"] - (
                                 max(per_shard) if executor == "ray" else sum(per_shard)) - merge - round_trip}
        shutil.rmtree(folder, ignore_errors=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="index-cheap,index-real,search")
    parser.add_argument("--cheap-images", type=int, default=200)
    parser.add_argument("--real-images", type=int, default=8)
    parser.add_argument("--images", type=int, default=50_000, help="search: images in the index")
    parser.add_argument("--ivfpq-images", type=int, default=20_000, help="search-ivfpq: images in the index")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    parts = args.parts.split(",")
    out: dict[str, Any] = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared), "
                                      f"python {platform.python_version()}", "args": vars(args) | {"json": None}}
    start_ray(num_cpus=2)
    with tempfile.TemporaryDirectory(prefix="bench_ray_") as tmp:
        work = Path(tmp)
        if "index-cheap" in parts:
            files = image_files(work / "images", 4 * args.cheap_images)
            out["index_cheap"] = bench_indexing(files, CheapBackbone, 1, 50, args.rounds, work,
                                                [args.cheap_images, 4 * args.cheap_images])
            print(json.dumps(out["index_cheap"], indent=1))
        if "index-real" in parts:
            files = image_files(work / "images", args.real_images)[:args.real_images]
            out["index_real"] = bench_indexing(files, real_backbone, 1, max(1, args.real_images // 4), 1, work,
                                               [args.real_images])
            print(json.dumps(out["index_real"], indent=1))
        if "search-ivfpq" in parts:  # equality of the two-stage merge at scale (k=10: the global shortlist of 100)
            from patchify.config import IVFPQConfig

            out["search_ivfpq"] = bench_search(args.ivfpq_images, args.dim, args.queries, [2, 4], work,
                                               IVFPQConfig(nlist=256, m=48, nbits=8, nprobe=16))
            print(json.dumps(out["search_ivfpq"], indent=1))
        if "search" in parts:
            out["search"] = bench_search(args.images, args.dim, args.queries, [1, 2, 4], work)
            print(json.dumps(out["search"], indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
