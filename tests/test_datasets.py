"""Composite benchmark (tiny builds) and the INSTRE / ILIAS / revisited / GroceryStore loaders on fixtures made in
their on-disk layouts."""
from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from patchify.datasets import (RetrievalDataset, build_composite_benchmark, load_composite, load_grocery,
                               load_ilias, load_instre, load_revisited)
from patchify.datasets.composite import AREA_RANGE
from patchify.datasets.sources import BACKGROUND_SOURCES, OBJECT_SOURCES

TINY = dict(n_objects=3, positives_per_object=2, n_distractors=4, image_size=(160, 120))


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> RetrievalDataset:
    return build_composite_benchmark(tmp_path_factory.mktemp("c") / "bench", seed=7, **TINY)


def test_composite_layout_and_counts(tiny):
    root = tiny.root
    assert (root / "README.md").is_file() and (root / "groundtruth.json").is_file()
    assert len(tiny.database) == 3 * 2 + 4 and len(tiny.queries) == 3
    assert all(p.is_file() and p.parent.name == "images" for p in tiny.database)
    assert all(p.is_file() and p.parent.name == "queries" for p in tiny.queries)
    assert [len(p) for p in tiny.positives] == [2, 2, 2]
    # every database image is a positive of at most one query; the rest are distractors
    flat = [i for p in tiny.positives for i in p]
    assert len(set(flat)) == 6
    gt = json.loads((root / "groundtruth.json").read_text())
    assert sum(r["object"] is None for r in gt["database"]) == 4


def test_composite_boxes_inside_images_and_areas_in_range(tiny):
    gt = json.loads((tiny.root / "groundtruth.json").read_text())
    for q, pos in enumerate(tiny.positives):
        for i in pos:
            (x0, y0, x1, y1), = tiny.boxes[q][i]
            w, h = Image.open(tiny.database[i]).size
            assert (w, h) == (160, 120)
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
            # the whole object's box is in the sampled area range (up to pixel rounding); the visible box
            # (ground truth) lies inside it
            rec = gt["database"][i]
            ox0, oy0, ox1, oy1 = rec["object_box"]
            assert ox0 <= x0 < x1 <= ox1 and oy0 <= y0 < y1 <= oy1
            frac = (ox1 - ox0) * (oy1 - oy0) / (w * h)
            assert frac == pytest.approx(rec["area_fraction"], abs=1e-5)
            assert AREA_RANGE[0] - 0.003 <= frac <= AREA_RANGE[1] + 0.003
            assert 0.0 <= rec["occluded_fraction"] <= 0.35
            assert rec["occluded"] or rec["occluded_fraction"] == 0.0
        qx0, qy0, qx1, qy1 = tiny.query_boxes[q]
        qw, qh = Image.open(tiny.queries[q]).size
        assert 0 <= qx0 < qx1 <= qw and 0 <= qy0 < qy1 <= qh
        assert (qx1 - qx0) * (qy1 - qy0) >= 0.4 * qw * qh  # the query is mostly the object


def test_composite_deterministic_by_seed(tiny, tmp_path):
    again = build_composite_benchmark(tmp_path / "again", seed=7, num_threads=1, **TINY)
    assert _digest(again.root) == _digest(tiny.root)  # identical bytes, thread count irrelevant
    assert again.boxes == tiny.boxes
    other = build_composite_benchmark(tmp_path / "other", seed=8, **TINY)
    assert _digest(other.root) != _digest(tiny.root)


def test_composite_roundtrip_and_groundtruth(tiny):
    loaded = load_composite(tiny.root)
    assert loaded.database == tiny.database and loaded.positives == tiny.positives
    gts = loaded.groundtruth()
    assert gts[0].positives == frozenset(loaded.positives[0]) and gts[0].has_boxes
    assert loaded.index_of(str(loaded.database[3])) == 3


def test_composite_objects_differ_from_distractor_sources():
    # The guarantee that distractors contain no object rests on these pools being disjoint.
    assert not set(v for v in OBJECT_SOURCES.values()) & set(v for v in BACKGROUND_SOURCES.values())


