"""GroceryStore loader (Klasson, Zhang & Kjellstrom, WACV 2019) for the layout of the dataset's repository:

    root/
      classes.csv                 header + one row per class: name, class id, coarse name, coarse id,
                                  iconic image path, description path (paths start with /iconic-images-...)
      train.txt, val.txt, ...     one row per photo: "<split>/<...>/<product>/<file>.jpg, fine id, coarse id"
      train/<...>/<product>/*.jpg store photos (e.g. train/Packages/Juice/Bravo-Apple-Juice/...)
      iconic-images-and-descriptions/<...>/<product>/<product>_Iconic.jpg   one studio photo per class

Protocol (instance retrieval with a clean query and a cluttered database, like ILIAS): the database is the
store photos of the chosen split(s), listed by their `<split>.txt`; there is one query per class present in
that database, its iconic photo; a query's positives are the photos with its fine label. Classes of
classes.csv that have no photo in the chosen splits (e.g. the fruit and vegetables of a packages-only copy)
get no query.

The dataset has no boxes, so LocScore is undefined on it: `RetrievalDataset.boxes` stays empty and
`metrics.evaluate_rankings` reports LocScore as nan (not 0); `info["locscore"]` says why.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

from ..errors import PatchifyError
from .base import RetrievalDataset

CLASSES_FILE = "classes.csv"
LOCSCORE_NOTE = "undefined: GroceryStore has no boxes (LocScore is nan)"


class GroceryLayoutError(PatchifyError, FileNotFoundError):
    """The folder is not in the GroceryStore layout (a file or folder is missing or malformed); the message names
    it. A FileNotFoundError, like the other loaders' layout errors."""


def _read_classes(root: Path) -> dict[int, tuple[str, str, str]]:
    """class id -> (class name, coarse name, iconic path relative to root)."""
    path = root / CLASSES_FILE
    if not path.is_file():
        raise GroceryLayoutError(f"{root}: no {CLASSES_FILE} (GroceryStore layout: {CLASSES_FILE}, <split>.txt, "
                                 f"<split>/..., iconic-images-and-descriptions/...)")
    classes: dict[int, tuple[str, str, str]] = {}
    with open(path, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
    for n, row in enumerate(rows[1:], start=2):  # row 1 is the header
        try:
            name, class_id, coarse, _coarse_id, iconic = (c.strip() for c in row[:5])
            classes[int(class_id)] = (name, coarse, iconic.lstrip("/"))
        except ValueError:
            raise GroceryLayoutError(f"{path}, line {n}: expected 'name, class id, coarse name, coarse id, "
                                     f"iconic path, ...', got {row!r}") from None
    if not classes:
        raise GroceryLayoutError(f"{path}: no classes")
    return classes


def _read_split(root: Path, split: str) -> list[tuple[Path, int]]:
    """(photo path, fine label) of every row of <split>.txt, in file order."""
    folder, listing = root / split, root / f"{split}.txt"
    if not folder.is_dir():
        raise GroceryLayoutError(f"{folder}: no such folder (split {split!r} of the GroceryStore layout)")
    if not listing.is_file():
        raise GroceryLayoutError(f"{listing}: missing; it lists the photos of {folder} as "
                                 f"'{split}/<...>/<product>/<file>.jpg, fine label, coarse label' rows")
    rows: list[tuple[Path, int]] = []
    for n, line in enumerate(listing.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        cells = [c.strip() for c in line.split(",")]
        try:
            rows.append((root / cells[0], int(cells[1])))
        except (IndexError, ValueError):
            raise GroceryLayoutError(f"{listing}, line {n}: expected 'path, fine label, coarse label', "
                                     f"got {line!r}") from None
    if not rows:
        raise GroceryLayoutError(f"{listing}: no photos listed")
    missing = [p for p, _ in rows if not p.is_file()]
    if missing:
        raise GroceryLayoutError(f"{listing}: {len(missing)} listed photos are missing, e.g. {missing[0]}")
    return rows


def load_grocery(root: str | Path, splits: str | Sequence[str] = "val") -> RetrievalDataset:
    """GroceryStore as an instance-retrieval benchmark: database = the photos of `splits` ("train", "val",
    ("train", "val"), ...), queries = the iconic photos of the classes present, positives = same fine label.

    Raises GroceryLayoutError (a FileNotFoundError) naming the file or folder when the layout is wrong."""
    root = Path(root)
    if not root.is_dir():
        raise GroceryLayoutError(f"{root}: no such folder (GroceryStore dataset root)")
    split_list = [splits] if isinstance(splits, str) else list(splits)
    if not split_list or len(set(split_list)) != len(split_list):
        raise ValueError(f"splits must name one or more distinct splits, got {splits!r}")
    classes = _read_classes(root)

    database: list[Path] = []
    labels: list[int] = []
    for split in split_list:
        for path, label in _read_split(root, split):
            if label not in classes:
                raise GroceryLayoutError(f"{root / (split + '.txt')}: fine label {label} of {path.name} is not in "
                                         f"{root / CLASSES_FILE}")
            database.append(path)
            labels.append(label)

    queries: list[Path] = []
    positives: list[list[int]] = []
    names: list[str] = []
    coarse: list[str] = []
    present = sorted(set(labels))
    for label in present:
        name, coarse_name, iconic = classes[label]
        query = root / iconic
        if not query.is_file():
            raise GroceryLayoutError(f"{query}: iconic photo of class {label} ({name}) is missing "
                                     f"(path from {root / CLASSES_FILE})")
        queries.append(query)
        positives.append([i for i, lab in enumerate(labels) if lab == label])
        names.append(name)
        coarse.append(coarse_name)
    return RetrievalDataset(
        "grocery", root, database, queries, positives,
        info={"splits": split_list, "query_classes": names, "query_labels": present, "query_coarse": coarse,
              "database_labels": labels, "locscore": LOCSCORE_NOTE})
