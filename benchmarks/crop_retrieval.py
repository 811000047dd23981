"""Crop -> source retrieval on real photos, per grid level (the paper's core effect, measured here).

Each photo is the database; random 30-60 % crops (per side) of the photos are the queries; a query is right when
its source photo ranks first. The patch embeddings are computed once at the finest level and reused for the
coarser ones (levels nest), through the embedding cache.

    python benchmarks/crop_retrieval.py [--photos ../shared/data/photos] [--crops-per-photo 3] [--json out.json]

Also measures the C++ tiler against a Pillow per-patch reference in the same run.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def default_photos() -> Path:
    shared = ROOT.parent / "shared" / "data" / "photos"
    return shared if shared.is_dir() else ROOT / "data" / "photos"


def make_crops(photos: list[Path], per_photo: int,
               seed: int) -> list[tuple[np.ndarray, int, tuple[int, int, int, int]]]:
    from patchify.images import load_rgb

    rng = np.random.default_rng(seed)
    crops = []
    for source, path in enumerate(photos):
        pixels = load_rgb(path)
        height, width = pixels.shape[:2]
        for _ in range(per_photo):
            w = int(width * rng.uniform(0.3, 0.6))
            h = int(height * rng.uniform(0.3, 0.6))
            x0 = int(rng.integers(0, width - w + 1))
            y0 = int(rng.integers(0, height - h + 1))
            crops.append((np.ascontiguousarray(pixels[y0:y0 + h, x0:x0 + w]), source, (x0, y0, x0 + w, y0 + h)))
    return crops


def box_iou(a: tuple[int, ...], b: tuple[int, ...]) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union else 0.0


def tiler_throughput(photos: list[Path], level: int, preprocess, repeats: int = 3) -> dict[str, float]:
    """The C++ tiler against the Pillow per-patch reference on these photos (bench_tiler.py's measurement)."""
    from bench_tiler import measure_level

    from patchify.images import load_rgb

    row = measure_level([load_rgb(p) for p in photos], level, preprocess, repeats)
    return {"patches": row["patches"], "cpp_1thread_patches_per_s": row["cpp_1thread_patches_per_s"],
            "cpp_patches_per_s": row["cpp_2threads_patches_per_s"], "pillow_patches_per_s": row["pillow_patches_per_s"],
            "ratio_1thread": row["speedup_1thread"], "ratio": row["speedup_2threads"],
            "max_abs_diff": row["max_abs_diff"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=Path, default=default_photos())
    parser.add_argument("--crops-per-photo", type=int, default=3)
    parser.add_argument("--max-level", type=int, default=3)
    parser.add_argument("--backbone", default="dinov2_vits14")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", type=Path, default=None, help="embedding cache folder (default: a temp folder)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from patchify import Patchify
    from patchify.backbones import load_backbone
    from patchify.images import list_image_files

    photos = list_image_files(args.photos)
    if not photos:
        print(f"error: no photos in {args.photos}", file=sys.stderr)
        return 2
    backbone = load_backbone(args.backbone)
    crops = make_crops(photos, args.crops_per_photo, args.seed)
    cache = args.cache or Path(tempfile.mkdtemp(prefix="patchify-crops-"))
    print(f"{len(photos)} photos from {args.photos}, {len(crops)} crops (30-60 % per side), seed {args.seed}")
    print(f"backbone {backbone.name} [{backbone.weights}] on {backbone.provider}")

    # Encode the finest level once; coarser levels come from the cache.
    started = time.perf_counter()
    finest = Patchify(backbone=backbone, level=args.max_level, embedding_cache=cache)
    finest.add_images(photos, progress=True)
    query_vectors = finest.embed_queries([pixels for pixels, _, _ in crops])
    encode_seconds = time.perf_counter() - started

    rows = []
    for level in range(args.max_level + 1):
        engine = Patchify(backbone=backbone, level=level, embedding_cache=cache)
        report = engine.add_images(photos)
        assert report.from_cache == len(photos), "levels must nest in the embedding cache"
        hits = engine.search_batch(query_vectors, k=1)
        correct = [h[0].image_id == source for h, (_, source, _) in zip(hits, crops)]
        ious = [box_iou(h[0].box, box) for h, (_, source, box), ok in zip(hits, crops, correct) if ok]
        rows.append({"level": level, "patches_per_image": engine.n_patches // len(photos),
                     "top1": int(sum(correct)), "queries": len(crops),
                     "mean_iou_correct": float(np.mean(ious)) if ious else 0.0})

    print(f"\n{'level':>5}  {'patches/img':>11}  {'top-1':>9}  {'mean IoU (hits)':>15}")
    for row in rows:
        print(f"{'L' + str(row['level']):>5}  {row['patches_per_image']:>11}  "
              f"{row['top1']:>4}/{row['queries']:<4}  {row['mean_iou_correct']:>15.3f}")
    tiler = tiler_throughput(photos, args.max_level, backbone.preprocess)
    print(f"\ntiler L{args.max_level} ({tiler['patches']} patches, best of 3): C++ "
          f"{tiler['cpp_1thread_patches_per_s']:.0f} patches/s on 1 thread ({tiler['ratio_1thread']:.1f}x), "
          f"{tiler['cpp_patches_per_s']:.0f} on all threads ({tiler['ratio']:.1f}x) vs Pillow per-patch "
          f"{tiler['pillow_patches_per_s']:.0f} patches/s")
    print(f"encoding {len(photos)} photos at L{args.max_level} + {len(crops)} queries: {encode_seconds:.1f} s")
    if rows[2 if args.max_level >= 2 else -1]["top1"] <= rows[0]["top1"]:
        print("WARNING: L2 does not beat L0 on this run", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps({
            "date": date.today().isoformat(), "machine": platform.platform(), "photos": str(args.photos),
            "backbone": backbone.name, "weights": backbone.weights, "levels": rows, "tiler": tiler,
            "encode_seconds": encode_seconds}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
