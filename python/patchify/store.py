"""The on-disk layout of a saved index: the one module that knows it.

A saved index is a folder:
  manifest.json   every setting (backbone, tiling, index kind and config), counts, and the size and sha256 of
                  every other file
  images.json     the image records (id, name, width, height, removed)
  patches.npz     the patch table (image, box, grid, cell): patch id = row; the patch -> image map lives only here
  index files     written by the index (`save_files`), holding data only, no settings:
                  flat: flat_vectors.npy, flat_patch_ids.npy; ivfpq: ivfpq_index.faiss
  whitening.npz   the learned whitening's mean and projection (absent when the index holds raw vectors)
  images/         image files the index owns (those uploaded to `patchify serve`), named by the image records;
                  not in the manifest (the index loads and searches without them) and carried into every later
                  save of the folder by hard links (copies where links fail), so a save replaces the folder whole

Version history (every version stays loadable; fixtures in tests/fixtures/indices/vN):
  1: settings split between manifest.json and ivfpq_meta.json (the loader trusted the manifest, so a changed
     nprobe was lost), the patch -> image map also in flat_image_ids.npy / ivfpq_patch_image.npy, no checksums.
  2: no whitening, no global descriptors, no scoring settings (loads as whitening "none", global_weight 0: the
     plain max it was built for).
  3: the layout above; the manifest adds "whitening" (null, or its settings and whether/what it learned),
     "scoring" ({"global_weight": the setting, "folded_weight": the weight the stored vectors are folded with,
     see patchify.fusion}) and "target_index" (the IVFPQ settings of an index still held exactly, flat,
     until it has enough patches to train; else null); IVFPQ settings add the re-rank store's (rerank_codes.npy,
     rerank_sq.npy).
  4: the layout above; the manifest's tiling adds "cell_sizing" and "min_input_size" (how cells were sized for
     the backbone; absent = every cell at the input size), the backbone identity may carry "precision" (int8,
     fp16; absent = fp32), and an nbits=4 IVFPQ index file holds faiss's fast-scan layout (IndexIVFPQFastScan).
     A version 3 reader would have taken such an index for a fixed-size fp32 one, or refused its faiss file as
     corrupt: hence a new version, which it refuses by name.

Saving is atomic: everything is written into a sibling temporary folder that then replaces the target with
renames, so a crash never leaves a half-written index where a good one was. The two renames (target -> a retired
sibling, staging -> target) leave an instant with no target: `recover_interrupted_save` puts the retired one
back after a crash in that instant.
"""
from __future__ import annotations

import json
import os
import shutil
import tokenize
import uuid
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np

from .backbones.cache import sha256_of
from .config import FlatConfig, IndexConfig, TilingConfig, WhiteningConfig, check_global_weight, index_config_from_dict
from .errors import IndexFormatError
from .records import ImageRecord, PatchTable
from .whitening import WHITENING_FILE, Whitening, manifest_entry

if TYPE_CHECKING:
    from .index.base import PatchIndex

FORMAT_NAME = "patchify-index"
FORMAT_VERSION = 4
SUPPORTED_VERSIONS = (1, 2, 3, 4)

MANIFEST = "manifest.json"
IMAGES = "images.json"
PATCHES = "patches.npz"
OWNED_IMAGES = "images"


@dataclass
class BackboneRecord:
    """Which backbone built an index: its name, its identity (compared on load) and its weights in words."""

    name: str
    identity: dict[str, Any] | None
    weights: str | None


@dataclass
class SavedIndex:
    """Everything `load` read back."""

    directory: Path
    format_version: int
    backbone: BackboneRecord
    tiling: TilingConfig
    images: list[ImageRecord]
    patches: PatchTable
    index: "PatchIndex"
    whitening_config: WhiteningConfig | None = None  # None: raw vectors
    whitening: Whitening | None = None  # None: raw vectors, or not learned yet (a small flat index)
    global_weight: float | None = 0.0  # format <= 2: the plain max it was built for
    folded_weight: float = 0.0
    target_index: IndexConfig | None = None  # an IVFPQ config whose index is still exact (flat) until it can train


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
        retired = target.parent / f"{_retired_prefix(target)}{uuid.uuid4().hex[:8]}"
        os.replace(target, retired)
        os.replace(staging, target)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, target)


