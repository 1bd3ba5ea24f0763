"""`pipeline sample`: write the sample tree, or with --benchmark-jpegs the benchmark JPEGs."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..bench import jpegs  # the module, not its names: it imports this package's shapes
from ..utils import PipelineError
from .record import complete_record
from .scenes import CLASSES
from .tree import (DEFAULT_TRAIN_PER_CLASS, DEFAULT_VAL_PER_CLASS, tree_files_present,
                   tree_options, write_sample_tree)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pipeline sample",
        description="Write the embedded sample data: a small ImageNet-layout JPEG tree "
                    "(train/<wnid>/, flat val/, Kaggle's LOC_val_solution.csv and "
                    "LOC_synset_mapping.txt), or with --benchmark-jpegs a flat set of "
                    "ImageNet-sized JPEGs for `pipeline bench prepare`. A DIR that already "
                    "holds a complete output with the same options is left as it is.")
    parser.add_argument("--output", required=True, type=Path, metavar="DIR",
                        help="directory to write; must be new or empty unless --force")
    parser.add_argument("--classes", type=int, default=None, metavar="N",
                        help=f"number of classes, 1-{len(CLASSES)} (default {len(CLASSES)})")
    parser.add_argument("--train-per-class", type=int, default=None, metavar="N",
                        help=f"training images per class (default {DEFAULT_TRAIN_PER_CLASS})")
    parser.add_argument("--val-per-class", type=int, default=None, metavar="N",
                        help=f"validation images per class (default {DEFAULT_VAL_PER_CLASS})")
    parser.add_argument("--seed", type=int, default=0, metavar="S",
                        help="random seed; the same seed writes the same bytes (default 0)")
    parser.add_argument("--benchmark-jpegs", type=int, default=None, metavar="N",
                        help="instead of the tree, write N detailed 470x400 JPEGs (~110 KB "
                             "each, quality 90) named bench_000000.JPEG... into DIR")
    parser.add_argument("--force", action="store_true",
                        help="replace the contents of a non-empty DIR that does not hold a "
                             "complete sample with these options")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.benchmark_jpegs is not None:
        return benchmark_command(args)
    return tree_command(args)


def tree_command(args: argparse.Namespace) -> int:
    num_classes = len(CLASSES) if args.classes is None else args.classes
    train_per_class = (DEFAULT_TRAIN_PER_CLASS if args.train_per_class is None
                       else args.train_per_class)
    val_per_class = DEFAULT_VAL_PER_CLASS if args.val_per_class is None else args.val_per_class
    options = tree_options(num_classes, train_per_class, val_per_class, args.seed)
    if complete_record(args.output, "tree", options, tree_files_present) is not None:
        print(f"{args.output}: sample tree already complete (same options); nothing to do")
        return 0
    start = time.perf_counter()
    counts = write_sample_tree(args.output, num_classes, train_per_class, val_per_class,
                               args.seed, progress=not args.no_progress, overwrite=args.force)
    print(f"wrote {counts['train']} train + {counts['val']} val images of "
          f"{len(counts['classes'])} classes to {args.output} "
          f"in {time.perf_counter() - start:.1f} s")
    return 0


def benchmark_command(args: argparse.Namespace) -> int:
    tree_flags = {"--classes": args.classes, "--train-per-class": args.train_per_class,
                  "--val-per-class": args.val_per_class}
    given = [flag for flag, value in tree_flags.items() if value is not None]
    if given:
        raise PipelineError(f"{', '.join(given)} only apply to the sample tree; "
                            "drop them or drop --benchmark-jpegs")
    options = jpegs.benchmark_options(args.benchmark_jpegs, seed=args.seed)
    if complete_record(args.output, "benchmark", options, jpegs.jpegs_present) is not None:
        print(f"{args.output}: benchmark JPEGs already complete (same options); nothing to do")
        return 0
    start = time.perf_counter()
    paths = jpegs.write_benchmark_jpegs(args.output, args.benchmark_jpegs, seed=args.seed,
                                  progress=not args.no_progress, overwrite=args.force)
    mean_kb = sum(p.stat().st_size for p in paths) / len(paths) / 1000
    print(f"wrote {len(paths)} benchmark JPEGs (mean {mean_kb:.0f} KB) to {args.output} "
          f"in {time.perf_counter() - start:.1f} s")
    return 0
