"""Command line: `patchify index`, `patchify search`, `patchify info` (and `patchify eval`)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence

from .engine import DEFAULT_BACKBONE, Patchify


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


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
    engine = Patchify(backbone=args.backbone, levels=args.levels, index=args.index, overlap=args.overlap,
                      batch_size=args.batch_size, num_threads=args.threads, nprobe=args.nprobe, nlist=args.nlist,
                      m=args.m, nbits=args.nbits, embedding_cache=args.cache or None)
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
          f"in {seconds:.1f} s; skipped {len(report.skipped)}")
    print(f"backbone: {backbone.name} [{backbone.weights}] on {backbone.provider}")
    print(f"index: {out} ({engine.index_spec}, {_folder_bytes(out):,} bytes on disk)")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from .images import ImageError

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
    from . import storage

    manifest = storage.read_manifest(args.index_dir)
    backbone = manifest["backbone"]
    print(f"index {args.index_dir}: format v{manifest['format_version']}, {manifest['n_images']} images, "
          f"{manifest['n_patches']} patches, grids {manifest['grids']}, index {manifest['index']['spec']}")
    print(f"backbone: {backbone['name']} [{backbone.get('weights')}]")
    print(f"{_folder_bytes(Path(args.index_dir)):,} bytes on disk")
    return 0


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
    options = {"m": args.m, "nbits": args.nbits, "nprobe": args.nprobe, "nlist": args.nlist}
    run = evaluate_levels(dataset, backbone=args.backbone, levels=levels, indexes=indexes, index_options=options,
                          embedding_cache=args.cache or True, num_threads=args.threads, progress=not args.quiet)
    print(f"\n{dataset.name}: {len(dataset.database)} database images, {dataset.n_queries} queries; "
          f"backbone {run.backbone} [{run.weights}]")
    print(run.table())
    written = write_outputs(run, args.out, dataset)
    for what, path in written.items():
        print(f"wrote {what}: {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="patchify", description="Patch-wise instance retrieval")
    sub = parser.add_subparsers(dest="command", required=True)

    index = sub.add_parser("index", help="index a folder of images")
    index.add_argument("images_dir", type=Path)
    index.add_argument("--out", type=Path, required=True, help="index folder to write")
    index.add_argument("--levels", type=int, default=2, help="grid levels: L means grids 1..L+1 (default 2)")
    index.add_argument("--backbone", default=DEFAULT_BACKBONE, help=f"backbone name (default {DEFAULT_BACKBONE})")
    index.add_argument("--index", default="flat", help="flat, ivfpq, or a faiss factory string like IVF1024,PQ48")
    index.add_argument("--nlist", type=int, default=None)
    index.add_argument("--m", type=int, default=48)
    index.add_argument("--nbits", type=int, default=8)
    index.add_argument("--nprobe", type=int, default=16)
    index.add_argument("--overlap", type=float, default=0.0)
    index.add_argument("--batch-size", type=int, default=32)
    index.add_argument("--threads", type=int, default=0, help="0 = all cores")
    index.add_argument("--cache", default=None, help="embedding cache folder (encode each image once)")
    index.add_argument("--quiet", action="store_true")
    index.set_defaults(func=cmd_index)

    search = sub.add_parser("search", help="search an index with a query image")
    search.add_argument("index_dir", type=Path)
    search.add_argument("query")
    search.add_argument("-k", type=int, default=10)
    search.add_argument("--show", type=Path, default=None, help="draw the top results with their boxes into a PNG")
    search.add_argument("--threads", type=int, default=0)
    search.set_defaults(func=cmd_search)

    evaluate = sub.add_parser("eval", help="mAP, LocScore and R@1 per grid level on a benchmark")
    evaluate.add_argument("dataset", help="benchmark folder")
    evaluate.add_argument("--format", default="composite",
                          choices=["composite", "instre", "ilias", "roxford5k", "rparis6k"])
    evaluate.add_argument("--protocol", default="medium", choices=["easy", "medium", "hard"],
                          help="revisited Oxford/Paris protocol")
    evaluate.add_argument("--build", default=None, metavar="OBJECTS,POSITIVES,DISTRACTORS",
                          help="build the composite benchmark first if the folder has none, e.g. 50,8,500")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--levels", default="0,1,2,3", help="comma-separated grid levels (default 0,1,2,3)")
    evaluate.add_argument("--index", default="flat", help="comma-separated: flat, ivfpq, or faiss factory strings")
    evaluate.add_argument("--backbone", default=DEFAULT_BACKBONE)
    evaluate.add_argument("--nlist", type=int, default=None)
    evaluate.add_argument("--m", type=int, default=48)
    evaluate.add_argument("--nbits", type=int, default=8)
    evaluate.add_argument("--nprobe", type=int, default=16)
    evaluate.add_argument("--threads", type=int, default=0)
    evaluate.add_argument("--cache", default=None, help="embedding cache folder (default: the user cache)")
    evaluate.add_argument("--out", type=Path, default=Path("eval_output"), help="folder for JSON and plots")
    evaluate.add_argument("--quiet", action="store_true")
    evaluate.set_defaults(func=cmd_eval)

    info = sub.add_parser("info", help="describe a saved index")
    info.add_argument("index_dir", type=Path)
    info.set_defaults(func=cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
