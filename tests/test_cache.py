"""The device-resident train data (`--data.cache`), on CPU: the rank parts, exact epochs,
resume, flips, filling from shards (workers, corrupt samples, the memory check before
reading), and the trainer: a resumed cached run equals an uninterrupted one.

The epoch/resume properties run on in-memory caches of generated sizes; filling uses tiny
8x8 npy shards, so each example stays fast.
"""
from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Sequence

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import pipeline.data as data
from pipeline import train
from pipeline.data import (CachedLoader, ImageCache, ShardWarning, fill_cache, make_cached_loader,
                           make_eval_loader, plan_cache)
from pipeline.data import cache as cache_module
from pipeline.tracking import read_history
from pipeline.train import loop as train_loop
from pipeline.utils import PipelineError
from shardgen import TINY_SIZE as SIZE, tiny_image, write_counted_split

PROPERTY = settings(max_examples=150, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow,
                                           HealthCheck.function_scoped_fixture])


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)


def all_keys(counts: Sequence[int]) -> list[str]:
    return [f"s{i}n{j}" for i, count in enumerate(counts) for j in range(count)]


def memory_cache(num_samples: int, total: int | None = None) -> ImageCache:
    """An in-memory cache whose row i is filled with i (mod 256) and keyed k<i>."""
    rows = torch.arange(num_samples, dtype=torch.int64).remainder(256).to(torch.uint8)
    rows = rows.view(-1, 1, 1, 1).expand(num_samples, 2, 3, 3).contiguous()
    rows[:, :, 0, :] = 255  # left column marked: a flip moves it to the right
    return ImageCache(rows, torch.arange(num_samples), [f"k{i}" for i in range(num_samples)],
                      total or num_samples)


# ---------------------------------------------------------------- the rank parts

@PROPERTY
@given(counts=st.lists(st.integers(0, 30), min_size=1, max_size=8),
       world_size=st.integers(1, 6))
def test_rank_parts_partition_the_samples_contiguously(counts, world_size):
    """Every sample in exactly one rank's part (a multiset check), parts contiguous in
    manifest order and within one sample of each other in size."""
    keys = all_keys(counts)
    parts = []
    for rank in range(world_size):
        segments = cache_module.rank_part(counts, rank, world_size)
        parts.append([f"s{seg.shard}n{j}" for seg in segments for j in range(seg.start, seg.stop)])
    assert Counter(k for part in parts for k in part) == Counter(keys)
    assert [k for part in parts for k in part] == keys  # rank 0's part first, in order
    sizes = [len(part) for part in parts]
    assert max(sizes) - min(sizes) <= 1


# ---------------------------------------------------------------- epochs, resume, flips

@PROPERTY
@given(num_samples=st.integers(1, 40), batch_size=st.integers(1, 12),
       batches=st.integers(1, 12), seed=st.integers(0, 3), rank=st.integers(0, 2))
def test_every_epoch_is_a_permutation_of_the_part(num_samples, batch_size, batches, seed, rank):
    """The batches, concatenated, are epoch after epoch of the whole part: each run of
    N consecutive samples from an epoch start holds every sample once."""
    loader = CachedLoader(memory_cache(num_samples), batch_size, seed=seed, rank=rank)
    stream = iter(loader)
    keys = [k for _ in range(batches) for k in next(stream)[2]]
    assert len(keys) == batches * batch_size
    part = Counter(f"k{i}" for i in range(num_samples))
    for start in range(0, len(keys) - num_samples + 1, num_samples):
        assert Counter(keys[start:start + num_samples]) == part
    tail = keys[len(keys) - len(keys) % num_samples:]
    assert max(Counter(tail).values(), default=0) <= 1  # a started epoch repeats nothing


@PROPERTY
@given(num_samples=st.integers(1, 30), batch_size=st.integers(1, 9),
       start=st.integers(0, 15), seed=st.integers(0, 3), flip=st.booleans())
