"""The loader's front door: `make_train_loader`, `make_eval_loader`, `make_loader(mode=...)`,
which dispatches to them, and `normalize` for the device side.

The loader is the one owner of sharding: it splits the shards by rank and by DataLoader
worker itself, so it must never be passed to `accelerator.prepare` (which would split the
stream a second time). Rank and world size are passed in or read from
`torch.distributed`, then from the RANK/WORLD_SIZE environment variables.
"""
from __future__ import annotations

import os
from typing import Any, Callable

import torch

from ..shards import MANIFEST_NAME
from ..utils import PipelineError
from .epochs import check_streams
from .handover import ShardLoader
from .latents import latent_format_of
from .spec import Spec, resolve_spec
from .stream import EvalStream, TrainStream

MODES = ("train", "eval")
SAMPLING = ("exact", "resampled")  # train mode: exact epochs, or shards drawn per stream
ON_ERROR = ("warn", "raise")

# option -> (is the value valid?, what it must be, how a bad value is shown)
_RULES: dict[str, tuple[Callable[[Any], bool], str, Callable[[Any], str]]] = {
    "mode": (lambda v: v in MODES, f"must be one of {MODES}", repr),
    "on_error": (lambda v: v in ON_ERROR, f"must be one of {ON_ERROR}", repr),
    "sampling": (lambda v: v in SAMPLING, f"must be one of {SAMPLING}", repr),
    "interleave": (lambda v: type(v) is int and v >= 1, "must be an integer >= 1", repr),
    "batch_size": (lambda v: not v < 1, "must be >= 1", str),
    "num_workers": (lambda v: not v < 0, "must be >= 0", str),
    "start_batch": (lambda v: not v < 0, "must be >= 0", str),
    "shuffle_buffer": (lambda v: not v < 0, "must be >= 0", str),
    "max_samples": (lambda v: v is None or not v < 1, "must be >= 1", str),
}


def _check_options(caller: str, **options: Any) -> None:
    """A PipelineError naming the first invalid option, in the order given."""
    for name, value in options.items():
        valid, rule, shown = _RULES[name]
        if not valid(value):
            raise PipelineError(f"{caller}: {name} {rule}, not {shown(value)}")


