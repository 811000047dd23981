"""`patchify serve`: an HTTP search service over a saved index, with a page to draw a box and see where it was
found. FastAPI + uvicorn (the `serve` extra); state.py holds the index and its locking, app.py the routes,
static/ the page (plain HTML/JS/CSS, nothing fetched from elsewhere)."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

from ..config import ServeConfig
from .app import create_app
from .state import ServedIndex

if TYPE_CHECKING:
    from ..backbones import Backbone

__all__ = ["ServeConfig", "ServedIndex", "create_app", "serve"]


def serve(index_dir: str | os.PathLike, config: ServeConfig | None = None, *,
          backbone: "str | Backbone | None" = None, log_level: str = "info") -> None:
    """Loads the index in `index_dir` and serves it until interrupted. backbone: as `Patchify.load` takes it (None =
    the one the index names)."""
    import uvicorn

    config = config or ServeConfig()
    served = ServedIndex.open(index_dir, config, backbone=backbone)
    print(f"serving {index_dir} ({served.engine.n_images} images) on http://{config.host}:{config.port}/ "
          f"(API docs: /docs; writes {'need the token' if config.token else 'open: no --token given'})", flush=True)
    uvicorn.run(create_app(served), host=config.host, port=config.port, log_level=log_level)
