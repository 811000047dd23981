"""`patchify eval`: accuracy and localisation per grid level, the paper's way (mAP, LocScore, R@1).

Every database image is encoded once at the finest level requested; coarser levels are given the rows of their
grids through `Patchify.add_embeddings` (levels nest: L3's patches contain L0..L2's). Queries are encoded once as global
descriptors. Each (level, index) pair then gets its own index, is searched with every query over the whole
database (full rankings, so AP is exact), and is scored against the ground truth.
"""
from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from .config import (DEFAULT_BACKBONE, DEFAULT_BATCH_SIZE, DEFAULT_CELL_SIZING, DEFAULT_PRECISION, IndexConfig,
                     TilingConfig, WhiteningConfig, grids_for_level)
from .encoder import EncodedBatch, Encoder
from .engine import Patchify
from .records import AddReport, PatchTable
from .whitening import LearningSet, learning_images

if TYPE_CHECKING:
    from .backbones import Backbone
    from .datasets import RetrievalDataset
    from .metrics import RetrievalEvaluation


@dataclass
class LevelResult:
    level: int
    index: str
    evaluation: "RetrievalEvaluation"
    n_patches: int
    index_bytes: int
    build_seconds: float
    search_seconds: float
    hits: list = field(default_factory=list, repr=False)  # per query, for the visual report

    @property
    def summary(self) -> dict[str, float]:
        return dict(self.evaluation.summary())


@dataclass
class EvaluationRun:
    dataset: str
    backbone: str
    weights: str
    results: list[LevelResult] = field(default_factory=list)
    encode_seconds: float = 0.0
    skipped: list[str] = field(default_factory=list)

    def table(self) -> str:
        """Plain-text table: one row per (index, level)."""
        header = f"{'index':<8} {'level':>5} {'patches':>8} {'mAP':>7} {'LocScore':>9} {'R@1':>7} {'R@5':>7}"
        rows = [header, "-" * len(header)]
        no_loc = False
        for r in self.results:
            s = r.summary
            no_loc |= math.isnan(s["LocScore"])
            loc = "n/a" if math.isnan(s["LocScore"]) else f"{s['LocScore']:.4f}"
            rows.append(f"{r.index:<8} {'L' + str(r.level):>5} {r.n_patches:>8} {s['mAP']:7.4f} {loc:>9}"
                        f" {s['R@1']:7.4f} {s['R@5']:7.4f}")
        if no_loc:
            rows.append("LocScore n/a: the dataset has no ground-truth boxes in its database images")
        return "\n".join(rows)

    def to_json(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "backbone": self.backbone,
            "weights": self.weights,
            "machine": f"{platform.machine()} {platform.system()}, {platform.python_version()}",
            "encode_seconds": round(self.encode_seconds, 2),
            "skipped": self.skipped,
            "results": [
                {"index": r.index, "level": r.level, "n_patches": r.n_patches, "index_bytes": r.index_bytes,
                 "build_seconds": round(r.build_seconds, 3), "search_seconds": round(r.search_seconds, 3),
                 "summary": r.summary,
                 "per_query": [{"query": str(q.query), "ap": q.ap, "loc_score": q.loc_score}
                               for q in r.evaluation.queries]}
                for r in self.results
            ],
        }


