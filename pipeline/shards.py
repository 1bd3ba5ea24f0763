"""The shard format, shared by `prepare` (writes) and `data` (reads).

A shard is a POSIX tar of samples; a sample is the group of members sharing a key:
``<key>.png`` (or ``.npy``/``.webp``/``.jpg``), ``<key>.cls`` (decimal class index) and
``<key>.json`` (wnid, src, orig_size). Keys never contain a dot, because webdataset
splits a member name at its first dot. Every split directory holds ``manifest.json``
(see shards/README.md for the schema).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

from .utils import PipelineError, atomic_write_json

MANIFEST_NAME = "manifest.json"
FAILURES_NAME = "failures.jsonl"
MANIFEST_FORMAT = "ae-pipeline-shards/1"
IMAGE_EXTS = ("png", "npy", "webp", "jpg")


@dataclass
class ShardInfo:
    name: str
    num_samples: int
    bytes: int
    sha256: str
    first_key: str | None = None
    last_key: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def shard_name(split: str, index: int, part: str | None = None) -> str:
    """`train-000012.tar`, or `train-p0003-000012.tar` for part 3 of a multi-machine job."""
    middle = f"-p{part}" if part is not None else ""
    return f"{split}{middle}-{index:06d}.tar"


def check_key(key: str) -> str:
    if not key or "." in key or "/" in key:
        raise ValueError(f"invalid sample key {key!r}: keys must be non-empty, without '.' or '/'")
    return key


def _tar_member(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    # Fixed metadata makes a shard a pure function of its samples: a re-run writes
    # byte-identical files, which is what lets resume compare sha256 values.
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info, io.BytesIO(data)


class _HashingWriter(io.RawIOBase):
    """File wrapper that hashes and counts bytes as tarfile writes them."""

    def __init__(self, f):
        self.f, self.h, self.n = f, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.n

    def write(self, b) -> int:
        self.h.update(b)
        self.n += len(b)
        return self.f.write(b)


def write_shard(path: str | os.PathLike,
                samples: Iterable[tuple[str, dict[str, bytes]]]) -> ShardInfo:
    """Write samples ``(key, {ext: bytes})`` as one tar, atomically.

    The tar is written under a temporary name in the same directory and renamed only
    once complete and fsynced, so an interrupted job never leaves a truncated shard
    under a final name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    count, first, last = 0, None, None
    try:
        with open(tmp, "wb") as raw:
            hw = _HashingWriter(raw)
            with tarfile.open(fileobj=hw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                for key, members in samples:
                    check_key(key)
                    for ext, data in members.items():
                        tar.addfile(*_tar_member(f"{key}.{ext}", data))
                    count += 1
                    first = first or key
                    last = key
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return ShardInfo(path.name, count, hw.n, hw.h.hexdigest(), first, last)


# ---------------------------------------------------------------- manifest

def manifest_path(split_dir: str | os.PathLike) -> Path:
    p = Path(split_dir)
    return p if p.name == MANIFEST_NAME else p / MANIFEST_NAME


def read_manifest(split_dir: str | os.PathLike) -> dict[str, Any]:
    """Read and minimally validate a split's manifest; errors name the file."""
    path = manifest_path(split_dir)
    if not path.is_file():
        raise PipelineError(f"no shard manifest at {path}: run `pipeline prepare` first, "
                            f"or point at the split directory that holds {MANIFEST_NAME}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PipelineError(f"cannot read shard manifest {path}: {e}") from e
    missing = [k for k in ("num_samples", "shards", "classes", "image_size", "image_format")
               if k not in manifest]
    if missing:
        raise PipelineError(f"shard manifest {path} lacks {', '.join(missing)}: "
                            f"it was not written by `pipeline prepare`")
    return manifest


def write_manifest(split_dir: str | os.PathLike, manifest: dict[str, Any]) -> Path:
    path = manifest_path(split_dir)
    atomic_write_json(path, manifest)
    return path


def manifest_hash(split_dir: str | os.PathLike) -> str:
    """A short identity of a shard set: sha256 over its shards' names and hashes."""
    manifest = read_manifest(split_dir)
    h = hashlib.sha256()
    for shard in manifest["shards"]:
        h.update(f"{shard['name']}:{shard['sha256']}\n".encode())
    return h.hexdigest()[:16]
