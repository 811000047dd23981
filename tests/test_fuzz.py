"""Fuzzing the edges that read untrusted bytes: image decoding (`load_rgb`), the tiler on whatever decodes, and
loading and searching a damaged saved index.

Seeded and bounded (a few thousand cases, seconds). Every case runs in a worker process of a pool, and each chunk of
cases has a deadline, so a hang or a crash (a segfault kills the worker, its chunk never returns) fails the test
instead of blocking the run. tools/sanitize.sh runs this file against an ASan/UBSan build of the core.

Contracts checked:
  load_rgb           fails only with ImageError, whose message names the file
  tiling             of every decoded image: works (boxes inside the image, finite pixels) or raises a ValueError
                     (CoreError) with a message
  Patchify.load      of a damaged index, verify=False then a search by vector, and verify=True: fails only with a
                     PatchifyError (an IndexFormatError names the index folder); verify=True always refuses a data
                     file whose bytes changed, naming it
"""
from __future__ import annotations

import io
import multiprocessing
import os
import sys
import random
import shutil
import tempfile
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from PIL import Image

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "indices" / "v2"
PHOTOS = Path(__file__).resolve().parents[1] / "data" / "photos"
SEED = 20240601
N_RANDOM, N_TRUNCATED, N_FLIPPED = 300, 700, 1000  # image cases
N_INDEX_CASES = 300  # per index kind
# Seeds outside that range whose cases once failed (a longer run found them): kept as regression cases.
REGRESSION_SEEDS = {"flat": [20251071], "ivfpq": [20251956]}
# 20251956 makes faiss ask for 512 GB: a MemoryError normally, but under ASan a throwing operator new cannot return
# bad_alloc (allocator_may_return_null covers malloc only) and aborts, so tools/sanitize.sh leaves it out.
if "asan" in os.environ.get("LD_PRELOAD", ""):
    REGRESSION_SEEDS["ivfpq"] = []
CHUNK = 50
# Per chunk of CHUNK cases; a normal build needs well under a second per chunk. Generous for ASan (~5x slower).
CHUNK_DEADLINE_S = 120
WORKERS = 2


# ------------------------------------------------------------------------------------------------ the worker side
def _init_worker(package_root: str) -> None:
    # A spawned worker rebuilds sys.path from scratch; put the tested patchify (installed, or the in-place build)
    # first, so that it never picks up a source tree without the compiled _core.
    sys.path.insert(0, package_root)
    os.environ["OMP_NUM_THREADS"] = "1"
    if "asan" not in os.environ.get("LD_PRELOAD", ""):
        # A corrupt size field must fail as an error, not by taking the machine's memory (ASan reserves terabytes
        # of address space, so under it the limit is ASan's allocator's, set by tools/sanitize.sh).
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))


def _failure(case: str, exc: BaseException | None = None, note: str = "") -> str:
    if exc is None:
        return f"{case}: {note}"
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)[-3:])
    return f"{case}: {note}{type(exc).__name__}: {exc}\n{tb}"


def _tile_checks(case: str, pixels: np.ndarray, rng: random.Random) -> list[str]:
    from patchify.errors import CoreError
    from patchify.preprocess import Preprocess
    from patchify.tiling import patch_boxes, tile_images

    height, width = pixels.shape[:2]
    grids = sorted(rng.sample(range(1, 9), rng.randint(1, 3)))
    overlap = rng.choice([0.0, 0.0, 0.1, 0.25, 0.49])
    view = pixels
    if rng.random() < 0.3 and height > 2 and width > 2:  # a strided view: the core must honour strides
        view = pixels[rng.randint(0, 1):: rng.randint(1, 2), rng.randint(0, 1):: rng.randint(1, 2)]
    try:
        boxes, grid, cell = patch_boxes(view.shape[0], view.shape[1], grids, overlap)
        batch = tile_images([view], grids, Preprocess(input_size=rng.choice([8, 14, 16])), overlap=overlap,
                            num_threads=1)
    except (ValueError, CoreError) as exc:
        if not str(exc).strip():
            return [_failure(case, exc, f"tiling a {view.shape} image: empty message ")]
        return []
    except Exception as exc:  # noqa: BLE001 - any other type is the finding
        return [_failure(case, exc, f"tiling a {view.shape} image: ")]
    problems = []
    if len(boxes) != sum(g * g for g in grids) or not np.array_equal(boxes, batch.boxes):
        problems.append(_failure(case, note=f"tiling {view.shape}: {len(boxes)} boxes for grids {grids}"))
    h, w = view.shape[:2]
    if (boxes[:, 0] < 0).any() or (boxes[:, 1] < 0).any() or (boxes[:, 2] > w).any() or (boxes[:, 3] > h).any() \
            or (boxes[:, 2] <= boxes[:, 0]).any() or (boxes[:, 3] <= boxes[:, 1]).any():
        problems.append(_failure(case, note=f"tiling {view.shape}: a box outside the image or empty"))
    if not np.isfinite(batch.pixels).all():
        problems.append(_failure(case, note=f"tiling {view.shape}: non-finite pixels"))
    return problems


