"""`pipeline encode` / `pipeline decode` and the latent contract of the models.

The model contract first (every registered model: decoding what `encode_latents` gives is
the model's own reconstruction), then the stage on tiny saved checkpoints of the four
kinds: the shards and manifest, the round trip, the statistics, the modes, flips,
resume (over generated jobs and failure points), refusals, 1 vs 2 processes, decode.
"""
from __future__ import annotations

import errno
import io
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from contextlib import closing
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from modelgen import case_id, model_cases, tiny_model_config
from pipeline.shards import iter_samples, manifest_hash, read_manifest
from pipeline.utils import PipelineError, sha256_file
from shardgen import make_split, synthetic_image

REPO = Path(__file__).resolve().parents[1]
KINDS = {"ae": ("ae", "vq"), "vae": ("vae", "vq"), "vq": ("vqvae", "vq"), "fsq": ("vqvae", "fsq")}
MEMBERS = {"ae": "latent.npy", "vae": "moments.npy", "vq": "codes.npy", "fsq": "codes.npy"}
SIDE = 8  # latent side: 64 / 2**3
FLOAT16_ATOL = 1e-2  # decoding float16 latents: within ~1 grey level of the recon


# ---------------------------------------------------------------- helpers (shared with
# test_latent_loader.py)

def save_checkpoints(root: Path, seed: int = 0) -> dict[str, Path]:
    """One tiny untrained export per kind, saved as training saves it."""
    from pipeline.config import Config, ModelConfig
    from pipeline.models import build_model, save_pretrained

    paths = {}
    for name, (model, quantizer) in KINDS.items():
        cfg = ModelConfig(model=model, quantizer=quantizer, widths=[8, 16, 32],
                          latent_channels=32 if model == "ae" else 4, codebook_size=32,
                          code_dim=4, fsq_levels=[8, 5, 5, 5])
        torch.manual_seed(seed)
        run_dir = root / name
        paths[name] = save_pretrained(build_model(cfg), run_dir / "model", Config(model=cfg),
                                      step=7, run_dir=run_dir)
    return paths


def encode_into(checkpoint: Path, shards: Path | str, output: Path, **options):
    """encode_split in this process (no Accelerate): the library path."""
    from pipeline.encode import EncodeConfig, SingleProcess, encode_split, load_checkpoint

    cfg = EncodeConfig(shards=str(shards), output=str(output),
                       **{"num_workers": 0, "batch_size": 16, **options})
    return encode_split(cfg, load_checkpoint(checkpoint), SingleProcess(), progress=False)


def samples_of(split_dir: Path) -> list[tuple[str, dict[str, bytes]]]:
    """Every sample of a split, in manifest order."""
    samples = []
    for entry in read_manifest(split_dir)["shards"]:
        with closing(open(split_dir / entry["name"], "rb")) as f:
            samples += list(iter_samples(f))
    return samples


def npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def source_images(count: int) -> torch.Tensor:
    """The synthetic images of keys 0..count-1 as the model sees them, in [-1, 1]."""
    images = np.stack([synthetic_image(i, i % 10) for i in range(count)])
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def encode(args: list) -> int:
    from pipeline.cli import run_stage
    from pipeline.encode import main

    try:
        return run_stage(main, [str(a) for a in args])
    finally:
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    return save_checkpoints(tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """60 val samples in 3 shards of 20."""
    return make_split(tmp_path_factory.mktemp("source"), "val", 60, 20)


@pytest.fixture(scope="module")
def encoded(checkpoints, source, tmp_path_factory) -> dict[str, Path]:
    """Each checkpoint through the command line (Accelerate, one process, 2 readers)."""
    out = tmp_path_factory.mktemp("latents")
    splits = {}
    for name, ckpt in checkpoints.items():
        assert encode([ckpt, "--shards", source, "--output", out / name, "--num-workers", "2",
                       "--batch-size", "16", "--no-progress"]) == 0
        splits[name] = out / name / "val"
    return splits


@pytest.fixture(scope="module")
def models(checkpoints):
    from pipeline.models import from_pretrained

    return {name: from_pretrained(path) for name, path in checkpoints.items()}


# ---------------------------------------------------------------- the model contract

@pytest.mark.parametrize("case", model_cases(), ids=case_id)
def test_decoding_the_latents_gives_the_models_reconstructions(case):
    torch.manual_seed(0)
    from pipeline.models import build_model

    model = build_model(tiny_model_config(*case)).eval()
    x = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.inference_mode():
        out = model(x)
        latents = model.encode_latents(x)
        decoded = model.decode_latents(latents)
    assert decoded.shape == out.recon.shape
    assert torch.allclose(decoded, out.recon, atol=1e-5)
    channels, height, width = model.latent_shape
    stages = model.bottleneck.code_stages
    kind = {"ae": "latent", "vae": "moments"}.get(model.kind, "codes")
    assert model.latent_kind == kind
    if kind == "codes":
        assert latents.dtype == torch.int64
        assert latents.shape == ((3, height, width) if stages == 1 else (3, stages, height, width))
        assert 0 <= latents.min() and latents.max() < model.num_codes
        if stages == 1:
            assert torch.equal(latents, model.code_indices(out.stats))
        return
    assert stages == 1
    assert latents.shape == (3, channels * (2 if kind == "moments" else 1), height, width)
    with torch.inference_mode():
        assert torch.equal(latents[:, :channels], model.encode(x))  # eval mode: the mean
        half = model.decode_latents(latents.half())  # as latent shards store them
    assert (half - out.recon).abs().max() < FLOAT16_ATOL


def test_the_vae_moments_are_its_posterior_and_its_mean_alone_decodes_the_same():
    from pipeline.models import build_model

    torch.manual_seed(0)
    model = build_model(tiny_model_config("vae")).eval()
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.inference_mode():
        mean, logvar = model.bottleneck.posterior(model.encoder(x))
        moments = model.encode_latents(x)
        assert torch.equal(moments, torch.cat([mean, logvar], 1))
        assert torch.equal(model.decode_latents(moments), model.decode_latents(mean))


@pytest.mark.parametrize("quantizer", ["vq", "fsq"])
def test_codes_map_back_to_the_latents_the_quantiser_hands_on(quantizer):
    from pipeline.models import build_model

    torch.manual_seed(0)
    model = build_model(tiny_model_config("vqvae", quantizer=quantizer)).eval()
    neck = model.bottleneck
    h = model.encoder(torch.rand(2, 3, 64, 64) * 2 - 1)
    with torch.inference_mode():
        z_q, _, stats = neck(h)
        z = neck.latent_from_codes(stats["indices"])
    assert z.shape == z_q.shape and torch.allclose(z, z_q, atol=1e-6)
    codes = torch.arange(model.num_codes).view(1, 1, -1)
    table = neck.latent_from_codes(codes)[0, :, 0].t()  # K x D: one row per code
    if quantizer == "vq":
        assert torch.equal(table, neck.codes())
    else:  # every code a distinct point of the [-1, 1] grid
        assert table.abs().max() <= 1 and len(torch.unique(table, dim=0)) == model.num_codes
        assert torch.equal(neck.codes_to_indices(table), codes.flatten())


# ---------------------------------------------------------------- the shards

@pytest.mark.parametrize("name", KINDS)
def test_latent_shards_and_manifest_per_kind(encoded, checkpoints, source, models, name):
    from pipeline.data import LATENT_FORMAT

    split = encoded[name]
    manifest, model = read_manifest(split), models[name]
    assert manifest["format"] == LATENT_FORMAT and manifest["split"] == "val"
    assert manifest["num_samples"] == 60 and manifest["num_skipped"] == 0
    source_manifest = read_manifest(source)
    assert [s["name"] for s in manifest["shards"]] == [s["name"] for s in source_manifest["shards"]]
    assert [s["source_shard"] for s in manifest["shards"]] == [s["name"] for s in
                                                                source_manifest["shards"]]
    assert [s["num_samples"] for s in manifest["shards"]] == [20, 20, 20]
    assert manifest["source"]["manifest_hash"] == manifest_hash(source)
    assert manifest["classes"] == source_manifest["classes"] and manifest["image_size"] == 64
    ckpt = manifest["checkpoint"]
    assert ckpt["step"] == 7 and ckpt["path"] == str(checkpoints[name].resolve())
    assert ckpt["model_sha256"] == sha256_file(checkpoints[name] / "model.safetensors")
    latent = manifest["latent"]
    channels = model.latent_shape[0]
    shape = {"ae": [channels, SIDE, SIDE],
             "vae": [2 * channels, SIDE, SIDE]}.get(name, [SIDE, SIDE])
    assert (latent["member"], latent["shape"]) == (MEMBERS[name], shape)
    assert latent["dtype"] == ("uint16" if name in ("vq", "fsq") else "float16")
    import yaml

    from pipeline.config import from_dict
    from pipeline.encode import EncodeConfig

    saved = yaml.safe_load((split / ".progress" / "encode.yaml").read_text())
    saved = from_dict(EncodeConfig, saved)
    assert (saved.shards, saved.num_workers, saved.batch_size) == (str(source), 2, 16)
    samples = samples_of(split)
    originals = samples_of(source)
    assert [key for key, _ in samples] == [key for key, _ in originals]  # source order
    for (key, members), (_, original) in zip(samples, originals):
        assert set(members) == {MEMBERS[name], "cls", "json"}
        assert members["cls"] == original["cls"]
        shard = f"val-{int(key.split('_')[1]) // 20:06d}.tar"
        assert json.loads(members["json"]) == {"key": key, "shard": shard, "flip": False}
        array = npy(members[MEMBERS[name]])
        assert list(array.shape) == shape and array.dtype == np.dtype(latent["dtype"])


@pytest.mark.parametrize("name", KINDS)
def test_stored_latents_decode_to_the_models_reconstructions(encoded, models, name):
    model = models[name]
    x = source_images(60)
    stored = np.stack([npy(m[MEMBERS[name]]) for _, m in samples_of(encoded[name])])
    with torch.inference_mode():
        out = model(x)
        latents = torch.from_numpy(stored.astype(np.int64) if name in ("vq", "fsq") else stored)
        decoded = model.decode_latents(latents)
        exact = model.encode_latents(x).numpy()
    if name in ("vq", "fsq"):
        assert torch.equal(latents, model.code_indices(out.stats))
        assert torch.allclose(decoded, out.recon, atol=1e-5)
    else:
        assert np.allclose(stored, exact, rtol=2 ** -10, atol=1e-6)
        assert (decoded - out.recon).abs().max() < FLOAT16_ATOL


@pytest.mark.parametrize("name", ["ae", "vae"])
def test_latent_statistics_are_float64_figures_of_the_latent_or_posterior_mean(
        encoded, models, name):
    model = models[name]
    channels = model.latent_shape[0]
    with torch.inference_mode():
        values = model.encode_latents(source_images(60))[:, :channels].double().numpy()
    manifest = read_manifest(encoded[name])
    stats = manifest["latent_stats"]
    per_channel = values.transpose(1, 0, 2, 3).reshape(channels, -1)
    # The same float32 latents up to the batch composition (16 here, 60 there).
    assert stats["channel_mean"] == pytest.approx(per_channel.mean(1).tolist(), rel=1e-6)
    assert stats["channel_std"] == pytest.approx(per_channel.std(1).tolist(), rel=1e-6)
    assert stats["mean"] == pytest.approx(values.mean(), rel=1e-6)
    assert stats["std"] == pytest.approx(values.std(), rel=1e-6)
    assert stats["count"] == values.size
    assert manifest["scaling_factor"] == pytest.approx(1 / values.std(), rel=1e-6)
    assert manifest["shift_factor"] == stats["mean"]


def test_codes_have_no_statistics(encoded):
    for name in ("vq", "fsq"):
        manifest = read_manifest(encoded[name])
        assert manifest["latent_stats"] is None
        assert manifest["scaling_factor"] is manifest["shift_factor"] is None


def test_vae_mean_and_sample_modes(checkpoints, source, encoded, models, tmp_path):
    from pipeline.encode import sample_seed

    encode_into(checkpoints["vae"], source, tmp_path / "mean", latent="mean")
    encode_into(checkpoints["vae"], source, tmp_path / "sample", latent="sample", seed=3)
    moments = {key: npy(m["moments.npy"]) for key, m in samples_of(encoded["vae"])}
    means = samples_of(tmp_path / "mean" / "val")
    channels = models["vae"].latent_shape[0]
    for key, members in means:
        assert set(members) == {"latent.npy", "cls", "json"}
        assert np.array_equal(npy(members["latent.npy"]), moments[key][:channels])
    for key, members in samples_of(tmp_path / "sample" / "val"):
        mean, logvar = torch.from_numpy(moments[key].astype(np.float32)).chunk(2)
        noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(
            sample_seed(3, key)))
        expected = (mean + torch.exp(0.5 * logvar) * noise).numpy()
        assert np.allclose(npy(members["latent.npy"]), expected, rtol=2 ** -9, atol=1e-3)
    manifests = [read_manifest(p) for p in (encoded["vae"], tmp_path / "mean" / "val",
                                            tmp_path / "sample" / "val")]
    assert [m["latent"]["mode"] for m in manifests] == ["moments", "mean", "sample"]
    assert manifests[2]["latent"]["seed"] == 3
    # The statistics are always those of the posterior mean.
    for manifest in manifests[1:]:
        for name, value in manifests[0]["latent_stats"].items():
            assert manifest["latent_stats"][name] == pytest.approx(value, rel=1e-6), name


