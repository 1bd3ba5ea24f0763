"""`pipeline export` as a stage: where the scaling factor comes from (option, an encoded
latent set's manifest, a pass over image shards, the run's own val shards), the options,
and the output directory (atomic, --force, locked, nothing partial on a full disk)."""
from __future__ import annotations

import errno
import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from modelgen import tiny_model_config
from pipeline.cli import main as cli_main
from pipeline.encode.store import LatentSums, latent_statistics
from pipeline.export import main as export_main
from pipeline.locking import acquire
from pipeline.models import build_model, save_pretrained
from pipeline.utils import PipelineError, sha256_file
from shardgen import make_split, synthetic_image

NUM_VAL = 10


@pytest.fixture(scope="module")
def vae_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model(tiny_model_config("vae", "resnet")).eval()
    root = tmp_path_factory.mktemp("export_cli")
    val = make_split(root / "shards", "val", NUM_VAL, 4)
    ckpt = save_pretrained(model, root / "run" / "model", {"data": {"val_shards": str(val)}},
                           step=5)
    return model, ckpt, val


def posterior_means(model, indices) -> np.ndarray:
    """The VAE's posterior means of the split's images, computed here in one batch."""
    arrays = np.stack([synthetic_image(i, i % 10) for i in indices])
    x = torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        return model.bottleneck.posterior(model.encoder(x))[0].double().numpy()


def export(ckpt, out, *options) -> dict:
    assert export_main([str(ckpt), "--output", str(out), *options]) == 0
    return json.loads((out / "export.json").read_text())


def diffusers_config(out) -> dict:
    return json.loads((out / "config.json").read_text())


# ---------------------------------------------------------------- scaling from shards

def test_scaling_measured_on_shards_is_one_over_the_std_of_the_posterior_means(tmp_path,
                                                                              vae_checkpoint):
    model, ckpt, val = vae_checkpoint
    record = export(ckpt, tmp_path / "out", "--shards", str(val), "--batch-size", "3",
                    "--num-workers", "0")
    means = posterior_means(model, range(NUM_VAL))
    assert record["scaling"]["from"] == "--shards" and record["scaling"]["samples"] == NUM_VAL
    assert record["scaling_factor"] == pytest.approx(1 / means.std(), rel=1e-6)
    assert record["shift_factor"] == pytest.approx(means.mean(), abs=1e-6)
    stats = record["scaling"]["latent_stats"]
    # float32 latents of other batch sizes differ in the last bits: absolute for means near 0
    assert stats["channel_mean"] == pytest.approx(means.mean((0, 2, 3)).tolist(), abs=1e-6)
    assert stats["channel_std"] == pytest.approx(means.std((0, 2, 3)).tolist(), rel=1e-6)
    config = diffusers_config(tmp_path / "out")
    assert config["scaling_factor"] == record["scaling_factor"]
    assert config["shift_factor"] == record["shift_factor"]


def test_max_samples_measures_the_first_samples_only(tmp_path, vae_checkpoint):
    model, ckpt, val = vae_checkpoint
    record = export(ckpt, tmp_path / "out", "--shards", str(val), "--max-samples", "4",
                    "--num-workers", "0")
    assert record["scaling"]["samples"] == 4
    assert record["scaling_factor"] == pytest.approx(1 / posterior_means(model, range(4)).std(),
                                                     rel=1e-6)


def test_without_a_source_the_runs_val_shards_are_measured(tmp_path, vae_checkpoint):
    _, ckpt, val = vae_checkpoint
    default = export(ckpt, tmp_path / "default", "--num-workers", "0")
    given_ = export(ckpt, tmp_path / "given", "--shards", str(val), "--num-workers", "0")
    assert default["scaling"]["from"] == "the run's data.val_shards"
    assert default["scaling"]["shards"] == str(val)
    assert default["scaling_factor"] == given_["scaling_factor"]


