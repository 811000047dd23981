"""Wasted cells: how many grid cells are flat background or near-duplicates of their parent, and what skipping
them would cost in accuracy.

    PATCHIFY_CACHE_DIR=/work/cache PYTHONPATH=python python benchmarks/wasted_cells.py \
        [--sets crops,grocery,composite] [--grocery-every 4] [--flat 4,8,12] [--duplicate 0.9,0.95] [--json out.json]

Uses the crop-mode float32 vectors of benchmarks/quality.py's sets (cached by benchmarks/experiments/
real_quality.py) at L3. Two rules, each applied to the cells of grids 2-4 (the whole image is always kept):

* flat: the cell's grey-level standard deviation (0-255, from the image's pixels, before any encoding) is below a
  threshold. A rule that saves the backbone pass itself.
* duplicate: the cell's vector has cosine above a threshold with its parent's (the 2x2 cell containing a 4x4 cell,
  the whole image for 2x2 and 3x3 cells). Known only after encoding: it saves storage and search time, not
  encoding.

For each rule and threshold: the share of cells it drops, and mAP / LocScore / R@1 at L3 of the default engine
(benchmarks/quality.py's `run_setting`) over the kept cells, against all cells.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import quality  # noqa: E402  (the sets, the engine runs)

sets_module = quality.sets_module


def grey_std(data) -> np.ndarray:
    """Grey-level standard deviation of every patch's box in its image (read from the set's database files)."""
    from patchify import load_rgb

    out = np.zeros(len(data.vectors), np.float32)
    for i, path in enumerate(data.database):
        rows = np.flatnonzero(data.image == i)
        grey = load_rgb(path).astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        for r in rows:
            x0, y0, x1, y1 = (int(v) for v in data.boxes[r])
            out[r] = float(grey[y0:y1, x0:x1].std())
    return out


def parent_cosine(data) -> np.ndarray:
    """Cosine of each patch with its parent (4x4 cell -> the 2x2 cell containing its centre; 2x2 and 3x3 cells ->
    the whole image); 0 for whole images."""
    out = np.zeros(len(data.vectors), np.float32)
    for i in range(data.n_images):
        rows = np.flatnonzero(data.image == i)
        grid = data.grid[rows]
        whole = rows[grid == 1][0]
        quads = rows[grid == 2]
        for r in rows:
            g = int(data.grid[r])
            if g == 1:
                continue
            parent = whole
            if g == 4 and len(quads):
                cx = (data.boxes[r, 0] + data.boxes[r, 2]) / 2
                cy = (data.boxes[r, 1] + data.boxes[r, 3]) / 2
                inside = [q for q in quads if data.boxes[q, 0] <= cx < data.boxes[q, 2]
                          and data.boxes[q, 1] <= cy < data.boxes[q, 3]]
                parent = inside[0] if inside else whole
            out[r] = float(data.vectors[r] @ data.vectors[parent])
    return out


def kept(data, keep: np.ndarray):
    return dataclasses.replace(data, vectors=data.vectors[keep], image=data.image[keep], grid=data.grid[keep],
                               boxes=data.boxes[keep])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", default="crops,grocery,composite")
    ap.add_argument("--grocery", type=Path, default=ROOT.parent / "shared" / "data" / "grocery")
    ap.add_argument("--grocery-splits", default="train,val")
    ap.add_argument("--grocery-every", type=int, default=1)
    ap.add_argument("--photos", type=Path, default=ROOT / "data" / "photos")
    ap.add_argument("--composite", default="20,4,60")
    ap.add_argument("--flat", default="4,8,12", help="grey-level std thresholds")
    ap.add_argument("--duplicate", default="0.85,0.9,0.95", help="parent-cosine thresholds")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    encoder = sets_module.Encoder("dinov2_vits14", 1)
    setting = quality.DEFAULT_ONLY[0]
    results: dict[str, list[dict]] = {}
    sets = sets_module.encode_sets(encoder, args.sets.split(","), grocery=args.grocery,
                                   grocery_splits=args.grocery_splits.split(","), photos=args.photos,
                                   composite=args.composite, grocery_every=args.grocery_every)
    for name, data in sets.items():
        std, cosine = grey_std(data), parent_cosine(data)
        cells = data.grid > 1
        rows = [("all cells", np.ones(len(data.vectors), bool))]
        rows += [(f"flat: grey std < {t:g}", ~(cells & (std < t))) for t in map(float, args.flat.split(","))]
        rows += [(f"duplicate: parent cosine > {t:g}", ~(cells & (cosine > t)))
                 for t in map(float, args.duplicate.split(","))]
        results[name] = []
        for label, keep in rows:
            r = quality.run_setting(kept(data, keep), setting, 3, None)
            dropped = 1.0 - keep[cells].mean()
            results[name].append({"rule": label, "dropped_cells": float(dropped), "mAP": r["mAP"],
                                  "LocScore": r["LocScore"], "R@1": r["R@1"], "top1": r["top1"]})
            print(f"{name:9s} {label:32s} drops {100 * dropped:5.1f} % of cells: mAP {r['mAP']:.3f} "
                  f"LocScore {r['LocScore']:.3f} R@1 {r['R@1']:.3f}", flush=True)
    print("\n| set | rule | cells dropped | mAP L3 | LocScore L3 | R@1 L3 |\n|---|---|---|---|---|---|")
    for name, rows_ in results.items():
        for r in rows_:
            print(f"| {name} | {r['rule']} | {100 * r['dropped_cells']:.1f} % | {r['mAP']:.3f} | {r['LocScore']:.3f} "
                  f"| {r['R@1']:.3f} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
