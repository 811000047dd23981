"""Lower-precision copies of an exported backbone: int8 for CPUs, fp16 for GPUs.

An export folder (see cache.py) holds `model.onnx` in float32. The other precisions are derived from it once, next
to it, on first use: `model-int8.onnx` and `model-fp16.onnx`. Written to a temporary name and renamed, so a reader
never sees half a file and two processes deriving at once both end with a complete one.

* int8: onnxruntime's dynamic quantisation (weights int8 per output channel, activations quantised per batch at run
  time; no calibration set). The MatMuls of the transformer blocks dominate a ViT's cost and become integer GEMMs.
  Per channel keeps the CLS embedding at cosine >= 0.998 to float32 on real photos (per tensor: 0.996); speed and
  retrieval quality in benchmarks/RESULTS.md ("Indexing cost").
* fp16: onnxruntime's float16 converter with float32 inputs and outputs kept (callers pass and get float32). The
  position-embedding resampling stays float32: onnxruntime's cubic Resize has no float16 kernel with these scales,
  and that part of the graph is tiny. Meant for CUDA; on a CPU it runs, slower than float32.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..config import EXPORT_PRECISION, check_precision

__all__ = ["model_file", "derive"]

# Nodes kept in float32 by the fp16 conversion: the embedding stage (position-table resampling and its shape
# arithmetic), except the patch projection itself, which is a real convolution worth running in half precision.
_FP32_PREFIXES = ("/backbone/embeddings/", "/inner/pos_embed", "/inner/_pos_embed")


def model_file(directory: Path, precision: str) -> Path:
    """Where the `precision` copy of the export in `directory` lives (float32: the export itself)."""
    check_precision(precision)
    name = "model.onnx" if precision == EXPORT_PRECISION else f"model-{precision}.onnx"
    return Path(directory) / name


def derive(directory: Path, precision: str) -> Path:
    """The `precision` copy of `directory`'s model.onnx, written now if missing. Returns its path."""
    target = model_file(directory, precision)
    if target.is_file():
        return target
    source = model_file(directory, EXPORT_PRECISION)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        if precision == "int8":
            _quantize_int8(source, tmp)
        else:
            _convert_fp16(source, tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _quantize_int8(source: Path, target: Path) -> None:
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    # quantize_dynamic logs a suggestion to run its shape-inference pre-pass; the graph has no shapes it needs.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, per_channel=True)
    finally:
        root.setLevel(level)


def _convert_fp16(source: Path, target: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(source))
    keep = [n.name for n in model.graph.node if n.name.startswith(_FP32_PREFIXES) and n.op_type != "Conv"]
    half = convert_float_to_float16(model, keep_io_types=True, node_block_list=keep)
    # The converter inserts one input cast per consumer of a kept tensor, with the same name and output when
    # several kept nodes read the graph input: identical copies, which onnx refuses ("two nodes with same name").
    seen: set[bytes] = set()
    unique = []
    for node in half.graph.node:
        key = node.SerializeToString()
        if key not in seen:
            seen.add(key)
            unique.append(node)
    del half.graph.node[:]
    half.graph.node.extend(unique)
    onnx.save(half, str(target))

