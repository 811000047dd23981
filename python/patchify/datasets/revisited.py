"""Revisited Oxford / Paris loader (Radenovic et al., CVPR 2018) for the revisitop layout:

    root/gnd_roxford5k.pkl   (or gnd_rparis6k.pkl)
    root/jpg/<name>.jpg      (database and query images share this folder)

The pickle is a dict: "imlist" (database names, no extension), "qimlist" (query names) and "gnd", one dict per
query with "bbx" (query box x0, y0, x1, y1), "easy", "hard", "junk" (indices into imlist). The protocols are
the revisitop ones: easy = positives easy, junk junk+hard; medium = positives easy+hard, junk junk;
hard = positives hard, junk junk+easy. There are no boxes in database images (LocScore is undefined).
"""
from __future__ import annotations

import pickle
from pathlib import Path

from .base import RetrievalDataset

PROTOCOLS = ("easy", "medium", "hard")


def load_revisited(root: str | Path, name: str = "roxford5k", *, protocol: str = "medium",
                   gnd_path: str | Path | None = None, images_dir: str | Path | None = None,
                   ext: str = ".jpg") -> RetrievalDataset:
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    root = Path(root)
    gnd_file = Path(gnd_path) if gnd_path is not None else root / f"gnd_{name}.pkl"
    with open(gnd_file, "rb") as f:
        cfg = pickle.load(f)
    images = Path(images_dir) if images_dir is not None else root / "jpg"
    positives: list[list[int]] = []
    junk: list[list[int]] = []
    query_boxes: list[tuple[float, float, float, float] | None] = []
    for g in cfg["gnd"]:
        easy, hard, jk = list(g.get("easy", [])), list(g.get("hard", [])), list(g.get("junk", []))
        if protocol == "easy":
            pos, jun = easy, jk + hard
        elif protocol == "medium":
            pos, jun = easy + hard, jk
        else:
            pos, jun = hard, jk + easy
        positives.append(sorted(int(i) for i in pos))
        junk.append(sorted(int(i) for i in jun))
        bbx = g.get("bbx")
        query_boxes.append((float(bbx[0]), float(bbx[1]), float(bbx[2]), float(bbx[3])) if bbx is not None else None)
    return RetrievalDataset(name, root, [images / f"{n}{ext}" for n in cfg["imlist"]],
                            [images / f"{n}{ext}" for n in cfg["qimlist"]], positives, junk=junk,
                            query_boxes=query_boxes, info={"protocol": protocol})
