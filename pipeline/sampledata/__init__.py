"""The embedded sample data: a small ImageNet-layout JPEG tree, drawn procedurally.

The pipeline, its tests, CI and the demo must run anywhere without downloading ImageNet,
so `pipeline sample --output DIR` draws a tree laid out exactly like ILSVRC-2012 as
downloaded from Kaggle (without Kaggle's `ILSVRC/Data/CLS-LOC/` prefix; the layout is in
`tree`). The images are meant to behave like ImageNet's where it matters to the pipeline:
sizes from about 40 to 500 pixels with aspect ratios from 1:2.5 to 2.5:1 (a few thumbnails
near 50x40), JPEG quality mostly 90 (some 75 and 95), and a few greyscale JPEGs, so the
prepare stage meets the same decode and resize paths it meets on the real data. Each class
is a visually distinct procedural scene, so a small autoencoder or classifier learns
something real. Everything is a pure function of `seed`: the same seed writes the same bytes.

- `shapes`: geometry helpers and one drawing motif per class.
- `scenes`: the ten classes and how one image of a class is drawn.
- `tree`: the files of the tree (`write_sample_tree`).
- `record`: the directory rules (`sample.json`, complete outputs kept, atomic replacement).
- `cli`: `pipeline sample` (also `--benchmark-jpegs`, from `pipeline.bench.jpegs`).
"""
from .cli import benchmark_command, build_parser, main, tree_command
from .record import (GENERATOR_VERSION, RECORD_FORMAT, RECORD_NAME, check_seed,
                     complete_record, replacing_dir, write_new_file, write_record)
from .scenes import (CLASSES, GRAYSCALE_FRACTION, JPEG_QUALITIES, MAX_ASPECT, MAX_SIDE,
                     MIN_SIDE, SMALL_FRACTION, SampleClass, background, draw_image,
                     encode_jpeg, image_rng, image_size, jitter, pick_classes, render)
from .shapes import (RGB, Box, Motif, bounding_box, draw_cassette_player, draw_chain_saw,
                     draw_church, draw_dog_blobs, draw_fish_in_waves, draw_french_horn,
                     draw_garbage_truck, draw_gas_pump, draw_golf_ball, draw_parachute,
                     ellipse, fill_pattern, polygon, rectangle, rotate, stripes)
from .tree import (DEFAULT_TRAIN_PER_CLASS, DEFAULT_VAL_PER_CLASS, SYNSET_MAPPING_NAME,
                   TRAIN_NUMBER_RANGE, VAL_CSV_NAME, ImageJob, plan_tree, synset_mapping,
                   tree_files_present, tree_options, val_image_id, val_solution_csv,
                   write_sample_tree)

__all__ = [
    "CLASSES", "DEFAULT_TRAIN_PER_CLASS", "DEFAULT_VAL_PER_CLASS", "GENERATOR_VERSION",
    "GRAYSCALE_FRACTION", "JPEG_QUALITIES", "MAX_ASPECT", "MAX_SIDE", "MIN_SIDE", "RECORD_FORMAT",
    "RECORD_NAME", "RGB", "SMALL_FRACTION", "SYNSET_MAPPING_NAME", "TRAIN_NUMBER_RANGE",
    "VAL_CSV_NAME", "Box", "ImageJob", "Motif", "SampleClass", "background", "benchmark_command",
    "bounding_box", "build_parser", "check_seed", "complete_record", "draw_cassette_player",
    "draw_chain_saw", "draw_church", "draw_dog_blobs", "draw_fish_in_waves", "draw_french_horn",
    "draw_garbage_truck", "draw_gas_pump", "draw_golf_ball", "draw_image", "draw_parachute",
    "ellipse", "encode_jpeg", "fill_pattern", "image_rng", "image_size", "jitter", "main",
    "pick_classes", "plan_tree", "polygon", "rectangle", "render", "replacing_dir", "rotate",
    "stripes", "synset_mapping", "tree_command", "tree_files_present", "tree_options",
    "val_image_id", "val_solution_csv", "write_new_file", "write_record", "write_sample_tree"]
