"""The per-worker sample streams behind the loader: a shared reader, the train stream and the
eval stream.

Streams are numbered over all ranks and DataLoader workers: stream = rank x W + worker.

`TrainStream` is endless per stream, and the trainer's step count alone decides the end.
With `sampling="exact"` (the default) every epoch shows each sample once: stream s takes
its share of epoch e (see `epochs`), and a stream that finishes its share goes on with
its share of epoch e+1, so none runs dry. The share's segments are mixed `interleave` at
a time into a shuffle buffer that is drained at the end of the epoch.
`sampling="resampled"` is the earlier scheme: round r of stream s reads one shard chosen
by a seeded shuffle of ALL shards (a fresh order every pass), through a shuffle buffer
drained at the end of each round; streams draw shards with replacement, so an epoch's
worth of batches repeats some samples and misses others.
Either way an epoch's (or round's) content depends only on (seed, stream, epoch or
round), so resuming at a batch index skips whole epochs (rounds) by arithmetic on the
per-shard counts, and within one reads but never decodes the samples it skips.

`EvalStream` yields every sample exactly once across all ranks and workers ("slots"):
shards round-robin over slots when there are enough of them, otherwise every slot reads
all shards and keeps the samples whose global index falls on it. A corrupt shard or
sample is skipped with a ShardWarning and counted, so `num_seen + num_skipped` summed
over ranks equals the manifest's count (or it raises, with on_error="raise").

Latent shards (`latent`: the LatentFormat of their manifest) go through the same
streams, plans and checks; a sample is then its latent member as stored, not an image.
"""
from __future__ import annotations

import dataclasses
import itertools
import random
import sys
import warnings
from contextlib import closing
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from ..shards import TarFormatError, iter_samples
from ..utils import PipelineError
from .decode import npy_array
from .epochs import (Segment, _interleaved, _shard_order, _shuffled, check_streams,
                     count_samples, epoch_order, stream_segments, stream_share)
from .handover import _Batch, _BatchBuffers, _batched, _WorkerReport
from .latents import LatentFormat
from .spec import ShardSet, ShardWarning, open_shard

# A decoded sample: (image H x W x 3 or latent as stored, label, key, mirror it?)
Sample = tuple[np.ndarray, int, str, bool]
# A sample read but not decoded: (shard url, key, members, mirror it?)
Raw = tuple[str, str, dict[str, bytes], bool]


@dataclass
class _WorkerState:
    skipped: int = 0
    image_size: int | None = None  # from the manifest, else fixed by the first image


def _worker_slot() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def _decode_image(members: dict[str, bytes]) -> np.ndarray:
    # `pipeline.data.decode_image` is the decoder's public name: looked up there at each
    # call, so replacing it on the package (tests count decodes that way) replaces it here.
    return sys.modules[__package__].decode_image(members)


def _samples_lost(read: int, limit: int | None, share: tuple[int, int, int] | None) -> int | None:
    """This worker's samples after the first `read` of a shard (None: unknown count).

    With `share=(slot, slots, start)` the worker owns only the global indices
    `start + i` with `(start + i) % slots == slot`."""
    if limit is None:
        return None
    if share is None:
        return limit - read
    slot, slots, start = share
    first = start + read + (slot - start - read) % slots
    return len(range(first, start + limit, slots))


