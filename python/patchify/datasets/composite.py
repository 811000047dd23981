"""Composite instance-retrieval benchmark (INSTRE-like) built from real photos, deterministic by seed.

Objects are rectangles cut from the object-source photos (see `sources.py`) and pasted into crops of the
disjoint background-source photos at varied scale (box about 2-60 % of the image), position, rotation,
brightness/contrast, sometimes partly occluded; the ground-truth box is the exact bounding box of the object's
visible pixels. Each object has one query: a view of the object that differs from every pasted copy (its own
crop margin, taken from the original photo with its real surroundings, its own scale and brightness, no
rotation). Distractors are random crops / flips / colour changes of the background photos, which never
contain an object.

Every image is drawn from its own generator seeded by (seed, kind, index), so the output does not depend on
the order or threads it is made in: the same seed gives byte-identical files.
"""
from __future__ import annotations

import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from .base import RetrievalDataset
from .sources import BACKGROUND_SOURCES, OBJECT_SOURCES, load_sources

FORMAT = "patchify-composite"
VERSION = 1
AREA_RANGE = (0.02, 0.60)  # box area / image area of a pasted object before occlusion
MAX_ROTATION = 30.0
JPEG_QUALITY = 90

README = """# Patchify composite instance benchmark

Made by `patchify.datasets.build_composite_benchmark` (seed {seed}); load with
`patchify.datasets.load_composite(this_folder)`.

    images/NNNNN.jpg   database: {n_db} images of {width}x{height} ({n_pos} contain one pasted object,
                       {n_dist} distractors contain none); names are shuffled and reveal nothing
    queries/qNNN.jpg   one query per object ({n_q}): the object with its own margin, scale and brightness
    groundtruth.json   everything below, machine-readable

groundtruth.json:
  "objects":  [{{"id", "source" (photo it was cut from), "source_box" [x0, y0, x1, y1]}}]
  "database": [{{"file", "object" (id or null), "box" [x0, y0, x1, y1] or null (visible pixels: the
                ground truth), "object_box" (the whole pasted object, before occlusion), "area_fraction"
                (object_box area / image area), "rotation" (degrees), "occluded" (bool), "occluded_fraction"
                (share of the object's pixels hidden), "background" (source photo)}}]
  "queries":  [{{"file", "object", "box" (object in the query image), "positives" (database indices)}}]
Boxes are pixels, exclusive max.

Sources: {sources}
"""


def _size(image_size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(image_size, int):
        return image_size, image_size * 3 // 4
    w, h = image_size
    return int(w), int(h)


def _rng(seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, *stream])


def _pick_objects(sources: dict[str, Image.Image], n_objects: int, seed: int) -> list[dict[str, Any]]:
    """Non-overlapping, textured rectangles, sources visited round-robin in a seeded order."""
    rng = _rng(seed, 0)
    names = [list(sources)[i] for i in rng.permutation(len(sources))]
    taken: dict[str, list[tuple[int, int, int, int]]] = {n: [] for n in names}
    objects: list[dict[str, Any]] = []
    for i in range(n_objects * 20):
        if len(objects) == n_objects:
            break
        name = names[i % len(names)]
        img = sources[name]
        W, H = img.size
        for _ in range(40):
            w = int(rng.uniform(0.22, 0.45) * W)
            h = int(np.clip(w / math.exp(rng.uniform(math.log(0.67), math.log(1.5))), 0.2 * H, 0.55 * H))
            x0, y0 = int(rng.integers(0, W - w + 1)), int(rng.integers(0, H - h + 1))
            box = (x0, y0, x0 + w, y0 + h)
            if any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in taken[name]):
                continue
            if np.asarray(img.crop(box).convert("L"), dtype=np.float32).std() < 25:
                continue  # flat sky / wall: not a findable instance
            taken[name].append(box)
            objects.append({"id": len(objects), "source": name, "source_box": list(box)})
            break
    if len(objects) < n_objects:
        raise ValueError(f"could only place {len(objects)} distinct objects in {len(sources)} source photos")
    return objects


