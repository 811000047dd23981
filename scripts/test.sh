#!/usr/bin/env bash
# Installs Patchify and runs every test: the C++ unit tests (ctest) and the Python suite (pytest).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
source "$root/scripts/setup.sh" dev  # + torch/timm (tests compare against them), cmake, ninja
cd "$root"
build="$root/build/cpp-tests"
cmake -S . -B "$build" -DPATCHIFY_BUILD_PYTHON=OFF -DPATCHIFY_BUILD_TESTS=ON -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$build" -j "$(nproc)"
(cd "$build" && ctest --output-on-failure)
ruff check python tests benchmarks examples
mypy  # settings and files: pyproject.toml [tool.mypy]
python -m pytest tests benchmarks "$@"  # benchmarks: each pytest-benchmark case runs once, as a smoke test
