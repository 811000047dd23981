"""Load test of `patchify serve` on loopback: concurrent clients searching by vector and by image (with a query
box), adds streaming in at the same time; then every answered add is checked to be in the index, before and after
a restart. Bounded: it stops after --seconds and stops the server it started.

    PYTHONPATH=python python benchmarks/bench_serve.py [--clients 16] [--seconds 30] [--synthetic 2000]
    PYTHONPATH=python python benchmarks/bench_serve.py --index INDEX_DIR ...   # an index of yours, its own backbone

The server is a real uvicorn process (tests/serve_thumbnail.py) over an index of the 20 shipped photos plus
--synthetic images of random patch vectors (14 patches each, L2), encoded by the tests' thumbnail backbone: the
load test measures the service (HTTP, uploads, decoding, locking, search, saving), not the backbone. With the real
DINOv2 backbone an image query or an add costs ~0.1-0.2 s more per image on this CPU, which would only measure
the backbone; `--index` measures that instead (`patchify serve` on a copy of a saved index, e.g. the real-backbone
index of data/photos). Overhead over the library: the server's p50 for one client at a time minus the same query's p50
through the library called in this process (same index, same request: decode + crop + search, or search by vector).
"""
from __future__ import annotations

import argparse
import io
import json
import platform
import shutil
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from conftest import PHOTOS, ThumbnailBackbone  # noqa: E402
from serve_thumbnail import CliServer, ThumbnailServer, build_index  # noqa: E402

from patchify import Patchify, _core  # noqa: E402
from patchify.images import decode_bytes  # noqa: E402
from patchify.records import NewImage, PatchTable  # noqa: E402

K = 10


