"""The Patchify engine end to end with a fast deterministic encoder (see conftest.ThumbnailBackbone)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from patchify import Patchify
from patchify.images import load_rgb
from patchify.errors import IndexFormatError


def _cell_crop(path: Path, grid: int, row: int, col: int) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    pixels = load_rgb(path)
    h, w = pixels.shape[:2]
    box = (col * w // grid, row * h // grid, (col + 1) * w // grid, (row + 1) * h // grid)
    return np.ascontiguousarray(pixels[box[1]:box[3], box[0]:box[2]]), box


@pytest.fixture
def engine(thumbnail_backbone, photos) -> Patchify:
    engine = Patchify(backbone=thumbnail_backbone, level=2)
    report = engine.add_images(photos[:8])
    assert report.n_images == 8 and not report.skipped
    return engine


def test_crop_finds_its_source_and_place(engine, photos):
    crop, box = _cell_crop(photos[3], grid=3, row=1, col=2)
    hits = engine.search(crop, k=5)
    assert hits[0].image_id == 3 and hits[0].path == str(photos[3])
    assert hits[0].box == box and hits[0].level == 2 and hits[0].grid == 3 and hits[0].cell == 5
    assert [h.rank for h in hits] == list(range(5))
    assert all(a.score >= b.score for a, b in zip(hits, hits[1:]))
    # The crop is exactly a patch: under the plain max (the paper's score) its similarity is 1, whitened or not.
    engine.global_weight = 0.0
    assert engine.search(crop, k=1)[0].score == pytest.approx(1.0, abs=1e-5)


def test_patch_counts_per_level(thumbnail_backbone, photos):
    for tiling, per_image in [({"level": 0}, 1), ({"level": 1}, 5), ({"level": 2}, 14), ({"level": 3}, 30),
                              ({"grids": [1, 3]}, 10), ({}, 14)]:
        engine = Patchify(backbone=thumbnail_backbone, **tiling)
        report = engine.add_images(photos[:2])
        assert report.n_patches == engine.n_patches == 2 * per_image


def test_add_report_times_each_stage(thumbnail_backbone, photos):
    engine = Patchify(backbone=thumbnail_backbone, level=2, batch_size=16)  # several chunks: prefetch overlaps
    report = engine.add_images(photos[:6])
    stages = ("decode", "tile", "encode", "index")
    assert set(stages) <= set(report.timings) and "decode_cpu" in report.timings
    assert all(report.timings[name] >= 0.0 for name in report.timings)
    assert report.timings["decode_cpu"] > 0.0 and report.timings["encode"] > 0.0 and report.timings["index"] > 0.0
    assert report.timings["tile_cpu"] > 0.0  # tiled by the workers, ahead of the encoder
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
    engine = Patchify(backbone=thumbnail_backbone, level=2, batch_size=64)
    report = engine.add_images(sources)
    assert report.n_images == 3 and report.n_patches == 3 * 14
    assert [engine.images[i].name for i in report.image_ids] == [str(p) for p in (photos[0], photos[1], photos[2])]
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

    manifest["format_version"] = 2
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
    fine = Patchify(backbone=thumbnail_backbone, level=3, embedding_cache=tmp_path / "cache")
    assert fine.add_images(photos[:4]).from_cache == 0
    calls = thumbnail_backbone.calls
    coarse = Patchify(backbone=thumbnail_backbone, level=1, embedding_cache=tmp_path / "cache")
    report = coarse.add_images(photos[:4])
    assert report.from_cache == 4 and thumbnail_backbone.calls == calls
    fresh = Patchify(backbone=thumbnail_backbone, level=1)
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
        helper = Patchify(backbone=thumbnail_backbone, level=0)
        given = helper.embed_queries([np.ascontiguousarray(img[: img.shape[0] // 2, : img.shape[1] // 2])
                                      for img in images])
    engine = Patchify(backbone=thumbnail_backbone, level=3, index="ivfpq", nlist=4, m=48, nbits=4, nprobe=4,
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
    engine = Patchify(backbone=thumbnail_backbone, level=0, index="ivfpq", m=8, nbits=8)
    engine.add_images(photos[:3])  # 3 patches of 9,984 needed to train: held and searched exactly meanwhile
    assert engine.exact_until_trained == 9984 and engine.search(photos[1], k=1)[0].image_id == 1


# ---------------------------------------------------------------------------------------------- the redesign's seams
def test_changed_nprobe_survives_save_and_load(thumbnail_backbone, photos, tmp_path):
    engine = Patchify(backbone=thumbnail_backbone, level=3, index="ivfpq", nlist=4, m=8, nbits=4, nprobe=2)
    engine.add_images(_small_collection(photos))
    engine.index.nprobe = 4  # a run-time setting, changed on the index itself
    assert engine.index_config.nprobe == 4
    out = engine.save(tmp_path / "index")
    assert json.loads((out / "manifest.json").read_text())["index"]["nprobe"] == 4
    loaded = Patchify.load(out, backbone=thumbnail_backbone)
    assert loaded.index.nprobe == 4 and loaded.index_config == engine.index_config


def test_add_embeddings_indexes_precomputed_vectors_like_add_images(thumbnail_backbone, photos):
    from patchify import AddReport, Encoder, TilingConfig

    # Raw vectors: this is about the plumbing (the whitening's learning set has its own tests)
    direct = Patchify(backbone=thumbnail_backbone, level=2, whitening="none")
    direct.add_images(photos[:5])
    encoder = Encoder(thumbnail_backbone, TilingConfig.for_level(3))  # finer than needed: keep the L0..L2 rows
    batches = list(encoder.encode_images(photos[:5], AddReport()))
    via = Patchify(backbone=thumbnail_backbone, level=2, whitening="none")
    for batch in batches:
        rows = np.isin(batch.patches.grid, via.grids)
        via.add_embeddings(batch.vectors[rows], batch.patches.select(rows), batch.images)
    assert via.n_images == 5 and via.n_patches == direct.n_patches == 5 * 14
    query = _cell_crop(photos[2], 3, 1, 1)[0]
    assert [(h.image_id, h.box, h.path) for h in via.search(query, k=5)] == \
        [(h.image_id, h.box, h.path) for h in direct.search(query, k=5)]
    with pytest.raises(ValueError, match="grids"):  # L3 rows into an L2 engine
        via.add_embeddings(batches[0].vectors, batches[0].patches, batches[0].images)
    assert via.n_images == 5  # nothing changed by the refused call


def test_add_images_takes_a_folder_or_one_path(thumbnail_backbone, photos, tmp_path):
    import shutil

    folder = tmp_path / "photos"
    folder.mkdir()
    for p in photos[:3]:
        shutil.copy(p, folder / p.name)
    engine = Patchify(backbone=thumbnail_backbone, level=1)
    assert engine.add_images(str(folder)).n_images == 3
    assert engine.add_images(folder / photos[0].name).n_images == 1
    assert engine.add_images(load_rgb(photos[1])).n_images == 1
    assert [image.name for image in engine.images[:3]] == sorted(str(folder / p.name) for p in photos[:3])
    with pytest.raises(ValueError, match="folder, an image or a list"):
        engine.add_images(42)  # type: ignore[arg-type]


def test_a_one_row_float_array_is_a_vector_and_k_is_checked(engine, photos):
    vector = engine.embed_query(photos[4])
    assert engine.search(vector[None, :], k=1)[0].image_id == 4
    with pytest.raises(ValueError, match="search_batch"):
        engine.search(np.stack([vector, vector]))
    for bad in ("5", None, 2.5):
        with pytest.raises(ValueError, match="k must be"):
            engine.search(vector, k=bad)  # type: ignore[arg-type]
    assert len(engine.search(vector, k=10**20)) == 8  # no more hits than images, and no huge allocation


def test_unknown_backbone_names_are_refused_at_construction():
    with pytest.raises(ValueError, match="unknown backbone 'no-such-net'"):
        Patchify(backbone="no-such-net")


def test_damaged_index_files_are_named(engine, tmp_path, thumbnail_backbone):
    out = engine.save(tmp_path / "index")
    patches = out / "patches.npz"
    patches.write_bytes(patches.read_bytes()[:100])  # truncated
    with pytest.raises(IndexFormatError, match="patches.npz: damaged"):
        Patchify.load(out, backbone=thumbnail_backbone)
    out = engine.save(tmp_path / "other")
    vectors = out / "flat_vectors.npy"
    data = bytearray(vectors.read_bytes())
    data[-1] ^= 0xFF  # same size, one bit pattern changed: only the checksum sees it
    vectors.write_bytes(bytes(data))
    Patchify.load(out, backbone=thumbnail_backbone)  # sizes are checked on every load (cheap)
    with pytest.raises(IndexFormatError, match="flat_vectors.npy: damaged"):
        Patchify.load(out, backbone=thumbnail_backbone, verify=True)


def test_search_needs_no_matplotlib_torch_or_timm(tmp_path):
    """`import patchify; Patchify.load(...).search(vector)`: only numpy, Pillow, faiss (and onnxruntime for
    images) are needed. The optional packages are made unimportable in a fresh interpreter."""
    import subprocess
    import sys

    from conftest import env_importing_tested_patchify

    fixture = Path(__file__).parent / "fixtures" / "indices" / "v2" / "ivfpq"
    script = f"""
import sys
BLOCKED = ("matplotlib", "torch", "timm", "torchvision", "skimage", "sklearn", "onnx")
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{{name}} is blocked in this test")
sys.meta_path.insert(0, Block())
import numpy as np
import patchify
engine = patchify.Patchify.load({str(fixture)!r})
hits = engine.search(np.ones(192, np.float32), k=3)
assert len(hits) == 3, hits
loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
print("ok", loaded)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env=env_importing_tested_patchify())
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "ok []"
