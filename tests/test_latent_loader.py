"""`pipeline.data` over latent shards (written by `pipeline encode`): what a batch holds in
both modes, exactly once in eval, buffers reused, crafted manifests and members refused,
and 2 ranks x 2 workers under torchrun."""
from __future__ import annotations

import io
import itertools
import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import pipeline.data as data
from pipeline.data import ShardWarning, make_loader, npy_array, sample_moments
from pipeline.shards import read_manifest, write_manifest, write_shard
from pipeline.utils import PipelineError
from shardgen import make_split
from test_encode import MEMBERS, encode_into, npy, samples_of, save_checkpoints

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def latents(tmp_path_factory) -> dict[str, Path]:
    """Latent splits of the four kinds: 60 samples in 3 shards of 20."""
    root = tmp_path_factory.mktemp("latent_sets")
    checkpoints = save_checkpoints(root / "runs")
    source = make_split(root / "source", "val", 60, 20)
    for name, ckpt in checkpoints.items():
        encode_into(ckpt, source, root / name)
    return {name: root / name / "val" for name in checkpoints}


def stored(split: Path, name: str) -> dict[str, tuple[np.ndarray, int]]:
    return {key: (npy(m[MEMBERS[name]]), int(m["cls"])) for key, m in samples_of(split)}


def check_batches(batches, expected: dict, name: str) -> list[str]:
    keys = []
    codes = name in ("vq", "fsq")
    for latents, labels, batch_keys in batches:
        assert latents.dtype == (torch.int64 if codes else torch.float16)
        assert latents.is_contiguous() and labels.dtype == torch.int64
        for latent, label, key in zip(latents, labels, batch_keys):
            array, cls = expected[key]
            assert latent.shape == array.shape and int(label) == cls
            assert np.array_equal(latent.numpy(), array.astype(latent.numpy().dtype))
        keys += batch_keys
    return keys


@pytest.mark.parametrize("name", ["ae", "vae", "vq", "fsq"])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_eval_mode_gives_every_stored_latent_once(latents, name, num_workers):
    loader = make_loader(latents[name], 16, mode="eval", num_workers=num_workers)
    expected = stored(latents[name], name)
    keys = check_batches(loader, expected, name)
    assert Counter(keys) == Counter(expected.keys())
    assert loader.num_seen == 60 and loader.num_skipped == 0 and loader.expected_total == 60
    assert loader.latent.kind == read_manifest(latents[name])["latent"]["kind"]
    assert loader.image_size == 64


@pytest.mark.parametrize("name", ["vae", "vq"])
def test_train_mode_shows_every_latent_once_per_exact_epoch(latents, name):
    # 2 workers: 2 streams of 30 samples a share; batches of 10 -> 6 batches per epoch.
    loader = make_loader(latents[name], 10, mode="train", num_workers=2, seed=1)
    assert loader.epoch_size == 60
    expected = stored(latents[name], name)
    batches = list(itertools.islice(loader, 12))
    for epoch in (batches[:6], batches[6:]):
        assert Counter(check_batches(epoch, expected, name)) == Counter(expected.keys())
    resumed = make_loader(latents[name], 10, mode="train", num_workers=2, seed=1, start_batch=7)
    for (a, _, ka), (b, _, kb) in zip(itertools.islice(resumed, 5), batches[7:]):
        assert ka == kb and torch.equal(a, b)


def test_flip_is_refused_for_latent_shards(latents):
    with pytest.raises(PipelineError, match="flip=True mirrors images.*--flip both"):
        make_loader(latents["vae"], 8, flip=True)


def test_latent_batches_stay_in_a_few_reused_shared_buffers(latents):
    loader = make_loader(latents["vae"], 8, num_workers=1, seed=2)
    addresses = {batch.data_ptr() for batch, _, _ in itertools.islice(loader, 40)}
    assert len(addresses) <= data.BUFFER_SLOTS


def test_held_latent_batches_are_never_overwritten(latents):
    held = list(itertools.islice(make_loader(latents["vq"], 4, num_workers=2, seed=4), 40))
    copied = [(b.clone(), k) for b, _, k in
              itertools.islice(make_loader(latents["vq"], 4, num_workers=2, seed=4), 40)]
    for (batch, _, keys), (expected, expected_keys) in zip(held, copied):
        assert keys == expected_keys and torch.equal(batch, expected)


def test_vae_moments_can_be_resampled_each_epoch():
    mean, logvar = torch.full((2, 3, 4, 4), 0.5), torch.full((2, 3, 4, 4), 2 * np.log(0.1))
    moments = torch.cat([mean, logvar], 1).half()
    first = sample_moments(moments, torch.Generator().manual_seed(0))
    assert torch.equal(first, sample_moments(moments, torch.Generator().manual_seed(0)))
    assert not torch.equal(first, sample_moments(moments, torch.Generator().manual_seed(1)))
    assert first.shape == mean.shape and first.dtype == torch.float32
    many = sample_moments(moments.repeat(500, 1, 1, 1))
    assert many.mean().item() == pytest.approx(0.5, abs=0.005)
    assert many.std().item() == pytest.approx(0.1, rel=0.02)


