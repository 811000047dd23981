"""Building a sharded index: learn once on a sample, then encode and write every shard (in this process or on Ray).

The steps (folder layout: patchify.distributed.layout):
1. plan: the inputs (absolute paths: the workers may run elsewhere) cut into contiguous shards of `shard_size`;
   a re-run must plan the same build, and then resumes;
2. learn, once: an engine with the build's settings adds a sample of the inputs spread over all of them and learns
   what every shard must share exactly as one engine would (the whitening on its learn_grid cells; IVFPQ: the coarse
   quantiser, the PQ codebooks and the int8 re-rank ranges, trained on the sample's patches); the trained, empty
   index and the whitening are written to shared/;
3. build each shard not complete yet: an engine given the shared whitening and a copy of the trained index
   (`Patchify.start_from_trained`) adds the shard's inputs (bad files skipped and reported by `add_images`) and is
   saved; a done marker with its report follows;
4. the manifest, with each shard's global id offsets.

`ShardWorker` does steps 2 and 3 with one backbone session for all its shards; the in-process build runs one, the
Ray build one per actor (patchify.distributed.ray_backend).
"""
from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence, Union

import numpy as np

from .. import _core, store
from ..config import (DEFAULT_BACKBONE, DEFAULT_BATCH_SIZE, DEFAULT_PRECISION, DEFAULT_SAMPLE_IMAGES,
                      DEFAULT_SHARD_IMAGES, FlatConfig, IndexConfig, IVFPQConfig, TilingConfig, WhiteningConfig,
                      check_global_weight, check_precision, index_config)
from ..engine import Patchify, WhiteningSetting, whitening_setting
from ..errors import IndexFormatError
from ..images import list_image_files
from ..records import AddReport, SkippedImage
from ..whitening import Whitening, learning_images, manifest_entry
from . import layout

# A backbone for the workers: a registered name (each worker loads it), or a picklable callable returning a backbone
# object (each worker calls it once): the workers must build their own, an onnxruntime session does not pickle.
BackboneSpec = Union[str, Callable[[], Any]]


@dataclass(frozen=True)
class BuildSpec:
    """The settings of a sharded build: everything a worker needs (picklable: shipped to Ray actors)."""

    directory: str
    backbone: BackboneSpec
    tiling: TilingConfig
    index: IndexConfig
    whitening: WhiteningConfig | None
    global_weight: float | None
    batch_size: int = DEFAULT_BATCH_SIZE
    num_threads: int = 0
    precision: str = DEFAULT_PRECISION  # of a backbone given by name (a factory's backbone runs in its own)

    def settings(self) -> dict[str, Any]:
        """What a re-run must match to resume (JSON)."""
        backbone = self.backbone if isinstance(self.backbone, str) else \
            f"{self.backbone.__module__}.{getattr(self.backbone, '__qualname__', type(self.backbone).__qualname__)}"
        return {"backbone": backbone, "tiling": self.tiling.to_dict(), "index": self.index.to_dict(),
                "whitening": None if self.whitening is None else self.whitening.to_dict(),
                "global_weight": self.global_weight, "precision": self.precision}

    def make_backbone(self) -> Any:
        if isinstance(self.backbone, str):
            from ..backbones import load_backbone

            return load_backbone(self.backbone, num_threads=self.num_threads, precision=self.precision)
        return self.backbone()


@dataclass(frozen=True)
class SharedTraining:
    """What every shard shares: the whitening (None: raw vectors) and the trained, empty index (None: flat)."""

    whitening: Whitening | None
    index: Any  # IVFPQIndex | None
    description: dict[str, Any]

    @classmethod
    def load(cls, directory: Path) -> "SharedTraining":
        from ..index.ivfpq import IVFPQIndex

        folder = layout.shared_folder(directory)
        description = layout.read_json(folder / layout.SHARED_DESCRIPTION, "shared training")
        found = layout.file_digests(folder, list(description["files"]))
        if found != description["files"]:
            raise IndexFormatError(f"{folder}: files differ from their sha256 in {layout.SHARED_DESCRIPTION}")
        entry = description["whitening"]
        whitening = Whitening.load_file(folder, entry) if entry is not None and entry.get("learned") else None
        index = IVFPQIndex.load(folder) if description["index"] is not None else None
        return cls(whitening, index, description)


