"""Search scaling: latency and throughput vs database size and grid level, flat float32 / float16 and IVFPQ,
each against its baseline, plus memory (bytes per image, peak RSS of build and of search).

    PYTHONPATH=python python benchmarks/bench_search_scaling.py [--sizes 10000 100000] [--million]
                                                                [--levels 0 1 2 3] [--quick] [--json out.json]

Database: synthetic clustered L2-normalised vectors (bench_ivfpq.synthetic: themes -> images -> patches),
N images x P patches per image, P = 1, 5, 14, 30 for grid levels L0..L3. Queries: noisy copies of database
patches (bench_ivfpq.make_queries). k = 10 images.

Configurations ("kinds") and the baseline each is compared with in the same process:
  flat_f32 : FlatIndex float32   vs numpy (matmul + per-image max) and faiss IndexFlatIP top k*P + group-by
  flat_f16 : FlatIndex float16   vs faiss IndexScalarQuantizer fp16 top k*P + group-by
  ivfpq    : IVFPQIndex (fused)  vs faiss IndexIVFPQ.search with the smallest k' giving the same top-k images
             + numpy group-by (bench_ivfpq's (b)), on the very same trained faiss index, at equal nprobe
Batch-1 latency p50/p99 (flat: all threads, as bench_flat; IVFPQ: one thread, as bench_ivfpq, since one query
runs on the calling thread) and batch-64 queries/s (all threads). The timing helpers are bench_flat's.

Memory: every (size, level, kind) runs in its own subprocess, so that peak RSS belongs to that configuration
alone. Build peak = VmHWM after building minus VmRSS before building (the raw vectors are already in memory then,
so this is the index plus build temporaries, e.g. the float16 conversion or IVFPQ training). Search peak = VmHWM
during the searches minus VmRSS before them, after resetting the high-water mark (/proc/self/clear_refs "5"),
i.e. the search's own scratch memory. Bytes per image = index.nbytes() / images.

IVFPQ training uses few k-means iterations (--train-iterations) and nlist capped at --max-nlist, so a 100k x L3
build (3M patches) stays within a minute or two; that is a speed setting, not a tuned index.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _source_tree  # noqa: E402,F401  (python/ on sys.path only for an in-place build)

from bench_flat import faiss_search_fn, latency, throughput  # noqa: E402
from patchify.config import IVFPQConfig  # noqa: E402
from bench_ivfpq import GRID_LEVEL_PATCHES, group_top_images, make_queries, smallest_k_prime, synthetic  # noqa: E402

KINDS = ("flat_f32", "flat_f16", "ivfpq")


# ---------------------------------------------------------------------------------------------- memory helpers
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def release_free_heap() -> None:
    """Returns freed heap pages to the OS (glibc malloc_trim). Without it, memory freed by the data generator
    stays resident and the index's first allocations reuse it, so they would not show up as RSS growth."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_rss_bytes() -> int:
    """High-water mark of RSS (VmHWM; the same figure as getrusage's ru_maxrss, but resettable)."""
    return _status_kib("VmHWM") * 1024


