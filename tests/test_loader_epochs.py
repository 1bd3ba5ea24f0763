"""Exact epochs of the train loader, over generated shard sets, ranks x workers and resume points.

Most examples drive the per-worker stream (`TrainStream._train_batches`) directly, which
is what a DataLoader worker runs; `rank_batches` plays the DataLoader's part (batch b
from worker b % W). `test_simulated_ranks_match_real_worker_processes` checks that
premise against real worker processes, and tests/test_data.py runs 2 ranks x 2 workers
under torchrun. Shards are tiny 8x8 npy samples so hundreds of examples stay fast.
"""
from __future__ import annotations

import itertools
import json
import random
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import pipeline.data as data
from pipeline.data import make_loader, stream_segments
from pipeline.utils import PipelineError
from shardgen import write_counted_split

PROPERTY = settings(max_examples=200, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow])

shard_counts = st.lists(st.integers(0, 12), min_size=1, max_size=8)
ranks = st.integers(1, 2)
workers = st.integers(0, 4)
batch_sizes = st.integers(1, 5)


@pytest.fixture(scope="module")
def tiny_splits(tmp_path_factory):
    """counts -> split directory, each written once for the whole module."""
    root, made = tmp_path_factory.mktemp("tiny_splits"), {}

    def split_for(counts: Sequence[int]) -> Path:
        key = tuple(counts)
        if key not in made:
            made[key] = write_counted_split(root, key)
        return made[key]
    return split_for


def all_keys(counts: Sequence[int]) -> Counter:
    return Counter(f"s{i}n{j}" for i, count in enumerate(counts) for j in range(count))


def train_loader(split: Path, batch: int, rank: int, world: int, num_workers: int, **kw):
    kw = {"seed": 1, "shuffle_buffer": 4, "flip": True, **kw}
    return make_loader(split, batch, num_workers=num_workers, rank=rank, world_size=world, **kw)


def rank_batches(loader, steps: int) -> list[tuple[list[str], torch.Tensor]]:
    """The first `steps` (keys, images) a rank's loader yields, without worker processes:
    the DataLoader takes batch b from worker b % W."""
    per_rank = max(1, loader.num_workers)
    streams = [loader.dataset._train_batches(w, per_rank) for w in range(per_rank)]
    return [(batch.keys, batch.images) for batch in
            (next(streams[b % per_rank]) for b in range(steps))]


def stream_keys(loader, worker: int, samples: int) -> list[str]:
    """The first `samples` keys of one worker's stream."""
    batches = loader.dataset._train_batches(worker, max(1, loader.num_workers))
    keys = itertools.chain.from_iterable(batch.keys for batch in batches)
    return list(itertools.islice(keys, samples))


def share_length(total: int, stream: int, streams: int) -> int:
    """The lead's rule: stream s takes positions [s*T//S, (s+1)*T//S) of each epoch."""
    return (stream + 1) * total // streams - stream * total // streams


# ---------------------------------------------------------------- the plan

