"""Which vectors should train the PQ codebooks? mAP and LocScore of IVFPQ trained on each source, against the
uncompressed flat index, on the composite benchmark (the paper: PQ trained on informative, object-aligned features
loses far less than PQ trained on all grid patches; "salient" is our ground-truth-free selector).

    python benchmarks/pq_training_sources.py BENCH_DIR [--level 3] [--m 48] [--nbits 5] [--json out.json]

Database embeddings come from the embedding cache (`patchify eval BENCH_DIR` fills it), so only the ground-truth
crops are encoded here. "gt-aligned" is an oracle: it trains on crops at the benchmark's ground-truth boxes.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def gt_crops(dataset) -> list[np.ndarray]:
    """The object crop of every (query, positive) pair: pixels at the ground-truth box."""
    from patchify.images import load_rgb

    crops = []
    for boxes in dataset.boxes:
        for image, image_boxes in boxes.items():
            pixels = load_rgb(dataset.database[image])
            for x0, y0, x1, y1 in image_boxes:
                crops.append(np.ascontiguousarray(pixels[int(y0):int(y1), int(x0):int(x1)]))
    return crops


def main() -> int:
    from patchify.config import IVFPQConfig

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bench_dir", type=Path)
    parser.add_argument("--level", type=int, default=3)
    parser.add_argument("--m", type=int, default=IVFPQConfig.m)
    parser.add_argument("--nbits", type=int, default=5, help="bits per PQ code (small benchmarks cannot train 8)")
    parser.add_argument("--nlist", type=int, default=None)
    parser.add_argument("--nprobe", type=int, default=IVFPQConfig.nprobe)
    parser.add_argument("--cache", default=None, help="embedding cache folder (as given to patchify eval)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from patchify import Patchify
    from patchify.backbones import load_backbone
    from patchify.datasets import load_composite

    dataset = load_composite(args.bench_dir)
    backbone = load_backbone("dinov2_vits14")
    cache = args.cache or True
    database = [str(p) for p in dataset.database]
    flat = Patchify(backbone=backbone, level=args.level, embedding_cache=cache)
    report = flat.add_images(database, progress=True)
    print(f"{dataset.name}: {report.n_images} images ({report.from_cache} from the cache), "
          f"{report.n_patches} patches at L{args.level}; backbone {backbone.name} [{backbone.weights}]")
    queries = flat.embed_queries([dataset.query_image(q) for q in range(dataset.n_queries)])
    started = time.perf_counter()
    gt_vectors = flat.embed_queries(gt_crops(dataset))
    print(f"encoded {len(gt_vectors)} ground-truth crops in {time.perf_counter() - started:.1f} s")

    k = report.n_images
    rows = [{"index": "flat (uncompressed)", "source": "-", **flat_summary(dataset, flat, queries, k)}]
    for source in ("all", "salient", "gt-aligned"):
        engine = Patchify(backbone=backbone, level=args.level, index="ivfpq", m=args.m, nbits=args.nbits,
                          nlist=args.nlist, nprobe=args.nprobe, training_source=source, embedding_cache=cache,
                          training_vectors=gt_vectors if source == "gt-aligned" else None)
        engine.add_images(database)
        rows.append({"index": f"IVFPQ M={args.m}x{args.nbits}b nlist={engine.index.nlist}",  # type: ignore[union-attr]
                     "source": source, **flat_summary(dataset, engine, queries, k)})

    print(f"\n{'index':<28} {'training source':<16} {'mAP':>7} {'LocScore':>9} {'R@1':>7}")
    for row in rows:
        print(f"{row['index']:<28} {row['source']:<16} {row['mAP']:7.4f} {row['LocScore']:9.4f} {row['R@1']:7.4f}")
    if args.json:
        args.json.write_text(json.dumps({"dataset": str(args.bench_dir), "level": args.level, "rows": rows}, indent=2))
    return 0


def flat_summary(dataset, engine, queries: np.ndarray, k: int) -> dict[str, float]:
    summary = dataset.evaluate(engine.search_batch(queries, k=k)).summary()
    return {key: float(summary[key]) for key in ("mAP", "LocScore", "R@1")}


if __name__ == "__main__":
    sys.exit(main())
