"""How large must a patch-level k' be for "top-k' patches, then group by image" to return the same top-k images
as max-over-patches? Real patch embeddings (the composite benchmark) against bench_ivfpq's synthetic model at
the same size. This is what decides how much the fused IVFPQ scanner can gain over faiss + group-by ((b) in
bench_ivfpq.py): (b) must fetch k' patches.

    patchify eval BENCH_DIR --build 16,4,80 --levels 3 --index flat --cache CACHE   # encodes the database once
    python benchmarks/experiments/kprime_real.py BENCH_DIR --level 3 --cache CACHE

Exact inner products (float64), so k' is a property of the data, not of any index: walking the patches best
first, an image first appears at its best patch, so the first k distinct images are the exact top-k images and
k' is the rank of the patch where the k-th distinct image first appears.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _source_tree  # noqa: E402,F401

from bench_ivfpq import make_queries, synthetic  # noqa: E402


def k_prime(vectors: np.ndarray, image_of: np.ndarray, query: np.ndarray, k: int) -> int:
    order = np.argsort(-(vectors.astype(np.float64) @ query.astype(np.float64)), kind="stable")
    _, first = np.unique(image_of[order], return_index=True)
    return int(np.sort(first)[k - 1]) + 1


def describe(name: str, values: list[int], k: int, per_image: int) -> str:
    v = np.array(values)
    return (f"{name:<44} k' min {v.min():4d}  median {int(np.median(v)):4d}  max {v.max():4d}  "
            f"(median {np.median(v) / k:.1f} patches per top image of {per_image})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bench_dir", type=Path)
    ap.add_argument("--level", type=int, default=3)
    ap.add_argument("--cache", default=None, help="embedding cache folder (as given to patchify eval)")
    ap.add_argument("--k", type=int, nargs="+", default=[5, 10])
    args = ap.parse_args()

    from patchify import Patchify
    from patchify.backbones import load_backbone
    from patchify.datasets import load_composite
    from patchify.index.flat import IMAGE_IDS_FILE, VECTORS_FILE

    dataset = load_composite(args.bench_dir)
    backbone = load_backbone("dinov2_vits14")
    engine = Patchify(backbone=backbone, level=args.level, embedding_cache=args.cache or True)
    report = engine.add_images([str(p) for p in dataset.database])
    if report.from_cache < report.n_images:
        print(f"note: {report.n_images - report.from_cache} images were not in the cache and were encoded now")
    with tempfile.TemporaryDirectory() as tmp:
        engine.index.save(Path(tmp))  # type: ignore[union-attr]
        vectors = np.load(Path(tmp) / VECTORS_FILE).astype(np.float32)
        image_of = np.load(Path(tmp) / IMAGE_IDS_FILE)
    per_image = len(vectors) // report.n_images
    queries = engine.embed_queries([dataset.query_image(q) for q in range(dataset.n_queries)])
    print(f"{dataset.name}: {report.n_images} images x {per_image} patches (L{args.level}), "
          f"{len(queries)} object-crop queries; backbone {backbone.name} [{backbone.weights}]")
    # (label, patch vectors, image of each patch, queries): the real database twice, then the synthetic model.
    cases = [("real patches, object-crop queries", vectors, image_of, queries),
             ("real patches, noisy copies of patches", vectors, image_of, make_queries(vectors, len(queries), 0))]
    synthetic_images = np.repeat(np.arange(report.n_images), per_image)
    for spread in (0.9, 0.4):
        x = synthetic(report.n_images, per_image, vectors.shape[1], 0, image_spread=spread)
        cases.append((f"synthetic (bench_ivfpq, spread {spread})", x, synthetic_images,
                      make_queries(x, len(queries), 0)))
    for k in args.k:
        print(f"k = {k}:")
        for label, x, images, qs in cases:
            print(describe(label, [k_prime(x, images, q, k) for q in qs], k, per_image))
    return 0


if __name__ == "__main__":
    sys.exit(main())
