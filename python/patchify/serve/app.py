"""The HTTP face of a `ServedIndex`: FastAPI routes, the request limits, error -> status mapping and metrics.

The library does the work and the checking (decoding, encoding, k, vector dimension and finiteness, image ids);
this module turns requests into its calls and its errors into 4xx answers that say what was wrong. Sync routes
run in Starlette's thread pool, so searches run in parallel (see state.py for the locking).
"""
from __future__ import annotations

import secrets
import time
from pathlib import Path
from typing import Annotated, Any, Awaitable, Callable, MutableMapping, Optional

import numpy as np
from fastapi import Depends, FastAPI, File, Form, Header, HTTPException, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel

from ..errors import ImageError, ImageTooLargeError, PatchifyError, ReadOnlyIndexError
from ..records import Hit
from .state import ServedIndex, UnknownImageError, Upload

STATIC = Path(__file__).parent / "static"
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class VectorQuery(BaseModel):
    """Descriptors in the backbone's space (as `Patchify.search_vectors` takes them), one row per query."""

    vectors: list[list[float]]
    k: int = 10


def create_app(served: ServedIndex) -> FastAPI:
    """The application for one served index. Each app has its own metrics registry."""
    config = served.config
    engine = served.engine
    # max_body_size: FastAPI answers 413 for a larger body, from Content-Length or while a chunked one streams in,
    # before the multipart parser has spooled more than that.
    app = FastAPI(title="Patchify", version="1", max_body_size=config.max_upload_bytes,
                  description="Patch-wise instance retrieval: find the images that contain this object, and where.")
    registry = CollectorRegistry()
    metrics = _Metrics(registry)
    metrics.update_index(served)

    def check_k(k: int) -> int:
        if not 1 <= k <= config.max_k:
            raise HTTPException(422, f"k must be an integer in [1, {config.max_k}] (this server's limit), got {k}")
        return k

    def require_token(authorization: Annotated[Optional[str], Header()] = None) -> None:
        if config.token is None:
            return
        given = (authorization or "").removeprefix("Bearer ").strip()
        if not secrets.compare_digest(given.encode(), config.token.encode()):
            raise HTTPException(401, "this endpoint needs the server's token: Authorization: Bearer <token>",
                                headers={"WWW-Authenticate": "Bearer"})

    def read(upload: UploadFile) -> Upload:
        # The whole body is already bounded by max_upload_bytes (FastAPI's max_body_size): so is one file.
        return Upload(upload.filename or "upload", upload.file.read())

    def check_count(files: list[UploadFile]) -> None:
        if not 1 <= len(files) <= config.max_files:
            raise HTTPException(422, f"send 1 to {config.max_files} image files, got {len(files)}")

    def hit_json(hit: Hit) -> dict[str, Any]:
        record = served.images[hit.image_id]
        return {"rank": hit.rank, "id": hit.image_id, "name": hit.path, "score": hit.score, "box": list(hit.box),
                "level": hit.level, "grid": hit.grid, "cell": hit.cell, "patch_id": hit.patch_id,
                "width": record.width, "height": record.height, "url": f"/api/images/{hit.image_id}"}

    @app.exception_handler(ImageError)
    async def image_error(request: Request, exc: ImageError) -> JSONResponse:
        status = 413 if isinstance(exc, ImageTooLargeError) else 422
        return JSONResponse({"detail": str(exc)}, status_code=status)

    @app.exception_handler(ReadOnlyIndexError)
    async def read_only(request: Request, exc: ReadOnlyIndexError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=405)

    @app.exception_handler(PatchifyError)
    async def patchify_error(request: Request, exc: PatchifyError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=422)

    @app.exception_handler(ValueError)
    async def value_error(request: Request, exc: ValueError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=422)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/api/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "images": engine.n_images}

    @app.get("/api/info")
    def info() -> dict[str, Any]:
        backbone = engine.backbone
        return {**served.info(), "backbone": backbone.name, "weights": getattr(backbone, "weights", None),
                "levels": list(engine.levels), "grids": list(engine.grids),
                "index_kind": engine.index_config.kind,
                "limits": {"max_upload_bytes": config.max_upload_bytes, "max_pixels": config.max_pixels,
                           "max_files": config.max_files, "max_k": config.max_k, "max_vectors": config.max_vectors},
                "writes_need_token": config.token is not None}

    @app.post("/api/search")
    def search(image: Annotated[UploadFile, File(description="the query image")],
               box: Annotated[Optional[str], Form(description="x0,y0,x1,y1 in the image's pixels (exclusive max); "
                                                              "omit for the whole image")] = None,
               k: Annotated[int, Form()] = 10) -> dict[str, Any]:
        """Searches with an uploaded image, or the box of it the query names (the server crops)."""
        k = check_k(k)
        pixels = served.decode(read(image))
        height, width = pixels.shape[:2]
        crop = _parse_box(box, width, height)
        if crop is not None:
            x0, y0, x1, y1 = crop
            pixels = np.ascontiguousarray(pixels[y0:y1, x0:x1])
        started = time.perf_counter()
        hits = served.search_images([pixels], k)[0]
        return {"query": {"width": width, "height": height, "box": list(crop) if crop else None},
                "hits": [hit_json(hit) for hit in hits], "seconds": time.perf_counter() - started}

    @app.post("/api/search/batch")
    def search_batch(images: Annotated[list[UploadFile], File(description="query images, whole")],
                     k: Annotated[int, Form()] = 10) -> dict[str, Any]:
        k = check_k(k)
        check_count(images)
        uploads = [read(image) for image in images]
        results = served.search_images((served.decode(upload) for upload in uploads), k)  # one decoded at a time
        return {"results": [{"filename": upload.filename, "hits": [hit_json(hit) for hit in hits]}
                            for upload, hits in zip(uploads, results)]}

    @app.post("/api/search/vector")
    def search_vector(query: VectorQuery) -> dict[str, Any]:
        k = check_k(query.k)
        if not 1 <= len(query.vectors) <= config.max_vectors:
            raise HTTPException(422, f"send 1 to {config.max_vectors} vectors, got {len(query.vectors)}")
        lengths = sorted({len(vector) for vector in query.vectors})
        if lengths != [engine.input_dim]:
            raise HTTPException(422, f"vectors must all have the index's dimension {engine.input_dim}; got lengths "
                                     f"{lengths[:10]}")
        results = served.search_vectors(np.asarray(query.vectors, dtype=np.float32), k)
        return {"results": [[hit_json(hit) for hit in hits] for hits in results]}

    @app.post("/api/images", dependencies=[Depends(require_token)])
    def add_images(images: Annotated[list[UploadFile], File(description="images to add")]) -> JSONResponse:
        """Adds images (stored in the index folder) and saves the index; bad files are skipped and reported. 422
        when none could be added."""
        check_count(images)
        result = served.add([read(image) for image in images])
        metrics.update_index(served)
        body = {"added": result.images, "n_patches": result.n_patches, "seconds": result.seconds,
                "skipped": [{"filename": s.source, "reason": s.reason} for s in result.skipped]}
        if not result.images:
            reasons = "; ".join(f"{s.source}: {s.reason}" for s in result.skipped)
            return JSONResponse({**body, "detail": f"no image added ({reasons})"}, status_code=422)
        return JSONResponse(body)

    @app.delete("/api/images/{image_id}", dependencies=[Depends(require_token)])
    def remove_image(image_id: int) -> dict[str, Any]:
        try:
            patches = served.remove([image_id])
        except UnknownImageError as exc:
            raise HTTPException(404, str(exc)) from None
        metrics.update_index(served)
        return {"removed": image_id, "patches": patches}

    @app.get("/api/images/{image_id}")
    def image_file(image_id: int) -> FileResponse:
        """A database image's file, by id (the only way the server reads an image file: requests name no path)."""
        if served.record(image_id) is None:
            raise HTTPException(404, f"no image {image_id} in the index")
        path = served.image_file(image_id)
        if path is None:
            raise HTTPException(404, f"image {image_id}'s file is not available to this server")
        return FileResponse(path)

    @app.get("/metrics", include_in_schema=False)
    def metrics_page() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(_MetricsMiddleware, metrics=metrics)
    return app


