"""INSTRE loader (Wang & Jiang, 2015) for the layout the archive unpacks to:

    root/
      INSTRE-S1/<class>/001.jpg, 001.txt, 002.jpg, 002.txt, ...
      INSTRE-S2/<class>/...
      INSTRE-M/<class>/...          (two objects per image: one box line per object)

Each NNN.txt holds "x y w h" lines (one per annotated object). INSTRE ships no query list, so the protocol is
explicit here: in every class folder the first `queries_per_class` images (sorted by name) are queries and the
rest are the database; a query's positives are the database images of its class, with the class folder's boxes
as ground truth. (Papers that use the `gnd_instre` file of Iscen et al. should convert it to the revisited
pickle format and use `load_revisited`.)
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .base import Box, RetrievalDataset, list_images, read_xywh_boxes

SUBSETS = ("INSTRE-S1", "INSTRE-S2", "INSTRE-M")


def load_instre(root: str | Path, *, subsets: Sequence[str] = SUBSETS, queries_per_class: int = 5
                ) -> RetrievalDataset:
    root = Path(root)
    present = [s for s in subsets if (root / s).is_dir()]
    if not present:
        raise FileNotFoundError(f"{root}: none of the INSTRE folders {list(subsets)}")
    if queries_per_class < 1:
        raise ValueError("queries_per_class must be >= 1")
    database: list[Path] = []
    queries: list[Path] = []
    query_boxes: list[Box | None] = []
    classes: list[tuple[str, list[int]]] = []
    db_boxes: list[list[Box]] = []
    for subset in present:
        for cls in sorted(p for p in (root / subset).iterdir() if p.is_dir()):
            images = list_images(cls)
            if len(images) <= queries_per_class:
                continue  # a class needs at least one database image
            q_imgs, d_imgs = images[:queries_per_class], images[queries_per_class:]
            first = len(database)
            database += d_imgs
            db_boxes += [read_xywh_boxes(p.with_suffix(".txt")) for p in d_imgs]
            members = list(range(first, len(database)))
            for q in q_imgs:
                qb = read_xywh_boxes(q.with_suffix(".txt"))
                queries.append(q)
                query_boxes.append(qb[0] if qb else None)
                classes.append((f"{subset}/{cls.name}", members))
    positives = [m for _, m in classes]
    boxes = [{i: db_boxes[i] for i in m if db_boxes[i]} for m in positives]
    return RetrievalDataset("instre", root, database, queries, positives, boxes=boxes, query_boxes=query_boxes,
                            info={"subsets": present, "queries_per_class": queries_per_class,
                                  "query_classes": [c for c, _ in classes]})
