#!/usr/bin/env bash
# Regenerates python/patchify/_core.pyi from the built extension (pip install pybind11-stubgen first).
# tests/test_stubs.py runs mypy's stubtest to keep the stub and the module in step.
set -euo pipefail
cd "$(dirname "$0")/.."
out="$(mktemp -d)"
PYTHONPATH=python pybind11-stubgen patchify._core -o "$out" --numpy-array-remove-parameters
grep -v "^__all__" "$out/patchify/_core.pyi" > python/patchify/_core.pyi  # no __all__ at run time
rm -rf "$out"
echo "wrote python/patchify/_core.pyi"