def _parse_box(box: str | None, width: int, height: int) -> tuple[int, int, int, int] | None:
    """The query box "x0,y0,x1,y1" (exclusive max), checked against the image; None = the whole image."""
    if box is None or not box.strip():
        return None
    try:
        values = [int(v) for v in box.split(",")]
    except ValueError:
        values = []
    if len(values) != 4:
        raise HTTPException(422, f"box must be four integers x0,y0,x1,y1, got {box[:80]!r}")
    x0, y0, x1, y1 = values
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise HTTPException(422, f"box {x0},{y0},{x1},{y1} is not inside the {width}x{height} query image with "
                                 "x0 < x1 and y0 < y1")
    return x0, y0, x1, y1


class _Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter("patchify_requests", "HTTP requests by route, method and status",
                                ["endpoint", "method", "status"], registry=registry)
        self.latency = Histogram("patchify_request_seconds", "HTTP request latency by route", ["endpoint"],
                                 registry=registry,
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
        self.images = Gauge("patchify_index_images", "images in the served index", registry=registry)
        self.patches = Gauge("patchify_index_patches", "patches in the served index", registry=registry)

    def update_index(self, served: ServedIndex) -> None:
        info = served.info()
        self.images.set(info["n_images"])
        self.patches.set(info["n_patches"])


class _MetricsMiddleware:
    """Counts and times every HTTP request by its route's template (/api/images/{image_id}, not each id: the label
    set stays bounded; "unmatched" for paths no route has)."""

    def __init__(self, app: ASGIApp, metrics: _Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        started = time.perf_counter()

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(endpoint, scope.get("method", ""), str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