def test_flip_both_adds_the_mirrored_images_latents_after_each(checkpoints, source, encoded,
                                                              models, tmp_path):
    encode_into(checkpoints["vae"], source, tmp_path, flip="both")
    samples = samples_of(tmp_path / "val")
    plain = dict(samples_of(encoded["vae"]))
    keys = [key for key, _ in samples]
    assert keys == [k for key in plain for k in (key, key + "+flip")]
    model = models["vae"]
    with torch.inference_mode():
        mirrored = model.encode_latents(source_images(60).flip(3)).numpy()
    for i, key in enumerate(plain):
        (_, original), (_, flipped) = samples[2 * i], samples[2 * i + 1]
        assert original == plain[key]  # the same bytes as without --flip
        assert json.loads(flipped["json"]) == {"key": key, "shard": f"val-{i // 20:06d}.tar",
                                               "flip": True}
        assert flipped["cls"] == original["cls"]
        assert np.allclose(npy(flipped["moments.npy"]), mirrored[i], rtol=2 ** -10, atol=1e-6)
    manifest = read_manifest(tmp_path / "val")
    assert manifest["num_samples"] == 120 and manifest["flip"] == "both"
    assert manifest["latent_stats"]["count"] == 120 * SIDE * SIDE * model.latent_shape[0]


