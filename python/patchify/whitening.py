"""Learned PCA whitening: the transform between the backbone's vectors and the index's.

Why: raw DINOv2 cosines between photos of one domain are nearly flat (GroceryStore: 0.88-0.93 for every image),
because a few directions shared by every photo carry most of the vector's energy. Whitening learned on the
database's own patches (no labels, no queries) centres the vectors and equalises the variance of the principal
axes, so the directions that tell images apart decide the score. Measured in benchmarks/RESULTS.md ("Retrieval
quality"); the settings are `config.WhiteningConfig`.

    y = normalise(P^T (x - mean)),  P[:, k] = u_k * (lambda_k + shrinkage * mean(lambda))^power

Database patches and queries go through the same transform, so a score stays a cosine (in the whitened space)
and the max over an image's patches keeps its meaning. The learned state is the mean (D,) and P (D, d), float32.

`recover` inverts the transform for unit-norm inputs when no axis was dropped (d = D): that is what lets a flat
index re-learn its whitening from the vectors it stores, without the images.
"""
from __future__ import annotations

import time
import tokenize
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .config import WhiteningConfig
from .errors import IndexFormatError

WHITENING_FILE = "whitening.npz"
# Covariance is accumulated in float64 over blocks of this many rows: memory stays bounded by the block, and the
# sum of outer products does not lose the small eigenvalues to float32 rounding.
_BLOCK_ROWS = 16_384


def manifest_entry(whitening: "Whitening | None", config: WhiteningConfig | None) -> dict[str, Any] | None:
    """What a saved index records about its whitening: None (raw vectors), the settings of one not learned yet, or
    the learned one's description."""
    if whitening is not None:
        return {"learned": True, **whitening.describe()}
    if config is not None:
        return {"learned": False, "config": config.to_dict()}
    return None


def learning_images(n_images: int, max_images: int) -> np.ndarray:
    """Which of n images (positions, ascending) a whitening learns from: max_images of them evenly spaced over
    the whole list, not the first ones: collections are often sorted by folder, i.e. by subject, and the first few
    hundred images of one subject would teach it to flatten what tells subjects apart."""
    if n_images <= max_images:
        return np.arange(n_images)
    return np.unique(np.linspace(0, n_images - 1, max_images).round().astype(np.int64))


@dataclass(frozen=True)
class LearningSet:
    """Vectors (backbone space) to learn a whitening from, with what they are, in words ("4x4 cells", "patches")
    and how many images they come from."""

    vectors: np.ndarray
    n_images: int
    description: str = "vectors"

    @classmethod
    def of_grid_cells(cls, config: WhiteningConfig, vectors: np.ndarray, grid: np.ndarray, image: np.ndarray,
                      n_images: int, *, limit: bool = True) -> "LearningSet":
        """The rows of config.learn_grid among `vectors` (per row: its `grid` and `image`, 0 .. n_images - 1), of
        the learn_images images `learning_images` picks (all of them when not `limit`); may be empty."""
        g = config.learn_grid
        rows = np.asarray(grid) == g
        if limit:
            rows &= np.isin(image, learning_images(n_images, config.learn_images))
        return cls(vectors[rows], int(len(np.unique(np.asarray(image)[rows]))), f"{g}x{g} cells")


