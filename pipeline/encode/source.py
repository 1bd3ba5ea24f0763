"""Reading the source split for `pipeline encode`: one shard at a time, in batches that
never cross a shard's end.

Each output shard is the encoding of one source shard, so a batch holds consecutive
samples of one shard, cut at `batch_size` from the shard's start: a shard's latents are
then the same whichever process, reader worker or resume encodes it. Reader workers
(DataLoader processes) take whole shards, worker w the shards w, w + W, ...; the encoding
process keeps a writer per shard in progress. A shard's last piece says it is done and
how many samples could not be read (skipped with a ShardWarning, or raising with
on_error="raise"); errors travel as data, so the encoding process raises one clean
PipelineError instead of DataLoader's re-raised traceback.
"""
from __future__ import annotations

import itertools
import warnings
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..data import ShardSet, ShardWarning, decode_image, open_shard
from ..shards import check_key, iter_samples
from ..utils import PipelineError

READ_AHEAD = 2  # pieces each reader worker prepares ahead


@dataclass(frozen=True)
class SourceShard:
    index: int          # position in the source spec: the output shard's index too
    url: str
    count: int | None   # from the source manifest (None without one)

    @property
    def name(self) -> str:
        return Path(self.url).name


def source_shards(shards: ShardSet) -> list[SourceShard]:
    counts = shards.counts or (None,) * len(shards.urls)
    return [SourceShard(i, url, count) for i, (url, count) in enumerate(zip(shards.urls, counts))]


class Piece(NamedTuple):
    """Up to batch_size consecutive samples of one shard; `last`: the shard is done."""
    shard: int
    images: np.ndarray   # B x H x W x 3 uint8 (B may be 0 in a last piece)
    labels: list[int]
    keys: list[str]
    last: bool = False
    skipped: int = 0     # last piece: samples of the shard that could not be read
    error: str | None = None


class ShardPieces(IterableDataset):
    """The pieces of `shards` in order, whole shards per reader worker."""

    def __init__(self, shards: list[SourceShard], batch_size: int, image_size: int,
                 on_error: str):
        self.shards, self.batch_size = shards, batch_size
        self.image_size, self.on_error = image_size, on_error

    def __iter__(self) -> Iterator[Piece]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for shard in self.shards[worker::workers]:
            try:
                yield from self._pieces(shard)
            except PipelineError as error:
                yield Piece(shard.index, np.empty(0), [], [], last=True, error=str(error))
                return

    def _pieces(self, shard: SourceShard) -> Iterator[Piece]:
        reading = ReadShard(shard, self.image_size, self.on_error)
        samples = reading.samples()
        while chunk := list(itertools.islice(samples, self.batch_size)):
            images, labels, keys = zip(*chunk)
            yield Piece(shard.index, np.stack(images), list(labels), list(keys))
        empty = np.empty((0, self.image_size, self.image_size, 3), dtype=np.uint8)
        yield Piece(shard.index, empty, [], [], last=True, skipped=reading.skipped)


class ReadShard:
    """One source shard's decoded samples (image, label, key), counting what it skips."""

    def __init__(self, shard: SourceShard, image_size: int, on_error: str):
        self.shard, self.image_size, self.on_error = shard, image_size, on_error
        self.skipped = 0

    def samples(self) -> Iterator[tuple[np.ndarray, int, str]]:
        shard, read = self.shard, 0
        try:
            with closing(open_shard(shard.url)) as stream:
                for key, members in iter_samples(stream):
                    if read == shard.count:
                        raise PipelineError(f"shard {shard.url} holds more than the "
                                            f"{shard.count} samples its manifest lists: the "
                                            f"manifest is stale, re-run `pipeline prepare`")
                    read += 1
                    sample = self._decode(key, members)
                    if sample is not None:
                        yield sample
            if shard.count is not None and read < shard.count:
                raise ValueError(f"it ends after {read} samples; its manifest lists "
                                 f"{shard.count}")
        except (OSError, ValueError, EOFError) as error:  # TarFormatError is a ValueError
            lost = None if shard.count is None else shard.count - read
            self._fail(f"shard {shard.url}", error, lost)

    def _decode(self, key: str, members: dict[str, bytes]) -> tuple[np.ndarray, int, str] | None:
        try:
            check_key(key)
        except ValueError as error:
            raise PipelineError(f"shard {self.shard.url}: {error}; latent shards keep the "
                                f"source keys") from None
        try:
            image, label = decode_image(members), int(members["cls"])
        except Exception as error:  # noqa: BLE001 - PIL, libpng and numpy raise many types
            self._fail(f"sample {key} of shard {self.shard.url}", error, 1)
            return None
        if image.shape != (self.image_size, self.image_size, 3):
            raise PipelineError(f"shard {self.shard.url}: sample {key} is "
                                f"{image.shape[0]}x{image.shape[1]}, but the checkpoint "
                                f"encodes {self.image_size}x{self.image_size} images: encode "
                                f"shards prepared at {self.image_size} px")
        return image, label, key

    def _fail(self, what: str, error: Exception, lost: int | None) -> None:
        if self.on_error == "raise":
            raise PipelineError(f"cannot read {what}: {error} (--on-error warn skips it)")
        self.skipped += lost or 0
        amount = "an unknown number of" if lost is None else str(lost)
        warnings.warn(f"skipping {what}: {error}; {amount} samples lost", ShardWarning)


def read_pieces(shards: list[SourceShard], batch_size: int, image_size: int, on_error: str,
                num_workers: int) -> Iterator[Piece]:
    """The pieces of `shards`: in this process (num_workers=0) or from reader workers,
    whose pieces of different shards interleave (each shard's stay in order)."""
    dataset = ShardPieces(shards, batch_size, image_size, on_error)
    workers = min(num_workers, len(shards))
    if workers == 0:
        yield from dataset
        return
    loader = DataLoader(dataset, batch_size=None, collate_fn=_identity, num_workers=workers,
                        prefetch_factor=READ_AHEAD, generator=torch.Generator())
    yield from loader


def _identity(item):
    return item