def test_resumed_loader_yields_the_uninterrupted_batches(num_samples, batch_size, start, seed,
                                                         flip):
    cache = memory_cache(num_samples)
    whole = iter(CachedLoader(cache, batch_size, seed=seed, flip=flip))
    for _ in range(start):
        next(whole)
    resumed = iter(CachedLoader(cache, batch_size, seed=seed, flip=flip, start_batch=start))
    for _ in range(3):
        (a, la, ka), (b, lb, kb) = next(whole), next(resumed)
        assert ka == kb and torch.equal(la, lb) and torch.equal(a, b)


def test_batches_are_channels_last_images_and_flips_mirror_them():
    cache = memory_cache(64)
    plain = CachedLoader(cache, 64, seed=1)
    flipped = CachedLoader(cache, 64, seed=1, flip=True)
    images, labels, keys = plain.batch(0)
    assert images.shape == (64, 3, 2, 3) and images.dtype == torch.uint8
    assert images.is_contiguous(memory_format=torch.channels_last)
    assert [f"k{int(label)}" for label in labels] == keys
    mirrored, _, same_keys = flipped.batch(0)
    assert same_keys == keys  # flips do not change the order
    rows = {k: cache.rows[int(k[1:])].permute(2, 0, 1) for k in keys}
    flips = [not torch.equal(m, rows[k]) for m, k in zip(mirrored, keys)]
    assert all(torch.equal(m, rows[k].flip(2)) for m, k, f in zip(mirrored, keys, flips) if f)
    assert 16 < sum(flips) < 48  # about half of 64 (fixed seed)


def test_seeds_and_ranks_draw_their_own_orders():
    cache = memory_cache(50)
    orders = {(seed, rank): CachedLoader(cache, 50, seed=seed, rank=rank).batch(0)[2]
              for seed in (0, 1) for rank in (0, 1)}
    assert len({tuple(keys) for keys in orders.values()}) == 4


# ---------------------------------------------------------------- filling from shards

@pytest.mark.parametrize("world_size", [1, 3])
def test_fill_reads_each_rank_part_once_whatever_the_workers(tmp_path, world_size):
    """Over all ranks every sample is cached exactly once, its pixels and label as the
    eval loader decodes them; 0 and 2 workers fill identical caches."""
    counts = [7, 0, 12, 5]
    split = write_counted_split(tmp_path, counts)
    reference = {}
    for images, labels, keys in make_eval_loader(split, 64, num_workers=0):
        reference.update({k: (img.permute(1, 2, 0), int(lab))
                          for k, img, lab in zip(keys, images, labels)})
    cached = []
    for rank in range(world_size):
        plan = plan_cache(split, "host", "cpu", rank=rank, world_size=world_size)
        alone, pooled = fill_cache(plan, 0, progress=False), fill_cache(plan, 2, progress=False)
        assert alone.keys == pooled.keys and torch.equal(alone.rows, pooled.rows)
        assert alone.total == sum(counts) and alone.num_samples == plan.num_samples
        for key, row, label in zip(alone.keys, alone.rows, alone.labels):
            assert torch.equal(row, reference[key][0]) and int(label) == reference[key][1]
        cached += alone.keys
    assert Counter(cached) == Counter(all_keys(counts))


def test_corrupt_samples_are_skipped_counted_and_left_out(tmp_path):
    split = write_counted_split(tmp_path, [6, 6], corrupt={"s0n2", "s1n5"})
    with pytest.warns(ShardWarning):
        cache = fill_cache(plan_cache(split, "host", "cpu", rank=0, world_size=1), 0,
                           progress=False)
    assert cache.skipped == 2 and cache.num_samples == 10
    assert Counter(cache.keys) == Counter(set(all_keys([6, 6])) - {"s0n2", "s1n5"})
    for key, row in zip(cache.keys, cache.rows):  # compacted in order, rows with their keys
        shard, index = map(int, key[1:].split("n"))
        assert torch.equal(row, torch.from_numpy(tiny_image(shard, index)))
    assert cache.keys == sorted(cache.keys, key=all_keys([6, 6]).index)