@dataclass(frozen=True)
class Whitening:
    """A learned whitening: `mean` (D,), `projection` (D, d), the `config` it was learned with, and what it was
    learned on (`learned_on_vectors` vectors of `learned_on_images` images, described by `learned_from`, in
    `seconds`)."""

    mean: np.ndarray
    projection: np.ndarray
    config: WhiteningConfig
    learned_on_vectors: int
    learned_on_images: int
    seconds: float = 0.0
    learned_from: str = "patches"

    @property
    def input_dim(self) -> int:
        return int(self.projection.shape[0])

    @property
    def output_dim(self) -> int:
        return int(self.projection.shape[1])

    @property
    def invertible(self) -> bool:
        """Every axis kept and every scale positive: `recover` gives back the unit-norm input."""
        return self.output_dim == self.input_dim

    def __repr__(self) -> str:
        return (f"Whitening(power={self.config.power}, shrinkage={self.config.shrinkage}, "
                f"dims={self.input_dim}->{self.output_dim}, learned on {self.learned_on_vectors} {self.learned_from} "
                f"of {self.learned_on_images} images)")

    # ------------------------------------------------------------------ learning
    @classmethod
    def learn(cls, vectors: np.ndarray, config: WhiteningConfig | None = None, *, n_images: int | None = None,
              learned_from: str = "patches", seed: int = 0) -> "Whitening":
        """Learns mean and axes from (n, D) vectors (n >= 2; a uniform sample of config.max_vectors rows when more).
        With shrinkage > 0 any n works: the shrinkage keeps the scales finite where n < D."""
        config = config or WhiteningConfig()
        started = time.perf_counter()
        x = np.asarray(vectors)
        if x.ndim != 2 or not np.issubdtype(x.dtype, np.floating):
            raise ValueError(f"whitening needs (n, dim) float vectors, got {x.dtype} array of shape {x.shape}")
        n, dim = x.shape
        if n < 2:
            raise ValueError(f"whitening needs at least 2 vectors to learn from, got {n}")
        if config.dims is not None and config.dims > dim:
            raise ValueError(f"whitening dims={config.dims} is more than the vectors' dimension {dim}")
        if n > config.max_vectors:
            rows = np.sort(np.random.default_rng(seed).choice(n, config.max_vectors, replace=False))
            x = x[rows]
            n = len(x)
        mean = np.zeros(dim, np.float64)
        for start in range(0, n, _BLOCK_ROWS):
            mean += x[start:start + _BLOCK_ROWS].sum(axis=0, dtype=np.float64)
        mean /= n
        cov = np.zeros((dim, dim), np.float64)
        for start in range(0, n, _BLOCK_ROWS):
            block = x[start:start + _BLOCK_ROWS].astype(np.float64) - mean
            cov += block.T @ block
        cov /= max(n - 1, 1)
        eigenvalues, axes = np.linalg.eigh(cov)
        order = np.argsort(eigenvalues)[::-1]
        eigenvalues, axes = np.maximum(eigenvalues[order], 0.0), axes[:, order]
        # Without shrinkage a rank-deficient set (n < D) has zero eigenvalues: floor them so scales stay finite.
        floor = max(1e-9 * float(eigenvalues[0]), 1e-30)
        scales = (np.maximum(eigenvalues, floor) + config.shrinkage * eigenvalues.mean()) ** config.power
        keep = config.dims or dim
        projection = (axes[:, :keep] * scales[:keep]).astype(np.float32)
        return cls(mean.astype(np.float32), np.ascontiguousarray(projection), config, int(len(vectors)),
                   int(n_images) if n_images is not None else 0, time.perf_counter() - started, learned_from)

    # ------------------------------------------------------------------ applying
    def apply(self, vectors: np.ndarray) -> np.ndarray:
        """(n, D) -> (n, d) float32, L2-normalised (a 1-D vector gives a 1-D result)."""
        x = np.asarray(vectors, dtype=np.float32)
        single = x.ndim == 1
        x = np.atleast_2d(x)
        if x.ndim != 2 or x.shape[1] != self.input_dim:
            raise ValueError(f"vectors have shape {np.asarray(vectors).shape}; the whitening takes "
                             f"(n, {self.input_dim})")
        y = (x - self.mean) @ self.projection
        norms = np.linalg.norm(y, axis=1, keepdims=True)
        y /= np.maximum(norms, 1e-12)
        return y[0] if single else np.ascontiguousarray(y, dtype=np.float32)

    def recover(self, whitened: np.ndarray) -> np.ndarray:
        """The unit-norm inputs whose `apply` gave `whitened` ((n, d) -> (n, D) float32). Only for an invertible
        whitening: y is proportional to P^T (x - mean), so x = mean + t * u with u = P^-T y, and |x| = 1 fixes
        t > 0 (|mean| < 1 for a mean of unit vectors, so exactly one positive root)."""
        if not self.invertible:
            raise ValueError(f"this whitening keeps {self.output_dim} of {self.input_dim} dimensions: the "
                             "original vectors cannot be recovered from it")
        y = np.atleast_2d(np.asarray(whitened, dtype=np.float64))
        u = np.linalg.solve(self.projection.astype(np.float64).T, y.T).T
        m = self.mean.astype(np.float64)
        a = np.einsum("ij,ij->i", u, u)
        b = 2.0 * (u @ m)
        c = float(m @ m) - 1.0
        t = (-b + np.sqrt(np.maximum(b * b - 4.0 * a * c, 0.0))) / (2.0 * np.maximum(a, 1e-300))
        x = m + t[:, None] * u
        x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        return x.astype(np.float32)

    # ------------------------------------------------------------------ persistence
    def describe(self) -> dict[str, Any]:
        """What the manifest (and `patchify info`) says about it."""
        return {"config": self.config.to_dict(), "input_dim": self.input_dim, "output_dim": self.output_dim,
                "learned_on_vectors": self.learned_on_vectors, "learned_on_images": self.learned_on_images,
                "learned_from": self.learned_from}

    def save_file(self, directory: Path) -> str:
        np.savez(Path(directory) / WHITENING_FILE, mean=self.mean, projection=self.projection)
        return WHITENING_FILE

    @classmethod
    def load_file(cls, directory: Path, description: dict[str, Any]) -> "Whitening":
        path = Path(directory) / WHITENING_FILE
        try:
            with np.load(path, allow_pickle=False) as archive:
                mean, projection = archive["mean"], archive["projection"]
            config = WhiteningConfig.from_dict(description["config"])
            learned_on = int(description["learned_on_vectors"]), int(description["learned_on_images"])
        except (OSError, ValueError, KeyError, TypeError, EOFError, SyntaxError, tokenize.TokenError,
                zipfile.BadZipFile) as exc:
            raise IndexFormatError(f"{path}: corrupt or incomplete whitening ({exc})") from None
        if mean.ndim != 1 or projection.shape != (len(mean), int(description.get("output_dim", -1))) or \
                not (np.isfinite(mean).all() and np.isfinite(projection).all()):
            raise IndexFormatError(f"{path}: whitening arrays of shapes {mean.shape}, {projection.shape} do not "
                                   "match the manifest")
        return cls(mean.astype(np.float32), np.ascontiguousarray(projection, np.float32), config, *learned_on,
                   learned_from=str(description.get("learned_from", "patches")))
