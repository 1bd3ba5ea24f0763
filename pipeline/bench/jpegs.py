"""ImageNet-like JPEGs for `pipeline bench prepare`: detailed 1/f texture at ImageNet's
typical size and file size (about 470x400, 110 KB), where the JPEG decode cost is the
thing being measured (the sample tree's images are smaller and smoother).

`pipeline sample --benchmark-jpegs N --output DIR` writes them too; DIR follows the same
rules as the sample tree (`pipeline.sampledata.record`).
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from ..sampledata.record import (GENERATOR_VERSION, check_seed, complete_record, replacing_dir,
                                 write_new_file, write_record)
from ..sampledata.shapes import bounding_box, ellipse
from ..utils import PipelineError

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
    if complete_record(out_dir, "benchmark", options, jpegs_present) is None:
        rng = np.random.default_rng([seed, 4])
        bank = TextureBank.make(rng, count=4, side=max(512, 2 * max(size)))
        with replacing_dir(out_dir, overwrite) as tmp:
            for name in tqdm(names, desc="benchmark JPEGs", unit="img", disable=not progress):
                buf = io.BytesIO()
                Image.fromarray(bench_image(bank, rng, size)).save(buf, "JPEG", quality=quality)
                write_new_file(tmp / name, buf.getvalue())
            write_record(tmp, "benchmark", options, {"files": n})
    return [out_dir / name for name in names]



def benchmark_options(n: int, size: tuple[int, int] = (470, 400), quality: int = 90,
                      seed: int = 0) -> dict[str, Any]:
    if n < 1:
        raise PipelineError(f"--benchmark-jpegs must be at least 1, got {n}")
    check_seed(seed)
    return {"n": n, "size": list(size), "quality": quality, "seed": seed,
            "generator": GENERATOR_VERSION}


def jpegs_present(root: Path, counts: dict[str, Any]) -> bool:
    return len(list(root.glob("bench_*.JPEG"))) == counts.get("files")
