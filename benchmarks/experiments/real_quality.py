"""Retrieval quality on real photos: raw max-over-patches vs PCA whitening vs global+patch score fusion.

Decides the defaults for the issue "Retrieval quality on real photos". Three sets, each encoded once with the real
default backbone at L3 (levels nest, so L0..L2 are subsets of the L3 patches) and cached as .npz:

* grocery    GroceryStore packaged products (`patchify.datasets.load_grocery`): database = a split's store photos,
             queries = the iconic photos of the products present, positives = same product. No boxes.
* crops      crop -> source on the 20 real photos: 60 random crops of 30-60 % per side (seeded, as
             benchmarks/crop_retrieval.py makes them); right = the source photo ranks first.
* composite  `build_composite_benchmark` (objects from real photos pasted into others; has boxes -> LocScore).

Then everything is evaluated from the cached vectors with numpy: per level, per scoring method (raw max cosine;
PCA whitening learned on the database patches without labels, at several powers / shrinkage / dimensions; fusion
w * global + (1 - w) * best patch, raw and whitened). Also times applying the whitening to 64 queries against a
flat search over 100k images x 14 patches (one matmul, as a proxy).

    PATCHIFY_CACHE_DIR=/work/cache PYTHONPATH=python python benchmarks/experiments/real_quality.py \
        [--grocery ../shared/data/grocery --grocery-splits val] [--photos data/photos] \
        [--composite 20,4,60] [--sets crops,grocery,composite] [--max-level 3] [--encode-only] [--json out.json]

Encoding uses one thread (--threads) and writes one .npz per image under benchmarks/cache/real_quality/ (ignored by
git), so an interrupted run resumes where it stopped. The whitening is learned on every encoded database patch (L0..
--max-level); results and the write-up: benchmarks/experiments/real_quality.md.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / "benchmarks" / "cache" / "real_quality"
MAX_LEVEL = 3  # --max-level lowers it (e.g. 1 for the larger grocery train+val database); L3 entries still serve


# ------------------------------------------------------------------------------------------------- encoding
class Encoder:
    """Real backbone + the library's encoder (patchify.encoder.Encoder: tiler, cell sizing, backbone); one .npz per
    image (keyed by content, backbone identity and cell sizing).

    precision / cell_sizing: the encoding mode (see patchify.config); the defaults here are the paper's crop mode
    in float32, whose cache namespace predates the modes (the backbone identity alone)."""

    def __init__(self, backbone_name: str, threads: int, precision: str = "fp32", cell_sizing: str = "fixed",
                 min_input_size: int | None = None) -> None:
        import patchify
        from patchify.config import MIN_FIT_INPUT_SIZE

        self.backbone = patchify.load_backbone(backbone_name, num_threads=threads, precision=precision)
        self.threads = threads
        self.cell_sizing = cell_sizing
        self.min_input_size = min_input_size or MIN_FIT_INPUT_SIZE
        key = json.dumps(self.backbone.identity, sort_keys=True)
        if cell_sizing != "fixed":
            key += f"|{cell_sizing}:{self.min_input_size}"
        self.namespace = hashlib.sha1(key.encode()).hexdigest()[:12]
        (CACHE / self.namespace).mkdir(parents=True, exist_ok=True)
        self.encoded_patches = 0
        self.seconds = 0.0

    @property
    def mode(self) -> str:
        size = f" (min {self.min_input_size} px)" if self.cell_sizing == "fit" else ""
        return f"{self.cell_sizing} cells{size}, {self.backbone.precision}"

    def _library_encoder(self, grids: tuple[int, ...]):
        from patchify.config import TilingConfig
        from patchify.encoder import Encoder as LibraryEncoder

        tiling = TilingConfig(grids=grids, cell_sizing=self.cell_sizing, min_input_size=self.min_input_size)
        return LibraryEncoder(self.backbone, tiling, num_threads=self.threads)

    def _path(self, kind: str, key: str) -> Path:
        return CACHE / self.namespace / kind / key[:2] / f"{key}.npz"

    @staticmethod
    def _key(pixels: np.ndarray) -> str:
        h = hashlib.sha1(f"{pixels.shape}".encode())
        h.update(np.ascontiguousarray(pixels).tobytes())
        return h.hexdigest()

    @staticmethod
    def _save(path: Path, **arrays: np.ndarray) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, path)

    def patches(self, pixels: np.ndarray, max_level: int = 3) -> dict[str, np.ndarray]:
        """Patches of one image up to `max_level` (L3: 30): vectors (P, D) float32, grid, cell, boxes (x0, y0, x1,
        y1). An L3 entry serves every level (levels nest); a coarser request is cached under its own name."""
        key = self._key(pixels)
        for kind in dict.fromkeys(["patches", "patches" if max_level == 3 else f"patches_L{max_level}"]):
            path = self._path(kind, key)
            if path.is_file():
                with np.load(path) as z:
                    entry = {k: z[k] for k in z.files}
                keep = entry["grid"] <= max_level + 1
                return {k: (v[keep] if k != "size" else v) for k, v in entry.items()}
        started = time.perf_counter()
        # A coarser entry already cached (levels nest): encode only the finer grids and append them.
        have: dict[str, np.ndarray] | None = None
        for lower in range(max_level - 1, -1, -1):
            lower_path = self._path(f"patches_L{lower}", key)
            if lower_path.is_file():
                with np.load(lower_path) as z:
                    have = {k: z[k] for k in z.files}
                break
        first_grid = int(have["grid"].max()) + 1 if have is not None else 1
        grids = tuple(range(first_grid, max_level + 2))
        from patchify.records import AddReport

        report = AddReport()
        (batch,) = self._library_encoder(grids).encode_images([pixels], report)
        if report.skipped:
            raise ValueError(report.skipped[0].reason)
        vectors = batch.vectors
        out = {"vectors": vectors.astype(np.float32), "grid": batch.patches.grid.astype(np.int32),
               "cell": batch.patches.cell.astype(np.int32), "boxes": batch.patches.box.astype(np.int32),
               "size": np.array(pixels.shape[1::-1], dtype=np.int32)}
        if have is not None:
            out = {k: (np.concatenate([have[k], v]) if k != "size" else v) for k, v in out.items()}
        self._save(path, **out)
        self.seconds += time.perf_counter() - started
        self.encoded_patches += len(vectors)
        return out

    def query(self, pixels: np.ndarray) -> np.ndarray:
        """Global descriptor (D,) of a whole query image."""
        from patchify.tiling import prepare_whole_images

        path = self._path("queries", self._key(pixels))
        if path.is_file():
            with np.load(path) as z:
                return z["vector"]
        started = time.perf_counter()
        vector = self.backbone.encode(prepare_whole_images([pixels], self.backbone.preprocess,
                                                           num_threads=self.threads))[0].astype(np.float32)
        self._save(path, vector=vector)
        self.seconds += time.perf_counter() - started
        self.encoded_patches += 1
        return vector


@dataclass
class EncodedSet:
    """Everything the evaluation needs, as arrays (no images, no backbone)."""

    name: str
    vectors: np.ndarray      # (P, D) L3 patches of every database image, image-major
    image: np.ndarray        # (P,) database image index of each patch
    grid: np.ndarray         # (P,) grid size (1..4); level = grid - 1
    boxes: np.ndarray        # (P, 4)
    queries: np.ndarray      # (Q, D) global query vectors
    positives: list[list[int]]
    gt_boxes: list[dict[int, list]]  # per query: database index -> boxes (empty: no boxes)
    n_images: int
    note: str = ""
    database: list[Path] = field(default_factory=list)  # the database images' files, in index order


def _encode_database(enc: Encoder, paths: Sequence[Path], log: Callable[[str], None], label: str,
                     max_level: int = MAX_LEVEL) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from patchify import load_rgb

    vecs, image, grid, boxes = [], [], [], []
    started = time.perf_counter()
    for i, p in enumerate(paths):
        e = enc.patches(load_rgb(p), max_level)
        vecs.append(e["vectors"])
        image.append(np.full(len(e["vectors"]), i, dtype=np.int32))
        grid.append(e["grid"])
        boxes.append(e["boxes"])
        if (i + 1) % 10 == 0 or i + 1 == len(paths):
            log(f"  {label}: {i + 1}/{len(paths)} images ({time.perf_counter() - started:.0f} s; "
                f"{enc.encoded_patches} patches encoded this run in {enc.seconds:.0f} s)")
    return np.concatenate(vecs), np.concatenate(image), np.concatenate(grid), np.concatenate(boxes)


def crop_to_box(pixels: np.ndarray, box) -> np.ndarray:
    if box is None:
        return pixels
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    return np.ascontiguousarray(pixels[max(0, y0):max(y0 + 1, y1), max(0, x0):max(x0 + 1, x1)])


def encode_retrieval_set(enc: Encoder, name: str, dataset, log, max_level: int = MAX_LEVEL) -> EncodedSet:
    """A RetrievalDataset: queries first (few), then the database."""
    from patchify import load_rgb

    log(f"{name}: {len(dataset.queries)} queries, {len(dataset.database)} database images")
    queries = np.stack([enc.query(crop_to_box(load_rgb(q), dataset.query_boxes[i]))
                        for i, q in enumerate(dataset.queries)])
    vectors, image, grid, boxes = _encode_database(enc, dataset.database, log, name, max_level)
    gt = [{int(i): [tuple(b) for b in bx] for i, bx in d.items()} for d in dataset.boxes]
    return EncodedSet(name, vectors, image, grid, boxes, queries, [list(p) for p in dataset.positives], gt,
                      len(dataset.database), database=[Path(p) for p in dataset.database])


def encode_crops(enc: Encoder, photos_dir: Path, per_photo: int, seed: int, log, max_level: int = MAX_LEVEL
                 ) -> EncodedSet:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from crop_retrieval import make_crops

    from patchify.images import list_image_files

    photos = list_image_files(photos_dir)
    crops = make_crops(photos, per_photo, seed)
    log(f"crops: {len(crops)} crops of {len(photos)} photos in {photos_dir} (seed {seed})")
    queries = np.stack([enc.query(pixels) for pixels, _, _ in crops])
    vectors, image, grid, boxes = _encode_database(enc, photos, log, "crops", max_level)
    positives = [[source] for _, source, _ in crops]
    gt = [{source: [box]} for _, source, box in crops]
    return EncodedSet("crops", vectors, image, grid, boxes, queries, positives, gt, len(photos),
                      note="the crop's box in its source photo is its ground truth", database=list(photos))


def encode_sets(enc: Encoder, names: Sequence[str], *, grocery: Path, grocery_splits: Sequence[str], photos: Path,
                composite: str = "20,4,60", grocery_every: int = 1, crops_per_photo: int = 3, seed: int = 0,
                max_level: int = MAX_LEVEL, log: Callable[[str], None] = lambda _: None) -> dict[str, EncodedSet]:
    """The named sets ("crops", "grocery", "composite"), encoded (or read from the cache) in that order: what every
    benchmark over real photos evaluates. grocery_every > 1 keeps every n-th grocery database photo; composite is
    OBJECTS,POSITIVES,DISTRACTORS of a composite benchmark built once under benchmarks/cache."""
    from patchify.datasets import build_composite_benchmark, load_composite, load_grocery

    sets: dict[str, EncodedSet] = {}
    for name in names:
        if name == "crops":
            sets[name] = encode_crops(enc, photos, crops_per_photo, seed, log, max_level)
        elif name == "grocery":
            dataset = load_grocery(grocery, list(grocery_splits))
            if grocery_every > 1:
                dataset = dataset.subsample(grocery_every)
            sets[name] = encode_retrieval_set(enc, name, dataset, log, max_level)
        elif name == "composite":
            n_obj, n_pos, n_dist = (int(v) for v in composite.split(","))
            folder = ROOT / "benchmarks" / "cache" / f"composite_{n_obj}x{n_pos}x{n_dist}_seed{seed}"
            dataset = (load_composite(folder) if (folder / "groundtruth.json").is_file() else
                       build_composite_benchmark(folder, n_objects=n_obj, positives_per_object=n_pos,
                                                 n_distractors=n_dist, seed=seed))
            sets[name] = encode_retrieval_set(enc, name, dataset, log, max_level)
        else:
            raise SystemExit(f"unknown set {name!r} (crops, grocery, composite)")
    return sets


# ------------------------------------------------------------------------------------------------- scoring
def l2n(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@dataclass
class Whitening:
    mean: np.ndarray
    proj: np.ndarray  # (D, d)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return l2n((x - self.mean) @ self.proj).astype(np.float32)


def learn_whitening(x: np.ndarray, power: float = -0.5, shrink: float = 0.0, dims: int | None = None) -> Whitening:
    """PCA whitening without labels: centre, rotate onto the principal axes, scale axis k by
    (lambda_k + shrink * mean(lambda))^power, keep the first `dims` axes; the caller re-L2-normalises."""
    x = x.astype(np.float64)
    mean = x.mean(axis=0)
    cov = np.cov(x - mean, rowvar=False)
    lam, vec = np.linalg.eigh(cov)
    order = np.argsort(lam)[::-1]
    lam, vec = np.maximum(lam[order], 0.0), vec[:, order]
    floor = 1e-9 * lam[0]  # rank-deficient sets: keep the scale finite
    scale = (np.maximum(lam, floor) + shrink * lam.mean()) ** power
    d = dims or len(lam)
    return Whitening(mean.astype(np.float32), (vec[:, :d] * scale[:d]).astype(np.float32))


@dataclass
class Method:
    name: str
    whiten: dict | None = None  # learn_whitening kwargs; None = raw cosine
    fusion: float | None = None  # weight of the global (L0) score; None = max over patches only
    # which patches train the whitening: "L3" (all the database's), "level" (the index's own, i.e. only the
    # patches of the evaluated level) or "others" (the L3 patches of the other sets: a whitening shipped with the
    # library rather than learned on the user's database)
    learn_on: str = "L3"


METHODS = [
    Method("raw max (today)"),
    Method("wh p-0.5", {"power": -0.5}),
    Method("wh p-0.5 (own level)", {"power": -0.5}, learn_on="level"),
    Method("wh p-0.5 shr1 (own level)", {"power": -0.5, "shrink": 1.0}, learn_on="level"),
    Method("wh p-0.25", {"power": -0.25}),
    Method("wh p-0.5 shr0.1", {"power": -0.5, "shrink": 0.1}),
    Method("wh p-0.5 shr1", {"power": -0.5, "shrink": 1.0}),
    Method("wh p-0.5 d256", {"power": -0.5, "dims": 256}),
    Method("wh p-0.5 d128", {"power": -0.5, "dims": 128}),
    Method("wh p-0.5 shr0.1 d256", {"power": -0.5, "shrink": 0.1, "dims": 256}),
    Method("wh p-0.5 shr1 (other sets)", {"power": -0.5, "shrink": 1.0}, learn_on="others"),
    Method("wh p-0.25 (other sets)", {"power": -0.25}, learn_on="others"),
    Method("fuse raw w.25", fusion=0.25),
    Method("fuse raw w.5 (mean)", fusion=0.5),
    Method("fuse raw w.75", fusion=0.75),
    Method("fuse wh-0.5 w.25", {"power": -0.5}, fusion=0.25),
    Method("fuse wh-0.5 w.5", {"power": -0.5}, fusion=0.5),
    Method("fuse wh-0.5 w.75", {"power": -0.5}, fusion=0.75),
    Method("fuse wh-0.5shr1 w.25", {"power": -0.5, "shrink": 1.0}, fusion=0.25),
    Method("fuse wh-0.5shr1 w.5", {"power": -0.5, "shrink": 1.0}, fusion=0.5),
    Method("fuse wh-0.5shr0.1 w.25", {"power": -0.5, "shrink": 0.1}, fusion=0.25),
    Method("fuse wh-0.5shr1 (other sets) w.25", {"power": -0.5, "shrink": 1.0}, fusion=0.25, learn_on="others"),
    Method("fuse wh-0.25 w.25", {"power": -0.25}, fusion=0.25),
    Method("fuse wh-0.25 w.5", {"power": -0.25}, fusion=0.5),
]


def image_scores(q: np.ndarray, v: np.ndarray, image: np.ndarray, n_images: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(Q, N) max cosine per image and (Q, N) index (into v) of the winning patch."""
    sims = q @ v.T  # (Q, P)
    best = np.full((len(q), n_images), -np.inf, dtype=np.float32)
    arg = np.zeros((len(q), n_images), dtype=np.int64)
    for i in range(n_images):
        idx = np.flatnonzero(image == i)
        s = sims[:, idx]
        j = s.argmax(axis=1)
        best[:, i] = s[np.arange(len(q)), j]
        arg[:, i] = idx[j]
    return best, arg


