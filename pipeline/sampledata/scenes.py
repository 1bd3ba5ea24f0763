"""The ten classes of the sample and how one image of a class is drawn.

Each class is a visually distinct procedural scene: its own palette and family of shapes
(`shapes`), placed, sized and rotated at random over a gradient with smooth texture, so a
small autoencoder or classifier learns something real. Sizes, aspect ratios, JPEG
qualities and the share of greyscale files follow ImageNet's mix, so `pipeline prepare`
meets the decode and resize paths it meets on the real data. Every image has its own
seeded random stream: the same seed draws the same bytes.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..utils import PipelineError
from .shapes import (RGB, Box, Motif, draw_cassette_player, draw_chain_saw, draw_church,
                     draw_dog_blobs, draw_fish_in_waves, draw_french_horn, draw_garbage_truck,
                     draw_gas_pump, draw_golf_ball, draw_parachute)

# ImageNet's mix, roughly: a few thumbnails and greyscale files, most JPEGs near quality 90.
SMALL_FRACTION = 0.04
GRAYSCALE_FRACTION = 0.03
JPEG_QUALITIES = (90,) * 8 + (75, 95)
MIN_SIDE, MAX_SIDE, MAX_ASPECT = 40, 500, 2.5


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