def _background(src: Image.Image, size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """Random crop (45-100 % of the largest crop of the output's aspect), flip and colour change."""
    W, H = size
    iw, ih = src.size
    cw = min(iw, ih * W / H) * rng.uniform(0.45, 1.0)
    ch = cw * H / W
    x0, y0 = rng.uniform(0, iw - cw), rng.uniform(0, ih - ch)
    img = src.resize((W, H), Image.Resampling.BILINEAR, box=(x0, y0, x0 + cw, y0 + ch))
    if rng.random() < 0.5:
        img = ImageOps.mirror(img)
    img = ImageEnhance.Color(img).enhance(rng.uniform(0.6, 1.4))
    return ImageEnhance.Brightness(img).enhance(rng.uniform(0.75, 1.25))


def _paste_object(canvas: Image.Image, obj_img: Image.Image, bg_src: Image.Image, rng: np.random.Generator
                  ) -> dict[str, Any]:
    """Pastes a transformed copy of obj_img into canvas (in place); returns its ground truth."""
    W, H = canvas.size
    obj = ImageEnhance.Brightness(obj_img).enhance(rng.uniform(0.65, 1.35))
    obj = ImageEnhance.Contrast(obj).enhance(rng.uniform(0.7, 1.3))
    angle = float(rng.uniform(-MAX_ROTATION, MAX_ROTATION)) if rng.random() < 0.7 else 0.0
    frac = math.exp(rng.uniform(math.log(AREA_RANGE[0]), math.log(AREA_RANGE[1])))
    w, h = obj.size
    c, s = abs(math.cos(math.radians(angle))), abs(math.sin(math.radians(angle)))
    bw, bh = w * c + h * s, w * s + h * c  # rotated bounding box at scale 1
    scale = min(math.sqrt(frac * W * H / (bw * bh)), 0.98 * W / bw, 0.98 * H / bh)
    obj = obj.resize((max(8, round(w * scale)), max(8, round(h * scale))), Image.Resampling.BICUBIC)
    rot = obj.convert("RGBA").rotate(angle, resample=Image.Resampling.BICUBIC, expand=True)
    rw, rh = rot.size
    x, y = int(rng.integers(0, max(1, W - rw + 1))), int(rng.integers(0, max(1, H - rh + 1)))
    canvas.paste(rot, (x, y), rot)
    visible = np.zeros((H, W), dtype=bool)
    alpha = np.asarray(rot.getchannel("A")) >= 128
    visible[y:y + rh, x:x + rw] = alpha[: H - y, : W - x]
    full = _mask_box(visible)
    n_full = int(visible.sum())
    occluded = bool(rng.random() < 0.35)
    if occluded:
        # A piece of a background photo covers a corner of the object: 20-45 % of its box per side, pushed up
        # to a quarter of its size inwards so that it also lands on a rotated object, not on its empty corner.
        bw_, bh_ = full[2] - full[0], full[3] - full[1]
        ow, oh = max(4, int(bw_ * rng.uniform(0.2, 0.45))), max(4, int(bh_ * rng.uniform(0.2, 0.45)))
        corner = int(rng.integers(0, 4))
        dx, dy = int(ow * rng.uniform(0, 0.25)), int(oh * rng.uniform(0, 0.25))
        ox = full[0] + dx if corner % 2 == 0 else full[2] - ow - dx
        oy = full[1] + dy if corner < 2 else full[3] - oh - dy
        canvas.paste(_background(bg_src, (ow, oh), rng), (ox, oy))
        visible[max(oy, 0):oy + oh, max(ox, 0):ox + ow] = False
    box = _mask_box(visible)
    hidden = round(1.0 - int(visible.sum()) / n_full, 4)
    return {"box": box, "object_box": full,
            "area_fraction": round((full[2] - full[0]) * (full[3] - full[1]) / (W * H), 6),
            "rotation": round(angle, 3), "occluded": occluded and hidden > 0, "occluded_fraction": hidden}


def _mask_box(mask: np.ndarray) -> list[int]:
    """Bounding box (x0, y0, x1, y1, exclusive max) of a non-empty boolean mask."""
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def _make_query(src: Image.Image, source_box: list[int], rng: np.random.Generator) -> tuple[Image.Image, list[int]]:
    """The object with its real surroundings (0-25 % margin), rescaled (longest side 224-448), re-lit."""
    x0, y0, x1, y1 = source_box
    w, h = x1 - x0, y1 - y0
    m = rng.uniform(0.0, 0.25, size=4)
    iw, ih = src.size
    cx0, cy0 = max(0, int(x0 - m[0] * w)), max(0, int(y0 - m[1] * h))
    cx1, cy1 = min(iw, int(x1 + m[2] * w)), min(ih, int(y1 + m[3] * h))
    scale = int(rng.integers(224, 449)) / max(cx1 - cx0, cy1 - cy0)
    size = (max(1, round((cx1 - cx0) * scale)), max(1, round((cy1 - cy0) * scale)))
    img = src.crop((cx0, cy0, cx1, cy1)).resize(size, Image.Resampling.BICUBIC)
    img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.8, 1.25))
    img = ImageEnhance.Contrast(img).enhance(rng.uniform(0.85, 1.15))
    box = [round((x0 - cx0) * scale), round((y0 - cy0) * scale), round((x1 - cx0) * scale), round((y1 - cy0) * scale)]
    box = [max(0, box[0]), max(0, box[1]), min(size[0], box[2]), min(size[1], box[3])]
    return img, box


