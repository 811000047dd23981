#!/usr/bin/env bash
# Development build: compiles patchify._core in place (python/patchify/_core*.so) so that
#   PYTHONPATH=python python -m pytest tests
# runs against the working tree without `pip install`. Pass -DPATCHIFY_BUILD_TESTS=ON to also build cpp/test.
set -euo pipefail
cd "$(dirname "$0")/.."
build_dir=${PATCHIFY_BUILD_DIR:-build/dev}
cmake -S . -B "$build_dir" -G Ninja -DCMAKE_BUILD_TYPE=Release -DPATCHIFY_INPLACE=ON \
  -Dpybind11_DIR="$(python3 -m pybind11 --cmakedir)" "$@" >/dev/null
cmake --build "$build_dir" -j "${PATCHIFY_JOBS:-2}"
if [ -f "$build_dir/CTestTestfile.cmake" ]; then (cd "$build_dir" && ctest --output-on-failure); fi
