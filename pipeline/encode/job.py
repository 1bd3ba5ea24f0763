"""The output split of `pipeline encode`: its lock, job record, shard records and manifest.

`DIR/<split>/` holds the latent shards, `manifest.json` and `.progress/`: `lock` (held by
the running job's main process), `job.json` (what decides the shards' content: the
checkpoint's weights, the latent mode, flips, the source; a re-run with anything else is
refused, naming it), `encode.yaml` (the resolved options of the last run) and one record
per finished shard, `<shard>.json`: its ShardInfo, the source shard it encodes, the
samples it skipped and the float64 sums of its statistics. A re-run trusts a shard only
when its file matches its record (size and sha256); the manifest is assembled from the
records, in shard order, so a resumed job writes the manifest an uninterrupted one would.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .. import __version__
from ..data import LATENT_FORMAT, ShardSet
from ..locking import Lock, acquire
from ..prepare.job import PROGRESS_DIR, record_path, remove_stale_temp_files
from ..shards import MANIFEST_NAME, shard_name, write_manifest
from ..utils import PipelineError, atomic_write_json, provenance, record_once, sha256_file
from .source import SourceShard
from .store import latent_statistics

JOB_RECORD = "job.json"
CONFIG_NAME = "encode.yaml"
LOCK_NAME = "lock"


@dataclass
class ShardRecord:
    """A finished output shard; written after the shard's rename."""
    index: int
    info: dict[str, Any]            # ShardInfo.to_dict()
    source: dict[str, Any]          # {name, num_samples, sha256} of the source shard
    num_skipped: int                # source samples that could not be read
    sums: dict[str, list[float]] | None  # LatentSums.to_record(); None for codes


def lock_split(split_dir: Path) -> Lock:
    return acquire(split_dir / PROGRESS_DIR / LOCK_NAME, f"--output {split_dir}")


def source_entry(shards: ShardSet, shard: SourceShard) -> dict[str, Any]:
    """The source shard as its manifest lists it (sha256 null without a manifest)."""
    listed = {e["name"]: e for e in (shards.manifest or {}).get("shards", [])}
    sha = listed.get(shard.name, {}).get("sha256")
    return {"name": shard.name, "num_samples": shard.count,
            "sha256": sha if isinstance(sha, str) else None}


def source_identity(shards: ShardSet) -> str:
    """sha256 over the source shards' names and hashes, as `shards.manifest_hash` computes
    it for a whole split (so the two agree when the spec is the split directory); over
    the URLs where no manifest gives the hashes."""
    h = hashlib.sha256()
    listed = {e["name"]: e.get("sha256") for e in (shards.manifest or {}).get("shards", [])}
    for url in shards.urls:
        digest = listed.get(Path(url).name)
        h.update(f"{Path(url).name}:{digest}\n".encode() if isinstance(digest, str)
                 else f"url:{url}\n".encode())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------- job record

def refuse_foreign_directory(split_dir: Path) -> None:
    if split_dir.exists() and not split_dir.is_dir():
        raise PipelineError(f"--output: {split_dir} is a file, not a directory; choose "
                            f"another --output")
    if (split_dir / PROGRESS_DIR / JOB_RECORD).is_file() or not split_dir.is_dir():
        return
    # The progress directory alone: this job's lock, taken a moment ago.
    if any(p.name != PROGRESS_DIR for p in split_dir.iterdir()):
        raise PipelineError(f"{split_dir} is not empty and holds no {PROGRESS_DIR}/"
                            f"{JOB_RECORD}: it was not written by `pipeline encode`; choose "
                            f"another --output")


def check_job_record(split_dir: Path, job: dict[str, Any]) -> None:
    """Write the job's identity on first use; refuse a re-run that would mix shards."""
    old = record_once(split_dir / PROGRESS_DIR / JOB_RECORD, job, "job record",
                      f"delete {split_dir} to start over")
    differences = [f"{name}: {old.get(name)!r} there, {value!r} now"
                   for name, value in job.items() if old.get(name) != value] if old else []
    if differences:
        raise PipelineError(f"{split_dir} holds latents of another job ({'; '.join(differences)})"
                            f": shards of different jobs are never mixed; use another "
                            f"--output, or delete {split_dir} to start over")