# ---------------------------------------------------------------- resume

def split_files(split_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(split_dir.glob("*.tar"))}


def test_resume_redoes_only_missing_or_damaged_shards(checkpoints, source, encoded, tmp_path):
    split = Path(shutil.copytree(encoded["vae"].parent, tmp_path / "out")) / "val"
    before = split_files(split)
    kept = (split / "val-000000.tar").stat().st_ino
    (split / "val-000001.tar").unlink()
    with open(split / "val-000002.tar", "ab") as f:
        f.write(b"\0" * 512)
    (split / "manifest.json").unlink()
    summary = encode_into(checkpoints["vae"], source, tmp_path / "out", batch_size=16)
    assert summary.complete_before == 1 and summary.num_samples == 60
    assert (split / "val-000000.tar").stat().st_ino == kept  # not rewritten
    assert split_files(split) == before
    manifest, reference = read_manifest(split), read_manifest(encoded["vae"])
    assert manifest["shards"] == reference["shards"]
    assert manifest["latent_stats"] == reference["latent_stats"]


@pytest.fixture(scope="module")
def tiny_ae(tmp_path_factory) -> Path:
    from pipeline.config import Config
    from pipeline.models import build_model, save_pretrained

    cfg = tiny_model_config("ae", widths=[4, 8, 8], latent_channels=8)
    torch.manual_seed(0)
    return save_pretrained(build_model(cfg), tmp_path_factory.mktemp("tiny") / "model",
                           Config(model=cfg), step=1)