@dataclass(kw_only=True)
class ShardReader(IterableDataset):
    """What both streams share: reading shards, decoding samples, skipping and counting
    corrupt ones, and a worker's batches with its final _WorkerReport."""
    mode: ClassVar[str]
    reuses_workers: ClassVar[bool]  # one DataLoader (persistent workers) for every pass
    shards: ShardSet
    batch_size: int
    rank: int = 0
    world_size: int = 1
    on_error: str = "warn"
    image_size: int | None = None
    latent: LatentFormat | None = None  # latent shards: what each sample holds (else images)
    buffer_flags: torch.Tensor | None = None  # shared busy flags of the workers' buffers
    pinned: bool = False  # the DataLoader pins batches: send every batch to its pin thread
    _state: _WorkerState = field(default_factory=_WorkerState, init=False, repr=False)
    _buffers: _BatchBuffers | None = field(default=None, init=False, repr=False)

    def __iter__(self) -> Iterator[_Batch | _WorkerReport]:
        worker, num_workers = _worker_slot()
        self._state = _WorkerState(image_size=self.image_size)
        try:
            yield from self._batches(worker, num_workers)
        except PipelineError as error:
            yield _WorkerReport(self._state.skipped, str(error))
            return
        yield _WorkerReport(self._state.skipped, None)

    def _batches(self, worker: int, num_workers: int) -> Iterator[_Batch]:
        raise NotImplementedError

    def continued(self, batches: int) -> ShardReader:
        """The stream for a new DataLoader, after `batches` yielded by earlier ones."""
        return self

    def expected_total(self) -> int | None:
        """Samples of a whole pass over all ranks (None: unknown without a manifest)."""
        return self.shards.total

    def epoch_size(self) -> int | None:
        return self.expected_total()

    @property
    def batch_dtype(self) -> torch.dtype:
        return torch.uint8 if self.latent is None else self.latent.batch_dtype

    def _batch_buffers(self, worker: int) -> _BatchBuffers | None:
        """This worker's buffers; kept across passes, as persistent (eval) workers live on."""
        if self._buffers is None and self.buffer_flags is not None and get_worker_info():
            self._buffers = _BatchBuffers(self.buffer_flags, worker,
                                          send_always=self.pinned)
        return self._buffers

    def _read(self, url: str, count: int | None, limit: int | None,
              share: tuple[int, int, int] | None = None, first: int = 0
              ) -> Iterator[tuple[int, str, dict[str, bytes]]]:
        """(index in shard, key, members) from `first` up to `limit`; a read error ends
        the shard. The samples before `first` are read (tar headers and data) but never
        yielded, so nothing decodes them.

        The samples a failing shard takes with it are counted as skipped (or the error
        raises): all of the rest in [first, limit), or with `share=(slot, slots, start)`
        only those whose global index `start + i` falls on this slot."""
        index = 0
        try:
            with closing(open_shard(url)) as stream:
                for key, members in iter_samples(stream):
                    if index == limit:
                        if limit == count:
                            raise PipelineError(f"shard {url} holds more than the {count} samples "
                                                f"its manifest lists: the manifest is stale, "
                                                f"re-run `pipeline prepare`")
                        return
                    if index >= first:
                        yield index, key, members
                    index += 1
            if limit is not None and index < limit:
                raise TarFormatError(f"it ends after {index} samples; its manifest lists {count}")
        except (OSError, ValueError, EOFError) as error:  # TarFormatError is a ValueError
            self._fail(f"shard {url}", error, _samples_lost(max(index, first), limit, share))

    def _fail(self, what: str, error: Exception, lost: int | None) -> None:
        if self.on_error == "raise":
            raise PipelineError(f"cannot read {what}: {error} "
                                f"(on_error='warn' skips it)") from error
        self._state.skipped += lost or 0
        amount = "an unknown number of" if lost is None else str(lost)
        warnings.warn(f"skipping {what}: {error}; {amount} samples lost", ShardWarning)

    def _decode(self, url: str, key: str, members: dict[str, bytes],
                flip: bool = False) -> Sample | None:
        if self.latent is not None:
            return self._decode_latent(url, key, members)
        try:
            image, label = _decode_image(members), int(members["cls"])
        except Exception as error:  # noqa: BLE001 - PIL, libpng and numpy raise many types
            self._fail(f"sample {key} of shard {url}", error, 1)
            return None
        size = self._state.image_size or image.shape[1]
        self._state.image_size = size
        if image.shape[:2] != (size, size):
            height, width = image.shape[:2]
            raise PipelineError(f"shard {url}: sample {key} is {height}x{width}, but this shard "
                                f"set is {size}x{size}: mixed resolutions; "
                                f"re-run `pipeline prepare` for this shard")
        return image, label, key, flip

    def _decode_latent(self, url: str, key: str, members: dict[str, bytes]) -> Sample | None:
        """A latent sample as its manifest declares it; a sample of another shape or
        dtype means the shard is not the manifest's (never flipped: see make_train_loader)."""
        fmt = self.latent
        try:
            if fmt.member not in members:
                raise ValueError(f"no {fmt.member} member in {sorted(members)}")
            latent, label = npy_array(members[fmt.member]), int(members["cls"])
        except Exception as error:  # noqa: BLE001 - as for images: counted and skipped
            self._fail(f"sample {key} of shard {url}", error, 1)
            return None
        if latent.shape != fmt.shape or latent.dtype != fmt.dtype:
            raise PipelineError(f"shard {url}: sample {key} holds a {latent.dtype} latent of "
                                f"shape {latent.shape}, but its manifest declares {fmt.dtype} "
                                f"{fmt.shape}: the shard and manifest are of different "
                                f"`pipeline encode` runs; re-run it")
        return latent, label, key, False


