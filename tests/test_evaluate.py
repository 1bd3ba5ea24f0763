"""`pipeline evaluate`: metric functions against independent references, then the stage
end to end on tiny saved checkpoints (one and two processes, bad inputs)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import metrics
from pipeline.utils import PipelineError

REPO = Path(__file__).resolve().parents[1]


def unit_images(n: int = 4, seed: int = 0, low: float = 0.2, high: float = 0.8) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return low + (high - low) * torch.rand(n, 3, 64, 64, generator=g)


# ---------------------------------------------------------------- metric functions

def test_identical_images_give_capped_psnr_and_unit_ssim():
    x = unit_images()
    assert metrics.per_image_psnr(x, x).tolist() == [metrics.PSNR_CAP_DB] * 4
    assert metrics.psnr_from_mse(0.0) == metrics.PSNR_CAP_DB
    assert torch.allclose(metrics.per_image_ssim(x, x), torch.ones(4), atol=1e-5)
    assert torch.allclose(metrics.per_image_ms_ssim(x, x), torch.ones(4), atol=1e-5)


def test_psnr_of_known_noise_matches_hand_computation():
    sigma = 0.01
    x = unit_images()
    noise = sigma * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    psnr = metrics.per_image_psnr(x + noise, x)
    by_hand = [10 * math.log10(1 / float(np.mean(n.numpy().astype(np.float64) ** 2)))
               for n in noise]
    assert psnr.tolist() == pytest.approx(by_hand, abs=1e-3)
    assert psnr.mean().item() == pytest.approx(10 * math.log10(1 / sigma ** 2), abs=0.1)
    assert metrics.per_image_mse(x + noise, x).mean().item() == pytest.approx(sigma ** 2, rel=0.02)
    assert metrics.per_image_l1(x + noise, x).mean().item() == pytest.approx(
        sigma * math.sqrt(2 / math.pi), rel=0.02)  # E|N(0, s^2)| = s * sqrt(2/pi)


def test_mean_of_psnr_differs_from_psnr_of_mean_mse():
    # Two images with MSE 1e-2 and 1e-4: PSNR 20 and 40 dB, mean 30 dB; but the pooled
    # MSE (5.05e-3) is dominated by the worse image: 22.97 dB.
    target = torch.full((2, 3, 64, 64), 0.5)
    pred = target + torch.tensor([0.1, 0.01]).view(2, 1, 1, 1)
    psnr = metrics.per_image_psnr(pred, target)
    assert psnr.tolist() == pytest.approx([20.0, 40.0], abs=1e-3)
    mse = metrics.per_image_mse(pred, target).mean().item()
    assert metrics.psnr_from_mse(mse) == pytest.approx(10 * math.log10(1 / 5.05e-3), abs=1e-3)


@pytest.mark.parametrize("a, b", [(0.5, 0.5), (0.5, 0.25), (0.9, 0.1)])
def test_ssim_and_ms_ssim_of_flat_images_match_closed_form(a, b):
    # Flat images have no variance, so SSIM reduces to its luminance term
    # (2ab + C1) / (a^2 + b^2 + C1), C1 = (0.01 * range)^2; MS-SSIM keeps the luminance
    # term of the coarsest scale only, raised to that scale's weight.
    # float64: in float32, E[x^2] - E[x]^2 leaves a variance of ~1e-8 instead of 0.
    pred = torch.full((1, 3, 64, 64), a, dtype=torch.float64)
    target = torch.full((1, 3, 64, 64), b, dtype=torch.float64)
    c1 = 0.01 ** 2
    luminance = (2 * a * b + c1) / (a * a + b * b + c1)
    assert metrics.per_image_ssim(pred, target).item() == pytest.approx(luminance, abs=1e-5)
    assert metrics.per_image_ms_ssim(pred, target).item() == pytest.approx(
        luminance ** metrics.MS_SSIM_BETAS[-1], abs=1e-5)
    assert sum(metrics.MS_SSIM_BETAS) == pytest.approx(1.0)


def test_bits_per_image_per_bottleneck():
    assert metrics.bits_per_image("vqvae", "vq", (64, 4, 4), 512, [8]) == 16 * 9
    assert metrics.bits_per_image("vqvae", "fsq", (4, 8, 8), 512, [8, 5, 5, 5]) == \
        pytest.approx(64 * (3 + 3 * math.log2(5)))
    assert metrics.bits_per_image("vae", "vq", (8, 4, 4), 512, [8], kl_nats=10.0) == \
        pytest.approx(10 / math.log(2))
    assert metrics.bits_per_image("ae", "vq", (512, 4, 4), 512, [8]) is None
    assert metrics.num_codes("fsq", 512, [8, 5, 5, 5]) == 1000


def test_code_usage_and_perplexity_from_counts():
    assert metrics.code_usage(torch.tensor([2.0, 2.0, 0.0, 0.0])) == pytest.approx((50.0, 2.0))
    assert metrics.code_usage(torch.tensor([4.0, 0.0, 0.0, 0.0])) == pytest.approx((25.0, 1.0))
    assert metrics.code_usage(torch.zeros(4)) == (0.0, 1.0)  # no codes: no information


def normal_cdf(x: float, mean: float, sigma: float) -> float:
    return 0.5 * (1 + math.erf((x - mean) / (sigma * math.sqrt(2))))


def test_discretized_gaussian_nll_matches_hand_computation():
    target = torch.tensor([0.0, 1 / 255, 0.5, 1.0]).view(1, 4, 1, 1)
    mean = torch.tensor([0.02, 0.0, 0.47, 0.9]).view(1, 4, 1, 1)
    sigma, half = 0.05, 0.5 / 255
    cdf = normal_cdf
    probs = [cdf(half, 0.02, sigma),                                           # lowest bin
             cdf(1 / 255 + half, 0, sigma) - cdf(1 / 255 - half, 0, sigma),
             cdf(0.5 + half, 0.47, sigma) - cdf(0.5 - half, 0.47, sigma),
             1 - cdf(1 - half, 0.9, sigma)]                                    # highest bin
    expected = -sum(math.log(p) for p in probs)
    assert metrics.discretized_gaussian_nll(target, mean, sigma).item() == \
        pytest.approx(expected, rel=1e-6)


def test_sum_reducer_reduces_once_and_splits_back():
    sums = metrics.SumReducer({"count": 1, "per_class": 3, "empty": 0})
    sums.add("count", torch.ones(5))
    sums.add_at("per_class", torch.tensor([0, 2, 2]), torch.tensor([1.0, 2.0, 3.0]))
    calls = []

    def fake_all_reduce(flat):  # two ranks holding the same sums
        calls.append(flat.shape)
        return flat * 2

    out = sums.reduce(fake_all_reduce)
    assert calls == [(4,)]
    assert out["count"].tolist() == [10.0]
    assert out["per_class"].tolist() == [2.0, 0.0, 10.0]
    assert out["empty"].numel() == 0
    assert metrics.lowest_k([(3.0, "b"), (1.0, "z"), (1.0, "a")], 2) == [(1.0, "a"), (1.0, "z")]


# ---------------------------------------------------------------- LPIPS / rFID wiring

@pytest.fixture(scope="module")
def lpips_files(tmp_path_factory):
    """Randomly initialised stand-ins in the accepted formats (no download)."""
    import torchvision

    root = tmp_path_factory.mktemp("lpips")
    torch.manual_seed(0)
    # Only `features.*` is used; saving just those keeps the file at 10 MB instead of 240.
    backbone = torchvision.models.alexnet(weights=None).state_dict()
    torch.save({k: v for k, v in backbone.items() if k.startswith("features.")},
               root / "alexnet.pth")
    linear = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1)
              for i, c in enumerate(metrics.LPIPS_NETS["alex"][1])}
    torch.save(linear, root / "alex.pth")
    return root / "alexnet.pth", root / "alex.pth"


def test_lpips_from_local_files(lpips_files):
    lpips = metrics.load_lpips(*lpips_files)
    x, y = unit_images(2, seed=0), unit_images(2, seed=1)
    assert lpips(x, x).tolist() == pytest.approx([0.0, 0.0], abs=1e-6)
    assert (lpips(x, y) > 0).all()
    assert lpips(x, y).shape == (2,)


def test_lpips_file_errors_name_the_file(lpips_files, tmp_path):
    backbone, linear = lpips_files
    with pytest.raises(PipelineError, match="--lpips-backbone .*nope.pth: no such file"):
        metrics.load_lpips(tmp_path / "nope.pth", linear)
    with pytest.raises(PipelineError, match=f"--lpips-linear {backbone}: expected lin0"):
        metrics.load_lpips(backbone, backbone)  # a backbone is not a linear-layer file
    with pytest.raises(PipelineError, match=f"--lpips-backbone {linear}: not a torchvision"):
        metrics.load_lpips(linear, linear)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a pickle")
    with pytest.raises(PipelineError, match="not a readable torch state dict"):
        metrics.load_lpips(garbage, linear)


def test_fid_file_errors_name_the_file(tmp_path):
    pytest.importorskip("torch_fidelity")
    with pytest.raises(PipelineError, match="--inception-weights .*none.pth: no such file"):
        metrics.load_fid(tmp_path / "none.pth")
    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, wrong)
    with pytest.raises(PipelineError, match=f"--inception-weights {wrong}: not torch-fidelity"):
        metrics.load_fid(wrong)


# ---------------------------------------------------------------- end to end

KINDS = {"ae": ("ae", "vq"), "vae": ("vae", "vq"), "vq": ("vqvae", "vq"), "fsq": ("vqvae", "fsq")}
LATENT_SIDE = 8  # three stride-2 layers: 64 / 2**3
FSQ_LEVELS = [8, 5, 5, 5]


def strict_json(path: Path) -> dict:
    def reject(constant):
        raise AssertionError(f"{path} holds {constant}: not strict JSON")
    return json.loads(path.read_text(), parse_constant=reject)


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    """A randomly initialised Inception-v3 in torch-fidelity's weight format (no download)."""
    pytest.importorskip("torch_fidelity")
    from unittest import mock

    from torch_fidelity import feature_extractor_inceptionv3 as fe

    torch.manual_seed(0)
    # The constructor insists on loading weights; skip that to get the random init.
    with mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: None), \
            mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda *a: None):
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    path = tmp_path_factory.mktemp("inception") / "inception.pth"
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """One tiny untrained export per bottleneck, saved as training would save it."""
    from pipeline.config import Config, ModelConfig
    from pipeline.models import build_model, save_pretrained

    root = tmp_path_factory.mktemp("runs")
    paths = {}
    for name, (model, quantizer) in KINDS.items():
        cfg = ModelConfig(model=model, quantizer=quantizer, widths=[8, 16, 32],
                          latent_channels=32 if model == "ae" else 4, codebook_size=32,
                          code_dim=4, fsq_levels=FSQ_LEVELS)
        torch.manual_seed(0)
        run_dir = root / name
        paths[name] = save_pretrained(build_model(cfg), run_dir / "model", Config(model=cfg),
                                      step=7, run_dir=run_dir)
    return paths