class FullDisk:
    """ShardWriter whose `add` fails with ENOSPC once `budget` samples went in."""

    def __init__(self, budget: int):
        self.left = budget
        from pipeline.shards import ShardWriter

        outer = self

        class Writer(ShardWriter):
            def add(self, key, members):
                if outer.left == 0:
                    raise OSError(errno.ENOSPC, "No space left on device", str(self.tmp))
                outer.left -= 1
                super().add(key, members)
        self.writer = Writer


@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(num_samples=st.integers(1, 40), shard_size=st.integers(1, 17),
       batch_size=st.integers(1, 9), fail_after=st.integers(0, 45),
       flip=st.sampled_from(["none", "both"]))
def test_a_job_stopped_at_any_point_resumes_to_the_uninterrupted_shards(
        tiny_ae, num_samples, shard_size, batch_size, fail_after, flip):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        source = make_split(root, "train", num_samples, shard_size, num_classes=3)
        encode_into(tiny_ae, source, root / "clean", batch_size=batch_size, flip=flip)
        clean = root / "clean" / "train"
        with mock.patch("pipeline.encode.run.ShardWriter", FullDisk(fail_after).writer):
            try:
                encode_into(tiny_ae, source, root / "cut", batch_size=batch_size, flip=flip)
            except OSError as error:
                assert error.errno == errno.ENOSPC
        cut = root / "cut" / "train"
        leftovers = [p.name for p in cut.rglob("*") if ".tmp-" in p.name]
        assert leftovers == []  # nothing partial behind
        for record in (cut / ".progress").glob("*.tar.json"):  # a record: its shard complete
            name = record.name.removesuffix(".json")
            assert (cut / name).read_bytes() == (clean / name).read_bytes()
        summary = encode_into(tiny_ae, source, root / "cut", batch_size=batch_size, flip=flip)
        assert split_files(cut) == split_files(clean)
        assert read_manifest(cut)["latent_stats"] == read_manifest(clean)["latent_stats"]
        keys = Counter(key for key, _ in samples_of(cut))
        expected = Counter(f"train_{i:06d}" + mark for i in range(num_samples)
                           for mark in ([""] if flip == "none" else ["", "+flip"]))
        assert keys == expected and summary.num_samples == sum(expected.values())


@given(todo=st.lists(st.integers(0, 500), unique=True).map(sorted),
       world_size=st.integers(1, 9))
def test_each_shard_left_is_encoded_by_exactly_one_process(todo, world_size):
    from pipeline.encode import rank_shards

    shares = [rank_shards(todo, rank, world_size) for rank in range(world_size)]
    assert Counter(i for share in shares for i in share) == Counter(todo)
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


@given(st.data())
def test_statistics_from_shard_sums_do_not_depend_on_the_split_into_shards(data):
    from pipeline.encode import LatentSums, latent_statistics

    channels = data.draw(st.integers(1, 4))
    count = data.draw(st.integers(1, 12))
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 32 - 1)))
    values = torch.from_numpy(rng.normal(3, 2, (count, channels, 2, 3)))
    cuts = sorted(data.draw(st.lists(st.integers(0, count), max_size=4)))
    partials = []
    for start, stop in zip([0, *cuts], [*cuts, count]):
        sums = LatentSums(channels)
        sums.add(values[start:stop])
        partials.append(sums.to_record())
    stats = latent_statistics(partials)
    flat = values.numpy().transpose(1, 0, 2, 3).reshape(channels, -1)
    assert stats["channel_mean"] == pytest.approx(flat.mean(1).tolist(), rel=1e-9)
    assert stats["channel_std"] == pytest.approx(flat.std(1).tolist(), rel=1e-7, abs=1e-12)
    assert stats["mean"] == pytest.approx(flat.mean(), rel=1e-9)
    assert stats["std"] == pytest.approx(flat.std(), rel=1e-7, abs=1e-12)
    assert stats["count"] == flat.size