@dataclass(kw_only=True)
class EvalStream(ShardReader):
    """Every sample once over all slots (rank x worker); `max_samples` keeps the first M
    in manifest order."""
    mode: ClassVar[str] = "eval"
    reuses_workers: ClassVar[bool] = True
    max_samples: int | None = None

    def expected_total(self) -> int | None:
        total = self.shards.total
        return total if total is None or self.max_samples is None else min(total, self.max_samples)

    def _batches(self, worker: int, num_workers: int) -> Iterator[_Batch]:
        slot, slots = self.rank * num_workers + worker, self.world_size * num_workers
        return _batched(self._eval_samples(slot, slots), self.batch_size,
                        self._batch_buffers(worker), self.batch_dtype)

    def _eval_plan(self) -> list[tuple[str, int | None, int | None, int | None]]:
        """(url, count, limit, global index of its first sample) of the shards to evaluate."""
        counts = self.shards.counts
        if counts is None:
            return [(url, None, None, None) for url in self.shards.urls]
        budget = self.max_samples if self.max_samples is not None else sum(counts)
        plan, start = [], 0
        for url, count in zip(self.shards.urls, counts):
            if start >= budget:
                break
            plan.append((url, count, min(count, budget - start), start))
            start += count
        return plan

    def _eval_samples(self, slot: int, slots: int) -> Iterator[Sample]:
        plan = self._eval_plan()
        by_shard = len(plan) >= slots
        next_start = 0  # global index when the manifest gives none: all slots read in order
        for url, count, limit, start in (plan[slot::slots] if by_shard else plan):
            start = next_start if start is None else start
            share = None if by_shard else (slot, slots, start)
            read = 0
            for index, key, members in self._read(url, count, limit, share):
                read = index + 1
                if by_shard or (start + index) % slots == slot:
                    sample = self._decode(url, key, members)
                    if sample is not None:
                        yield sample
            next_start = start + read


