"""The on-disk layout of a sharded index: the one module that knows it.

A sharded index is a folder (on a filesystem every node of the cluster sees, when built or searched on one):

  sharded.json                   the manifest, written last (its presence means the index is complete): the
                                 backbone, tiling, index settings, the shared training's identity and, per shard, its
                                 folder and its global id offsets
  build.json                     the build plan, written first: the settings and the sha256 of each shard's inputs.
                                 A re-run must plan the same build; it then resumes, keeping every complete shard
  shared/                        what is learned once, on a sample, for every shard: the whitening (whitening.npz)
                                 and the trained, empty IVFPQ index (ivfpq_*, rerank_*); shared.json describes it
                                 with its files' sha256 (the shards' codes are only comparable under one training)
  shards/shard-00000/            a normal saved Patchify index (patchify.store): load it with Patchify.load
  shards/shard-00000.done.json   written after the shard's index: its inputs and its AddReport (skipped files).
                                 A shard is complete when this exists and lists the planned inputs

Global ids: an image lives in exactly one shard; its global id is its shard's `first_image_id` plus its id in the
shard, the offsets being the cumulative image (patch) counts of the shards before it, in plan order. Shards are
contiguous runs of the inputs, so the global ids are the ids one engine adding the same inputs in the same order
would give (bad files skipped alike).
"""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

from ..backbones.cache import sha256_of
from ..errors import IndexFormatError

FORMAT_NAME = "patchify-sharded-index"
FORMAT_VERSION = 1
MANIFEST = "sharded.json"
PLAN = "build.json"
SHARED = "shared"
SHARED_DESCRIPTION = "shared.json"
SHARDS = "shards"


def is_sharded_index(directory: str | os.PathLike) -> bool:
    """Whether `directory` holds a sharded index (complete: its manifest is written last)."""
    return (Path(directory) / MANIFEST).is_file()


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}"


def shard_folder(directory: Path, shard: int) -> Path:
    return directory / SHARDS / shard_name(shard)


def done_marker(directory: Path, shard: int) -> Path:
    return directory / SHARDS / f"{shard_name(shard)}.done.json"


def shared_folder(directory: Path) -> Path:
    return directory / SHARED


def write_json(path: Path, data: Any) -> None:
    """Atomically (a temporary file renamed over it): a reader never sees half a file, a crash leaves none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    staging.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(staging, path)


def read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise IndexFormatError(f"{path}: missing ({what})") from None
    except (OSError, ValueError) as exc:
        raise IndexFormatError(f"{path}: unreadable {what} ({exc})") from None


def file_digests(folder: Path, names: list[str]) -> dict[str, str]:
    return {name: sha256_of(folder / name) for name in sorted(names)}


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """The sharded-index manifest, checked; errors name the folder."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise IndexFormatError(f"{directory}: not a sharded Patchify index ({MANIFEST} missing)")
    manifest = read_json(path, "sharded-index manifest")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise IndexFormatError(f"{path}: not a sharded Patchify index manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise IndexFormatError(f"{path}: sharded-index format version {manifest.get('format_version')!r} is not "
                               f"supported (this patchify reads {FORMAT_VERSION})")
    try:
        for shard in manifest["shards"]:
            shard["first_image_id"], shard["first_patch_id"], shard["n_images"], shard["path"]
        manifest["backbone"]["name"], manifest["tiling"]["grids"], manifest["index"]["kind"]
    except (KeyError, TypeError) as exc:
        raise IndexFormatError(f"{path}: invalid manifest ({type(exc).__name__}: {exc})") from None
    return manifest
