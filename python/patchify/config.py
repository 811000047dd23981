"""Settings, typed: the only place where Patchify's defaults are written.

- `TilingConfig`: how database images are cut into patches (grid sizes, overlap, input size).
- `WhiteningConfig`: the learned PCA whitening applied to every vector before indexing and to every query.
- One config per index kind: `FlatConfig` (storage dtype) and `IVFPQConfig` (nlist, m, nbits, nprobe, training
  source). Each builds its index (`create`) and round-trips through a plain dict (`to_dict` / `index_config_from_dict`)
  so that the store can write every setting into one manifest.

Words used everywhere: a **level** is an int L >= 0 naming grid L+1 (L0 = the whole image, L1 = the 2x2 grid, ...);
"level=L" means all grids up to L+1 (levels nest); **levels** is a list of levels. Explicit grid sizes
(`grids=[1, 3]`) are the escape hatch for non-nested sets.

The engine, the CLI and the benchmarks read their defaults from these classes (e.g. `IVFPQConfig.m`).
"""
from __future__ import annotations

import math
import numbers
import re
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar, Sequence, Union

from . import _core

if TYPE_CHECKING:
    from .index.flat import FlatIndex
    from .index.ivfpq import IVFPQIndex

MAX_GRID: int = _core.MAX_GRID
DEFAULT_BACKBONE = "dinov2_vits14"
DEFAULT_LEVEL = 2  # L2: grids 1x1, 2x2, 3x3 (14 patches per image): the paper's best accuracy per byte
DEFAULT_BATCH_SIZE = 32  # patches per indexing step (decoded, tiled and encoded together)
# Patches per onnxruntime call, by provider: a ViT-S on a CPU runs fastest per patch in calls of 4-8 (1 thread, int8:
# 44.5 ms per patch at 8 vs 59 ms at 32; fp32: 112 vs 120 ms; RESULTS.md, "Indexing cost"); a GPU wants large ones.
BACKBONE_CALL_PATCHES = {"CPUExecutionProvider": 8, "CUDAExecutionProvider": 64}
OTHER_PROVIDER_CALL_PATCHES = 32  # a provider not listed above
TRAINING_SOURCES = ("all", "given", "gt-aligned", "salient")  # see patchify.training
RERANK_CODECS = (None, "float16", "int8")  # see patchify.index.rerank
# How the backbone's weights run (see patchify.backbones.precision): recorded with an index, queries use the same.
# int8: onnxruntime dynamic quantisation (CPU); fp16: for CUDA (on a CPU it runs, slower than fp32).
PRECISIONS = ("fp32", "int8", "fp16")
DEFAULT_PRECISION = "int8"
EXPORT_PRECISION = "fp32"  # the backbone as exported; a backbone identity recording no precision ran at it
# How each grid cell is sized for the backbone (see patchify.tiling.cell_input_sizes): "fit" = the cell's own pixel
# extent rounded to the backbone's patch size, between MIN_FIT_INPUT_SIZE and the backbone's input size; "fixed" =
# every cell resized to the backbone's input size (the paper's crop mode). Queries always use the input size.
CELL_SIZINGS = ("fit", "fixed")
DEFAULT_CELL_SIZING = "fit"
# 14 x 14 tokens of a /14 ViT: floors of 168 and 112 px lost 2 and 11 mAP points (RESULTS.md, "Indexing cost").
MIN_FIT_INPUT_SIZE = 196
# The second stage of an IVFPQ search re-scores this many times k images (at least RERANK_MIN_SHORTLIST), times
# RERANK_4BIT_DEPTH for codes of 4 bits or fewer: they rank coarser (grocery, L3: the 4-bit first stage holds 83 % of
# flat's top 10 in its best 100 images, 8-bit 91 %; a shortlist of 100 lost 1.4 mAP points, 200 none: RESULTS.md).
RERANK_SHORTLIST_FACTOR = 10
RERANK_MIN_SHORTLIST = 100
RERANK_4BIT_DEPTH = 2


