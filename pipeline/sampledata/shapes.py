"""The drawing primitives of the sample images: geometry helpers and one motif per class.

A motif draws one class's objects onto an image that already holds the class's background
and returns the boxes of the objects (the Kaggle localisation boxes); `ink` is the class's
foreground palette after per-image colour jitter. `ellipse` and `bounding_box` also shape
the benchmark JPEGs (`pipeline.bench.jpegs`).
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

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