def _distributed_position(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is None or world_size is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            found = torch.distributed.get_rank(), torch.distributed.get_world_size()
        else:
            found = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        rank = found[0] if rank is None else rank
        world_size = found[1] if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise PipelineError(f"rank {rank} is outside world size {world_size}")
    return rank, world_size


def make_train_loader(spec: Spec, batch_size: int, num_workers: int = 2, seed: int = 0,
                      rank: int | None = None, world_size: int | None = None,
                      start_batch: int = 0, shuffle_buffer: int = 2000, flip: bool = False,
                      on_error: str = "warn", allow_pipe: bool = True,
                      sampling: str = "exact", interleave: int = 4) -> ShardLoader:
    """An endless train loader over `spec`, deterministic in (seed, rank, worker) and
    resumable with `start_batch` (batches this rank already consumed; same batch size,
    workers and world size).

    `sampling="exact"`: each epoch (`loader.epoch_size` samples over all ranks) shows
    every sample once, `interleave` shards mixed per stream; it needs at least one
    sample per stream (ranks x workers) and, without a manifest, reads every shard once
    here to count it. `sampling="resampled"`: each stream draws whole shards on its own.
    """
    _check_options("make_train_loader", on_error=on_error, sampling=sampling,
                   interleave=interleave, batch_size=batch_size, num_workers=num_workers,
                   start_batch=start_batch, shuffle_buffer=shuffle_buffer)
    shards = resolve_spec(spec, allow_pipe)
    latent = latent_format_of(shards)
    if flip and latent is not None:
        raise PipelineError(f"make_train_loader: flip=True mirrors images, but {spec!r} holds "
                            f"latents (a mirrored image's latent is not the mirrored latent): "
                            f"pass flip=False, or encode with `pipeline encode --flip both`")
    rank, world_size = _distributed_position(rank, world_size)
    dataset = TrainStream(shards=shards, batch_size=batch_size, rank=rank,
                          world_size=world_size, on_error=on_error,
                          image_size=shards.manifest.get("image_size") if shards.manifest else None,
                          latent=latent, seed=seed, start_batch=start_batch,
                          shuffle_buffer=shuffle_buffer, flip=flip, sampling=sampling,
                          interleave=interleave)
    if sampling == "exact":
        # Counted here once (if no manifest gives the counts), not in every worker.
        check_streams(sum(dataset.epoch_counts()), world_size, max(1, num_workers),
                      shards.urls[0])
    return ShardLoader(dataset, num_workers)


def make_eval_loader(spec: Spec, batch_size: int, num_workers: int = 2,
                     rank: int | None = None, world_size: int | None = None,
                     max_samples: int | None = None, on_error: str = "warn",
                     allow_pipe: bool = True) -> ShardLoader:
    """An eval loader over `spec`: every sample exactly once over all ranks, on every pass;
    `max_samples` keeps the first M in manifest order (it needs the manifest's counts)."""
    _check_options("make_eval_loader", on_error=on_error, batch_size=batch_size,
                   num_workers=num_workers, max_samples=max_samples)
    shards = resolve_spec(spec, allow_pipe)
    if max_samples is not None and shards.counts is None:
        raise PipelineError(f"max_samples needs per-shard counts from a manifest: point the spec "
                            f"{spec!r} at the split directory that holds {MANIFEST_NAME}")
    rank, world_size = _distributed_position(rank, world_size)
    dataset = EvalStream(shards=shards, batch_size=batch_size, rank=rank,
                         world_size=world_size, on_error=on_error,
                         image_size=shards.manifest.get("image_size") if shards.manifest else None,
                         latent=latent_format_of(shards), max_samples=max_samples)
    return ShardLoader(dataset, num_workers)


def make_loader(spec: Spec, batch_size: int, mode: str = "train", num_workers: int = 2,
                seed: int = 0, rank: int | None = None, world_size: int | None = None,
                start_batch: int = 0, shuffle_buffer: int = 2000, flip: bool = False,
                max_samples: int | None = None, on_error: str = "warn",
                allow_pipe: bool = True, sampling: str = "exact",
                interleave: int = 4) -> ShardLoader:
    """A streaming loader over `spec` (split directory, manifest, brace pattern or URL list):
    `make_train_loader` for mode="train", `make_eval_loader` for mode="eval" (see them).

    Every option is checked whatever the mode; `max_samples` (eval) and `start_batch`
    (train) are refused in the other mode. `allow_pipe=False` refuses `pipe:` commands in
    the spec; a manifest's entries are never run as commands either way.

    Images are uint8 B x 3 x H x W in channels-last memory; `normalize` turns them
    into contiguous (or channels-last) float on the device. Latent shards (their
    manifest says so) give their latents as stored per sample instead: float16
    B x C x h x w (VAE moments: B x 2C x h x w, see `sample_moments`) or int64 codes;
    flip=True is refused for them. A batch with workers lives
    in a buffer its worker refills once no tensor refers to it any more, so holding
    on to batches is safe (the worker then uses other buffers).
    """
    _check_options("make_loader", mode=mode, on_error=on_error, sampling=sampling,
                   interleave=interleave, batch_size=batch_size, num_workers=num_workers,
                   start_batch=start_batch, shuffle_buffer=shuffle_buffer,
                   max_samples=max_samples)
    if mode == "train" and max_samples is not None:
        raise PipelineError("make_loader: max_samples selects the eval subset; "
                            "it does not apply to mode='train'")
    if mode == "eval" and start_batch:
        raise PipelineError("make_loader: start_batch resumes training; eval always reads "
                            "every sample from the start")
    common = {"num_workers": num_workers, "rank": rank, "world_size": world_size,
              "on_error": on_error, "allow_pipe": allow_pipe}
    if mode == "eval":  # seed, shuffle_buffer, flip, sampling, interleave do not apply
        return make_eval_loader(spec, batch_size, max_samples=max_samples, **common)
    return make_train_loader(spec, batch_size, seed=seed, start_batch=start_batch,
                             shuffle_buffer=shuffle_buffer, flip=flip, sampling=sampling,
                             interleave=interleave, **common)


def normalize(images: torch.Tensor,
              memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1] in `memory_format`; call it on the device, after the
    uint8 copy (the loader's channels-last batches are laid out in this same step)."""
    return images.to(torch.float32, memory_format=memory_format).div_(127.5).sub_(1)
