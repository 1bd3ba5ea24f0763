"""The streaming loader: train streams, resume, exactly-once eval, corrupt data, specs."""
from __future__ import annotations

import io
import itertools
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import pipeline.data as data
from pipeline.data import ShardWarning, make_loader, normalize
from pipeline.shards import (TarFormatError, iter_samples, read_manifest, write_manifest,
                             write_shard)
from pipeline.utils import PipelineError
from shardgen import make_split, synthetic_image

REPO = Path(__file__).resolve().parents[1]


def take(loader, n: int) -> list[tuple[torch.Tensor, torch.Tensor, list[str]]]:
    return list(itertools.islice(loader, n))


def keys_of(batches) -> list[str]:
    return [key for _, _, keys in batches for key in keys]


def eval_keys(spec, world_size: int, num_workers: int, **kw) -> tuple[list[str], list]:
    """Simulate `world_size` ranks one after another; all keys seen, and each rank's loader."""
    keys, loaders = [], []
    for rank in range(world_size):
        loader = make_loader(spec, 16, mode="eval", num_workers=num_workers, rank=rank,
                             world_size=world_size, **kw)
        keys += keys_of(loader)
        loaders.append(loader)
    return keys, loaders


def shard_contents(split_dir: Path) -> dict[str, dict[str, bytes]]:
    samples = {}
    for entry in read_manifest(split_dir)["shards"]:
        with open(split_dir / entry["name"], "rb") as f:
            samples.update(iter_samples(f))
    return samples


def manifest_keys(split_dir: Path) -> list[str]:
    return list(shard_contents(split_dir))


@pytest.fixture(scope="module")
def shard_root(synthetic_shards, tmp_path_factory) -> Path:
    """The session's train/val sets plus small special-purpose sets built once here."""
    root = tmp_path_factory.mktemp("loader_sets")
    for split in ("train", "val"):
        shutil.copytree(synthetic_shards / split, root / split)
    make_split(root, "one_shard", 37, 100)
    make_split(root, "two_shards", 40, 20)
    return root


def readable_samples(shard: Path) -> int:
    """How many whole samples a reader gets out of a (truncated) shard before it fails."""
    count = 0
    with open(shard, "rb") as f:
        try:
            for _ in iter_samples(f):
                count += 1
        except TarFormatError:
            pass
    return count