# ---------------------------------------------------------------- members and manifests

@settings(max_examples=60, deadline=None)
@given(array=hnp.arrays(st.sampled_from(["u1", "f2", "u2", "<i4", "<f4", "<i8", ">f2"]),
                        hnp.array_shapes(min_dims=0, max_dims=4, max_side=5)),
       fortran=st.booleans())
def test_npy_members_of_any_dtype_and_shape_read_as_np_load_does(array, fortran):
    buffer = io.BytesIO()
    np.save(buffer, np.asfortranarray(array) if fortran else array, allow_pickle=False)
    data_bytes = buffer.getvalue()
    expected = np.load(io.BytesIO(data_bytes), allow_pickle=False)
    got = npy_array(data_bytes)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    assert np.array_equal(got, expected, equal_nan=True)


class Planted:
    unpickled = False

    def __reduce__(self):
        return (_plant, ())


def _plant():
    Planted.unpickled = True
    return "planted"


def test_an_object_array_member_is_never_unpickled():
    buffer = io.BytesIO()
    np.save(buffer, np.array([Planted()], dtype=object), allow_pickle=True)
    assert b"'descr': '|O'" in buffer.getvalue()[:128]  # a pickle follows the header
    with pytest.raises(ValueError):
        npy_array(buffer.getvalue())
    assert Planted.unpickled is False
    assert pickle.loads(pickle.dumps(Planted())) == "planted" and Planted.unpickled  # armed


def rewrite_manifest(split: Path, tmp_path: Path, **latent) -> Path:
    copy = Path(shutil.copytree(split, tmp_path / "copy"))
    manifest = read_manifest(copy)
    manifest["latent"] = {**manifest["latent"], **latent}
    write_manifest(copy, manifest)
    return copy


@pytest.mark.parametrize("latent, message", [
    ({"kind": "pickle"}, "kind 'pickle'"),
    ({"member": "json"}, "member 'json'"),
    ({"shape": [8, -1, 8]}, "shape"),
    ({"shape": [4096, 4096, 4096]}, "at most"),
    ({"shape": "8x8x8"}, "shape"),
    ({"dtype": "object"}, "stored as 'object'"),
    ({"dtype": "float64"}, "stored as 'float64'"),
])
def test_a_crafted_latent_section_is_refused_naming_the_manifest(latents, tmp_path, latent,
                                                                  message):
    copy = rewrite_manifest(latents["vae"], tmp_path, **latent)
    with pytest.raises(PipelineError, match=f"{copy / 'manifest.json'}.*{message}"):
        make_loader(copy, 8, mode="eval")


def test_a_latent_of_another_shape_than_declared_is_an_error_naming_it(latents, tmp_path):
    copy = rewrite_manifest(latents["vae"], tmp_path, shape=[8, 4, 4])
    with pytest.raises(PipelineError, match="sample val_000000 holds a float16 latent of "
                                            r"shape \(8, 8, 8\).*declares float16 \(8, 4, 4\)"):
        list(make_loader(copy, 8, mode="eval", num_workers=0))


def test_an_undecodable_latent_is_skipped_and_counted(latents, tmp_path):
    copy = Path(shutil.copytree(latents["vq"], tmp_path / "copy"))
    manifest = read_manifest(copy)
    shard = copy / manifest["shards"][0]["name"]
    samples = samples_of(copy)[:20]
    samples[5][1]["codes.npy"] = b"\x93NUMPY garbage"
    entry = write_shard(shard, samples).to_dict()
    manifest["shards"][0].update(entry)
    write_manifest(copy, manifest)
    loader = make_loader(copy, 8, mode="eval", num_workers=0)
    with pytest.warns(ShardWarning, match="val_000005"):
        keys = [key for _, _, batch in loader for key in batch]
    assert len(keys) == 59 and "val_000005" not in keys and loader.num_skipped == 1


# ---------------------------------------------------------------- real processes

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_latent_shards_under_torchrun_two_ranks_two_workers(latents, tmp_path):
    """Train: 60 latents in 3 shards dealt to 4 streams of 15; 30 steps of 8 per rank are
    15 batches = 120 samples = 8 epochs per stream, so pooled every key comes 8 times.
    Eval: every key exactly once over both ranks."""
    out = tmp_path / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
               str(REPO / "tests" / "dist_loader_check.py"), "--train", str(latents["vae"]),
               "--val", str(latents["vq"]), "--out", str(out), "--steps", "30"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in reports] == [2, 2]
    assert [r["train_steps"] for r in reports] == [30, 30]
    assert all(r["min_train_steps"] == 30 and r["epoch_size"] == 60 for r in reports)
    every = [f"val_{i:06d}" for i in range(60)]
    assert Counter(k for r in reports for k in r["train_keys"]) == Counter(every * 8)
    eval_keys = [k for r in reports for k in r["evals"][0]["keys"]]
    assert Counter(eval_keys) == Counter(every)
    assert all(r["evals"][0]["expected_total"] == 60 for r in reports)
