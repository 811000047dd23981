"""`patchify info` on healthy and damaged indexes (thumbnail test encoder: no real backbone)."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ThumbnailBackbone
from patchify import Patchify
from patchify.cli import main


@pytest.fixture(scope="module")
def saved_index(tmp_path_factory, photos) -> Path:
    images = []
    for path in photos[:6]:
        with Image.open(path) as img:
            images.append(np.asarray(img.convert("RGB").reduce(4)))
    engine = Patchify(backbone=ThumbnailBackbone(), level=1)
    engine.add_images(images)
    return engine.save(tmp_path_factory.mktemp("cli") / "index")


@pytest.fixture
def index_copy(saved_index, tmp_path) -> Path:
    return Path(shutil.copytree(saved_index, tmp_path / "index"))


def test_info_on_a_healthy_index(index_copy, capsys):
    assert main(["info", str(index_copy)]) == 0
    out = capsys.readouterr().out
    assert "6 images" in out and "30 patches" in out and "present with its size" in out
    assert "whitening: learned on 96 4x4 cells of 6 images" in out
    # The thumbnail test backbone takes one input size: its cells are fixed-size, in its own (fp32) precision.
    assert "encoding: fp32, every cell at the backbone's input size" in out
    assert main(["info", str(index_copy), "--verify"]) == 0
    assert "sha256 match" in capsys.readouterr().out


def test_info_says_what_the_whitening_learned_and_how_images_are_scored(photos, tmp_path, capsys):
    images = []
    for path in photos[:3]:
        with Image.open(path) as img:
            images.append(np.asarray(img.convert("RGB").reduce(4)))
    engine = Patchify(backbone=ThumbnailBackbone(), level=1)
    engine.add_images(images)  # 3 x 16 learning cells, 15 patches: fewer than min_vectors
    assert main(["info", str(engine.save(tmp_path / "pending"))]) == 0
    out = capsys.readouterr().out
    assert "whitening: pending" in out and "scoring: plain max over patches" in out
    engine.add_images(images * 4)  # this add's 12 images give 192 learning cells: learned on them
    assert main(["info", str(engine.save(tmp_path / "learned"))]) == 0
    out = capsys.readouterr().out
    assert "whitening: learned on 192 4x4 cells of 12 images (power -0.5, shrinkage 0.3" in out
    assert "scoring: 0.25 x whole-image score + 0.75 x best patch score" in out


@pytest.mark.parametrize("verify", [False, True])
def test_info_reports_a_truncated_file(index_copy, capsys, verify):
    damaged = index_copy / "flat_vectors.npy"
    damaged.write_bytes(damaged.read_bytes()[:-100])
    assert main(["info", str(index_copy), *(["--verify"] if verify else [])]) != 0
    captured = capsys.readouterr()
    assert str(damaged) in captured.err and "damaged" in captured.err
    assert "patches" not in captured.out  # no summary of a damaged index


def test_info_reports_a_missing_file(index_copy, capsys):
    (index_copy / "patches.npz").unlink()
    assert main(["info", str(index_copy)]) != 0
    assert f"{index_copy / 'patches.npz'}: missing" in capsys.readouterr().err


def test_info_verify_finds_a_flipped_bit_that_sizes_miss(index_copy, capsys):
    damaged = index_copy / "flat_vectors.npy"
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0x10
    damaged.write_bytes(bytes(data))
    assert main(["info", str(index_copy)]) == 0  # same size: only checksums can tell
    capsys.readouterr()
    assert main(["info", str(index_copy), "--verify"]) != 0
    err = capsys.readouterr().err
    assert str(damaged) in err and "sha256" in err


def test_info_on_a_folder_that_is_no_index(tmp_path, capsys):
    assert main(["info", str(tmp_path)]) != 0
    assert "not a Patchify index" in capsys.readouterr().err


def test_index_checks_the_output_folder_before_encoding(tmp_path, photos, capsys):
    """Nothing is encoded (no backbone is even loaded) when --out cannot be written or already holds an index."""
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(photos[0], images / photos[0].name)
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file where a folder should be")
    assert main(["index", str(images), "--out", str(blocker / "index"), "--backbone", "no-such-net"]) == 2
    assert "cannot write there" in capsys.readouterr().err
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "manifest.json").write_text("{}")
    assert main(["index", str(images), "--out", str(existing)]) == 2
    assert "--overwrite" in capsys.readouterr().err and (existing / "manifest.json").read_text() == "{}"


def test_every_option_says_what_it_does_and_its_default(capsys):
    for command in ("index", "search", "eval", "info"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = capsys.readouterr().out
        for option in ("--nlist", "--m ", "--nbits", "--nprobe", "--overlap", "--batch-size", "-k ", "--threads"):
            if option in text:
                line = text[text.index(option):].split("\n  -")[0]
                assert len(line.split()) > 2, f"{command} {option} has no help text: {line!r}"
    with pytest.raises(SystemExit):
        main(["index", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 2)" in text and "(default 32)" in text and "(default 16)" in text


def test_an_image_too_small_for_the_grid_is_named_not_numbered(tmp_path):
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (2, 2)).save(tiny)
    engine = Patchify(backbone=ThumbnailBackbone(), level=3)
    report = engine.add_images([tiny])
    assert [s.source for s in report.skipped] == [str(tiny)]
    assert "image 0" not in str(report) and "4x4 grid" in report.skipped[0].reason


def test_info_says_an_ivfpq_index_is_searched_exactly_until_it_can_train(photos, tmp_path, capsys):
    images = []
    for path in photos[:4]:
        with Image.open(path) as img:
            images.append(np.asarray(img.convert("RGB").reduce(4)))
    engine = Patchify(backbone=ThumbnailBackbone(), level=1, index="ivfpq", m=8)
    report = engine.add_images(images)
    assert any("searched exactly (flat) until then" in note for note in report.notes)
    assert main(["info", str(engine.save(tmp_path / "index"))]) == 0
    out = capsys.readouterr().out
    assert "index kind: flat" in out and "configured: ivfpq (" in out
    # 4-bit codes (the default): 39 training points for each of the 16 PQ centroids
    assert "searched exactly until it has 624 patches to train on" in out


def test_info_suggests_relearning_only_for_a_whitening_learned_on_fewer_indexed_patches(photos, tmp_path, capsys):
    from patchify.config import WhiteningConfig

    images = []
    for path in photos[:10]:
        with Image.open(path) as img:
            images.append(np.asarray(img.convert("RGB").reduce(4)))
    # Learned on 4 images' 4x4 cells (64) while it indexes 140 patches: a sample by design, nothing to relearn.
    cells = Patchify(backbone=ThumbnailBackbone(), level=2, whitening=WhiteningConfig(learn_images=4))
    cells.add_images(images)
    assert main(["info", str(cells.save(tmp_path / "cells"))]) == 0
    out = capsys.readouterr().out
    assert "learned on 64 4x4 cells of 4 images" in out and "relearn_whitening" not in out
    # Learned on the first 70 indexed patches, then grown to 210: relearning would use three times as many.
    patches = Patchify(backbone=ThumbnailBackbone(), level=2, whitening=WhiteningConfig(learn_grid=None))
    patches.add_images(images[:5])
    patches.add_images(images + images[:5])
    assert main(["info", str(patches.save(tmp_path / "patches"))]) == 0
    out = capsys.readouterr().out
    assert "learned on 70 indexed patches of 5 images" in out and "relearn_whitening() learns on everything" in out


def test_crop_mode_is_one_flag_and_the_defaults_are_the_config_s():
    from patchify.cli import build_parser, encoding_settings
    from patchify.config import DEFAULT_CELL_SIZING, DEFAULT_PRECISION

    parser = build_parser()
    assert encoding_settings(parser.parse_args(["index", "imgs", "--out", "idx", "--crop-mode"])) == \
        {"precision": "fp32", "cell_sizing": "fixed"}
    assert encoding_settings(parser.parse_args(["index", "imgs", "--out", "idx"])) == \
        {"precision": DEFAULT_PRECISION, "cell_sizing": DEFAULT_CELL_SIZING}
    assert encoding_settings(parser.parse_args(["eval", "bench", "--precision", "fp16", "--cell-sizing", "fixed"])) \
        == {"precision": "fp16", "cell_sizing": "fixed"}
