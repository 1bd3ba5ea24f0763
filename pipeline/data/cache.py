"""Device-resident training data (`--data.cache gpu|host`): this rank's part of the train
shards read once into one uint8 tensor on the GPU (or in pinned host memory), batches
drawn from it by indexing with a seeded permutation per epoch.

    plan_cache(spec, place, ...)  -> CachePlan: this rank's part and the memory it takes;
                                     refused before anything is read when it would not fit
    fill_cache(plan, workers)     -> ImageCache: the part read once through DataLoader
                                     workers (progress bar: images/s, the memory it takes)
    CachedLoader(cache, ...)      -> endless (images, labels, keys) batches, as the
                                     streaming train loader yields them; flips on the device
    make_cached_loader(...)       -> the three in a row

The part. The T samples of the shards, concatenated in manifest order, are cut into one
contiguous share per rank, positions [r·T//R, (r+1)·T//R) (`stream_share`): whole shards
in the middle, pieces of shards at its two ends. Every sample is in exactly one part, and
parts differ by at most one sample. No shuffle crosses ranks: an epoch of rank r is a
permutation of its own part, seeded by (seed, rank, epoch), as MosaicML's per-node cache
does. The cache holds N×H×W×3 rows (what the decoders give), and a batch is the
B×3×H×W channels-last view the streaming loader yields too.

Epochs and resume. Rank r's samples are epoch 0's permutation, then epoch 1's, and so on;
batch b is positions [b·B, (b+1)·B) of that sequence, so a batch may end one epoch and
start the next: no sample is dropped or padded, each epoch shows every sample of the part
once, and the trainer's step count (not the data) ends the run, so all ranks take the same
number of steps. (A rank whose part is one sample longer has its epoch boundaries drift by
a sample per epoch against the others.) A batch is a pure function of its index: resuming
at `start_batch` gives the uninterrupted run's batches (same seed, batch size and world
size; the worker count does not matter, since each sample is placed by its position).

The cache reads every sample once at the start, so the streaming path (`--data.cache
none`, the default) stays the one for data that does not fit.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator, NamedTuple, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..utils import PipelineError
from .epochs import Segment, check_streams, count_samples, stream_segments, stream_share
from .handover import PREFETCH, _identity, _WorkerReport
from .latents import latent_format_of
from .loader import _distributed_position
from .spec import ShardSet, Spec, resolve_spec
from .stream import ShardReader

PLACES = ("host", "gpu")   # where a cache can live (`--data.cache none` streams instead)
CHANNELS = 3               # decoders give RGB rows
FILL_CHUNK = 256           # samples a fill worker hands over at a time
# Memory left for training itself (weights, activations, optimizer state, the loader's
# buffers) when deciding whether a cache fits: 10% of the device or host, at least 2 GiB.
RESERVE_FRACTION = 0.1
RESERVE_MIN_BYTES = 2 << 30


@dataclass(frozen=True)
class CachePlan:
    """What one rank will cache, decided (and checked against free memory) before reading."""
    shards: ShardSet
    counts: tuple[int, ...]        # samples per shard (the manifest's, else counted)
    place: str                     # "gpu" | "host"
    device: torch.device           # where batches are delivered (for "gpu", stored too)
    rank: int
    world_size: int
    segments: tuple[Segment, ...]  # this rank's part, in manifest order
    image_size: int

    @property
    def num_samples(self) -> int:
        """Samples of this rank's part."""
        return sum(segment.stop - segment.start for segment in self.segments)

    @property
    def total(self) -> int:
        """Samples over all ranks: one epoch."""
        return sum(self.counts)

    @property
    def nbytes(self) -> int:
        return self.num_samples * self.image_size * self.image_size * CHANNELS

    @property
    def pinned(self) -> bool:
        """A host cache is page-locked when batches go to a CUDA device (asynchronous
        copies); on a CPU-only machine it is plain memory."""
        return self.place == "host" and self.device.type == "cuda"