def _image_chunk(cases: list[tuple[str, bytes, str]]) -> list[str]:
    from patchify.errors import ImageError
    from patchify.images import load_rgb

    failures: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for case, data, suffix in cases:
            path = Path(tmp) / f"{case}{suffix}"
            path.write_bytes(data)
            try:
                pixels = load_rgb(path)
            except ImageError as exc:
                if str(path) not in str(exc):
                    failures.append(_failure(case, exc, "the error does not name the file: "))
                continue
            except Exception as exc:  # noqa: BLE001 - any other type is the finding
                failures.append(_failure(case, exc, "load_rgb raised "))
                continue
            if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8 or \
                    not pixels.flags.c_contiguous:
                failures.append(_failure(case, note=f"load_rgb returned {pixels.dtype} {pixels.shape}"))
                continue
            failures += _tile_checks(case, pixels, random.Random(case))
            path.unlink()
    return failures


def _mutate(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    kind = rng.choice(["truncate", "flip", "flip", "zero", "append"])
    if kind == "truncate" or not data:
        cut = rng.choice([0, rng.randrange(len(data) + 1), max(len(data) - rng.randint(1, 16), 0)])
        return f"truncate@{cut}", data[:cut]
    if kind == "append":
        return "append", data + bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 64)))
    out = bytearray(data)
    if kind == "flip":
        # Headers hold the sizes and offsets: flip there more often than the payload's share would.
        positions = [rng.randrange(min(len(out), 256)) if rng.random() < 0.5 else rng.randrange(len(out))
                     for _ in range(rng.randint(1, 4))]
        for pos in positions:
            out[pos] ^= 1 << rng.randrange(8)
        return f"flip@{positions}", bytes(out)
    start = rng.randrange(len(out))
    stop = min(len(out), start + rng.choice([1, 8, 64, 4096]))
    out[start:stop] = bytes(stop - start)
    return f"zero@{start}:{stop}", bytes(out)


def _index_chunk(args: tuple[str, list[int]]) -> list[str]:
    import json

    from conftest import ThumbnailBackbone
    from patchify import Patchify
    from patchify.errors import IndexFormatError, PatchifyError

    kind, seeds = args
    source = FIXTURES / kind
    listed = [*json.loads((source / "manifest.json").read_text())["files"], "manifest.json"]
    query = np.random.default_rng(0).standard_normal(ThumbnailBackbone.dim).astype(np.float32)
    query /= np.linalg.norm(query)
    failures: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            rng = random.Random(seed)
            folder = Path(tmp) / f"{kind}-{seed}"
            shutil.copytree(source, folder)
            name = rng.choice(listed)
            original = (folder / name).read_bytes()
            how, damaged = _mutate(original, rng)
            (folder / name).write_bytes(damaged)
            case = f"{kind} seed {seed} {name} {how}"
            for verify in (False, True):
                try:
                    engine = Patchify.load(folder, backbone=ThumbnailBackbone(), num_threads=1,  # type: ignore[arg-type]
                                           verify=verify)
                    hits = engine.search(query, k=5)
                    if any(not 0 <= h.image_id < engine.n_images for h in hits):
                        failures.append(_failure(case, note=f"verify={verify}: hit outside the images"))
                    if verify and name != "manifest.json" and damaged != original:
                        failures.append(_failure(case, note="verify=True loaded a file whose bytes changed"))
                except IndexFormatError as exc:
                    if str(folder) not in str(exc):
                        failures.append(_failure(case, exc, f"verify={verify}: the error names no file: "))
                    elif verify and name != "manifest.json" and name not in str(exc) and \
                            "manifest.json" not in str(exc):
                        failures.append(_failure(case, exc, f"verify=True names another file than {name}: "))
                except PatchifyError:
                    pass  # e.g. a flipped backbone identity: a BackboneMismatchError is the right answer
                except Exception as exc:  # noqa: BLE001 - any other type is the finding
                    failures.append(_failure(case, exc, f"verify={verify}: raw "))
            shutil.rmtree(folder)
    return failures


