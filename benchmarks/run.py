"""Runs the benchmark suite and writes markdown tables of its figures.

    PYTHONPATH=python python benchmarks/run.py              # full suite -> benchmarks/results/suite_*.json, SUITE.md
    PYTHONPATH=python python benchmarks/run.py --quick      # CI-sized smoke run of every benchmark (a minute or two)
    PYTHONPATH=python python benchmarks/run.py --only tiler flat --out /tmp/bench
    PYTHONPATH=python python benchmarks/run.py --tables-only   # rewrite SUITE.md from the JSON already there

The indexing benchmark loads the real backbone: set PATCHIFY_CACHE_DIR to reuse an existing ONNX export.

Each benchmark runs as its own script in a subprocess (as a user would run it, with a fresh heap, and killed
after --timeout-min): its JSON goes to OUT/suite_<name>.json, its console output to OUT/suite_<name>.log, and
OUT/SUITE.md gets one section per benchmark: the command, the machine (CPU model from /proc/cpuinfo, core count),
the date, and the figures as ratios against the baseline measured in the same run. The quick run writes to
benchmarks/results/quick/ so it never overwrites the full figures.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import tables  # noqa: E402


@dataclass(frozen=True)
class Benchmark:
    name: str
    script: str
    full: tuple[str, ...]
    quick: tuple[str, ...]
    needs_backbone: bool = False  # the real DINOv2 export (minutes on first use, slow on a CPU)
    timeout_min: float = 10.0  # full run; --timeout-min overrides it for every benchmark


# Full arguments are sized to stay under ~10 minutes each on the 2-core CI machine (search_scaling: ~12 min when
# the machine is shared, hence its longer limit). Left out of the full run: bench_ivfpq at 100k images (~11 min to
# train and fill, see RESULTS.md) and the 1M search-scaling rows (--million: tens of GB).
SUITE = (  # the new end-to-end benchmarks first: if time runs out, the older ones are in RESULTS.md
    Benchmark("indexing", "bench_indexing.py", (), ("--skip-real", "--cheap-images", "4", "--repeats", "1",
                                                    "--levels", "0", "2"), needs_backbone=True),
    Benchmark("search_scaling", "bench_search_scaling.py", (), ("--quick",), timeout_min=20.0),
    Benchmark("tiler", "bench_tiler.py", (), ("--max-level", "1", "--repeats", "1")),
    Benchmark("flat", "bench_flat.py", ("--images", "100000", "--repeats", "40"),
              ("--images", "2000", "--dim", "64", "--repeats", "5", "--batch-repeats", "1")),
    Benchmark("ivfpq", "bench_ivfpq.py", ("--images", "20000", "--nlist", "2048"),
              ("--images", "2000", "--dim", "64", "--m", "16", "--nlist", "64", "--queries", "20", "--batches", "1",
               "--rounds", "1", "--train-iterations", "3")),
    # A local Ray cluster of 2 CPUs; the real backbone encodes 8 images (--quick: the cheap encoder only).
    Benchmark("ray", "bench_ray.py", ("--queries", "50"),
              ("--parts", "index-cheap,search", "--cheap-images", "20", "--images", "2000", "--dim", "64",
               "--queries", "10", "--rounds", "1"), needs_backbone=True),
)
CHEAP = ("tiler", "flat", "ivfpq")  # no model, seconds in --quick: what benchmarks/test_bench_suite.py runs


def machine() -> str:
    """CPU model (from /proc/cpuinfo) and core count, e.g. 'AMD EPYC 7B13, 2 cores'."""
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"


def run_one(bench: Benchmark, quick: bool, out: Path, timeout_s: float) -> dict:
    """Runs one benchmark script; returns its run record (command, seconds, status) for SUITE.md."""
    json_path = out / f"suite_{bench.name}.json"
    args = [*(bench.quick if quick else bench.full), "--json", str(json_path)]
    shown = f"python benchmarks/{bench.script} {shlex.join(args)}".replace(str(ROOT) + "/", "")
    from _source_tree import HAS_INPLACE_BUILD, SOURCE

    # The scripts import the same patchify as this process: the in-place build if there is one, else the installed.
    paths = [str(SOURCE)] if HAS_INPLACE_BUILD else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [*paths, os.environ.get("PYTHONPATH")]))}
    record = {"name": bench.name, "command": shown,
              "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="minutes"),
              "load_average_before": os.getloadavg()[0]}
    print(f"== {bench.name}: {shown}", flush=True)
    json_path.unlink(missing_ok=True)  # a failed run must not leave an older run's figures behind as its own
    started = time.perf_counter()
    with open(out / f"suite_{bench.name}.log", "w") as log:
        # Own session, so a timeout stops the benchmark's own subprocesses too (bench_search_scaling has some).
        proc = subprocess.Popen([sys.executable, str(HERE / bench.script), *args], stdout=log,
                                stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout_s)
            record["status"] = "ok" if code == 0 and json_path.exists() else f"exit {code}"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            record["status"] = f"timed out after {timeout_s / 60:.0f} min"
    record["seconds"] = time.perf_counter() - started
    print(f"   {record['status']} in {record['seconds']:.0f} s", flush=True)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CI-sized smoke run of every benchmark")
    parser.add_argument("--only", nargs="+", choices=[b.name for b in SUITE], help="run only these")
    parser.add_argument("--skip", nargs="+", default=[], choices=[b.name for b in SUITE])
    parser.add_argument("--skip-backbone", action="store_true", help="skip benchmarks needing the real backbone")
    parser.add_argument("--out", type=Path, default=None,
                        help="results folder (default benchmarks/results, or benchmarks/results/quick with --quick)")
    parser.add_argument("--timeout-min", type=float, default=None,
                        help="per benchmark (default: 10, search_scaling 20; 5 with --quick); longer ones are stopped")
    parser.add_argument("--tables-only", action="store_true", help="only rewrite SUITE.md from OUT's JSON")
    args = parser.parse_args(argv)

    out = args.out or (HERE / "results" / "quick" if args.quick else HERE / "results")
    out.mkdir(parents=True, exist_ok=True)
    runs_path = out / "suite_runs.json"  # command, date and status of each benchmark's latest run
    runs = json.loads(runs_path.read_text()) if runs_path.exists() else {}
    if not args.tables_only:
        selected = [b for b in SUITE if (not args.only or b.name in args.only) and b.name not in args.skip
                    and not (args.skip_backbone and b.needs_backbone)]
        for bench in selected:
            limit = args.timeout_min or (5.0 if args.quick else bench.timeout_min)
            record = run_one(bench, args.quick, out, limit * 60)
            record["machine"] = machine()
            runs[bench.name] = record
            runs_path.write_text(json.dumps(runs, indent=2) + "\n")
    suite_md = out / "SUITE.md"
    suite_md.write_text(tables.suite_markdown(runs, out))
    print(f"wrote {suite_md}")
    return 0 if all(r.get("status") == "ok" for r in runs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
