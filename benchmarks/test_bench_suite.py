"""Smoke test of the benchmark suite: `run.py --quick` for the cheap benchmarks (no model needed), so that the
scripts, their JSON and the SUITE.md tables cannot rot unnoticed. Tens of seconds.

    PYTHONPATH=python python -m pytest benchmarks/test_bench_suite.py
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run  # noqa: E402
import tables  # noqa: E402

# run.CHEAP (tiler, flat, ivfpq), plus indexing (run.py's quick arguments limit it to the cheap encoder) and the
# search-scaling smoke config (2000 images, d=64; ~10 s): every benchmark of the suite but the real backbone.
QUICK = (*run.CHEAP, "indexing", "search_scaling")


def test_quick_suite_writes_json_and_tables(tmp_path):
    assert "--skip-real" in next(b for b in run.SUITE if b.name == "indexing").quick
    assert run.main(["--quick", "--only", *QUICK, "--out", str(tmp_path)]) == 0
    runs = json.loads((tmp_path / "suite_runs.json").read_text())
    assert set(runs) == set(QUICK) and all(r["status"] == "ok" for r in runs.values())
    for name in QUICK:
        json.loads((tmp_path / f"suite_{name}.json").read_text())
    suite = (tmp_path / "SUITE.md").read_text()
    for name in QUICK:
        title = tables.SECTIONS[name][0]
        assert f"## {title}" in suite
        assert runs[name]["command"] in suite
    assert "cores" in suite and "| L0 |" in suite and "Not measured" not in suite


def test_failed_benchmark_is_reported_not_hidden(tmp_path, monkeypatch):
    broken = run.Benchmark("tiler", "bench_tiler.py", (), ("--photos", str(tmp_path / "missing")))
    monkeypatch.setattr(run, "SUITE", (broken,))
    assert run.main(["--quick", "--out", str(tmp_path)]) == 1
    assert "Not measured: exit " in (tmp_path / "SUITE.md").read_text()