def test_composite_evaluate_with_fake_hits(tiny):
    class Hit:
        def __init__(self, path, score, box):
            self.path, self.score, self.box = str(path), score, box

    hits = []
    for q, pos in enumerate(tiny.positives):
        hits.append([Hit(tiny.database[i], 1.0 - 0.1 * r, tiny.boxes[q][i][0]) for r, i in enumerate(pos)])
    s = tiny.evaluate(hits).summary()
    assert s["mAP"] == 1.0 and s["LocScore"] == 1.0 and s["R@1"] == 1.0


def test_load_instre(tmp_path):
    root = tmp_path / "instre"
    for subset, cls, n in [("INSTRE-S1", "01a_book", 4), ("INSTRE-S1", "02a_cup", 3), ("INSTRE-M", "01_pair", 3)]:
        d = root / subset / cls
        d.mkdir(parents=True)
        for k in range(1, n + 1):
            Image.new("RGB", (40, 30), (k * 20, 0, 0)).save(d / f"{k:03d}.jpg")
            lines = "2 3 10 12\n" + ("20 5 8 8\n" if subset == "INSTRE-M" else "")
            (d / f"{k:03d}.txt").write_text(lines)
    ds = load_instre(root, queries_per_class=1)
    assert len(ds.queries) == 3 and len(ds.database) == 3 + 2 + 2
    assert ds.queries[0].name == "001.jpg" and ds.query_boxes[0] == (2, 3, 12, 15)
    assert ds.positives[0] == [0, 1, 2] and ds.positives[1] == [3, 4] and ds.positives[2] == [5, 6]
    assert ds.boxes[2][5] == [(2, 3, 12, 15), (20, 5, 28, 13)]  # INSTRE-M: both boxes
    assert ds.info["query_classes"][0] == "INSTRE-S1/01a_book"
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError):
        load_instre(tmp_path / "empty")


def test_load_ilias(tmp_path):
    root = tmp_path / "ilias_core"
    for o, name in enumerate(["bold_bimp_000", "zippy_zoot_001"]):
        (root / name / "query").mkdir(parents=True)
        (root / name / "pos").mkdir(parents=True)
        Image.new("RGB", (32, 32)).save(root / name / "query" / f"Q{o:03d}_00.jpg")
        (root / name / "query" / f"Q{o:03d}_00_bbox.txt").write_text("1 2 10 10\n")
        (root / name / "query" / f"T{o:03d}.txt").write_text("a text query")
        for z in range(2 + o):
            Image.new("RGB", (32, 32)).save(root / name / "pos" / f"P{o:03d}_{z:02d}.jpg")
            (root / name / "pos" / f"P{o:03d}_{z:02d}_bbox.txt").write_text("0 0 5 6\n4 4 2 2\n")
    yfcc = tmp_path / "yfcc"
    yfcc.mkdir()
    Image.new("RGB", (16, 16)).save(yfcc / "d0.jpg")
    ds = load_ilias(root, distractors=yfcc)
    assert [q.name for q in ds.queries] == ["Q000_00.jpg", "Q001_00.jpg"]
    assert ds.positives == [[0, 1], [2, 3, 4]] and len(ds.database) == 6
    assert ds.boxes[0][1] == [(0, 0, 5, 6), (4, 4, 6, 6)] and ds.query_boxes[1] == (1, 2, 11, 12)
    assert ds.info["n_distractors"] == 1


@pytest.mark.parametrize("protocol,pos,junk", [("easy", [0], [1, 2]), ("medium", [0, 1], [2]),
                                                ("hard", [1], [0, 2])])
def test_load_revisited(tmp_path, protocol, pos, junk):
    (tmp_path / "jpg").mkdir()
    gnd = {"imlist": ["all_souls_1", "all_souls_2", "radcliffe_3", "x_4"], "qimlist": ["all_souls_q"],
           "gnd": [{"bbx": [1.5, 2.0, 30.0, 40.0], "easy": [0], "hard": [1], "junk": [2]}]}
    with open(tmp_path / "gnd_roxford5k.pkl", "wb") as f:
        pickle.dump(gnd, f)
    ds = load_revisited(tmp_path, "roxford5k", protocol=protocol)
    assert ds.database[0] == tmp_path / "jpg" / "all_souls_1.jpg" and len(ds.database) == 4
    assert ds.queries == [tmp_path / "jpg" / "all_souls_q.jpg"]
    assert ds.positives == [pos] and ds.junk == [junk] and ds.query_boxes == [(1.5, 2.0, 30.0, 40.0)]
    ev = ds.evaluate([[type("H", (), {"path": str(ds.database[3]), "score": 1.0, "box": None})()]])
    assert ev.summary()["mAP"] == 0.0 and np.isnan(ev.summary()["LocScore"])