def default_rerank_shortlist(k: int, nbits: int) -> int:
    """Images the first stage of a top-k IVFPQ search hands to the second when `rerank_shortlist` is not set."""
    shortlist = max(RERANK_SHORTLIST_FACTOR * k, RERANK_MIN_SHORTLIST)
    return shortlist * RERANK_4BIT_DEPTH if nbits <= 4 else shortlist


def rerank_shortlist_size(k: int, rerank_shortlist: int | None, nbits: int) -> int:
    """Images the first stage hands to the second for a top-k search: the `rerank_shortlist` setting (at least k),
    None = the default rule for codes of `nbits` bits."""
    if rerank_shortlist is not None:
        return max(int(rerank_shortlist), k)
    return default_rerank_shortlist(k, nbits)


# faiss's k-means warns below 39 training points per centroid (and the clustering degrades): we make it an error.
MIN_POINTS_PER_CENTROID = 39
# Most vectors any training step (IVFPQ codebooks, whitening) learns from: a uniform sample beyond that. faiss's
# k-means itself never uses more than 256 points per centroid.
MAX_TRAINING_VECTORS = 262_144
# A sharded index (patchify.distributed): images per shard (the unit of work, of retry and of resume; a shard is a
# normal saved index, searched by one process), and how many images, spread over the inputs, an IVFPQ build learns
# its shared whitening and codebooks from (a flat build learns its whitening from WhiteningConfig.learn_images).
DEFAULT_SHARD_IMAGES = 10_000
DEFAULT_SAMPLE_IMAGES = 2_048


def grids_for_level(level: int) -> tuple[int, ...]:
    """The grid sizes of `level`: (1, 2, ..., level + 1)."""
    if isinstance(level, bool) or not isinstance(level, numbers.Integral) or not 0 <= int(level) < MAX_GRID:
        raise ValueError(f"level must be an integer in [0, {MAX_GRID - 1}], got {level!r}")
    return tuple(range(1, int(level) + 2))


def check_grids(grids: Sequence[int]) -> tuple[int, ...]:
    """Distinct grid sizes in [1, MAX_GRID], sorted ascending."""
    if isinstance(grids, (str, bytes)) or not isinstance(grids, Sequence):
        raise ValueError(f"grids must be a list of grid sizes, got {grids!r}")
    values = list(grids)
    if not values:
        raise ValueError("grids must not be empty")
    for g in values:
        if isinstance(g, bool) or not isinstance(g, numbers.Integral) or not 1 <= int(g) <= MAX_GRID:
            raise ValueError(f"grid sizes must be integers in [1, {MAX_GRID}], got {g!r}")
    if len({int(g) for g in values}) != len(values):
        raise ValueError(f"grid sizes must be distinct, got {values}")
    return tuple(sorted(int(g) for g in values))


