"""The embedded sample data: a small ImageNet-layout JPEG tree, drawn procedurally.

The pipeline, its tests, CI and the demo must run anywhere without downloading ImageNet,
so `pipeline sample --output DIR` draws a tree laid out exactly like ILSVRC-2012 as
downloaded from Kaggle (without Kaggle's `ILSVRC/Data/CLS-LOC/` prefix)::

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

The images are meant to behave like ImageNet's where it matters to the pipeline:
sizes from about 40 to 500 pixels with aspect ratios from 1:2.5 to 2.5:1 (a few thumbnails
near 50x40), JPEG quality mostly 90 (some 75 and 95), and a few greyscale JPEGs, so the
prepare stage meets the same decode and resize paths it meets on the real data. Each class
is a visually distinct procedural scene (its own palette and family of shapes, placed,
sized and rotated at random over a gradient with smooth texture), so a small autoencoder
or classifier learns something real. Everything is a pure function of `seed`: the same
seed writes the same bytes.

`write_benchmark_jpegs` writes detailed 1/f-texture JPEGs of ImageNet's typical size and
file size (about 470x400, 110 KB) for `pipeline bench prepare`, where the JPEG decode cost
is the thing being measured.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from .utils import PipelineError, atomic_dir, atomic_write_json, atomic_write_text, provenance

# Bump when the drawing code changes: a tree recorded with another version is not
# "already complete" for the same options, because its images differ.
GENERATOR_VERSION = 1
RECORD_NAME = "sample.json"
RECORD_FORMAT = "ae-pipeline-sample/1"
VAL_CSV_NAME = "LOC_val_solution.csv"
SYNSET_MAPPING_NAME = "LOC_synset_mapping.txt"

# ImageNet's mix, roughly: a few thumbnails and greyscale files, most JPEGs near quality 90.
SMALL_FRACTION = 0.04
GRAYSCALE_FRACTION = 0.03
JPEG_QUALITIES = (90,) * 8 + (75, 95)
MIN_SIDE, MAX_SIDE, MAX_ASPECT = 40, 500, 2.5
DEFAULT_TRAIN_PER_CLASS, DEFAULT_VAL_PER_CLASS = 30, 10
TRAIN_NUMBER_RANGE = 20000  # ImageNet's per-class file numbers are spread over a range like this

RGB = tuple[int, int, int]
Box = tuple[int, int, int, int]  # xmin, ymin, xmax, ymax, inclusive pixel coordinates


# ---------------------------------------------------------------- geometry helpers

def rotate(points: np.ndarray, angle: float, centre: tuple[float, float]) -> np.ndarray:
    """Rotate (N, 2) points by `angle` radians around `centre`."""
    c, s = math.cos(angle), math.sin(angle)
    offset = points - centre
    return np.stack([offset[:, 0] * c - offset[:, 1] * s,
                     offset[:, 0] * s + offset[:, 1] * c], axis=1) + centre


def rectangle(cx: float, cy: float, w: float, h: float, angle: float = 0.0) -> np.ndarray:
    corners = np.array([[cx - w / 2, cy - h / 2], [cx + w / 2, cy - h / 2],
                        [cx + w / 2, cy + h / 2], [cx - w / 2, cy + h / 2]])
    return rotate(corners, angle, (cx, cy))


def ellipse(cx: float, cy: float, rx: float, ry: float, angle: float = 0.0,
            start: float = 0.0, end: float = 2 * math.pi, n: int = 40) -> np.ndarray:
    """Points on an ellipse (or the arc from `start` to `end`), rotated by `angle`."""
    t = np.linspace(start, end, n)
    points = np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], axis=1)
    return rotate(points, angle, (cx, cy))


def polygon(draw: ImageDraw.ImageDraw, points: np.ndarray, fill: RGB) -> None:
    draw.polygon([tuple(p) for p in points.round().tolist()], fill=fill)


def bounding_box(points: np.ndarray, size: tuple[int, int]) -> Box:
    """The box around `points`, clipped to the image so every box is a valid annotation."""
    w, h = size
    lo = np.floor(points.min(axis=0)).astype(int)
    hi = np.ceil(points.max(axis=0)).astype(int)
    return (int(np.clip(lo[0], 0, w - 2)), int(np.clip(lo[1], 0, h - 2)),
            int(np.clip(hi[0], 1, w - 1)), int(np.clip(hi[1], 1, h - 1)))


def fill_pattern(img: Image.Image, outline: np.ndarray, pattern: np.ndarray) -> None:
    """Paint the (H, W, 3) uint8 `pattern` into `img` inside the polygon `outline`."""
    mask = Image.new("L", img.size, 0)
    ImageDraw.Draw(mask).polygon([tuple(p) for p in outline.round().tolist()], fill=255)
    img.paste(Image.fromarray(pattern), (0, 0), mask)


def stripes(size: tuple[int, int], period: float, angle: float, colours: tuple[RGB, RGB],
            checker: bool = False) -> np.ndarray:
    """Two-colour stripes (or a checkerboard) at `angle`, as an (H, W, 3) uint8 array."""
    w, h = size
    yy, xx = np.arange(h, dtype=np.float32)[:, None], np.arange(w, dtype=np.float32)[None, :]
    u = (xx * math.cos(angle) + yy * math.sin(angle)) // period
    v = (-xx * math.sin(angle) + yy * math.cos(angle)) // period
    odd = ((u + v) if checker else u) % 2 == 1
    return np.where(odd[..., None], np.array(colours[1], np.uint8), np.array(colours[0], np.uint8))


# ---------------------------------------------------------------- class motifs
# Each motif draws one class's objects onto an image that already holds the class's
# background and returns the boxes of the objects (the Kaggle localisation boxes).
# `ink` is the class's foreground palette after per-image colour jitter.

Motif = Callable[[Image.Image, list[RGB], np.random.Generator], list[Box]]


def draw_fish_in_waves(img: Image.Image, ink: list[RGB], rng: np.random.Generator) -> list[Box]:
    w, h = img.size
    draw = ImageDraw.Draw(img)
    x = np.arange(0, w + 4, 4, dtype=np.float64)
    for _ in range(rng.integers(3, 7)):  # wavy water lines
        y = rng.uniform(0, h) + rng.uniform(2, 0.08 * h + 3) * np.sin(
            2 * math.pi * x / rng.uniform(0.2 * w + 8, w) + rng.uniform(0, 2 * math.pi))
        draw.line(list(zip(x.tolist(), y.tolist())), fill=ink[2], width=max(1, int(min(w, h) / 60)))
    boxes = []
    for _ in range(rng.integers(1, 3)):
        s = min(w, h) * rng.uniform(0.2, 0.35)
        cx, cy, angle = rng.uniform(0.3, 0.7) * w, rng.uniform(0.3, 0.7) * h, rng.uniform(-0.5, 0.5)
        body = ellipse(cx, cy, s, 0.45 * s, angle)
        tail = rotate(np.array([[cx - 0.9 * s, cy], [cx - 1.5 * s, cy - 0.45 * s],
                                [cx - 1.5 * s, cy + 0.45 * s]]), angle, (cx, cy))
        polygon(draw, tail, ink[1])
        polygon(draw, body, ink[0])
        polygon(draw, ellipse(cx + 0.6 * s, cy - 0.1 * s, 0.08 * s, 0.08 * s, angle), ink[1])
        boxes.append(bounding_box(np.vstack([body, tail]), img.size))
    return boxes


def draw_dog_blobs(img: Image.Image, ink: list[RGB], rng: np.random.Generator) -> list[Box]:
    w, h = img.size
    draw = ImageDraw.Draw(img)
    s = min(w, h) * rng.uniform(0.25, 0.38)
    cx, cy, angle = rng.uniform(0.35, 0.65) * w, rng.uniform(0.4, 0.65) * h, rng.uniform(-0.4, 0.4)
    body = ellipse(cx, cy, s, 0.6 * s, angle)
    head_x, head_y = rotate(np.array([[cx + 0.9 * s, cy - 0.5 * s]]), angle, (cx, cy))[0]
    head = ellipse(head_x, head_y, 0.4 * s, 0.35 * s, angle)
    ear = ellipse(head_x - 0.1 * s, head_y + 0.1 * s, 0.15 * s, 0.35 * s, angle + 0.3)
    polygon(draw, body, ink[0])
    polygon(draw, head, ink[0])
    for _ in range(rng.integers(2, 5)):  # the brown patches of a springer's coat
        px, py = rng.uniform(-0.6, 0.6) * s, rng.uniform(-0.3, 0.3) * s
        polygon(draw, ellipse(cx + px, cy + py, 0.3 * s, 0.2 * s, rng.uniform(0, math.pi)), ink[1])
    polygon(draw, ear, ink[1])
    return [bounding_box(np.vstack([body, head, ear]), img.size)]


def draw_cassette_player(img: Image.Image, ink: list[RGB], rng: np.random.Generator) -> list[Box]:
    w, h = img.size
    draw = ImageDraw.Draw(img)
    bw, bh = w * rng.uniform(0.55, 0.8), h * rng.uniform(0.4, 0.6)
    cx, cy, angle = w * rng.uniform(0.4, 0.6), h * rng.uniform(0.4, 0.6), rng.uniform(-0.25, 0.25)
    body = rectangle(cx, cy, bw, bh, angle)
    polygon(draw, body, ink[0])
    polygon(draw, rectangle(cx, cy - 0.1 * bh, 0.7 * bw, 0.45 * bh, angle), ink[1])
    for side in (-1, 1):  # the two reels
        rx, ry = rotate(np.array([[cx + side * 0.18 * bw, cy - 0.1 * bh]]), angle, (cx, cy))[0]
        r = 0.14 * min(bw, bh)
        polygon(draw, ellipse(rx, ry, r, r), ink[2])
        polygon(draw, ellipse(rx, ry, 0.4 * r, 0.4 * r), ink[0])
    for k in range(4):  # the keys along the bottom edge
        polygon(draw, rectangle(cx + (k - 1.5) * 0.16 * bw, cy + 0.32 * bh, 0.12 * bw, 0.12 * bh,
                                angle), ink[2])
    return [bounding_box(body, img.size)]


def draw_chain_saw(img: Image.Image, ink: list[RGB], rng: np.random.Generator) -> list[Box]:
    w, h = img.size
    angle = rng.uniform(-0.6, 0.6)
    cx, cy = w * rng.uniform(0.35, 0.5), h * rng.uniform(0.4, 0.6)
    length, s = max(w, h) * rng.uniform(0.45, 0.7), min(w, h) * rng.uniform(0.15, 0.25)
    motor = rectangle(cx - 0.15 * length, cy, 1.3 * s, 1.2 * s, angle)
    bar_x, bar_y = rotate(np.array([[cx + 0.3 * length, cy]]), angle, (cx, cy))[0]
    bar = rectangle(bar_x, bar_y, 0.8 * length, 0.35 * s, angle)
    # The chain: fine stripes running across the bar.
    fill_pattern(img, bar, stripes(img.size, max(2.0, 0.08 * s), angle, (ink[1], ink[2])))
    polygon(ImageDraw.Draw(img), motor, ink[0])
    return [bounding_box(np.vstack([motor, bar]), img.size)]


def draw_church(img: Image.Image, ink: list[RGB], rng: np.random.Generator) -> list[Box]:
    w, h = img.size
    draw = ImageDraw.Draw(img)
    horizon = h * rng.uniform(0.6, 0.8)
    tilt = rng.uniform(-0.08, 0.08) * h
    polygon(draw, np.array([[0, horizon - tilt], [w, horizon + tilt], [w, h], [0, h]]), ink[2])
    bw, bh = w * rng.uniform(0.25, 0.4), h * rng.uniform(0.25, 0.4)
    cx = w * rng.uniform(0.3, 0.7)
    nave = rectangle(cx, horizon - bh / 2, bw, bh)
    roof = np.array([[cx - 0.6 * bw, horizon - bh], [cx + 0.6 * bw, horizon - bh],
                     [cx, horizon - bh - 0.5 * bh]])
    tower = rectangle(cx - 0.3 * bw, horizon - 0.9 * bh, 0.25 * bw, 1.8 * bh)
    spire = np.array([[cx - 0.45 * bw, horizon - 1.8 * bh], [cx - 0.15 * bw, horizon - 1.8 * bh],
                      [cx - 0.3 * bw, horizon - 2.3 * bh]])
    for part in (nave, tower):
        polygon(draw, part, ink[0])
    for part in (roof, spire):
        polygon(draw, part, ink[1])
    polygon(draw, rectangle(cx + 0.15 * bw, horizon - 0.25 * bh, 0.18 * bw, 0.5 * bh), ink[1])
    return [bounding_box(np.vstack([nave, roof, tower, spire]), img.size)]


def draw_french_horn(img: Image.Image, ink: list[RGB], rng: np.random.Generator) -> list[Box]:
    w, h = img.size
    draw = ImageDraw.Draw(img)
    r = min(w, h) * rng.uniform(0.25, 0.4)
    cx, cy, angle = w * rng.uniform(0.4, 0.6), h * rng.uniform(0.4, 0.6), rng.uniform(0, math.pi)
    tube = max(1, int(r / 9))
    for k in range(rng.integers(2, 5)):  # the coiled tubing
        ring = ellipse(cx, cy, r * (1 - 0.18 * k), r * (1 - 0.18 * k) * 0.85, angle)
        draw.line([tuple(p) for p in ring.tolist()], fill=ink[k % 2], width=tube)
    bell_x, bell_y = rotate(np.array([[cx + r, cy]]), angle, (cx, cy))[0]
    bell = ellipse(bell_x, bell_y, 0.25 * r, 0.5 * r, angle)
    polygon(draw, bell, ink[0])
    polygon(draw, ellipse(bell_x, bell_y, 0.12 * r, 0.3 * r, angle), ink[2])
    return [bounding_box(np.vstack([ellipse(cx, cy, r, 0.85 * r, angle), bell]), img.size)]


def draw_garbage_truck(img: Image.Image, ink: list[RGB], rng: np.random.Generator) -> list[Box]:
    w, h = img.size
    draw = ImageDraw.Draw(img)
    length, height = w * rng.uniform(0.55, 0.8), h * rng.uniform(0.3, 0.45)
    x0, ground = w * rng.uniform(0.05, 0.95 - length / w), h * rng.uniform(0.7, 0.85)
    body = rectangle(x0 + 0.37 * length, ground - 0.55 * height, 0.74 * length, 0.9 * height)
    fill_pattern(img, body, stripes(img.size, max(3.0, 0.12 * height), rng.uniform(-0.2, 0.2),
                                    (ink[0], ink[1]), checker=True))
    cab = rectangle(x0 + 0.87 * length, ground - 0.4 * height, 0.24 * length, 0.6 * height)
    polygon(draw, cab, ink[0])
    polygon(draw, rectangle(x0 + 0.9 * length, ground - 0.52 * height, 0.12 * length,
                            0.2 * height), ink[3])
    r = 0.17 * height
    for wheel_x in (0.15, 0.55, 0.85):  # wheels
        polygon(draw, ellipse(x0 + wheel_x * length, ground - 0.1 * height, r, r), ink[2])
    return [bounding_box(np.vstack([body, cab]), img.size)]


def draw_gas_pump(img: Image.Image, ink: list[RGB], rng: np.random.Generator) -> list[Box]:
    w, h = img.size
    draw = ImageDraw.Draw(img)
    boxes = []
    for _ in range(rng.integers(1, 3)):
        pw, ph = w * rng.uniform(0.18, 0.3), h * rng.uniform(0.55, 0.8)
        cx, bottom = w * rng.uniform(0.2, 0.8), h * rng.uniform(0.85, 0.98)
        pump = rectangle(cx, bottom - ph / 2, pw, ph)
        polygon(draw, pump, ink[0])
        polygon(draw, rectangle(cx, bottom - 0.75 * ph, 0.7 * pw, 0.2 * ph), ink[2])  # display
        polygon(draw, rectangle(cx, bottom - 0.45 * ph, pw, 0.08 * ph), ink[1])  # band
        hose = ellipse(cx + 0.5 * pw, bottom - 0.45 * ph, 0.25 * pw, 0.3 * ph,
                       start=-math.pi / 2, end=math.pi / 2, n=16)
        draw.line([tuple(p) for p in hose.tolist()], fill=ink[3], width=max(1, int(pw / 12)))
        boxes.append(bounding_box(np.vstack([pump, hose]), img.size))
    return boxes


def draw_golf_ball(img: Image.Image, ink: list[RGB], rng: np.random.Generator) -> list[Box]:
    w, h = img.size
    lawn = rectangle(w / 2, h * 0.75, 3 * w, h * 0.6)
    fill_pattern(img, lawn, stripes(img.size, max(4.0, w * rng.uniform(0.08, 0.15)),
                                    rng.uniform(-0.4, 0.4), (ink[2], ink[3])))
    draw = ImageDraw.Draw(img)
    r = min(w, h) * rng.uniform(0.15, 0.3)
    cx, cy = w * rng.uniform(0.3, 0.7), h * rng.uniform(0.45, 0.65)
    ball = ellipse(cx, cy, r, r)
    polygon(draw, ball, ink[0])
    dimple = max(1.0, 0.09 * r)
    for _ in range(rng.integers(12, 24)):
        t, d = rng.uniform(0, 2 * math.pi), r * math.sqrt(rng.uniform(0, 0.7))
        polygon(draw, ellipse(cx + d * math.cos(t), cy + d * math.sin(t), dimple, dimple, n=8),
                ink[1])
    return [bounding_box(ball, img.size)]


def draw_parachute(img: Image.Image, ink: list[RGB], rng: np.random.Generator) -> list[Box]:
    w, h = img.size
    draw = ImageDraw.Draw(img)
    r = min(w, h) * rng.uniform(0.25, 0.4)
    cx, cy, angle = w * rng.uniform(0.35, 0.65), h * rng.uniform(0.3, 0.45), rng.uniform(-0.4, 0.4)
    panels = int(rng.integers(5, 9))
    edges = np.linspace(math.pi, 2 * math.pi, panels + 1)
    for k in range(panels):  # the canopy, one wedge per panel in alternating colours
        arc = ellipse(cx, cy, r, 0.7 * r, start=edges[k], end=edges[k + 1], n=6)
        polygon(draw, rotate(np.vstack([[cx, cy], arc]), angle, (cx, cy)), ink[k % 3])
    jumper = rotate(np.array([[cx, cy + 1.3 * r]]), angle, (cx, cy))[0]
    canopy_ends = rotate(np.array([[cx - r, cy], [cx + r, cy]]), angle, (cx, cy))
    for end in canopy_ends:  # the lines down to the jumper
        draw.line([tuple(end), tuple(jumper)], fill=ink[3], width=max(1, int(r / 40)))
    body = rectangle(jumper[0], jumper[1], 0.12 * r, 0.25 * r, angle)
    polygon(draw, body, ink[3])
    canopy = rotate(ellipse(cx, cy, r, 0.7 * r, start=math.pi, end=2 * math.pi), angle, (cx, cy))
    return [bounding_box(np.vstack([canopy, body]), img.size)]


# ---------------------------------------------------------------- the classes

@dataclass(frozen=True)
class SampleClass:
    """One class: its ImageNet id and names, background gradient and foreground palette."""

    wnid: str
    names: str
    top: RGB
    bottom: RGB
    ink: tuple[RGB, ...]
    motif: Motif


# Imagenette's ten classes: real ILSVRC ids that read well in reports. Sorted by wnid,
# which is also the class index order prepare derives from the synset mapping.
CLASSES: tuple[SampleClass, ...] = (
    SampleClass("n01440764", "tench, Tinca tinca", (20, 55, 95), (10, 95, 85),
                ((190, 165, 70), (95, 110, 45), (120, 190, 210)), draw_fish_in_waves),
    SampleClass("n02102040", "English springer, English springer spaniel", (200, 185, 150),
                (120, 150, 80), ((245, 240, 230), (100, 55, 30)), draw_dog_blobs),
    SampleClass("n02979186", "cassette player", (215, 215, 220), (150, 150, 160),
                ((35, 35, 40), (90, 90, 95), (200, 200, 205)), draw_cassette_player),
    SampleClass("n03000684", "chain saw, chainsaw", (90, 70, 50), (50, 45, 35),
                ((240, 120, 20), (30, 30, 30), (200, 200, 200)), draw_chain_saw),
    SampleClass("n03028079", "church, church building", (250, 160, 90), (110, 60, 130),
                ((235, 225, 205), (130, 40, 40), (40, 70, 35)), draw_church),
    SampleClass("n03394916", "French horn, horn", (110, 15, 30), (60, 5, 20),
                ((220, 170, 50), (170, 120, 30), (40, 20, 10)), draw_french_horn),
    SampleClass("n03417042", "garbage truck, dustcart", (170, 200, 230), (100, 100, 100),
                ((40, 140, 60), (235, 235, 235), (20, 20, 20), (150, 200, 230)),
                draw_garbage_truck),
    SampleClass("n03425413", "gas pump, gasoline pump, petrol pump, island dispenser",
                (140, 140, 135), (90, 90, 85),
                ((210, 30, 30), (250, 210, 30), (230, 240, 220), (25, 25, 25)), draw_gas_pump),
    SampleClass("n03445777", "golf ball", (150, 210, 240), (60, 140, 50),
                ((250, 250, 250), (200, 200, 200), (50, 150, 40), (90, 180, 60)), draw_golf_ball),
    SampleClass("n03888605", "parachute, chute", (40, 170, 240), (150, 215, 250),
                ((240, 60, 40), (250, 240, 60), (250, 250, 250), (40, 40, 40)), draw_parachute),
)


def pick_classes(num_classes: int) -> tuple[SampleClass, ...]:
    if not 1 <= num_classes <= len(CLASSES):
        raise PipelineError(f"--classes must be between 1 and {len(CLASSES)} "
                            f"(the sample has {len(CLASSES)} drawn classes), got {num_classes}")
    return CLASSES[:num_classes]


# ---------------------------------------------------------------- drawing one image

def jitter(colour: RGB, rng: np.random.Generator, amount: float = 18.0) -> RGB:
    r, g, b = np.clip(np.array(colour) + rng.uniform(-amount, amount, 3), 0, 255).astype(int)
    return int(r), int(g), int(b)


def image_size(rng: np.random.Generator) -> tuple[int, int]:
    """(width, height) with ImageNet-like variety: mostly 100-500 px, a few thumbnails."""
    if rng.random() < SMALL_FRACTION:
        return int(rng.integers(MIN_SIDE, 65)), int(rng.integers(MIN_SIDE - 8, 57))
    long_side = int(rng.integers(100, MAX_SIDE + 1))
    aspect = math.exp(rng.uniform(0.0, math.log(MAX_ASPECT)))
    short_side = max(MIN_SIDE, round(long_side / aspect))
    landscape = rng.random() < 0.6  # ImageNet holds more landscape than portrait photos
    return (long_side, short_side) if landscape else (short_side, long_side)


def background(size: tuple[int, int], top: RGB, bottom: RGB,
               rng: np.random.Generator) -> Image.Image:
    """A tilted two-colour gradient with mild smooth texture.

    Both are drawn on a coarse grid of a few cells and upsampled bicubically in one step:
    smooth by construction and far cheaper than computing them per pixel.
    """
    rows, cols = (int(n) for n in rng.integers(3, 9, size=2))
    tilt = rng.uniform(-0.3, 0.3)
    yy, xx = np.mgrid[0:rows, 0:cols] / np.array([rows - 1, cols - 1])[:, None, None]
    t = np.clip(yy + tilt * (xx - 0.5), 0.0, 1.0)[..., None]
    coarse = (1 - t) * np.array(top) + t * np.array(bottom) + rng.uniform(-14, 14, (rows, cols, 3))
    coarse_img = Image.fromarray(np.clip(coarse, 0, 255).astype(np.uint8))
    return coarse_img.resize(size, Image.Resampling.BICUBIC)


def draw_image(cls: SampleClass, rng: np.random.Generator) -> tuple[Image.Image, list[Box]]:
    size = image_size(rng)
    img = background(size, jitter(cls.top, rng), jitter(cls.bottom, rng), rng)
    boxes = cls.motif(img, [jitter(c, rng) for c in cls.ink], rng)
    return img, boxes


def encode_jpeg(img: Image.Image, rng: np.random.Generator) -> bytes:
    if rng.random() < GRAYSCALE_FRACTION:
        img = img.convert("L")
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=int(rng.choice(JPEG_QUALITIES)))
    return buf.getvalue()


def image_rng(seed: int, split: str, class_index: int, index: int) -> np.random.Generator:
    """Each image has its own stream, so an image does not depend on how many came before."""
    return np.random.default_rng([seed, {"train": 0, "val": 1}[split], class_index, index])


def render(seed: int, split: str, class_index: int, index: int) -> tuple[bytes, list[Box]]:
    rng = image_rng(seed, split, class_index, index)
    img, boxes = draw_image(CLASSES[class_index], rng)
    return encode_jpeg(img, rng), boxes


# ---------------------------------------------------------------- the tree

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
    if (record := complete_record(root, "tree", options)) is not None:
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


def write_new_file(path: Path, data: bytes) -> None:
    # A plain write is enough: the file lives in a temporary tree that is renamed into
    # place only once complete (fsyncing hundreds of small files would dominate the time).
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


# ---------------------------------------------------------------- benchmark JPEGs

BENCH_CONTRAST = 48.0  # luminance std in grey levels: tuned so quality-90 files average ~110 KB
BENCH_SHAPES = (2, 5)  # textured polygons laid over each image: sharp edges, like objects


def fractal_noise(rng: np.random.Generator, shape: tuple[int, int], beta: float) -> np.ndarray:
    """Zero-mean, unit-variance noise with amplitude spectrum 1/f**beta.

    beta = 1 is the spectrum of natural photographs: detail at every scale, which is
    what gives a JPEG ImageNet's file size and decode cost.
    """
    fy = np.fft.fftfreq(shape[0])[:, None]
    fx = np.fft.rfftfreq(shape[1])[None, :]
    freq = np.hypot(fx, fy)
    freq[0, 0] = 1.0
    spectrum = (rng.normal(size=freq.shape) + 1j * rng.normal(size=freq.shape)) / freq ** beta
    spectrum[0, 0] = 0.0
    noise = np.fft.irfft2(spectrum, s=shape)
    return ((noise - noise.mean()) / noise.std()).astype(np.float32)


@dataclass
class TextureBank:
    """A few large textures; each benchmark image is a recoloured composite of crops."""

    luminance: list[np.ndarray]
    chroma: list[np.ndarray]  # (H, W, 2): two smoother colour-difference channels

    @classmethod
    def make(cls, rng: np.random.Generator, count: int, side: int) -> "TextureBank":
        luminance = [fractal_noise(rng, (side, side), 1.0) for _ in range(count)]
        chroma = [np.stack([fractal_noise(rng, (side, side), 1.5) for _ in range(2)], axis=-1)
                  for _ in range(count)]
        return cls(luminance, chroma)

    def colour_crop(self, rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
        """A random crop of a random texture in a random palette, (H, W, 3) float32."""
        w, h = size
        k = int(rng.integers(len(self.luminance)))
        side = self.luminance[k].shape[0]
        y, x = int(rng.integers(side - h + 1)), int(rng.integers(side - w + 1))
        lum = self.luminance[k][y:y + h, x:x + w, None]
        chroma = self.chroma[k][y:y + h, x:x + w]
        base = rng.uniform(50, 200, 3).astype(np.float32)
        mix = rng.normal(0, 18, (2, 3)).astype(np.float32)  # how the chroma channels tint RGB
        return base + BENCH_CONTRAST * lum + chroma @ mix


def bench_image(bank: TextureBank, rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    w, h = size
    pixels = bank.colour_crop(rng, size)
    for _ in range(rng.integers(*BENCH_SHAPES)):
        r = min(w, h) * rng.uniform(0.1, 0.35)
        outline = ellipse(rng.uniform(0, w), rng.uniform(0, h), r, r * rng.uniform(0.4, 1),
                          rng.uniform(0, math.pi), n=int(rng.integers(3, 9)))
        x0, y0, x1, y1 = bounding_box(outline, size)
        mask = Image.new("L", (x1 - x0 + 1, y1 - y0 + 1), 0)
        ImageDraw.Draw(mask).polygon([tuple(p) for p in (outline - (x0, y0)).tolist()], fill=255)
        inside = np.asarray(mask, dtype=bool)[..., None]
        region = pixels[y0:y1 + 1, x0:x1 + 1]
        region[...] = np.where(inside, bank.colour_crop(rng, mask.size), region)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def write_benchmark_jpegs(out_dir: str | Path, n: int, size: tuple[int, int] = (470, 400),
                          quality: int = 90, seed: int = 0, progress: bool = True,
                          overwrite: bool = False) -> list[Path]:
    """Write `n` ImageNet-like JPEGs `bench_000000.JPEG`... into `out_dir`; returns their paths.

    Same directory rules as `write_sample_tree`: a complete set with the same options is
    kept as is; otherwise `out_dir` must be absent or empty unless `overwrite` is true.
    """
    out_dir = Path(out_dir)
    names = [f"bench_{i:06d}.JPEG" for i in range(n)]
    options = benchmark_options(n, size, quality, seed)
    if complete_record(out_dir, "benchmark", options) is None:
        rng = np.random.default_rng([seed, 4])
        bank = TextureBank.make(rng, count=4, side=max(512, 2 * max(size)))
        with replacing_dir(out_dir, overwrite) as tmp:
            for name in tqdm(names, desc="benchmark JPEGs", unit="img", disable=not progress):
                buf = io.BytesIO()
                Image.fromarray(bench_image(bank, rng, size)).save(buf, "JPEG", quality=quality)
                write_new_file(tmp / name, buf.getvalue())
            write_record(tmp, "benchmark", options, {"files": n})
    return [out_dir / name for name in names]


# ---------------------------------------------------------------- output directory rules

def tree_options(num_classes: int, train_per_class: int, val_per_class: int,
                 seed: int) -> dict[str, int]:
    for flag, value in (("--train-per-class", train_per_class),
                        ("--val-per-class", val_per_class)):
        if value < 1:
            raise PipelineError(f"{flag} must be at least 1, got {value}")
    check_seed(seed)
    return {"classes": num_classes, "train_per_class": train_per_class,
            "val_per_class": val_per_class, "seed": seed, "generator": GENERATOR_VERSION}


def benchmark_options(n: int, size: tuple[int, int] = (470, 400), quality: int = 90,
                      seed: int = 0) -> dict[str, Any]:
    if n < 1:
        raise PipelineError(f"--benchmark-jpegs must be at least 1, got {n}")
    check_seed(seed)
    return {"n": n, "size": list(size), "quality": quality, "seed": seed,
            "generator": GENERATOR_VERSION}


def check_seed(seed: int) -> None:
    if seed < 0:  # numpy's seed sequences take non-negative integers only
        raise PipelineError(f"--seed must be 0 or more, got {seed}")


def write_record(root: Path, mode: str, options: dict[str, Any], counts: dict[str, Any]) -> None:
    atomic_write_json(root / RECORD_NAME, {"format": RECORD_FORMAT, "mode": mode,
                                           "options": options, "counts": counts,
                                           "provenance": provenance()})


def complete_record(root: str | Path, mode: str,
                    options: dict[str, Any]) -> dict[str, Any] | None:
    """The record of `root` if it is a complete output of `mode` made with `options`.

    The record is written last, so its presence means the writer finished; counting the
    JPEGs also catches files deleted since.
    """
    root = Path(root)
    try:
        record = json.loads((root / RECORD_NAME).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT or record.get("mode") != mode \
            or record.get("options") != options:
        return None
    counts = record.get("counts", {})
    if mode == "tree":
        complete = (len(list(root.glob("train/*/*.JPEG"))) == counts.get("train")
                    and len(list(root.glob("val/*.JPEG"))) == counts.get("val")
                    and (root / VAL_CSV_NAME).is_file() and (root / SYNSET_MAPPING_NAME).is_file())
    else:
        complete = len(list(root.glob("bench_*.JPEG"))) == counts.get("files")
    return record if complete else None


def replacing_dir(root: str | Path, overwrite: bool) -> contextlib.AbstractContextManager[Path]:
    """`atomic_dir(root)` after checking that replacing `root` loses nothing of the user's."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise PipelineError(f"{root} exists and is not a directory; choose another --output")
    if root.is_dir() and any(root.iterdir()) and not overwrite:
        raise PipelineError(
            f"{root} is not empty and is not a complete sample made with these options; "
            "choose an empty or new directory, or pass --force (overwrite=True) to replace "
            "its contents")
    return atomic_dir(root)


# ---------------------------------------------------------------- command line

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
    if complete_record(args.output, "tree", options) is not None:
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
    options = benchmark_options(args.benchmark_jpegs, seed=args.seed)
    if complete_record(args.output, "benchmark", options) is not None:
        print(f"{args.output}: benchmark JPEGs already complete (same options); nothing to do")
        return 0
    start = time.perf_counter()
    paths = write_benchmark_jpegs(args.output, args.benchmark_jpegs, seed=args.seed,
                                  progress=not args.no_progress, overwrite=args.force)
    mean_kb = sum(p.stat().st_size for p in paths) / len(paths) / 1000
    print(f"wrote {len(paths)} benchmark JPEGs (mean {mean_kb:.0f} KB) to {args.output} "
          f"in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    from pipeline.cli import run_stage

    sys.exit(run_stage(main, sys.argv[1:]))
