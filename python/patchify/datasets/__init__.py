"""Retrieval benchmarks: a composite INSTRE-like benchmark built from real photos, and loaders for INSTRE,
ILIAS, revisited Oxford/Paris and GroceryStore as users have them on disk. All return a `RetrievalDataset`."""
from __future__ import annotations

from .base import RetrievalDataset
from .composite import build_composite_benchmark, load_composite
from .grocery import GroceryLayoutError, load_grocery
from .ilias import load_ilias
from .instre import load_instre
from .revisited import load_revisited

__all__ = ["GroceryLayoutError", "RetrievalDataset", "build_composite_benchmark", "load_composite", "load_grocery",
           "load_ilias", "load_instre", "load_revisited"]
