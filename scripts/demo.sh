#!/usr/bin/env bash
# The main job on a fresh machine: install, index the shipped real photos, search with a crop of one of them.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
source "$root/scripts/setup.sh" runtime  # no torch: the default backbone needs onnx + onnxruntime only
cd "$root"
out="${PATCHIFY_DEMO_DIR:-$root/demo_output}"
mkdir -p "$out"
# The query: a crop of one photo (its true place is printed, to compare with the winning box).
python examples/make_query.py data/photos/fruits.jpg --box 250 180 460 400 --out "$out/query.jpg"
patchify index data/photos --out "$out/index" --level 2 --overwrite
patchify search "$out/index" "$out/query.jpg" -k 5 --show "$out/result.png"