@pytest.fixture
def corrupt_val(shard_root, tmp_path) -> Path:
    """The val set (3 shards x 50) with shard 1 cut mid-way through a sample."""
    split = shutil.copytree(shard_root / "val", tmp_path / "val")
    shard = split / read_manifest(split)["shards"][1]["name"]
    content = shard.read_bytes()
    shard.write_bytes(content[:len(content) * 58 // 100])
    assert 0 < readable_samples(shard) < 50
    return split


# ---------------------------------------------------------------- train mode

def test_train_batches_have_images_labels_and_keys_of_the_shards(shard_root):
    split = shard_root / "train"
    classes = read_manifest(split)["classes"]
    samples = shard_contents(split)
    images, labels, keys = next(iter(make_loader(split, 16, num_workers=0, seed=3)))
    assert images.shape == (16, 3, 64, 64) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64 and len(keys) == 16
    for image, label, key in zip(images, labels, keys):
        wnid = json.loads(samples[key]["json"])["wnid"]
        assert classes[label] == wnid
        png = np.array(Image.open(io.BytesIO(samples[key]["png"])))
        assert torch.equal(image, torch.from_numpy(png).permute(2, 0, 1))


def test_train_stream_is_deterministic_and_differs_by_rank_and_seed(shard_root):
    split = shard_root / "train"

    def first_keys(**kw):
        return keys_of(take(make_loader(split, 10, num_workers=0, shuffle_buffer=50, **kw), 4))

    reference = first_keys(seed=1, rank=0, world_size=2)
    assert first_keys(seed=1, rank=0, world_size=2) == reference
    assert first_keys(seed=1, rank=1, world_size=2) != reference
    assert first_keys(seed=2, rank=0, world_size=2) != reference
    assert len(set(reference)) == 40  # no repeats inside an epoch's share (or a shard's round)


def test_flip_mirrors_about_half_the_images_deterministically(shard_root):
    split = shard_root / "train"
    plain = take(make_loader(split, 32, num_workers=0, seed=5), 2)
    flipped = take(make_loader(split, 32, num_workers=0, seed=5, flip=True), 2)
    assert keys_of(plain) == keys_of(flipped)
    images, mirrored = torch.cat([b[0] for b in plain]), torch.cat([b[0] for b in flipped])
    is_flipped = [torch.equal(m, i.flip(-1)) and not torch.equal(m, i)
                  for i, m in zip(images, mirrored)]
    assert all(f or torch.equal(m, i) for f, i, m in zip(is_flipped, images, mirrored))
    assert 16 <= sum(is_flipped) <= 48
    again = take(make_loader(split, 32, num_workers=0, seed=5, flip=True), 2)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(again, flipped))


def test_one_shard_never_runs_dry_for_four_ranks(shard_root):
    split = shard_root / "one_shard"  # 37 samples, 1 shard, 4 ranks
    for rank in range(4):
        batches = take(make_loader(split, 8, num_workers=0, rank=rank, world_size=4), 20)
        assert len(batches) == 20 and all(len(keys) == 8 for _, _, keys in batches)


@pytest.mark.parametrize("sampling", ["exact", "resampled"])
@pytest.mark.parametrize("start_batch", [5, 6, 33])
def test_resume_yields_exactly_the_uninterrupted_batches(shard_root, start_batch, sampling):
    """2 workers; at 33, worker 0 resumes the stream of worker 1 after 16 of its batches:
    128 samples, past the end of its first 120-sample shard round (resampled) or in its
    first 150-sample epoch share (exact; tests/test_loader_epochs.py crosses epochs)."""
    split = shard_root / "train"
    kw = dict(num_workers=2, seed=7, shuffle_buffer=50, flip=True, rank=1, world_size=2,
              sampling=sampling)
    full = take(make_loader(split, 8, **kw), start_batch + 4)
    resumed = take(make_loader(split, 8, start_batch=start_batch, **kw), 4)
    assert keys_of(resumed) == keys_of(full[start_batch:])
    assert all(torch.equal(a[0], b[0]) for a, b in zip(resumed, full[start_batch:]))


def test_resume_decodes_nothing_it_skips(shard_root, monkeypatch):
    decoded = []
    real_decode = data.decode_image
    monkeypatch.setattr(data, "decode_image", lambda m: decoded.append(1) or real_decode(m))
    split = shard_root / "train"
    full = take(make_loader(split, 8, num_workers=0, seed=2), 42)
    decoded.clear()
    resumed = take(make_loader(split, 8, num_workers=0, seed=2, start_batch=41), 1)
    assert keys_of(resumed) == keys_of(full[41:])
    assert len(decoded) == 8


# Today's resampled stream, recorded before exact epochs became the default: the same
# seed must keep giving the same batches (make_split(root, "train", 60, 12, fmt="npy",
# size=8); seed 3, rank 1 of 2, shuffle buffer 7, batches of 5).
RESAMPLED_KEYS = [
    40, 36, 38, 41, 42, 44, 45, 37, 39, 46, 43, 47, 28, 26, 25, 30, 29, 24, 27, 33, 35, 34, 31,
    32, 4, 1, 3, 2, 0, 10, 8, 7, 9, 6, 5, 11, 50, 54, 48, 56, 52, 53, 55, 49, 58, 57, 59, 51, 15,
    13, 20, 19, 21, 16, 22, 14, 12, 18, 23, 17, 15, 16, 19, 14, 17, 23, 12, 21, 22, 13, 20, 18,
    3, 4, 7, 8, 0, 6, 1, 5, 11, 10, 2, 9, 28, 25, 30, 26, 33, 27, 29, 31, 34, 32, 35, 24, 49, 51,
    53, 56, 54, 48, 58, 52, 55, 50, 59, 57, 36, 43, 37, 38, 42, 45, 39, 47, 44, 40, 41, 46, 49,
    53, 56, 50, 55, 51, 48, 57, 52, 58, 59, 54, 15, 13, 12, 20, 17, 21, 14, 18, 22, 16, 23, 19,
    26, 28, 31, 27, 25, 35]
RESAMPLED_FLIPS = ("11101111110101001010111001111111110100100111100011010010000010011011010100"
                   "0000101100011110101110111010111110011101111111000000111111010110010001001000")


def test_resampled_sampling_gives_the_same_batches_as_before(tmp_path):
    split = make_split(tmp_path, "train", 60, 12, fmt="npy", size=8)
    kw = dict(num_workers=0, seed=3, rank=1, world_size=2, shuffle_buffer=7,
              sampling="resampled")
    flipped = take(make_loader(split, 5, flip=True, **kw), 30)
    plain = take(make_loader(split, 5, **kw), 30)
    assert keys_of(flipped) == [f"train_{i:06d}" for i in RESAMPLED_KEYS] == keys_of(plain)
    mirrored = "".join("0" if torch.equal(a, b) else "1" for a, b in
                       zip(torch.cat([b[0] for b in flipped]), torch.cat([b[0] for b in plain])))
    assert mirrored == RESAMPLED_FLIPS


def test_iterating_a_train_loader_again_continues_where_it_stopped(shard_root):
    split = shard_root / "train"
    full = take(make_loader(split, 8, num_workers=0, seed=4), 6)
    loader = make_loader(split, 8, num_workers=0, seed=4)
    first, second = take(loader, 2), take(loader, 4)
    assert keys_of(first + second) == keys_of(full)


# ---------------------------------------------------------------- eval mode

@pytest.mark.parametrize("num_workers", [0, 1, 2])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_eval_yields_every_sample_exactly_once(shard_root, world_size, num_workers):
    split = shard_root / "val"  # 3 shards: by shard up to 3 slots, by sample beyond
    keys, loaders = eval_keys(split, world_size, num_workers)
    assert sorted(keys) == sorted(manifest_keys(split)) and len(keys) == 150
    assert sum(loader.num_seen for loader in loaders) == 150
    assert all(loader.num_skipped == 0 and loader.expected_total == 150 for loader in loaders)


@pytest.mark.parametrize("world_size,num_workers", [(1, 0), (3, 2)])
def test_eval_with_a_single_shard(shard_root, world_size, num_workers):
    keys, loaders = eval_keys(shard_root / "one_shard", world_size, num_workers)
    assert sorted(keys) == sorted(manifest_keys(shard_root / "one_shard")) and len(keys) == 37


@pytest.mark.parametrize("max_samples,world_size", [(70, 2), (30, 3), (1000, 1)])
def test_max_samples_keeps_the_first_samples_in_manifest_order(shard_root, max_samples, world_size):
    split = shard_root / "val"
    keys, loaders = eval_keys(split, world_size, 0, max_samples=max_samples)
    assert sorted(keys) == manifest_keys(split)[:max_samples]
    assert loaders[0].expected_total == min(max_samples, 150)


def test_eval_yields_partial_last_batches_without_padding(shard_root):
    loader = make_loader(shard_root / "one_shard", 16, mode="eval", num_workers=0)
    assert [len(keys) for _, _, keys in loader] == [16, 16, 5]


def test_eval_loader_can_be_iterated_again(shard_root):
    loader = make_loader(shard_root / "val", 32, mode="eval", num_workers=2)
    assert sorted(keys_of(loader)) == sorted(keys_of(loader)) and loader.num_seen == 150


# ---------------------------------------------------------------- corrupt data

def test_truncated_shard_is_skipped_and_counted(corrupt_val):
    loader = make_loader(corrupt_val, 16, mode="eval", num_workers=0)
    with pytest.warns(ShardWarning, match="val-000001.tar"):
        keys = keys_of(loader)
    lost = 50 - readable_samples(corrupt_val / "val-000001.tar")
    assert loader.num_skipped == lost and len(keys) == loader.num_seen == 150 - lost
    assert loader.num_seen + loader.num_skipped == loader.expected_total == 150
    assert set(keys) < {f"val_{i:06d}" for i in range(150)}


@pytest.mark.parametrize("world_size,num_workers", [(2, 1), (2, 2), (3, 2)])
def test_truncated_shard_counts_add_up_across_ranks(corrupt_val, world_size, num_workers):
    """By shard (2 slots) and by sample (4 and 6 slots > 3 shards)."""
    keys, loaders = eval_keys(corrupt_val, world_size, num_workers)
    seen, skipped = (sum(getattr(x, n) for x in loaders) for n in ("num_seen", "num_skipped"))
    assert len(keys) == len(set(keys)) == seen and skipped > 0
    assert seen + skipped == 150


def test_undecodable_sample_is_skipped_and_counted(tmp_path):
    split = make_split(tmp_path, "val", 20, 10)
    shard = split / "val-000001.tar"
    with open(shard, "rb") as f:
        samples = list(iter_samples(f))
    samples[3][1]["png"] = b"not a png"
    write_shard(shard, samples)
    loader = make_loader(split, 8, mode="eval", num_workers=0)
    with pytest.warns(ShardWarning, match="sample val_000013"):
        keys = keys_of(loader)
    assert "val_000013" not in keys and len(keys) == 19
    assert (loader.num_seen, loader.num_skipped) == (19, 1)


def test_on_error_raise_names_the_shard(corrupt_val):
    loader = make_loader(corrupt_val, 16, mode="eval", num_workers=2, on_error="raise")
    with pytest.raises(PipelineError, match=r"cannot read shard .*val-000001\.tar"):
        keys_of(loader)


def test_train_mode_keeps_going_past_a_truncated_shard(corrupt_val):
    with pytest.warns(ShardWarning):
        batches = take(make_loader(corrupt_val, 16, num_workers=0, shuffle_buffer=10), 30)
    assert len(batches) == 30


def test_train_mode_with_no_readable_shard_raises_instead_of_hanging(tmp_path):
    split = make_split(tmp_path, "train", 20, 10)
    for shard in split.glob("*.tar"):
        shard.write_bytes(shard.read_bytes()[:1500])
    with pytest.warns(ShardWarning), pytest.raises(PipelineError, match="no readable sample"):
        take(make_loader(split, 4, num_workers=0), 1)


def test_shard_of_another_resolution_is_an_error_naming_it(tmp_path):
    split = make_split(tmp_path, "val", 10, 5, size=32)
    manifest = read_manifest(split)
    write_manifest(split, {**manifest, "image_size": 64})
    with pytest.raises(PipelineError, match=r"val-000000\.tar.*32x32"):
        keys_of(make_loader(split, 4, mode="eval", num_workers=1))


# ---------------------------------------------------------------- specs and safety

@pytest.mark.parametrize("entry", ["pipe:touch {marker}", "s3://bucket/x.tar", "../escape.tar",
                                   "/abs/x.tar"])
def test_manifest_entries_are_never_commands_or_urls(shard_root, tmp_path, entry):
    split = shutil.copytree(shard_root / "val", tmp_path / "val")
    marker = tmp_path / "PWNED"
    manifest = read_manifest(split)
    manifest["shards"][1]["name"] = entry.format(marker=marker)
    write_manifest(split, manifest)
    with pytest.raises(PipelineError, match="never opened as URLs or run as commands"):
        keys_of(make_loader(split, 8, mode="eval", num_workers=0))
    assert not marker.exists()


def test_pipe_spec_from_the_command_line_works(shard_root):
    shard = shard_root / "val" / "val-000002.tar"
    keys = keys_of(make_loader(f"pipe:cat {shard}", 8, mode="eval", num_workers=1))
    assert keys == [f"val_{i:06d}" for i in range(100, 150)]


def test_allow_pipe_false_refuses_pipe_specs(shard_root, tmp_path):
    marker = tmp_path / "PWNED"
    with pytest.raises(PipelineError, match="pipe: URLs are not allowed"):
        make_loader(f"pipe:touch {marker}", 8, mode="eval", allow_pipe=False)
    assert not marker.exists()


def test_brace_pattern_beside_a_manifest_takes_its_counts(shard_root):
    split = shard_root / "val"
    loader = make_loader(f"{split}/val-{{000000..000001}}.tar", 16, mode="eval", num_workers=0)
    assert sorted(keys_of(loader)) == manifest_keys(split)[:100]
    assert loader.expected_total == 100 and loader.image_size == 64


@pytest.mark.parametrize("as_list", [True, False])
def test_list_spec(shard_root, as_list):
    split = shard_root / "val"
    shards = [str(split / "val-000000.tar"), str(split / "val-000002.tar")]
    spec = shards if as_list else " , ".join(shards)
    keys = keys_of(make_loader(spec, 16, mode="eval", num_workers=0))
    assert keys == manifest_keys(split)[:50] + manifest_keys(split)[100:]


def test_fsspec_url_spec(shard_root):
    fsspec = pytest.importorskip("fsspec")
    shard = shard_root / "val" / "val-000000.tar"
    with fsspec.open("memory://shards/val-000000.tar", "wb") as f:
        f.write(shard.read_bytes())
    loader = make_loader("memory://shards/val-000000.tar", 16, mode="eval", num_workers=0)
    assert keys_of(loader) == manifest_keys(shard_root / "val")[:50]
    assert loader.expected_total is None and loader.manifest is None


def test_missing_shard_file_is_a_clear_error(shard_root):
    with pytest.raises(PipelineError, match="val-000009.tar does not exist"):
        make_loader(f"{shard_root}/val/val-000009.tar", 8)


@pytest.mark.parametrize("kwargs,message", [
    (dict(mode="test"), "mode must be"), (dict(on_error="ignore"), "on_error must be"),
    (dict(max_samples=10), "does not apply to mode='train'"),
    (dict(mode="eval", start_batch=3), "start_batch resumes training")])
def test_bad_arguments_are_pipeline_errors(shard_root, kwargs, message):
    with pytest.raises(PipelineError, match=message):
        make_loader(shard_root / "val", 8, **kwargs)


def test_rank_and_world_size_come_from_the_environment(shard_root, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    loader = make_loader(shard_root / "val", 8, mode="eval")
    assert (loader.dataset.rank, loader.dataset.world_size) == (1, 3)


@pytest.mark.parametrize("fmt", ["png", "npy", "webp", "jpg"])
def test_every_image_format_decodes_to_uint8_chw(tmp_path, fmt):
    split = make_split(tmp_path, "val", 6, 6, fmt=fmt)
    images, labels, keys = next(iter(make_loader(split, 6, mode="eval", num_workers=0)))
    assert images.shape == (6, 3, 64, 64) and images.dtype == torch.uint8
    assert labels.tolist() == [i % 10 for i in range(6)]
    if fmt in ("png", "npy"):  # lossless: pixel-exact
        expected = torch.from_numpy(synthetic_image(2, 2)).permute(2, 0, 1)
        assert torch.equal(images[2], expected)


def test_batches_are_channels_last_views_and_normalize_lays_them_out(shard_root):
    images, _, _ = next(iter(make_loader(shard_root / "val", 8, mode="eval", num_workers=0)))
    assert images.shape == (8, 3, 64, 64)
    assert images.is_contiguous(memory_format=torch.channels_last)
    x = normalize(images)
    assert x.is_contiguous() and torch.equal(x, images.float() / 127.5 - 1)
    y = normalize(images, torch.channels_last)
    assert y.is_contiguous(memory_format=torch.channels_last) and torch.equal(y, x)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("decoder", list(data.PNG_DECODERS))
def test_png_decoders_agree_and_refuse_what_shards_never_hold(decoder):
    decode = data.PNG_DECODERS[decoder]
    rgb = synthetic_image(4, 4)[:20, :24]
    rgba = np.dstack([rgb, rgb[..., :1]])
    for image in (Image.fromarray(rgb), Image.fromarray(rgb).convert("L"),
                  Image.fromarray(rgb).convert("P"), Image.fromarray(rgba),
                  Image.fromarray(rgb).convert("LA")):
        expected = np.asarray(image.convert("RGB"))
        decoded = decode(png_bytes(image))
        assert decoded.shape == (20, 24, 3) and decoded.dtype == np.uint8, image.mode
        assert np.array_equal(decoded, expected), image.mode
    sixteen_bit = Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).convert("I;16")
    with pytest.raises(ValueError, match="16-bit PNG"):
        decode(png_bytes(sixteen_bit))
    with pytest.raises(Exception):
        decode(png_bytes(Image.fromarray(rgb))[:60])


def test_worker_buffers_are_reused_once_batches_are_dropped(shard_root):
    """Zero-copy hand-over: a few shared buffers carry the whole stream."""
    loader = make_loader(shard_root / "train", 16, num_workers=1, seed=2)
    addresses = {images.data_ptr() for images, _, _ in itertools.islice(loader, 40)}
    assert len(addresses) <= data.BUFFER_SLOTS


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_batches_held_by_the_caller_are_never_overwritten(shard_root, mode):
    split = shard_root / ("train" if mode == "train" else "val")
    n = 3 * data.BUFFER_SLOTS if mode == "train" else None  # eval: 150 samples, 10 batches
    held = take(make_loader(split, 16, mode=mode, num_workers=2, seed=4), n or 100)
    copied = [(images.clone(), labels, keys) for images, labels, keys in
              take(make_loader(split, 16, mode=mode, num_workers=2, seed=4), n or 100)]
    assert len(held) == len(copied) and len({b[0].data_ptr() for b in held}) == len(held)
    for (images, labels, keys), (expected, expected_labels, expected_keys) in zip(held, copied):
        assert keys == expected_keys and torch.equal(labels, expected_labels)
        assert torch.equal(images, expected)


def test_pin_memory_configured_without_an_accelerator_still_copies_nothing_early(
        shard_root, monkeypatch):
    """pin_memory=True on a machine without CUDA: DataLoader warns and does not pin, so the
    batches it returns are still the workers' buffers and must be lent, not given back."""
    monkeypatch.setattr(data, "_pin_memory", lambda: True)
    loader = make_loader(shard_root / "val", 16, mode="eval", num_workers=2)
    with pytest.warns(UserWarning, match="pin_memory"):
        held = list(loader)
    assert loader.dataset.pinned is False and loader._eval_loader.dataset.pinned is True
    monkeypatch.undo()
    expected = {key: image for images, _, keys in
                make_loader(shard_root / "val", 16, mode="eval", num_workers=0)
                for key, image in zip(keys, images)}
    got = {key: image for images, _, keys in held for key, image in zip(keys, images)}
    assert got.keys() == expected.keys()
    assert all(torch.equal(image, expected[key]) for key, image in got.items())


def test_persistent_eval_workers_keep_the_previous_pass_intact(shard_root):
    loader = make_loader(shard_root / "val", 16, mode="eval", num_workers=2)
    first = [(images[::2], keys) for images, _, keys in loader]  # views keep a batch alive
    snapshot = [images.clone() for images, _ in first]
    second = {key: image.clone() for images, _, keys in loader
              for key, image in zip(keys, images)}
    for (images, keys), expected in zip(first, snapshot):
        assert torch.equal(images, expected)
        assert all(torch.equal(image, second[key]) for key, image in zip(keys[::2], images))


def test_the_two_loaders_are_a_train_and_an_eval_stream_on_one_reader(shard_root):
    train = data.make_train_loader(shard_root / "train", 8, num_workers=0, seed=3)
    evaluation = data.make_eval_loader(shard_root / "val", 8, num_workers=0)
    assert type(train.dataset) is data.TrainStream and type(evaluation.dataset) is data.EvalStream
    assert all(isinstance(loader.dataset, data.ShardStream) for loader in (train, evaluation))
    assert keys_of(take(train, 3)) == keys_of(take(make_loader(shard_root / "train", 8,
                                                               num_workers=0, seed=3), 3))
    assert keys_of(evaluation) == manifest_keys(shard_root / "val")


@pytest.mark.parametrize("factory,option", [
    ("make_eval_loader", "start_batch"), ("make_eval_loader", "sampling"),
    ("make_eval_loader", "flip"), ("make_train_loader", "max_samples")])
def test_each_loader_takes_only_the_options_that_apply_to_it(shard_root, factory, option):
    make = getattr(data, factory)
    with pytest.raises(TypeError, match=option):
        make(shard_root / "val", 8, **{option: 1})


@pytest.mark.parametrize("factory,kwargs,message", [
    ("make_train_loader", dict(batch_size=0), "make_train_loader: batch_size must be >= 1, not 0"),
    ("make_train_loader", dict(batch_size=2, interleave=0), "make_train_loader: interleave must"),
    ("make_eval_loader", dict(batch_size=2, max_samples=0), "make_eval_loader: max_samples must"),
    ("make_eval_loader", dict(batch_size=2, on_error="x"), "make_eval_loader: on_error must"),
    # make_loader checks every option whatever the mode, as it always has.
    ("make_loader", dict(batch_size=2, mode="eval", sampling="x"), "make_loader: sampling must"),
])
def test_loader_option_errors_name_the_function_called(shard_root, factory, kwargs, message):
    with pytest.raises(PipelineError, match=re.escape(message)):
        getattr(data, factory)(shard_root / "val", **kwargs)


def test_importing_the_loader_leaves_the_torchvision_fallback_for_first_use():
    """With pyspng installed torchvision's decoder is a fallback: listed, but imported only
    when called (it was half of the package's import time); the loader imports no
    trainer or model code either."""
    pytest.importorskip("pyspng")
    pytest.importorskip("torchvision")
    script = """
import io, json, sys
import numpy as np
from PIL import Image
import pipeline.data as data
before = sorted(m for m in sys.modules if m.split(".")[0] in ("torchvision", "pipeline"))
image = (np.arange(8 * 8 * 3) % 251).astype(np.uint8).reshape(8, 8, 3)
png = io.BytesIO()
Image.fromarray(image).save(png, format="PNG")
decoded = data.PNG_DECODERS["torchvision"](png.getvalue())
print(json.dumps({"before": before, "decoder": data.PNG_DECODER,
                  "listed": list(data.PNG_DECODERS), "same": bool(np.array_equal(decoded, image)),
                  "after": "torchvision.io" in sys.modules}))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert report["decoder"] == "pyspng" and report["listed"] == ["pyspng", "torchvision", "pil"]
    assert not [m for m in report["before"] if m.startswith("torchvision")]
    assert not [m for m in report["before"] if m.startswith(("pipeline.train", "pipeline.models",
                                                             "pipeline.checkpoint"))]
    assert report["same"] and report["after"]


# ---------------------------------------------------------------- real processes

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_two_workers_under_torchrun(shard_root, tmp_path):
    """Train: 2 shards < 2 ranks x 2 workers, 50 steps each; eval: exactly once.

    Exact epochs: 40 samples make 4 shares of 10; each worker's stream yields 25 batches
    of 8 = 200 samples = 20 whole epochs, so pooled, every sample comes exactly 20 times."""
    out = tmp_path / "out"
    val_specs = [shard_root / "val", shard_root / "one_shard"]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
               str(REPO / "tests" / "dist_loader_check.py"),
               "--train", str(shard_root / "two_shards"), "--out", str(out), "--steps", "50"]
    command += [arg for spec in val_specs for arg in ("--val", str(spec))]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in reports] == [2, 2]
    assert [r["train_steps"] for r in reports] == [50, 50]
    assert all(r["min_train_steps"] == 50 for r in reports)
    train_keys = Counter(key for r in reports for key in r["train_keys"])
    assert train_keys == Counter({key: 20 for key in manifest_keys(shard_root / "two_shards")})
    assert all(r["epoch_size"] == 40 for r in reports)
    for i, spec in enumerate(val_specs):
        keys = [key for r in reports for key in r["evals"][i]["keys"]]
        assert sorted(keys) == sorted(manifest_keys(spec))
        assert sum(r["evals"][i]["num_seen"] for r in reports) == len(keys)
        assert all(r["evals"][i]["expected_total"] == len(keys) for r in reports)


# ---------------------------------------------------------------- benchmark

def test_bench_load_json_reports_every_stage(capsys):
    from pipeline.bench import load
    assert load.main(["--json", "--samples", "256", "--batch-size", "64", "--formats", "npy"]) == 0
    report = json.loads(capsys.readouterr().out)
    row = report["formats"]["npy"]
    stages = ["decode", "read", "read_decode", "webdataset_read_decode", "loader_1_worker",
              "loader_2_workers", "loader_2_workers_per_worker", "loader_1_worker_resampled",
              "loader_2_workers_resampled", "loader_2_workers_resampled_per_worker"]
    assert all(row[stage] > 0 for stage in stages)
    assert row["target_per_worker"] == 30000 and row["sample_bytes"] > 12288
    # 256 samples make one shard: every batch draws from that one.
    assert row["shards_per_batch_exact"] == row["shards_per_batch_resampled"] == 1
    assert report["interleave"] == 4


def test_bench_load_counts_the_shards_a_batch_draws_from(tmp_path):
    from pipeline.bench import load
    split = make_split(tmp_path, "train", 96, 8, fmt="npy", size=8)  # 12 shards
    urls = [str(path) for path in sorted(split.glob("*.tar"))]
    shard_of = load.shard_of_keys(urls)
    assert Counter(shard_of.values()) == Counter({index: 8 for index in range(12)})
    run = load.LoaderRun(1.0, [["train_000000", "train_000009", "train_000010"],
                               ["train_000095"]])
    assert load.shards_per_batch(run, shard_of) == 1.5
    mixed = load.loader_run(str(split), 0, 48, 16, sampling="exact", interleave=4)
    single = load.loader_run(str(split), 0, 48, 16, sampling="resampled")
    assert load.shards_per_batch(mixed, shard_of) > load.shards_per_batch(single, shard_of)


def test_bench_load_table_on_given_shards(shard_root, capsys):
    from pipeline.bench import load
    assert load.main(["--shards", str(shard_root / "val"), "--samples", "128",
                      "--batch-size", "32"]) == 0
    table = capsys.readouterr().out
    assert "loader 1w" in table and table.splitlines()[-1].startswith("png")


def test_a_split_directory_with_spaces_in_its_path(shard_root, tmp_path):
    split = shutil.copytree(shard_root / "one_shard", tmp_path / "my shards, v2")
    loader = make_loader(str(split), 16, mode="eval", num_workers=0)
    assert len(keys_of(loader)) == loader.expected_total == 37
