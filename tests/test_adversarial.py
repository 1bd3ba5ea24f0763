"""The PatchGAN discriminator and the adversarial loss inside the trainer (CPU): shapes and
receptive field, GroupNorm vs BatchNorm, the discriminator untouched before disc_start and
trained after, LPIPS wired with stand-in files, nothing of either in the export, exact
resume, both optimizers on one fp16 loss scale, and a 2-process torchrun run whose ranks
keep identical weights and one adaptive weight.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from accelerate.utils import set_seed
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from pipeline import demo, train
from pipeline.config import load_preset
from pipeline.models import build_discriminator, build_model, from_pretrained
from pipeline.models.discriminator import PatchDiscriminator, output_side, receptive_field
from pipeline.tracking import read_history
from pipeline.train.loop import step_together
from pipeline.utils import PipelineError

REPO = Path(__file__).resolve().parents[1]
GAN_KEYS = ("train/g_loss", "train/d_loss", "train/d_weight", "train/logits_real",
            "train/logits_fake", "train/d_accuracy", "train/d_grad_norm")


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)


# ---------------------------------------------------------------- the discriminator

@settings(max_examples=30, deadline=None)
@given(layers=st.integers(1, 4), image_size=st.integers(8, 100), batch=st.integers(1, 3))
def test_logit_map_side(layers, image_size, batch):
    side = output_side(image_size, layers)
    disc = PatchDiscriminator(channels=2, layers=layers, norm="none")
    if side < 1:
        return
    with torch.no_grad():
        logits = disc(torch.zeros(batch, 3, image_size, image_size))
    assert logits.shape == (batch, 1, side, side)


@pytest.mark.parametrize("layers, field", [(1, 16), (2, 34), (3, 70), (4, 142)])
def test_receptive_field_is_what_one_logit_depends_on(layers, field):
    """With positive weights every input pixel inside a logit's field moves it: the
    support of its gradient is the field (measured away from the borders)."""
    assert receptive_field(layers) == field
    disc = PatchDiscriminator(channels=2, layers=layers, norm="none")
    for p in disc.parameters():
        torch.nn.init.constant_(p, 0.01 if p.dim() > 1 else 0.0)
    x = torch.ones(1, 3, 2 * field, 2 * field, requires_grad=True)
    logits = disc(x)
    centre = logits.shape[-1] // 2
    logits[0, 0, centre, centre].backward()
    rows = (x.grad[0].abs().sum(dim=(0, 2)) > 0).nonzero().flatten()
    cols = (x.grad[0].abs().sum(dim=(0, 1)) > 0).nonzero().flatten()
    assert rows.min() > 0 and rows.max() < 2 * field - 1  # not clipped by the border
    assert rows.max() - rows.min() + 1 == field == cols.max() - cols.min() + 1


def test_default_suits_64px_images():
    disc = build_discriminator(train.resolve_config(train.build_parser().parse_args(
        ["--config", "debug"])).disc, 3)
    # 34-px patches of a 64-px image; three layers (70 px) would see all of it from
    # every logit.
    assert disc.receptive_field == 34 and receptive_field(3) > 64
    assert output_side(64, disc.layers) == 14
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in disc.modules())


def test_groupnorm_judges_each_image_alone_batchnorm_does_not():
    """Why GroupNorm is the default: an image's logits do not depend on the rest of the
    batch (nor, under DDP, on which rank holds it)."""
    torch.manual_seed(0)
    a, b = torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64) * 3
    for norm, independent in (("group", True), ("none", True), ("batch", False)):
        disc = PatchDiscriminator(channels=8, layers=2, norm=norm).train()
        with torch.no_grad():
            alone, together = disc(a), disc(torch.cat([a, b]))[:2]
        assert torch.allclose(alone, together, atol=1e-5) == independent, norm


# ---------------------------------------------------------------- in the trainer

DISC_START = 3
STEPS = 6


def gan_args(shards: Path, output: Path, steps: int, alex_files, *extra: str) -> list[str]:
    backbone, linear = alex_files
    return ["--config", "debug", "--model", "vqvae", "--train-shards", str(shards / "train"),
            "--val-shards", str(shards / "val"), "--output", str(output),
            "--max-steps", str(steps), "--log-every", "1", "--grad-accum", "2",
            "--ckpt-every", "1", "--keep-last", "10", "--loss.adversarial_weight", "0.5",
            "--loss.disc_start", str(DISC_START), "--disc.channels", "8",
            "--loss.perceptual_weight", "1.0", "--loss.lpips_net", "alex",
            "--loss.lpips_backbone", str(backbone), "--loss.lpips_linear", str(linear),
            *extra]


@pytest.fixture(scope="module")
def gan_run(synthetic_shards, alex_files, tmp_path_factory):
    """A VQ-VAE with LPIPS and the discriminator from step 4, a checkpoint every step.

    A module fixture is set up before the function-scoped `one_thread`: it pins the thread
    count itself, or the trainer would use every core here and one in the resumed run
    (another reduction order, so no bit-exact comparison)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        run = tmp_path_factory.mktemp("gan") / "run"
        assert train.main(gan_args(synthetic_shards, run, STEPS, alex_files)) == 0
    return run