@dataclass
class ImageCache:
    """One rank's part of the train split, in memory."""
    rows: Tensor                 # N×H×W×3 uint8: on the GPU, in pinned or plain host memory
    labels: Tensor               # N int64, host
    keys: list[str]
    total: int                   # samples over all ranks (the epoch size)
    skipped: int = 0             # unreadable samples of this part (warned, left out)
    manifest: dict[str, Any] | None = None

    @property
    def num_samples(self) -> int:
        return len(self.rows)

    @property
    def image_size(self) -> int:
        return self.rows.shape[1]


# ---------------------------------------------------------------- the plan


def rank_part(counts: Sequence[int], rank: int, world_size: int) -> list[Segment]:
    """Rank r's contiguous share of the samples, shards in manifest order: the pieces
    of shards covering positions [r·T//R, (r+1)·T//R)."""
    return stream_segments(counts, range(len(counts)), rank, world_size)


def plan_cache(spec: Spec, place: str, device: torch.device | str | None = None,
               rank: int | None = None, world_size: int | None = None,
               image_size: int | None = None, allow_pipe: bool = True) -> CachePlan:
    """This rank's part of `spec` and where it will live, checked to fit (PipelineError
    naming the sizes otherwise) before any sample is read. Without a manifest the shards
    are counted first (read, not decoded) and `image_size` must be given."""
    if place not in PLACES:
        raise PipelineError(f"--data.cache {place!r}: one of none, {', '.join(PLACES)}")
    device = torch.device(device if device is not None else
                          "cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and device.index is None:  # the tensors' own name for it
        device = torch.device("cuda", torch.cuda.current_device())
    if place == "gpu" and device.type != "cuda":
        raise PipelineError(f"--data.cache gpu keeps the train images on the GPU, but this "
                            f"process runs on {device.type}: use --data.cache host (or none)")
    shards = resolve_spec(spec, allow_pipe)
    if latent_format_of(shards) is not None:
        raise PipelineError(f"--data.cache holds images, but {spec!r} holds the latents of "
                            f"`pipeline encode`: train on image shards, or --data.cache none")
    rank, world_size = _distributed_position(rank, world_size)
    counts = shards.counts if shards.counts is not None else count_samples(shards.urls)
    check_streams(sum(counts), world_size, 1, shards.urls[0])
    plan = CachePlan(shards, tuple(counts), place, device, rank, world_size,
                     tuple(rank_part(counts, rank, world_size)),
                     _image_size(shards, spec, image_size))
    check_fits(plan, spec)
    return plan


def _image_size(shards: ShardSet, spec: Spec, image_size: int | None) -> int:
    stated = shards.manifest.get("image_size") if shards.manifest else None
    if stated is not None and image_size is not None and stated != image_size:
        raise PipelineError(f"{spec}: the shards hold {stated}x{stated} images (their "
                            f"manifest), not {image_size}x{image_size} (--model.image_size)")
    if stated is None and image_size is None:
        raise PipelineError(f"{spec}: no manifest states the image size, which the cache "
                            f"must know before reading: pass image_size (--model.image_size)")
    return stated if stated is not None else image_size


def available_bytes(place: str, device: torch.device) -> tuple[int, int]:
    """(free, total) bytes where a cache of `place` would live: the GPU's memory, or the
    host's available memory shared by this node's processes (LOCAL_WORLD_SIZE)."""
    if place == "gpu":
        return torch.cuda.mem_get_info(device)
    free, total = _host_memory()
    local_processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return free // local_processes, total // local_processes


def _host_memory() -> tuple[int, int]:
    """(available, total) host bytes: /proc/meminfo where it exists (MemAvailable counts
    the reclaimable page cache), else the free physical pages."""
    try:
        with open("/proc/meminfo") as meminfo:
            fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in meminfo
                      if line.split(":")[0] in ("MemAvailable", "MemTotal")}
        return fields["MemAvailable"], fields["MemTotal"]
    except (OSError, KeyError, ValueError, IndexError):
        page = os.sysconf("SC_PAGE_SIZE")
        return os.sysconf("SC_AVPHYS_PAGES") * page, os.sysconf("SC_PHYS_PAGES") * page


def reserve_bytes(total: int) -> int:
    return max(RESERVE_MIN_BYTES, int(total * RESERVE_FRACTION))


