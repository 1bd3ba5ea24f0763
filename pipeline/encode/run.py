"""An encode job from start to end, on one process or several (`encode_split`).

In order: every process resolves the source, the latent plan and the output split; the
main process takes the split's lock, checks the job record, clears stale temporary files
and finds the shards already complete; every process learns which, takes every
world_size-th of the rest (`rank_shards`: each shard is encoded by exactly one process),
writes those shards and their records, and all agree whether everyone succeeded; then
the main process assembles the manifest from the records. Collective calls go through
`group` (an Accelerator, or `SingleProcess`) and work only the main process does through
`on_main_process`, so a failure anywhere stops every process instead of leaving them
waiting at the next collective.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..checkpoint import on_main_process
from ..config import to_yaml
from ..data import ShardSet, latent_format_of, resolve_spec
from ..locking import Lock
from ..prepare.job import PROGRESS_DIR
from ..shards import DuplicateKeyError, ShardWriter, manifest_path, shard_name
from ..utils import PipelineError, atomic_write_text
from .checkpoint import Checkpoint
from .config import SPLIT_NAME, EncodeConfig
from .job import (CONFIG_NAME, ShardRecord, assemble_manifest, check_job_record,
                  finished_shards, lock_split, read_records, refuse_foreign_directory,
                  source_entry, source_identity, write_record, write_split_manifest)
from .source import Piece, SourceShard, read_pieces, source_shards
from .store import FLIP_SUFFIX, BatchEncoder, LatentPlan, LatentSums, plan_latents


class SingleProcess:
    """The collectives of one process, as an Accelerator offers them when nothing was
    launched: what tests and library callers pass as `group`."""
    is_main_process = True
    process_index = 0
    num_processes = 1

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)

    def reduce(self, tensor: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        return tensor


@dataclass
class EncodeSummary:
    split: str
    num_samples: int        # latents in the split's shards
    num_skipped: int        # source samples that could not be read
    num_shards: int
    complete_before: int    # shards a previous run had finished
    manifest_path: Path
    expected: int | None    # the source manifest's count

    def line(self) -> str:
        return (f"{self.split}: {self.num_samples} latents in {self.num_shards} shards "
                f"({self.complete_before} already complete), {self.num_skipped} source "
                f"samples skipped -> {self.manifest_path}")


def rank_shards(todo: list[int], rank: int, world_size: int) -> list[int]:
    """Process `rank`'s shards of those left to do: every world_size-th, so each shard
    is encoded by exactly one process."""
    return todo[rank::world_size]


def encode_split(cfg: EncodeConfig, ckpt: Checkpoint, group,
                 progress: bool = True) -> EncodeSummary | None:
    """Encode the source split of `cfg` with checkpoint `ckpt`; every process of `group`
    calls it. The main process returns the summary."""
    model = ckpt.model.to(group.device).eval()
    plan = plan_latents(model, cfg.latent, cfg.seed)
    shards = resolve_spec(cfg.shards, allow_pipe=True)
    check_source(shards, model, cfg.shards)
    split = output_split(cfg, shards)
    split_dir = Path(cfg.output) / split
    sources = source_shards(shards)
    model_sha256 = ckpt.weights_sha256()
    job = {"model_sha256": model_sha256, "latent": plan.mode, "kind": plan.kind,
           "dtype": plan.dtype, "flip": cfg.flip,
           "seed": cfg.seed if plan.mode == "sample" else None,
           "source": source_identity(shards), "num_shards": len(sources)}
    started = on_main_process(group, lambda: start_job(split_dir, split, job, cfg, shards,
                                                       sources), f"starting in {split_dir}")
    lock, done = started if started is not None else (None, [])
    try:
        done = agreed_indices(group, done, len(sources))
        todo = [s.index for s in sources if s.index not in done]
        mine = [sources[i] for i in rank_shards(todo, group.process_index, group.num_processes)]
        failure = None
        try:
            encode_shards(mine, plan, model, shards, cfg, split_dir, split, group, progress)
        except Exception as error:  # noqa: BLE001 - re-raised below, once all agree
            failure = error
        agree_on_failure(group, failure)
        base = manifest_base(split, plan, model, ckpt, model_sha256, cfg, shards, job)
        return on_main_process(group, lambda: finish(split_dir, split, shards, sources, base,
                                                     len(done)), "writing the manifest")
    finally:
        if lock is not None:
            lock.release()


def check_source(shards: ShardSet, model, spec: str) -> None:
    manifest = shards.manifest
    if manifest is None:
        return
    where = manifest_path(Path(shards.urls[0]).parent)
    if latent_format_of(shards) is not None:
        raise PipelineError(f"--shards {spec}: these are latent shards already ({where}); "
                            f"encode the image split they were made from")
    size, expected = manifest["image_size"], model.config.image_size
    if size != expected:
        raise PipelineError(f"--shards {spec}: {where} holds {size}x{size} images but the "
                            f"checkpoint encodes {expected}x{expected}: encode shards "
                            f"prepared at {expected} px")


def output_split(cfg: EncodeConfig, shards: ShardSet) -> str:
    """--split, else the source manifest's `split`: one safe path component either way."""
    if cfg.split is not None:
        return cfg.split
    split = (shards.manifest or {}).get("split")
    if split is None:
        raise PipelineError(f"--shards {cfg.shards}: no source manifest names the split; "
                            f"pass --split NAME")
    if not isinstance(split, str) or not SPLIT_NAME.fullmatch(split):
        raise PipelineError(f"--shards {cfg.shards}: the source manifest's split {split!r} "
                            f"is not a split name (letters, digits, '_', '-'): pass --split")
    return split