def test_engine_on_tiny_composite_end_to_end(tmp_path, thumbnail_backbone):
    """Engine hits -> dataset.evaluate -> summary and report: the pieces fit together."""
    from patchify import report

    # The engine needs modules (tiling, backbones) that land on other branches; skip until they are here.
    Patchify = pytest.importorskip("patchify.engine", reason="patchify.engine not importable yet").Patchify

    ds = build_composite_benchmark(tmp_path / "b", n_objects=2, positives_per_object=2, n_distractors=3, seed=1,
                                   image_size=(128, 96))
    engine = Patchify(backbone=thumbnail_backbone, level=2)
    engine.add_images([str(p) for p in ds.database])
    hits = engine.search_batch([str(q) for q in ds.queries], k=len(ds.database))
    ev = ds.evaluate(hits, map_k=5)
    s = ev.summary()
    assert set(s) >= {"mAP", "LocScore", "R@1", "R@5", "mAP@5"} and s["n_queries"] == 2
    assert 0.0 <= s["LocScore"] <= s["mAP"] <= 1.0
    gt = {str(ds.database[i]): b for i, b in ds.boxes[0].items()}
    out = report.save_report_html(tmp_path / "r.html", ds.queries[0], hits[0], groundtruth_boxes=gt, summary=s)
    assert "base64" in out.read_text()


GROCERY_TINY = Path(__file__).resolve().parent / "data" / "grocery_tiny"


def test_load_grocery_val():
    ds = load_grocery(GROCERY_TINY)  # default split: val
    assert ds.name == "grocery" and ds.info["splits"] == ["val"]
    assert [p.relative_to(GROCERY_TINY).as_posix() for p in ds.database] == [
        "val/Packages/Juice/Bravo-Apple-Juice/Bravo-Apple-Juice_001.jpg",
        "val/Packages/Oat-Milk/Oatly-Oat-Milk/Oatly-Oat-Milk_001.jpg"]
    # one query per product present in the split (Arla-Sour-Cream has no val photo; the fruit class none at all)
    assert [q.name for q in ds.queries] == ["Bravo-Apple-Juice_Iconic.jpg", "Oatly-Oat-Milk_Iconic.jpg"]
    assert all(q.is_file() for q in ds.queries)
    assert ds.positives == [[0], [1]] and ds.junk == [[], []]
    assert ds.info["query_classes"] == ["Bravo-Apple-Juice", "Oatly-Oat-Milk"] and ds.info["query_labels"] == [28, 45]
    assert ds.boxes == [{}, {}] and ds.query_boxes == [None, None]
    assert "no boxes" in ds.info["locscore"]


def test_load_grocery_several_splits():
    ds = load_grocery(GROCERY_TINY, splits=("train", "val"))
    assert len(ds.database) == 6 + 2 and len(ds.queries) == 3
    assert ds.database[0].parts[-5] == "train" and ds.database[6].parts[-5] == "val"
    assert ds.positives == [[0, 1, 6], [2, 3, 7], [4, 5]]
    assert ds.info["query_coarse"] == ["Juice", "Oat-Milk", "Sour-Cream"]
    assert load_grocery(GROCERY_TINY, "train").positives == [[0, 1], [2, 3], [4, 5]]
    with pytest.raises(ValueError, match="distinct"):
        load_grocery(GROCERY_TINY, splits=("val", "val"))


