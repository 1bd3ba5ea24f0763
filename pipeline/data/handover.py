"""Batches from the workers to the caller: collation in the worker, shared-memory buffers
reused without a copy, and `ShardLoader`, the main process's side of the DataLoader.

A fresh shared-memory block per batch, and a file-descriptor hand-over per batch, would
cost a raw sample a large share of a worker's budget (figures: README, Performance). So a
worker fills a free buffer of its own and marks it busy in `flags[worker]`, an array shared
with the main process. The buffer itself crosses to the main process once, with its first
batch; later batches in it send only (worker, slot). The main process lends the caller a
tensor over that memory and clears the flag once nothing references that batch any more
(ShardLoader._reclaim), so a batch the caller still holds is never overwritten; with
every buffer busy the worker falls back to a one-off block and never waits.
"""
from __future__ import annotations

import dataclasses
import itertools
import sys
from typing import TYPE_CHECKING, Any, Iterator, NamedTuple, Sequence

import numpy as np
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils.data import DataLoader

from ..utils import PipelineError

if TYPE_CHECKING:
    from .stream import Sample, ShardReader

PREFETCH = 4  # batches each DataLoader worker prepares ahead (its prefetch_factor)
# Reusable shared-memory batch buffers per worker: its prefetched batches, the one the
# caller holds and the one it just dropped (reclaimed at the next batch), plus slack.
BUFFER_SLOTS = PREFETCH + 4


class _Batch(NamedTuple):
    images: torch.Tensor | None  # None: the batch is in `buffer`, which the main process has
    labels: np.ndarray
    keys: list[str]
    buffer: tuple[int, int] | None = None  # (worker, slot) of a _BatchBuffers buffer


class _WorkerReport(NamedTuple):
    """A worker's last item: its skip count, or the error that stopped it.

    Errors travel as data so the main process raises one clean PipelineError instead of
    DataLoader's re-raised traceback text."""
    skipped: int
    error: str | None


class _BatchBuffers:
    """Shared-memory batch buffers that one DataLoader worker reuses, with busy flags
    (see the module docstring)."""

    def __init__(self, flags: torch.Tensor, worker: int, send_always: bool):
        self.busy = flags[worker].numpy()
        self.worker = worker
        self.send_always = send_always  # pinned loaders: the pin thread needs the tensor
        self.buffers: list[torch.Tensor] = []

    def take(self, shape: tuple[int, ...], dtype: torch.dtype = torch.uint8
             ) -> tuple[torch.Tensor, tuple[int, int] | None, bool]:
        """(buffer, its (worker, slot) or None for a one-off, send the tensor along?)"""
        for slot, buffer in enumerate(self.buffers):
            if not self.busy[slot] and buffer.shape == shape and buffer.dtype == dtype:
                self.busy[slot] = 1
                return buffer, (self.worker, slot), self.send_always
        batch = torch.empty(shape, dtype=dtype).share_memory_()
        if len(self.buffers) == len(self.busy):
            return batch, None, True
        self.buffers.append(batch)
        self.busy[len(self.buffers) - 1] = 1
        return batch, (self.worker, len(self.buffers) - 1), True


def _batched(samples: Iterator[Sample], batch_size: int, buffers: _BatchBuffers | None = None,
             dtype: torch.dtype = torch.uint8) -> Iterator[_Batch]:
    """Collate in the worker: one IPC message per batch instead of one per sample.

    Images are stacked as they decode, B x H x W x 3 (a plain copy, where transposing
    each to 3 x H x W would cost a sample a good part of its decode), and the main
    process yields that memory as a B x 3 x H x W channels-last view. Stacking and
    flipping run in numpy on the whole batch: torch's uint8 copies cost several times
    more per 64x64 image. In a DataLoader worker the batch is built in a reused
    shared-memory buffer (_BatchBuffers). Labels travel as a numpy array: pickled by
    value, where a tensor would take a shared-memory block and a file-descriptor
    handover of its own. Latents (any shape) are stacked the same way into a buffer of
    `dtype` (float16; int64 for codes, widened from their stored dtype by the stack)."""
    while chunk := list(itertools.islice(samples, batch_size)):
        arrays, labels, keys, flips = zip(*chunk)
        shape = (len(arrays), *arrays[0].shape)
        batch, buffer, send = (buffers.take(shape, dtype) if buffers is not None
                               else (torch.empty(shape, dtype=dtype), None, True))
        images = batch.numpy()
        np.stack(arrays, out=images)
        if any(flips):
            mirrored = np.array(flips)
            images[mirrored] = images[mirrored][:, :, ::-1]
        yield _Batch(batch if send else None, np.array(labels, dtype=np.int64), list(keys),
                     buffer)


# ---------------------------------------------------------------- main process side

def _identity(item: Any) -> Any:
    return item


def _pin_memory() -> bool:
    """Pin batches (a pin thread copies each into page-locked memory) when CUDA is there."""
    return torch.cuda.is_available()