# ---------------------------------------------------------------- shard records

def write_record(split_dir: Path, record: ShardRecord) -> None:
    atomic_write_json(record_path(split_dir, record.info["name"]), asdict(record))


def completed_record(split_dir: Path, index: int, name: str,
                     source: dict[str, Any]) -> ShardRecord | None:
    """The record of shard `name` if its file is the one recorded, from this source shard."""
    try:
        record = ShardRecord(**json.loads(record_path(split_dir, name).read_text()))
    except (OSError, ValueError, TypeError):
        return None
    shard = split_dir / name
    if (not plausible(record, index, name) or record.source != source or not shard.is_file()
            or shard.stat().st_size != record.info["bytes"]
            or sha256_file(shard) != record.info["sha256"]):
        return None
    return record


def plausible(record: ShardRecord, index: int, name: str) -> bool:
    """A record is data: only one with the fields the manifest relies on is trusted."""
    info, sums = record.info, record.sums
    return (record.index == index and isinstance(info, dict) and info.get("name") == name
            and all(type(info.get(k)) is int and info[k] >= 0 for k in ("num_samples", "bytes"))
            and isinstance(info.get("sha256"), str)
            and type(record.num_skipped) is int and record.num_skipped >= 0
            and (sums is None or (isinstance(sums, dict) and _plausible_sums(sums))))


def _plausible_sums(sums: dict[str, Any]) -> bool:
    lists = [sums.get(k) for k in ("sum", "sum_sq", "count")]
    return (all(isinstance(v, list) for v in lists) and len({len(v) for v in lists}) == 1
            and all(type(x) is float for v in lists for x in v))


def finished_shards(split_dir: Path, split: str, shards: ShardSet,
                    sources: list[SourceShard]) -> list[int]:
    """Indices of the shards already complete; clears what an interrupted run left
    half-written (its temporary files). Called by the main process, holding the lock."""
    names = [shard_name(split, s.index) for s in sources]
    remove_stale_temp_files(split_dir, names + [MANIFEST_NAME, JOB_RECORD, CONFIG_NAME])
    return [s.index for s, name in zip(sources, names)
            if completed_record(split_dir, s.index, name, source_entry(shards, s))]


def read_records(split_dir: Path, split: str, shards: ShardSet,
                 sources: list[SourceShard]) -> list[ShardRecord]:
    """Every shard's record after all processes finished, checked against its file."""
    records = []
    for s in sources:
        name = shard_name(split, s.index)
        record = completed_record(split_dir, s.index, name, source_entry(shards, s))
        if record is None:
            raise PipelineError(f"{split_dir / name} or its record is missing or does not "
                                f"match after every process finished: --output must be on "
                                f"storage that every process shares; re-run to redo it")
        records.append(record)
    return records


# ---------------------------------------------------------------- manifest

def assemble_manifest(base: dict[str, Any], records: list[ShardRecord]) -> dict[str, Any]:
    stats = latent_statistics([r.sums for r in records if r.sums is not None])
    shards = [{**r.info, "source_shard": r.source["name"], "num_skipped": r.num_skipped}
              for r in records]
    std = stats["std"] if stats else None
    return {"format": LATENT_FORMAT, **base,
            "num_samples": sum(r.info["num_samples"] for r in records),
            "num_skipped": sum(r.num_skipped for r in records),
            "num_shards": len(records), "shards": shards,
            "latent_stats": stats,
            # What diffusion trainers multiply by (z - shift_factor) * scaling_factor.
            "scaling_factor": 1 / std if std else None,
            "shift_factor": stats["mean"] if stats else None,
            "version": __version__, "provenance": provenance()}


def write_split_manifest(split_dir: Path, manifest: dict[str, Any]) -> Path:
    return write_manifest(split_dir, manifest)