@dataclass(frozen=True)
class TilingConfig:
    """Which patches each database image is cut into.

    grids: grid sizes, ascending (default: those of DEFAULT_LEVEL). overlap: each cell side moves out by
    round(overlap * cell extent), in [0, 0.5). input_size: the side patches are resized to ("fixed"), the largest
    one ("fit"); None = the backbone's own (a fixed-size export accepts nothing else: the encoder checks).
    cell_sizing: "fit" (each cell at about its own pixel size, a multiple of the backbone's patch size, at least
    min_input_size; needs a backbone that takes several input sizes) or "fixed" (every cell at input_size)."""

    grids: tuple[int, ...] = grids_for_level(DEFAULT_LEVEL)
    overlap: float = 0.0
    input_size: int | None = None
    cell_sizing: str = DEFAULT_CELL_SIZING
    min_input_size: int = MIN_FIT_INPUT_SIZE

    def __post_init__(self) -> None:
        object.__setattr__(self, "grids", check_grids(self.grids))
        if not 0.0 <= float(self.overlap) < 0.5:
            raise ValueError(f"overlap must be in [0, 0.5), got {self.overlap}")
        object.__setattr__(self, "overlap", float(self.overlap))
        if self.input_size is not None and (isinstance(self.input_size, bool) or int(self.input_size) < 1):
            raise ValueError(f"input_size must be a positive integer or None, got {self.input_size!r}")
        if self.cell_sizing not in CELL_SIZINGS:
            raise ValueError(f"cell_sizing must be one of {', '.join(CELL_SIZINGS)}, got {self.cell_sizing!r}")
        if isinstance(self.min_input_size, bool) or not isinstance(self.min_input_size, numbers.Integral) \
                or int(self.min_input_size) < 1:
            raise ValueError(f"min_input_size must be a positive integer, got {self.min_input_size!r}")

    @classmethod
    def for_level(cls, level: int, **kwargs: Any) -> "TilingConfig":
        return cls(grids=grids_for_level(level), **kwargs)

    @classmethod
    def from_settings(cls, tiling: "TilingConfig | None" = None, level: int | None = None,
                      grids: Sequence[int] | None = None, overlap: float = 0.0,
                      cell_sizing: str | None = None) -> "TilingConfig":
        """The tiling an engine or a sharded build is asked for: `tiling` as given, or grids (explicit sizes) or
        level (grids 1..level+1, DEFAULT_LEVEL when neither is given) with overlap and cell_sizing (None: the
        default)."""
        if tiling is not None:
            if level is not None or grids is not None or overlap or cell_sizing is not None:
                raise ValueError("give tiling=TilingConfig(...) or level/grids/overlap/cell_sizing, not both")
            return tiling
        if level is not None and grids is not None:
            raise ValueError("give level (grids 1..level+1) or grids (explicit grid sizes), not both")
        chosen = grids_for_level(DEFAULT_LEVEL if level is None else level) if grids is None else tuple(grids)
        return cls(grids=chosen, overlap=overlap,
                   cell_sizing=DEFAULT_CELL_SIZING if cell_sizing is None else cell_sizing)

    @property
    def levels(self) -> tuple[int, ...]:
        """The level of each grid (grid g is level g - 1)."""
        return tuple(g - 1 for g in self.grids)

    @property
    def patches_per_image(self) -> int:
        return sum(g * g for g in self.grids)

    def to_dict(self) -> dict[str, Any]:
        return {"grids": list(self.grids), "overlap": self.overlap, "input_size": self.input_size,
                "cell_sizing": self.cell_sizing, "min_input_size": self.min_input_size}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TilingConfig":
        # Indexes saved before cell sizing existed resized every cell to the input size.
        return cls(grids=tuple(data["grids"]), overlap=float(data.get("overlap", 0.0)),
                   input_size=data.get("input_size"), cell_sizing=data.get("cell_sizing", "fixed"),
                   min_input_size=int(data.get("min_input_size", MIN_FIT_INPUT_SIZE)))


def precision_of(identity: dict[str, Any] | None) -> str:
    """The precision a backbone identity records (EXPORT_PRECISION when it records none)."""
    return str((identity or {}).get("precision", EXPORT_PRECISION))


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


@dataclass(frozen=True)
class FlatConfig:
    """Exact search over every patch vector. dtype: storage, "float32" or "float16" (half the memory; queries and
    arithmetic stay float32)."""

    kind: ClassVar[str] = "flat"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "float16"):
            raise ValueError(f"dtype must be 'float32' or 'float16', got {self.dtype!r}")

    def create(self, dim: int, num_threads: int = 0) -> "FlatIndex":
        from .index.flat import FlatIndex

        return FlatIndex(dim, dtype=self.dtype, num_threads=num_threads)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **asdict(self)}


_FACTORY = re.compile(r"^IVF(\d+),PQ(\d+)(?:x(\d+))?$", re.IGNORECASE)


