"""A real `patchify serve` process over an index built with conftest.ThumbnailBackbone (the tests' cheap
deterministic encoder). The CLI cannot name that backbone (it is not a registered one), so the server tests and
benchmarks/bench_serve.py start the server here:

    python tests/serve_thumbnail.py INDEX_DIR PORT ['{"token": "...", "max_pixels": ...}']   # ServeConfig fields

`ThumbnailServer` starts one on a free loopback port and stops (or kills) it; `CliServer` does the same with
`patchify serve` and the index's own backbone."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def build_index(directory: Path, photos: list[Path] | None = None, level: int = 2) -> Path:
    """The 20 shipped photos indexed with the thumbnail backbone (a fraction of a second)."""
    from conftest import PHOTOS, ThumbnailBackbone

    from patchify import Patchify

    engine = Patchify(backbone=ThumbnailBackbone(), level=level)
    engine.add_images(photos if photos is not None else sorted(PHOTOS.glob("*")))
    engine.save(directory)
    return directory


class ThumbnailServer:
    """`python tests/serve_thumbnail.py` as a subprocess on 127.0.0.1, ready when `start` returns."""

    def __init__(self, index_dir: Path, **config: Any) -> None:
        self.index_dir = Path(index_dir)
        self.config = config
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self._log = tempfile.TemporaryFile()  # not a pipe: a chatty server must never block on a full one

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> "ThumbnailServer":
        import httpx

        import patchify

        package_root = Path(patchify.__file__).resolve().parents[1]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(package_root), os.environ.get("PYTHONPATH", "")])}
        self.port = free_port()
        self.process = subprocess.Popen(self.command(), env=env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}:\n{self.output()}")
            try:
                if httpx.get(f"{self.url}/api/health", timeout=1.0).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"the server did not answer on {self.url} within {timeout} s")

    def command(self) -> list[str]:
        return [sys.executable, str(HERE / "serve_thumbnail.py"), str(self.index_dir), str(self.port),
                json.dumps(self.config)]

    def stop(self) -> str:
        """Stops it (SIGTERM, then SIGKILL after 10 s); returns its output."""
        return self._end(signal.SIGTERM)

    def kill(self) -> str:
        """kill -9: no chance to clean up (what a crash or an OOM kill does)."""
        return self._end(signal.SIGKILL)

    def _end(self, sig: int) -> str:
        process, self.process = self.process, None
        if process is None:
            return ""
        if process.poll() is None:
            process.send_signal(sig)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        return self.output()

    def output(self) -> str:
        """What the server printed so far."""
        self._log.seek(0)
        return self._log.read().decode(errors="replace")

    def __enter__(self) -> "ThumbnailServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class CliServer(ThumbnailServer):
    """`patchify serve INDEX_DIR` itself: the index's own (registered) backbone. Config: `token` only."""

    def command(self) -> list[str]:
        token = ["--token", self.config["token"]] if self.config.get("token") else []
        return [sys.executable, "-m", "patchify", "serve", str(self.index_dir), "--port", str(self.port), *token]


if __name__ == "__main__":
    from conftest import ThumbnailBackbone

    from patchify.config import ServeConfig
    from patchify.serve import serve

    settings = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    serve(sys.argv[1], ServeConfig(port=int(sys.argv[2]), **settings), backbone=ThumbnailBackbone(),
          log_level="warning")