@dataclass(kw_only=True)
class TrainStream(ShardReader):
    """Endless, deterministic in (seed, stream), resumable at `start_batch`; two strategies
    (`sampling`): exact epochs, or shards resampled per stream."""
    mode: ClassVar[str] = "train"
    reuses_workers: ClassVar[bool] = False
    seed: int = 0
    start_batch: int = 0
    shuffle_buffer: int = 2000
    flip: bool = False
    sampling: str = "exact"
    interleave: int = 4  # exact: segments of a stream's share open (mixed) at once
    sample_counts: tuple[int, ...] | None = None  # per shard, to plan epochs (epoch_counts)

    def continued(self, batches: int) -> TrainStream:
        return dataclasses.replace(self, start_batch=self.start_batch + batches)

    def epoch_size(self) -> int:
        return sum(self.epoch_counts())

    def epoch_counts(self) -> tuple[int, ...]:
        """Samples per shard that epochs (and resume points) are planned from: the
        manifest's, else counted by reading every shard once (make_loader does that in
        the main process for exact epochs, so workers inherit the counts)."""
        if self.sample_counts is None:
            self.sample_counts = (self.shards.counts if self.shards.counts is not None
                                  else count_samples(self.shards.urls))
        return self.sample_counts

    def _batches(self, worker: int, num_workers: int) -> Iterator[_Batch]:
        return self._train_batches(worker, num_workers)

    def _train_batches(self, worker: int, num_workers: int) -> Iterator[_Batch]:
        # The DataLoader takes batch b from worker b % W. A resumed loader starts again
        # at worker 0, so worker w plays the stream that produced batch start_batch + w.
        stream = (self.start_batch + worker) % num_workers
        own_batches_done = len(range(stream, self.start_batch, num_workers))
        stream_index, skip = self.rank * num_workers + stream, own_batches_done * self.batch_size
        if self.sampling == "exact":
            samples = self._exact_samples(stream_index, num_workers, skip)
        else:
            samples = self._resampled_samples(stream_index, skip)
        return _batched(samples, self.batch_size, self._batch_buffers(worker), self.batch_dtype)

    def _endless(self, part: Callable[[int], Iterator[Raw]], first: int, skip: int,
                 give_up: int, failure: Callable[[int], str]) -> Iterator[Sample]:
        """Decode `part(first)`, `part(first + 1)`, ... (epochs or rounds), the first
        `skip` samples only read: skipped samples still pass the mixing, the shuffle
        buffer and their flip draw, but are never decoded. `give_up` parts in a row
        without a readable sample raise PipelineError(failure(parts)) instead of hanging."""
        empty_parts = 0
        for index in itertools.count(first):
            produced = False
            for url, key, members, flip in itertools.islice(part(index), skip, None):
                sample = self._decode(url, key, members, flip)
                if sample is not None:
                    produced = True
                    yield sample
            skip = 0
            empty_parts = 0 if produced else empty_parts + 1
            if empty_parts >= give_up:
                raise PipelineError(failure(empty_parts))

    def _flip_draws(self, raw: Iterator[tuple[str, str, dict[str, bytes]]],
                    rng: random.Random) -> Iterator[Raw]:
        return ((url, key, members, self.flip and rng.random() < 0.5)
                for url, key, members in raw)

    # exact epochs

    def _exact_samples(self, stream: int, num_workers: int, skip: int) -> Iterator[Sample]:
        """Stream s's share of epoch after epoch, starting `skip` samples in."""
        counts, streams = self.epoch_counts(), self.world_size * num_workers
        check_streams(sum(counts), self.world_size, num_workers, self.shards.urls[0])
        # Every epoch gives a stream a share of the same length: skip whole epochs by it.
        first_epoch, skip = divmod(skip, len(stream_share(sum(counts), stream, streams)))

        def failure(empty_epochs: int) -> str:
            return (f"no readable sample in {empty_epochs} epochs of stream {stream}'s share "
                    f"of the {len(counts)} shards (first: {self.shards.urls[0]}); see the "
                    f"warnings, and repair or re-prepare the shards")
        # 2S epochs of one stream's share are as much reading as two passes over all
        # the shards: by then its share of them is unreadable, not unlucky.
        yield from self._endless(lambda epoch: self._epoch_share(stream, streams, epoch),
                                 first_epoch, skip, 2 * streams, failure)

    def _epoch_share(self, stream: int, streams: int, epoch: int) -> Iterator[Raw]:
        """Epoch e of stream s: the raw samples of its share, `interleave` segments mixed
        at a time, through the shuffle buffer (drained at the epoch's end), each with a
        flip draw. Seeded by (seed, stream, epoch) alone, so a resumed stream can rebuild
        any epoch without knowing what came before it."""
        counts = self.epoch_counts()
        order = epoch_order(self.seed, epoch, len(counts))
        segments = stream_segments(counts, order, stream, streams)
        tag = f"{self.seed}/{stream}/{epoch}"
        mixed = _interleaved(((seg.stop - seg.start, self._segment(seg)) for seg in segments),
                             self.interleave, random.Random(f"epoch-mix/{tag}"))
        shuffled = _shuffled(mixed, self.shuffle_buffer, random.Random(f"epoch-shuffle/{tag}"))
        return self._flip_draws(shuffled, random.Random(f"epoch-flip/{tag}"))

    def _segment(self, segment: Segment) -> Iterator[tuple[str, str, dict[str, bytes]]]:
        url, count = self.shards.urls[segment.shard], self.epoch_counts()[segment.shard]
        # Nothing is opened until the mixing draws the segment's first sample.
        return ((url, key, members) for _, key, members
                in self._read(url, count, segment.stop, first=segment.start))

    # resampled shards

    def _resampled_samples(self, stream: int, skip: int) -> Iterator[Sample]:
        first_round, skip = self._first_round(stream, skip) if skip else (0, 0)
        shards = len(self.shards.urls)

        def failure(_: int) -> str:
            return (f"no readable sample in any of the {shards} shards (first: "
                    f"{self.shards.urls[0]}); see the warnings")
        # 2N consecutive rounds contain one full pass over all N shards.
        yield from self._endless(lambda round_index: self._round(stream, round_index),
                                 first_round, skip, 2 * shards, failure)

    def _round_shard(self, stream: int, round_index: int) -> int:
        pass_index, position = divmod(round_index, len(self.shards.urls))
        return _shard_order(self.seed, stream, pass_index, len(self.shards.urls))[position]

    def _first_round(self, stream: int, skip: int) -> tuple[int, int]:
        """Skip whole rounds by their sample counts: (first round to read, samples to drop)."""
        counts = self.epoch_counts()
        if sum(counts) == 0:
            raise PipelineError(f"the shards {self.shards.urls[0]}... hold no samples")
        round_index = 0
        while skip >= counts[self._round_shard(stream, round_index)]:
            skip -= counts[self._round_shard(stream, round_index)]
            round_index += 1
        return round_index, skip

    def _round(self, stream: int, round_index: int) -> Iterator[Raw]:
        """Round r of a train stream: its shard's raw samples, shuffled, each with a flip draw.

        Everything is seeded by (seed, stream, round) alone, so a resumed stream can
        rebuild any round without knowing what came before it."""
        shard = self._round_shard(stream, round_index)
        url = self.shards.urls[shard]
        count = None if self.shards.counts is None else self.shards.counts[shard]
        shuffle_rng = random.Random(f"shuffle/{self.seed}/{stream}/{round_index}")
        flip_rng = random.Random(f"flip/{self.seed}/{stream}/{round_index}")
        raw = ((url, key, members) for _, key, members in self._read(url, count, count))
        return self._flip_draws(_shuffled(raw, self.shuffle_buffer, shuffle_rng), flip_rng)


# The name of the single stream class these two replace: a type for annotations and
# isinstance checks (construct a TrainStream or an EvalStream).
ShardStream = ShardReader
