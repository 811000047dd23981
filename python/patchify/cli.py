"""Command line: `patchify index`, `patchify search`, `patchify info`, `patchify serve` (and `patchify eval`); index,
search and info also take a sharded index (patchify.distributed: `patchify index --ray`)."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from .errors import PatchifyError

from . import store
from .config import (CELL_SIZINGS, DEFAULT_BACKBONE, DEFAULT_BATCH_SIZE, DEFAULT_CELL_SIZING, DEFAULT_GLOBAL_WEIGHT,
                     DEFAULT_LEVEL, DEFAULT_PRECISION, MIN_FIT_INPUT_SIZE, PRECISIONS, RERANK_4BIT_DEPTH,
                     RERANK_MIN_SHORTLIST, RERANK_SHORTLIST_FACTOR, FlatConfig, IVFPQConfig, ServeConfig,
                     index_config_from_dict, precision_of)
from .engine import Patchify
from .whitening import manifest_entry


def _check_output_folder(out: Path, overwrite: bool, append: bool) -> None:
    """Refuses, before any encoding, what would fail or destroy something after it."""
    if (out / store.MANIFEST).is_file():
        if not (overwrite or append):
            raise FileExistsError(f"{out}: already holds an index; pass --overwrite to replace it or --append to "
                                  "add to it")
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out}: exists and is not a Patchify index; choose another --out")
    parent = out if out.is_dir() else out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise NotADirectoryError(f"{out}: cannot write there ({parent} is a file, not a folder)")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"{out}: cannot write there ({parent} is not writable)")


def cmd_index(args: argparse.Namespace) -> int:
    from .images import list_image_files

    try:
        files = list_image_files(args.images_dir)
    except (FileNotFoundError, NotADirectoryError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not files:
        print(f"error: {args.images_dir}: no files to index (empty folder)", file=sys.stderr)
        return 2
    if args.ray is not None or args.shard_size is not None:
        return _index_sharded(args, files)
    _check_output_folder(args.out, args.overwrite, args.append)
    if args.append and (args.out / store.MANIFEST).is_file():
        engine = Patchify.load(args.out, num_threads=args.threads, embedding_cache=args.cache or None)
    else:
        engine = Patchify(backbone=args.backbone, level=args.level, index=args.index, overlap=args.overlap,
                          batch_size=args.batch_size, num_threads=args.threads, embedding_cache=args.cache or None,
                          whitening=args.whitening, global_weight=args.global_weight, **encoding_settings(args),
                          **_index_settings(args))
    started = time.perf_counter()
    report = engine.add_images(files, progress=not args.quiet)
    for skipped in report.skipped:
        print(f"skipped {skipped.source}: {skipped.reason}", file=sys.stderr)
    if report.n_images == 0:
        print(f"error: none of the {len(files)} files in {args.images_dir} could be indexed", file=sys.stderr)
        return 1
    out = engine.save(args.out)
    seconds = time.perf_counter() - started
    backbone = engine.backbone
    print(f"indexed {report.n_images} images ({report.n_patches} patches, grids {list(engine.grids)}) "
          f"in {seconds:.1f} s; skipped {len(report.skipped)}; the index holds {engine.n_images} images")
    print(f"backbone: {backbone.name} [{backbone.weights}] on {backbone.provider}")
    print(f"index: {out} ({engine.index_config.kind}, {store.folder_bytes(out):,} bytes on disk)")
    entry = manifest_entry(engine.whitening, engine.whitening_config)
    print(f"whitening: {_whitening_text(entry, engine.n_patches)}; global weight {engine.effective_global_weight:g}")
    for note in report.notes:
        print(f"note: {note}")
    return 0


def _index_sharded(args: argparse.Namespace, files: Sequence[Path]) -> int:
    """`patchify index --ray [ADDRESS]` / `--shard-size N`: a sharded index (patchify.distributed); running the same
    command again resumes an interrupted build."""
    import shutil

    from .config import DEFAULT_SHARD_IMAGES
    from .distributed import build_sharded_index, layout

    if args.append:
        print("error: a sharded index is built in one go: --append is not supported with --ray/--shard-size",
              file=sys.stderr)
        return 2
    if (args.out / layout.PLAN).is_file() and args.overwrite:
        shutil.rmtree(args.out)
    elif not (args.out / layout.PLAN).is_file():  # else: the same build again resumes it
        _check_output_folder(args.out, args.overwrite, False)
        if (args.out / store.MANIFEST).is_file():  # --overwrite of a single index
            shutil.rmtree(args.out)
    executor: Any = "local"
    if args.ray is not None:
        from .distributed.ray_backend import RayBuild, connect

        connect(args.ray or None)
        executor = RayBuild(args.actors, gpus_per_actor=args.gpus_per_actor)
    built = build_sharded_index(files, args.out, backbone=args.backbone, level=args.level, overlap=args.overlap,
                                index=args.index, whitening=args.whitening, global_weight=args.global_weight,
                                shard_size=args.shard_size or DEFAULT_SHARD_IMAGES, sample_images=args.sample_images,
                                batch_size=args.batch_size, num_threads=args.threads, executor=executor,
                                progress=not args.quiet, **encoding_settings(args), **_index_settings(args))
    report = built.report
    for skipped in report.skipped:
        print(f"skipped {skipped.source}: {skipped.reason}", file=sys.stderr)
    kept = f", {len(built.shards_kept)} kept from an earlier run" if built.shards_kept else ""
    print(f"indexed {report.n_images} images ({report.n_patches} patches) into {built.n_shards} "
          f"shard{'s' if built.n_shards != 1 else ''} "
          f"({len(built.shards_built)} built now{kept}) in {report.seconds:.1f} s; skipped {len(report.skipped)}")
    print(f"sharded index: {args.out} ({store.folder_bytes(args.out):,} bytes on disk)")
    for note in report.notes:
        print(f"note: {note}")
    return 0


def _info_sharded(args: argparse.Namespace) -> int:
    from .distributed import layout
    from .distributed.build import SharedTraining

    manifest = layout.read_manifest(args.index_dir)
    SharedTraining.load(Path(args.index_dir))  # checks the shared training's files against their sha256
    for shard in manifest["shards"]:
        if shard["path"] is None:
            continue
        folder = Path(args.index_dir) / shard["path"]
        if args.verify:
            store.load(folder, verify=True)
        else:
            store.check_files(folder, store.read_manifest(folder), checksums=False)
    index = manifest["index"]
    options = ", ".join(f"{k}={v}" for k, v in index.items() if k not in ("kind", "dim"))
    print(f"sharded index {args.index_dir}: {len(manifest['shards'])} shards, {manifest['n_images']} images, "
          f"{manifest['n_patches']} patches, grids {manifest['tiling']['grids']}")
    sample = manifest["shared"]["sample_images"]
    shared = f"shared training learned on {sample} sample images" if sample else "nothing learned to share"
    print(f"index kind: {index['kind']} (dim {index['dim']}; {options}); {shared}")
    print(f"whitening: {_whitening_text(manifest['whitening'], int(manifest['n_patches']))}")
    print(f"backbone: {manifest['backbone']['name']} [{manifest['backbone'].get('weights')}]")
    for shard in manifest["shards"]:
        print(f"  {shard['path'] or '(empty)'}: {shard['n_images']} images (global ids {shard['first_image_id']}.."
              f"{shard['first_image_id'] + shard['n_images'] - 1}), {shard['n_patches']} patches")
    print(f"{store.folder_bytes(Path(args.index_dir)):,} bytes on disk")
    print("verified: every shard's files match their sha256 and load" if args.verify else
          "checked: every shard's files are present with their sizes (--verify also checks sha256)")
    return 0


def _whitening_text(entry: dict[str, Any] | None, n_patches: int) -> str:
    """A saved index's whitening (its manifest entry, see patchify.whitening.manifest_entry) in words."""
    if entry is None:
        return "none (raw cosines)"
    config = entry["config"]
    if not entry.get("learned"):
        return (f"pending (learns once the index holds {config['min_vectors']} patches; it holds {n_patches}, "
                "searched as raw cosines until then)")
    learned_on = entry["learned_on_vectors"]
    stale = ""  # only for a whitening learned on the index's own patches: learning on sampled cells is by design
    if learned_on < n_patches // 2 and entry.get("learned_from", "patches") in ("patches", "indexed patches"):
        stale = "; the index has grown since: Patchify.relearn_whitening() learns on everything"
    return (f"learned on {learned_on:,} {entry.get('learned_from', 'patches')} of {entry['learned_on_images']:,} "
            f"images (power {config['power']}, shrinkage {config['shrinkage']}, {entry['input_dim']}->"
            f"{entry['output_dim']} dims){stale}")


