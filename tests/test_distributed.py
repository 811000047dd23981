"""Sharded indexes (patchify.distributed): built in this process and on a local Ray cluster, their merged results
against one engine holding every image with the same shared training (the reference), bad files, resume, retry, CLI.
Thumbnail test encoder: no real backbone."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, ThumbnailBackbone, env_importing_tested_patchify
from patchify import Patchify, store
from patchify.cli import main
from patchify.config import index_config
from patchify.distributed import ShardedIndex, build_sharded_index, layout
from patchify.distributed.build import SharedTraining
from patchify.distributed.sharded import ShardCandidates, merge_candidates

LEVEL = 3  # 30 patches per image: the 20 photos give the 600 patches IVFPQ (nlist 2, 3 bits) trains on
SETTINGS = {
    "flat": ("flat", {}, "learned"),
    # Two-stage with the global + patch fusion; nprobe 1 of 2 lists and a shortlist of 4 (k 3) so that each shard's
    # shortlist differs from its share of the global one.
    "ivfpq-fused": ("ivfpq", dict(nlist=2, m=8, nbits=3, nprobe=1, rerank_shortlist=4), "learned"),
    "ivfpq-one-stage": ("ivfpq", dict(nlist=2, m=8, nbits=3, nprobe=2, rerank=None), "none"),
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, photos) -> list[str]:
    """The 20 photos with two bad files among them (a corrupt JPEG, a missing file)."""
    folder = tmp_path_factory.mktemp("inputs")
    corrupt = folder / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    paths = [str(p.absolute()) for p in photos]
    return paths[:5] + [str(corrupt)] + paths[5:13] + [str(folder / "missing.jpg")] + paths[13:]


def _build(inputs, directory, name, **options):
    kind, settings, whitening = SETTINGS[name]
    return build_sharded_index(inputs, directory, backbone=ThumbnailBackbone, level=LEVEL, index=kind,
                               whitening=whitening, shard_size=6, sample_images=len(inputs), **settings, **options)


def _reference(inputs, directory, name) -> tuple[Patchify, object]:
    """One engine adding every input, given the sharded build's shared whitening and training."""
    kind, settings, whitening = SETTINGS[name]
    shared = SharedTraining.load(Path(directory))
    engine = Patchify(ThumbnailBackbone(), level=LEVEL, index=index_config(kind, **settings),
                      whitening=shared.whitening if whitening == "learned" else "none")
    if shared.index is not None:
        engine.start_from_trained(shared.index.trained_copy())
    return engine, engine.add_images(inputs)