def test_a_recorded_pipe_command_is_never_run(tmp_path):
    marker = tmp_path / "ran"
    model = build_model(tiny_model_config("vae", "resnet"))
    ckpt = save_pretrained(model, tmp_path / "ckpt",
                           {"data": {"val_shards": f"pipe:touch {marker}"}}, step=0)
    with pytest.raises(PipelineError, match="the run's data.val_shards"):
        export_main([str(ckpt), "--output", str(tmp_path / "out")])
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_no_source_and_none_recorded_names_the_options(tmp_path):
    ckpt = save_pretrained(build_model(tiny_model_config("vae", "resnet")), tmp_path / "ckpt",
                           {}, step=0)
    with pytest.raises(PipelineError, match="--scaling-factor X, --latents DIR .* --shards SPEC"):
        export_main([str(ckpt), "--output", str(tmp_path / "out")])


def test_a_malformed_recorded_config_is_no_source(tmp_path):
    ckpt = save_pretrained(build_model(tiny_model_config("vae", "resnet")), tmp_path / "ckpt",
                           {}, step=0)
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "config": ["not", "a", "dict"]}))
    with pytest.raises(PipelineError, match="records no data.val_shards"):
        export_main([str(ckpt), "--output", str(tmp_path / "out")])


def test_shards_of_another_image_size_are_refused(tmp_path, vae_checkpoint):
    _, ckpt, _ = vae_checkpoint
    small = make_split(tmp_path, "val", 2, 2, size=32)
    with pytest.raises(PipelineError, match="hold 32x32 images but the checkpoint was trained "
                                            "on 64x64"):
        export_main([str(ckpt), "--output", str(tmp_path / "out"), "--shards", str(small)])


@settings(max_examples=30, deadline=None)
@given(data=st.data(), channels=st.integers(1, 4), side=st.integers(1, 3),
       batches=st.integers(1, 5))
def test_latent_sums_give_the_statistics_of_the_whole_whatever_the_batches(data, channels,
                                                                            side, batches):
    total = data.draw(st.integers(batches, 12))
    cuts = sorted(data.draw(st.lists(st.integers(1, total - 1), min_size=batches - 1,
                                     max_size=batches - 1, unique=True))) if batches > 1 else []
    seed = data.draw(st.integers(0, 2 ** 16))
    z = torch.randn(total, channels, side, side, generator=torch.Generator().manual_seed(seed))
    z = z * 3 + 1.5
    sums = LatentSums(channels)
    for part in torch.tensor_split(z, cuts):
        sums.add(part)
    stats, whole = latent_statistics([sums.to_record()]), z.double().numpy()
    assert stats["count"] == total * channels * side * side
    assert stats["mean"] == pytest.approx(whole.mean(), rel=1e-9, abs=1e-12)
    assert stats["std"] == pytest.approx(whole.std(), rel=1e-9)
    assert stats["channel_mean"] == pytest.approx(whole.mean((0, 2, 3)).tolist(), rel=1e-9,
                                                  abs=1e-12)
    assert stats["channel_std"] == pytest.approx(whole.std((0, 2, 3)).tolist(), rel=1e-9,
                                                 abs=1e-12)


# ---------------------------------------------------------------- scaling from `pipeline encode`

def latent_manifest(directory, **fields):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "manifest.json").write_text(json.dumps(fields))
    return directory


def test_scaling_read_from_the_encoded_latents_manifest(tmp_path, vae_checkpoint):
    _, ckpt, _ = vae_checkpoint
    sha = sha256_file(ckpt / "model.safetensors")
    latents = latent_manifest(tmp_path / "latents" / "train", checkpoint={"model_sha256": sha},
                              scaling_factor=0.25, shift_factor=-0.5,
                              latent_stats={"mean": -0.5, "std": 4.0})
    record = export(ckpt, tmp_path / "out", "--latents", str(latents))
    assert (record["scaling_factor"], record["shift_factor"]) == (0.25, -0.5)
    assert record["scaling"]["from"] == "--latents"
    config = diffusers_config(tmp_path / "out")
    assert (config["scaling_factor"], config["shift_factor"]) == (0.25, -0.5)