def learn_shared(spec: BuildSpec, sample: Sequence[str], backbone: Any) -> dict[str, Any]:
    """Step 2: learns the shared whitening / IVFPQ training on `sample` and writes shared/; returns its
    description."""
    directory = Path(spec.directory)
    description: dict[str, Any] = {"whitening": None, "index": None, "files": {}, "sample_images": len(sample),
                                   "sample_patches": 0, "sample_skipped": 0}
    trains = isinstance(spec.index, IVFPQConfig)
    with store.atomic_directory(layout.shared_folder(directory)) as staging:
        if trains or spec.whitening is not None:
            engine = Patchify(backbone, tiling=spec.tiling, index=spec.index, batch_size=spec.batch_size,
                              num_threads=spec.num_threads, whitening=spec.whitening or "none")
            report = engine.add_images(list(sample))
            description.update(sample_patches=report.n_patches, sample_skipped=len(report.skipped))
            if spec.whitening is not None:
                if engine.whitening is None:
                    raise ValueError(f"the sample ({report.n_images} images, {report.n_patches} patches) is too small "
                                     f"to learn the whitening from (it needs {spec.whitening.min_vectors} vectors): "
                                     "index more images, or whitening='none'")
                description["whitening"] = manifest_entry(engine.whitening, spec.whitening)
                engine.whitening.save_file(staging)
            if trains:
                need = engine.exact_until_trained
                if need is not None:
                    raise ValueError(f"the sample ({report.n_images} images, {report.n_patches} patches) is too small "
                                     f"to train IVFPQ (it needs {need:,} patches): raise sample_images, lower "
                                     "nlist/nbits, or use the flat index")
                engine.index.trained_copy().save(staging)  # type: ignore[union-attr]
                description["index"] = {"dim": engine.index.dim, **engine.index.config.to_dict()}  # type: ignore
        names = [p.name for p in staging.iterdir()]
        description["files"] = layout.file_digests(staging, names)
        layout.write_json(staging / layout.SHARED_DESCRIPTION, description)
    return description


def shard_is_complete(directory: Path, shard: int, inputs: Sequence[str], shared_files: dict[str, str]) -> bool:
    """Whether a shard was built from exactly these inputs under this shared training (a re-run keeps it)."""
    marker = layout.done_marker(directory, shard)
    if not marker.is_file():
        return False
    try:
        done = layout.read_json(marker, "shard done marker")
    except IndexFormatError:
        return False
    if done.get("inputs") != list(inputs) or done.get("shared_files") != shared_files:
        return False
    return done["report"]["n_images"] == 0 or (layout.shard_folder(directory, shard) / store.MANIFEST).is_file()


def build_shard(spec: BuildSpec, shard: int, inputs: Sequence[str], backbone: Any,
                shared: SharedTraining | None = None) -> dict[str, Any]:
    """Step 3 for one shard (kept as it is when already complete); returns its done marker."""
    directory = Path(spec.directory)
    shared = shared or SharedTraining.load(directory)
    marker = layout.done_marker(directory, shard)
    if shard_is_complete(directory, shard, inputs, shared.description["files"]):
        return {**layout.read_json(marker, "shard done marker"), "kept": True}
    whitening: WhiteningSetting = shared.whitening if spec.whitening is not None else "none"
    engine = Patchify(backbone, tiling=spec.tiling, index=spec.index, batch_size=spec.batch_size,
                      num_threads=spec.num_threads, whitening=whitening, global_weight=spec.global_weight)
    if shared.index is not None:
        engine.start_from_trained(shared.index.trained_copy())
    report = engine.add_images(list(inputs))
    if report.n_images:
        engine.save(layout.shard_folder(directory, shard))
    done = {"shard": shard, "inputs": list(inputs), "shared_files": shared.description["files"],
            "report": report_to_dict(report)}
    layout.write_json(marker, done)
    return {**done, "kept": False}


class ShardWorker:
    """One backbone session building any number of shards: what an encoder actor holds (and the in-process
    build uses)."""

    def __init__(self, spec: BuildSpec) -> None:
        self.spec = spec
        self.backbone = spec.make_backbone()
        self._shared: SharedTraining | None = None

    def learn(self, sample: Sequence[str]) -> dict[str, Any]:
        return learn_shared(self.spec, sample, self.backbone)

    def build(self, shard: int, inputs: Sequence[str]) -> dict[str, Any]:
        if self._shared is None:  # read once per worker
            self._shared = SharedTraining.load(Path(self.spec.directory))
        return build_shard(self.spec, shard, inputs, self.backbone, self._shared)


class BuildExecutor(Protocol):
    """Runs step 2 and the shards of step 3 somewhere."""

    def learn(self, spec: BuildSpec, sample: Sequence[str]) -> dict[str, Any]: ...

    def build(self, spec: BuildSpec, shards: Sequence[tuple[int, list[str]]]) -> Iterator[dict[str, Any]]: ...


