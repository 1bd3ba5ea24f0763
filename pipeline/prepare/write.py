"""Planned shards, written exactly once each, and resumed from their records.

1. Every input is assigned to a shard *before* anything is decoded (`plan_shards`): train
   by a seeded permutation (every shard mixes classes), other splits in sorted order.
   Shard i's content is then a pure function of (inputs, options), which is what makes
   resume and `--part K/N` exact.
2. Workers decode chunks of a shard's inputs (`split_chunks`); the parent checks that each
   chunk came back as exactly its planned inputs (samples + failures, in order: every
   input is written once), appends it to the shard's temporary file as soon as the chunks
   before it are in, renames the file once the shard is complete (see
   `pipeline.shards.ShardWriter`) and then records it in `OUT/<split>/.progress/<shard>.json`.
3. A re-run skips shards whose file matches their record and redoes the rest
   (`resume_state`), so a job killed at any point re-runs to the same samples.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from tqdm import tqdm

from ..inputs import Item
from ..shards import ShardWriter, shard_name
from ..utils import PipelineError, atomic_write_json, sha256_file
from .job import part_file_names, record_path, remove_stale_temp_files
from .options import Options
from .pool import ChunkResult, ChunkTask, MapFn

CHUNK_SIZE = 32  # images per worker task: small enough that few shards still fill all workers
# The job's last images go out in quarter-size chunks, so that workers finish together
# instead of one of them decoding a last full chunk alone.
TAPER_IMAGES, TAPER_CHUNK_SIZE = 8 * CHUNK_SIZE, CHUNK_SIZE // 4
WORKER_BUG = ("nothing of that shard was kept; re-run the same command, and report it if it "
              "happens again")


# ---------------------------------------------------------------- the plan

def plan_shards(items: list[Item], split: str, options: Options) -> list[list[Item]]:
    """Assign inputs to shards before any decoding: train by a seeded permutation, other
    splits in sorted order, so shard i is a pure function of the inputs and options."""
    order = (np.random.default_rng(options.seed).permutation(len(items)) if split == "train"
             else np.arange(len(items)))
    ordered = [items[i] for i in order]
    return [ordered[i:i + options.shard_size] for i in range(0, len(ordered), options.shard_size)]


def split_chunks(items: list[Item], taper: bool) -> list[list[Item]]:
    """A shard's inputs in worker tasks of CHUNK_SIZE; with `taper` (the job's last shard)
    its last TAPER_IMAGES or a little more (the full chunks end on a multiple of
    CHUNK_SIZE) in tasks of TAPER_CHUNK_SIZE. Every input is in exactly one task."""
    cut = (max(0, len(items) - TAPER_IMAGES) // CHUNK_SIZE * CHUNK_SIZE if taper
           else len(items))
    return ([items[c:c + CHUNK_SIZE] for c in range(0, cut, CHUNK_SIZE)]
            + [items[c:c + TAPER_CHUNK_SIZE] for c in range(cut, len(items), TAPER_CHUNK_SIZE)])


def part_shards(num_shards: int, part: tuple[int, int]) -> list[int]:
    """The shard indices of part K/N: i % N == K."""
    return [i for i in range(num_shards) if i % part[1] == part[0]]


# ---------------------------------------------------------------- records and resume

@dataclass
class ShardRecord:
    """What a finished shard holds; written after the shard's rename."""

    index: int
    info: dict[str, Any]  # ShardInfo.to_dict()
    failures: list[dict[str, str]] = field(default_factory=list)


def completed_record(split_dir: Path, index: int, name: str) -> ShardRecord | None:
    """The record of shard `name` if the shard on disk is exactly the one recorded."""
    try:
        record = ShardRecord(**json.loads(record_path(split_dir, name).read_text()))
    except (OSError, ValueError, TypeError):
        return None
    shard = split_dir / name
    if (not plausible_record(record, index, name) or not shard.is_file()
            or shard.stat().st_size != record.info["bytes"]
            or sha256_file(shard) != record.info["sha256"]):
        return None
    return record


