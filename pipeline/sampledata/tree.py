"""The sample tree: the files of an ILSVRC-2012 tree as Kaggle ships it, drawn by `scenes`.

    DIR/train/<wnid>/<wnid>_<n>.JPEG      n: distinct, non-contiguous numbers, as in ImageNet
    DIR/val/ILSVRC2012_val_00000001.JPEG  flat; 8 digits, 1-based; classes mixed in a seeded order
    DIR/LOC_val_solution.csv              Kaggle's labels, see below
    DIR/LOC_synset_mapping.txt            "n01440764 tench, Tinca tinca": one line a class, sorted
    DIR/sample.json                       the options the tree was made with; written last

`LOC_val_solution.csv` has the header `ImageId,PredictionString`; a row is
`ILSVRC2012_val_00000007,n03888605 12 40 211 180 n03888605 230 15 301 90 ` (the ImageId
without extension, then space-separated groups of `wnid xmin ymin xmax ymax`; the label is
the first wnid). Like Kaggle's file, its rows are NOT sorted by ImageId and each
PredictionString ends with a space: a reader must not rely on either.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ..utils import PipelineError, atomic_write_text
from .record import (GENERATOR_VERSION, check_seed, complete_record, replacing_dir,
                     write_new_file, write_record)
from .scenes import SampleClass, pick_classes, render
from .shapes import Box

VAL_CSV_NAME = "LOC_val_solution.csv"
SYNSET_MAPPING_NAME = "LOC_synset_mapping.txt"
DEFAULT_TRAIN_PER_CLASS, DEFAULT_VAL_PER_CLASS = 30, 10
TRAIN_NUMBER_RANGE = 20000  # ImageNet's per-class file numbers are spread over a range like this


@dataclass(frozen=True)
class ImageJob:
    """One file of the tree: which class and per-class index it draws, and where it goes."""

    split: str
    class_index: int
    index: int
    relpath: str


def plan_tree(classes: tuple[SampleClass, ...], train_per_class: int, val_per_class: int,
              seed: int) -> tuple[list[ImageJob], list[ImageJob]]:
    """Train and val files. Val numbering mixes the classes in a seeded order, as in ILSVRC."""
    order_rng = np.random.default_rng([seed, 2])
    train = []
    for c, cls in enumerate(classes):
        numbers = np.sort(order_rng.choice(max(TRAIN_NUMBER_RANGE, 2 * train_per_class),
                                           train_per_class, replace=False)) + 1
        train += [ImageJob("train", c, i, f"train/{cls.wnid}/{cls.wnid}_{n}.JPEG")
                  for i, n in enumerate(numbers.tolist())]
    pairs = [(c, i) for c in range(len(classes)) for i in range(val_per_class)]
    shuffled = [pairs[k] for k in order_rng.permutation(len(pairs))]
    val = [ImageJob("val", c, i, f"val/{val_image_id(n)}.JPEG")
           for n, (c, i) in enumerate(shuffled, start=1)]
    return train, val


def val_image_id(number: int) -> str:
    return f"ILSVRC2012_val_{number:08d}"


def val_solution_csv(val: list[ImageJob], boxes: dict[str, list[Box]],
                     classes: tuple[SampleClass, ...], seed: int) -> str:
    """Kaggle's LOC_val_solution.csv: rows in a seeded, unsorted order; trailing space kept."""
    lines = []
    for job in val:
        wnid = classes[job.class_index].wnid
        groups = "".join(f"{wnid} {x0} {y0} {x1} {y1} " for x0, y0, x1, y1 in boxes[job.relpath])
        lines.append(f"{Path(job.relpath).stem},{groups}")
    row_order = np.random.default_rng([seed, 3]).permutation(len(lines))
    return "ImageId,PredictionString\n" + "".join(lines[k] + "\n" for k in row_order)


def synset_mapping(classes: tuple[SampleClass, ...]) -> str:
    return "".join(f"{cls.wnid} {cls.names}\n" for cls in sorted(classes, key=lambda c: c.wnid))


def write_sample_tree(root: str | Path, num_classes: int = 10,
                      train_per_class: int = DEFAULT_TRAIN_PER_CLASS,
                      val_per_class: int = DEFAULT_VAL_PER_CLASS, seed: int = 0,
                      progress: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Write the sample tree under `root` (see the module docstring for the layout).

    Returns `{"train": n, "val": n, "classes": [wnids]}`. If `root` already holds a
    complete tree made with the same options, nothing is written. Otherwise `root` must be
    absent or empty unless `overwrite` is true; the tree is built in a temporary sibling
    directory that replaces `root` at the end, so `root` is never left half-written.
    """
    options = tree_options(num_classes, train_per_class, val_per_class, seed)
    if (record := complete_record(root, "tree", options, tree_files_present)) is not None:
        return record["counts"]
    classes = pick_classes(num_classes)
    train, val = plan_tree(classes, train_per_class, val_per_class, seed)
    counts = {"train": len(train), "val": len(val), "classes": [c.wnid for c in classes]}
    with replacing_dir(root, overwrite) as tmp:
        boxes = {}
        for job in tqdm(train + val, desc="sample tree", unit="img", disable=not progress):
            data, boxes[job.relpath] = render(seed, job.split, job.class_index, job.index)
            write_new_file(tmp / job.relpath, data)
        atomic_write_text(tmp / VAL_CSV_NAME, val_solution_csv(val, boxes, classes, seed))
        atomic_write_text(tmp / SYNSET_MAPPING_NAME, synset_mapping(classes))
        write_record(tmp, "tree", options, counts)
    return counts



def tree_options(num_classes: int, train_per_class: int, val_per_class: int,
                 seed: int) -> dict[str, int]:
    for flag, value in (("--train-per-class", train_per_class),
                        ("--val-per-class", val_per_class)):
        if value < 1:
            raise PipelineError(f"{flag} must be at least 1, got {value}")
    check_seed(seed)
    return {"classes": num_classes, "train_per_class": train_per_class,
            "val_per_class": val_per_class, "seed": seed, "generator": GENERATOR_VERSION}


def tree_files_present(root: Path, counts: dict[str, Any]) -> bool:
    """Every JPEG and label file a complete tree with these counts holds."""
    return (len(list(root.glob("train/*/*.JPEG"))) == counts.get("train")
            and len(list(root.glob("val/*.JPEG"))) == counts.get("val")
            and (root / VAL_CSV_NAME).is_file() and (root / SYNSET_MAPPING_NAME).is_file())