class LocalBuild:
    """Everything in this process, one shard after another, one backbone session."""

    def __init__(self) -> None:
        self._worker: ShardWorker | None = None

    def _worker_for(self, spec: BuildSpec) -> ShardWorker:
        if self._worker is None or self._worker.spec != spec:
            self._worker = ShardWorker(spec)
        return self._worker

    def learn(self, spec: BuildSpec, sample: Sequence[str]) -> dict[str, Any]:
        return self._worker_for(spec).learn(sample)

    def build(self, spec: BuildSpec, shards: Sequence[tuple[int, list[str]]]) -> Iterator[dict[str, Any]]:
        worker = self._worker_for(spec)
        for shard, inputs in shards:
            yield worker.build(shard, inputs)


@dataclass
class ShardedBuildReport:
    """What `build_sharded_index` did: `report` is the whole build's AddReport (global image ids, every skipped
    input with its reason, as `Patchify.add_images` reports them); shards built now and kept from an earlier run."""

    directory: Path
    report: AddReport
    n_shards: int
    shards_built: list[int] = field(default_factory=list)
    shards_kept: list[int] = field(default_factory=list)
    learned: bool = False

    def __str__(self) -> str:
        kept = f", {len(self.shards_kept)} kept from an earlier run" if self.shards_kept else ""
        return (f"{self.directory}: {self.n_shards} shards ({len(self.shards_built)} built{kept})\n"
                f"{self.report}")


def report_to_dict(report: AddReport) -> dict[str, Any]:
    return {"image_ids": report.image_ids, "n_images": report.n_images, "n_patches": report.n_patches,
            "skipped": [{"source": s.source, "reason": s.reason} for s in report.skipped],
            "seconds": report.seconds, "from_cache": report.from_cache, "timings": report.timings,
            "notes": report.notes}


def build_sharded_index(sources: "str | os.PathLike | Iterable[str | os.PathLike]", directory: str | os.PathLike, *,
                        backbone: BackboneSpec = DEFAULT_BACKBONE, level: int | None = None,
                        grids: Sequence[int] | None = None, overlap: float = 0.0, tiling: TilingConfig | None = None,
                        index: "str | IndexConfig" = "flat", whitening: WhiteningSetting = "learned",
                        global_weight: float | None = None, shard_size: int = DEFAULT_SHARD_IMAGES,
                        sample_images: int | None = None, batch_size: int = DEFAULT_BATCH_SIZE, num_threads: int = 0,
                        executor: "str | BuildExecutor" = "local", progress: bool = False,
                        precision: str = DEFAULT_PRECISION, cell_sizing: str | None = None,
                        **index_settings: Any) -> ShardedBuildReport:
    """Builds (or resumes building) a sharded index of `sources` (a folder, searched recursively, or image paths)
    in `directory`. Settings as `Patchify(...)`; backbone: a registered name or a picklable callable returning a
    backbone. executor: "local" (this process), "ray" (encoder actors on the Ray cluster this process is connected
    to: `ray.init(...)` first, or `patchify.distributed.ray_backend.RayBuild(...)` for its options), or an
    executor object. Re-running with the same inputs and settings keeps every complete shard."""
    started = time.perf_counter()
    items = _input_paths(sources)
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be an integer >= 1, got {shard_size!r}")
    whitening_config, given = whitening_setting(whitening)
    if given is not None:
        raise ValueError("a sharded build learns its whitening once on its sample: give 'learned', 'none' or a "
                         "WhiteningConfig")
    tiling = TilingConfig.from_settings(tiling, level, grids, overlap, cell_sizing)
    config = index_config(index, **index_settings)
    spec = BuildSpec(str(Path(directory).resolve()), backbone, tiling, config, whitening_config,
                     check_global_weight(global_weight), batch_size, num_threads, check_precision(precision))
    root = Path(spec.directory)
    shards = [items[i:i + shard_size] for i in range(0, len(items), shard_size)]
    # Each shard's inputs by digest: the plan stays small whatever the collection (the done markers list them).
    _check_plan(root, {"settings": spec.settings(),
                       "shards": [hashlib.sha256("\n".join(inputs).encode()).hexdigest() for inputs in shards]})
    run = _executor(executor)
    learned = False
    if not (layout.shared_folder(root) / layout.SHARED_DESCRIPTION).is_file():
        if sample_images is None:
            sample_images = DEFAULT_SAMPLE_IMAGES if isinstance(config, IVFPQConfig) else \
                (whitening_config.learn_images if whitening_config is not None else 0)
        if isinstance(config, IVFPQConfig) or whitening_config is not None:
            run.learn(spec, [items[i] for i in learning_images(len(items), sample_images)] if sample_images else [])
            learned = True
        else:  # nothing to learn: no encoder needed
            learn_shared(spec, [], None)
    shared_files = layout.read_json(layout.shared_folder(root) / layout.SHARED_DESCRIPTION, "shared training")["files"]
    todo = [(s, inputs) for s, inputs in enumerate(shards) if not shard_is_complete(root, s, inputs, shared_files)]
    built = [s for s, _ in todo]
    done = {s: layout.read_json(layout.done_marker(root, s), "shard done marker")
            for s in range(len(shards)) if s not in built}
    bar = _progress(len(todo), progress)
    for marker in run.build(spec, todo):
        done[int(marker["shard"])] = marker
        bar.update(1)
    bar.close()
    report = _write_manifest(root, [done[s] for s in range(len(shards))])
    report.seconds = time.perf_counter() - started
    if learned:
        report.notes.insert(0, "learned the shared whitening / IVFPQ training on a sample of the inputs")
    kept = sorted(set(range(len(shards))) - set(built))
    return ShardedBuildReport(root, report, len(shards), built, kept, learned)