@PROPERTY
@given(counts=shard_counts, streams=st.integers(1, 8), data_=st.data())
def test_stream_segments_partition_every_epoch(counts, streams, data_):
    """Over all streams the segments cover each (shard, index) once, contiguously in the
    epoch's order; each share is floor or ceil of T/S samples."""
    order = data_.draw(st.permutations(range(len(counts))))
    total = sum(counts)
    covered: Counter = Counter()
    concatenated = [(shard, i) for shard in order for i in range(counts[shard])]
    for stream in range(streams):
        segments = stream_segments(counts, order, stream, streams)
        pieces = [(seg.shard, i) for seg in segments for i in range(seg.start, seg.stop)]
        assert all(seg.start < seg.stop <= counts[seg.shard] for seg in segments)
        assert len(pieces) == share_length(total, stream, streams)
        assert len(pieces) in (total // streams, -(-total // streams))
        start = stream * total // streams
        assert pieces == concatenated[start:start + len(pieces)]
        covered.update(pieces)
    assert covered == Counter(concatenated)


def test_epoch_order_is_the_same_everywhere_and_changes_by_epoch():
    orders = {data.epoch_order(5, epoch, 30) for epoch in range(4)}
    assert len(orders) == 4 and all(sorted(order) == list(range(30)) for order in orders)
    assert data.epoch_order(5, 2, 30) == data.epoch_order(5, 2, 30)


@PROPERTY
@given(sizes=st.lists(st.integers(0, 6), min_size=1, max_size=7), width=st.integers(1, 5),
       seed=st.integers(0, 9))
def test_interleave_keeps_each_source_in_order_and_loses_nothing(sizes, width, seed):
    sources = [(size, iter([(i, j) for j in range(size)])) for i, size in enumerate(sizes)]
    merged = list(data._interleaved(sources, width, random.Random(seed)))
    assert Counter(merged) == Counter((i, j) for i, size in enumerate(sizes) for j in range(size))
    for i, size in enumerate(sizes):
        assert [j for s, j in merged if s == i] == list(range(size))
    # At most `width` sources are open (begun and not done) at any point of the merge.
    spans = [(merged.index((i, 0)), merged.index((i, size - 1)))
             for i, size in enumerate(sizes) if size]
    assert all(sum(1 for first, last in spans if first <= t <= last) <= width
               for t in range(len(merged)))


# ---------------------------------------------------------------- exact epochs

@PROPERTY
@given(counts=shard_counts, world=ranks, num_workers=workers, batch=batch_sizes,
       epochs=st.integers(1, 3), interleave=st.integers(1, 4),
       shuffle=st.sampled_from([0, 3, 50]), seed=st.integers(0, 3))
def test_each_stream_shows_its_share_of_every_epoch_once(tiny_splits, counts, world,
                                                         num_workers, batch, epochs,
                                                         interleave, shuffle, seed):
    """Stream s's i-th run of L_s samples is its share of epoch i: L_s distinct samples,
    and the shares of all streams make up every sample exactly once, epoch after epoch."""
    total, per_rank = sum(counts), max(1, num_workers)
    streams = world * per_rank
    assume(total >= streams)
    split = tiny_splits(counts)
    by_epoch = [Counter() for _ in range(epochs)]
    for rank in range(world):
        loader = train_loader(split, batch, rank, world, num_workers, seed=seed,
                              shuffle_buffer=shuffle, interleave=interleave)
        for worker in range(per_rank):
            length = share_length(total, rank * per_rank + worker, streams)
            keys = stream_keys(loader, worker, epochs * length)
            assert len(keys) == epochs * length  # endless: never runs dry
            for epoch in range(epochs):
                share = keys[epoch * length:(epoch + 1) * length]
                assert len(set(share)) == length
                by_epoch[epoch].update(share)
    assert all(seen == all_keys(counts) for seen in by_epoch)


@PROPERTY
@given(counts=shard_counts, world=ranks, num_workers=workers, batch=batch_sizes,
       steps=st.integers(1, 30), interleave=st.integers(1, 4))
def test_all_ranks_pooled_see_every_sample_once_per_epoch(tiny_splits, counts, world,
                                                          num_workers, batch, steps, interleave):
    """Every rank takes `steps` full batches; pooled, each sample is seen E_lo..E_hi times.

    Bound: stream s (rank r, worker w) has yielded m_s = |range(w, steps, W)| * B samples:
    its shares of epochs 0, 1, ... in turn, each L_s in {floor(T/S), ceil(T/S)} long.
    Every epoch holds each sample once, in exactly one stream's share. So a sample is
    seen at least E_lo = min_s floor(m_s / L_s) times (the epochs every stream finished)
    and at most E_hi = max_s ceil(m_s / L_s) times (the epochs some stream began), and
    the samples seen more than E_lo times are at most sum_s (m_s - E_lo * L_s): the ones
    the streams took past epoch E_lo, at the ends of their runs. The streams drift apart
    by at most one batch (workers) plus one sample per epoch (shares of unequal length),
    so E_hi - E_lo stays 1 (or 0) while that drift is shorter than a share.
    """
    total, per_rank = sum(counts), max(1, num_workers)
    streams = world * per_rank
    assume(total >= streams)
    split = tiny_splits(counts)
    pooled: Counter = Counter()
    for rank in range(world):
        batches = rank_batches(train_loader(split, batch, rank, world, num_workers,
                                            interleave=interleave), steps)
        assert len(batches) == steps and all(len(keys) == batch for keys, _ in batches)
        pooled.update(key for keys, _ in batches for key in keys)
    consumed = {s: len(range(s % per_rank, steps, per_rank)) * batch for s in range(streams)}
    lengths = {s: share_length(total, s, streams) for s in range(streams)}
    lowest = min(consumed[s] // lengths[s] for s in range(streams))
    highest = max(-(-consumed[s] // lengths[s]) for s in range(streams))
    seen = [pooled[key] for key in all_keys(counts)]
    assert set(pooled) <= set(all_keys(counts))
    assert sum(pooled.values()) == world * steps * batch
    assert lowest <= min(seen) and max(seen) <= highest
    past_lowest = sum(consumed[s] - lowest * lengths[s] for s in range(streams))
    assert sum(1 for count in seen if count > lowest) <= past_lowest


@PROPERTY
@given(counts=shard_counts, world=ranks, num_workers=workers, batch=batch_sizes,
       start=st.integers(0, 40), more=st.integers(1, 4), rank_pick=st.integers(0, 1),
       interleave=st.integers(1, 4))
def test_resumed_rank_continues_the_uninterrupted_one(tiny_splits, counts, world, num_workers,
                                                      batch, start, more, rank_pick, interleave):
    """start_batch=k yields batches k, k+1, ... of the uninterrupted loader: same keys,
    same pixels (so the same flips), across epoch boundaries."""
    total, per_rank = sum(counts), max(1, num_workers)
    assume(total >= world * per_rank)
    split, rank = tiny_splits(counts), rank_pick % world
    kw = dict(interleave=interleave, shuffle_buffer=5)
    full = rank_batches(train_loader(split, batch, rank, world, num_workers, **kw), start + more)
    resumed = rank_batches(train_loader(split, batch, rank, world, num_workers,
                                        start_batch=start, **kw), more)
    assert [keys for keys, _ in resumed] == [keys for keys, _ in full[start:]]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(resumed, full[start:]))


@PROPERTY
@given(counts=shard_counts, world=st.integers(1, 3), num_workers=workers,
       limit=st.none() | st.integers(1, 60))
def test_eval_yields_each_sample_exactly_once(tiny_splits, counts, world, num_workers, limit):
    """Eval slots (rank x worker) split by shard or, with fewer shards, by sample;
    `max_samples` keeps the first M in manifest order."""
    split, per_rank = tiny_splits(counts), max(1, num_workers)
    slots = world * per_rank
    keys: Counter = Counter()
    for rank in range(world):
        loader = make_loader(split, 4, mode="eval", num_workers=num_workers, rank=rank,
                             world_size=world, max_samples=limit)
        for worker in range(per_rank):
            samples = loader.dataset._eval_samples(rank * per_rank + worker, slots)
            keys.update(key for _, _, key, _ in samples)
    expected = list(all_keys(counts))[:limit]
    assert keys == Counter(expected)
    assert loader.expected_total == len(expected) == loader.epoch_size


def test_simulated_ranks_match_real_worker_processes(tiny_splits):
    """The DataLoader with 2 worker processes yields what rank_batches simulates, also
    when it resumes (worker 0 then plays the stream of batch start_batch)."""
    split = tiny_splits((7, 0, 5, 9, 2))
    for start in (0, 5):
        real = list(itertools.islice(train_loader(split, 3, 1, 2, 2, start_batch=start), 12))
        simulated = rank_batches(train_loader(split, 3, 1, 2, 2, start_batch=start), 12)
        assert [keys for _, _, keys in real] == [keys for keys, _ in simulated]
        assert all(torch.equal(images, sim.permute(0, 3, 1, 2))
                   for (images, _, _), (_, sim) in zip(real, simulated))


# ---------------------------------------------------------------- fixed cases

def test_one_epoch_of_batches_holds_every_sample_once(tiny_splits):
    """21 shards x 8, 2 ranks x 2 workers, batch 3: 28 steps a rank are one epoch (4
    shares of 42), which holds every sample once; resampling shards per stream repeats
    some and misses others."""
    counts = (8,) * 21

    def pooled_keys(**kw) -> Counter:
        pooled: Counter = Counter()
        for rank in range(2):
            batches = rank_batches(train_loader(tiny_splits(counts), 3, rank, 2, 2, **kw), 28)
            pooled.update(key for keys, _ in batches for key in keys)
        return pooled
    assert pooled_keys() == all_keys(counts)
    resampled = pooled_keys(sampling="resampled")
    assert sum(resampled.values()) == 168 and len(resampled) < 168


def test_fewer_samples_than_streams_is_a_clear_error(tiny_splits):
    split = tiny_splits((2, 1))
    with pytest.raises(PipelineError, match=r"3 samples .* 2 rank\(s\) x 2 worker\(s\) = 4 "
                                            r"streams.*fewer DataLoader workers or ranks"):
        make_loader(split, 2, num_workers=2, rank=0, world_size=2)
    assert len(rank_batches(train_loader(split, 2, 0, 2, 2, sampling="resampled"), 3)) == 3
    with pytest.raises(PipelineError, match="hold no samples"):
        make_loader(tiny_splits((0, 0)), 2, num_workers=0)


@pytest.mark.parametrize("kwargs,message", [
    (dict(sampling="random"), "sampling must be one of"),
    (dict(interleave=0), "interleave must be an integer >= 1"),
    (dict(interleave=2.5), "interleave must be an integer >= 1")])
def test_bad_sampling_arguments_are_pipeline_errors(tiny_splits, kwargs, message):
    with pytest.raises(PipelineError, match=message):
        make_loader(tiny_splits((4, 4)), 2, num_workers=0, **kwargs)


def test_epoch_size_is_the_samples_of_one_epoch_over_all_ranks(tiny_splits, tmp_path):
    split = tiny_splits((4, 0, 7))
    assert make_loader(split, 2, num_workers=0, rank=1, world_size=2).epoch_size == 11
    assert make_loader(split, 2, num_workers=0, sampling="resampled").epoch_size == 11
    # Without a manifest the shards are counted by reading them.
    spec = []
    for shard in sorted(split.glob("*.tar")):
        spec.append(str(tmp_path / shard.name))
        Path(spec[-1]).write_bytes(shard.read_bytes())
    for sampling in ("exact", "resampled"):
        loader = make_loader(spec, 2, num_workers=0, sampling=sampling)
        assert loader.expected_total is None and loader.epoch_size == 11


@pytest.mark.parametrize("start_batch", [3, 9, 11])
def test_exact_resume_decodes_nothing_it_skips(tiny_splits, monkeypatch, start_batch):
    """One stream, epochs of 11 samples, batches of 3: resumed inside the first epoch
    (9 samples in), inside the third (27) and exactly at an epoch boundary (33)."""
    decoded = []
    real_decode = data.decode_image
    monkeypatch.setattr(data, "decode_image", lambda m: decoded.append(1) or real_decode(m))
    split = tiny_splits((4, 0, 7))
    full = rank_batches(train_loader(split, 3, 0, 1, 0), start_batch + 2)
    decoded.clear()
    resumed = rank_batches(train_loader(split, 3, 0, 1, 0, start_batch=start_batch), 2)
    assert [keys for keys, _ in resumed] == [keys for keys, _ in full[start_batch:]]
    assert len(decoded) == 6


def test_batches_draw_from_several_shards_at_once(tiny_splits):
    """interleave=4 keeps 4 shards of a stream's share open, so a batch of 8 mixes ~4
    shards; resampling fills the shuffle buffer one shard at a time."""
    split = tiny_splits((9,) * 12)

    def shards_per_batch(**kw) -> float:
        batches = rank_batches(train_loader(split, 8, 0, 1, 0, shuffle_buffer=0, **kw), 13)
        return float(np.mean([len({key.split("n")[0] for key in keys}) for keys, _ in batches]))
    assert shards_per_batch(interleave=4) >= 3.5
    assert shards_per_batch(interleave=1) <= 2
    assert shards_per_batch(sampling="resampled") <= 2


def test_a_stream_whose_share_is_unreadable_raises_instead_of_hanging(tmp_path):
    """One shard whose manifest lists 10 samples but which holds 5: rank 0's share
    [0, 5) reads fine; rank 1's share [5, 10) is gone every epoch (its 5 samples counted
    lost, the 5 before its start read but not its loss), so it raises after 2S epochs
    instead of leaving rank 0 waiting forever."""
    split = write_counted_split(tmp_path, (5,))
    manifest = json.loads((split / "manifest.json").read_text())
    manifest["shards"][0]["num_samples"] = manifest["num_samples"] = 10
    (split / "manifest.json").write_text(json.dumps(manifest))
    healthy = rank_batches(train_loader(split, 2, 0, 2, 0), 10)
    assert Counter(key for keys, _ in healthy for key in keys) == Counter(
        {f"s0n{j}": 4 for j in range(5)})
    with pytest.warns(data.ShardWarning, match=r"ends after 5 samples.*5 samples lost"), \
            pytest.raises(PipelineError, match=r"no readable sample in 4 epochs of stream 1"):
        list(itertools.islice(train_loader(split, 2, 1, 2, 0), 1))