def test_grocery_metrics_without_boxes():
    """mAP and R@k work; LocScore is nan (undefined without boxes), not 0, and the eval table says n/a."""
    from patchify.evaluation import EvaluationRun, LevelResult

    ds = load_grocery(GROCERY_TINY, splits=("train", "val"))
    H = type("H", (), {})

    def hit(i, score):
        h = H()
        h.path, h.score, h.box = str(ds.database[i]), score, (0, 0, 10, 10)
        return h

    # query 0 (positives 0, 1, 6): ranks them 1st, 3rd and 4th; query 1 finds its first positive at rank 2
    order = [[0, 2, 1, 6, 3], [0, 2, 3, 7], [4, 5]]
    hits = [[hit(i, 1.0 - 0.1 * r) for r, i in enumerate(o)] for o in order]
    ev = ds.evaluate(hits, recall_ks=(1, 5))
    s = ev.summary()
    ap0 = (1 + 2 / 3 + 3 / 4) / 3
    ap1 = (1 / 2 + 2 / 3 + 3 / 4) / 3
    assert s["mAP"] == pytest.approx((ap0 + ap1 + 1.0) / 3)
    assert s["R@1"] == pytest.approx(2 / 3) and s["R@5"] == 1.0
    assert np.isnan(s["LocScore"]) and np.isnan(ev.loc_score).all()
    run = EvaluationRun("grocery", "b", "w", [LevelResult(0, "flat", ev, 8, 0, 0.0, 0.0)])
    table = run.table()
    assert "n/a" in table and "nan" not in table and "no ground-truth boxes" in table


@pytest.mark.parametrize("damage,match", [
    ("no_root", "no such folder"), ("no_split_folder", "val: no such folder"), ("no_listing", "val.txt: missing"),
    ("no_classes", "no classes.csv"), ("missing_photo", "listed photos are missing"),
    ("missing_iconic", "Oatly-Oat-Milk_Iconic.jpg: iconic photo"), ("bad_row", "val.txt, line 1"),
    ("unknown_label", "fine label 99"),
])
def test_load_grocery_layout_errors(tmp_path, damage, match):
    import shutil

    from patchify.errors import PatchifyError

    root = tmp_path / "grocery"
    shutil.copytree(GROCERY_TINY, root)
    if damage == "no_root":
        root = tmp_path / "nowhere"
    elif damage == "no_split_folder":
        shutil.rmtree(root / "val")
    elif damage == "no_listing":
        (root / "val.txt").unlink()
    elif damage == "no_classes":
        (root / "classes.csv").unlink()
    elif damage == "missing_photo":
        next((root / "val").rglob("*.jpg")).unlink()
    elif damage == "missing_iconic":
        next((root / "iconic-images-and-descriptions").rglob("Oatly-Oat-Milk_Iconic.jpg")).unlink()
    elif damage == "bad_row":
        (root / "val.txt").write_text("just-a-path.jpg\n")
    elif damage == "unknown_label":
        (root / "val.txt").write_text("val/Packages/Juice/Bravo-Apple-Juice/Bravo-Apple-Juice_001.jpg, 99, 19\n")
    with pytest.raises(FileNotFoundError, match=match) as info:
        load_grocery(root)
    assert isinstance(info.value, PatchifyError)


def test_grocery_eval_outputs_without_boxes(tmp_path):
    """`patchify eval`'s outputs (JSON, plots, HTML report) are written for a dataset without boxes."""
    pytest.importorskip("matplotlib")
    from patchify.evaluation import EvaluationRun, LevelResult, write_outputs

    ds = load_grocery(GROCERY_TINY, splits=("train", "val"))
    H = type("H", (), {})

    def hit(i, r):
        h = H()
        h.path, h.score, h.box = str(ds.database[i]), 1.0 - 0.1 * r, (0, 0, 24, 24)
        h.level, h.rank, h.image_id = 1, r, i
        return h

    hits = [[hit(i, r) for r, i in enumerate(range(len(ds.database)))] for _ in ds.queries]
    ev = ds.evaluate(hits)
    run = EvaluationRun("grocery", "b", "w", [LevelResult(lv, "flat", ev, 8, 0, 0.0, 0.0, hits) for lv in (0, 1)])
    written = write_outputs(run, tmp_path, ds)
    assert all(p.is_file() for p in written.values())
    data = json.loads(written["json"].read_text())
    assert np.isnan(data["results"][0]["summary"]["LocScore"]) and data["high_ap_low_locscore"] == {"flat_L1": []}