def _input_paths(sources: "str | os.PathLike | Iterable[str | os.PathLike]") -> list[str]:
    """Absolute paths of the inputs (a folder: its image files): the workers may run in other folders or on other
    machines, so in-memory images are refused."""
    if isinstance(sources, (str, os.PathLike)):
        path = Path(sources)
        paths = list(list_image_files(path)) if path.is_dir() else [path]
    else:
        paths = []
        for source in sources:
            if not isinstance(source, (str, os.PathLike)):
                raise ValueError(f"a sharded build takes image paths (its workers read them), got "
                                 f"{type(source).__name__}")
            paths.append(Path(source))
    if not paths:
        raise ValueError(f"no images to index in {sources}")
    return [str(path.absolute()) for path in paths]


def _check_plan(root: Path, plan: dict[str, Any]) -> None:
    """Writes the plan, or checks that a folder already holding one plans the same build (then it resumes)."""
    path = root / layout.PLAN
    if path.is_file():
        if layout.read_json(path, "build plan") != plan:
            raise FileExistsError(f"{root}: holds a sharded build of other inputs or settings; choose another "
                                  "folder, or delete it to start over")
        return
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root}: exists and is not a sharded index; choose another folder")
    import json

    layout.write_json(path, json.loads(json.dumps(plan)))  # as JSON reads it back (tuples become lists)


def _executor(executor: "str | BuildExecutor") -> BuildExecutor:
    if executor == "local":
        return LocalBuild()
    if executor == "ray":
        from .ray_backend import RayBuild

        return RayBuild()
    if isinstance(executor, str):
        raise ValueError(f"executor must be 'local', 'ray' or an executor object, got {executor!r}")
    return executor


def _progress(total: int, show: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc="shards", unit="shard", disable=not show)


def save_sharded_index(engines: Sequence[Patchify], directory: str | os.PathLike) -> Path:
    """Writes engines as the shards of a new sharded index, in order (e.g. shards filled with `add_embeddings`);
    their images get global ids by shard order. The engines must share their training, as a sharded build's shards
    do: the same whitening, and IVFPQ indexes each started from a `trained_copy` of one trained index
    (`Patchify.start_from_trained`); a different whitening or different codebooks are refused."""
    if not engines:
        raise ValueError("save_sharded_index needs at least one engine")
    root = Path(directory).resolve()
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root}: exists and is not empty; choose another folder")
    first = engines[0]
    for position, engine in enumerate(engines):
        if not _same_training(first, engine):
            raise ValueError(f"engine {position} does not share engine 0's whitening, settings or IVFPQ training: its "
                             "results could not be merged exactly")
    description: dict[str, Any] = {"whitening": manifest_entry(first.whitening, first.whitening_config),
                                   "index": None, "sample_images": 0, "sample_patches": 0, "sample_skipped": 0}
    with store.atomic_directory(layout.shared_folder(root)) as staging:
        if first.whitening is not None:
            first.whitening.save_file(staging)
        if not isinstance(first.index_config, FlatConfig):
            first.index.trained_copy().save(staging)  # type: ignore[union-attr]
            description["index"] = {"dim": first.index.dim, **first.index_config.to_dict()}  # type: ignore
        description["files"] = layout.file_digests(staging, [p.name for p in staging.iterdir()])
        layout.write_json(staging / layout.SHARED_DESCRIPTION, description)
    markers = []
    for shard, engine in enumerate(engines):
        engine.save(layout.shard_folder(root, shard))
        report = AddReport(image_ids=list(range(engine.n_images)), n_patches=engine.n_patches)
        marker = {"shard": shard, "inputs": [record.name for record in engine.images],
                  "shared_files": description["files"], "report": report_to_dict(report)}
        layout.write_json(layout.done_marker(root, shard), marker)
        markers.append(marker)
    _write_manifest(root, markers)
    return root


