"""The real photographs the composite benchmark is made from, split once and for all into object sources
(objects are cut from these) and background sources (positives are pasted onto, and distractors are cut from,
these). The two sets are disjoint, which is what guarantees that no distractor contains a benchmark object.

Pools: the repository's data/photos (OpenCV samples), scikit-image's bundled `skimage.data` images and
scikit-learn's `load_sample_images` (both shipped inside the wheels, no download).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

import os

# The repository's data/photos; an installed wheel does not carry them, so PATCHIFY_PHOTOS can point there.
def _photos_dir() -> Path:
    if os.environ.get("PATCHIFY_PHOTOS"):
        return Path(os.environ["PATCHIFY_PHOTOS"])
    for candidate in (Path(__file__).resolve().parents[3] / "data" / "photos", Path.cwd() / "data" / "photos"):
        if candidate.is_dir():
            return candidate
    return Path.cwd() / "data" / "photos"


PHOTOS_DIR = _photos_dir()

# name -> (pool, key). Photos are chosen by content: object sources hold distinct things; background sources
# are scenes and textures. pic2/pic4 and skimage colorwheel are left out: synthetic
# test patterns, not photos.
OBJECT_SOURCES = {
    "photos/apple": ("photos", "apple.jpg"), "photos/baboon": ("photos", "baboon.jpg"),
    "photos/butterfly": ("photos", "butterfly.jpg"), "photos/cards": ("photos", "cards.png"),
    "photos/chicky": ("photos", "chicky_512.png"), "photos/fruits": ("photos", "fruits.jpg"),
    "photos/orange": ("photos", "orange.jpg"), "photos/smarties": ("photos", "smarties.png"),
    "photos/squirrel": ("photos", "squirrel_cls.jpg"), "photos/starry_night": ("photos", "starry_night.jpg"),
    "photos/stuff": ("photos", "stuff.jpg"), "photos/happyfish": ("photos", "HappyFish.jpg"),
    "photos/licenseplate": ("photos", "licenseplate_motion.jpg"),
    "skimage/astronaut": ("skimage", "astronaut"), "skimage/coffee": ("skimage", "coffee"),
    "skimage/chelsea": ("skimage", "chelsea"), "skimage/rocket": ("skimage", "rocket"),
    "skimage/immunohistochemistry": ("skimage", "immunohistochemistry"),
    "sklearn/flower": ("sklearn", "flower.jpg"),
}
BACKGROUND_SOURCES = {
    "photos/board": ("photos", "board.jpg"), "photos/building": ("photos", "building.jpg"),
    "photos/home": ("photos", "home.jpg"), "photos/messi": ("photos", "messi5.jpg"),
    "photos/plant": ("photos", "plant.jpg"),
    "sklearn/china": ("sklearn", "china.jpg"), "skimage/camera": ("skimage", "camera"),
    "skimage/hubble_deep_field": ("skimage", "hubble_deep_field"), "skimage/retina": ("skimage", "retina"),
    "skimage/brick": ("skimage", "brick"), "skimage/grass": ("skimage", "grass"),
    "skimage/gravel": ("skimage", "gravel"), "skimage/coins": ("skimage", "coins"),
    "skimage/moon": ("skimage", "moon"), "skimage/clock": ("skimage", "clock"),
}


def _to_rgb(arr: np.ndarray) -> Image.Image:
    img = Image.fromarray(np.ascontiguousarray(arr))
    return img.convert("RGB")


def load_source(pool: str, key: str) -> Image.Image:
    """One source photo as an RGB PIL image."""
    if pool == "photos":
        if not (PHOTOS_DIR / key).is_file():
            raise FileNotFoundError(f"{PHOTOS_DIR / key} missing: set PATCHIFY_PHOTOS to the repository's data/photos")
        with Image.open(PHOTOS_DIR / key) as im:
            if im.mode in ("RGBA", "LA", "P"):
                # Composite transparency over white so cut-outs have no black holes.
                rgba = im.convert("RGBA")
                white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                return Image.alpha_composite(white, rgba).convert("RGB")
            return im.convert("RGB")
    if pool == "skimage":
        import skimage.data

        return _to_rgb(getattr(skimage.data, key)())
    if pool == "sklearn":
        from sklearn.datasets import load_sample_image

        return _to_rgb(load_sample_image(key))
    raise ValueError(f"unknown source pool {pool!r}")


def load_sources(table: dict[str, tuple[str, str]]) -> dict[str, Image.Image]:
    """All sources of a table, in the table's (fixed) order."""
    return {name: load_source(pool, key) for name, (pool, key) in table.items()}