def test_pipeline_encode_and_the_shards_pass_give_the_same_scaling_factor(tmp_path,
                                                                          vae_checkpoint):
    from pipeline.encode import main as encode_main

    _, ckpt, val = vae_checkpoint
    assert encode_main([str(ckpt), "--shards", str(val), "--output", str(tmp_path / "latents"),
                        "--num-workers", "0", "--batch-size", "3"]) == 0
    encoded = export(ckpt, tmp_path / "from-latents", "--latents",
                     str(tmp_path / "latents" / "val"))
    measured = export(ckpt, tmp_path / "from-shards", "--shards", str(val), "--num-workers", "0")
    assert encoded["scaling"]["from"] == "--latents"
    assert encoded["scaling_factor"] == pytest.approx(measured["scaling_factor"], rel=1e-6)
    assert encoded["shift_factor"] == pytest.approx(measured["shift_factor"], abs=1e-6)


@pytest.mark.parametrize("fields,message", [
    ({"checkpoint": {"model_sha256": "0" * 64}, "scaling_factor": 0.25},
     "encoded with model weights of sha256 0000"),
    ({"scaling_factor": 0.25}, "encoded with model weights of sha256 None"),
    ({"checkpoint": "SELF", "scaling_factor": None}, "records no scaling_factor"),
    ({"checkpoint": "SELF", "scaling_factor": "big"}, "scaling_factor must be a number > 0"),
    ({"checkpoint": "SELF", "scaling_factor": -1.0}, "scaling_factor must be a number > 0"),
    ({"checkpoint": "SELF", "scaling_factor": True}, "scaling_factor must be a number > 0"),
    ({"checkpoint": "SELF", "scaling_factor": 1.0, "shift_factor": [1]},
     "shift_factor must be a number or null"),
])
def test_latent_manifests_that_do_not_fit_are_refused(tmp_path, vae_checkpoint, fields, message):
    _, ckpt, _ = vae_checkpoint
    if fields.get("checkpoint") == "SELF":
        fields = {**fields,
                  "checkpoint": {"model_sha256": sha256_file(ckpt / "model.safetensors")}}
    latents = latent_manifest(tmp_path / "latents", **fields)
    with pytest.raises(PipelineError, match=message):
        export_main([str(ckpt), "--output", str(tmp_path / "out"), "--latents", str(latents)])
    assert not (tmp_path / "out").exists()


def test_a_missing_latent_manifest_is_named(tmp_path, vae_checkpoint):
    _, ckpt, _ = vae_checkpoint
    with pytest.raises(PipelineError, match="cannot read latent manifest .*manifest.json"):
        export_main([str(ckpt), "--output", str(tmp_path / "out"), "--latents",
                     str(tmp_path / "nowhere")])


# ---------------------------------------------------------------- options

@pytest.mark.parametrize("options,message", [
    (["--scaling-factor", "1", "--shards", "x"], "--scaling-factor and --shards: give one"),
    (["--latents", "a", "--shards", "b"], "--latents and --shards: give one"),
    (["--shift-factor", "1"], "--shift-factor goes with --scaling-factor"),
    (["--scaling-factor", "0"], "--scaling_factor must be > 0, got 0.0"),
    (["--scaling-factor", "nan"], "--scaling_factor must be > 0"),
    (["--format", "onnx"], "unknown --format 'onnx'; choose one of diffusers"),
    (["--scaling-factor", "1", "--max-samples", "3"], "--max-samples limits the measuring"),
])
def test_bad_options_exit_2_in_one_line_before_anything_is_read(tmp_path, capsys, options,
                                                                message):
    code = cli_main(["export", str(tmp_path / "no-ckpt"), "--output", str(tmp_path / "out"),
                     *options])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err, err