def check_fits(plan: CachePlan, spec: Spec) -> None:
    free, total = available_bytes(plan.place, plan.device)
    usable = free - reserve_bytes(total)
    if plan.nbytes > usable:
        where = str(plan.device) if plan.place == "gpu" else "host memory"
        other = "host (pinned host memory) or " if plan.place == "gpu" else ""
        raise PipelineError(
            f"--data.cache {plan.place}: rank {plan.rank}'s part of {spec} is "
            f"{plan.num_samples} images of {plan.image_size}x{plan.image_size} = "
            f"{gib(plan.nbytes)}, but {where} has {gib(free)} free, of which "
            f"{gib(reserve_bytes(total))} stay for training: use --data.cache {other}none "
            f"(streaming), or more processes (each caches its part)")


def gib(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB"


# ---------------------------------------------------------------- filling


class _Chunk(NamedTuple):
    positions: np.ndarray  # position of each sample in the rank's part (int64)
    images: Tensor         # n×H×W×3 uint8
    labels: np.ndarray
    keys: list[str]


@dataclass(kw_only=True)
class _PartReader(ShardReader):
    """Reads one rank's part: worker w of W takes the contiguous positions
    `stream_share(N, w, W)` of it and hands them over in chunks, each sample tagged with
    its position (corrupt ones are skipped and counted, as the streams do)."""
    mode: ClassVar[str] = "cache"
    reuses_workers: ClassVar[bool] = False
    segments: tuple[Segment, ...] = ()
    counts: tuple[int, ...] = ()

    def _batches(self, worker: int, num_workers: int) -> Iterator[_Chunk]:
        part = sum(segment.stop - segment.start for segment in self.segments)
        mine = stream_share(part, worker, num_workers)
        chunk: list[tuple[int, np.ndarray, int, str]] = []
        for position, (image, label, key, _flip) in self._samples(mine.start, mine.stop):
            chunk.append((position, image, label, key))
            if len(chunk) == self.batch_size:
                yield _stacked(chunk)
                chunk = []
        if chunk:
            yield _stacked(chunk)

    def _samples(self, start: int, stop: int) -> Iterator[tuple[int, tuple]]:
        """(position, decoded sample) for the positions [start, stop) of the part."""
        offset = 0
        for segment in self.segments:
            length = segment.stop - segment.start
            first, last = max(start, offset), min(stop, offset + length)
            if first < last:
                url, count = self.shards.urls[segment.shard], self.counts[segment.shard]
                base = offset - segment.start  # position of the shard's sample 0
                for index, key, members in self._read(url, count, segment.start + last - offset,
                                                      first=segment.start + first - offset):
                    sample = self._decode(url, key, members)
                    if sample is not None:
                        yield base + index, sample
            offset += length


def _stacked(chunk: list[tuple[int, np.ndarray, int, str]]) -> _Chunk:
    positions, images, labels, keys = zip(*chunk)
    return _Chunk(np.array(positions, dtype=np.int64), torch.from_numpy(np.stack(images)),
                  np.array(labels, dtype=np.int64), list(keys))


def fill_cache(plan: CachePlan, num_workers: int = 2, progress: bool = True,
               on_error: str = "warn") -> ImageCache:
    """Read the plan's part once (`num_workers` DataLoader workers; 0: in this process)
    into memory where the plan says. Unreadable samples are skipped with a ShardWarning
    and left out (on_error="raise": a PipelineError)."""
    count = plan.num_samples
    rows = allocate_rows(plan)
    labels = torch.full((count,), -1, dtype=torch.int64)
    keys: list[str | None] = [None] * count
    filled = np.zeros(count, dtype=bool)
    skipped = 0
    reader = _PartReader(shards=plan.shards, batch_size=FILL_CHUNK, rank=plan.rank,
                         world_size=plan.world_size, on_error=on_error,
                         image_size=plan.image_size, segments=plan.segments, counts=plan.counts)
    # A private generator: the DataLoader must not draw its base seed from the global RNG
    # (a resumed run would then train on other random numbers than an uninterrupted one).
    loader = DataLoader(reader, batch_size=None, collate_fn=_identity, num_workers=num_workers,
                        generator=torch.Generator(),
                        prefetch_factor=PREFETCH if num_workers else None)
    where = f"{plan.device}" if plan.place == "gpu" else ("pinned host memory" if plan.pinned
                                                          else "host memory")
    with tqdm(total=count, unit="img", unit_scale=True, dynamic_ncols=True,
              desc=f"caching {gib(plan.nbytes)} in {where}", disable=not progress) as bar:
        for item in loader:
            if isinstance(item, _WorkerReport):
                if item.error is not None:
                    raise PipelineError(item.error)
                skipped += item.skipped
                continue
            _place_chunk(rows, item)
            labels[torch.from_numpy(item.positions)] = torch.from_numpy(item.labels)
            for position, key in zip(item.positions.tolist(), item.keys):
                keys[position] = key
            filled[item.positions] = True
            bar.update(len(item.keys))
    if not filled.all():
        rows, labels, keys = _compacted(rows, labels, keys, filled)
    if not keys:
        raise PipelineError(f"no readable sample in rank {plan.rank}'s part of the shards "
                            f"{plan.shards.urls[0]}...: see the warnings")
    return ImageCache(rows, labels, keys, plan.total, skipped, plan.shards.manifest)


def allocate_rows(plan: CachePlan) -> Tensor:
    shape = (plan.num_samples, plan.image_size, plan.image_size, CHANNELS)
    if plan.place == "gpu":
        return torch.empty(shape, dtype=torch.uint8, device=plan.device)
    return torch.empty(shape, dtype=torch.uint8, pin_memory=plan.pinned)


def _place_chunk(rows: Tensor, chunk: _Chunk) -> None:
    positions, images = chunk.positions, chunk.images
    if images.shape[1:] != rows.shape[1:]:
        raise PipelineError(f"sample {chunk.keys[0]} is {tuple(images.shape[1:])} (height x "
                            f"width x channels), but the cache holds {tuple(rows.shape[1:])}")
    first = int(positions[0])
    if int(positions[-1]) - first + 1 == len(positions):  # in order, no gap: one copy
        rows[first:first + len(positions)].copy_(images)
    else:
        rows[torch.from_numpy(positions).to(rows.device)] = images.to(rows.device)


def _compacted(rows: Tensor, labels: Tensor, keys: list, filled: np.ndarray
               ) -> tuple[Tensor, Tensor, list[str]]:
    """The filled rows moved to the front, in order, without a second cache-sized
    buffer: destinations never pass their sources, so copying chunk by chunk in order
    reads every source before it is overwritten."""
    kept = torch.from_numpy(np.flatnonzero(filled))
    for start in range(0, len(kept), 1 << 14):
        sources = kept[start:start + (1 << 14)]
        rows[start:start + len(sources)] = rows[sources.to(rows.device)]
    return rows[:len(kept)], labels[kept], [keys[i] for i in kept.tolist()]


# ---------------------------------------------------------------- batches


class _EpochOrder(NamedTuple):
    host: Tensor           # the permutation, on the host (labels, keys)
    index: Tensor          # the same on the cache's device (the gather)
    flips: Tensor | None   # mirror position i? (bool, on the delivery device)


def epoch_seed(seed: int, rank: int, epoch: int) -> int:
    """A 63-bit seed for (seed, rank, epoch): every epoch of every rank its own stream."""
    digest = hashlib.sha256(f"cache/{seed}/{rank}/{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class CachedLoader:
    """Endless train batches from an ImageCache: `(images uint8 B×3×H×W channels-last on
    `device`, labels int64 B, keys)`, as `ShardLoader` yields them (see the module
    docstring for epochs and resume). Iterating again continues after the last batch
    yielded. `epoch_size` is the samples of one epoch over all ranks."""

    latent = None  # images only

    def __init__(self, cache: ImageCache, batch_size: int, seed: int = 0, rank: int = 0,
                 start_batch: int = 0, flip: bool = False,
                 device: torch.device | str | None = None):
        if batch_size < 1 or start_batch < 0:
            raise PipelineError(f"CachedLoader: batch_size must be >= 1 and start_batch >= 0, "
                                f"not {batch_size} and {start_batch}")
        self.cache = cache
        self.batch_size = batch_size
        self.seed, self.rank, self.flip = seed, rank, flip
        self.device = torch.device(device) if device is not None else cache.rows.device
        self.manifest = cache.manifest
        self.image_size = cache.image_size
        self.epoch_size = self.expected_total = cache.total
        self.num_seen, self.num_skipped = 0, cache.skipped
        self.next_batch = start_batch
        self._orders: dict[int, _EpochOrder] = {}

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, list[str]]]:
        while True:
            batch = self.batch(self.next_batch)
            self.next_batch += 1
            self.num_seen += len(batch[2])
            yield batch

    def batch(self, index: int) -> tuple[Tensor, Tensor, list[str]]:
        """Batch `index` of this rank: positions [index·B, (index+1)·B) of its epochs."""
        pieces = self._pieces(index * self.batch_size, (index + 1) * self.batch_size)
        host = torch.cat([order.host[a:b] for order, a, b in pieces])
        images = self._gather(torch.cat([order.index[a:b] for order, a, b in pieces]))
        if self.flip:
            mirrored = torch.cat([order.flips[a:b] for order, a, b in pieces])
            images = torch.where(mirrored.view(-1, 1, 1, 1), images.flip(2), images)
        keys = self.cache.keys
        # B×H×W×3 rows -> B×3×H×W, channels-last: the streaming loader's layout.
        return (images.permute(0, 3, 1, 2), self.cache.labels[host],
                [keys[i] for i in host.tolist()])

    def _pieces(self, start: int, stop: int) -> list[tuple[_EpochOrder, int, int]]:
        """(epoch order, first, last) slices covering positions [start, stop)."""
        size, pieces = self.cache.num_samples, []
        while start < stop:
            epoch, offset = divmod(start, size)
            take = min(stop - start, size - offset)
            pieces.append((self._order(epoch), offset, offset + take))
            start += take
        return pieces

    def _order(self, epoch: int) -> _EpochOrder:
        if epoch not in self._orders:
            if len(self._orders) >= 2:  # a batch spans at most the current and next epoch
                del self._orders[min(self._orders)]  # (unless B > N: then rebuilt as needed)
            generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.rank, epoch))
            host = torch.randperm(self.cache.num_samples, generator=generator)
            flips = (torch.rand(self.cache.num_samples, generator=generator) < 0.5
                     if self.flip else None)
            self._orders[epoch] = _EpochOrder(
                host, host.to(self.cache.rows.device),
                flips.to(self.device) if flips is not None else None)
        return self._orders[epoch]

    def _gather(self, index: Tensor) -> Tensor:
        """The rows at `index` on the delivery device: gathered where the cache lives;
        from a pinned host cache through a pinned batch and an asynchronous copy."""
        rows = self.cache.rows
        if rows.device == self.device:
            return rows.index_select(0, index)
        if rows.device.type == "cpu" and self.device.type == "cuda":
            # The caching host allocator does not reuse this batch's pinned block before
            # its copy to the device has finished.
            batch = torch.empty((len(index), *rows.shape[1:]), dtype=rows.dtype,
                                pin_memory=True)
            torch.index_select(rows, 0, index, out=batch)
            return batch.to(self.device, non_blocking=True)
        return rows.index_select(0, index).to(self.device)


def make_cached_loader(spec: Spec, batch_size: int, place: str = "host",
                       device: torch.device | str | None = None, num_workers: int = 2,
                       seed: int = 0, rank: int | None = None, world_size: int | None = None,
                       start_batch: int = 0, flip: bool = False, image_size: int | None = None,
                       progress: bool = True, on_error: str = "warn",
                       allow_pipe: bool = True) -> CachedLoader:
    """`plan_cache` + `fill_cache` + `CachedLoader`: this rank's part of `spec` in memory
    at `place` ("gpu" | "host"), as endless train batches resumed at `start_batch`."""
    plan = plan_cache(spec, place, device, rank, world_size, image_size, allow_pipe)
    cache = fill_cache(plan, num_workers, progress, on_error)
    return CachedLoader(cache, batch_size, seed=seed, rank=plan.rank, start_batch=start_batch,
                        flip=flip, device=plan.device)
