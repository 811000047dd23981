"""Flat (exact) patch search: batch-1 latency and batch-64 throughput over N images x 14 patches x 384-d, for
float32 and float16 storage, against

* the numpy reference (matmul + per-image max + lexsort top-k, `numpy_reference_search`),
* faiss IndexFlatIP (float32) / IndexScalarQuantizer fp16 (float16) for the top k*14 patches + numpy group-by
  (exact: every patch scoring above the k-th image's best belongs to one of the top-k images),
* the memory-bandwidth bound: bytes of stored vectors / bandwidth, the time to read the vectors once. Bandwidth
  is measured in the same run with numpy sums over a large array (one thread and all threads, best taken); as
  a load-robust check, a threaded numpy read of the same number of bytes is also timed right after every
  batch-1 query ("read_once"), and p50 / read_once p50 is reported.

    PYTHONPATH=python python benchmarks/bench_flat.py --images 100000 --json flat.json

Figures are medians of repeats; on a shared machine compare ratios from one run, not absolute numbers.
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import threading
import time
from pathlib import Path

import numpy as np

from patchify import _core
from patchify.index.flat import FlatIndex, numpy_reference_search


def make_database(n_images: int, patches: int, dim: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    n = n_images * patches
    vectors = np.empty((n, dim), np.float32)
    for lo in range(0, n, 1 << 18):  # chunked so the float64 temporaries stay small
        block = rng.standard_normal((min(n, lo + (1 << 18)) - lo, dim), dtype=np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        vectors[lo:lo + len(block)] = block
    image_ids = np.repeat(np.arange(n_images, dtype=np.int64), patches)
    patch_ids = np.arange(n, dtype=np.int64)
    queries = rng.standard_normal((256, dim), dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    return vectors, patch_ids, image_ids, queries


def measure_bandwidth(threads: int, megabytes: int = 1024, repeats: int = 5) -> dict[str, float]:
    """Read bandwidth (GB/s) of numpy float32 sums over a buffer far larger than the caches."""
    data = np.ones(megabytes * (1 << 20) // 4, np.float32)
    data.sum()  # fault the pages in
    single = min(_timed(data.sum) for _ in range(repeats))
    parts = np.array_split(data, threads)

    def parallel_sum() -> None:  # numpy releases the GIL inside the reduction
        workers = [threading.Thread(target=p.sum) for p in parts]
        for w in workers:
            w.start()
        for w in workers:
            w.join()

    multi = min(_timed(parallel_sum) for _ in range(repeats))
    return {"single_thread_gbs": data.nbytes / single / 1e9, "all_threads_gbs": data.nbytes / multi / 1e9,
            "gbs": data.nbytes / min(single, multi) / 1e9}


def _timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def latency(fn, queries: np.ndarray, repeats: int, interleave=None) -> dict[str, float]:
    """Batch-1 latency: each query alone, p50/p99 in milliseconds. `interleave` (optional) is timed right after
    every query, so that both see the same machine load (the bandwidth bound on a shared machine)."""
    fn(queries[:1])  # warm-up
    times, other = [], []
    for i in range(repeats):
        times.append(_timed(fn, queries[i % len(queries)][None]) * 1e3)
        if interleave is not None:
            other.append(_timed(interleave) * 1e3)
    out = {"p50_ms": float(np.percentile(times, 50)), "p99_ms": float(np.percentile(times, 99)), "runs": repeats}
    if other:
        out["interleaved_p50_ms"] = float(np.percentile(other, 50))
    return out


def read_once_fn(vectors: np.ndarray, nbytes: int, threads: int):
    """Reads `nbytes` of `vectors` once with numpy sums on `threads` threads (numpy releases the GIL): the
    memory-bandwidth bound of a search that reads the stored vectors once, measured on this very machine."""
    flat = vectors.reshape(-1)[:nbytes // 4]
    parts = np.array_split(flat, threads)

    def read() -> None:
        workers = [threading.Thread(target=p.sum) for p in parts]
        for w in workers:
            w.start()
        for w in workers:
            w.join()

    return read


def throughput(fn, queries: np.ndarray, batch: int, repeats: int) -> dict[str, float]:
    times = [_timed(fn, queries[(r * batch) % len(queries):][:batch]) for r in range(repeats)]
    seconds = float(np.median(times))
    return {"batch": batch, "seconds_per_batch": seconds, "queries_per_s": batch / seconds, "runs": repeats}


def faiss_search_fn(faiss_index, image_ids: np.ndarray, k: int, patches: int):
    """faiss top k*patches patches, then numpy group-by image (first = best occurrence, faiss sorts by score)."""

    def search(queries: np.ndarray):
        sims, labels = faiss_index.search(queries, k * patches)
        out_scores = np.full((len(queries), k), -np.inf, np.float32)
        out_images = np.full((len(queries), k), -1, np.int64)
        out_patches = np.full((len(queries), k), -1, np.int64)
        for q in range(len(queries)):
            valid = labels[q] >= 0
            rows, row_sims = labels[q][valid], sims[q][valid]
            images = image_ids[rows]
            _, first = np.unique(images, return_index=True)
            first.sort()  # by rank: faiss results are best first
            first = first[:k]
            out_scores[q, :len(first)] = row_sims[first]
            out_images[q, :len(first)] = images[first]
            out_patches[q, :len(first)] = rows[first]
        return out_scores, out_images, out_patches

    return search


def run(args: argparse.Namespace) -> dict:
    threads = args.threads or _core.hardware_threads()
    print(f"database: {args.images} images x {args.patches} patches x {args.dim}-d, k={args.k}, threads={threads}")
    t0 = time.perf_counter()
    vectors, patch_ids, image_ids, queries = make_database(args.images, args.patches, args.dim)
    print(f"generated {len(vectors)} vectors in {time.perf_counter() - t0:.1f} s")
    bandwidth = measure_bandwidth(threads)
    print(f"memory bandwidth (numpy sum): {bandwidth['single_thread_gbs']:.1f} GB/s one thread, "
          f"{bandwidth['all_threads_gbs']:.1f} GB/s {threads} threads")
    config = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
    results: dict = {"config": {**config, "threads": threads, "n_vectors": len(vectors),
                                "machine": platform.machine(), "processor": platform.processor()},
                     "bandwidth": bandwidth, "dtypes": {}}
    for dtype in args.dtypes:
        print(f"\n== {dtype}")
        index = FlatIndex(args.dim, dtype=dtype, num_threads=threads)
        t0 = time.perf_counter()
        index.add(vectors, patch_ids, image_ids)
        add_s = time.perf_counter() - t0
        vector_bytes = len(vectors) * args.dim * np.dtype(dtype).itemsize
        bound_ms = vector_bytes / (bandwidth["gbs"] * 1e9) * 1e3
        entry: dict = {"kernel": index.kernel, "add_seconds": add_s, "nbytes": index.nbytes(),
                       "vector_bytes": vector_bytes, "bandwidth_bound_ms": bound_ms}

        def ours(q, index=index):
            return index.search(q, args.k)

        read_once = read_once_fn(vectors, vector_bytes, threads)
        entry["flat"] = {"batch1": latency(ours, queries, args.repeats, interleave=read_once),
                         "batch": throughput(ours, queries, args.batch, args.batch_repeats)}
        p50 = entry["flat"]["batch1"]["p50_ms"]
        read_ms = entry["flat"]["batch1"].pop("interleaved_p50_ms")
        entry["read_once_p50_ms"] = read_ms
        entry["flat"]["batch1_p50_over_bound"] = p50 / bound_ms
        entry["flat"]["batch1_p50_over_read_once"] = p50 / read_ms
        print(f"flat[{index.kernel}]  batch-1 p50 {p50:.2f} ms  p99 {entry['flat']['batch1']['p99_ms']:.2f} ms"
              f"  | bandwidth bound {bound_ms:.2f} ms -> p50/bound = {p50 / bound_ms:.2f}x"
              f"  | numpy read of the same bytes, interleaved: {read_ms:.2f} ms -> {p50 / read_ms:.2f}x"
              f"  | batch-{args.batch}: {entry['flat']['batch']['queries_per_s']:.0f} q/s")

        stored = vectors if dtype == "float32" else vectors.astype(np.float16).astype(np.float32)
        check = queries[:4]
        got = index.search(check, args.k)
        if not args.skip_numpy:
            def reference(q, stored=stored):
                return numpy_reference_search(stored, image_ids, q, args.k, patch_ids=patch_ids)

            expected = reference(check)
            entry["matches_numpy"] = bool(np.array_equal(got[1], expected[1]) and np.array_equal(got[2], expected[2])
                                          and np.allclose(got[0], expected[0], atol=1e-5))
            entry["numpy"] = {"batch1": latency(reference, queries, max(3, args.repeats // 20)),
                              "batch": throughput(reference, queries, args.batch, 1)}
            _ratios(entry, "numpy", args.batch)
        del stored
        gc.collect()
        if not args.skip_faiss:
            import faiss

            faiss.omp_set_num_threads(threads)
            if dtype == "float32":
                fx = faiss.IndexFlatIP(args.dim)
            else:
                fx = faiss.IndexScalarQuantizer(args.dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
            fx.add(vectors)
            fsearch = faiss_search_fn(fx, image_ids, args.k, args.patches)
            fres = fsearch(check)
            entry["matches_faiss"] = bool(np.array_equal(got[1], fres[1]))
            entry["faiss"] = {"index": type(fx).__name__,
                              "batch1": latency(fsearch, queries, max(3, args.repeats // 4)),
                              "batch": throughput(fsearch, queries, args.batch, max(1, args.batch_repeats // 2))}
            _ratios(entry, "faiss", args.batch)
            del fx
        del index
        gc.collect()
        results["dtypes"][dtype] = entry
        if args.json:  # after each dtype, so a long run that dies later still leaves its figures
            args.json.write_text(json.dumps(results, indent=2))
    return results


def _ratios(entry: dict, other: str, batch: int) -> None:
    mine, theirs = entry["flat"], entry[other]
    speedup1 = theirs["batch1"]["p50_ms"] / mine["batch1"]["p50_ms"]
    speedup_b = mine["batch"]["queries_per_s"] / theirs["batch"]["queries_per_s"]
    entry[f"speedup_vs_{other}"] = {"batch1_p50": speedup1, f"batch{batch}_qps": speedup_b}
    print(f"{other:>6}: batch-1 p50 {theirs['batch1']['p50_ms']:.2f} ms, batch-{batch} "
          f"{theirs['batch']['queries_per_s']:.1f} q/s  -> flat is {speedup1:.2f}x (batch-1), {speedup_b:.2f}x "
          f"(batch-{batch}) faster")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--patches", type=int, default=14)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=100, help="batch-1 queries timed")
    parser.add_argument("--batch-repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="0 = all cores")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float16"], choices=["float32", "float16"])
    parser.add_argument("--skip-numpy", action="store_true")
    parser.add_argument("--skip-faiss", action="store_true")
    parser.add_argument("--json", type=Path, help="write all figures here")
    args = parser.parse_args(argv)
    results = run(args)
    if args.json:
        print(f"\nwrote {args.json}")
    return results


if __name__ == "__main__":
    main()