def score_set(data: EncodedSet, method: Method, level: int, whitenings: dict, others: np.ndarray | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
    """(Q, N) image scores and (Q, N) winning patch index for one method at one level."""
    keep = np.flatnonzero(data.grid <= level + 1)
    v, q = data.vectors[keep], data.queries
    if method.whiten is not None:
        key = (json.dumps(method.whiten, sort_keys=True), method.learn_on, level if method.learn_on == "level" else -1)
        if key not in whitenings:
            if method.learn_on == "others":
                if others is None:
                    raise ValueError(f"{method.name}: needs at least two sets")
                train = others
            else:
                train = data.vectors if method.learn_on == "L3" else v
            whitenings[key] = learn_whitening(train, **method.whiten)
        w = whitenings[key]
        v, q = w(v), w(q)
    best, arg = image_scores(q, v, data.image[keep], data.n_images)
    if method.fusion is not None:
        g = np.flatnonzero(data.grid[keep] == 1)  # one whole-image patch per image, image order
        glob = q @ v[g].T
        best = method.fusion * glob + (1.0 - method.fusion) * best
    return best, keep[arg]


def evaluate(data: EncodedSet, scores: np.ndarray, winners: np.ndarray) -> dict[str, float]:
    from patchify.metrics import evaluate_rankings

    rankings, boxes, sc = [], [], []
    for qi in range(len(scores)):
        order = np.argsort(-scores[qi], kind="stable")
        rankings.append(order.tolist())
        boxes.append([tuple(float(c) for c in data.boxes[winners[qi, i]]) for i in order])
        sc.append(scores[qi, order].tolist())
    gts = [{"positives": p, "boxes": b} for p, b in zip(data.positives, data.gt_boxes, strict=True)]
    ev = evaluate_rankings(rankings, boxes, gts, scores=sc, recall_ks=(1, 5))
    s = ev.summary()
    top1 = sum(r[0] in set(p) for r, p in zip(rankings, data.positives, strict=True))
    return {"mAP": s["mAP"], "R@1": s["R@1"], "R@5": s["R@5"], "LocScore": s["LocScore"], "top1": top1,
            "n": len(rankings), "ap": ev.ap.tolist()}


COMPARISONS = [("wh p-0.5 shr0.1", "raw max (today)"), ("wh p-0.5 shr1", "raw max (today)"),
               ("wh p-0.5 shr1 (other sets)", "raw max (today)"), ("fuse raw w.5 (mean)", "raw max (today)"),
               ("fuse wh-0.5shr1 w.25", "wh p-0.5 shr1"), ("fuse wh-0.5shr1 w.25", "raw max (today)")]


def paired(results: dict, levels: Sequence[int] = (2, 3), resamples: int = 10_000) -> str:
    """Per-query AP differences (crops: AP = 1 / rank of the source): wins/losses and a bootstrap 95 % interval
    of the mean difference, per set, for the comparisons that decide the default."""
    rng = np.random.default_rng(0)
    lines = ["| comparison | level | " + " | ".join(f"{s}: dAP [95% CI] (W/L)" for s in results) + " |",
             "|" + "---|" * (len(results) + 2)]
    for a, b in COMPARISONS:
        for lv in levels:
            if any(lv not in per_set.get(a, {}) for per_set in results.values()):
                continue
            cells = []
            for s in results:
                if a not in results[s] or b not in results[s]:
                    cells.append("-")
                    continue
                d = np.array(results[s][a][lv]["ap"]) - np.array(results[s][b][lv]["ap"])
                d = d[~np.isnan(d)]
                boot = d[rng.integers(0, len(d), (resamples, len(d)))].mean(axis=1)
                lo, hi = np.percentile(boot, [2.5, 97.5])
                cells.append(f"{d.mean():+.3f} [{lo:+.3f}, {hi:+.3f}] ({(d > 1e-9).sum()}/{(d < -1e-9).sum()})")
            lines.append(f"| {a} vs {b} | L{lv} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_all(data: EncodedSet, others: np.ndarray | None) -> dict[str, dict[int, dict[str, float]]]:
    whitenings: dict = {}
    methods = [m for m in METHODS if others is not None or m.learn_on != "others"]
    levels = range(int(data.grid.max()))  # grid g = level g - 1
    return {m.name: {lv: evaluate(data, *score_set(data, m, lv, whitenings, others)) for lv in levels}
            for m in methods}


# -------------------------------------------------------------------------------------------------- timing
def time_whitening(dim: int = 384, n_queries: int = 64, n_images: int = 100_000, patches_per_image: int = 14,
                   chunk_images: int = 12_500, repeats: int = 3) -> dict[str, float]:
    """Applying a (dim x dim) whitening to a batch of queries vs the flat search it precedes: the (64 x dim) x
    (dim x 1.4M) product, streamed in blocks of 12,500 images, plus the max over each image's patches."""
    rng = np.random.default_rng(0)
    q = l2n(rng.standard_normal((n_queries, dim)).astype(np.float32))
    w = Whitening(np.zeros(dim, np.float32), rng.standard_normal((dim, dim)).astype(np.float32))
    block = l2n(rng.standard_normal((chunk_images * patches_per_image, dim)).astype(np.float32))
    t_w = min(_timed(lambda: w(q)) for _ in range(repeats * 10))

    def search() -> None:
        for _ in range(n_images // chunk_images):
            (q @ block.T).reshape(n_queries, chunk_images, patches_per_image).max(axis=2)

    t_s = min(_timed(search) for _ in range(repeats))
    return {"whiten_64_queries_ms": t_w * 1e3, "flat_search_64_queries_ms": t_s * 1e3, "ratio": t_w / t_s,
            "n_patches": n_images * patches_per_image, "blas_threads": os.environ.get("OPENBLAS_NUM_THREADS", "")}


def _timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# -------------------------------------------------------------------------------------------------- output
SHOW = ("mAP", "R@1", "LocScore", "top1")


def format_table(results: dict[str, dict[str, dict[int, dict[str, float]]]]) -> str:
    """Markdown: one row per method; per set the metric that matters per level."""
    cols: list[tuple[str, str]] = []
    for name in results:
        if name == "crops":
            cols.append((name, "top1"))
        else:
            cols += [(name, "mAP"), (name, "R@1")]
            if name == "composite":
                cols.append((name, "LocScore"))
    def levels(name: str) -> str:
        return "/".join(f"L{lv}" for lv in sorted(next(iter(results[name].values()))))

    header = "| method | " + " | ".join(f"{s} {m} {levels(s)}" for s, m in cols) + " |"
    lines = [header, "|" + "---|" * (len(cols) + 1)]
    # every method of any set (a set may skip some, e.g. one it is too small for), first-seen order
    for method in dict.fromkeys(name for per_set in results.values() for name in per_set):
        cells = []
        for s, m in cols:
            if method not in results[s]:
                cells.append("-")
                continue
            vals = [results[s][method][lv][m] for lv in sorted(results[s][method])]
            if m == "top1":
                cells.append("/".join(str(int(v)) for v in vals))
            else:
                cells.append("/".join("n/a" if math.isnan(v) else f"{v:.3f}" for v in vals))
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_json(path: Path, header: dict, results: dict) -> None:
    """Header fields, then one line per (set, method) with the per-level summaries (no per-query APs), rounded."""
    lines = [f" {json.dumps(k)}: {json.dumps(v)}" for k, v in header.items()]
    rows = [f"  {json.dumps(name + ' / ' + m)}: " + json.dumps(
        {f"L{lv}": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items() if k != "ap"}
         for lv, r in by_level.items()}) for name, per_set in results.items() for m, by_level in per_set.items()]
    path.write_text("{\n" + ",\n".join(lines + [' "results": {\n' + ",\n".join(rows) + "\n }"]) + "\n}\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", default="crops,grocery,composite")
    ap.add_argument("--grocery", type=Path, default=ROOT.parent / "shared" / "data" / "grocery")
    ap.add_argument("--grocery-splits", default="val")
    ap.add_argument("--photos", type=Path, default=ROOT / "data" / "photos")
    ap.add_argument("--crops-per-photo", type=int, default=3)
    ap.add_argument("--composite", default="20,4,60", help="OBJECTS,POSITIVES,DISTRACTORS")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backbone", default="dinov2_vits14")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-level", type=int, default=MAX_LEVEL, choices=range(4),
                    help="finest level encoded and evaluated (cached L3 entries serve any level)")
    ap.add_argument("--encode-only", action="store_true")
    ap.add_argument("--no-timing", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    def log(msg: str) -> None:
        print(msg, flush=True)

    enc = Encoder(args.backbone, args.threads)
    log(f"backbone {enc.backbone.name} [{enc.backbone.weights}] on {enc.backbone.provider}, {args.threads} thread(s)")
    sets = encode_sets(enc, args.sets.split(","), grocery=args.grocery, grocery_splits=args.grocery_splits.split(","),
                       photos=args.photos, composite=args.composite, crops_per_photo=args.crops_per_photo,
                       seed=args.seed, max_level=args.max_level, log=log)
    log(f"encoded {enc.encoded_patches} new patches/queries in {enc.seconds:.0f} s")
    if args.encode_only:
        return 0

    results = {}
    for name, data in sets.items():
        rest = [d.vectors for n, d in sets.items() if n != name]
        results[name] = run_all(data, np.concatenate(rest) if rest else None)
    for name, data in sets.items():
        log(f"{name}: {data.n_images} database images, {len(data.vectors)} L3 patches, {len(data.queries)} queries")
    log(format_table(results))
    log("")
    log(paired(results, (2, 3) if args.max_level == 3 else (max(0, args.max_level - 1), args.max_level)))
    timing = None if args.no_timing else time_whitening()
    if timing:
        log(f"whitening 64 queries: {timing['whiten_64_queries_ms']:.2f} ms; flat search of 64 queries over "
            f"{timing['n_patches']:,} patches (matmul + max per image): {timing['flat_search_64_queries_ms']:.0f} ms "
            f"(ratio {timing['ratio']:.2e})")
    if args.json:
        write_json(args.json, {"machine": f"{platform.platform()}, {os.cpu_count()} cpus",
                               "args": {k: str(v) for k, v in vars(args).items()}, "timing": timing}, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