def plausible_record(record: ShardRecord, index: int, name: str) -> bool:
    """A record is data: it goes into the manifest only with the fields readers rely on."""
    info = record.info
    return (record.index == index and isinstance(info, dict) and info.get("name") == name
            and all(type(info.get(k)) is int and info[k] >= 0 for k in ("num_samples", "bytes"))
            and isinstance(info.get("sha256"), str) and isinstance(record.failures, list)
            and all(isinstance(f, dict) and isinstance(f.get("src"), str)
                    for f in record.failures))


def resume_state(split_dir: Path, split: str, mine: list[int],
                 part: tuple[int, int]) -> dict[int, ShardRecord]:
    """The records of this part's shards `mine` already complete; clears what an
    interrupted run of this part left half-written."""
    remove_stale_temp_files(split_dir, part_file_names(split, mine, part))
    return {i: r for i in mine if (r := completed_record(split_dir, i, shard_name(split, i)))}


# ---------------------------------------------------------------- writing

def write_planned_shards(plan: list[list[Item]], todo: list[int], split: str, split_dir: Path,
                         root: Path, options: Options, run_map: MapFn,
                         bar: tqdm) -> Iterator[ShardRecord]:
    """Process the shards `todo`; yield each one's record as soon as it is on disk."""
    chunks = {i: split_chunks(plan[i], taper=i == todo[-1]) for i in todo}
    tasks = (ChunkTask(str(root), options, i, c, chunk)
             for i in todo for c, chunk in enumerate(chunks[i]))
    in_progress: dict[int, ShardInProgress] = {}
    try:
        for result in run_map(tasks):
            check_chunk_result(result, chunks, split)
            bar.update(len(chunks[result.shard][result.chunk]))
            shard = in_progress.get(result.shard)
            if shard is None:
                shard = in_progress[result.shard] = ShardInProgress(
                    ShardWriter(split_dir / shard_name(split, result.shard)))
            shard.take(result)
            if shard.next_chunk < len(chunks[result.shard]):
                continue
            del in_progress[result.shard]
            info = shard.writer.close()
            record = ShardRecord(result.shard, info.to_dict(), shard.failures)
            atomic_write_json(record_path(split_dir, info.name), asdict(record))
            yield record
    finally:  # interrupted: no temporary shard is left behind
        for shard in in_progress.values():
            shard.writer.abort()


@dataclass
class ShardInProgress:
    """A shard being written: its chunks go to disk in order, as soon as each one's
    predecessors are there, so writing overlaps the workers' decoding of later chunks."""
    writer: ShardWriter
    next_chunk: int = 0
    waiting: dict[int, ChunkResult] = field(default_factory=dict)
    failures: list[dict[str, str]] = field(default_factory=list)

    def take(self, result: ChunkResult) -> None:
        if result.chunk < self.next_chunk or result.chunk in self.waiting:
            raise PipelineError(f"{self.writer.path.name}: chunk {result.chunk} came back "
                                f"twice; {WORKER_BUG}")
        self.waiting[result.chunk] = result
        while self.next_chunk in self.waiting:
            ready = self.waiting.pop(self.next_chunk)
            self.writer.add_encoded(ready.members, ready.keys)
            self.failures += ready.failures
            self.next_chunk += 1


def check_chunk_result(result: ChunkResult, chunks: dict[int, list[list[Item]]],
                       split: str) -> None:
    """A chunk's samples and failures must be exactly its planned inputs, in order: each
    input is then written in its own chunk of its own shard, so once in the whole job,
    with memory for one chunk instead of a job-wide set of keys."""
    planned = chunks.get(result.shard, [])
    if not 0 <= result.chunk < len(planned):
        raise PipelineError(f"{shard_name(split, result.shard)}: a worker returned chunk "
                            f"{result.chunk}, which this job did not plan; {WORKER_BUG}")
    items = planned[result.chunk]
    failed = [f.get("src") for f in result.failures]
    failed_set = set(failed)
    if (result.keys != [i.key for i in items if i.src not in failed_set]
            or failed != [i.src for i in items if i.src in failed_set]):
        raise PipelineError(
            f"{shard_name(split, result.shard)}: chunk {result.chunk} came back with "
            f"{len(result.keys)} samples and {len(failed)} failures that are not its "
            f"{len(items)} planned inputs in order; {WORKER_BUG}")
