"""Synthetic shard sets for tests that must not depend on `pipeline prepare`.

Images are smooth class-dependent patterns (learnable, not noise); keys are
`<split>_<index>` so tests can reason about exactly-once delivery.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.shards import MANIFEST_FORMAT, shard_name, write_manifest, write_shard


def synthetic_image(index: int, label: int, size: int = 64) -> np.ndarray:
    rng = np.random.default_rng(index)
    yy, xx = np.mgrid[0:size, 0:size] / size
    phase = rng.uniform(0, 2 * np.pi, 3)
    freq = 1 + label % 4
    img = np.stack([np.sin(2 * np.pi * freq * (xx * np.cos(label) + yy * np.sin(label)) + p)
                    for p in phase], axis=-1)
    return ((img * 0.5 + 0.5) * 255).astype(np.uint8)


def encode(img: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "npy":
        np.save(buf, img)
    else:
        Image.fromarray(img).save(buf, format={"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}[fmt])
    return buf.getvalue()


def make_split(root: str | Path, split: str, num_samples: int, shard_size: int,
               num_classes: int = 10, fmt: str = "png", size: int = 64) -> Path:
    """Write `root/split/` shards + manifest; returns the split directory."""
    out = Path(root) / split
    classes = [f"n{i:08d}" for i in range(num_classes)]
    shards = []
    for s, start in enumerate(range(0, num_samples, shard_size)):
        samples = []
        for i in range(start, min(start + shard_size, num_samples)):
            label = i % num_classes
            meta = {"wnid": classes[label], "src": f"{split}/{classes[label]}/{i}.JPEG",
                    "orig_size": [size, size]}
            samples.append((f"{split}_{i:06d}", {
                fmt: encode(synthetic_image(i, label, size), fmt),
                "cls": str(label).encode(),
                "json": json.dumps(meta).encode(),
            }))
        shards.append(write_shard(out / shard_name(split, s), samples).to_dict())
    write_manifest(out, {
        "format": MANIFEST_FORMAT, "split": split, "num_samples": num_samples,
        "num_failures": 0, "image_size": size, "image_format": fmt,
        "resize": {"policy": "center-crop"}, "classes": classes, "shards": shards,
    })
    return out