def test_a_missing_checkpoint_is_named(tmp_path, capsys):
    code = cli_main(["export", str(tmp_path / "no-ckpt"), "--output", str(tmp_path / "out"),
                     "--scaling-factor", "1"])
    assert code == 2 and "no-ckpt does not exist" in capsys.readouterr().err


# ---------------------------------------------------------------- the output directory

def test_an_existing_output_is_kept_unless_forced(tmp_path, vae_checkpoint):
    _, ckpt, _ = vae_checkpoint
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(PipelineError, match="exists: pass --force to replace it"):
        export_main([str(ckpt), "--output", str(out), "--scaling-factor", "1"])
    assert (out / "mine.txt").read_text() == "keep"
    export_main([str(ckpt), "--output", str(out), "--scaling-factor", "1", "--force"])
    assert not (out / "mine.txt").exists() and (out / "config.json").is_file()
    assert json.loads((out / "export.json").read_text())["options"]["force"] is True


def test_force_never_replaces_a_directory_holding_an_input(tmp_path, vae_checkpoint):
    model, _, _ = vae_checkpoint
    ckpt = save_pretrained(model, tmp_path / "out" / "ckpt", {}, step=1)
    with pytest.raises(PipelineError, match="holds the input .* --force would delete it"):
        export_main([str(ckpt), "--output", str(tmp_path / "out"), "--scaling-factor", "1",
                     "--force"])
    assert (ckpt / "model.safetensors").is_file()


def test_force_never_replaces_a_directory_holding_the_recorded_val_shards(tmp_path,
                                                                          vae_checkpoint):
    model, _, _ = vae_checkpoint
    val = make_split(tmp_path / "out" / "shards", "val", 2, 2)
    ckpt = save_pretrained(model, tmp_path / "ckpt", {"data": {"val_shards": str(val)}}, step=1)
    with pytest.raises(PipelineError, match="holds the input .*val"):
        export_main([str(ckpt), "--output", str(tmp_path / "out"), "--force"])
    assert (val / "manifest.json").is_file()


def test_a_second_export_to_the_same_output_is_refused(tmp_path, vae_checkpoint):
    _, ckpt, _ = vae_checkpoint
    out = tmp_path / "out"
    with acquire(tmp_path / ".out.lock", "test"), \
            pytest.raises(PipelineError, match="is in use by another job: pid"):
        export_main([str(ckpt), "--output", str(out), "--scaling-factor", "1"])
    assert not out.exists()


def test_a_full_disk_leaves_nothing_partial(tmp_path, vae_checkpoint, monkeypatch, capsys):
    import diffusers

    _, ckpt, _ = vae_checkpoint

    def full_disk(self, directory, **kwargs):
        (directory / "diffusion_pytorch_model.safetensors").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device",
                      str(directory / "diffusion_pytorch_model.safetensors"))

    monkeypatch.setattr(diffusers.ModelMixin, "save_pretrained", full_disk)
    code = cli_main(["export", str(ckpt), "--output", str(tmp_path / "out"),
                     "--scaling-factor", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "No space left on device; free space" in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.lock"]


def test_a_conversion_that_computes_otherwise_is_refused_before_writing(tmp_path,
                                                                       vae_checkpoint,
                                                                       monkeypatch):
    from pipeline.models import diffusers as conversion

    _, ckpt, _ = vae_checkpoint
    real_state_dict = conversion.diffusers_state_dict

    def swapped_state_dict(model):
        # a table that confused two layers of the same shape: same keys, other weights
        state = real_state_dict(model)
        first = "encoder.mid_block.resnets.0."
        state[first + "conv1.weight"], state[first + "conv2.weight"] = (
            state[first + "conv2.weight"], state[first + "conv1.weight"])
        return state

    monkeypatch.setattr(conversion, "diffusers_state_dict", swapped_state_dict)
    with pytest.raises(PipelineError, match="does not compute what the checkpoint does"):
        export_main([str(ckpt), "--output", str(tmp_path / "out"), "--scaling-factor", "1"])
    assert not (tmp_path / "out").exists()