def _queries(engine: Patchify, inputs) -> np.ndarray:
    from PIL import Image

    crops = []
    for path in inputs[::4]:
        if Path(path).is_file() and not path.endswith("corrupt.jpg"):
            with Image.open(path) as img:
                w, h = img.size
                crops.append(np.asarray(img.convert("RGB").crop((w // 4, h // 4, 3 * w // 4, 3 * h // 4))))
    return engine.embed_queries(crops)


def _assert_same_results(single: Patchify, sharded: ShardedIndex, queries: np.ndarray) -> None:
    for k in (1, 3, 10, 100):
        expected, got = single.search_vectors(queries, k), sharded.search_vectors(queries, k)
        for want, have in zip(expected, got):
            np.testing.assert_array_equal(have, want)
    assert sharded.search_batch(list(queries), k=5) == single.search_batch(list(queries), k=5)


@pytest.fixture(scope="module", params=list(SETTINGS))
def built(request, inputs, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param) / "sharded"
    return request.param, directory, _build(inputs, directory, request.param)


def test_sharded_results_equal_one_engine_holding_every_image(built, inputs):
    name, directory, report = built
    single, single_report = _reference(inputs, directory, name)
    assert report.n_shards == 4 and report.shards_built == [0, 1, 2, 3] and report.learned
    # Same images under the same global ids, the same bad files skipped for the same reasons.
    assert report.report.image_ids == single_report.image_ids == list(range(20))
    assert report.report.skipped == single_report.skipped and len(report.report.skipped) == 2
    assert report.report.n_patches == single_report.n_patches == single.n_patches
    with ShardedIndex.load(directory, backbone=ThumbnailBackbone()) as sharded:
        assert (sharded.n_images, sharded.n_patches, sharded.n_shards) == (20, single.n_patches, 4)
        _assert_same_results(single, sharded, _queries(single, inputs))
        # An image query is encoded here, once, as the engine encodes it.
        assert sharded.search(inputs[2], k=4) == single.search(inputs[2], k=4)


def test_each_shard_is_a_normal_saved_index_holding_a_run_of_the_inputs(built, inputs):
    name, directory, _ = built
    manifest = layout.read_manifest(directory)
    held = []
    assert manifest["tiling"]["cell_sizing"] == "fixed"  # as done: the thumbnail backbone takes one input size
    for shard in manifest["shards"]:
        engine = Patchify.load(directory / shard["path"])
        assert engine.n_images == shard["n_images"]
        assert store.read_manifest(directory / shard["path"])["tiling"] == manifest["tiling"]
        held += [record.name for record in engine.images]
    assert held == [p for p in inputs if Path(p).is_file() and not p.endswith("corrupt.jpg")]
    # Shards of 6 inputs; shards 0 and 2 each hold a bad one.
    assert [s["first_image_id"] for s in manifest["shards"]] == [0, 5, 11, 16]


def test_the_merge_keeps_only_the_global_shortlist():
    """Two-stage IVFPQ: a single index re-ranks its best `shortlist` images by first-stage score; an image outside
    them must not win on its final score even though its own shard shortlisted it."""
    def part(first, final, ids):
        n = len(ids)
        return ShardCandidates(np.array([first], np.float32), np.array([final], np.float32), np.array([ids]),
                               np.array([ids]), np.zeros((1, n, 4), np.int32), np.ones((1, n), np.int16),
                               np.zeros((1, n), np.int16), [[f"img{i}" for i in ids]])

    parts = [part([0.9, 0.8], [0.5, 0.6], [0, 1]), part([0.85, 0.1], [0.95, 0.99], [2, 3])]
    merged = merge_candidates(parts, k=2, n_images=4, shortlist=2)
    assert merged.image_ids.tolist() == [[2, 0]] and [h.path for h in merged.hits[0]] == ["img2", "img0"]
    assert merge_candidates(parts, k=2, n_images=4, shortlist=None).image_ids.tolist() == [[3, 2]]


def test_a_rerun_resumes_keeping_the_complete_shards(inputs, tmp_path):
    directory = tmp_path / "sharded"
    _build(inputs, directory, "flat")
    before = layout.read_manifest(directory)
    layout.done_marker(directory, 2).unlink()  # as if the build had stopped while writing shard 2
    (directory / layout.MANIFEST).unlink()
    again = _build(inputs, directory, "flat")
    assert again.shards_built == [2] and again.shards_kept == [0, 1, 3] and not again.learned
    assert layout.read_manifest(directory)["shards"] == before["shards"]
    assert again.report.image_ids == list(range(20)) and len(again.report.skipped) == 2
    with pytest.raises(FileExistsError, match="other inputs or settings"):
        _build(inputs[:-1], directory, "flat")


def test_a_sample_too_small_to_train_is_refused_before_any_shard(inputs, tmp_path):
    with pytest.raises(ValueError, match="too small to train IVFPQ"):
        build_sharded_index(inputs, tmp_path / "s", backbone=ThumbnailBackbone, level=LEVEL, index="ivfpq",
                            nlist=2, m=8, nbits=3, sample_images=4)
    assert not (tmp_path / "s" / layout.SHARDS).exists()


def test_the_library_imports_and_builds_without_ray(inputs, tmp_path):
    """Ray is optional: blocked from importing, the package and the in-process build still work."""
    script = ("import sys; sys.modules['ray'] = None\n"
              "sys.path.insert(0, sys.argv[1])\n"
              "from conftest import ThumbnailBackbone\n"
              "import patchify, patchify.cli\n"
              "from patchify.distributed import build_sharded_index, ShardedIndex\n"
              "build_sharded_index(sys.argv[3:], sys.argv[2], backbone=ThumbnailBackbone, level=1, shard_size=3)\n"
              "print(ShardedIndex.load(sys.argv[2], backbone=ThumbnailBackbone()).n_images)\n")
    done = subprocess.run([sys.executable, "-c", script, str(ROOT / "tests"), str(tmp_path / "s"), *inputs[:7]],
                          env=env_importing_tested_patchify(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "6"


def test_cli_builds_describes_and_searches_a_sharded_index(inputs, tmp_path, monkeypatch, capsys):
    import patchify.backbones

    monkeypatch.setattr(patchify.backbones, "load_backbone", lambda name, **kwargs: ThumbnailBackbone())
    monkeypatch.setattr(patchify.backbones, "check_backbone_name", lambda name: None)
    folder = tmp_path / "images"
    folder.mkdir()
    for path in inputs[:8]:
        if Path(path).is_file():
            shutil.copy(path, folder)
    out = tmp_path / "sharded"
    assert main(["index", str(folder), "--out", str(out), "--shard-size", "3", "--level", "1", "--quiet"]) == 0
    text = capsys.readouterr()
    assert "into 3 shards (3 built now)" in text.out and "images/corrupt.jpg: corrupt or truncated image" in text.err
    assert main(["index", str(folder), "--out", str(out), "--shard-size", "3", "--level", "1", "--quiet"]) == 0
    assert "(0 built now, 3 kept from an earlier run)" in capsys.readouterr().out
    assert main(["info", str(out), "--verify"]) == 0
    text = capsys.readouterr().out
    assert "3 shards, 7 images, 35 patches" in text and "global ids 3..5" in text
    query = sorted(folder.glob("*.jpg"))[1]
    assert main(["search", str(out), str(query), "-k", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].split()[0] == "1" and lines[2].endswith(str(query))


def test_cli_index_ray_connects_to_the_address_given_and_builds_on_encoder_actors(inputs, tmp_path, monkeypatch,
                                                                                   capsys):
    """The --ray wiring (the Ray build itself is tested below, without the CLI's real backbone)."""
    pytest.importorskip("ray")
    import patchify.backbones
    from patchify.distributed import LocalBuild, ray_backend

    monkeypatch.setattr(patchify.backbones, "load_backbone", lambda name, **kwargs: ThumbnailBackbone())
    calls: list = []
    monkeypatch.setattr(ray_backend, "connect", lambda address=None: calls.append(("connect", address)))
    monkeypatch.setattr(ray_backend, "RayBuild", lambda actors, gpus_per_actor: calls.append(
        ("actors", actors, gpus_per_actor)) or LocalBuild())
    folder = tmp_path / "images"
    folder.mkdir()
    for path in inputs[:5]:  # 5 x 16 4x4 cells: enough to learn the whitening from
        shutil.copy(path, folder)
    out = tmp_path / "sharded"
    assert main(["index", str(folder), "--out", str(out), "--level", "1", "--quiet", "--ray", "ray://head:10001",
                 "--actors", "3"]) == 0
    assert calls == [("connect", "ray://head:10001"), ("actors", 3, None)]
    assert "indexed 5 images (25 patches) into 1 shard (1 built now)" in capsys.readouterr().out


def test_info_refuses_a_damaged_shared_training(built, tmp_path, capsys):
    _, directory, _ = built
    copy = Path(shutil.copytree(directory, tmp_path / "copy"))
    description = json.loads((copy / layout.SHARED / layout.SHARED_DESCRIPTION).read_text())
    name = sorted(description["files"])[0]
    with open(copy / layout.SHARED / name, "ab") as handle:
        handle.write(b"x")
    assert main(["info", str(copy)]) == 2
    assert "differ from their sha256" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------- on Ray
class FlakyThumbnail:
    """A backbone factory (picklable) whose backbone fails its first encode in each shard build of the actor
    process, once per flag file: a worker error that Ray must retry."""

    def __init__(self, flags: str) -> None:
        self.flags = flags

    def __call__(self) -> ThumbnailBackbone:
        return _Flaky(self.flags)


class _Flaky(ThumbnailBackbone):
    def __init__(self, flags: str) -> None:
        super().__init__()
        self.flags = Path(flags)

    def encode(self, pixels: np.ndarray, batch_size: int = 32) -> np.ndarray:
        flag = self.flags / f"failed-{os.getpid()}"
        if not flag.exists():
            flag.touch()
            raise RuntimeError("simulated encoder failure")
        return super().encode(pixels, batch_size)


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    # The actors unpickle the test backbones by module name: they need tests/ (and the tested patchify) on their path.
    path = os.pathsep.join([str(ROOT / "tests"), env_importing_tested_patchify()["PYTHONPATH"]])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": path}})
    yield ray
    ray.shutdown()


def test_ray_build_and_ray_search_equal_one_engine(ray_cluster, inputs, tmp_path):
    """The two-stage IVFPQ setting only (the most demanding merge), to keep the CI time small."""
    from patchify.distributed.ray_backend import RayBuild

    name, directory = "ivfpq-fused", tmp_path / "on-ray"
    report = _build(inputs, directory, name, executor=RayBuild(num_actors=2))
    single, single_report = _reference(inputs, directory, name)
    assert report.shards_built == [0, 1, 2, 3] and report.report.image_ids == list(range(20))
    assert report.report.skipped == single_report.skipped and len(report.report.skipped) == 2
    with ShardedIndex.load(directory, backbone=ThumbnailBackbone(), executor="ray", num_cpus=0.25) as sharded:
        _assert_same_results(single, sharded, _queries(single, inputs))


def test_a_failed_worker_batch_is_retried_on_ray(ray_cluster, inputs, tmp_path):
    from patchify.distributed.ray_backend import RayBuild

    flags = tmp_path / "flags"
    flags.mkdir()
    report = build_sharded_index(inputs[:8], tmp_path / "s", backbone=FlakyThumbnail(str(flags)), level=1,
                                 shard_size=4, whitening="none", executor=RayBuild(num_actors=1, retries=2))
    assert len(list(flags.iterdir())) >= 1  # at least one actor's first encode failed, and was retried
    assert report.shards_built == [0, 1] and report.report.image_ids == list(range(7))


def _random_embeddings(seed: int, n_images: int, dim: int = 32):
    """n_images of 5 patches (grids 1 and 2): random unit vectors, their patch table, their images."""
    from patchify.records import NewImage, PatchTable

    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((n_images * 5, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    table = PatchTable(np.repeat(np.arange(n_images), 5), np.tile([[0, 0, 10, 10]], (len(vectors), 1)),
                       np.tile([1, 2, 2, 2, 2], n_images), np.tile([0, 0, 1, 2, 3], n_images))
    return vectors, table, [NewImage(f"img{seed}-{i}", 10, 10) for i in range(n_images)]


def _embedding_engine(config, trained, *parts) -> Patchify:
    engine = Patchify(ThumbnailBackbone(), grids=[1, 2], index=config, whitening="none")
    if trained is not None:
        engine.start_from_trained(trained.trained_copy())
    for part in parts:
        engine.add_embeddings(*part)
    return engine


def test_engines_filled_with_embeddings_save_as_shards_and_merge_exactly(tmp_path):
    from patchify.distributed import save_sharded_index

    config = index_config("ivfpq", nlist=4, m=8, nbits=4, nprobe=2, rerank_shortlist=5)
    trained = _embedding_engine(config, None, _random_embeddings(99, 200)).index
    parts = [_random_embeddings(seed, 60) for seed in range(3)]
    shards = [_embedding_engine(config, trained, part) for part in parts]
    single = _embedding_engine(config, trained, *parts)
    save_sharded_index(shards, tmp_path / "s")
    queries = np.random.default_rng(5).standard_normal((12, 32)).astype(np.float32)
    with ShardedIndex.load(tmp_path / "s", backbone=ThumbnailBackbone()) as sharded:
        assert sharded.n_images == 180
        for k in (1, 4, 50):
            for want, have in zip(single.search_vectors(queries, k), sharded.search_vectors(queries, k)):
                np.testing.assert_array_equal(have, want)
    other = _embedding_engine(config, None, _random_embeddings(7, 200))  # trained on its own vectors
    with pytest.raises(ValueError, match="engine 1 does not share"):
        save_sharded_index([shards[0], other], tmp_path / "t")