@dataclass(frozen=True)
class IVFPQConfig:
    """Compressed search: faiss IVFPQ codes scanned by the fused C++ max-over-patches scanner.

    nlist: coarse lists (None: ~4 sqrt(training vectors), chosen at training time); m: PQ sub-quantisers (must
    divide the dimension); nbits: bits per sub-quantiser code (4: faiss's fast-scan layout, M/2 bytes per patch
    scanned with lookup tables in SIMD registers, m <= 256; see patchify.index.ivfpq); nprobe: lists visited per
    query (a search-time setting: change it on the index at any time); training_source: which vectors train the
    codebooks (see patchify.training).

    Two-stage search (patchify.index.rerank): rerank = "float16" or "int8" keeps a finer copy of every patch vector
    and re-scores every patch of the first stage's best `rerank_shortlist` images exactly (None: the default
    shortlist, default_rerank_shortlist(k, nbits): 10 x k, at least 100, twice that for codes of 4 bits or fewer);
    None or "none" = one stage (PQ scores only).
    rerank_storage: "ram", or "mmap" (read from the saved index folder on demand once loaded)."""

    kind: ClassVar[str] = "ivfpq"
    nlist: int | None = None
    # PQ32x4 (fast-scan) + the int8 re-rank: 28 B/patch of first stage in RAM, ~0.2 ms per one-query first stage at
    # 1M images x L2, and flat's mAP on grocery and the composite; PQ48x8 was 64 B/patch and ~1.2 ms at equal
    # accuracy (benchmarks/RESULTS.md, "Compressed search ... fifth session"). 32 divides 384, 512, 768 and 1024.
    m: int = 32
    nbits: int = 4
    nprobe: int = 16
    training_source: str = "all"
    rerank: str | None = "int8"
    rerank_shortlist: int | None = None
    rerank_storage: str = "ram"

    def __post_init__(self) -> None:
        for name in ("m", "nbits", "nprobe"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.nlist is not None and (isinstance(self.nlist, bool) or not isinstance(self.nlist, numbers.Integral)
                                       or self.nlist < 1):
            raise ValueError(f"nlist must be a positive integer or None (automatic), got {self.nlist!r}")
        if not 1 <= self.nbits <= 16:
            raise ValueError(f"nbits must be in [1, 16], got {self.nbits}")
        if self.nbits == 4 and self.m > 256:  # the fast-scan scanner sums M uint8 table entries in 16 bits
            raise ValueError(f"m must be at most 256 with nbits=4 (the fast-scan layout), got {self.m}")
        if self.training_source not in TRAINING_SOURCES:
            raise ValueError(f"training_source must be one of {TRAINING_SOURCES}, got {self.training_source!r}")
        if self.rerank == "none":  # the spelling for "no re-rank" where None means "the default" (CLI, kwargs)
            object.__setattr__(self, "rerank", None)
        if self.rerank not in RERANK_CODECS:
            raise ValueError(f"rerank must be one of {RERANK_CODECS}, got {self.rerank!r}")
        if self.rerank_shortlist is not None and (isinstance(self.rerank_shortlist, bool) or not isinstance(
                self.rerank_shortlist, numbers.Integral) or self.rerank_shortlist < 1):
            raise ValueError(f"rerank_shortlist must be a positive integer or None, got {self.rerank_shortlist!r}")
        if self.rerank_storage not in ("ram", "mmap"):
            raise ValueError(f"rerank_storage must be 'ram' or 'mmap', got {self.rerank_storage!r}")

    @classmethod
    def from_factory(cls, spec: str, **kwargs: Any) -> "IVFPQConfig":
        """From a faiss factory string "IVF<nlist>,PQ<m>[x<nbits>]" (nbits defaults to 8)."""
        match = _FACTORY.match(spec.replace(" ", ""))
        if not match:
            raise ValueError(f"factory string must look like 'IVF4096,PQ48' or 'IVF4096,PQ48x8', got {spec!r}")
        return cls(nlist=int(match.group(1)), m=int(match.group(2)), nbits=int(match.group(3) or 8), **kwargs)

    def min_training_vectors(self, nlist: int | None = None) -> int:
        """Training vectors needed: MIN_POINTS_PER_CENTROID per coarse list and per PQ centroid (2^nbits)."""
        return MIN_POINTS_PER_CENTROID * max(nlist or self.nlist or 1, 1 << self.nbits)

    def create(self, dim: int, num_threads: int = 0) -> "IVFPQIndex":
        from .index.ivfpq import IVFPQIndex

        return IVFPQIndex(dim, nlist=self.nlist, m=self.m, nbits=self.nbits, nprobe=self.nprobe,
                          num_threads=num_threads, training_source=self.training_source, rerank=self.rerank,
                          rerank_shortlist=self.rerank_shortlist, rerank_storage=self.rerank_storage)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **asdict(self)}