def _retired_prefix(target: Path) -> str:
    return f".{target.name}.old-"


def recover_interrupted_save(target: str | os.PathLike) -> Path | None:
    """After a crash between a save's two renames (`atomic_directory`), `target` is missing and the last saved
    index is in a retired sibling: renames it back and returns its path (None when there was nothing to do).
    Call it only where no other process may be saving to `target` (e.g. a server starting on its index)."""
    target = Path(target)
    if (target / MANIFEST).exists():
        return None
    retired = [p for p in target.parent.glob(f"{_retired_prefix(target)}*") if (p / MANIFEST).is_file()]
    if not retired or (target.exists() and any(target.iterdir())):
        return None
    if target.exists():
        target.rmdir()
    newest = max(retired, key=lambda p: p.stat().st_mtime)
    os.replace(newest, target)
    return newest


def _carry_over_owned_images(folder: Path, staging: Path) -> None:
    """The image files an index folder owns (OWNED_IMAGES), into the folder being written: hard links cost no copy
    and keep the files shared until the old folder is deleted."""
    source = folder / OWNED_IMAGES
    if not source.is_dir():
        return
    (staging / OWNED_IMAGES).mkdir()
    for path in source.iterdir():
        if path.is_file() and not path.is_symlink():
            try:
                os.link(path, staging / OWNED_IMAGES / path.name)
            except OSError:  # a file system without hard links
                shutil.copy2(path, staging / OWNED_IMAGES / path.name)


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------------- saving
def save(directory: str | os.PathLike, *, backbone: BackboneRecord, tiling: TilingConfig, index: "PatchIndex",
         images: Sequence[ImageRecord], patches: PatchTable, patchify_version: str,
         whitening_config: WhiteningConfig | None = None, whitening: Whitening | None = None,
         global_weight: float | None = None, folded_weight: float = 0.0,
         target_index: IndexConfig | None = None, owned_images_from: str | os.PathLike | None = None) -> Path:
    """Writes a complete index folder atomically (format FORMAT_VERSION). owned_images_from: the folder the index
    was loaded from or last saved to, whose image files (OWNED_IMAGES) the records name: they go with it (None: a
    new index, which owns none)."""
    directory = Path(directory)
    with atomic_directory(directory) as staging:
        if owned_images_from is not None:
            _carry_over_owned_images(Path(owned_images_from), staging)
        _write_json(staging / IMAGES, [image.to_dict() for image in images])
        columns = patches.arrays()
        np.savez(staging / PATCHES, image=columns["image"], box=columns["box"], grid=columns["grid"],
                 cell=columns["cell"])
        written = [IMAGES, PATCHES, *index.save_files(staging)]
        if whitening is not None:
            written.append(whitening.save_file(staging))
        files = {name: {"bytes": (staging / name).stat().st_size, "sha256": sha256_of(staging / name)}
                 for name in written}
        _write_json(staging / MANIFEST, {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "patchify_version": patchify_version,
            "backbone": {"name": backbone.name, "identity": backbone.identity, "weights": backbone.weights},
            "tiling": tiling.to_dict(),
            "index": {"dim": index.dim, **index.config.to_dict()},
            "n_images": len(images),
            "n_patches": len(patches),
            "whitening": manifest_entry(whitening, whitening_config),
            "scoring": {"global_weight": global_weight, "folded_weight": folded_weight},
            "target_index": target_index.to_dict() if target_index is not None else None,
            "files": files,
        })
    return directory


# ---------------------------------------------------------------------------------------------------- loading
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
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
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
    # What every reader (`load`, `patchify info`) indexes without looking: a damaged manifest fails here, named.
    try:
        describe(manifest)
        if not isinstance(manifest["backbone"], dict) or "name" not in manifest["backbone"]:
            raise KeyError("backbone.name")
        manifest["n_images"], manifest["n_patches"]
    except (KeyError, TypeError, AttributeError) as exc:
        raise IndexFormatError(f"{path}: invalid manifest ({type(exc).__name__}: {exc})") from None
    return manifest


