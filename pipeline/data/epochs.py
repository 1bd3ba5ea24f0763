"""The train stream's plan: which samples each stream reads in which epoch, and how it mixes them.

Exact epochs: epoch e concatenates the shards in `epoch_order(seed, e, N)`, a permutation
seeded by (seed, e) alone and so the same on every rank and worker, and stream s of S
takes the positions `stream_share(T, s, S)` = [s*T//S, (s+1)*T//S) of those T samples:
`stream_segments` turns that share into whole shards in the middle and parts of shards at
its two ends. Shares differ by at most one sample, so ranks stay in step. Within its share a
stream keeps `interleave` segments open and draws each next sample from a random one of
them (`_interleaved`), then through a shuffle buffer (`_shuffled`). Resampled streams walk
their own per-pass shuffle of all shards instead (`_shard_order`).
"""
from __future__ import annotations

import functools
import itertools
import random
from contextlib import closing
from typing import Any, Iterable, Iterator, NamedTuple, Sequence

from ..shards import iter_samples
from ..utils import PipelineError
from .spec import open_shard


class Segment(NamedTuple):
    """The samples [start, stop) of shard number `shard` (an index into ShardSet.urls)."""
    shard: int
    start: int
    stop: int


@functools.lru_cache(maxsize=4)
def epoch_order(seed: int, epoch: int, num_shards: int) -> tuple[int, ...]:
    """The shard order of exact epoch `epoch`: seeded by (seed, epoch) alone, so every
    rank and worker derives the same one without talking to the others."""
    order = list(range(num_shards))
    random.Random(f"epoch/{seed}/{epoch}").shuffle(order)
    return tuple(order)


def stream_share(total: int, stream: int, streams: int) -> range:
    """Positions [s*T//S, (s+1)*T//S) of an epoch's T samples: stream s's share, floor or
    ceil of T/S samples, every position in exactly one stream's share."""
    return range(stream * total // streams, (stream + 1) * total // streams)


def stream_segments(counts: Sequence[int], order: Sequence[int], stream: int,
                    streams: int) -> list[Segment]:
    """Stream s's share of an epoch whose shards are concatenated in `order`, as the
    pieces of shards it covers: whole shards, and partial ones at its two ends."""
    share = stream_share(sum(counts), stream, streams)
    segments, offset = [], 0
    for shard in order:
        if offset >= share.stop:
            break
        start, stop = max(share.start, offset), min(share.stop, offset + counts[shard])
        if start < stop:
            segments.append(Segment(shard, start - offset, stop - offset))
        offset += counts[shard]
    return segments


def count_samples(urls: Sequence[str]) -> tuple[int, ...]:
    """Samples per shard by reading (not decoding) every shard once: for shards without a
    manifest, whose epochs (and resume points) must still be planned from counts."""
    counts = []
    for url in urls:
        with closing(open_shard(url)) as stream:
            counts.append(sum(1 for _ in iter_samples(stream)))
    return tuple(counts)


def check_streams(total: int, world_size: int, workers: int, first_url: str) -> None:
    """Exact epochs need a sample for every stream; fewer would leave a stream empty."""
    streams = world_size * workers
    if total == 0:
        raise PipelineError(f"the shards {first_url}... hold no samples: point the spec at "
                            f"a split that `pipeline prepare` wrote samples to")
    if total < streams:
        raise PipelineError(f"exact epochs deal the {total} samples of the shards "
                            f"{first_url}... to {world_size} rank(s) x {workers} worker(s) = "
                            f"{streams} streams, more streams than samples: use fewer "
                            f"DataLoader workers or ranks (or sampling='resampled')")


def _interleaved(sources: Iterable[tuple[int, Iterator[Any]]], width: int,
                 rng: random.Random) -> Iterator[Any]:
    """Merge `sources`, pairs (planned size, items), with up to `width` of them open.

    Each next item comes from an open source drawn at random, weighted by what it has
    left, so the open sources run out together (a uniformly random merge) and a batch
    mixes all of them. A source that is done, or ends early (a read error), makes room
    for the next one; one planned empty is skipped."""
    pending = ((left, items) for left, items in sources if left > 0)
    opened = [[left, items] for left, items in itertools.islice(pending, width)]
    total = sum(left for left, _ in opened)
    while opened:
        slot = 0
        if len(opened) > 1:
            pick = int(rng.random() * total)  # cheaper per item than rng.randrange
            while pick >= opened[slot][0]:
                pick -= opened[slot][0]
                slot += 1
        source = opened[slot]
        for item in source[1]:
            source[0] -= 1
            total -= 1
            yield item
            if source[0]:
                break
            # Let the reader finish: it checks the shard's end (a stale count) and closes it.
            for _ in source[1]:
                pass
        else:
            total -= source[0]  # ended early: what it still owed will never come
            source[0] = 0
        if source[0] == 0:
            del opened[slot]
            for left, items in itertools.islice(pending, 1):
                opened.append([left, items])
                total += left


def _shuffled(items: Iterator[Any], buffer_size: int, rng: random.Random) -> Iterator[Any]:
    """Shuffle through a buffer of `buffer_size`, draining it when `items` ends."""
    if buffer_size <= 1:
        yield from items
        return
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        index = rng.randrange(buffer_size)
        buffer[index], item = item, buffer[index]
        yield item
    rng.shuffle(buffer)
    yield from buffer


@functools.lru_cache(maxsize=4)
def _shard_order(seed: int, stream: int, pass_index: int, num_shards: int) -> tuple[int, ...]:
    """Resampled streams: pass p of stream s over all shards, in an order of its own."""
    order = list(range(num_shards))
    random.Random(f"order/{seed}/{stream}/{pass_index}").shuffle(order)
    return tuple(order)