@dataclass(frozen=True)
class WhiteningConfig:
    """PCA whitening learned without labels on the database's own patch vectors (patchify.whitening).

    Each vector x becomes normalise(P^T (x - mean)): P rotates onto the principal axes of the learning vectors and
    scales axis k by (lambda_k + shrinkage * mean(lambda))^power. power -0.5 is full whitening; the shrinkage keeps
    the smallest-variance axes (noise when learned on a few thousand patches) from being blown up. dims keeps the
    first dims axes (None: all; fewer = less memory and faster search). At most max_vectors patches (a uniform
    sample) are learned from. A flat index learns once it holds min_vectors patches (until then it holds and
    searches raw vectors), so that a service adding one image at a time does not whiten by its first image; an IVFPQ
    index learns when it trains.

    learn_grid: the whitening learns from the cells of this grid (4: the 4x4 cells), encoded for learn_images
    images spread over the add that learns it, whatever grids the index holds (when the index holds that grid, its
    own cells serve); None: from the indexed patches. Small cells show local appearance rather than whole scenes,
    and a whitening learned on them keeps what tells objects apart: on GroceryStore (a database of near-identical
    shelf photos) mAP at L2 is 0.29 against 0.20 when learned on the indexed patches, at no cost on the other sets.
    The one-time price is up to learn_images x learn_grid^2 extra backbone passes (4,096 by default). Defaults
    chosen on real photos: benchmarks/RESULTS.md, "Retrieval quality"."""

    power: float = -0.5
    shrinkage: float = 0.3
    dims: int | None = None
    max_vectors: int = MAX_TRAINING_VECTORS
    min_vectors: int = 64
    learn_grid: int | None = 4
    learn_images: int = 256

    def __post_init__(self) -> None:
        for name in ("power", "shrinkage"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ValueError(f"whitening {name} must be a finite number, got {value!r}")
        if not -1.0 <= self.power <= 0.0:
            raise ValueError(f"whitening power must be in [-1, 0], got {self.power}")
        if self.shrinkage < 0:
            raise ValueError(f"whitening shrinkage must be >= 0, got {self.shrinkage}")
        if self.learn_grid is not None and (isinstance(self.learn_grid, bool) or not isinstance(
                self.learn_grid, numbers.Integral) or not 1 <= self.learn_grid <= MAX_GRID):
            raise ValueError(f"whitening learn_grid must be a grid size in [1, {MAX_GRID}] or None, got "
                             f"{self.learn_grid!r}")
        if isinstance(self.learn_images, bool) or not isinstance(self.learn_images, numbers.Integral) or \
                self.learn_images < 1:
            raise ValueError(f"whitening learn_images must be a positive integer, got {self.learn_images!r}")
        for name in ("dims", "max_vectors", "min_vectors"):
            value = getattr(self, name)
            if value is None and name == "dims":
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 2:
                raise ValueError(f"whitening {name} must be an integer >= 2{' or None' if name == 'dims' else ''}, "
                                 f"got {value!r}")
        object.__setattr__(self, "power", float(self.power))
        object.__setattr__(self, "shrinkage", float(self.shrinkage))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "WhiteningConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown whitening settings: {unknown}")
        return cls(**data)