def build(directory: Path, synthetic: int, seed: int = 0) -> Path:
    """The photos (the whitening learns on them), then `synthetic` images of random unit patch vectors."""
    build_index(directory)
    engine = Patchify.load(directory, backbone=ThumbnailBackbone())
    rng = np.random.default_rng(seed)
    boxes, grid, cell = _core.patch_boxes(480, 640, list(engine.grids), 0.0)
    per = len(boxes)
    for start in range(0, synthetic, 500):
        n = min(500, synthetic - start)
        vectors = rng.standard_normal((n * per, 192)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        table = PatchTable(np.repeat(np.arange(n), per), np.tile(boxes, (n, 1)), np.tile(grid, n), np.tile(cell, n))
        engine.add_embeddings(vectors, table, [NewImage(f"synthetic/{start + i}", 640, 480) for i in range(n)])
    engine.save(directory)
    return directory


class Queries:
    """The requests every client draws from: photo crops (JPEG bytes + a box) and descriptor vectors."""

    def __init__(self, dim: int, seed: int = 1) -> None:
        rng = np.random.default_rng(seed)
        self.images = []
        for path in sorted(PHOTOS.glob("*"))[:10]:
            data = path.read_bytes()
            width, height = Image.open(io.BytesIO(data)).size
            x0, y0 = int(rng.integers(0, width // 2)), int(rng.integers(0, height // 2))
            box = (x0, y0, x0 + width // 3, y0 + height // 3)
            self.images.append((path.name, data, box))
        self.vectors = rng.standard_normal((64, dim)).astype(np.float32)

    def new_image(self, seed: int) -> bytes:
        """A distinct image to add: a seeded crop of a photo, as JPEG."""
        rng = np.random.default_rng(10_000 + seed)
        path = sorted(PHOTOS.glob("*"))[seed % 20]
        pixels = np.asarray(Image.open(path).convert("RGB"))
        h, w = pixels.shape[:2]
        y, x = int(rng.integers(0, h // 4)), int(rng.integers(0, w // 4))
        out = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(pixels[y: y + h // 2 + 16, x: x + w // 2 + 16])).save(out, "JPEG")
        return out.getvalue()


def image_request(client: Any, queries: Queries, i: int) -> Any:
    name, data, box = queries.images[i % len(queries.images)]
    return client.post("/api/search", files={"image": (name, data)},
                       data={"k": str(K), "box": ",".join(map(str, box))})


def vector_request(client: Any, queries: Queries, i: int) -> Any:
    return client.post("/api/search/vector", json={"vectors": [queries.vectors[i % 64].tolist()], "k": K})


def percentiles(seconds: list[float]) -> dict[str, float]:
    if not seconds:
        return {"n": 0}
    ms = np.asarray(seconds) * 1000
    return {"n": len(ms), "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "max_ms": float(ms.max())}


def library_baseline(engine: Patchify, queries: Queries, repeats: int) -> dict[str, dict[str, float]]:
    """The same work through the library in this process: what the server adds on top is the overhead."""
    times: dict[str, list[float]] = defaultdict(list)
    for i in range(repeats):
        started = time.perf_counter()
        engine.search_batch(queries.vectors[i % 64][None], k=K)
        times["vector"].append(time.perf_counter() - started)
        name, data, (x0, y0, x1, y1) = queries.images[i % len(queries.images)]
        started = time.perf_counter()
        pixels = decode_bytes(data, name)
        engine.search(np.ascontiguousarray(pixels[y0:y1, x0:x1]), k=K)
        times["image"].append(time.perf_counter() - started)
    return {kind: percentiles(values) for kind, values in times.items()}


def sequential(url: str, queries: Queries, repeats: int) -> dict[str, dict[str, float]]:
    import httpx

    times: dict[str, list[float]] = defaultdict(list)
    with httpx.Client(base_url=url, timeout=60) as client:
        for i in range(repeats):
            for kind, request in (("vector", vector_request), ("image", image_request)):
                started = time.perf_counter()
                request(client, queries, i).raise_for_status()
                times[kind].append(time.perf_counter() - started)
    return {kind: percentiles(values) for kind, values in times.items()}


def load(url: str, queries: Queries, clients: int, seconds: float, adders: int) -> dict[str, Any]:
    """`clients` threads searching (half by vector, half by image) and `adders` threads adding, for `seconds`."""
    import httpx

    times: dict[str, list[float]] = defaultdict(list)
    errors: list[str] = []
    acknowledged: list[tuple[int, int]] = []  # (image id, bytes length)
    stop = time.monotonic() + seconds
    lock = threading.Lock()

    def run(kind: str, request: Callable[[Any, int], Any]) -> None:
        mine: list[float] = []
        i = 0
        with httpx.Client(base_url=url, timeout=120) as client:
            while time.monotonic() < stop:
                started = time.perf_counter()
                try:
                    response = request(client, i)
                    ok = response.status_code == 200
                    detail = "" if ok else f"{kind}: {response.status_code} {response.text[:200]}"
                except httpx.HTTPError as exc:
                    ok, detail = False, f"{kind}: {type(exc).__name__}: {exc}"
                elapsed = time.perf_counter() - started
                with lock:
                    if ok:
                        mine.append(elapsed)
                        if kind == "add":
                            added = response.json()["added"]
                            acknowledged.extend((a["id"], 0) for a in added)
                    else:
                        errors.append(detail)
                i += 1
        with lock:
            times[kind].extend(mine)

    def add(client: Any, i: int, offset: int) -> Any:
        return client.post("/api/images", files=[("images", (f"add{offset}-{i}.jpg",
                                                             queries.new_image(offset * 100_000 + i)))])

    threads = []
    for c in range(clients):
        if c % 2:
            threads.append(threading.Thread(target=run, args=("image", lambda cl, i: image_request(cl, queries, i))))
        else:
            threads.append(threading.Thread(target=run, args=("vector",
                                                              lambda cl, i, c=c: vector_request(cl, queries, i + c))))
    for a in range(adders):
        threads.append(threading.Thread(target=run, args=("add", lambda cl, i, a=a: add(cl, i, a))))
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    summary = {kind: {**percentiles(values), "per_s": len(values) / wall} for kind, values in times.items()}
    searches = sum(len(times[k]) for k in ("vector", "image"))
    return {"seconds": wall, "by_kind": summary, "search_per_s": searches / wall, "errors": len(errors),
            "error_samples": errors[:5], "acknowledged_ids": [i for i, _ in acknowledged]}


def check_lost(url: str, ids: list[int], expected_images: int) -> dict[str, int]:
    import httpx

    with httpx.Client(base_url=url, timeout=60) as client:
        missing = [i for i in ids if client.get(f"/api/images/{i}").status_code != 200]
        info = client.get("/api/info").json()
    return {"lost": len(missing), "n_images": info["n_images"], "expected_images": expected_images}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=16, help="concurrent searching clients (half vector, half "
                                                                 "image)")
    parser.add_argument("--adders", type=int, default=1, help="clients adding images at the same time")
    parser.add_argument("--seconds", type=float, default=30.0, help="how long the load runs")
    parser.add_argument("--synthetic", type=int, default=2000, help="synthetic images beside the 20 photos")
    parser.add_argument("--repeats", type=int, default=100, help="one-at-a-time requests for the overhead")
    parser.add_argument("--index", type=Path, default=None,
                        help="serve a copy of this saved index with its own backbone (patchify serve) instead of "
                             "the thumbnail-backbone index built here")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    try:
        if args.index is None:
            index_dir = build(workdir / "index", args.synthetic)
            engine = Patchify.load(index_dir, backbone=ThumbnailBackbone())
            server = ThumbnailServer(index_dir)
        else:
            index_dir = Path(shutil.copytree(args.index, workdir / "index"))
            engine = Patchify.load(index_dir)
            server = CliServer(index_dir)
        base_images = engine.n_images
        described = {"images": base_images, "patches": engine.n_patches, "dim": engine.input_dim,
                     "kind": engine.index_config.kind, "backbone": engine.backbone.name}
        queries = Queries(int(engine.input_dim or 0))
        direct = library_baseline(engine, queries, args.repeats)
        del engine
        server.start(timeout=300)
        try:
            one_at_a_time = sequential(server.url, queries, args.repeats)
            loaded = load(server.url, queries, args.clients, args.seconds, args.adders)
            ids = loaded.pop("acknowledged_ids")
            live = check_lost(server.url, ids, base_images + len(ids))
            server.stop()
            server.start(timeout=300)
            restarted = check_lost(server.url, ids, base_images + len(ids))
        finally:
            server.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result = {
        "command": "benchmarks/bench_serve.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.machine()}, {_core.hardware_threads()} hardware threads (shared)",
        "index": described,
        "clients": args.clients, "adders": args.adders,
        "library_p50_ms": {k: v["p50_ms"] for k, v in direct.items()},
        "server_one_client": one_at_a_time,
        "overhead_p50_ms": {k: one_at_a_time[k]["p50_ms"] - direct[k]["p50_ms"] for k in direct},
        "load": loaded,
        "added": len(ids), "lost_live": live["lost"], "lost_after_restart": restarted["lost"],
        "images_after_restart": restarted["n_images"], "expected_images": restarted["expected_images"],
    }
    _print(result)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def _print(r: dict[str, Any]) -> None:
    i = r["index"]
    print(f"{r['command']}  ({r['machine']}; index {i['images']} images, {i['patches']} patches, {i['kind']}, "
          f"d={i['dim']}, backbone {i['backbone']})")
    print("one request at a time, p50 ms:  library | server | overhead")
    for kind in ("vector", "image"):
        print(f"  {kind:<6} {r['library_p50_ms'][kind]:8.2f} | {r['server_one_client'][kind]['p50_ms']:7.2f} | "
              f"{r['overhead_p50_ms'][kind]:7.2f}")
    load_ = r["load"]
    print(f"load: {r['clients']} searching clients + {r['adders']} adding, {load_['seconds']:.1f} s: "
          f"{load_['search_per_s']:.0f} searches/s, {load_['errors']} errors")
    for kind, s in load_["by_kind"].items():
        print(f"  {kind:<6} n={s['n']:<6} {s['per_s']:7.1f}/s  p50 {s['p50_ms']:7.1f} ms  p99 {s['p99_ms']:7.1f} ms")
    print(f"added {r['added']} images; lost while serving: {r['lost_live']}, after a restart: "
          f"{r['lost_after_restart']} (index holds {r['images_after_restart']}, expected {r['expected_images']})")
    for sample in load_["error_samples"]:
        print(f"  error: {sample}")


if __name__ == "__main__":
    outcome = main()
    sys.exit(0 if outcome["load"]["errors"] == 0 and outcome["lost_after_restart"] == 0 else 1)