def test_npy_members_are_what_np_save_writes(models):
    from pipeline.encode import plan_latents

    for model in models.values():
        plan = plan_latents(model, "auto")
        array = np.arange(math.prod(plan.shape)).reshape(plan.shape).astype(plan.dtype)
        buffer = io.BytesIO()
        np.save(buffer, array)
        assert plan.npy_header() + array.tobytes() == buffer.getvalue()


# ---------------------------------------------------------------- counts and refusals

def test_unreadable_samples_are_skipped_and_counted(checkpoints, tmp_path, capsys):
    from pipeline.shards import write_shard

    split = make_split(tmp_path / "src", "val", 30, 10)
    name = read_manifest(split)["shards"][1]["name"]
    with open(split / name, "rb") as f:
        samples = list(iter_samples(f))
    samples[3][1]["png"] = b"not a png"
    write_shard(split / name, samples)  # same name, count and keys: one sample broken
    with pytest.warns(Warning, match="val_000013"):
        summary = encode_into(checkpoints["vq"], split, tmp_path / "out")
    manifest = read_manifest(tmp_path / "out" / "val")
    assert summary.num_samples == manifest["num_samples"] == 29
    assert manifest["num_skipped"] == 1 and manifest["shards"][1]["num_skipped"] == 1
    keys = [key for key, _ in samples_of(tmp_path / "out" / "val")]
    assert Counter(keys) == Counter(f"val_{i:06d}" for i in range(30) if i != 13)
    assert "1 unreadable source samples were skipped" in capsys.readouterr().err
    with pytest.raises(PipelineError, match="val_000013.*--on-error warn skips it"):
        encode_into(checkpoints["vq"], split, tmp_path / "raise", on_error="raise")