def reset_peak_rss() -> bool:
    """Resets VmHWM to the current RSS (Linux >= 4.0), so a later peak measures only what came after."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------- one configuration
def auto_nlist(n_patches: int, max_nlist: int) -> int:
    """bench_ivfpq's rule (power of two near 4 sqrt(n)), capped by max_nlist and by the 40 training points per
    list that faiss wants."""
    rule = 2 ** int(round(math.log2(max(1.0, 4 * math.sqrt(n_patches)))))
    fit = 2 ** int(math.log2(max(1, n_patches // 40)))
    return max(1, min(rule, fit, max_nlist))


def timing_repeats(seconds_per_call: float, budget_s: float, lo: int, hi: int) -> int:
    """As many repeats as fit the time budget (a 3M-patch flat scan takes ~0.5 s; a 10k one ~0.1 ms)."""
    return int(min(hi, max(lo, budget_s / max(seconds_per_call, 1e-6))))


def _probe_seconds(fn, queries: np.ndarray) -> float:
    fn(queries[:1])
    start = time.perf_counter()
    fn(queries[1:2])
    return time.perf_counter() - start


def measure(fn, queries: np.ndarray, cfg: dict[str, Any], min_repeats: int = 5) -> dict[str, Any]:
    """bench_flat's batch-1 latency (p50/p99) and batch throughput, with repeats sized to the time budget (the
    JSON records the runs: a p99 of few runs is only their maximum)."""
    per_query = _probe_seconds(fn, queries)
    lat = latency(fn, queries, timing_repeats(per_query, cfg["budget_s"], min_repeats, cfg["max_repeats"]))
    per_batch = per_query * cfg["batch"] / 4  # a guess (batches amortise); only sizes the repeat count
    thr = throughput(fn, queries, cfg["batch"], timing_repeats(per_batch, cfg["budget_s"], 1, 5))
    return {"batch1": lat, "batch": thr}


def database(cfg: dict[str, Any]) -> np.ndarray:
    """The synthetic vectors of one (size, level): generated by the first kind's process and saved in the run's
    scratch folder, loaded by the others (loading takes seconds; generating 3M x 384 takes a minute when shared)."""
    path = Path(cfg["scratch"]) / f"x_{cfg['images']}_{cfg['patches']}_{cfg['dim']}_{cfg['seed']}.npy"
    if path.exists():
        return np.load(path)
    x = synthetic(cfg["images"], cfg["patches"], cfg["dim"], cfg["seed"])
    np.save(path, x)
    return x


def run_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """Builds one index kind over one (size, level) database and measures it and its baselines."""
    import faiss

    from patchify import _core
    from patchify.index.flat import FlatIndex, numpy_reference_search
    from patchify.index.ivfpq import IVFPQIndex
    from patchify.training import select_training_vectors

    threads = cfg["threads"] or _core.hardware_threads()
    faiss.omp_set_num_threads(threads)
    n_images, per_image, dim, k, kind = cfg["images"], cfg["patches"], cfg["dim"], cfg["k"], cfg["kind"]
    x = database(cfg)
    image_ids = np.repeat(np.arange(n_images, dtype=np.int64), per_image)
    patch_ids = np.arange(len(x), dtype=np.int64)
    queries = make_queries(x, max(256, cfg["batch"] * 2), cfg["seed"])
    out: dict[str, Any] = {**cfg, "threads": threads, "n_patches": len(x)}

    gc.collect()
    release_free_heap()
    rss_before = rss_bytes()
    reset_peak_rss()
    t0 = time.perf_counter()
    if kind == "ivfpq":
        nlist = auto_nlist(len(x), cfg["max_nlist"])
        index: Any = IVFPQIndex(dim, nlist=nlist, m=cfg["m"], nbits=8, nprobe=cfg["nprobe"], num_threads=threads,
                                train_iterations=cfg["train_iterations"])
        need = index.min_training_vectors()
        if len(x) < need:
            return {**out, "skipped": f"{len(x)} patches < {need} needed to train nlist={nlist}, 256 PQ centroids"}
        n_train = min(len(x), max(need, 40 * nlist))
        index.train(select_training_vectors("all", x, image_ids, max_vectors=n_train, seed=cfg["seed"]))
        index.add(x, patch_ids, image_ids)
        # coarse centroids + PQ codebooks: per index, not per image (index.nbytes() leaves them out)
        out.update(nlist=nlist, n_train=n_train, fixed_bytes=(nlist * dim + 256 * dim) * 4)
    else:
        index = FlatIndex(dim, dtype="float32" if kind == "flat_f32" else "float16", num_threads=threads)
        index.add(x, patch_ids, image_ids)
    out["build_seconds"] = time.perf_counter() - t0
    out["build_peak_rss_bytes"] = peak_rss_bytes() - rss_before
    out["index_nbytes"] = index.nbytes()
    out["bytes_per_image"] = index.nbytes() / n_images

    # Ours: searches only, with the high-water mark reset, so its peak is the search's own scratch.
    if kind == "ivfpq":
        ivf = index.faiss_index
        ivf.nprobe = cfg["nprobe"]
        index.search(queries[:2], k)  # builds the list views once (as after any add), not part of a search
        k_prime = smallest_k_prime(index, queries, k)
        out["k_prime"] = k_prime
    gc.collect()
    release_free_heap()
    rss_search = rss_bytes()
    out["peak_reset_supported"] = reset_peak_rss()

    def ours(q: np.ndarray) -> Any:
        index.num_threads = 1 if (kind == "ivfpq" and len(q) == 1) else threads
        return index.search(q, k)

    out["ours"] = measure(ours, queries, cfg)
    out["search_peak_rss_bytes"] = peak_rss_bytes() - rss_search

    # Baselines (after the memory figures: their own copies would inflate the peaks).
    baselines: dict[str, Any] = {}
    if kind == "ivfpq":
        patch_map = index.patch_image_map().astype(np.int64)

        def faiss_group(q: np.ndarray) -> Any:
            faiss.omp_set_num_threads(1 if len(q) == 1 else threads)
            D, I = ivf.search(q, k_prime)
            return group_top_images(D, I, patch_map, k)

        baselines["faiss_ivfpq_group"] = measure(faiss_group, queries, cfg)
    else:
        got = index.search(queries[:4], k)
        if kind == "flat_f32":
            del index  # the numpy and faiss baselines need memory of their own
            gc.collect()
            if not cfg["skip_numpy"]:
                def numpy_ref(q: np.ndarray) -> Any:
                    return numpy_reference_search(x, image_ids, q, k, patch_ids=patch_ids)

                out["matches_numpy"] = bool(np.array_equal(numpy_ref(queries[:4])[1], got[1]))
                # numpy is slow at scale: a smaller budget (its ratio needs only a rough p50)
                baselines["numpy"] = measure(numpy_ref, queries, {**cfg, "budget_s": cfg["budget_s"] / 2}, 3)
            fx = faiss.IndexFlatIP(dim)
        else:
            del index
            gc.collect()
            fx = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
        fx.add(x)
        fsearch = faiss_search_fn(fx, image_ids, k, per_image)
        out["matches_faiss"] = bool(np.array_equal(fsearch(queries[:4])[1], got[1]))
        baselines["faiss_flat_group"] = measure(fsearch, queries, cfg, 3)
    out["baselines"] = baselines
    out["speedup"] = {
        name: {"batch1_p50": b["batch1"]["p50_ms"] / out["ours"]["batch1"]["p50_ms"],
               "batch_qps": out["ours"]["batch"]["queries_per_s"] / b["batch"]["queries_per_s"]}
        for name, b in baselines.items()}
    return out


# ---------------------------------------------------------------------------------------------- driver
def run_in_subprocess(cfg: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """One configuration in a fresh interpreter: its peak RSS is its own, and a crash or an out-of-memory kill
    loses only this row."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(cfg), "--child-out", str(result)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return {**cfg, "skipped": f"timed out after {timeout_s:.0f} s"}
        if proc.returncode != 0 or not result.exists():
            return {**cfg, "skipped": f"exit {proc.returncode}: {proc.stderr.strip()[-500:]}"}
        return json.loads(result.read_text())