def start_job(split_dir: Path, split: str, job: dict[str, Any], cfg: EncodeConfig,
              shards: ShardSet, sources: list[SourceShard]) -> tuple[Lock, list[int]]:
    """Main process: the lock, the job record, the saved options, the shards complete."""
    refuse_foreign_directory(split_dir)  # before the lock writes into it
    lock = lock_split(split_dir)
    try:
        refuse_foreign_directory(split_dir)
        check_job_record(split_dir, job)
        atomic_write_text(split_dir / PROGRESS_DIR / CONFIG_NAME, to_yaml(cfg))
        return lock, finished_shards(split_dir, split, shards, sources)
    except BaseException:
        lock.release()
        raise


def agreed_indices(group, indices: list[int], size: int) -> set[int]:
    """The main process's `indices`, known to every process (one sum over a mask)."""
    mask = torch.zeros(size, device=group.device)
    if group.is_main_process:
        mask[list(indices)] = 1.0
    mask = group.reduce(mask, reduction="sum")
    return {i for i, flag in enumerate(mask.tolist()) if flag > 0}


def agree_on_failure(group, failure: Exception | None) -> None:
    flag = torch.tensor([0.0 if failure is None else 1.0], device=group.device)
    failed = group.reduce(flag, reduction="sum").item() > 0
    if failure is not None:
        raise failure
    if failed:
        raise PipelineError("another process failed while encoding its shards (its error is "
                            "above); finished shards are kept: re-run the same command to "
                            "resume")


# ---------------------------------------------------------------- encoding shards

def encode_shards(mine: list[SourceShard], plan: LatentPlan, model, shards: ShardSet,
                  cfg: EncodeConfig, split_dir: Path, split: str, group, progress: bool) -> None:
    """Encode this process's source shards; each output shard and its record are on disk
    as soon as its source shard's last piece is in. Leaving by any exception removes
    the temporary files of the shards in progress."""
    encoder = BatchEncoder(model, plan, group.device)
    header = plan.npy_header()
    counts = [s.count for s in mine]
    total = None if None in counts else sum(counts) * (2 if cfg.flip == "both" else 1)
    in_progress: dict[int, ShardOutput] = {}
    pieces = read_pieces(mine, cfg.batch_size, model.config.image_size, cfg.on_error,
                         cfg.num_workers)
    by_index = {s.index: s for s in mine}
    try:
        with tqdm(total=total, unit="img", desc=f"encode {split}", smoothing=0.1,
                  disable=not (progress and group.is_main_process)) as bar:
            for piece in pieces:
                if piece.error is not None:
                    raise PipelineError(piece.error)
                shard = in_progress.get(piece.shard)
                if shard is None:
                    source = by_index[piece.shard]
                    shard = in_progress[piece.shard] = ShardOutput(
                        ShardWriter(split_dir / shard_name(split, source.index)),
                        source_entry(shards, source), plan, header, cfg.flip == "both",
                        group.device)
                bar.update(shard.add(piece, encoder))
                if piece.last:
                    del in_progress[piece.shard]
                    write_record(split_dir, shard.close(piece))
    finally:
        for shard in in_progress.values():
            shard.writer.abort()


