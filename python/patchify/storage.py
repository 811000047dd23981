"""On-disk index layout: a folder with a versioned manifest, image and patch tables, and the index's own files.

Version history (every version stays loadable; fixtures in tests/fixtures/indices/vN):
  1: manifest.json, images.json, patches.npz (image, box, grid, cell), index files written by the index class.

Saving is atomic: everything is written into a sibling temporary folder that then replaces the target with
renames, so a crash never leaves a half-written index where a good one was.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

FORMAT_NAME = "patchify-index"
FORMAT_VERSION = 1
SUPPORTED_VERSIONS = (1,)

MANIFEST = "manifest.json"
IMAGES = "images.json"
PATCHES = "patches.npz"


class IndexFormatError(ValueError):
    """A folder that is not a usable Patchify index (missing, mismatched or unsupported files)."""


@contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Yields a fresh temporary folder beside `target`; on success it replaces `target` atomically."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if target.exists():
        if not (target / MANIFEST).exists() and any(target.iterdir()):
            shutil.rmtree(staging, ignore_errors=True)
            raise IndexFormatError(f"{target}: exists and is not a Patchify index; refusing to overwrite it")
        retired = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(target, retired)
        os.replace(staging, target)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, target)


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """Reads and validates the manifest; the error names the folder and what is wrong."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.is_dir():
        raise IndexFormatError(f"{directory}: index folder not found")
    if not path.is_file():
        raise IndexFormatError(f"{directory}: not a Patchify index ({MANIFEST} missing)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise IndexFormatError(f"{path}: corrupt manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise IndexFormatError(f"{path}: not a Patchify index manifest")
    version = manifest.get("format_version")
    if version not in SUPPORTED_VERSIONS:
        newest = max(SUPPORTED_VERSIONS)
        hint = "upgrade patchify to read it" if isinstance(version, int) and version > newest else "unknown version"
        raise IndexFormatError(
            f"{path}: index format version {version!r} is not supported (this patchify reads "
            f"{', '.join(map(str, SUPPORTED_VERSIONS))}); {hint}"
        )
    return manifest


def save_tables(directory: Path, images: list[dict[str, Any]], patch_image: np.ndarray, boxes: np.ndarray,
                grid: np.ndarray, cell: np.ndarray) -> None:
    write_json(directory / IMAGES, images)
    np.savez(directory / PATCHES, image=patch_image, box=boxes, grid=grid, cell=cell)


def load_tables(directory: Path, n_patches: int) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
    images_path, patches_path = directory / IMAGES, directory / PATCHES
    for path in (images_path, patches_path):
        if not path.is_file():
            raise IndexFormatError(f"{path}: missing from the index folder")
    try:
        images = json.loads(images_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise IndexFormatError(f"{images_path}: corrupt ({exc})") from None
    try:
        with np.load(patches_path, allow_pickle=False) as archive:
            tables = {name: archive[name] for name in ("image", "box", "grid", "cell")}
    except (OSError, ValueError, KeyError) as exc:
        raise IndexFormatError(f"{patches_path}: corrupt or incomplete ({exc})") from None
    expected = {"image": (n_patches,), "box": (n_patches, 4), "grid": (n_patches,), "cell": (n_patches,)}
    for name, shape in expected.items():
        if tables[name].shape != shape:
            raise IndexFormatError(
                f"{patches_path}: table {name!r} has shape {tables[name].shape}, manifest says {shape}"
            )
    return images, tables
