"""How much exact early abandoning could save in the IVFPQ scan (an analysis, not a benchmark of the product).

    python benchmarks/experiments/pq_prune_bound.py --images 20000

For each query: the ADC table T (48 x 256), every probed code's partial sum over its first h sub-quantisers, and
the bound partial + sum_{m >= h} max_c T[m][c]. A code whose bound is below the final 10th-best image score
could stop after h lookups. Prints that fraction per checkpoint h, with sub-quantisers in natural order and in a
per-query order (largest table range first), and the lookups per code a three-checkpoint scheme would need.
The final threshold is an optimistic stand-in for the running one. Data: bench_ivfpq's synthetic model.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_ivfpq import make_queries, synthetic  # noqa: E402

from patchify.config import IVFPQConfig  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=20000)
    ap.add_argument("--nlist", type=int, default=1024)
    ap.add_argument("--nprobe", type=int, default=IVFPQConfig.nprobe)
    ap.add_argument("--queries", type=int, default=32)
    ap.add_argument("--k", type=int, default=10)
    args = ap.parse_args()
    import faiss

    dim, m, per_image = 384, 48, 14
    x = synthetic(args.images, per_image, dim, 0)
    q = make_queries(x, args.queries, 0)
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFPQ(quantizer, dim, args.nlist, m, 8, faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(0)
    index.train(x[rng.choice(len(x), min(len(x), 60 * args.nlist), replace=False)])
    index.add(x)
    codebooks = faiss.vector_to_array(index.pq.centroids).reshape(m, 256, dim // m)
    coarse = quantizer.reconstruct_n(0, args.nlist)
    image_of = np.arange(len(x)) // per_image
    _, probes = quantizer.search(q, args.nprobe)
    lists = index.invlists
    checkpoints = (16, 24, 32, 40)
    prunable = {(h, o): 0 for h in checkpoints for o in ("natural", "sorted")}
    total = 0
    for qi in range(len(q)):
        table = np.einsum("md,mcd->mc", q[qi].reshape(m, -1), codebooks)
        codes, ids, dis0 = [], [], []
        for lst in map(int, probes[qi]):
            n = lists.list_size(lst)
            if n:
                codes.append(faiss.rev_swig_ptr(lists.get_codes(lst), n * m).reshape(n, m).copy())
                ids.append(faiss.rev_swig_ptr(lists.get_ids(lst), n).copy())
                dis0.append(np.full(n, q[qi] @ coarse[lst]))
        c, i, d0 = np.concatenate(codes), np.concatenate(ids), np.concatenate(dis0)
        scores = d0 + table[np.arange(m), c].sum(1)
        best: dict[int, float] = {}
        for s, img in zip(scores, image_of[i]):
            best[img] = max(best.get(img, -np.inf), s)
        tau = sorted(best.values())[-args.k]
        total += len(scores)
        for name, order in (("natural", np.arange(m)), ("sorted", np.argsort(-(table.max(1) - table.min(1))))):
            t, cc = table[order], c[:, order]
            for h in checkpoints:
                partial = d0 + t[np.arange(h), cc[:, :h]].sum(1)
                prunable[(h, name)] += int((partial + t[h:].max(1).sum() < tau).sum())
    print(f"{args.images} images x {per_image}, nlist {args.nlist}, nprobe {args.nprobe}: "
          f"{total / len(q):.0f} codes per query")
    for name in ("natural", "sorted"):
        frac = {h: prunable[(h, name)] / total for h in checkpoints}
        lookups = 24 + 8 * (1 - frac[24]) + 8 * (1 - frac[32]) + 8 * (1 - frac[40])
        print(f"  {name:7s} order: " + ", ".join(f"h={h} {frac[h]:.2f}" for h in checkpoints)
              + f" -> {lookups:.1f} of {m} lookups per code with checkpoints 24/32/40 ({m / lookups:.2f}x fewer)")


if __name__ == "__main__":
    main()
