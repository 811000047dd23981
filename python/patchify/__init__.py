"""Patchify: patch-wise instance retrieval.

Database images are cut into multi-scale grid patches (L0 = 1x1, L1 = +2x2, L2 = +3x3, L3 = +4x4), each
patch is embedded by a frozen backbone, and an image's score for a query is the max cosine similarity over
its patches; the winning patch's box says where the match is.

`import patchify` and searching need numpy, Pillow, onnxruntime and faiss only; evaluation plots need the `eval`
extra, exporting new backbones the `export` extra.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import _core
from .config import FlatConfig, IVFPQConfig, TilingConfig
from .encoder import EncodedBatch, Encoder
from .engine import Patchify
from .errors import (BackboneMismatchError, CoreError, ImageError, ImageTooLargeError, IndexFormatError,
                     PatchifyError, WeightsUnavailableError)
from .images import load_rgb
from .preprocess import Preprocess
from .records import AddReport, Hit, ImageRecord, NewImage, PatchTable, SkippedImage
from .tiling import TileBatch, grid_sizes, patch_boxes, patches_per_image, tile_images

if TYPE_CHECKING:
    from .backbones import Backbone, load_backbone

__version__ = _core.__version__

__all__ = [
    "AddReport", "Backbone", "BackboneMismatchError", "CoreError", "EncodedBatch", "Encoder", "FlatConfig", "Hit",
    "IVFPQConfig", "ImageError", "ImageRecord", "ImageTooLargeError", "IndexFormatError", "NewImage", "PatchTable",
    "Patchify", "PatchifyError", "Preprocess", "SkippedImage", "TileBatch", "TilingConfig", "WeightsUnavailableError",
    "__version__", "grid_sizes", "load_backbone", "load_rgb", "patch_boxes", "patches_per_image", "tile_images",
]


def __getattr__(name: str) -> Any:
    # The backbones pull in onnxruntime; importing them only on use keeps `import patchify` light for
    # services that search by vector.
    if name in ("Backbone", "load_backbone"):
        from . import backbones

        return getattr(backbones, name)
    raise AttributeError(f"module 'patchify' has no attribute {name!r}")