# The engine's default: whiten (learned at the first add). "none" gives the paper's raw cosines.
DEFAULT_WHITENING = WhiteningConfig()
# Image score = w * global (whole-image patch) score + (1 - w) * best patch score; 0 = the paper's plain max.
# The default (global_weight=None) is this weight on whitened vectors and 0 on raw cosines, where fusion ruins small
# objects: see RESULTS.md, "Retrieval quality".
DEFAULT_GLOBAL_WEIGHT = 0.25


def check_global_weight(value: float | None) -> float | None:
    """None (the default rule above) or a weight in [0, 1]."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"global_weight must be a number in [0, 1] or None (default rule), got {value!r}")
    return float(value)


IndexConfig = Union[FlatConfig, IVFPQConfig]
INDEX_CONFIGS: dict[str, type[FlatConfig] | type[IVFPQConfig]] = {"flat": FlatConfig, "ivfpq": IVFPQConfig}


def index_config_from_dict(data: dict[str, Any]) -> IndexConfig:
    """Inverse of `to_dict`; unknown keys are an error (they would be settings silently dropped)."""
    kind = data.get("kind")
    if kind not in INDEX_CONFIGS:
        raise ValueError(f"index kind must be one of {list(INDEX_CONFIGS)}, got {kind!r}")
    config_class = INDEX_CONFIGS[kind]
    known = {f.name for f in fields(config_class)}
    unknown = sorted(set(data) - known - {"kind"})
    if unknown:
        raise ValueError(f"unknown {kind} index settings: {unknown}")
    return config_class(**{k: v for k, v in data.items() if k != "kind"})


def index_config(spec: "str | IndexConfig" = "flat", **settings: Any) -> IndexConfig:
    """An index config from a name ("flat", "ivfpq"), a faiss factory string ("IVF1024,PQ48x8") or a config;
    `settings` override fields (None values are ignored, so CLI options can be passed through)."""
    given = {k: v for k, v in settings.items() if v is not None}
    if isinstance(spec, (FlatConfig, IVFPQConfig)):
        return type(spec)(**{**{f.name: getattr(spec, f.name) for f in fields(spec)}, **given})
    if not isinstance(spec, str):
        raise ValueError(f"index must be 'flat', 'ivfpq', a faiss factory string or an index config, got {spec!r}")
    if spec.lower() in INDEX_CONFIGS:
        return index_config_from_dict({"kind": spec.lower(), **given})
    if spec.upper().startswith("IVF"):
        return IVFPQConfig.from_factory(spec, **given)
    raise ValueError(f"index must be 'flat', 'ivfpq' or a faiss factory string like 'IVF1024,PQ48', got {spec!r}")


@dataclass(frozen=True)
class ServeConfig:
    """`patchify serve` (patchify.serve): where it listens and what it accepts from a request.

    host: loopback by default, so nothing outside the machine reaches it unless asked. token: when set, the write
    endpoints (add, remove) need `Authorization: Bearer <token>`. max_upload_bytes bounds a whole request body;
    max_pixels bounds each decoded image (checked from its header before decoding: decompression bombs);
    max_files: images per batch search or add; max_k: hits per query (k beyond it is refused, not clamped, so a
    client learns its request was not served as asked); max_vectors: descriptors per vector search."""

    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None
    max_upload_bytes: int = 32 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_files: int = 16
    max_k: int = 1000
    max_vectors: int = 256

    def __post_init__(self) -> None:
        if not isinstance(self.port, int) or isinstance(self.port, bool) or not 0 <= self.port <= 65535:
            raise ValueError(f"port must be an integer in [0, 65535], got {self.port!r}")
        for name in ("max_upload_bytes", "max_pixels", "max_files", "max_k", "max_vectors"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.token is not None and not self.token:
            raise ValueError("token must be a non-empty string or None (no token: write endpoints are open)")
