"""`patchify serve` end to end: a real server process on 127.0.0.1 (tests/serve_thumbnail.py: the thumbnail test
backbone) and a real HTTP client (httpx). Results are checked against the library called directly on the same
index; faults (kill -9 during adds, malformed and hostile uploads) must leave the index loadable and the server
serving."""
from __future__ import annotations

import io
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 'patchify[serve]')")
import httpx  # noqa: E402

from conftest import PHOTOS, ThumbnailBackbone  # noqa: E402
from serve_thumbnail import ThumbnailServer, build_index  # noqa: E402

from patchify import Patchify, store  # noqa: E402
from patchify.serve.state import ReadWriteLock, ServedIndex, Upload  # noqa: E402

FRUITS = PHOTOS / "fruits.jpg"


@pytest.fixture(scope="module")
def built_index(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_index(tmp_path_factory.mktemp("serve") / "index")


@pytest.fixture
def index_dir(built_index: Path, tmp_path: Path) -> Path:
    """A fresh copy per test: tests that add or remove change it."""
    return Path(shutil.copytree(built_index, tmp_path / "index"))


@pytest.fixture
def server(index_dir: Path):
    with ThumbnailServer(index_dir) as running:
        yield running


def jpeg(pixels: np.ndarray, quality: int = 90) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=quality)
    return out.getvalue()


def search(url: str, data: bytes, box: str | None = None, k: int = 5, name: str = "q.jpg") -> httpx.Response:
    form = {"k": str(k)} if box is None else {"k": str(k), "box": box}
    return httpx.post(f"{url}/api/search", files={"image": (name, data)}, data=form, timeout=30)


