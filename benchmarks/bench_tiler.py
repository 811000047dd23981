"""Tiler throughput: the C++ tiler (1 and 2 threads) against the Pillow per-patch reference, per grid level.

For levels L = 0..3 (grids 1..L+1: 1, 5, 14, 30 patches per image) every photo in data/photos is tiled into
224x224 patches. The reference is what one would write without the tiler: Pillow crop + resize + normalise into
numpy per patch (each photo converted to a PIL image once, outside the timing). Output equality is checked too.

    python benchmarks/bench_tiler.py [--photos data/photos] [--size 224] [--interpolation bicubic]
                                     [--repeats 3] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _source_tree  # noqa: E402,F401  (python/ on sys.path only for an in-place build)

from patchify.images import list_image_files, load_rgb  # noqa: E402
from patchify.preprocess import Preprocess  # noqa: E402
from patchify.tiling import grid_sizes, patches_per_image, pillow_reference_patch, tile_images  # noqa: E402


def best_of(repeats: int, fn) -> float:
    """Fastest of `repeats` runs (seconds): the least disturbed by other processes on a shared machine."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def measure_level(images: list[np.ndarray], level: int, preprocess: Preprocess, repeats: int) -> dict:
    """Patches/s of the C++ tiler (1 and 2 threads) and of the Pillow per-patch reference over the same patches
    at one grid level, and the largest difference between the two outputs."""
    pil_images = [Image.fromarray(img) for img in images]
    size = preprocess.input_size
    grids = grid_sizes(level)
    n = len(images) * patches_per_image(grids)
    out = np.empty((n, 3, size, size), np.float32)  # preallocated, as the engine reuses batches
    tile_images(images, grids, preprocess, out=out, num_threads=1)  # warm up (page faults, clone dispatch)
    cpp1 = best_of(repeats, lambda: tile_images(images, grids, preprocess, out=out, num_threads=1))
    cpp2 = best_of(repeats, lambda: tile_images(images, grids, preprocess, out=out, num_threads=2))
    batch = tile_images(images, grids, preprocess, out=out, num_threads=2)
    reference = np.empty_like(out)

    def pillow() -> None:
        for k in range(n):
            reference[k] = pillow_reference_patch(pil_images[int(batch.image_index[k])], batch.boxes[k], preprocess)

    ref_seconds = best_of(max(1, repeats - 1), pillow)
    return {
        "level": level, "grids": list(grids), "patches": n,
        "cpp_1thread_patches_per_s": n / cpp1, "cpp_2threads_patches_per_s": n / cpp2,
        "pillow_patches_per_s": n / ref_seconds,
        "speedup_1thread": ref_seconds / cpp1, "speedup_2threads": ref_seconds / cpp2,
        "max_abs_diff": float(np.abs(reference - batch.pixels).max()),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=Path, default=ROOT / "data" / "photos")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--interpolation", default="bicubic", choices=["bicubic", "bilinear"])
    parser.add_argument("--max-level", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    paths = list_image_files(args.photos)
    if not paths:
        print(f"error: no photos in {args.photos}", file=sys.stderr)
        return 2
    images = [load_rgb(p) for p in paths]
    preprocess = Preprocess(input_size=args.size, interpolation=args.interpolation)
    pixels = sum(img.shape[0] * img.shape[1] for img in images)
    print(f"{len(images)} photos from {args.photos} ({pixels / len(images) / 1e3:.0f} kpixel average), "
          f"{args.size}x{args.size} {args.interpolation}, best of {args.repeats}, {os.cpu_count()} CPUs")
    print(f"{'level':>5} {'patches':>8} {'C++ 1 thr':>10} {'C++ 2 thr':>10} {'Pillow':>8} "
          f"{'x 1 thr':>8} {'x 2 thr':>8} {'max diff':>9}   (patches/s)")

    rows = []
    for level in range(args.max_level + 1):
        row = measure_level(images, level, preprocess, args.repeats)
        max_diff = row["max_abs_diff"]
        n = row["patches"]
        rows.append(row)
        print(f"{'L' + str(level):>5} {n:>8} {row['cpp_1thread_patches_per_s']:>10.0f} "
              f"{row['cpp_2threads_patches_per_s']:>10.0f} {row['pillow_patches_per_s']:>8.0f} "
              f"{row['speedup_1thread']:>7.1f}x {row['speedup_2threads']:>7.1f}x {max_diff:>9.2g}")

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "benchmark": "tiler", "photos": len(images), "input_size": args.size,
            "interpolation": args.interpolation, "cpus": os.cpu_count(), "machine": platform.machine(),
            "python": platform.python_version(), "pillow": Image.__version__, "numpy": np.__version__,
            "results": rows,
        }, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