def _pinning() -> bool:
    # Looked up on the package, where `_pin_memory` is importable: replacing it there (as
    # the tests do, to pin without CUDA) is what the loader then follows.
    return sys.modules[__package__]._pin_memory()


class ShardLoader:
    """Iterable of `(images uint8 Bx3xHxW, labels int64 B, keys)`; built by make_loader.
    Over latent shards (`latent`: their LatentFormat, else None) the first item is the
    batch of latents as stored per sample: float16 B x C x h x w, or int64 codes.

    After a pass: `num_seen`, `num_skipped` (this rank) and `expected_total` (all ranks:
    the manifest's count, or max_samples, None without a manifest). `epoch_size` is T,
    the samples of one epoch over all ranks (train; eval: expected_total). Iterating a
    train loader again continues after the last batch it yielded; an eval loader keeps
    its DataLoader (and its workers) and reads every sample again.
    """

    def __init__(self, dataset: ShardReader, num_workers: int):
        self.dataset = dataset
        self.num_workers = num_workers
        self.manifest = dataset.shards.manifest
        self.image_size = dataset.image_size
        self.latent = dataset.latent
        self.expected_total = dataset.expected_total()
        self.num_seen = 0
        self.num_skipped = 0
        self._yielded = 0  # batches yielded over all passes: where a new DataLoader resumes
        self._eval_loader: DataLoader | None = None  # kept across passes (reuses_workers)
        # Worker buffers (worker, slot): their mapping here, and a weak reference to the
        # storage of the batch the caller may still hold in each.
        self._mapped: dict[tuple[int, int], torch.Tensor] = {}
        self._lent: dict[tuple[int, int], StorageWeakRef] = {}

    @property
    def epoch_size(self) -> int | None:
        """Samples per epoch over all ranks: the trainer's fractional epoch is the samples
        consumed over all ranks / epoch_size. Without a manifest a resampled train loader
        counts them on first use, reading every shard once."""
        return self.dataset.epoch_size()

    def _dataloader(self) -> DataLoader:
        if self._eval_loader is not None:
            return self._eval_loader
        workers = self.num_workers
        self._mapped, self._lent = {}, {}  # a new DataLoader: new workers, new buffers
        flags = (torch.zeros((workers, BUFFER_SLOTS), dtype=torch.uint8).share_memory_()
                 if workers else None)
        pinned = _pinning()
        dataset = dataclasses.replace(self.dataset.continued(self._yielded),
                                      buffer_flags=flags, pinned=pinned)
        reuse = self.dataset.reuses_workers
        # Our streams are seeded by (seed, rank, worker) alone; a private generator keeps the
        # DataLoader from drawing its base seed from the global torch RNG, which would shift
        # the training random numbers of a resumed run against an uninterrupted one.
        loader = DataLoader(dataset, batch_size=None, collate_fn=_identity, num_workers=workers,
                            generator=torch.Generator(), pin_memory=pinned,
                            prefetch_factor=PREFETCH if workers else None,
                            persistent_workers=workers > 0 and reuse)
        if reuse:
            self._eval_loader = loader
        return loader

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
        self.num_seen = self.num_skipped = 0
        loader = self._dataloader()
        for item in loader:
            self._reclaim(loader)
            if isinstance(item, _WorkerReport):
                if item.error is not None:
                    raise PipelineError(item.error)
                self.num_skipped += item.skipped
                continue
            images = self._lend(item, loader) if item.buffer is not None else item.images
            self.num_seen += len(item.keys)
            self._yielded += 1
            # B x H x W x 3 rows -> B x 3 x H x W, channels-last: no copy on the host.
            # Latents are stacked as stored (B x C x h x w): nothing to lay out.
            if self.latent is None:  # images: B x H x W x 3 rows in memory
                images = images.permute(0, 3, 1, 2)
            yield images, torch.from_numpy(item.labels), item.keys

    def _lend(self, item: _Batch, loader: DataLoader) -> torch.Tensor:
        """The batch in a worker's reused buffer, without a copy (see _BatchBuffers).

        The caller gets a tensor with a storage of its own over the buffer's memory;
        when that storage is gone (no batch tensor or view of it left) the buffer goes
        back to its worker."""
        buffer = tuple(item.buffer)
        if item.images is not None and item.images.is_pinned():
            self._give_back(loader, buffer)  # the pin thread's copy: the buffer is free
            return item.images
        if item.images is not None:  # a new buffer: keep its mapping for later batches
            self._mapped[buffer] = item.images
        images = torch.from_numpy(self._mapped[buffer].numpy())
        self._lent[buffer] = StorageWeakRef(images.untyped_storage())
        return images

    def _reclaim(self, loader: DataLoader) -> None:
        for buffer, storage in list(self._lent.items()):
            if storage.expired():
                self._give_back(loader, buffer)
                del self._lent[buffer]

    @staticmethod
    def _give_back(loader: DataLoader, buffer: Sequence[int]) -> None:
        worker, slot = buffer
        loader.dataset.buffer_flags[worker, slot] = 0