def test_specs_without_a_manifest_need_a_split_name_and_pipe_urls_work(checkpoints, source,
                                                                      encoded, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for shard in source.glob("*.tar"):
        shutil.copy(shard, bare / shard.name)
    pattern = str(bare / "val-{000000..000002}.tar")
    with pytest.raises(PipelineError, match="pass --split NAME"):
        encode_into(checkpoints["ae"], pattern, tmp_path / "a")
    encode_into(checkpoints["ae"], pattern, tmp_path / "a", split="held_out")
    pipes = [f"pipe:cat {bare / f'val-{i:06d}.tar'}" for i in range(3)]
    encode_into(checkpoints["ae"], "::".join(pipes), tmp_path / "b", split="held_out")
    for out in (tmp_path / "a", tmp_path / "b"):
        manifest = read_manifest(out / "held_out")
        assert manifest["num_samples"] == 60 and manifest["source"]["num_samples"] is None
        names = [f"held_out-{i:06d}.tar" for i in range(3)]
        assert [s["name"] for s in manifest["shards"]] == names
        assert [m for _, m in samples_of(out / "held_out")] == [m for _, m in
                                                                samples_of(encoded["ae"])]


def test_refusals_name_the_problem(checkpoints, source, encoded, tmp_path, capsys):
    from pipeline.locking import acquire

    def refused(*args) -> str:
        assert encode([*args, "--no-progress"]) == 2
        return capsys.readouterr().err

    out = Path(shutil.copytree(encoded["ae"].parent, tmp_path / "ae"))
    assert "holds latents of another job (model_sha256" in refused(
        checkpoints["vae"], "--shards", source, "--output", out)
    assert "--latent mean applies to a VAE" in refused(
        checkpoints["ae"], "--shards", source, "--output", tmp_path / "x", "--latent", "mean")
    (tmp_path / "foreign" / "val").mkdir(parents=True)
    (tmp_path / "foreign" / "val" / "notes.txt").write_text("mine")
    assert "was not written by `pipeline encode`" in refused(
        checkpoints["ae"], "--shards", source, "--output", tmp_path / "foreign")
    with acquire(out / "val" / ".progress" / "lock", "test"):
        assert "is in use by another job" in refused(
            checkpoints["ae"], "--shards", source, "--output", out)
    small = make_split(tmp_path / "small", "val", 4, 4, size=32)
    assert "holds 32x32 images but the checkpoint encodes 64x64" in refused(
        checkpoints["ae"], "--shards", small, "--output", tmp_path / "y")
    assert "these are latent shards already" in refused(
        checkpoints["ae"], "--shards", encoded["ae"], "--output", tmp_path / "z")
    assert "--split '../up'" in refused(checkpoints["ae"], "--shards", source, "--output",
                                        tmp_path / "w", "--split", "../up")


def test_a_full_disk_is_one_line_and_leaves_nothing_partial(checkpoints, source, tmp_path,
                                                             capsys):
    with mock.patch("pipeline.encode.run.ShardWriter", FullDisk(25).writer):
        assert encode([checkpoints["vq"], "--shards", source, "--output", tmp_path,
                       "--no-progress", "--num-workers", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "No space left on device" in err[-1]
    split = tmp_path / "val"
    assert sorted(p.name for p in split.glob("*.tar")) == ["val-000000.tar"]
    assert not list(split.rglob("*.tmp-*")) and not (split / "manifest.json").exists()


# ---------------------------------------------------------------- processes

def test_two_processes_give_the_shards_and_statistics_of_one(checkpoints, source, encoded,
                                                            tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", "2", "-m", "pipeline.encode", checkpoints["vae"],
               "--shards", source, "--output", tmp_path, "--batch-size", "16",
               "--num-workers", "1", "--no-progress"]
    done = subprocess.run([str(c) for c in command], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("val: 60 latents in 3 shards") == 1  # the main process reports
    two, one = read_manifest(tmp_path / "val"), read_manifest(encoded["vae"])
    assert [s["num_samples"] for s in two["shards"]] == [s["num_samples"] for s in one["shards"]]
    assert two["latent_stats"]["count"] == one["latent_stats"]["count"]
    for name in ("channel_mean", "channel_std"):
        assert two["latent_stats"][name] == pytest.approx(one["latent_stats"][name], rel=1e-6)
    assert two["scaling_factor"] == pytest.approx(one["scaling_factor"], rel=1e-6)
    samples_two, samples_one = samples_of(tmp_path / "val"), samples_of(encoded["vae"])
    assert Counter(k for k, _ in samples_two) == Counter(k for k, _ in samples_one)
    assert len(samples_two) == 60 == read_manifest(source)["num_samples"]
    for (key, a), (_, b) in zip(samples_two, samples_one):
        assert a["cls"] == b["cls"] and a["json"] == b["json"]
        assert np.allclose(npy(a["moments.npy"]), npy(b["moments.npy"]), rtol=2 ** -10,
                           atol=1e-6), key


# ---------------------------------------------------------------- decode

def test_decode_writes_a_grid_of_the_reconstructions(checkpoints, source, encoded, models,
                                                    tmp_path, capsys):
    from pipeline.cli import run_stage
    from pipeline.decode import main

    assert run_stage(main, [str(encoded["vae"]), "--checkpoint", str(checkpoints["vae"]),
                            "--output", str(tmp_path), "--num-images", "10",
                            "--columns", "4"]) == 0
    grid = np.asarray(Image.open(tmp_path / "decoded.png"))
    assert grid.shape == (3 * 64, 4 * 64, 3)
    with torch.inference_mode():
        recon = models["vae"](source_images(10)).recon
    expected = ((recon.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    for i in range(10):
        row, column = divmod(i, 4)
        tile = grid[row * 64:(row + 1) * 64, column * 64:(column + 1) * 64]
        assert np.abs(tile.astype(int) - expected[i]).max() <= 2
    assert not grid[2 * 64:, 2 * 64:].any()  # no image after the tenth
    assert json.loads((tmp_path / "decoded.json").read_text())["keys"] == [
        f"val_{i:06d}" for i in range(10)]
    assert run_stage(main, [str(encoded["vq"]), "--checkpoint", str(checkpoints["vae"]),
                            "--output", str(tmp_path)]) == 2
    assert "does not read codes latents" in capsys.readouterr().err
    assert run_stage(main, [str(source), "--checkpoint", str(checkpoints["vae"]),
                            "--output", str(tmp_path)]) == 2
    assert "holds images, not latents" in capsys.readouterr().err
    assert run_stage(main, [str(encoded["fsq"]), "--checkpoint", str(checkpoints["vq"]),
                            "--output", str(tmp_path)]) == 2  # 1000 FSQ codes, 32 VQ codes
    assert "does not read codes latents of shape (8, 8) (its own: (8, 8), 32 codes)" in \
        capsys.readouterr().err
    other = save_checkpoints(tmp_path / "others", seed=1)["vq"]
    with pytest.warns(UserWarning, match="not the one that encoded these latents"):
        assert run_stage(main, [str(encoded["vq"]), "--checkpoint", str(other),
                                "--output", str(tmp_path / "other")]) == 0


def test_decode_names_a_code_outside_the_checkpoints_alphabet(checkpoints, encoded, tmp_path,
                                                             capsys):
    from pipeline.cli import run_stage
    from pipeline.decode import main
    from pipeline.shards import write_manifest, write_shard

    split = Path(shutil.copytree(encoded["vq"], tmp_path / "copy"))
    manifest = read_manifest(split)
    samples = samples_of(split)[:20]
    crafted = io.BytesIO()
    np.save(crafted, np.full((SIDE, SIDE), 40, dtype=np.uint16))  # K is 32
    samples[2][1]["codes.npy"] = crafted.getvalue()
    manifest["shards"][0].update(write_shard(split / manifest["shards"][0]["name"],
                                             samples).to_dict())
    write_manifest(split, manifest)
    assert run_stage(main, [str(split), "--checkpoint", str(checkpoints["vq"]),
                            "--output", str(tmp_path / "out")]) == 2
    assert "sample val_000002 holds a code outside [0, 32)" in capsys.readouterr().err


def test_export_takes_the_scaling_factor_encode_recorded_and_measures_the_same(source,
                                                                               tmp_path):
    """`pipeline export --latents` reads this manifest's names; its own measurement over
    the image shards (`--shards`) agrees with encode's statistics."""
    pytest.importorskip("diffusers")
    pytest.importorskip("pipeline.export")
    from pipeline.cli import main
    from pipeline.config import Config
    from pipeline.models import build_model, save_pretrained

    cfg = tiny_model_config("vae", arch="resnet")
    torch.manual_seed(0)
    ckpt = save_pretrained(build_model(cfg), tmp_path / "model", Config(model=cfg), step=3)
    encode_into(ckpt, source, tmp_path / "latents")
    latents = read_manifest(tmp_path / "latents" / "val")
    exports = {}
    for name, option in (("from_latents", ["--latents", tmp_path / "latents" / "val"]),
                         ("measured", ["--shards", source])):
        assert main(["export", str(ckpt), "--format", "diffusers", "--output",
                     str(tmp_path / name), *map(str, option)]) == 0
        exports[name] = json.loads((tmp_path / name / "export.json").read_text())
    assert exports["from_latents"]["scaling_factor"] == latents["scaling_factor"]
    assert exports["from_latents"]["shift_factor"] == latents["shift_factor"]
    assert exports["measured"]["scaling_factor"] == pytest.approx(latents["scaling_factor"],
                                                                  rel=1e-6)
    assert exports["measured"]["shift_factor"] == pytest.approx(latents["shift_factor"],
                                                                rel=1e-6)