# ------------------------------------------------------------------------------------------------ the test side
def _run(fn: Callable[[Any], list[str]], chunks: list[Any]) -> list[str]:
    failures: list[str] = []
    # spawn, not fork: the test process may already run faiss/OpenMP threads, which a fork can deadlock.
    import patchify

    package_root = str(Path(patchify.__file__).resolve().parents[1])
    with multiprocessing.get_context("spawn").Pool(WORKERS, initializer=_init_worker,
                                                   initargs=(package_root,)) as pool:
        pending = [pool.apply_async(fn, (chunk,)) for chunk in chunks]
        for number, result in enumerate(pending):
            try:
                failures += result.get(timeout=CHUNK_DEADLINE_S)
            except multiprocessing.TimeoutError:
                pool.terminate()
                pytest.fail(f"chunk {number} of {fn.__name__} did not finish in {CHUNK_DEADLINE_S} s: a hang, or a "
                            "crash that killed its worker")
    return failures


def _small_encodings() -> list[tuple[str, bytes]]:
    """Downsized photos (fast to decode) as JPEG (baseline, progressive), PNG (RGB, palette, RGBA) and GIF."""
    encoded = []
    for path in sorted(PHOTOS.glob("*"))[::4]:
        with Image.open(path) as img:
            small = img.convert("RGB")
            small.thumbnail((72, 72))
        variants: list[tuple[str, Image.Image, dict[str, Any]]] = [
            (".jpg", small, {"quality": 80}), (".jpg", small, {"quality": 70, "progressive": True}),
            (".png", small, {}), (".png", small.quantize(16), {}), (".png", small.convert("RGBA"), {}),
            (".gif", small.quantize(32), {})]
        for suffix, image, options in variants:
            buffer = io.BytesIO()
            image.save(buffer, format={"jpg": "JPEG"}.get(suffix[1:], suffix[1:].upper()), **options)
            encoded.append((suffix, buffer.getvalue()))
    return encoded


def test_fuzz_image_decoding_and_tiling():
    rng = random.Random(SEED)
    sources = _small_encodings()
    magics = [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"GIF89a", b"BM", b"II*\x00", b"RIFF"]
    cases: list[tuple[str, bytes, str]] = []
    for i in range(N_RANDOM):
        data = rng.choice(magics) + bytes(rng.getrandbits(8) for _ in range(rng.choice([0, 8, 64, 600])))
        cases.append((f"random{i}", data, ".bin"))
    for i in range(N_TRUNCATED):
        suffix, data = rng.choice(sources)
        cases.append((f"truncated{i}", data[: rng.randrange(len(data))], suffix))
    for i in range(N_FLIPPED):
        suffix, data = rng.choice(sources)
        how, damaged = _mutate(data, rng)
        cases.append((f"mutated{i}-{how.split('@')[0]}", damaged, suffix))
    # The originals too: the tiler checks must pass on good images, or they check nothing.
    cases += [(f"original{i}", data, suffix) for i, (suffix, data) in enumerate(sources)]
    failures = _run(_image_chunk, [cases[i:i + CHUNK] for i in range(0, len(cases), CHUNK)])
    assert not failures, f"{len(failures)} of {len(cases)} cases failed:\n" + "\n".join(failures[:10])


@pytest.mark.parametrize("kind", ["flat", "ivfpq"])
def test_fuzz_damaged_index_files(kind):
    seeds = [SEED + i for i in range(N_INDEX_CASES)] + REGRESSION_SEEDS[kind]
    failures = _run(_index_chunk, [(kind, seeds[i:i + CHUNK]) for i in range(0, len(seeds), CHUNK)])
    assert not failures, f"{len(failures)} of {len(seeds)} cases failed:\n" + "\n".join(failures[:10])