def build_composite_benchmark(out_dir: str | os.PathLike, n_objects: int = 50, positives_per_object: int = 8,
                              n_distractors: int = 500, seed: int = 0,
                              image_size: int | tuple[int, int] = (512, 384), *, num_threads: int = 0
                              ) -> RetrievalDataset:
    """Writes the benchmark to out_dir (images/, queries/, groundtruth.json, README.md) and returns
    `load_composite(out_dir)`. image_size: (width, height) of database images, or an int width (4:3).
    num_threads: 0 = os.cpu_count() (the output does not depend on it)."""
    if n_objects < 1 or positives_per_object < 1 or n_distractors < 0:
        raise ValueError("need n_objects >= 1, positives_per_object >= 1, n_distractors >= 0")
    W, H = _size(image_size)
    if min(W, H) < 32:
        raise ValueError(f"image_size too small: {W}x{H}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "queries").mkdir(parents=True, exist_ok=True)
    obj_src, bg_src = load_sources(OBJECT_SOURCES), load_sources(BACKGROUND_SOURCES)
    bg_names = list(bg_src)
    objects = _pick_objects(obj_src, n_objects, seed)
    crops = [obj_src[o["source"]].crop(tuple(o["source_box"])) for o in objects]

    # Database entries in a seeded shuffled order: ("pos", object, k) or ("dist", d, 0).
    entries = [("pos", o, k) for o in range(n_objects) for k in range(positives_per_object)]
    entries += [("dist", d, 0) for d in range(n_distractors)]
    entries = [entries[i] for i in _rng(seed, 0, 1).permutation(len(entries))]

    def make_db(idx: int) -> dict[str, Any]:
        kind, a, k = entries[idx]
        rng = _rng(seed, 1, a, k) if kind == "pos" else _rng(seed, 2, a)
        bg = bg_names[int(rng.integers(len(bg_names)))]
        canvas = _background(bg_src[bg], (W, H), rng)
        rec: dict[str, Any] = {"file": f"images/{idx:05d}.jpg", "object": None, "box": None, "object_box": None,
                               "area_fraction": 0.0, "rotation": 0.0, "occluded": False, "occluded_fraction": 0.0,
                               "background": bg}
        if kind == "pos":
            occ_src = bg_src[bg_names[int(rng.integers(len(bg_names)))]]
            rec.update(_paste_object(canvas, crops[a], occ_src, rng), object=a)
        canvas.save(out / rec["file"], "JPEG", quality=JPEG_QUALITY)
        return rec

    def make_query(o: int) -> dict[str, Any]:
        img, box = _make_query(obj_src[objects[o]["source"]], objects[o]["source_box"], _rng(seed, 3, o))
        rec: dict[str, Any] = {"file": f"queries/q{o:03d}.jpg", "object": o, "box": box}
        img.save(out / rec["file"], "JPEG", quality=JPEG_QUALITY)
        return rec

    # Pillow releases the GIL in resize/rotate/encode, so threads help; results are order-independent.
    with ThreadPoolExecutor(max_workers=num_threads or os.cpu_count() or 1) as pool:
        database = list(pool.map(make_db, range(len(entries))))
        queries = list(pool.map(make_query, range(n_objects)))
    for q in queries:
        q["positives"] = [i for i, r in enumerate(database) if r["object"] == q["object"]]
    gt = {"format": FORMAT, "version": VERSION, "seed": seed, "image_size": [W, H],
          "area_range": list(AREA_RANGE), "object_sources": list(OBJECT_SOURCES),
          "background_sources": list(BACKGROUND_SOURCES), "objects": objects, "database": database,
          "queries": queries}
    (out / "groundtruth.json").write_text(json.dumps(gt, indent=1, sort_keys=True))
    (out / "README.md").write_text(README.format(
        seed=seed, n_db=len(database), width=W, height=H, n_pos=n_objects * positives_per_object,
        n_dist=n_distractors, n_q=n_objects, sources=", ".join(list(OBJECT_SOURCES) + list(BACKGROUND_SOURCES))))
    return load_composite(out)


def load_composite(directory: str | os.PathLike) -> RetrievalDataset:
    """Reads a folder written by `build_composite_benchmark`."""
    root = Path(directory)
    gt = json.loads((root / "groundtruth.json").read_text())
    if gt.get("format") != FORMAT:
        raise ValueError(f"{root}: not a {FORMAT} folder")
    db = gt["database"]
    queries = gt["queries"]
    return RetrievalDataset(
        "composite", root, [root / r["file"] for r in db], [root / q["file"] for q in queries],
        [list(q["positives"]) for q in queries],
        boxes=[{i: [tuple(db[i]["box"])] for i in q["positives"]} for q in queries],
        query_boxes=[tuple(q["box"]) for q in queries],
        info={"seed": gt["seed"], "image_size": tuple(gt["image_size"]), "objects": gt["objects"]})
