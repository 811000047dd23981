"""Patchify: patch-wise instance retrieval.

Database images are cut into multi-scale grid patches (L0 = 1x1, L1 = +2x2, L2 = +3x3, L3 = +4x4), each
patch is embedded by a frozen backbone, and an image's score for a query is the max cosine similarity over
its patches; the winning patch's box says where the match is.
"""
from __future__ import annotations

from . import _core

__version__ = _core.__version__

__all__ = ["__version__"]