def _index_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The index options given on the command line (None = the config's default)."""
    names = ("dtype", "nlist", "m", "nbits", "nprobe", "training_source", "rerank", "rerank_shortlist",
             "rerank_storage")
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def cmd_search(args: argparse.Namespace) -> int:
    from .images import ImageError

    from .distributed import ShardedIndex, is_sharded_index

    engine: Patchify | ShardedIndex
    if is_sharded_index(args.index_dir):
        if args.ray is not None:
            from .distributed.ray_backend import connect

            connect(args.ray or None)
        engine = ShardedIndex.load(args.index_dir, num_threads=args.threads,
                                   executor="local" if args.ray is None else "ray")
    else:
        engine = Patchify.load(args.index_dir, num_threads=args.threads)
    try:
        hits = engine.search(args.query, k=args.k)
    except (ImageError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"query: {args.query}   backbone: {engine.backbone.name} [{engine.backbone.weights}]")
    print(f"{'rank':>4}  {'score':>7}  {'level':>5}  {'box (x0,y0,x1,y1)':<22}  path")
    for hit in hits:
        box = ",".join(str(v) for v in hit.box)
        print(f"{hit.rank + 1:>4}  {hit.score:7.4f}  {hit.level:>5}  {box:<22}  {hit.path}")
    if args.show:
        from .report import draw_results
        from .images import load_rgb

        image = draw_results(load_rgb(args.query), hits)
        image.save(args.show)
        print(f"wrote {args.show}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .distributed import is_sharded_index

    if is_sharded_index(args.index_dir):
        return _info_sharded(args)
    manifest = store.read_manifest(args.index_dir)
    settings = store.describe(manifest)
    if args.verify:
        store.load(args.index_dir, verify=True)
    else:  # cheap, but catches a missing or truncated file: `info` must never call a damaged index fine
        store.check_files(Path(args.index_dir), manifest, checksums=False)
    backbone = manifest["backbone"]
    index = settings["index"]
    options = ", ".join(f"{k}={v}" for k, v in index.items() if k not in ("kind", "dim"))
    print(f"index {args.index_dir}: format v{manifest['format_version']}, {manifest['n_images']} images, "
          f"{manifest['n_patches']} patches, grids {settings['tiling']['grids']}")
    print(f"index kind: {index['kind']} (dim {index['dim']}; {options})")
    target = manifest.get("target_index")
    if target:
        configured = index_config_from_dict(target)
        need = configured.min_training_vectors() if isinstance(configured, IVFPQConfig) else 0
        print(f"configured: {target['kind']} ({', '.join(f'{k}={v}' for k, v in target.items() if k != 'kind')}); "
              f"searched exactly until it has {need:,} patches to train on")
    whitening = manifest.get("whitening") if manifest["format_version"] >= 3 else None
    print(f"whitening: {_whitening_text(whitening, int(manifest['n_patches']))}")
    weight = manifest.get("scoring", {}).get("global_weight", 0.0)
    if weight is None:  # the default rule
        weight = DEFAULT_GLOBAL_WEIGHT if whitening is not None and whitening.get("learned") else 0.0
    print("scoring: plain max over patches" if weight == 0 else
          f"scoring: {weight:g} x whole-image score + {1 - weight:g} x best patch score")
    print(f"backbone: {backbone['name']} [{backbone.get('weights')}]")
    tiling = settings["tiling"]
    precision = precision_of(backbone.get("identity"))
    sizing = ("cells at about their own size, at least {} px".format(tiling.get("min_input_size"))
              if tiling.get("cell_sizing") == "fit" else "every cell at the backbone's input size")
    print(f"encoding: {precision}, {sizing}")
    print(f"{store.folder_bytes(Path(args.index_dir)):,} bytes on disk")
    if args.verify:
        print("verified: every file's size and sha256 match the manifest, and the index loads")
    elif manifest.get("files"):
        print("checked: every file the manifest lists is present with its size (--verify also checks sha256)")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from .serve import serve
    except ImportError as exc:
        print(f"error: patchify serve needs the serve extra (pip install \"patchify[serve]\"): {exc}", file=sys.stderr)
        return 2
    token = args.token if args.token is not None else os.environ.get(TOKEN_VARIABLE) or None
    serve(args.index_dir, ServeConfig(host=args.host, port=args.port, token=token))
    return 0


TOKEN_VARIABLE = "PATCHIFY_SERVE_TOKEN"


def _load_dataset(args: argparse.Namespace):
    from . import datasets

    if args.format == "composite":
        root = Path(args.dataset)
        if not (root / "groundtruth.json").is_file():
            if args.build is None:
                raise FileNotFoundError(f"{root}: no composite benchmark here (no groundtruth.json); "
                                        "pass --build N_OBJECTS,POSITIVES,DISTRACTORS to build one")
            n_objects, positives, distractors = (int(v) for v in args.build.split(","))
            print(f"building the composite benchmark in {root} ({n_objects} objects x {positives} positives, "
                  f"{distractors} distractors, seed {args.seed})")
            return datasets.build_composite_benchmark(root, n_objects=n_objects, positives_per_object=positives,
                                                      n_distractors=distractors, seed=args.seed)
        return datasets.load_composite(root)
    if args.format == "grocery":
        return datasets.load_grocery(args.dataset, splits=args.split.split(","))
    if args.format == "instre":
        return datasets.load_instre(args.dataset)
    if args.format == "ilias":
        return datasets.load_ilias(args.dataset)
    return datasets.load_revisited(args.dataset, name=args.format, protocol=args.protocol)


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluation import evaluate_levels, write_outputs

    dataset = _load_dataset(args)
    levels = [int(v) for v in args.levels.split(",")]
    indexes = [v for v in args.index.split(",") if v]
    run = evaluate_levels(dataset, backbone=args.backbone, levels=levels, indexes=indexes,
                          index_settings=_index_settings(args), whitening=args.whitening,
                          global_weight=args.global_weight, **encoding_settings(args),
                          embedding_cache=args.cache or True, num_threads=args.threads, progress=not args.quiet)
    print(f"\n{dataset.name}: {len(dataset.database)} database images, {dataset.n_queries} queries; "
          f"backbone {run.backbone} [{run.weights}]")
    print(run.table())
    written = write_outputs(run, args.out, dataset)
    for what, path in written.items():
        print(f"wrote {what}: {path}")
    return 0


def _add_index_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("index settings (defaults: patchify.config)")
    group.add_argument("--dtype", choices=["float32", "float16"], default=None,
                       help=f"flat index storage (default {FlatConfig.dtype})")
    group.add_argument("--nlist", type=int, default=None,
                       help="IVFPQ coarse lists (default: ~4 sqrt(training patches))")
    group.add_argument("--m", type=int, default=None,
                       help=f"IVFPQ sub-quantisers, must divide the dimension (default {IVFPQConfig.m})")
    group.add_argument("--nbits", type=int, default=None, help=f"IVFPQ bits per code (default {IVFPQConfig.nbits})")
    group.add_argument("--nprobe", type=int, default=None,
                       help=f"IVFPQ lists visited per query (default {IVFPQConfig.nprobe})")
    group.add_argument("--training-source", dest="training_source", default=None,
                       choices=["all", "salient"],
                       help=f"IVFPQ training vectors (default {IVFPQConfig.training_source})")
    group.add_argument("--rerank", choices=["int8", "float16", "none"], default=None,
                       help=f"IVFPQ second stage: re-score the shortlisted images' patches from int8 or float16 "
                            f"copies, or none (default {IVFPQConfig.rerank})")
    group.add_argument("--rerank-shortlist", dest="rerank_shortlist", type=int, default=None,
                       help=f"images the IVFPQ first stage hands to the second (default: {RERANK_SHORTLIST_FACTOR} x "
                            f"k, at least {RERANK_MIN_SHORTLIST}; {RERANK_4BIT_DEPTH} x that with --nbits 4)")
    group.add_argument("--rerank-storage", dest="rerank_storage", choices=["ram", "mmap"], default=None,
                       help=f"re-rank copies in RAM or memory-mapped from the index folder once loaded "
                            f"(default {IVFPQConfig.rerank_storage})")
    group.add_argument("--whitening", choices=["learned", "none"], default="learned",
                       help="PCA whitening learned on the indexed patches (default), or raw cosines")
    group.add_argument("--global-weight", dest="global_weight", type=float, default=None,
                       help=f"image score = w x whole-image score + (1 - w) x best patch score; 0 = plain max "
                            f"(default: {DEFAULT_GLOBAL_WEIGHT} with whitening, 0 without)")


def encoding_settings(args: argparse.Namespace) -> dict[str, Any]:
    """precision and cell_sizing as the options give them (--crop-mode: the paper's)."""
    if args.crop_mode:
        return {"precision": "fp32", "cell_sizing": "fixed"}
    return {"precision": args.precision, "cell_sizing": args.cell_sizing}


def _add_encoding_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("encoding (what indexing costs; see README, 'What indexing costs')")
    group.add_argument("--precision", choices=PRECISIONS, default=DEFAULT_PRECISION,
                       help="backbone weights: int8 (CPU, fastest), fp32 (the export as is), fp16 (CUDA)")
    group.add_argument("--cell-sizing", dest="cell_sizing", choices=CELL_SIZINGS, default=DEFAULT_CELL_SIZING,
                       help=f"fit: each cell encoded at about its own pixel size (at least {MIN_FIT_INPUT_SIZE} px); "
                            "fixed: every cell resized to the backbone's input size (the paper's crop mode)")
    group.add_argument("--crop-mode", dest="crop_mode", action="store_true",
                       help="the paper's crop mode: --precision fp32 --cell-sizing fixed (slower, see README)")


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" except where the default is None: those options' help says their default itself (it
    lives in patchify.config, and None means "the config's")."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="patchify", description="Patch-wise instance retrieval")
    sub = parser.add_subparsers(dest="command", required=True)
    formatter = _DefaultsFormatter

    index = sub.add_parser("index", help="index a folder of images", formatter_class=formatter)
    index.add_argument("images_dir", type=Path, help="folder of images (searched recursively)")
    index.add_argument("--out", type=Path, required=True, help="index folder to write")
    written = index.add_mutually_exclusive_group()
    written.add_argument("--overwrite", action="store_true", help="replace an index already in --out")
    written.add_argument("--append", action="store_true",
                         help="add the images to the index already in --out (its settings win)")
    index.add_argument("--level", type=int, default=DEFAULT_LEVEL,
                       help="finest grid level L: each image is cut into the grids 1x1 .. (L+1)x(L+1)")
    index.add_argument("--backbone", default=DEFAULT_BACKBONE, help="backbone name")
    index.add_argument("--index", default="flat", help="flat, ivfpq, or a faiss factory string like IVF1024,PQ48")
    _add_index_options(index)
    _add_encoding_options(index)
    index.add_argument("--overlap", type=float, default=0.0,
                       help="grow each cell by this fraction of its size on every side, in [0, 0.5)")
    index.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                       help="patches tiled and encoded per chunk (the backbone runs them in calls of its own size)")
    index.add_argument("--threads", type=int, default=0, help="threads for tiling and search; 0 = all cores")
    index.add_argument("--cache", default=None, help="embedding cache folder (encode each image once)")
    index.add_argument("--quiet", action="store_true", help="no progress bar")
    sharded = index.add_argument_group("sharded index (patchify.distributed; the same command again resumes it)")
    sharded.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                         help="build on Ray encoder actors: no ADDRESS = the cluster of this machine (started if "
                              "none), 'auto', or ray://HEAD:10001")
    sharded.add_argument("--shard-size", dest="shard_size", type=int, default=None,
                         help="images per shard (default: patchify.config.DEFAULT_SHARD_IMAGES); without --ray, "
                              "builds the shards in this process")
    sharded.add_argument("--actors", type=int, default=None,
                         help="encoder actors (default: one per GPU of the cluster, else 2)")
    sharded.add_argument("--gpus-per-actor", dest="gpus_per_actor", type=float, default=None,
                         help="GPUs per encoder actor (default: 1 when the cluster has GPUs, else 0)")
    sharded.add_argument("--sample-images", dest="sample_images", type=int, default=None,
                         help="images the shared whitening / IVFPQ training learn from (default: "
                              "patchify.config.DEFAULT_SAMPLE_IMAGES for IVFPQ, the whitening's learn_images for flat)")
    index.set_defaults(func=cmd_index)

    search = sub.add_parser("search", help="search an index with a query image", formatter_class=formatter)
    search.add_argument("index_dir", type=Path)
    search.add_argument("query", help="query image file")
    search.add_argument("-k", type=int, default=10, help="number of images to return")
    search.add_argument("--show", type=Path, default=None, help="draw the top results with their boxes into a PNG")
    search.add_argument("--threads", type=int, default=0, help="0 = all cores")
    search.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                        help="a sharded index: one Ray actor per shard (default: every shard in this process)")
    search.set_defaults(func=cmd_search)

    evaluate = sub.add_parser("eval", help="mAP, LocScore and R@1 per grid level on a benchmark",
                              formatter_class=formatter)
    evaluate.add_argument("dataset", help="benchmark folder")
    evaluate.add_argument("--format", default="composite",
                          choices=["composite", "grocery", "instre", "ilias", "roxford5k", "rparis6k"])
    evaluate.add_argument("--split", default="val",
                          help="grocery: comma-separated splits of the GroceryStore layout (train, val)")
    evaluate.add_argument("--protocol", default="medium", choices=["easy", "medium", "hard"],
                          help="revisited Oxford/Paris protocol")
    evaluate.add_argument("--build", default=None, metavar="OBJECTS,POSITIVES,DISTRACTORS",
                          help="build the composite benchmark first if the folder has none, e.g. 50,8,500")
    evaluate.add_argument("--seed", type=int, default=0, help="seed of a composite benchmark built with --build")
    evaluate.add_argument("--levels", default="0,1,2,3",
                          help="comma-separated levels to evaluate (each as `index --level`)")
    evaluate.add_argument("--index", default="flat", help="comma-separated: flat, ivfpq, or faiss factory strings")
    evaluate.add_argument("--backbone", default=DEFAULT_BACKBONE)
    _add_index_options(evaluate)
    _add_encoding_options(evaluate)
    evaluate.add_argument("--threads", type=int, default=0, help="0 = all cores")
    evaluate.add_argument("--cache", default=None, help="embedding cache folder (default: the user cache)")
    evaluate.add_argument("--out", type=Path, default=Path("eval_output"), help="folder for JSON and plots")
    evaluate.add_argument("--quiet", action="store_true", help="no progress bar")
    evaluate.set_defaults(func=cmd_eval)

    info = sub.add_parser("info", help="describe a saved index", formatter_class=formatter)
    info.add_argument("index_dir", type=Path)
    info.add_argument("--verify", action="store_true",
                      help="also read every file, check its sha256 and load the index (without it: sizes only)")
    info.set_defaults(func=cmd_info)
    serve = sub.add_parser("serve", help="serve an index over HTTP: JSON API and a search page",
                           formatter_class=formatter)
    serve.add_argument("index_dir", type=Path, help="index folder (made by patchify index); adds are saved there")
    serve.add_argument("--host", default=ServeConfig.host,
                       help="address to listen on (loopback by default: 0.0.0.0 exposes it to the network)")
    serve.add_argument("--port", type=int, default=ServeConfig.port, help="port to listen on")
    serve.add_argument("--token", default=None,
                       help=f"token the write endpoints (add, remove) require as 'Authorization: Bearer TOKEN' "
                            f"(default: ${TOKEN_VARIABLE}; none: writes are open to whoever reaches the server)")
    serve.set_defaults(func=cmd_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (PatchifyError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