def describe(row: dict[str, Any]) -> str:
    head = f"{row['images']:>8} img L{row['level']} ({row['patches']:>2} p/img) {row['kind']:<9}"
    if "skipped" in row:
        return f"{head} skipped: {row['skipped'][:200]}"
    ours = row["ours"]
    text = (f"{head} p50 {ours['batch1']['p50_ms']:9.3f} ms p99 {ours['batch1']['p99_ms']:9.3f} ms "
            f"{ours['batch']['queries_per_s']:8.0f} q/s | {row['bytes_per_image']:8.0f} B/img, build peak "
            f"{row['build_peak_rss_bytes'] / 2**20:7.1f} MiB, "
            f"search peak {row['search_peak_rss_bytes'] / 2**20:6.1f} MiB")
    for name, s in row["speedup"].items():
        text += f" | vs {name}: {s['batch1_p50']:.2f}x b1, {s['batch_qps']:.2f}x b{row['batch']}"
    return text


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000], help="database sizes (images)")
    parser.add_argument("--million", action="store_true", help="add 1,000,000 images (memory: 46 GB at L3 f32!)")
    parser.add_argument("--levels", type=int, nargs="+", default=[0, 1, 2, 3], choices=sorted(GRID_LEVEL_PATCHES))
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--m", type=int, default=IVFPQConfig.m)
    parser.add_argument("--nprobe", type=int, default=IVFPQConfig.nprobe)
    parser.add_argument("--max-nlist", type=int, default=1024)
    parser.add_argument("--train-iterations", type=int, default=4)
    parser.add_argument("--budget-s", type=float, default=1.5, help="seconds of timing per method and mode")
    parser.add_argument("--max-repeats", type=int, default=100)
    parser.add_argument("--threads", type=int, default=0, help="0 = all cores")
    parser.add_argument("--skip-numpy", action="store_true")
    parser.add_argument("--timeout-s", type=float, default=600, help="per configuration")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="smoke config: 2000 images, L1 and L2, d=64, seconds")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:  # a configuration, run by run_in_subprocess
        result = run_config(json.loads(args.child))
        args.child_out.write_text(json.dumps(result))
        return result

    if args.quick:
        args.sizes, args.levels, args.dim, args.m, args.max_nlist = [2000], [1, 2], 64, 8, 64
        args.budget_s, args.max_repeats, args.batch = 0.2, 20, 16
    sizes = sorted(set(args.sizes + ([1_000_000] if args.million else [])))
    base = {"dim": args.dim, "k": args.k, "batch": args.batch, "m": args.m, "nprobe": args.nprobe,
            "max_nlist": args.max_nlist, "train_iterations": args.train_iterations, "budget_s": args.budget_s,
            "max_repeats": args.max_repeats, "threads": args.threads, "skip_numpy": args.skip_numpy,
            "seed": args.seed}
    print(f"sizes {sizes}, levels {args.levels}, kinds {args.kinds}, d={args.dim}, k={args.k}, "
          f"batch {args.batch}, {os.cpu_count()} CPUs", flush=True)
    results: dict[str, Any] = {
        "benchmark": "search_scaling",
        "config": {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                      if not k.startswith("child")}, "sizes": sizes, "cpus": os.cpu_count(),
                   "machine": platform.machine(), "python": platform.python_version()},
        "rows": [],
    }
    started = time.perf_counter()
    for size in sizes:
        for level in args.levels:
            # One scratch folder per database, removed once all kinds have used it (4.6 GB at 100k x L3).
            with tempfile.TemporaryDirectory(prefix="search_scaling_") as scratch:
                for kind in args.kinds:
                    cfg = {**base, "images": size, "level": level, "patches": GRID_LEVEL_PATCHES[level],
                           "kind": kind, "scratch": scratch}
                    row = run_in_subprocess(cfg, args.timeout_s)
                    row.pop("scratch", None)
                    results["rows"].append(row)
                    print(describe(row), flush=True)
                    if args.json:  # after every row: a long run that dies later still leaves its figures
                        args.json.parent.mkdir(parents=True, exist_ok=True)
                        args.json.write_text(json.dumps(results, indent=2) + "\n")
    results["seconds"] = time.perf_counter() - started
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json} ({results['seconds']:.0f} s)")
    return results


if __name__ == "__main__":
    main()