def _same_training(a: Patchify, b: Patchify) -> bool:
    import faiss

    if (a.tiling, a.index_config, a.effective_global_weight) != (b.tiling, b.index_config, b.effective_global_weight):
        return False
    wa, wb = a.whitening, b.whitening
    if (wa is None) != (wb is None) or (wa is not None and wb is not None and not (
            np.array_equal(wa.mean, wb.mean) and np.array_equal(wa.projection, wb.projection))):
        return False
    if isinstance(a.index_config, FlatConfig):
        return True
    fa, fb = a.index.faiss_index, b.index.faiss_index  # type: ignore[union-attr]
    return bool(np.array_equal(faiss.vector_to_array(fa.pq.centroids), faiss.vector_to_array(fb.pq.centroids)) and
                np.array_equal(fa.quantizer.reconstruct_n(0, fa.nlist), fb.quantizer.reconstruct_n(0, fb.nlist)))


def _write_manifest(root: Path, markers: list[dict[str, Any]]) -> AddReport:
    """Step 4: the manifest (global id offsets in plan order); returns the whole build's AddReport. Backbone and
    tiling are what the shards recorded (the tiling as done: a fixed-size backbone turns "fit" cells into "fixed"),
    and every shard must agree."""
    report = AddReport()
    shards = []
    first_image = first_patch = 0
    backbone: dict[str, Any] | None = None
    tiling: dict[str, Any] | None = None
    shard_manifest: dict[str, Any] | None = None
    for shard, marker in enumerate(markers):
        part = marker["report"]
        folder = layout.shard_folder(root, shard)
        if part["n_images"]:
            shard_manifest = store.read_manifest(folder)
            if backbone is None:
                backbone, tiling = shard_manifest["backbone"], shard_manifest["tiling"]
            elif shard_manifest["backbone"]["identity"] != backbone["identity"]:
                raise IndexFormatError(f"{folder}: built with another backbone than shard 0's")
            elif shard_manifest["tiling"] != tiling:
                raise IndexFormatError(f"{folder}: tiled otherwise than shard 0 ({shard_manifest['tiling']} vs "
                                       f"{tiling})")
        shards.append({"path": str(folder.relative_to(root)) if part["n_images"] else None,
                       "inputs": len(marker["inputs"]), "n_images": part["n_images"], "n_patches": part["n_patches"],
                       "first_image_id": first_image, "first_patch_id": first_patch})
        report.image_ids.extend(first_image + i for i in part["image_ids"])
        report.skipped.extend(SkippedImage(s["source"], s["reason"]) for s in part["skipped"])
        report.n_patches += part["n_patches"]
        report.from_cache += part["from_cache"]
        for stage, seconds in part["timings"].items():
            report.timings[stage] = report.timings.get(stage, 0.0) + seconds
        first_image += part["n_images"]
        first_patch += part["n_patches"]
    if backbone is None or shard_manifest is None:
        raise ValueError(f"none of the {sum(len(m['inputs']) for m in markers)} inputs could be indexed")
    shared = layout.read_json(layout.shared_folder(root) / layout.SHARED_DESCRIPTION, "shared training")
    whitening = shard_manifest["whitening"]
    layout.write_json(root / layout.MANIFEST, {
        "format": layout.FORMAT_NAME, "format_version": layout.FORMAT_VERSION,
        "patchify_version": _core.__version__,
        "backbone": backbone,
        "tiling": tiling,
        "index": shard_manifest["index"],
        "input_dim": whitening["input_dim"] if whitening and whitening.get("learned") else
        shard_manifest["index"]["dim"],
        "whitening": whitening,
        "scoring": shard_manifest["scoring"],
        "shared": {"files": shared["files"], "sample_images": shared["sample_images"],
                   "sample_patches": shared["sample_patches"]},
        "n_images": first_image, "n_patches": first_patch,
        "shards": shards,
    })
    return report