# ---------------------------------------------------------------------------------------------------- searching
def test_box_search_crops_and_matches_the_library(server: ThumbnailServer, index_dir: Path) -> None:
    """A query box that is exactly fruits.jpg's top-left 2x2 cell finds fruits.jpg there; the answer is what the
    library gives for the same crop (ids, scores, boxes)."""
    data = FRUITS.read_bytes()
    width, height = Image.open(FRUITS).size
    box = (0, 0, width // 2, height // 2)
    response = search(server.url, data, box=",".join(map(str, box)), k=5)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["query"] == {"width": width, "height": height, "box": list(box)}
    best = body["hits"][0]
    assert best["name"].endswith("fruits.jpg") and best["box"] == list(box) and best["level"] == 1
    assert best["url"] == f"/api/images/{best['id']}"

    engine = Patchify.load(index_dir, backbone=ThumbnailBackbone())
    pixels = np.asarray(Image.open(FRUITS).convert("RGB"))[box[1]:box[3], box[0]:box[2]]
    direct = engine.search(np.ascontiguousarray(pixels), k=5)
    assert [h["id"] for h in body["hits"]] == [h.image_id for h in direct]
    assert [h["box"] for h in body["hits"]] == [list(h.box) for h in direct]
    np.testing.assert_allclose([h["score"] for h in body["hits"]], [h.score for h in direct], rtol=1e-6)
    # The whole image: itself first, as the library says.
    whole = search(server.url, data, k=3).json()
    assert whole["hits"][0]["name"].endswith("fruits.jpg") and whole["query"]["box"] is None


def test_vector_and_batch_search_match_the_library(server: ThumbnailServer, index_dir: Path) -> None:
    engine = Patchify.load(index_dir, backbone=ThumbnailBackbone())
    vectors = np.random.default_rng(0).standard_normal((3, 192)).astype(np.float32)
    response = httpx.post(f"{server.url}/api/search/vector", json={"vectors": vectors.tolist(), "k": 4})
    assert response.status_code == 200, response.text
    direct = engine.search_batch(vectors, k=4)
    for got, want in zip(response.json()["results"], direct):
        assert [h["id"] for h in got] == [h.image_id for h in want]
        np.testing.assert_allclose([h["score"] for h in got], [h.score for h in want], rtol=1e-5)

    photos = [PHOTOS / "fruits.jpg", PHOTOS / "baboon.jpg"]
    files = [("images", (p.name, p.read_bytes())) for p in photos]
    batch = httpx.post(f"{server.url}/api/search/batch", files=files, data={"k": "2"}, timeout=30)
    assert batch.status_code == 200, batch.text
    results = batch.json()["results"]
    assert [r["filename"] for r in results] == ["fruits.jpg", "baboon.jpg"]
    assert [r["hits"][0]["name"].split("/")[-1] for r in results] == ["fruits.jpg", "baboon.jpg"]


def test_info_health_metrics_page_and_image_files(server: ThumbnailServer) -> None:
    info = httpx.get(f"{server.url}/api/info").json()
    assert info["n_images"] == 20 and info["backbone"] == "thumbnail-test" and info["levels"] == [0, 1, 2]
    assert info["index_kind"] == "flat" and info["limits"]["max_k"] >= 1
    assert httpx.get(f"{server.url}/api/health").json() == {"status": "ok", "images": 20}
    image = httpx.get(f"{server.url}/api/images/{_id_of(server, 'fruits.jpg')}")
    assert image.status_code == 200 and image.content == FRUITS.read_bytes()
    assert httpx.get(f"{server.url}/api/images/20").status_code == 404
    assert httpx.get(f"{server.url}/api/images/-1").status_code == 404
    for path in ("..%2Fmanifest.json", "manifest.json", "%2Fetc%2Fpasswd"):  # ids only, never paths
        response = httpx.get(f"{server.url}/api/images/{path}")
        assert response.status_code in (404, 422) and "patchify-index" not in response.text
    page = httpx.get(f"{server.url}/")
    assert page.status_code == 200 and "app.js" in page.text
    for name in ("index.html", "app.js", "style.css"):
        text = httpx.get(f"{server.url}/static/{name}").text
        assert "http://" not in text and "https://" not in text, f"{name} must fetch nothing from elsewhere"
    assert httpx.get(f"{server.url}/openapi.json").json()["info"]["title"] == "Patchify"
    search(server.url, FRUITS.read_bytes(), k=0)
    metrics = httpx.get(f"{server.url}/metrics").text  # _id_of searched once (200), then the refused k=0 (422)
    assert 'patchify_requests_total{endpoint="/api/search",method="POST",status="200"} 1.0' in metrics
    assert 'patchify_requests_total{endpoint="/api/search",method="POST",status="422"} 1.0' in metrics
    assert 'patchify_request_seconds_count{endpoint="/api/search"} 2.0' in metrics
    assert "patchify_index_images 20.0" in metrics


def _id_of(server: ThumbnailServer, name: str) -> int:
    hits = search(server.url, (PHOTOS / name).read_bytes(), k=1).json()["hits"]
    return int(hits[0]["id"])


# ---------------------------------------------------------------------------------------------------- bad input
def test_hostile_input_is_refused_and_the_server_keeps_serving(index_dir: Path, tmp_path: Path) -> None:
    good = FRUITS.read_bytes()
    bomb = io.BytesIO()
    Image.new("1", (8000, 8000)).save(bomb, format="PNG")  # 64 MP in a few kB
    with ThumbnailServer(index_dir, max_pixels=10_000_000, max_upload_bytes=2_000_000, max_k=50) as server:
        cases = {
            "not an image": (search(server.url, b"hello, not an image", name="notes.txt"), 422, "notes.txt"),
            "empty": (search(server.url, b"", name="empty.jpg"), 422, "empty"),
            "truncated": (search(server.url, good[: len(good) // 2], name="half.jpg"), 422, "truncated"),
            "bomb": (search(server.url, bomb.getvalue(), name="bomb.png"), 413, "too large"),
            "k = 0": (search(server.url, good, k=0), 422, "k must be"),
            "k absurd": (search(server.url, good, k=10**12), 422, "k must be"),
            "box outside": (search(server.url, good, box="0,0,9999,10"), 422, "not inside"),
            "box empty": (search(server.url, good, box="10,10,10,20"), 422, "not inside"),
            "box garbage": (search(server.url, good, box="a,b"), 422, "four integers"),
            "too big a body": (search(server.url, b"\xff" * 2_100_000), 413, ""),
            "wrong length": (httpx.post(f"{server.url}/api/search/vector", json={"vectors": [[1.0, 2.0]]}), 422,
                             "192"),
            "ragged": (httpx.post(f"{server.url}/api/search/vector", json={"vectors": [[1.0] * 192, [1.0]]}), 422,
                       "dimension"),
            "NaN": (httpx.post(f"{server.url}/api/search/vector", content=b'{"vectors": [[NaN, 1, 2]]}',
                               headers={"content-type": "application/json"}), 422, ""),
            "NaN, right length": (httpx.post(f"{server.url}/api/search/vector",
                                             content=("{\"vectors\": [[NaN" + ", 1" * 191 + "]]}").encode(),
                                             headers={"content-type": "application/json"}), 422, "not finite"),
            "not JSON": (httpx.post(f"{server.url}/api/search/vector", content=b"{",
                                    headers={"content-type": "application/json"}), 422, ""),
            "no file": (httpx.post(f"{server.url}/api/search", data={"k": "3"}), 422, ""),
            "add nothing usable": (httpx.post(f"{server.url}/api/images",
                                              files=[("images", ("x.jpg", good[:300]))]), 422, "x.jpg"),
        }
        for what, (response, status, words) in cases.items():
            assert response.status_code == status, f"{what}: {response.status_code} {response.text[:300]}"
            assert words in response.text, f"{what}: {response.text[:300]}"
        # Still serving, and nothing was added by the refused requests.
        assert search(server.url, good).json()["hits"][0]["name"].endswith("fruits.jpg")
        assert httpx.get(f"{server.url}/api/info").json()["n_images"] == 20
    assert Patchify.load(index_dir, backbone=ThumbnailBackbone()).n_images == 20


# ---------------------------------------------------------------------------------------------------- writing
def distinct_photo(seed: int) -> bytes:
    """A real photo made distinct (bytes and pixels) by a seeded crop."""
    rng = np.random.default_rng(seed)
    pixels = np.asarray(Image.open(PHOTOS / sorted(os.listdir(PHOTOS))[seed % 20]).convert("RGB"))
    h, w = pixels.shape[:2]
    y, x = int(rng.integers(0, h // 4)), int(rng.integers(0, w // 4))
    return jpeg(np.ascontiguousarray(pixels[y: y + h // 2 + 16, x: x + w // 2 + 16]))


def test_add_and_remove_persist_and_are_served(server: ThumbnailServer, index_dir: Path) -> None:
    data = distinct_photo(1)
    files = [("images", ("mine.jpg", data)), ("images", ("broken.jpg", data[:200])),
             ("images", ("notes.txt", b"not an image"))]
    response = httpx.post(f"{server.url}/api/images", files=files, timeout=30)
    assert response.status_code == 200, response.text
    body = response.json()
    assert [(a["id"], a["filename"]) for a in body["added"]] == [(20, "mine.jpg")]
    assert {s["filename"] for s in body["skipped"]} == {"broken.jpg", "notes.txt"}
    assert body["n_patches"] == 14
    stored = body["added"][0]["name"]
    assert stored.startswith("images/") and (index_dir / stored).read_bytes() == data  # a name of ours, not theirs
    assert httpx.get(f"{server.url}/api/images/20").content == data
    assert search(server.url, data, k=1).json()["hits"][0]["id"] == 20
    # Saved before the answer: a second process reads it now.
    assert Patchify.load(index_dir, backbone=ThumbnailBackbone()).n_images == 21

    removed = httpx.delete(f"{server.url}/api/images/20")
    assert removed.status_code == 200 and removed.json() == {"removed": 20, "patches": 14}
    assert httpx.delete(f"{server.url}/api/images/20").status_code == 404
    assert httpx.get(f"{server.url}/api/images/20").status_code == 404
    assert all(h["id"] != 20 for h in search(server.url, data, k=21).json()["hits"])
    server.stop()
    server.start()
    info = httpx.get(f"{server.url}/api/info").json()
    assert (info["n_images"], info["n_records"]) == (20, 21)


def test_write_endpoints_need_the_token_when_one_is_set(index_dir: Path) -> None:
    with ThumbnailServer(index_dir, token="s3cret") as server:
        files = [("images", ("a.jpg", distinct_photo(2)))]
        assert httpx.post(f"{server.url}/api/images", files=files).status_code == 401
        wrong = {"Authorization": "Bearer nope"}
        assert httpx.post(f"{server.url}/api/images", files=files, headers=wrong).status_code == 401
        assert httpx.delete(f"{server.url}/api/images/0", headers=wrong).status_code == 401
        right = {"Authorization": "Bearer s3cret"}
        assert httpx.post(f"{server.url}/api/images", files=files, headers=right, timeout=30).status_code == 200
        assert httpx.delete(f"{server.url}/api/images/0", headers=right).status_code == 200
        assert search(server.url, FRUITS.read_bytes()).status_code == 200  # reads stay open


# ---------------------------------------------------------------------------------------------------- faults
def test_kill_9_during_adds_loses_nothing_saved(index_dir: Path) -> None:
    """Adds stream in from two clients while searches run; the server is killed (SIGKILL) mid-stream, three times
    (each kill lands somewhere else: encoding, appending, storing the file, saving). Restarted each time, the index
    loads, searches, and holds every image whose add was answered, with its file."""
    acknowledged: list[tuple[int, bytes]] = []
    failures: list[str] = []
    for round_ in range(3):
        server = ThumbnailServer(index_dir).start()
        stop = threading.Event()
        answered_before = len(acknowledged)

        def add(first_seed: int, url: str = server.url, stop: threading.Event = stop) -> None:
            seed = first_seed
            with httpx.Client(base_url=url, timeout=30) as client:
                while not stop.is_set():
                    data = distinct_photo(seed)
                    seed += 2
                    try:
                        response = client.post("/api/images", files=[("images", (f"{seed}.jpg", data))])
                    except httpx.TransportError:
                        return  # killed under us: this add was never answered
                    if response.status_code != 200:
                        failures.append(response.text)
                        return
                    acknowledged.append((response.json()["added"][0]["id"], data))

        def searching(url: str = server.url, stop: threading.Event = stop) -> None:
            with httpx.Client(base_url=url, timeout=30) as client:
                while not stop.is_set():
                    try:
                        response = client.post("/api/search/vector", json={"vectors": [[1.0] * 192], "k": 5})
                    except httpx.TransportError:
                        return
                    if response.status_code != 200:
                        failures.append(response.text)
                        return

        threads = [threading.Thread(target=add, args=(1000 * round_ + s,)) for s in (100, 101)]
        threads.append(threading.Thread(target=searching))
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 20
        while len(acknowledged) < answered_before + 4 + round_ and time.monotonic() < deadline and not failures:
            time.sleep(0.01)
        server.kill()  # adds in flight
        stop.set()
        for thread in threads:
            thread.join()
        assert not failures, failures
        assert len(acknowledged) >= answered_before + 4 + round_

        with ThumbnailServer(index_dir) as restarted:
            info = httpx.get(f"{restarted.url}/api/info").json()
            assert info["n_images"] >= 20 + len(acknowledged)
            for image_id, data in acknowledged:
                assert httpx.get(f"{restarted.url}/api/images/{image_id}").content == data
            image_id, data = acknowledged[-1]
            assert search(restarted.url, data, k=1).json()["hits"][0]["id"] == image_id
        stored = {p.name for p in (index_dir / store.OWNED_IMAGES).iterdir()}
        recorded = {Path(r.name).name for r in Patchify.load(index_dir, backbone=ThumbnailBackbone()).images[20:]}
        assert stored == recorded  # unrecorded files a crash left are deleted at start


def test_a_crash_between_the_save_renames_is_recovered(index_dir: Path) -> None:
    """store.atomic_directory retires the old folder, then renames the new one in: a kill between the two leaves
    no index folder, and the next server start puts the retired one back."""
    retired = index_dir.parent / f".{index_dir.name}.old-12345678"
    os.replace(index_dir, retired)
    with pytest.raises(ValueError, match="index folder not found"):
        Patchify.load(index_dir, backbone=ThumbnailBackbone())
    with ThumbnailServer(index_dir) as server:
        assert httpx.get(f"{server.url}/api/info").json()["n_images"] == 20
    assert not retired.exists()
    assert store.recover_interrupted_save(index_dir) is None  # nothing to do on a good folder


def test_batch_search_decodes_one_upload_at_a_time(index_dir: Path) -> None:
    """Each query image is embedded before the next upload is decoded (a batch of large uploads would otherwise
    be held decoded all at once), with the same hits as the library's batch search."""
    backbone = ThumbnailBackbone()
    served = ServedIndex.open(index_dir, backbone=backbone)
    photos = [PHOTOS / name for name in ("fruits.jpg", "baboon.jpg", "apple.jpg")]

    def decoded():
        for done, photo in enumerate(photos):
            assert backbone.calls == calls_before + done, "a second upload was decoded before the first was embedded"
            yield served.decode(Upload(photo.name, photo.read_bytes()))

    calls_before = backbone.calls
    results = served.search_images(decoded(), 3)
    assert backbone.calls == calls_before + len(photos)
    direct = Patchify.load(index_dir, backbone=ThumbnailBackbone()).search_batch(photos, k=3)
    assert [[h.image_id for h in hits] for hits in results] == [[h.image_id for h in hits] for hits in direct]


def test_saves_carry_the_owned_images_over(index_dir: Path) -> None:
    (index_dir / store.OWNED_IMAGES).mkdir()
    (index_dir / store.OWNED_IMAGES / "a.jpg").write_bytes(b"kept")
    engine = Patchify.load(index_dir, backbone=ThumbnailBackbone())
    engine.save(index_dir)
    assert (index_dir / store.OWNED_IMAGES / "a.jpg").read_bytes() == b"kept"
    assert Patchify.load(index_dir, verify=True, backbone=ThumbnailBackbone()).n_images == 20
    # Saved elsewhere, the files go with the records that name them (from the folder it was loaded from), and on
    # from there.
    copy = engine.save(index_dir.parent / "copy")
    assert (copy / store.OWNED_IMAGES / "a.jpg").read_bytes() == b"kept"
    again = engine.save(index_dir.parent / "again")
    assert (again / store.OWNED_IMAGES / "a.jpg").read_bytes() == b"kept"
    # A new index written over that folder owns none of them.
    fresh = Patchify(backbone=ThumbnailBackbone(), level=1)
    fresh.add_images([PHOTOS / "fruits.jpg"])
    fresh.save(copy)
    assert not (copy / store.OWNED_IMAGES).exists()


# ---------------------------------------------------------------------------------------------------- pieces
def test_read_write_lock_excludes_writers_from_readers() -> None:
    lock = ReadWriteLock()
    events: list[str] = []
    both_reading = threading.Barrier(2, timeout=5)

    def reader(name: str) -> None:
        with lock.reading():
            both_reading.wait()  # two readers hold it at once, or this times out
            events.append(f"{name} in")
            time.sleep(0.05)
            events.append(f"{name} out")

    def writer() -> None:
        with lock.writing():
            events.append("writer")

    readers = [threading.Thread(target=reader, args=(n,)) for n in ("r1", "r2")]
    for thread in readers:
        thread.start()
    while len(events) < 2:
        time.sleep(0.001)
    write = threading.Thread(target=writer)
    write.start()
    for thread in [*readers, write]:
        thread.join(5)
    assert events.index("writer") > max(events.index("r1 out"), events.index("r2 out"))


def test_cli_serve_refuses_a_missing_index(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from patchify.cli import main

    assert main(["serve", str(tmp_path / "nothing")]) == 2
    assert "index folder not found" in capsys.readouterr().err


def test_a_sharded_index_is_served_read_only(tmp_path: Path, index_dir: Path) -> None:
    # `patchify serve` on a sharded index (issue "Scale out on Ray"): searched like the one index of the same images
    # (the merge is exact), image files and sizes by global id, adds and removes refused with 405.
    from patchify.distributed import build_sharded_index

    photos = sorted(PHOTOS.glob("*"))
    sharded = tmp_path / "sharded"
    build_sharded_index([str(p) for p in photos], sharded, backbone=ThumbnailBackbone, level=2, shard_size=7)
    single = Patchify.load(index_dir, backbone=ThumbnailBackbone())
    with ThumbnailServer(sharded) as server:
        info = httpx.get(f"{server.url}/api/info").json()
        assert info["read_only"] and info["n_shards"] == 3 and info["n_images"] == len(photos)
        vectors = np.random.default_rng(1).standard_normal((2, 192)).astype(np.float32)
        response = httpx.post(f"{server.url}/api/search/vector", json={"vectors": vectors.tolist(), "k": 5})
        assert response.status_code == 200, response.text
        for got, want in zip(response.json()["results"], single.search_batch(vectors, k=5)):
            assert [h["id"] for h in got] == [h.image_id for h in want]
            np.testing.assert_allclose([h["score"] for h in got], [h.score for h in want], rtol=1e-5)
        last = len(photos) - 1  # in the last shard: its global id is its shard's offset + its own
        hit = response.json()["results"][0][0]
        assert (hit["width"], hit["height"]) == (single.images[hit["id"]].width, single.images[hit["id"]].height)
        image = httpx.get(f"{server.url}/api/images/{last}")
        assert image.status_code == 200 and image.content == photos[last].read_bytes()
        added = httpx.post(f"{server.url}/api/images", files=[("images", ("a.jpg", photos[0].read_bytes()))])
        assert added.status_code == 405 and "read-only" in added.json()["detail"]
        assert httpx.delete(f"{server.url}/api/images/0").status_code == 405
        assert httpx.delete(f"{server.url}/api/images/999999").status_code == 405  # read-only before unknown
        assert httpx.get(f"{server.url}/api/health").json()["images"] == len(photos)