def state_of(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step-{step}" / "state"


def test_discriminator_untouched_before_disc_start_and_trained_after(gan_run, synthetic_shards,
                                                                     alex_files):
    cfg = train.resolve_config(train.build_parser().parse_args(
        gan_args(synthetic_shards, gan_run, STEPS, alex_files)))
    set_seed(cfg.train.seed)  # the trainer's order: seed, model, discriminator
    build_model(cfg.model)
    initial = build_discriminator(cfg.disc, 3).state_dict()
    before = [load_file(state_of(gan_run, s) / "discriminator.safetensors")
              for s in range(1, DISC_START + 1)]
    for weights in before:
        assert weights.keys() == initial.keys()
        assert [k for k in weights if not torch.equal(weights[k], initial[k])] == []
    for s in range(1, DISC_START + 1):  # Adam holds no state: it never stepped
        layout = json.loads((state_of(gan_run, s) / "disc_optimizer.json").read_text())
        assert layout["tensors"] == {} and layout["values"] == {}
    after = load_file(state_of(gan_run, DISC_START + 1) / "discriminator.safetensors")
    assert all(not torch.equal(after[k], initial[k]) for k in initial if k.endswith("weight"))
    layout = json.loads((state_of(gan_run, DISC_START + 1) / "disc_optimizer.json").read_text())
    assert len(layout["tensors"]) == len(initial)  # exp_avg, exp_avg_sq for each parameter

    history = {h["step"]: h for h in read_history(gan_run)}
    for step in range(1, STEPS + 1):
        present = [k for k in GAN_KEYS if k in history[step]]
        assert present == ([] if step <= DISC_START else list(GAN_KEYS)), step
        assert math.isfinite(history[step]["train/perceptual"]) and \
            history[step]["train/perceptual"] > 0
    for step in range(DISC_START + 1, STEPS + 1):
        h = history[step]
        assert all(math.isfinite(h[k]) for k in GAN_KEYS)
        assert 0 <= h["train/d_accuracy"] <= 1 and h["train/d_weight"] > 0
    assert {"val/perceptual", "val/psnr"} <= set(history[STEPS]) and \
        "val/perceptual" in history[0]


def test_neither_discriminator_nor_lpips_is_exported_or_in_the_model(gan_run,
                                                                     synthetic_shards,
                                                                     alex_files):
    cfg = train.resolve_config(train.build_parser().parse_args(
        gan_args(synthetic_shards, gan_run, STEPS, alex_files)))
    exported = load_file(gan_run / "model" / "model.safetensors")
    assert sorted(exported) == sorted(build_model(cfg.model).state_dict())
    assert sorted(load_file(state_of(gan_run, STEPS) / "model.safetensors")) == sorted(exported)
    assert from_pretrained(gan_run / "model").kind == "vqvae"
    files = sorted(p.name for p in state_of(gan_run, STEPS).iterdir())
    assert files == ["accelerator.json", "disc_optimizer.json", "disc_optimizer.safetensors",
                     "discriminator.safetensors", "model.safetensors", "optimizer.json",
                     "optimizer.safetensors", "rng-0.json", "rng-0.safetensors"]
    record = yaml.safe_load((gan_run / "config.yaml").read_text())
    assert record["disc"]["layers"] == 2 and record["loss"]["disc_start"] == DISC_START
    # The optimizer holds the autoencoder's parameters only.
    layout = json.loads((state_of(gan_run, STEPS) / "optimizer.json").read_text())
    assert len(layout["param_groups"][0]["params"]) == len(list(
        build_model(cfg.model).parameters()))


def test_resume_with_the_discriminator_is_exact(gan_run, synthetic_shards, alex_files, tmp_path):
    """From step 4 (discriminator and its Adam already moved) steps 5 and 6 come back bit
    for bit: weights, discriminator, its optimizer, and every logged term."""
    resumed = tmp_path / "resumed"
    start = DISC_START + 1
    shutil.copytree(gan_run / "checkpoints" / f"step-{start}",
                    resumed / "checkpoints" / f"step-{start}")
    assert train.main(gan_args(synthetic_shards, resumed, STEPS, alex_files,
                               "--resume", "auto")) == 0
    for name in ("discriminator.safetensors", "disc_optimizer.safetensors", "model.safetensors",
                 "optimizer.safetensors"):
        a = load_file(state_of(gan_run, STEPS) / name)
        b = load_file(state_of(resumed, STEPS) / name)
        assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == [], name
    whole = {h["step"]: h for h in read_history(gan_run)}
    again = {h["step"]: h for h in read_history(resumed)}
    assert sorted(s for s in again if s > 0) == list(range(start + 1, STEPS + 1))
    for step in range(start + 1, STEPS + 1):
        for key in ("train/loss", "train/perceptual", *GAN_KEYS):
            assert again[step][key] == whole[step][key], (step, key)


def test_missing_lpips_file_stops_before_training(synthetic_shards, alex_files, tmp_path):
    _backbone, linear = alex_files
    args = gan_args(synthetic_shards, tmp_path / "run", 2, (tmp_path / "none.pth", linear))
    with pytest.raises(PipelineError, match=r"--loss.lpips_backbone .*none.pth: no such file"):
        train.main(args)
    run = tmp_path / "run"
    assert not (run / "checkpoints").exists() and not (run / "history.jsonl").exists()
    assert not (run / "config.yaml").exists()


# ---------------------------------------------------------------- fp16: one loss scale

def scaled_pair(scale: float, b_grad_factor: float = 1.0):
    scaler = torch.amp.GradScaler("cpu", init_scale=scale, growth_interval=1)
    a = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    b = torch.nn.Parameter(torch.tensor([3.0]))
    optimizers = [torch.optim.SGD([a], lr=1.0), torch.optim.SGD([b], lr=1.0)]
    loss = (a * torch.tensor([1.0, 2.0])).sum() + b_grad_factor * 3 * b.sum()
    scaler.scale(loss).backward()  # gradients: a (1, 2), b 3 (times the scale)
    return scaler, a, b, optimizers


def test_both_optimizers_step_on_unscaled_gradients_and_one_scale_update():
    scaler, a, b, (opt_a, opt_b) = scaled_pair(8.0)
    norms = step_together(scaler, [(opt_a, [a], math.inf), (opt_b, [b], math.inf)])
    assert [n.item() for n in norms] == pytest.approx([math.sqrt(5), 3.0])  # unscaled
    assert a.tolist() == [0.0, 0.0] and b.tolist() == [0.0]  # p - 1.0 * unscaled grad
    assert scaler.get_scale() == 16.0  # grown once: one update for both optimizers


def test_an_overflow_in_one_skips_that_one_and_backs_off_once():
    scaler, a, b, (opt_a, opt_b) = scaled_pair(8.0, b_grad_factor=math.inf)
    step_together(scaler, [(opt_a, [a], math.inf), (opt_b, [b], math.inf)])
    assert a.tolist() == [0.0, 0.0] and b.tolist() == [3.0]
    assert scaler.get_scale() == 4.0


def test_clipping_applies_to_each_group_and_no_scaler_steps_plainly():
    _, a, b, (opt_a, opt_b) = scaled_pair(1.0)
    norms = step_together(None, [(opt_a, [a], 1.0), (opt_b, [b], math.inf)])
    assert [n.item() for n in norms] == pytest.approx([math.sqrt(5), 3.0])
    assert a.tolist() == pytest.approx([1 - 1 / math.sqrt(5), 2 - 2 / math.sqrt(5)])
    assert b.tolist() == [0.0]


# ---------------------------------------------------------------- two processes

def test_two_ranks_keep_identical_weights_and_one_adaptive_weight(synthetic_shards, tmp_path):
    """torchrun, 2 gloo ranks, bf16 autocast, gradient accumulation: the autoencoder and
    the discriminator are DDP-wrapped, end bitwise identical on both ranks, and every
    micro-batch's adaptive weight is the same on both although their batches differ."""
    out, run = tmp_path / "ranks", tmp_path / "run"
    out.mkdir()
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", str(36500 + os.getpid() % 1000),
               str(REPO / "tests" / "adversarial_ddp_check.py"), str(out),
               "--config", "debug", "--model", "vqvae",
               "--train-shards", str(synthetic_shards / "train"),
               "--val-shards", str(synthetic_shards / "val"), "--output", str(run),
               "--max-steps", "3", "--log-every", "1", "--grad-accum", "2",
               "--mixed-precision", "bf16", "--loss.adversarial_weight", "0.5",
               "--loss.disc_start", "1", "--disc.channels", "8"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["wrappers"] == ["DistributedDataParallel", "DistributedDataParallel"]
    assert ranks[0]["model"] == ranks[1]["model"]  # every parameter
    assert ranks[0]["discriminator"] == ranks[1]["discriminator"]  # GroupNorm: no buffers
    # The codebook is kept identical; what differs is each rank's own record of its last
    # batches: the basic family's BatchNorm statistics (DDP broadcasts rank 0's at the
    # start of a forward) and the code-usage window.
    buffers = [r["model_buffers"] for r in ranks]
    assert all(buffers[0][k] == buffers[1][k] for k in ("bottleneck.codebook",
                                                        "bottleneck.cluster_size"))
    differing = {k for k, v in buffers[0].items() if buffers[1][k] != v}
    assert all(k.endswith(("running_mean", "running_var", "usage.history")) for k in differing)
    used = [r["used"] for r in ranks]
    assert len(used[0]) == 2 * 2  # steps 2 and 3, two micro-batches each
    assert used[0] == used[1] and all(math.isfinite(w) and w > 0 for w in used[0])
    assert ranks[0]["local"] != ranks[1]["local"]  # alone, each rank would differ
    history = read_history(run)
    assert [h["step"] for h in history] == [0, 1, 2, 3]
    assert all(k in history[-1] for k in GAN_KEYS)


# ---------------------------------------------------------------- the demo's tokenizer

def test_demo_tokenizer_flag_adds_a_vqgan_without_lpips():
    args = demo.build_parser().parse_args(["--tokenizer", "--steps", "30"])
    runs = demo.training_runs(args, ["ae", "vqvae"])
    assert [name for _title, name, _options in runs] == ["ae-basic", "vqvae-basic",
                                                        "vqgan-resnet", "vae-resnet-f4"]
    _title, _name, options = runs[-2]
    assert options == ["--config", "demo-vqgan", "--loss.disc_start", "10"]
    preset = load_preset("demo-vqgan")
    assert preset["loss"]["perceptual_weight"] == 0 and preset["loss"]["adversarial_weight"] > 0
    assert preset["model"]["arch"] == "resnet" and preset["model"]["downsample"] == 4
    plain = demo.training_runs(demo.build_parser().parse_args(["--no-handoff"]), ["ae"])
    assert [name for _title, name, _options in plain] == ["ae-basic"]


@pytest.mark.slow
def test_demo_with_tokenizer_reports_it(tmp_path):
    """The whole demo with --tokenizer, shortened (minutes on 2 cores)."""
    out = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.demo", "--output", str(out), "--steps", "12",
         "--sample-classes", "4", "--batch-size", "16", "--models", "ae", "--tokenizer",
         "--no-handoff"],
        capture_output=True, text=True, timeout=1200, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "WITHOUT the perceptual (LPIPS) term" in result.stdout
    assert (out / "eval" / "vqgan-resnet-step12" / "metrics.json").is_file()
    assert "vqgan-resnet" in (out / "report" / "report.html").read_text()
    history = read_history(out / "runs" / "vqgan-resnet")
    assert "train/d_loss" in history[-1] and "train/d_loss" not in history[1]
