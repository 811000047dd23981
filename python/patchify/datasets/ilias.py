"""ILIAS loader (Kordopatis-Zilos et al., CVPR 2025) for the `ilias_core` layout of the download script:

    ilias_core/<object_name>/query/Qxxx_yy.jpg, Qxxx_yy_bbox.txt, Txxx.txt (text query, ignored)
    ilias_core/<object_name>/pos/Pxxx_zz.jpg,   Pxxx_zz_bbox.txt

Bounding-box files hold "x y w h" lines (possibly several per image). Every image query is a query; the
database is all `pos` images (plus, optionally, a folder of distractor images, e.g. an extracted YFCC100M
shard); a query's positives are its object's `pos` images.
"""
from __future__ import annotations

from pathlib import Path

from .base import Box, RetrievalDataset, list_images, read_xywh_boxes


def _bbox_file(image: Path) -> Path:
    return image.with_name(image.stem + "_bbox.txt")


def load_ilias(root: str | Path, *, distractors: str | Path | None = None) -> RetrievalDataset:
    root = Path(root)
    objects = sorted(p for p in root.iterdir() if p.is_dir() and (p / "query").is_dir() and (p / "pos").is_dir())
    if not objects:
        raise FileNotFoundError(f"{root}: no <object>/query and <object>/pos folders (ILIAS core layout)")
    database: list[Path] = []
    queries: list[Path] = []
    query_boxes: list[Box | None] = []
    positives: list[list[int]] = []
    boxes: list[dict[int, list[Box]]] = []
    names: list[str] = []
    for obj in objects:
        pos = list_images(obj / "pos")
        first = len(database)
        database += pos
        members = list(range(first, len(database)))
        obj_boxes = {i: b for i, p in zip(members, pos, strict=True) if (b := read_xywh_boxes(_bbox_file(p)))}
        for q in list_images(obj / "query"):
            qb = read_xywh_boxes(_bbox_file(q))
            queries.append(q)
            query_boxes.append(qb[0] if qb else None)
            positives.append(members)
            boxes.append(obj_boxes)
            names.append(obj.name)
    n_distractors = 0
    if distractors is not None:
        extra = sorted(p for p in Path(distractors).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        database += extra
        n_distractors = len(extra)
    return RetrievalDataset("ilias", root, database, queries, positives, boxes=boxes, query_boxes=query_boxes,
                            info={"query_objects": names, "n_distractors": n_distractors})