class ShardOutput:
    """One output shard being written: each source sample's latent, then (flip both) the
    mirrored image's, right after it."""

    def __init__(self, writer: ShardWriter, source: dict[str, Any], plan: LatentPlan,
                 header: bytes, flip: bool, device: torch.device):
        self.writer, self.source, self.plan = writer, source, plan
        self.header, self.flip = header, flip
        self.sums = LatentSums(plan.stat_channels, device) if plan.stat_channels else None

    def add(self, piece: Piece, encoder: BatchEncoder) -> int:
        """Encode and append a piece; the number of latents written."""
        if not piece.keys:
            return 0
        versions = [(False, piece.keys)]
        if self.flip:
            versions.append((True, [key + FLIP_SUFFIX for key in piece.keys]))
        encoded = []
        for mirrored, keys in versions:
            stored, values = encoder.encode(piece.images, keys, mirrored)
            if self.sums is not None:
                self.sums.add(values)
            encoded.append((mirrored, keys, stored))
        for i, label in enumerate(piece.labels):
            for mirrored, keys, stored in encoded:
                self._append(keys[i], piece.keys[i], label, mirrored, stored[i])
        return len(piece.keys) * len(versions)

    def _append(self, key: str, source_key: str, label: int, mirrored: bool, latent) -> None:
        meta = {"key": source_key, "shard": self.source["name"], "flip": mirrored}
        members = {self.plan.member: self.header + latent.tobytes(),
                   "cls": str(label).encode(),
                   "json": json.dumps(meta, sort_keys=True).encode()}
        try:
            self.writer.add(key, members)
        except DuplicateKeyError as error:
            raise PipelineError(f"source shard {self.source['name']}: {error} (a key given "
                                f"twice, or one ending in {FLIP_SUFFIX} with --flip both)"
                                ) from None

    def close(self, last: Piece) -> ShardRecord:
        info = self.writer.close()
        return ShardRecord(last.shard, info.to_dict(), self.source, last.skipped,
                           self.sums.to_record() if self.sums is not None else None)


# ---------------------------------------------------------------- the manifest

def manifest_base(split: str, plan: LatentPlan, model, ckpt: Checkpoint, model_sha256: str,
                  cfg: EncodeConfig, shards: ShardSet, job: dict[str, Any]) -> dict[str, Any]:
    source = shards.manifest or {}
    return {
        "split": split, "image_size": model.config.image_size, "image_format": None,
        "latent": plan.manifest_section(model), "flip": cfg.flip,
        "classes": source.get("classes", []), "class_names": source.get("class_names"),
        "checkpoint": {"path": str(Path(ckpt.path).resolve()), "step": ckpt.step,
                       "run": ckpt.run, "weights": ckpt.export.get("weights"),
                       "model_sha256": model_sha256,
                       "model": dataclasses.asdict(model.config)},
        "source": {"spec": str(cfg.shards), "split": source.get("split"),
                   "manifest_hash": job["source"], "num_samples": shards.total,
                   "num_shards": len(shards.urls)},
        "job": job,
    }


def finish(split_dir: Path, split: str, shards: ShardSet, sources: list[SourceShard],
           base: dict[str, Any], complete_before: int) -> EncodeSummary:
    """Main process: the manifest from every shard's record, and the count check."""
    records = read_records(split_dir, split, shards, sources)
    manifest = assemble_manifest(base, records)
    path = write_split_manifest(split_dir, manifest)
    summary = EncodeSummary(split, manifest["num_samples"], manifest["num_skipped"],
                            len(records), complete_before, path, shards.total)
    per_sample = 2 if base["flip"] == "both" else 1
    encoded = summary.num_samples // per_sample
    if summary.expected is not None and encoded + summary.num_skipped != summary.expected:
        print(f"warning: {split}: {encoded} encoded + {summary.num_skipped} skipped = "
              f"{encoded + summary.num_skipped} source samples, but the source manifest "
              f"lists {summary.expected}: samples were lost", file=sys.stderr)
    elif summary.num_skipped:
        print(f"warning: {split}: {summary.num_skipped} unreadable source samples were "
              f"skipped", file=sys.stderr)
    return summary
