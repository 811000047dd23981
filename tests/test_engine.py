"""The Patchify engine end to end with a fast deterministic encoder (see conftest.ThumbnailBackbone)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from patchify import Patchify
from patchify.images import load_rgb
from patchify.storage import IndexFormatError


def _cell_crop(path: Path, grid: int, row: int, col: int) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    pixels = load_rgb(path)
    h, w = pixels.shape[:2]
    box = (col * w // grid, row * h // grid, (col + 1) * w // grid, (row + 1) * h // grid)
    return np.ascontiguousarray(pixels[box[1]:box[3], box[0]:box[2]]), box


@pytest.fixture
def engine(thumbnail_backbone, photos) -> Patchify:
    engine = Patchify(backbone=thumbnail_backbone, levels=2)
    report = engine.add_images(photos[:8])
    assert report.n_images == 8 and not report.skipped
    return engine


def test_crop_finds_its_source_and_place(engine, photos):
    crop, box = _cell_crop(photos[3], grid=3, row=1, col=2)
    hits = engine.search(crop, k=5)
    assert hits[0].image_id == 3 and hits[0].path == str(photos[3])
    assert hits[0].box == box and hits[0].level == 2 and hits[0].grid == 3 and hits[0].cell == 5
    assert hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert [h.rank for h in hits] == list(range(5))
    assert all(a.score >= b.score for a, b in zip(hits, hits[1:]))


def test_patch_counts_per_level(thumbnail_backbone, photos):
    for levels, per_image in [(0, 1), (1, 5), (2, 14), (3, 30), ([1, 3], 10)]:
        engine = Patchify(backbone=thumbnail_backbone, levels=levels)
        report = engine.add_images(photos[:2])
        assert report.n_patches == engine.n_patches == 2 * per_image


def test_add_report_times_each_stage(thumbnail_backbone, photos):
    engine = Patchify(backbone=thumbnail_backbone, levels=2, batch_size=16)  # several chunks: prefetch overlaps
    report = engine.add_images(photos[:6])
    stages = ("decode", "tile", "encode", "index")
    assert set(stages) <= set(report.timings) and "decode_cpu" in report.timings
    assert all(report.timings[name] >= 0.0 for name in report.timings)
    assert report.timings["decode_cpu"] > 0.0 and report.timings["encode"] > 0.0 and report.timings["index"] > 0.0
    # Main-thread wall-clock stages cannot add up to more than the whole call (slack for timer granularity).
    assert sum(report.timings[name] for name in stages) <= report.seconds + 1e-3


def test_bad_files_are_skipped_with_reasons_and_nothing_else_is_lost(thumbnail_backbone, photos, tmp_path):
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(photos[0].read_bytes()[:1500])
    text = tmp_path / "readme.txt"
    text.write_text("hello")
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (1, 1)).save(tiny)
    sources = [photos[0], truncated, photos[1], text, tmp_path / "missing.jpg", tiny, photos[2]]
    engine = Patchify(backbone=thumbnail_backbone, levels=2, batch_size=64)
    report = engine.add_images(sources)
    assert report.n_images == 3 and report.n_patches == 3 * 14
    assert [engine.images[i]["path"] for i in report.image_ids] == [str(p) for p in (photos[0], photos[1], photos[2])]
    reasons = {s.source: s.reason for s in report.skipped}
    assert set(reasons) == {str(truncated), str(text), str(tmp_path / "missing.jpg"), str(tiny)}
    assert "truncated" in reasons[str(truncated)]
    assert "not a recognised image" in reasons[str(text)]
    assert "not found" in reasons[str(tmp_path / "missing.jpg")]
    assert "1x1" in reasons[str(tiny)] or "small" in reasons[str(tiny)]
    assert str(truncated) in str(report)


def test_search_batch_matches_single_searches(engine, photos):
    queries = [_cell_crop(photos[i], 2, 0, 1)[0] for i in (0, 5, 7)]
    batch = engine.search_batch(queries, k=3)
    for query, hits in zip(queries, batch):
        assert [(h.image_id, h.patch_id) for h in hits] == [(h.image_id, h.patch_id) for h in engine.search(query, k=3)]


def test_search_by_vector_and_bad_queries(engine, photos):
    vector = engine.embed_query(photos[4])
    assert vector.shape == (192,) and np.isclose(np.linalg.norm(vector), 1.0)
    assert engine.search(vector * 7.0, k=1)[0].image_id == 4  # vectors are normalised first
    with pytest.raises(ValueError, match="dimensions"):
        engine.search(np.ones(10, np.float32))
    with pytest.raises(ValueError, match="zero"):
        engine.search(np.zeros(192, np.float32))
    with pytest.raises(ValueError, match="k must be"):
        engine.search(vector, k=0)
    with pytest.raises(ValueError, match="not found"):
        engine.search("/no/such/query.jpg")


def test_k_larger_than_collection(engine, photos):
    hits = engine.search(photos[1], k=50)
    assert len(hits) == 8 and len({h.image_id for h in hits}) == 8


def test_empty_engine_refuses_to_search(thumbnail_backbone):
    with pytest.raises(ValueError, match="empty"):
        Patchify(backbone=thumbnail_backbone).search(np.ones(192, np.float32))


def test_remove_images(engine, photos):
    crop, _ = _cell_crop(photos[3], 2, 1, 1)
    assert engine.search(crop, k=1)[0].image_id == 3
    removed = engine.remove_images([3])
    assert removed == 14 and engine.n_images == 7
    assert all(h.image_id != 3 for h in engine.search(crop, k=10))
    with pytest.raises(ValueError, match="not in the index"):
        engine.remove_images([3])


def test_save_load_round_trip(engine, photos, tmp_path, thumbnail_backbone):
    crop, _ = _cell_crop(photos[6], 3, 2, 0)
    before = engine.search(crop, k=4)
    out = engine.save(tmp_path / "index")
    assert (out / "manifest.json").is_file()
    loaded = Patchify.load(out, backbone=thumbnail_backbone)
    assert loaded.grids == engine.grids and loaded.n_images == 8
    assert loaded.search(crop, k=4) == before
    # saving again over an existing index replaces it atomically and leaves no temp folders
    engine.add_images(photos[8:10])
    engine.save(out)
    assert Patchify.load(out, backbone=thumbnail_backbone).n_images == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]


def test_load_errors_are_clear(engine, tmp_path, thumbnail_backbone):
    out = engine.save(tmp_path / "index")
    manifest = json.loads((out / "manifest.json").read_text())

    with pytest.raises(IndexFormatError, match="manifest.json missing"):
        Patchify.load(tmp_path)
    manifest["format_version"] = 99
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IndexFormatError, match="version 99 .*upgrade patchify"):
        Patchify.load(out)

    manifest["format_version"] = 1
    manifest["n_patches"] = 5
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IndexFormatError, match="patches.npz"):
        Patchify.load(out, backbone=thumbnail_backbone)


def test_backbone_mismatch_is_refused(engine, tmp_path, thumbnail_backbone):
    out = engine.save(tmp_path / "index")
    other = type(thumbnail_backbone)(input_size=64)
    with pytest.raises(ValueError, match="backbone mismatch.*input_size"):
        Patchify.load(out, backbone=other)


def test_refuses_to_overwrite_a_folder_that_is_not_an_index(engine, tmp_path):
    precious = tmp_path / "photos"
    precious.mkdir()
    (precious / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(IndexFormatError, match="not a Patchify index"):
        engine.save(precious)
    assert (precious / "holiday.jpg").read_bytes() == b"x"


def test_embedding_cache_serves_coarser_levels(thumbnail_backbone, photos, tmp_path):
    fine = Patchify(backbone=thumbnail_backbone, levels=3, embedding_cache=tmp_path / "cache")
    assert fine.add_images(photos[:4]).from_cache == 0
    calls = thumbnail_backbone.calls
    coarse = Patchify(backbone=thumbnail_backbone, levels=1, embedding_cache=tmp_path / "cache")
    report = coarse.add_images(photos[:4])
    assert report.from_cache == 4 and thumbnail_backbone.calls == calls
    fresh = Patchify(backbone=thumbnail_backbone, levels=1)
    fresh.add_images(photos[:4])
    query = photos[2]
    hits = [(h.image_id, h.box) for h in coarse.search(query, k=4)]
    assert hits == [(h.image_id, h.box) for h in fresh.search(query, k=4)]


def _small_collection(photos) -> list[np.ndarray]:
    """The photos at a quarter size and their mirror images: 40 images, 1200 patches at L3 (enough for a small PQ)."""
    from PIL import Image

    images = [np.asarray(Image.open(p).convert("RGB").reduce(4)) for p in photos]
    return images + [np.ascontiguousarray(img[:, ::-1]) for img in images]


@pytest.mark.parametrize("source", ["all", "salient", "gt-aligned"])
def test_ivfpq_engine_finds_the_crop_and_survives_save_load(thumbnail_backbone, photos, tmp_path, source):
    images = _small_collection(photos)
    target = 8  # fruits.jpg
    height, width = images[target].shape[:2]
    # Exactly the top-right L1 cell: its patch vector is in the index, so even 4-bit PQ must rank it first.
    crop = np.ascontiguousarray(images[target][: height // 2, width // 2:])
    given = None
    if source == "gt-aligned":
        helper = Patchify(backbone=thumbnail_backbone, levels=0)
        given = helper.embed_queries([np.ascontiguousarray(img[: img.shape[0] // 2, : img.shape[1] // 2])
                                      for img in images])
    engine = Patchify(backbone=thumbnail_backbone, levels=3, index="ivfpq", nlist=4, m=48, nbits=4, nprobe=4,
                      training_source=source, training_vectors=given)
    report = engine.add_images(images)
    assert report.n_patches == 40 * 30 and engine.index.kind == "ivfpq"
    hits = engine.search(crop, k=5)
    assert hits[0].image_id == target and hits[0].box == (width // 2, 0, width, height // 2)
    engine.save(tmp_path / "ivfpq")
    loaded = Patchify.load(tmp_path / "ivfpq", backbone=thumbnail_backbone)
    again = loaded.search(crop, k=5)
    assert [(h.image_id, h.box) for h in again] == [(h.image_id, h.box) for h in hits]
    assert [h.score for h in again] == pytest.approx([h.score for h in hits], abs=1e-6)


def test_ivfpq_training_needs_enough_vectors_and_a_known_source(thumbnail_backbone, photos):
    with pytest.raises(ValueError, match="training_source"):
        Patchify(backbone=thumbnail_backbone, index="ivfpq", training_source="everything")
    with pytest.raises(ValueError, match="training_vectors"):
        Patchify(backbone=thumbnail_backbone, index="ivfpq", training_source="gt-aligned").add_images(photos[:1])
    engine = Patchify(backbone=thumbnail_backbone, levels=0, index="ivfpq", m=8, nbits=8)
    with pytest.raises(ValueError, match="at least"):
        engine.add_images(photos[:3])