def describe(manifest: dict[str, Any]) -> dict[str, Any]:
    """The settings of a manifest of any supported version, in version 2's terms (for `info` and `load`)."""
    if manifest["format_version"] == 1:
        options = dict(manifest["index"].get("options", {}))
        kind = manifest["index"]["kind"]
        config: dict[str, Any] = {"kind": kind}
        if kind == "flat":
            config["dtype"] = options.get("dtype", "float32")
        else:
            config.update({k: options[k] for k in ("nlist", "m", "nbits", "nprobe") if k in options})
            config["training_source"] = manifest.get("training_source", "all")
        if kind == "ivfpq":
            config["rerank"] = None
        return {"tiling": {"grids": manifest["grids"], "overlap": manifest.get("overlap", 0.0), "input_size": None},
                "index": {"dim": manifest["index"]["dim"], **config}}
    index = dict(manifest["index"])
    if manifest["format_version"] == 2 and index.get("kind") == "ivfpq":
        index.setdefault("rerank", None)  # version 2 had no re-rank store
    return {"tiling": manifest["tiling"], "index": index}


def _v1_ivfpq_settings(directory: Path, config: dict[str, Any]) -> dict[str, Any]:
    """Version 1 kept IVFPQ settings in ivfpq_meta.json too, and that file was the index's truth (nlist chosen
    at training, nprobe changed at run time): prefer it."""
    meta_path = directory / "ivfpq_meta.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise IndexFormatError(f"{meta_path}: unreadable IVFPQ metadata ({exc})") from None
    return {**config, **{k: meta[k] for k in ("nlist", "m", "nbits", "nprobe") if k in meta}}


def check_files(directory: Path, manifest: dict[str, Any], *, checksums: bool) -> None:
    """Every file the manifest lists exists with its size (and, with checksums, its sha256); the error names
    the file. Version 1 listed no files: nothing to check."""
    files = manifest.get("files", {})
    if not isinstance(files, dict):
        raise IndexFormatError(f"{directory / MANIFEST}: invalid file list ({type(files).__name__}, not an object)")
    for name, expected in files.items():
        path = directory / name
        if not isinstance(expected, dict) or not isinstance(expected.get("bytes"), int) or \
                not isinstance(expected.get("sha256"), str):
            raise IndexFormatError(f"{directory / MANIFEST}: invalid entry for {name!r} in its file list")
        if not path.is_file():
            raise IndexFormatError(f"{path}: missing from the index folder")
        size = path.stat().st_size
        if size != expected["bytes"]:
            raise IndexFormatError(f"{path}: damaged ({size} bytes, the manifest says {expected['bytes']})")
        if checksums and sha256_of(path) != expected["sha256"]:
            raise IndexFormatError(f"{path}: damaged (sha256 differs from the manifest's)")