def evaluate_levels(
    dataset: "RetrievalDataset",
    *,
    backbone: "str | Backbone" = DEFAULT_BACKBONE,
    levels: Sequence[int] = (0, 1, 2, 3),
    indexes: Sequence["str | IndexConfig"] = ("flat",),
    index_settings: dict[str, Any] | None = None,
    whitening: Any = "learned",
    global_weight: float | None = None,
    embedding_cache: bool | str | Path = True,
    precision: str = DEFAULT_PRECISION,
    cell_sizing: str = DEFAULT_CELL_SIZING,
    num_threads: int = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> EvaluationRun:
    """Evaluates `dataset` at each level with each index ("flat", "ivfpq", a faiss factory string or a config).

    The database is encoded once, at the finest level; each (level, index) engine gets the rows of its grids
    through `Patchify.add_embeddings` (levels nest), so no image is read twice. whitening / global_weight: as
    `Patchify`'s (each level's engine learns its whitening on its own patches, as a user's index would)."""
    if not levels:
        raise ValueError("levels must name at least one grid level")
    levels = sorted({int(level) for level in levels}, reverse=True)
    for level in levels:
        grids_for_level(level)  # validates
    if not dataset.database or not dataset.queries:
        raise ValueError(f"{dataset.name}: the dataset has no database images or no queries")
    settings = dict(index_settings or {})
    encoder = Encoder(backbone, TilingConfig.for_level(levels[0], cell_sizing=cell_sizing), batch_size=batch_size,
                      num_threads=num_threads, embedding_cache=embedding_cache, precision=precision)
    model = encoder.backbone
    run = EvaluationRun(dataset=dataset.name, backbone=model.name, weights=str(getattr(model, "weights", "")))

    started = time.perf_counter()
    report = AddReport()
    encoded = EncodedBatch.merge(list(encoder.encode_images([str(p) for p in dataset.database], report,
                                                            progress=progress)))
    vectors, patches, images = encoded.vectors, encoded.patches, encoded.images
    run.skipped = [f"{s.source}: {s.reason}" for s in report.skipped]
    queries = encoder.embed_queries([dataset.query_image(q) for q in range(dataset.n_queries)])
    run.encode_seconds = time.perf_counter() - started
    log(f"encoded {len(images)} database images ({len(vectors)} patches at L{levels[0]}) and "
        f"{len(queries)} queries in {run.encode_seconds:.1f} s; skipped {len(report.skipped)}")

    learning: dict[Any, LearningSet | None] = {}  # the whitening's learning cells, encoded once
    for spec in indexes:
        name = spec if isinstance(spec, str) else spec.kind
        for level in levels:
            build_started = time.perf_counter()
            engine = Patchify(backbone=model, level=level, index=spec, num_threads=num_threads,
                              batch_size=batch_size, whitening=whitening, global_weight=global_weight,
                              cell_sizing=encoder.tiling.cell_sizing, **settings)
            config = engine.whitening_config
            if config not in learning:
                learning[config] = _learning_cells(config, encoder, dataset, vectors, patches, log)
            rows = np.isin(patches.grid, engine.grids)
            engine.add_embeddings(vectors[rows], patches.select(rows), images, whitening_vectors=learning[config])
            build_seconds = time.perf_counter() - build_started
            search_started = time.perf_counter()
            hits = engine.search_batch(list(queries), k=len(images))
            search_seconds = time.perf_counter() - search_started
            evaluation = dataset.evaluate(hits)
            index = engine.index
            result = LevelResult(level=level, index=name, evaluation=evaluation, n_patches=int(rows.sum()),
                                 index_bytes=int(index.nbytes()) if index is not None else 0,
                                 build_seconds=build_seconds, search_seconds=search_seconds, hits=hits)
            run.results.append(result)
            s = result.summary
            log(f"{name} L{level}: mAP {s['mAP']:.4f}  LocScore {s['LocScore']:.4f}  R@1 {s['R@1']:.4f}")
    order = list(dict.fromkeys(r.index for r in run.results))
    run.results.sort(key=lambda r: (order.index(r.index), r.level))
    return run


def _learning_cells(config: WhiteningConfig | None, encoder: Encoder, dataset: "RetrievalDataset",
                    vectors: np.ndarray, patches: PatchTable, log: Callable[[str], None]) -> LearningSet | None:
    """What each level's whitening learns from, as `Patchify.add_images` would give it: the learn_grid cells of
    learn_images database images spread over the list (taken from the encoded patches when the finest level holds
    that grid, else encoded now). None: no whitening, or it learns on the indexed patches."""
    if config is None or config.learn_grid is None:
        return None
    grid = config.learn_grid
    description = f"{grid}x{grid} cells"
    if grid in encoder.tiling.grids:
        return LearningSet.of_grid_cells(config, vectors, patches.grid, patches.image, len(dataset.database))
    chosen = learning_images(len(dataset.database), config.learn_images)
    started = time.perf_counter()
    cells, n_images = encoder.encode_grid_cells([str(dataset.database[i]) for i in chosen], grid, len(chosen))
    log(f"encoded the whitening's learning cells ({description} of {n_images} images) in "
        f"{time.perf_counter() - started:.1f} s")
    return LearningSet(cells, n_images, description) if len(cells) else None


def write_outputs(run: EvaluationRun, out_dir: Path, dataset: "RetrievalDataset", *, report_queries: int = 4,
                  ap_min: float = 0.8, loc_max: float = 0.3) -> dict[str, Path]:
    """JSON, plots (mAP/LocScore per level; AP vs LocScore per query at the finest level) and the list of
    queries with high AP but low LocScore."""
    from .report import high_ap_low_loc, plot_ap_vs_locscore, plot_levels

    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    results_path = out_dir / "results.json"
    data = run.to_json()
    finest = {kind: max((r for r in run.results if r.index == kind), key=lambda r: r.level)
              for kind in dict.fromkeys(r.index for r in run.results)}
    data["high_ap_low_locscore"] = {
        f"{kind}_L{r.level}": [{"query": str(q.query), "ap": q.ap, "loc_score": q.loc_score}
                               for q in high_ap_low_loc(r.evaluation, ap_min=ap_min, loc_max=loc_max)]
        for kind, r in finest.items()
    }
    results_path.write_text(json.dumps(data, indent=2) + "\n")
    written["json"] = results_path
    written["report"] = write_visual_report(finest[next(iter(finest))], dataset, out_dir / "report.html",
                                            n_queries=report_queries, ap_min=ap_min, loc_max=loc_max)
    for kind in finest:
        by_level = {f"L{r.level}": r.summary for r in run.results if r.index == kind}
        written[f"levels_{kind}"] = plot_levels(by_level, out_dir / f"levels_{kind}.png")
        written[f"ap_vs_loc_{kind}"] = plot_ap_vs_locscore(finest[kind].evaluation,
                                                            out_dir / f"ap_vs_locscore_{kind}.png",
                                                            ap_min=ap_min, loc_max=loc_max)
    return written


def write_visual_report(result: LevelResult, dataset: "RetrievalDataset", path: Path, *, n_queries: int = 4,
                        ap_min: float = 0.8, loc_max: float = 0.3, k: int = 5) -> Path:
    """Self-contained HTML of chosen queries' top-k with winning boxes and ground-truth boxes: first the queries
    found by the wrong patch (high AP, low LocScore), then the best and the worst by AP."""
    from .report import high_ap_low_loc, save_report_html

    by_name = {str(q.query): i for i, q in enumerate(result.evaluation.queries)}
    chosen = [by_name[str(q.query)] for q in high_ap_low_loc(result.evaluation, ap_min=ap_min, loc_max=loc_max)]
    ranked = [i for i in np.argsort(-np.nan_to_num(result.evaluation.ap, nan=-1.0)) if i not in chosen]
    while len(chosen) < min(n_queries, len(ranked) + len(chosen)) and ranked:
        chosen.append(int(ranked.pop(0)))
        if len(chosen) < n_queries and ranked:
            chosen.append(int(ranked.pop()))
    chosen = chosen[:n_queries]
    gts = [{str(dataset.database[i]): boxes for i, boxes in dataset.boxes[q].items()} for q in chosen]
    summary = {"level": f"L{result.level}", "index": result.index, **result.summary}
    return save_report_html(path, [dataset.query_image(q) for q in chosen], [result.hits[q] for q in chosen],
                            groundtruth_boxes=gts, k=k, summary=summary,
                            title=f"{dataset.name}: top-{k} at L{result.level} ({result.index})")
