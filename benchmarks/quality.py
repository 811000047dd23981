"""Retrieval quality through the engine: raw cosines vs learned whitening vs whitening + global fusion, per level.

The quality table of benchmarks/RESULTS.md ("Retrieval quality on real photos"). Three sets of real photos, each
encoded once with the real default backbone at the finest level (cached, see benchmarks/experiments/real_quality.py,
which owns the sets and the encoding):

* grocery    GroceryStore packaged products: the iconic (studio) photo of each product -> its store photos among
             the chosen splits' (default train + val: 964 photos, 31 queries). No boxes.
* crops      60 random crops (30-60 % per side) of the 20 real photos -> their source photo (top-1 hits).
* composite  objects cut from real photos and pasted into others (has boxes: LocScore).

Every configuration is a real `Patchify` engine: the cached patch vectors of each level go in through
`add_embeddings` (so each level's engine learns its whitening on its own patches, exactly as a user's index would)
and the queries through `search_vectors`; nothing here re-implements the scoring.

    PATCHIFY_CACHE_DIR=/work/cache PYTHONPATH=python python benchmarks/quality.py \
        [--sets crops,grocery,composite] [--grocery-splits train,val] [--max-level 3] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks" / "experiments"))

import real_quality as sets_module  # noqa: E402  (the sets, the encoder and its cache)

from patchify.config import WhiteningConfig  # noqa: E402


@dataclass(frozen=True)
class Setting:
    name: str
    engine: dict[str, Any] = field(default_factory=dict)  # Patchify keyword arguments
    learn_on_others: bool = False  # a whitening learned on the other sets' patches (not the searched database)
    opq: bool = False  # the default whitening followed by a faiss OPQ rotation learned on the whitened patches


PATCHES_ONLY = WhiteningConfig(learn_grid=None)  # learned on the indexed patches instead of the 4x4 cells
SCORING = [
    Setting("raw max (paper)", {"whitening": "none", "global_weight": 0.0}),
    Setting("whitened on indexed patches, max", {"whitening": PATCHES_ONLY, "global_weight": 0.0}),
    Setting("whitened on indexed patches + fusion w.25", {"whitening": PATCHES_ONLY}),
    Setting("whitened max", {"global_weight": 0.0}),
    Setting("whitened + fusion w.25 (default)", {}),
    Setting("whitened + fusion w.4", {"global_weight": 0.4}),
    Setting("whitened shrinkage 1 + fusion w.25", {"whitening": WhiteningConfig(shrinkage=1.0)}),
    Setting("whitened shrinkage 0.1 + fusion w.25", {"whitening": WhiteningConfig(shrinkage=0.1)}),
    Setting("raw + fusion w.25", {"whitening": "none", "global_weight": 0.25}),
    Setting("whitened (other sets) + fusion w.25", {}, learn_on_others=True),
]
# Compression (issue "Compressed search that keeps flat's accuracy"): PQ48 codes with 8 bits where the set has
# enough patches to train 256 centroids per sub-quantiser, else 5 bits ("auto"); default nlist and nprobe; the
# second stage re-scores the first stage's best 100 images (what a top-10 search re-scored by default with 8-bit
# codes). The default index now is PQ32x4 fast-scan with a shortlist of 200 for a top-10 search: the setting
# "IVFPQ PQ32x4 fast-scan + re-rank int8, shortlist 200".
_PQ = {"index": "ivfpq", "m": 48, "nbits": "auto", "rerank_shortlist": 100}
COMPRESSION = [
    Setting("flat, raw max (paper)", {"whitening": "none", "global_weight": 0.0}),
    Setting("IVFPQ, raw max, one stage (before)", {**_PQ, "whitening": "none", "global_weight": 0.0,
                                                   "rerank": "none"}),
    Setting("IVFPQ, raw max + re-rank int8", {**_PQ, "whitening": "none", "global_weight": 0.0}),
    Setting("flat (default scoring)", {}),
    Setting("IVFPQ one stage (default scoring)", {**_PQ, "rerank": "none"}),
    Setting("IVFPQ + re-rank int8 (PQ48x8, the default before)", {**_PQ}),
    Setting("IVFPQ + re-rank float16", {**_PQ, "rerank": "float16"}),
    # Which codes: one stage (PQ scores only) trained on every patch, on the "salient" selection, after OPQ.
    Setting("IVFPQ one stage, salient training", {**_PQ, "rerank": "none", "training_source": "salient"}),
    Setting("IVFPQ one stage, OPQ", {**_PQ, "rerank": "none"}, opq=True),
    # 4-bit fast-scan codes (faiss IndexIVFPQFastScan layout, the fused fast-scan scanner): PQ48x4 is 24 bytes of
    # codes per patch, PQ32x4 16 (the first stage's <= 32 B/patch with ids and the patch -> image map).
    Setting("IVFPQ PQ48x4 fast-scan one stage", {**_PQ, "nbits": 4, "rerank": "none"}),
    Setting("IVFPQ PQ48x4 fast-scan + re-rank int8", {**_PQ, "nbits": 4}),
    Setting("IVFPQ PQ32x4 fast-scan + re-rank int8", {**_PQ, "m": 32, "nbits": 4}),
    Setting("IVFPQ PQ48x4 fast-scan + re-rank int8, shortlist 200", {**_PQ, "nbits": 4, "rerank_shortlist": 200}),
    Setting("IVFPQ PQ32x4 fast-scan + re-rank int8, shortlist 200", {**_PQ, "m": 32, "nbits": 4,
                                                                    "rerank_shortlist": 200}),
]
# Encoding modes (issue "Indexing at a fraction of the backbone cost"): the default scoring only, run once per mode
# (--precision, --cell-sizing) and compared with the crop-mode float32 run of the same command.
DEFAULT_ONLY = [Setting("whitened + fusion w.25 (default)", {})]
SUITES = {"scoring": SCORING, "compression": COMPRESSION, "default": DEFAULT_ONLY}


def run_setting(data: "sets_module.EncodedSet", setting: Setting, level: int, others: np.ndarray | None,
                k: int | None = None) -> dict[str, Any]:
    from patchify.config import IVFPQConfig
    from patchify.whitening import Whitening

    options = dict(setting.engine)
    keep = np.flatnonzero(data.grid <= level + 1)
    if options.get("nbits") == "auto":
        options["nbits"] = 8 if len(keep) >= IVFPQConfig(nbits=8).min_training_vectors() else 5
    if setting.learn_on_others:
        if others is None:
            raise ValueError(f"{setting.name}: needs at least two sets")
        options["whitening"] = Whitening.learn(others, WhiteningConfig())
    if setting.opq:
        options["whitening"] = opq_whitening(data, level, options["m"], options["nbits"])
    engine = build_engine(data, level, options)
    started = time.perf_counter()
    # Every image ranked (k None), or the top k. A two-stage IVFPQ search re-ranks max(rerank_shortlist, k) images:
    # with every image asked for, that is every image its first stage reached, so the shortlist's recall only
    # shows with a k below the database size (--k 100: a top-100 search re-ranking a shortlist of 100).
    scores, image_ids, patch_ids = engine.search_vectors(data.queries, k=k or data.n_images)
    search = time.perf_counter() - started
    result = evaluate(data, scores, image_ids, engine.patches.box[patch_ids])
    result.update(build_s=engine.build_seconds, search_s=search,
                  effective_global_weight=engine.effective_global_weight,
                  whitened_on=engine.whitening.learned_on_vectors if engine.whitening else 0,
                  index=repr(engine.index.config), nlist=getattr(engine.index.config, "nlist", None),
                  index_bytes_per_patch=engine.index.nbytes() / len(keep),
                  exact_until_trained=engine.exact_until_trained)
    return result


def opq_whitening(data: "sets_module.EncodedSet", level: int, m: int, nbits: int = 8):
    """The default whitening (learned as add_images would) composed with a faiss OPQ rotation learned on the
    whitened patches of `level`: normalise((x - mean) P) R^T = normalise((x - mean) P R^T) for a rotation R, so the
    result is again a `Whitening` (flat results unchanged; only the PQ codes see the rotation). The rotation is
    learned with a PQ of the index's `nbits` (faiss's OPQMatrix trains an 8-bit one unless given one: 9,984 vectors
    at least, more than small sets hold)."""
    import faiss

    from patchify.whitening import Whitening

    plain = build_engine(data, level, {"global_weight": 0.0}).whitening
    keep = data.grid <= level + 1
    whitened = plain.apply(data.vectors[keep])
    opq = faiss.OPQMatrix(whitened.shape[1], m)
    pq = faiss.ProductQuantizer(whitened.shape[1], m, nbits)  # referenced here while OPQ trains with it
    opq.pq = pq
    opq.train(np.ascontiguousarray(whitened[np.random.default_rng(0).permutation(len(whitened))[:65536]]))
    rotation = faiss.vector_to_array(opq.A).reshape(opq.d_out, opq.d_in)
    return Whitening(plain.mean, np.ascontiguousarray(plain.projection @ rotation.T, np.float32), plain.config,
                     plain.learned_on_vectors, plain.learned_on_images, learned_from=plain.learned_from + " + OPQ")


def build_engine(data: "sets_module.EncodedSet", level: int, options: dict[str, Any]):
    """A Patchify engine over the set's patches of `level` (through add_embeddings, as a user's would be)."""
    from patchify import Patchify
    from patchify.records import NewImage, PatchTable

    from patchify.whitening import LearningSet

    engine = Patchify(level=level, **options)
    keep = np.flatnonzero(data.grid <= level + 1)
    # What add_images would learn the whitening from: the learn_grid cells of learn_images images spread over all.
    config = engine.whitening_config
    learning = None
    if config is not None and config.learn_grid is not None:
        learning = LearningSet.of_grid_cells(config, data.vectors, data.grid, data.image, data.n_images)
    # Patch boxes as int32 (x0, y0, x1, y1), cells only matter for display.
    table = PatchTable(data.image[keep], data.boxes[keep].astype(np.int32), data.grid[keep],
                       np.zeros(len(keep), np.int16))
    images = [NewImage(f"{data.name}/{i}", 1, 1) for i in range(data.n_images)]
    started = time.perf_counter()
    engine.add_embeddings(data.vectors[keep], table, images, whitening_vectors=learning)
    engine.build_seconds = time.perf_counter() - started
    return engine


def recall_vs_shortlist(data: "sets_module.EncodedSet", level: int, nbits: int, m: int = 48,
                        shortlists: tuple[int, ...] = (10, 20, 50, 100, 200)) -> dict[int, float]:
    """Recall of the flat index's top-10 images among the IVFPQ first stage's top R (whitened, plain max): how
    long the shortlist must be for the second stage to see every image it should return."""
    flat = build_engine(data, level, {"global_weight": 0.0})
    ivf = build_engine(data, level, {"global_weight": 0.0, "index": "ivfpq", "m": m, "nbits": nbits,
                                     "rerank": "none"})
    _, exact, _ = flat.search_vectors(data.queries, 10)
    out = {}
    for r in shortlists:
        _, first, _ = ivf.search_vectors(data.queries, r)
        out[r] = float(np.mean([len(set(a) & set(b)) / len(a) for a, b in zip(exact, first)]))
    return out


def evaluate(data: "sets_module.EncodedSet", scores: np.ndarray, image_ids: np.ndarray, boxes: np.ndarray
             ) -> dict[str, Any]:
    from patchify.metrics import evaluate_rankings

    found = image_ids >= 0  # an IVFPQ search pads with -1 past the images it found
    rankings = [row[ok].tolist() for row, ok in zip(image_ids, found)]
    box_lists = [[tuple(float(c) for c in b) for b in row[ok]] for row, ok in zip(boxes, found)]
    gts = [{"positives": p, "boxes": b} for p, b in zip(data.positives, data.gt_boxes, strict=True)]
    ev = evaluate_rankings(rankings, box_lists, gts, scores=[row[ok].tolist() for row, ok in zip(scores, found)],
                           recall_ks=(1, 5))
    s = ev.summary()
    top1 = sum(r[0] in set(p) for r, p in zip(rankings, data.positives, strict=True))
    return {"mAP": s["mAP"], "R@1": s["R@1"], "LocScore": s["LocScore"], "top1": top1, "ap": ev.ap.tolist()}


def paired_line(a: list[float], b: list[float], resamples: int = 10_000) -> str:
    """Mean AP difference a - b with a bootstrap 95 % interval over queries, and queries won / lost."""
    d = np.array(a) - np.array(b)
    d = d[~np.isnan(d)]
    boot = d[np.random.default_rng(0).integers(0, len(d), (resamples, len(d)))].mean(axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return f"{d.mean():+.3f} [{lo:+.3f}, {hi:+.3f}] ({(d > 1e-9).sum()}/{(d < -1e-9).sum()})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", default="crops,grocery,composite")
    ap.add_argument("--grocery", type=Path, default=ROOT.parent / "shared" / "data" / "grocery")
    ap.add_argument("--grocery-splits", default="train,val")
    ap.add_argument("--photos", type=Path, default=ROOT / "data" / "photos")
    ap.add_argument("--composite", default="20,4,60", help="OBJECTS,POSITIVES,DISTRACTORS")
    ap.add_argument("--max-level", type=int, default=3, choices=range(4))
    ap.add_argument("--threads", type=int, default=1, help="backbone threads for vectors not cached yet")
    ap.add_argument("--suite", choices=list(SUITES), default="scoring",
                    help="scoring: raw / whitened / fusion; compression: flat vs IVFPQ with and without re-rank")
    ap.add_argument("--min-level", type=int, default=0, choices=range(4))
    ap.add_argument("--precision", default="fp32", choices=["fp32", "int8", "fp16"],
                    help="backbone precision of the database and query vectors (default: the paper's fp32)")
    ap.add_argument("--cell-sizing", dest="cell_sizing", default="fixed", choices=["fixed", "fit"],
                    help="fixed: every cell at 224 px (crop mode); fit: cells at about their own size")
    ap.add_argument("--min-input-size", dest="min_input_size", type=int, default=None,
                    help="fit: smallest cell side (default patchify.config.MIN_FIT_INPUT_SIZE)")
    ap.add_argument("--grocery-every", dest="grocery_every", type=int, default=1,
                    help="grocery: keep every N-th database photo (a spread subsample; queries unchanged)")
    ap.add_argument("--k", type=int, default=None,
                    help="rank only the top k images per query (default: every image); AP counts the positives "
                         "outside the top k as not found, for every setting alike")
    ap.add_argument("--settings", default=None,
                    help="only the suite's settings whose name contains one of these comma-separated strings")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--compare", type=Path, default=None, metavar="JSON",
                    help="a --json of an earlier run (e.g. crop mode): per-query AP differences, this run - that")
    ap.add_argument("--dump-vectors", type=Path, default=None, metavar="DIR",
                    help="also write every set's patch vectors (patches.npy) and queries (queries.npy) there, for "
                         "benchmarks/bench_scoring.py")
    args = ap.parse_args()

    encoder = sets_module.Encoder("dinov2_vits14", args.threads, args.precision, args.cell_sizing,
                                  args.min_input_size)
    print(f"encoding: {encoder.mode}", flush=True)
    sets = sets_module.encode_sets(encoder, args.sets.split(","), grocery=args.grocery,
                                   grocery_splits=args.grocery_splits.split(","), photos=args.photos,
                                   composite=args.composite, grocery_every=args.grocery_every,
                                   max_level=args.max_level)
    if args.dump_vectors:
        args.dump_vectors.mkdir(parents=True, exist_ok=True)
        np.save(args.dump_vectors / "patches.npy", np.concatenate([d.vectors for d in sets.values()]))
        np.save(args.dump_vectors / "queries.npy", np.concatenate([d.queries for d in sets.values()]))
    results: dict[str, dict[str, dict[int, dict[str, Any]]]] = {}
    for name, data in sets.items():
        rest = [d.vectors for n, d in sets.items() if n != name]
        others = np.concatenate(rest) if rest else None
        results[name] = {}
        for setting in SUITES[args.suite]:
            if setting.learn_on_others and others is None:
                continue
            if args.settings and not any(part in setting.name for part in args.settings.split(",")):
                continue
            # faiss's OPQ trains an 8-bit PQ inside: below its 39 x 256 points it warns, and on a few hundred
            # points it crashed (double free, faiss 1.x); report OPQ only where it can train.
            if setting.opq and int((data.grid <= args.min_level + 1).sum()) < 39 * 256:
                continue
            results[name][setting.name] = {lv: run_setting(data, setting, lv, others, args.k)
                                           for lv in range(args.min_level, args.max_level + 1)}
            row = results[name][setting.name]
            print(f"{name:9s} {setting.name:38s} " + "  ".join(
                f"L{lv} mAP {r['mAP']:.3f} top1 {r['top1']}" for lv, r in row.items()), flush=True)
    for name, data in sets.items():
        print(f"{name}: {data.n_images} database images, {len(data.queries)} queries, "
              f"{len(data.vectors)} patches at L{args.max_level}")
    print(sets_module.format_table(results))
    print("\nPaired per-query AP differences (bootstrap 95 % interval; queries better / worse):")
    default = "whitened + fusion w.25 (default)"
    pairs = {"scoring": [(default, "raw max (paper)"), (default, "whitened max"),
                         (default, "whitened on indexed patches + fusion w.25")],
             "compression": [("IVFPQ + re-rank int8 (PQ48x8, the default before)", "flat (default scoring)"),
                             ("IVFPQ PQ48x4 fast-scan + re-rank int8", "flat (default scoring)"),
                             ("IVFPQ PQ32x4 fast-scan + re-rank int8, shortlist 200", "flat (default scoring)"),
                             ("IVFPQ one stage (default scoring)", "flat (default scoring)"),
                             ("IVFPQ, raw max + re-rank int8", "flat, raw max (paper)")],
             "default": []}[args.suite]  # one setting: compare runs of other modes with --compare
    for name in results:
        for lv in range(args.min_level, args.max_level + 1):
            r = results[name]
            print(f"{name} L{lv}: " + "; ".join(f"{a} vs {b} {paired_line(r[a][lv]['ap'], r[b][lv]['ap'])}"
                                                for a, b in pairs if a in r and b in r))
    if args.compare:
        earlier = json.loads(args.compare.read_text())
        before = earlier["results"]
        print(f"\nThis run - {args.compare} ({earlier['encoding']}), per-query AP:")
        for name in results:
            for setting, by_level in results[name].items():
                for lv, r in by_level.items():
                    old = before.get(name, {}).get(setting, {}).get(f"L{lv}")
                    if old and "ap" in old:
                        print(f"  {name} L{lv} {setting}: mAP {r['mAP']:.3f} vs {old['mAP']:.3f}, LocScore "
                              f"{r['LocScore']:.3f} vs {old['LocScore']:.3f}: {paired_line(r['ap'], old['ap'])}")
    if args.suite == "compression":
        from patchify.config import IVFPQConfig

        print("\nIndex bytes per patch in RAM (first stage + re-rank store if in RAM), per set at the finest level:")
        for name in results:
            for setting, by_level in results[name].items():
                r = by_level[args.max_level]
                print(f"  {name} {setting}: {r['index_bytes_per_patch']:.1f} B/patch  {r['index']}")
        print("\nRecall of flat's top-10 images in the IVFPQ first stage's top R (whitened, plain max):")
        for name, data in sets.items():
            n = int((data.grid <= args.max_level + 1).sum())
            nbits = 8 if n >= IVFPQConfig(nbits=8).min_training_vectors() else 5
            for m, bits in ((48, nbits), (48, 4), (32, 4)):  # and the 4-bit fast-scan first stages (PQ32x4: default)
                recall = recall_vs_shortlist(data, args.max_level, bits, m)
                print(f"  {name} L{args.max_level} PQ{m}x{bits}: "
                      + "  ".join(f"R={r}: {v:.3f}" for r, v in recall.items()))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        # Per-query APs stay in: --compare pairs two runs (e.g. two encoding modes) query by query.
        slim = {s: {m: {f"L{lv}": dict(r) for lv, r in by.items()} for m, by in per.items()}
                for s, per in results.items()}
        args.json.write_text(json.dumps({"machine": f"{platform.platform()}, {os.cpu_count()} cpus",
                                         "encoding": encoder.mode,
                                         "args": {k: str(v) for k, v in vars(args).items()},
                                         "sets": {n: {"images": d.n_images, "queries": len(d.queries)}
                                                  for n, d in sets.items()},
                                         "results": slim}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
