"""What whitening and global + patch fusion cost at search time, through the engine (issue "Retrieval quality":
the whitening must cost < 5 % of search latency at 100k images x L2).

Three flat engines of N images x 14 patches (L2) x 384-d over the same vectors, built through
`Patchify.add_embeddings`, searched four ways, batch 1 (p50 over queries) and batch 64:

* index only      `engine.index.search` on already whitened queries: the max-over-patches scan, nothing else
* + whitening     `engine.search_vectors` of an engine with global_weight=0: the query transform added
* + fusion        `engine.search_vectors` of an engine with the default global weight (folded into its vectors)
* raw engine      an engine with whitening="none", global_weight=0 over the raw vectors (today's path)

Vectors: real DINOv2 patch vectors when a cache of them is given (--vectors: an .npy of (n, 384) unit vectors,
e.g. written by benchmarks/quality.py --dump-vectors), replicated with small noise up to N images; else random
anisotropic unit vectors. Queries likewise.

    PYTHONPATH=python python benchmarks/bench_scoring.py --images 100000 [--vectors v.npy --queries q.npy] \
        --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

PATCHES = 14  # L2
DIM = 384


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def make_vectors(n: int, seed: int, real: np.ndarray | None) -> np.ndarray:
    """n unit vectors: real ones with noise (sigma 0.02 per dim, i.e. ~ cosine 0.93 to the source) or random
    anisotropic ones; generated in blocks so temporaries stay small."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, DIM), np.float32)
    scales = np.geomspace(1.0, 0.05, DIM).astype(np.float32)
    for lo in range(0, n, 1 << 17):
        m = min(n, lo + (1 << 17)) - lo
        if real is not None:
            block = real[rng.integers(0, len(real), m)] + 0.02 * rng.standard_normal((m, DIM), dtype=np.float32)
        else:
            block = rng.standard_normal((m, DIM), dtype=np.float32) * scales + 0.5
        out[lo:lo + m] = unit(block)
    return out


def build(n_images: int, vectors: np.ndarray, **settings):
    from patchify import Patchify
    from patchify.records import NewImage, PatchTable

    engine = Patchify(level=2, **settings)
    step = 20_000  # images per add_embeddings call: bounded temporaries
    grid = np.tile(np.array([1, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3, 3], np.int16), step)
    cell = np.tile(np.array([0, 0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 7, 8], np.int16), step)
    for lo in range(0, n_images, step):
        m = min(n_images, lo + step) - lo
        table = PatchTable(np.repeat(np.arange(m), PATCHES), np.zeros((m * PATCHES, 4), np.int32), grid[:m * PATCHES],
                           cell[:m * PATCHES])
        engine.add_embeddings(vectors[lo * PATCHES:(lo + m) * PATCHES], table,
                              [NewImage(str(lo + i), 1, 1) for i in range(m)])
    return engine


def timed(fn, *args) -> float:
    started = time.perf_counter()
    fn(*args)
    return (time.perf_counter() - started) * 1e3


def measure(fn, queries: np.ndarray, repeats: int) -> dict[str, float]:
    fn(queries[:1])
    single = sorted(timed(fn, queries[i % len(queries)][None]) for i in range(repeats))
    batch = min(timed(fn, queries[:64]) for _ in range(3))
    return {"p50_ms": single[len(single) // 2], "p99_ms": single[min(len(single) - 1, int(0.99 * len(single)))],
            "batch64_ms": batch}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=100_000)
    ap.add_argument("--vectors", type=Path, default=None, help=".npy of real (n, 384) patch vectors")
    ap.add_argument("--queries", type=Path, default=None, help=".npy of real (q, 384) query vectors")
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    real = np.load(args.vectors).astype(np.float32) if args.vectors else None
    real_queries = np.load(args.queries).astype(np.float32) if args.queries else None
    vectors = make_vectors(args.images * PATCHES, 0, real)
    queries = make_vectors(64, 1, real_queries if real_queries is not None else real)
    k = 10
    started = time.perf_counter()
    fused = build(args.images, vectors)  # the defaults: whitened, fusion folded into the stored vectors
    build_s = time.perf_counter() - started
    plain = build(args.images, vectors, global_weight=0.0)
    raw = build(args.images, vectors, whitening="none", global_weight=0.0)
    assert fused.whitening is not None and fused.effective_global_weight > 0
    whitened_queries = fused.whitening.apply(queries)

    rows = {
        "index only (whitened queries given)": measure(lambda q: plain.index.search(q, k), whitened_queries,
                                                       args.repeats),
        "+ whitening (global_weight 0)": measure(lambda q: plain.search_vectors(q, k), queries, args.repeats),
        "+ fusion (default weight)": measure(lambda q: fused.search_vectors(q, k), queries, args.repeats),
        "raw engine (whitening none)": measure(lambda q: raw.search_vectors(q, k), queries, args.repeats),
    }
    transform = min(timed(fused.whitening.apply, queries[:1]) for _ in range(200))
    transform64 = min(timed(fused.whitening.apply, queries) for _ in range(50))
    base = rows["index only (whitened queries given)"]
    print(f"{args.images:,} images x {PATCHES} patches x {DIM}-d, flat float32, k={k}; "
          f"vectors: {'real + noise' if real is not None else 'random anisotropic'}; build {build_s:.0f} s")
    print(f"{'path':40s} {'p50 ms':>8s} {'p99 ms':>8s} {'batch64 ms':>11s} {'p50 / index':>12s}")
    for name, r in rows.items():
        print(f"{name:40s} {r['p50_ms']:8.2f} {r['p99_ms']:8.2f} {r['batch64_ms']:11.1f} "
              f"{r['p50_ms'] / base['p50_ms']:12.3f}")
    print(f"whitening transform alone: {transform:.3f} ms for 1 query, {transform64:.3f} ms for 64")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "machine": f"{platform.platform()}, {os.cpu_count()} cpus", "images": args.images,
            "patches_per_image": PATCHES, "dim": DIM, "k": k, "real_vectors": real is not None,
            "rows": rows, "transform_ms": {"1": transform, "64": transform64}}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
