"""Indexing speed per encoding mode and level: images/s and patches/s of `Patchify.add_images`, against crop mode.

    PYTHONPATH=python python benchmarks/bench_encoding_modes.py [--images 6] [--extra DIR --extra-images 6]
        [--levels 0 1 2 3] [--modes crop-fp32,crop-int8,fit196-int8] [--rounds 2] [--threads 1]
        [--json out.json]

A mode is a cell sizing ("crop" = every cell resized to 224 px, the paper's and the baseline; "fit" = cells at about
their own pixel size, patchify.tiling.cell_input_sizes; "fit168", "fit196" = fit with that floor) and a backbone
precision (fp32, int8, fp16). Every mode indexes the same images at every level with the default backbone, a flat
index and no whitening (the whitening's one-time learning pass is not per-image cost; see RESULTS.md), the backbone
loaded once per mode beforehand. Rounds run every (mode, level) in turn; the best round is kept. Ratios are against
crop-fp32-b32 (crop mode as it ran before the encoding modes: fp32, 32 patches per backbone call; every other mode
leaves the call size to the backbone, 8 on a CPU) in the same run, by wall-clock time and by CPU time
(`time.process_time`: all the process's threads). On a machine shared with other work the wall clock moves with
the neighbours' load, CPU time much less: with --threads 1 the CPU ratio is what an idle machine's wall-clock
ratio would be.

Quality per mode is benchmarks/quality.py --suite default --precision P --cell-sizing S (RESULTS.md, "Indexing
cost").
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _source_tree  # noqa: E402,F401  (python/ on sys.path only for an in-place build)

from patchify import Patchify, load_backbone  # noqa: E402
from patchify.config import MIN_FIT_INPUT_SIZE  # noqa: E402
from patchify.images import list_image_files  # noqa: E402

# name -> (cell sizing, smallest fit side, precision[, patches per backbone call])
MODES: dict[str, tuple] = {
    # Crop mode as indexed before the encoding modes: every backbone call took 32 patches.
    "crop-fp32-b32": ("fixed", MIN_FIT_INPUT_SIZE, "fp32", 32),
    "crop-fp32": ("fixed", MIN_FIT_INPUT_SIZE, "fp32"),
    "crop-int8": ("fixed", MIN_FIT_INPUT_SIZE, "int8"),
    "fit-fp32": ("fit", MIN_FIT_INPUT_SIZE, "fp32"),
    "fit-int8": ("fit", MIN_FIT_INPUT_SIZE, "int8"),
    "fit168-fp32": ("fit", 168, "fp32"),
    "fit168-int8": ("fit", 168, "int8"),
    "fit196-fp32": ("fit", 196, "fp32"),
    "fit196-int8": ("fit", 196, "int8"),
    "crop-fp16": ("fixed", MIN_FIT_INPUT_SIZE, "fp16"),
}
BASELINE = "crop-fp32-b32"


class _CallSize:
    """The backbone with a fixed number of patches per onnxruntime call (the encoder leaves it to the backbone)."""

    def __init__(self, backbone: Any, patches: int) -> None:
        self._backbone, self._patches = backbone, patches

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backbone, name)

    def encode(self, pixels: Any, batch_size: int | None = None) -> Any:
        return self._backbone.encode(pixels, batch_size=self._patches)


def index_once(backbone: Any, paths: list[Path], level: int, mode: str, threads: int) -> dict[str, Any]:
    from patchify.config import TilingConfig

    sizing, floor = MODES[mode][:2]
    tiling = TilingConfig.for_level(level, cell_sizing=sizing, min_input_size=floor)
    if len(MODES[mode]) > 3:
        backbone = _CallSize(backbone, MODES[mode][3])
    engine = Patchify(backbone, tiling=tiling, whitening="none", num_threads=threads)
    started, cpu_started = time.perf_counter(), time.process_time()
    report = engine.add_images(paths)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    if report.skipped:
        raise RuntimeError(f"skipped: {report.skipped}")
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "images": report.n_images,
            "images_per_cpu_s": report.n_images / cpu_seconds, "patches": report.n_patches,
            "images_per_s": report.n_images / seconds, "patches_per_s": report.n_patches / seconds,
            "encode_s": report.timings["encode"], "tile_s": report.timings["tile"] + report.timings["tile_cpu"],
            "index_bytes": engine.index.nbytes() if engine.index is not None else 0}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=Path, default=ROOT / "data" / "photos")
    parser.add_argument("--images", type=int, default=6, help="photos of --photos indexed by every mode")
    parser.add_argument("--extra", type=Path, default=None, help="another folder of images (e.g. grocery photos)")
    parser.add_argument("--extra-images", type=int, default=6, help="images of --extra, spread over it")
    parser.add_argument("--levels", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--modes", default="crop-fp32,crop-int8,fit196-int8")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    modes = args.modes.split(",")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise SystemExit(f"unknown modes {unknown}; known: {', '.join(MODES)}")
    if BASELINE not in modes:
        modes.insert(0, BASELINE)
    paths = list_image_files(args.photos)[:args.images]
    if args.extra is not None:
        extra = list_image_files(args.extra)
        step = max(1, len(extra) // max(1, args.extra_images))
        paths += extra[::step][:args.extra_images]
    backbones = {m: load_backbone("dinov2_vits14", num_threads=args.threads, precision=MODES[m][2]) for m in modes}
    for backbone in backbones.values():  # warm-up: first-call allocations out of the measurements
        index_once(backbone, paths[:1], 0, BASELINE, args.threads)
    best: dict[tuple[str, int], dict[str, Any]] = {}
    for round_ in range(args.rounds):
        for level in args.levels:
            for mode in modes:
                row = index_once(backbones[mode], paths, level, mode, args.threads)
                key = (mode, level)
                if key not in best or row["cpu_seconds"] < best[key]["cpu_seconds"]:
                    best[key] = {**row, "best_wall_images_per_s": max(row["images_per_s"], best.get(
                        key, {}).get("best_wall_images_per_s", 0.0))}
                else:
                    best[key]["best_wall_images_per_s"] = max(best[key]["best_wall_images_per_s"],
                                                              row["images_per_s"])
                print(f"round {round_ + 1} L{level} {mode:12s} {row['images_per_s']:6.3f} img/s "
                      f"{row['patches_per_s']:6.2f} patches/s  {row['images_per_cpu_s']:6.3f} img/CPU-s", flush=True)
    print(f"\n{len(paths)} images, best of {args.rounds} rounds, {args.threads} threads, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus")
    print("| mode | level | images/CPU-s | patches/CPU-s | x baseline (CPU) | best wall images/s | x baseline (wall) "
          "| index bytes/image |")
    print("|---|---|---|---|---|---|---|---|")
    for level in args.levels:
        base = best[(BASELINE, level)]
        for mode in modes:
            r = best[(mode, level)]
            print(f"| {mode} | L{level} | {r['images_per_cpu_s']:.3f} | {r['patches'] / r['cpu_seconds']:.2f} | "
                  f"{r['images_per_cpu_s'] / base['images_per_cpu_s']:.2f}x | {r['best_wall_images_per_s']:.3f} | "
                  f"{r['best_wall_images_per_s'] / base['best_wall_images_per_s']:.2f}x | "
                  f"{r['index_bytes'] / r['images']:,.0f} |")
    result = {"machine": f"{platform.platform()}, {os.cpu_count()} cpus", "args": {k: str(v) for k, v in
                                                                                 vars(args).items()},
              "images": [str(p) for p in paths],
              "rows": [{"mode": m, "level": lv, **r} for (m, lv), r in best.items()]}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
