"""Retrieval benchmarks: a composite INSTRE-like benchmark built from real photos, and loaders for INSTRE,
ILIAS and revisited Oxford/Paris as users have them on disk. All return a `RetrievalDataset`."""
from __future__ import annotations

from .base import RetrievalDataset
from .composite import build_composite_benchmark, load_composite
from .ilias import load_ilias
from .instre import load_instre
from .revisited import load_revisited

__all__ = ["RetrievalDataset", "build_composite_benchmark", "load_composite", "load_ilias", "load_instre",
           "load_revisited"]
