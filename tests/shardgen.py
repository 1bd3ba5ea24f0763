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


TINY_SIZE = 8  # pixels a side of `tiny_image`


def tiny_image(shard: int, index: int) -> np.ndarray:
    """Distinct per sample and left-right asymmetric, so a flip always shows."""
    base = np.arange(TINY_SIZE * TINY_SIZE * 3, dtype=np.uint8).reshape(TINY_SIZE, TINY_SIZE, 3)
    return base + np.uint8((shard * 31 + index * 7) % 50)


def write_counted_split(root: str | Path, counts, corrupt=frozenset()) -> Path:
    """A train split of npy `tiny_image`s whose shard i holds counts[i] samples keyed
    `s<i>n<j>`, with a manifest; keys in `corrupt` hold garbage instead of an image."""
    split = Path(root) / ("counts-" + "-".join(map(str, counts)) + ("-bad" if corrupt else ""))
    shards = []
    for i, count in enumerate(counts):
        samples = []
        for j in range(count):
            key = f"s{i}n{j}"
            payload = b"not an npy file" if key in corrupt else encode(tiny_image(i, j), "npy")
            samples.append((key, {"npy": payload, "cls": str((i + j) % 3).encode(),
                                  "json": json.dumps({"wnid": "n0"}).encode()}))
        shards.append(write_shard(split / shard_name("train", i), samples).to_dict())
    write_manifest(split, {"format": MANIFEST_FORMAT, "split": "train",
                           "num_samples": sum(counts), "image_size": TINY_SIZE,
                           "image_format": "npy", "classes": ["n0", "n1", "n2"],
                           "shards": shards})
    return split
