"""Shared fixtures. Real photos ship in data/photos; `ThumbnailBackbone` is a tiny deterministic encoder (the
patch's 8x8 colour thumbnail) that lets engine tests run in milliseconds. Tests that need the real DINOv2 backbone
say so and use the `real_backbone` fixture."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT / "data" / "photos"
# The composite benchmark's source photos: the repository's, also when patchify is installed as a wheel.
os.environ.setdefault("PATCHIFY_PHOTOS", str(PHOTOS))


def env_importing_tested_patchify() -> dict[str, str]:
    """Environment for a subprocess that must import the same patchify as this test run (installed, or the
    in-place build under python/)."""
    import patchify

    package_root = Path(patchify.__file__).resolve().parents[1]
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(package_root), os.environ.get("PYTHONPATH", "")])}


@pytest.fixture(scope="session")
def photos() -> list[Path]:
    files = sorted(PHOTOS.glob("*"))
    assert len(files) == 20, f"expected the 20 shipped photos in {PHOTOS}"
    return files


class ThumbnailBackbone:
    """Encodes a patch as its normalised 8x8 RGB thumbnail (192-d): crude, but deterministic, fast and good at
    finding an exact crop of a photo, which is what the engine logic tests need."""

    name = "thumbnail-test"
    weights = "none (deterministic 8x8 thumbnail, tests only)"
    provider = "numpy"
    dim = 192

    def __init__(self, input_size: int = 32) -> None:
        from patchify.preprocess import Preprocess

        self.preprocess = Preprocess(input_size=input_size, interpolation="bilinear")
        self.identity: dict[str, Any] = {"model": self.name, "input_size": input_size, "dim": self.dim}
        self.calls = 0

    def encode(self, pixels: np.ndarray, batch_size: int = 32) -> np.ndarray:
        self.calls += 1
        n, c, s, _ = pixels.shape
        pooled = pixels.astype(np.float32).reshape(n, c, 8, s // 8, 8, s // 8).mean(axis=(3, 5)).reshape(n, -1)
        pooled -= pooled.mean(axis=1, keepdims=True)
        return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)


class ResizableThumbnailBackbone(ThumbnailBackbone):
    """The thumbnail encoder taking any input side that is a multiple of 8 (as a ViT with patch size 8 whose
    position embeddings follow the input), recording the sides it was given: for cell sizing ("fit") tests."""

    name = "resizable-thumbnail-test"
    patch_size = 8

    def __init__(self, input_size: int = 64) -> None:
        super().__init__(input_size)
        self.identity["model"] = self.name
        self.sizes: list[int] = []

    def accepts_input_size(self, size: int) -> bool:
        return size >= self.patch_size and size % self.patch_size == 0

    def encode(self, pixels: np.ndarray, batch_size: int = 32) -> np.ndarray:
        assert self.accepts_input_size(pixels.shape[2]) and pixels.shape[2] == pixels.shape[3], pixels.shape
        self.sizes.append(int(pixels.shape[2]))
        return super().encode(pixels, batch_size)


@pytest.fixture
def thumbnail_backbone() -> ThumbnailBackbone:
    return ThumbnailBackbone()


def clustered_patches(n_images: int, seed: int, *, dim: int, per_image: int, themes: int, spread: float,
                      first_image: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Unit patch vectors of synthetic images, with their image ids: each image's patches scatter (`spread`) around
    the image's own centre, images around a few shared themes, so that compressed indexes face near neighbours."""
    rng = np.random.default_rng(seed)
    theme = rng.standard_normal((themes, dim))
    centres = theme[rng.integers(0, len(theme), n_images)] + 0.7 * rng.standard_normal((n_images, dim))
    x = np.repeat(centres, per_image, axis=0) + spread * rng.standard_normal((n_images * per_image, dim))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    return x, np.repeat(np.arange(first_image, first_image + n_images), per_image).astype(np.int64)