def test_refused_before_reading_when_it_does_not_fit(tmp_path, monkeypatch):
    split = write_counted_split(tmp_path, [10, 10])
    decoded = []
    real_decode = data.decode_image
    monkeypatch.setattr(data, "decode_image", lambda m: decoded.append(1) or real_decode(m))
    monkeypatch.setattr(cache_module, "available_bytes", lambda place, device: (2**31, 2**33))
    with pytest.raises(PipelineError, match=r"--data\.cache host: rank 0's part .* 20 images "
                                            r"of 8x8 = 0\.00 GiB, but host memory has 2\.00 "
                                            r"GiB free, of which 2\.00 GiB stay for training"):
        make_cached_loader(split, 4, "host", "cpu", num_workers=0, progress=False)
    assert decoded == []


def test_gpu_cache_without_cuda_and_latent_shards_are_refused(tmp_path):
    split = write_counted_split(tmp_path, [4])
    with pytest.raises(PipelineError, match="--data.cache gpu .* runs on cpu: use "
                                            "--data.cache host"):
        plan_cache(split, "gpu", "cpu")
    manifest = json.loads((split / "manifest.json").read_text())
    manifest.update(format="ae-pipeline-latents/1",
                    latent={"kind": "codes", "member": "codes.npy", "shape": [2, 2],
                            "dtype": "uint16"})
    (split / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PipelineError, match="holds the latents"):
        plan_cache(split, "host", "cpu")


def test_cache_with_resampled_sampling_is_refused():
    args = train.build_parser().parse_args(["--config", "debug", "--data.cache", "host",
                                            "--data.sampling", "resampled"])
    with pytest.raises(PipelineError, match="--data.cache host draws exact epochs.*"
                                            "--data.sampling resampled"):
        train.resolve_config(args)


# ---------------------------------------------------------------- the trainer

def trainer_args(train_split: Path, val_split: Path, output: Path, steps: int, *extra: str):
    return ["--config", "debug", "--model", "ae", "--train-shards", str(train_split),
            "--val-shards", str(val_split), "--output", str(output), "--max-steps", str(steps),
            "--model.image_size", str(SIZE), "--model.widths", "8,16",
            "--model.latent_channels", "16", "--data.cache", "host", *extra]


def test_resumed_cached_run_equals_the_uninterrupted_one(tmp_path, monkeypatch):
    """8 steps of 16 from a 30-sample split (epochs end inside batches), random flips, 2
    fill workers; resumed from the step-4 checkpoint, steps 5..8 are bit for bit the
    same, and the cache (not the stream) fed both runs."""
    fills = []
    real_fill = train_loop.fill_cache
    monkeypatch.setattr(train_loop, "fill_cache",
                        lambda plan, *a, **k: fills.append(plan.num_samples) or
                        real_fill(plan, *a, **k))
    train_split, val_split = write_counted_split(tmp_path, [13, 17]), write_counted_split(tmp_path, [9])
    extra = ["--data.flip", "true", "--num-workers", "2", "--ckpt-every", "4",
             "--log-every", "1", "--keep-last", "3", "--data.val_samples", "9"]
    whole = tmp_path / "whole"
    assert train.main(trainer_args(train_split, val_split, whole, 8, *extra)) == 0
    resumed = tmp_path / "resumed"
    shutil.copytree(whole / "checkpoints" / "step-4", resumed / "checkpoints" / "step-4")
    assert train.main(trainer_args(train_split, val_split, resumed, 8, *extra,
                                   "--resume", "auto")) == 0
    assert fills == [30, 30]
    a = load_file(whole / "model" / "model.safetensors")
    b = load_file(resumed / "model" / "model.safetensors")
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []
    losses = {h["step"]: h for h in read_history(whole) if "train/loss" in h}
    again = {h["step"]: h for h in read_history(resumed) if "train/loss" in h}
    assert sorted(again) == [5, 6, 7, 8]
    assert all(again[s]["train/loss"] == losses[s]["train/loss"] for s in again)
    assert losses[8]["train/epoch"] == pytest.approx(8 * 16 / 30)
    assert 0 <= losses[8]["perf/data_wait_frac"] < 1