@pytest.fixture
def fresh_accelerate_state():
    """main() runs in this process: drop Accelerate's singleton state afterwards."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def evaluate(args: list[str]) -> int:
    from pipeline.cli import run_stage
    from pipeline.evaluate import main

    return run_stage(main, [str(a) for a in args])


FAST = ["--num-workers", "0", "--batch-size", "50", "--throughput-batches", "1"]


@pytest.fixture(scope="module")
def evaluated(checkpoints, synthetic_shards, tmp_path_factory) -> Path:
    """All four checkpoints in ONE call, one process."""
    from accelerate.state import AcceleratorState

    out = tmp_path_factory.mktemp("eval")
    assert evaluate([*checkpoints.values(), "--shards", synthetic_shards / "val",
                     "--output", out, *FAST]) == 0
    AcceleratorState._reset_state(reset_partial_state=True)
    return out


@pytest.mark.parametrize("name", KINDS)
def test_metrics_json_per_bottleneck(evaluated, checkpoints, name):
    from pipeline.shards import manifest_hash

    record = strict_json(evaluated / f"{name}-step7" / "metrics.json")
    val = Path(record["shards"])
    assert record["name"] == f"{name}-step7" and record["run"] == name and record["step"] == 7
    assert record["checkpoint"] == str(checkpoints[name].resolve())
    assert record["config"]["model"]["model"] == KINDS[name][0]
    assert record["manifest_hash"] == manifest_hash(val)
    assert record["num_samples"] + record["num_skipped"] == record["expected_samples"] == 150
    assert record["num_samples"] == 150 and record["world_size"] == 1
    assert 0 < record["psnr"] < metrics.PSNR_CAP_DB and 0 < record["psnr_of_mean_mse"]
    assert record["psnr_of_mean_mse"] == pytest.approx(10 * math.log10(1 / record["mse"]))
    for key in ("ssim", "ms_ssim", "mse", "l1", "images_per_s", "encode_images_per_s",
                "decode_images_per_s"):
        assert isinstance(record[key], float), key
    assert record["lpips"] is None and record["rfid"] is None
    assert len(record["per_class_psnr"]) == 10
    worst = [w["psnr"] for w in record["worst"]]
    assert len(worst) == 16 and worst == sorted(worst) and worst[0] <= record["psnr"]
    assert record["fixed_keys"] == [f"val_{i:06d}" for i in range(16)]
    assert set(record["settings"]) >= {"psnr", "ssim", "ms_ssim", "vae", "error_maps"}
    assert torch.__version__.startswith(record["provenance"]["versions"]["torch"])
    check_bottleneck_fields(name, record)


def check_bottleneck_fields(name: str, record: dict) -> None:
    channels = {"ae": 32, "vae": 4, "vq": 4, "fsq": 4}[name]
    assert record["latent_shape"] == [channels, LATENT_SIDE, LATENT_SIDE]
    assert record["latent_size"] == channels * LATENT_SIDE ** 2
    positions = LATENT_SIDE ** 2
    expected_bits = {"ae": None, "vae": None if record["kl"] is None else
                     record["kl"] / math.log(2), "vq": positions * 5.0,
                     "fsq": positions * sum(math.log2(l) for l in FSQ_LEVELS)}[name]
    assert record["bits_per_image"] == pytest.approx(expected_bits)
    if name == "vae":
        assert record["kl"] > 0 and record["neg_elbo"] > record["kl"]
        assert record["bits_per_dim"] == pytest.approx(
            record["neg_elbo"] / (3 * 64 * 64 * math.log(2)))
    else:
        assert record["kl"] is record["neg_elbo"] is record["bits_per_dim"] is None
    quantized = name in ("vq", "fsq")
    assert (record["codebook_usage"] is not None) == quantized
    assert (record["perplexity"] is not None) == quantized


@pytest.mark.parametrize("name", KINDS)
def test_image_files_beside_metrics(evaluated, name):
    from shardgen import synthetic_image

    out = evaluated / f"{name}-step7"
    record = strict_json(out / "metrics.json")
    quantized = name in ("vq", "fsq")
    expected = {"originals": "originals.png", "reconstructions": "reconstructions.png",
                "error_maps": "error_maps.png",
                "prior_samples": "prior_samples.png" if name == "vae" else None,
                "code_usage": "code_usage.json" if quantized else None}
    assert record["files"] == expected
    for file in filter(None, expected.values()):
        assert (out / file).is_file(), file
    for strip in ("originals", "reconstructions", "error_maps"):
        with Image.open(out / f"{strip}.png") as im:
            assert im.size == (1024, 64) and im.mode == "RGB"
    originals = np.asarray(Image.open(out / "originals.png"))
    first = np.concatenate([synthetic_image(i, i % 10) for i in range(16)], axis=1)
    assert np.array_equal(originals, first)
    if quantized:
        counts = strict_json(out / "code_usage.json")["counts"]
        assert len(counts) == (32 if name == "vq" else 1000)
        assert sum(counts) == 150 * LATENT_SIDE ** 2  # one code per latent position
        used = sum(c > 0 for c in counts)
        assert record["codebook_usage"] == pytest.approx(100 * used / len(counts))


def test_psnr_matches_a_direct_computation(evaluated, checkpoints):
    """The streamed, summed PSNR equals a plain loop over the same 150 images."""
    from shardgen import synthetic_image

    from pipeline.models import from_pretrained

    model = from_pretrained(checkpoints["ae"])
    images = torch.from_numpy(np.stack([synthetic_image(i, i % 10) for i in range(150)]))
    x = images.permute(0, 3, 1, 2).double() / 255
    with torch.inference_mode():
        recon = ((model((x * 2 - 1).float()).recon.double() + 1) / 2).clamp(0, 1)
    mse = ((recon - x) ** 2).flatten(1).mean(1)
    by_hand = (10 * torch.log10(1 / mse)).mean().item()
    record = strict_json(evaluated / "ae-step7" / "metrics.json")
    assert record["psnr"] == pytest.approx(by_hand, abs=1e-3)
    assert record["mse"] == pytest.approx(mse.mean().item(), rel=1e-4)


def test_ssim_matches_skimage_end_to_end(evaluated, checkpoints):
    """The streamed SSIM is the mean of skimage's per-image SSIM on the same 150 images, and
    metrics.json says which convention that is."""
    from shardgen import synthetic_image
    from skimage.metrics import structural_similarity

    from pipeline.models import from_pretrained

    model = from_pretrained(checkpoints["vq"])
    images = np.stack([synthetic_image(i, i % 10) for i in range(150)])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    with torch.inference_mode():
        recon = ((model(x * 2 - 1).recon.float() + 1) / 2).clamp(0, 1)
    by_skimage = [structural_similarity(r, t, gaussian_weights=True, sigma=1.5,
                                        use_sample_covariance=False, data_range=1,
                                        channel_axis=0)
                  for r, t in zip(recon.double().numpy(), x.double().numpy())]
    record = strict_json(evaluated / "vq-step7" / "metrics.json")
    assert record["ssim"] == pytest.approx(float(np.mean(by_skimage)), abs=1e-6)
    assert record["settings"]["ssim_convention"] == metrics.SSIM_CONVENTION
    assert "independent of the torchmetrics version" in record["settings"]["ssim"]
    assert "structural_similarity(gaussian_weights=True" in record["settings"]["ssim"]
    assert "3 scales (64 px, 32 px, 16 px)" in record["settings"]["ms_ssim"]


def test_two_processes_give_the_same_numbers(evaluated, checkpoints, synthetic_shards, tmp_path):
    """torchrun, 2 CPU processes (gloo): every sample once, the same metrics as 1 process."""
    out = tmp_path / "dist"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "pipeline.evaluate", checkpoints["vae"], checkpoints["vq"],
           "--shards", synthetic_shards / "val", "--output", out, *FAST]
    done = subprocess.run([str(c) for c in cmd], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("vae", "vq"):
        two = strict_json(out / f"{name}-step7" / "metrics.json")
        one = strict_json(evaluated / f"{name}-step7" / "metrics.json")
        assert two["world_size"] == 2
        assert two["num_samples"] == 150 and two["num_skipped"] == 0
        for key in ("psnr", "psnr_of_mean_mse", "ssim", "ms_ssim", "mse", "l1", "kl", "neg_elbo",
                    "bits_per_image", "codebook_usage", "perplexity"):
            if one[key] is None:  # not defined for this model (e.g. codebook usage of a VAE)
                assert two[key] is None, key
            else:
                assert two[key] == pytest.approx(one[key], rel=1e-5), key
        assert two["per_class_psnr"] == pytest.approx(one["per_class_psnr"], rel=1e-5)
        assert [w["key"] for w in two["worst"]] == [w["key"] for w in one["worst"]]
    assert (strict_json(out / "vq-step7" / "code_usage.json") ==
            strict_json(evaluated / "vq-step7" / "code_usage.json"))


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    for var in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))  # keep the home directory clean


def test_lpips_and_wandb(checkpoints, synthetic_shards, lpips_files, tmp_path, offline_wandb,
                         fresh_accelerate_state):
    backbone, linear = lpips_files
    out = tmp_path / "out"
    assert evaluate([checkpoints["ae"], "--shards", synthetic_shards / "val", "--output", out,
                     "--max-samples", "8", "--lpips-backbone", backbone, "--lpips-linear",
                     linear, "--tracker", "wandb", *FAST]) == 0
    record = strict_json(out / "ae-step7" / "metrics.json")
    assert record["num_samples"] == record["expected_samples"] == record["max_samples"] == 8
    assert record["lpips"] > 0 and record["rfid"] is None
    assert "LPIPS v0.1 (alex)" in record["settings"]["lpips"]
    import wandb

    wandb.teardown()  # what process exit does: wandb-core may still be writing after finish()
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    (table_file,) = run_dir.glob("files/media/table/evaluation_*.table.json")
    table = json.loads(table_file.read_text())
    row = dict(zip(table["columns"], table["data"][0]))
    assert row["name"] == "ae-step7" and row["psnr"] == pytest.approx(record["psnr"])
    assert row["lpips"] == pytest.approx(record["lpips"])
    assert b"ae-step7/psnr" in next(run_dir.glob("run-*.wandb")).read_bytes()  # summary key


def test_rfid_end_to_end(checkpoints, synthetic_shards, inception_file, tmp_path,
                         fresh_accelerate_state):
    """2 samples only: Inception runs at 299 px, seconds per image on a shared CPU."""
    assert evaluate([checkpoints["ae"], "--shards", synthetic_shards / "val", "--output",
                     tmp_path, "--max-samples", "2", "--inception-weights", inception_file,
                     *FAST]) == 0
    record = strict_json(tmp_path / "ae-step7" / "metrics.json")
    assert record["num_samples"] == 2
    assert math.isfinite(record["rfid"]) and record["rfid"] >= 0
    assert "FID" in record["settings"]["rfid"]


# ---------------------------------------------------------------- bad input

@pytest.fixture
def broken(checkpoints, tmp_path):
    """A copy of the AE export that a test may damage."""
    import shutil

    copy = tmp_path / "broken" / "model"
    shutil.copytree(checkpoints["ae"], copy)
    return copy


def run_expecting_error(capsys, args: list) -> str:
    assert evaluate(args) == 2
    return capsys.readouterr().err


def test_missing_checkpoint_is_named(synthetic_shards, tmp_path, capsys):
    err = run_expecting_error(capsys, [tmp_path / "nope", "--shards", synthetic_shards / "val",
                                       "--output", tmp_path / "out"])
    assert f"checkpoint {tmp_path / 'nope'}: no such directory" in err


def test_corrupt_weights_are_named(broken, synthetic_shards, tmp_path, capsys):
    (broken / "model.safetensors").write_bytes(b"\x00garbage")
    err = run_expecting_error(capsys, [broken, "--shards", synthetic_shards / "val",
                                       "--output", tmp_path / "out"])
    assert f"checkpoint {broken}:" in err and str(broken / "model.safetensors") in err


def test_config_weights_mismatch_is_named(broken, synthetic_shards, tmp_path, capsys):
    config = json.loads((broken / "config.json").read_text())
    config["model"]["widths"] = [8, 16, 64]
    config["model"]["latent_channels"] = 64
    (broken / "config.json").write_text(json.dumps(config))
    err = run_expecting_error(capsys, [broken, "--shards", synthetic_shards / "val",
                                       "--output", tmp_path / "out"])
    assert str(broken / "config.json") in err and "does not match the weights" in err


def test_shards_of_another_resolution_are_named(checkpoints, tmp_path, capsys):
    from shardgen import make_split

    small = make_split(tmp_path, "val32", 20, 10, size=32)
    err = run_expecting_error(capsys, [checkpoints["ae"], "--shards", small,
                                       "--output", tmp_path / "out"])
    assert f"shards {small / 'manifest.json'} hold 32x32 images" in err
    assert "trained on 64x64" in err
    assert not (tmp_path / "out").exists()


def test_help_explains_every_option(capsys):
    from pipeline.evaluate import build_parser

    text = build_parser().format_help()
    for action in build_parser()._actions:
        assert action.help, action.dest
    assert "--inception-weights" in text and "--lpips-backbone" in text


# ---------------------------------------------------------------- the options, the model's answers

@pytest.mark.parametrize("name", KINDS)
def test_resolved_options_are_saved_beside_metrics(evaluated, synthetic_shards, name):
    import yaml

    from pipeline.config import from_dict
    from pipeline.evaluate import EvaluateConfig

    saved = (evaluated / f"{name}-step7" / "evaluate.yaml").read_text()
    cfg = from_dict(EvaluateConfig, yaml.safe_load(saved))
    assert (cfg.shards, cfg.output) == (str(synthetic_shards / "val"), str(evaluated))
    assert (cfg.batch_size, cfg.num_workers, cfg.throughput_batches) == (50, 0, 1)
    assert cfg.vae_sigma == 0.05 and cfg.max_samples is None


def test_bottleneck_figures_come_from_the_model(checkpoints):
    """A model of kind "ae" that reports a KL, a rate and code indices gets them all into
    the summary: evaluate asks the model instead of branching on its kind."""
    from shardgen import synthetic_image

    from pipeline.evaluate import Checkpoint, EvaluateConfig, Evaluation, summarize
    from pipeline.models import from_pretrained

    model = from_pretrained(checkpoints["ae"])
    neck = model.bottleneck
    neck.num_codes = 4
    neck.kl_per_image = lambda stats: torch.full((3,), 2.0)
    neck.rate_bits = lambda stats: torch.tensor([10.0, 20.0, 30.0])
    neck.code_indices = lambda stats: torch.zeros(3, 2, 2, dtype=torch.long)
    ckpt = Checkpoint(checkpoints["ae"], model, {}, "ae", 7)
    evaluation = Evaluation(ckpt, 10, EvaluateConfig(), torch.device("cpu"), None, None)
    images = torch.from_numpy(np.stack([synthetic_image(i, i) for i in range(3)]))
    evaluation.add_batch(images.permute(0, 3, 1, 2), torch.tensor([0, 1, 2]), ["a", "b", "c"])
    totals = evaluation.sums.reduce(lambda flat: flat)
    result = summarize(ckpt, totals, [], None, [f"c{i}" for i in range(10)], False)
    assert model.kind == "ae"
    assert result["kl"] == 2.0 and result["neg_elbo"] > result["kl"]
    assert result["bits_per_image"] == pytest.approx(20.0)
    assert result["codebook_usage"] == 25.0 and result["perplexity"] == pytest.approx(1.0)
    assert totals["code_counts"].tolist() == [12.0, 0.0, 0.0, 0.0]
