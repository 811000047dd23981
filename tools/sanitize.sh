#!/usr/bin/env bash
# AddressSanitizer + UndefinedBehaviorSanitizer run of the C++ core: builds the C++ tests and the extension with
# -fsanitize=address,undefined in build/asan (the normal in-place build under python/patchify is not touched),
# runs ctest, then the fuzz tests and the tiler/index/store tests against a copy of the package
# (build/asan/pkg/patchify) holding the sanitized _core.
#
# Not run by CI: it takes minutes (the sanitized core is several times slower and the build is a full one).
# Run it after changing anything in cpp/ or python/src/, or the code that feeds them untrusted bytes:
#   source .venv/bin/activate && ./tools/sanitize.sh [extra pytest args]
# Results are recorded in benchmarks/RESULTS.md ("Sanitizers and fuzzing").
set -euo pipefail
cd "$(dirname "$0")/.."
build_dir=build/asan
flags="-fsanitize=address,undefined -fno-omit-frame-pointer -g -O1"

cmake -S . -B "$build_dir" -G Ninja -DCMAKE_BUILD_TYPE=Debug -DPATCHIFY_INPLACE=OFF -DPATCHIFY_BUILD_TESTS=ON \
  -DCMAKE_CXX_FLAGS="$flags" -DCMAKE_EXE_LINKER_FLAGS="-fsanitize=address,undefined" \
  -DCMAKE_MODULE_LINKER_FLAGS="-fsanitize=address,undefined" -DCMAKE_SHARED_LINKER_FLAGS="-fsanitize=address,undefined" \
  -Dpybind11_DIR="$(python3 -m pybind11 --cmakedir)" >/dev/null
cmake --build "$build_dir" -j "${PATCHIFY_JOBS:-2}"

# Leaks are not checked: CPython keeps its allocations to exit on purpose, and so do faiss's statics.
# allocator_may_return_null: a corrupt size field asking for terabytes must fail as std::bad_alloc / MemoryError
# (what the fuzz tests expect of a normal build under its memory limit), not abort the process.
export ASAN_OPTIONS=detect_leaks=0:allocator_may_return_null=1:max_allocation_size_mb=8192:strict_string_checks=1
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1

echo "== ctest (sanitized C++ tests)"
(cd "$build_dir" && ctest --output-on-failure)

echo "== pytest against the sanitized extension"
pkg="$build_dir/pkg"
rm -rf "$pkg"
mkdir -p "$pkg"
# The package's Python files, without the in-place (unsanitized) _core, plus the sanitized one.
cp -r python/patchify "$pkg/patchify"
rm -f "$pkg"/patchify/_core*.so
cp "$build_dir"/_core*.so "$pkg/patchify/"
# The interpreter is not built with ASan, so the runtime must be loaded first, before any instrumented library.
libasan=$(g++ -print-file-name=libasan.so)
libubsan=$(g++ -print-file-name=libubsan.so)
LD_PRELOAD="$libasan:$libubsan" PYTHONPATH="$pkg" python -c \
  "import patchify, patchify._core as c; assert '$pkg' in patchify.__file__, patchify.__file__; print('sanitized core:', c.__file__)"
LD_PRELOAD="$libasan:$libubsan" PYTHONPATH="$pkg" python -m pytest -q -p no:cacheprovider -m "not slow" \
  tests/test_fuzz.py tests/test_tiler.py tests/test_flat_index.py tests/test_ivfpq.py tests/test_ivfpq_fastscan.py \
  tests/test_index_validation.py \
  tests/test_index_fixtures.py tests/test_engine.py tests/test_cli.py tests/test_rerank.py tests/test_whitening.py "$@"
echo "== sanitizers: clean"
