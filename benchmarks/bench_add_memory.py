"""Peak memory of `Patchify.add_images` on many images: is it bounded by a batch, or by the call?

    PYTHONPATH=python python benchmarks/bench_add_memory.py [--images 2000] [--level 3] [--json out.json]
                                                            [--source OTHER_CHECKOUT/python]

Indexes --images JPEG files (320x240 crops of data/photos, written once to --image-dir) at --level with the cheap
384-d encoder of bench_indexing.py (the real backbone's dimension; nearly free to run) into a flat float32 index,
in a fresh process, and reports the process's peak RSS growth during the call against the index's own size
(which any design must hold). `overhead` = peak growth - index bytes: what the call held beyond the index.
--source runs the same measurement against another checkout's package (e.g. the commit before the streaming
redesign, built in place), so before/after come from one command on one machine.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """n JPEGs: random 320x240 crops (resized) of the shipped photos; written once, reused."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    files = [folder / f"{i:05d}.jpg" for i in range(n)]
    if all(f.is_file() for f in files):
        return files
    import numpy as np

    rng = np.random.default_rng(seed)
    photos = [Image.open(p).convert("RGB") for p in sorted((ROOT / "data" / "photos").glob("*"))]
    for i, path in enumerate(files):
        photo = photos[i % len(photos)]
        w, h = photo.size
        cw, ch = int(w * rng.uniform(0.4, 0.9)), int(h * rng.uniform(0.4, 0.9))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        photo.crop((x, y, x + cw, y + ch)).resize((320, 240)).save(path, quality=85)
    return files


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(files: list[Path], level: int) -> dict[str, float]:
    """Runs in the child process: one add_images call, peak RSS against the RSS just before it."""
    import inspect

    import patchify  # first, from PYTHONPATH: bench_indexing would put this checkout's python/ first
    from patchify import Patchify

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_indexing import CheapBackbone

    # The redesign renamed `levels=` (max level) to `level=`: accept either checkout.
    keyword = "level" if "level" in inspect.signature(Patchify.__init__).parameters else "levels"
    engine = Patchify(backbone=CheapBackbone(), index="flat", **{keyword: level})  # type: ignore[arg-type]
    engine.add_images(files[:2])  # warm up (imports, thread pool, first allocations)
    before = _rss_bytes()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    report = engine.add_images(files[2:])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    index_bytes = engine.index.nbytes()  # type: ignore[union-attr]
    growth = max(peak, peak_before) - before
    return {"package": str(Path(patchify.__file__).parent), "images": report.n_images,
            "patches": report.n_patches, "seconds": round(report.seconds, 2),
            "rss_before_mb": round(before / 2**20, 1), "peak_growth_mb": round(growth / 2**20, 1),
            "index_mb": round(index_bytes / 2**20, 1), "overhead_mb": round((growth - index_bytes) / 2**20, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--level", type=int, default=3)
    parser.add_argument("--image-dir", type=Path, default=Path("/tmp/patchify_bench_add_memory"))
    parser.add_argument("--source", action="append", default=[],
                        help="a checkout's python/ folder to measure too (repeatable); this checkout is always run")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    files = make_images(args.image_dir, args.images)
    if args.child is not None:
        print(json.dumps(measure(files, args.level)))
        return
    rows = {}
    for label, source in [("this checkout", str(ROOT / "python")), *[(s, s) for s in args.source]]:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([source, os.environ.get("PYTHONPATH", "")])}
        out = subprocess.run([sys.executable, __file__, "--child", "1", "--images", str(args.images), "--level",
                              str(args.level), "--image-dir", str(args.image_dir)], env=env, check=True,
                             capture_output=True, text=True).stdout
        rows[label] = json.loads(out.strip().splitlines()[-1])
        print(f"{label}: {rows[label]}", flush=True)
    result = {"command": " ".join(sys.argv), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
              "level": args.level, "results": rows}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