def load(directory: str | os.PathLike, *, num_threads: int = 0, verify: bool = False) -> SavedIndex:
    """Reads an index folder of any supported version. Sizes of all files are checked against the manifest
    (cheap); `verify=True` also checks their sha256. Every error is an IndexFormatError naming the file."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    check_files(directory, manifest, checksums=verify)
    settings = describe(manifest)
    try:
        tiling = TilingConfig.from_dict(settings["tiling"])
        index_settings = dict(settings["index"])
        dim = int(index_settings.pop("dim"))
        if manifest["format_version"] == 1 and index_settings["kind"] == "ivfpq":
            index_settings = _v1_ivfpq_settings(directory, index_settings)
        config = index_config_from_dict(index_settings)
        n_patches, n_images = int(manifest["n_patches"]), int(manifest["n_images"])
        backbone = BackboneRecord(str(manifest["backbone"]["name"]), manifest["backbone"].get("identity"),
                                  manifest["backbone"].get("weights"))
    except (KeyError, TypeError, ValueError) as exc:
        raise IndexFormatError(f"{directory / MANIFEST}: invalid settings ({exc})") from None
    images = _load_images(directory / IMAGES, n_images)
    patches = _load_patches(directory / PATCHES, n_patches, n_images)
    removed = np.array([image.removed for image in images], dtype=bool)
    # patch id -> image id, -1 where the image was removed: what the index needs to rebuild its own tables.
    patch_image = np.where(removed[patches.image], -1, patches.image) if len(patches) else patches.image
    index = _load_index(directory, config, dim, patch_image, n_images, num_threads)
    saved = SavedIndex(directory, int(manifest["format_version"]), backbone, tiling, images, patches, index)
    if saved.format_version >= 3:
        _load_scoring(directory, manifest, saved)
    return saved


def _load_scoring(directory: Path, manifest: dict[str, Any], saved: SavedIndex) -> None:
    """The whitening, global descriptors and scoring settings of a version 3 index."""
    entry = manifest.get("whitening")
    files = manifest.get("files", {})
    try:
        if entry is not None:
            saved.whitening_config = WhiteningConfig.from_dict(entry["config"])
            if entry["learned"]:
                if WHITENING_FILE not in files:
                    raise KeyError(WHITENING_FILE)
                saved.whitening = Whitening.load_file(directory, entry)
        saved.global_weight = check_global_weight(manifest["scoring"]["global_weight"])
        folded = check_global_weight(manifest["scoring"]["folded_weight"])
        saved.folded_weight = 0.0 if folded is None else folded
        if manifest.get("target_index") is not None:
            saved.target_index = index_config_from_dict(manifest["target_index"])
    except (KeyError, TypeError, ValueError) as exc:
        raise IndexFormatError(f"{directory / MANIFEST}: invalid whitening or scoring settings "
                               f"({type(exc).__name__}: {exc})") from None
    if saved.whitening is not None and saved.whitening.output_dim != saved.index.dim:
        raise IndexFormatError(f"{directory / WHITENING_FILE}: whitens to {saved.whitening.output_dim} dimensions, "
                               f"the index holds {saved.index.dim}")



def _load_images(path: Path, n_images: int) -> list[ImageRecord]:
    if not path.is_file():
        raise IndexFormatError(f"{path}: missing from the index folder")
    try:
        images = [ImageRecord.from_dict(row) for row in json.loads(path.read_text(encoding="utf-8"))]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise IndexFormatError(f"{path}: corrupt ({exc})") from None
    if len(images) != n_images or any(image.id != i for i, image in enumerate(images)):
        raise IndexFormatError(f"{path}: {len(images)} image records (ids 0..n-1 expected), the manifest says "
                               f"{n_images}")
    return images


def _load_patches(path: Path, n_patches: int, n_images: int) -> PatchTable:
    if not path.is_file():
        raise IndexFormatError(f"{path}: missing from the index folder")
    try:
        with np.load(path, allow_pickle=False) as archive:
            columns = {name: archive[name] for name in ("image", "box", "grid", "cell")}
    # tokenize.TokenError: numpy parses a garbled .npy header with tokenize and lets its error through.
    except (OSError, ValueError, KeyError, EOFError, SyntaxError, tokenize.TokenError, zipfile.BadZipFile) as exc:
        raise IndexFormatError(f"{path}: corrupt or incomplete ({exc})") from None
    expected = {"image": (n_patches,), "box": (n_patches, 4), "grid": (n_patches,), "cell": (n_patches,)}
    for name, shape in expected.items():
        if columns[name].shape != shape:
            raise IndexFormatError(f"{path}: table {name!r} has shape {columns[name].shape}, manifest says {shape}")
    if n_patches and (columns["image"].min() < 0 or columns["image"].max() >= n_images):
        raise IndexFormatError(f"{path}: patch table names images outside 0..{n_images - 1}")
    return PatchTable(columns["image"], columns["box"], columns["grid"], columns["cell"])


def _load_index(directory: Path, config: IndexConfig, dim: int, patch_image: np.ndarray, n_images: int,
                num_threads: int) -> "PatchIndex":
    if isinstance(config, FlatConfig):
        from .index.flat import FlatIndex

        return FlatIndex.load_files(directory, config, dim, patch_image, num_threads=num_threads)
    from .index.ivfpq import IVFPQIndex

    return IVFPQIndex.load_files(directory, config, dim, patch_image, n_images, num_threads=num_threads)


def load_image_records(directory: str | os.PathLike) -> list[ImageRecord]:
    """The image records of a saved index (images.json, checked against the manifest's count), without loading
    its vectors: e.g. to name and size the images of a sharded index's shards."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    return _load_images(directory / IMAGES, int(manifest["n_images"]))


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())
