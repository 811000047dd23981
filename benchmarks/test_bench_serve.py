"""Smoke test of the serve load test (benchmarks/bench_serve.py): a few seconds of 4 clients searching while one
adds, so the script cannot rot, and a load with adds must end with no errors and no lost image."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 'patchify[serve]')")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_serve  # noqa: E402


def test_short_load_has_no_errors_and_loses_no_image(tmp_path: Path) -> None:
    result = bench_serve.main(["--clients", "4", "--seconds", "2", "--synthetic", "100", "--repeats", "5",
                               "--out", str(tmp_path / "serve.json")])
    assert result["load"]["errors"] == 0, result["load"]["error_samples"]
    assert result["added"] > 0 and result["lost_live"] == 0 and result["lost_after_restart"] == 0
    assert result["images_after_restart"] == result["expected_images"] == 120 + result["added"]
    assert {"vector", "image", "add"} <= set(result["load"]["by_kind"])
