"""The CUDA paths, on a machine with a CUDA device (`pytest -m gpu`; skipped elsewhere):
bf16 against fp32 per model, channels-last against contiguous, SyncBatchNorm in a
one-process group, the pinned hand-over of the streaming loader, the cache on the GPU,
an inductor-compiled step against eager, the trainer with the GPU cache, and evaluation
on the GPU against evaluation on the CPU.

The fp32 references run in true fp32: TF32 is off for the whole module (cuDNN's default
would round convolution inputs to 10 mantissa bits, as large an error as bf16's).
Nothing here downloads: the models are randomly initialised, the shards synthetic.
"""
from __future__ import annotations

import copy
import itertools
import json
import math
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from modelgen import case_id, model_cases, tiny_model_config
from torch import nn

from pipeline.config import Config, ModelConfig
from pipeline.models import build_model, compute_loss

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

REPO = Path(__file__).resolve().parents[1]
CUDA = torch.device("cuda")
LOSS = Config().loss


@pytest.fixture(autouse=True)
def true_float32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def images(n: int = 8, seed: int = 0, size: int = 64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, size, size, generator=generator) * 2 - 1).to(CUDA)


def tiny_model(case, **overrides) -> nn.Module:
    torch.manual_seed(0)
    return build_model(tiny_model_config(*case, **overrides)).to(CUDA).train()


def loss_and_grads(model: nn.Module, x: torch.Tensor, autocast: bool = False,
                   memory_format=torch.contiguous_format, seed: int = 1):
    """One training forward (under bf16 autocast, as the trainer's prepared model runs)
    + the trainer's loss + backward on a copy of `model`: (loss, {name: grad})."""
    model = copy.deepcopy(model).to(memory_format=memory_format)
    x = x.contiguous(memory_format=memory_format)
    torch.manual_seed(seed)  # the VAE's noise, the VQ's restart candidates: alike
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        out = model(x)
    loss = compute_loss(out, x, LOSS, 1)[0]
    loss.backward()
    return loss.detach().float(), {name: p.grad.float() for name, p in model.named_parameters()
                                   if p.grad is not None}


def assert_close_steps(reference, other, loss_rel: float, min_cosine: float,
                       norm_rel: float) -> None:
    (loss, grads), (other_loss, other_grads) = reference, other
    assert torch.isfinite(other_loss) and other_loss.item() == pytest.approx(loss.item(),
                                                                            rel=loss_rel)
    assert other_grads.keys() == grads.keys()
    flat = torch.cat([g.flatten() for g in grads.values()])
    other_flat = torch.cat([other_grads[name].flatten() for name in grads])
    assert torch.isfinite(other_flat).all()
    assert F.cosine_similarity(flat, other_flat, dim=0).item() >= min_cosine
    assert other_flat.norm().item() == pytest.approx(flat.norm().item(), rel=norm_rel)


# ---------------------------------------------------------------- numerics per model

@pytest.mark.parametrize("case", model_cases(), ids=case_id)
def test_a_bf16_step_agrees_with_fp32(case):
    """Tolerance: the loss within 2% (relative), the gradient (all parameters as one
    vector) within 10% in norm and at cosine >= 0.9, >= 0.75 for a quantised latent.

    Why: bf16 keeps 8 mantissa bits, 0.4% per rounding, and the errors of a dozen layers
    add up to about 0.1% of the loss. A quantiser's codes are chosen in float32, but from
    bf16 encoder outputs, so a position whose two nearest codes are almost equidistant
    can take the other code, and the straight-through gradient of that position then
    differs: the same comparison under CPU bf16 autocast gave loss differences below
    0.12%, gradient cosines >= 0.99 for the AE/VAE and >= 0.93 for the VQ-VAEs."""
    model = tiny_model(case)
    x = images()
    quantised = model.num_codes is not None
    assert_close_steps(loss_and_grads(model, x), loss_and_grads(model, x, autocast=True),
                       loss_rel=2e-2, min_cosine=0.75 if quantised else 0.9, norm_rel=0.1)


@pytest.mark.parametrize("case", model_cases(), ids=case_id)
def test_channels_last_gives_the_step_of_contiguous(case):
    """fp32 both: only the kernels differ (summation order), so 1e-4 on the loss."""
    model = tiny_model(case)
    x = images()
    assert_close_steps(loss_and_grads(model, x),
                       loss_and_grads(model, x, memory_format=torch.channels_last),
                       loss_rel=1e-4, min_cosine=0.999, norm_rel=1e-3)


# ---------------------------------------------------------------- SyncBatchNorm

@pytest.mark.parametrize("backend", ["nccl", "gloo"])
def test_sync_batchnorm_trains_a_step_in_a_one_process_group(backend, tmp_path):
    """The seed AE's BatchNorms as SyncBatchNorm inside DDP, world size 1: one SGD step
    gives the loss, weights and running statistics of plain BatchNorm."""
    from torch.nn.parallel import DistributedDataParallel

    if backend == "nccl" and not dist.is_nccl_available():
        pytest.skip("this torch has no NCCL")
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group(backend, store=store, rank=0, world_size=1,
                            timeout=timedelta(seconds=120))
    try:
        plain = tiny_model(("ae", "basic", "vq"))
        synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(plain))
        assert sum(isinstance(m, nn.SyncBatchNorm) for m in synced.modules()) >= 2
        wrapped = DistributedDataParallel(synced, device_ids=[torch.cuda.current_device()])
        x = images()
        losses = [sgd_step(module, x) for module in (plain, wrapped)]
    finally:
        dist.destroy_process_group()
    assert math.isfinite(losses[1])
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    after_plain, after_synced = plain.state_dict(), synced.state_dict()
    assert after_plain.keys() == after_synced.keys()
    for name, value in after_plain.items():
        assert torch.allclose(after_synced[name].float(), value.float(), rtol=1e-4,
                              atol=1e-5), name
    moved = [n for n, v in after_plain.items() if n.endswith("running_mean") and v.abs().sum() > 0]
    assert moved  # the step updated the running statistics


def sgd_step(model: nn.Module, x: torch.Tensor) -> float:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = compute_loss(model(x), x, LOSS, 1)[0]
    loss.backward()
    optimizer.step()
    return loss.item()


# ---------------------------------------------------------------- data on the device

def test_the_streaming_loader_hands_over_pinned_batches(synthetic_shards, monkeypatch):
    """With CUDA, batches arrive in page-locked memory (the pin thread's copy is the one
    copy: no worker buffer is mapped or lent in this process) and hold what an unpinned
    load of the same shards holds, train and eval."""
    from pipeline import data
    from pipeline.data import make_loader

    def load(split: str, mode: str):
        loader = make_loader(synthetic_shards / split, 16, mode=mode, num_workers=2, seed=5,
                             flip=mode == "train")
        batches = list(itertools.islice(loader, 12)) if mode == "train" else list(loader)
        return loader, batches

    for split, mode in (("train", "train"), ("val", "eval")):
        loader, pinned = load(split, mode)
        assert all(images.is_pinned() for images, _, _ in pinned)
        assert all(images.shape[1:] == (3, 64, 64) and
                   images.is_contiguous(memory_format=torch.channels_last)
                   for images, _, _ in pinned)
        assert loader._mapped == {} and loader._lent == {}
        with monkeypatch.context() as patch:
            patch.setattr(data, "_pin_memory", lambda: False)
            _, plain = load(split, mode)
        assert not any(images.is_pinned() for images, _, _ in plain)
        assert [keys for _, _, keys in pinned] == [keys for _, _, keys in plain]
        for (images, labels, _), (expected, expected_labels, _) in zip(pinned, plain):
            assert torch.equal(images, expected) and torch.equal(labels, expected_labels)


def test_the_gpu_cache_delivers_the_host_caches_batches(synthetic_shards):
    """`--data.cache gpu` batches are on the GPU, channels-last, and equal the batches of
    a host cache (delivered to the CPU, and through pinned memory to the GPU), flips and
    epoch boundaries included (150 samples, batches of 16)."""
    from pipeline.data import make_cached_loader

    def batches(place: str, device: str):
        loader = make_cached_loader(synthetic_shards / "val", 16, place=place, device=device,
                                    num_workers=2, seed=3, flip=True, progress=False)
        return loader, list(itertools.islice(loader, 30))

    gpu_loader, on_gpu = batches("gpu", "cuda")
    assert gpu_loader.cache.rows.device.type == "cuda"
    _, on_host = batches("host", "cpu")
    pinned_loader, through_pinned = batches("host", "cuda")
    assert pinned_loader.cache.rows.is_pinned()
    for (images, labels, keys), (expected, expected_labels, expected_keys), (moved, _, _) in zip(
            on_gpu, on_host, through_pinned):
        assert images.device.type == moved.device.type == "cuda"
        assert images.is_contiguous(memory_format=torch.channels_last)
        assert keys == expected_keys and torch.equal(labels, expected_labels)
        assert torch.equal(images.cpu(), expected) and torch.equal(moved.cpu(), expected)


def test_the_trainer_runs_on_the_gpu_cache_in_bf16_channels_last(synthetic_shards, tmp_path):
    from pipeline import train
    from pipeline.tracking import read_history

    run = tmp_path / "run"
    assert train.main(["--config", "debug", "--model", "vqvae", "--train-shards",
                       str(synthetic_shards / "train"), "--val-shards",
                       str(synthetic_shards / "val"), "--output", str(run), "--max-steps", "4",
                       "--log-every", "2", "--val-every", "4", "--data.cache", "gpu",
                       "--mixed-precision", "bf16", "--train.channels_last", "true",
                       "--tracker", "none"]) == 0
    history = read_history(run)
    last = history[-1]
    assert last["step"] == 4 and math.isfinite(last["train/loss"])
    assert math.isfinite(last["val/loss"]) and last["perf/peak_mem_gb"] > 0
    assert last["train/epoch"] == pytest.approx(4 * 16 / 600)


# ---------------------------------------------------------------- compile

def test_an_inductor_compiled_step_agrees_with_eager(monkeypatch):
    """The seed VQ-VAE with dead codes to restart, two steps of forward + loss +
    backward + SGD, compiled by inductor and eager: losses within 1e-3 (fused kernels
    sum in another order) and gradients at cosine >= 0.999. SGD, not the trainer's
    AdamW: Adam's first step moves every weight by ±lr whatever its gradient's size, so
    rounding-level differences of near-zero gradients would become lr-sized ones.
    Inductor's own random numbers differ from eager's by design; `fallback_random`
    makes it draw eager's, so that the restart candidates are the same rows."""
    import torch._dynamo
    import torch._inductor.config

    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)
    model = tiny_model(("vqvae", "basic", "vq"))
    model(images(seed=9))  # eager: the codebook initialised from a first batch
    with torch.no_grad():
        model.bottleneck.cluster_size[:8] = 0.0  # dead: restarted in the first step
    eager, compiled_model = copy.deepcopy(model), copy.deepcopy(model)
    torch._dynamo.reset()
    compiled = torch.compile(compiled_model)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (eager, compiled_model)]
    for step in (1, 2):
        x = images(seed=step)
        results = []
        for forward, module, optimizer in zip((eager, compiled), (eager, compiled_model),
                                              optimizers):
            torch.manual_seed(step)
            loss = compute_loss(forward(x), x, LOSS, step)[0]
            loss.backward()
            results.append((loss.detach(), {n: p.grad.clone() for n, p in
                                            module.named_parameters() if p.grad is not None}))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        assert_close_steps(*results, loss_rel=1e-3, min_cosine=0.999, norm_rel=1e-3)
    codebooks = [m.bottleneck.codebook for m in (eager, compiled_model)]
    assert torch.allclose(*codebooks, rtol=1e-3, atol=1e-4)  # the same restarts


# ---------------------------------------------------------------- evaluation

COMPARED = ("num_samples", "fixed_keys", "psnr", "psnr_of_mean_mse", "ssim", "ms_ssim",
            "mse", "l1", "kl", "neg_elbo", "bits_per_dim", "bits_per_image",
            "per_class_psnr")


def write_checkpoints(root: Path) -> list[Path]:
    """A tiny VAE and VQ-VAE after 30 training-mode forwards (no gradient) of images like
    the shards' (BatchNorm statistics settled, the codebook drawn from their encodings:
    many codes in use), saved as training saves them."""
    from shardgen import synthetic_image

    from pipeline.models import save_pretrained

    pixels = np.stack([synthetic_image(i, i % 10) for i in range(64)])
    batch = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1
    paths = []
    for model_kind in ("vae", "vqvae"):
        cfg = ModelConfig(model=model_kind, quantizer="vq", widths=[8, 16, 32],
                          latent_channels=4, codebook_size=32, code_dim=4)
        torch.manual_seed(0)
        model = build_model(cfg).train()
        with torch.no_grad():
            for start in range(0, 30 * 16, 16):
                model(batch[start % 64:start % 64 + 16])
        paths.append(save_pretrained(model.eval(), root / model_kind / "model",
                                     Config(model=cfg), step=3, run_dir=root / model_kind))
    return paths


def assert_same(value, expected, where: str) -> None:
    """Numbers within 1e-4 (relative), everything else equal, through lists and dicts."""
    if isinstance(expected, dict):
        assert value.keys() == expected.keys(), where
        for key in expected:
            assert_same(value[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, list):
        assert len(value) == len(expected), where
        for index, (a, b) in enumerate(zip(value, expected)):
            assert_same(a, b, f"{where}[{index}]")
    elif isinstance(expected, float):
        assert value == pytest.approx(expected, rel=1e-4, abs=1e-6), where
    else:
        assert value == expected, where


def test_evaluation_on_the_gpu_equals_evaluation_on_the_cpu(synthetic_shards, tmp_path):
    """The same checkpoints and shards through `pipeline evaluate`: in this process on
    the GPU, in a process that sees no CUDA device on the CPU. fp32 both (evaluation has
    no autocast): metrics within 1e-4, code usage within one code."""
    from accelerate.state import AcceleratorState

    from pipeline.evaluate import main
    from pipeline.utils import run_stage

    checkpoints = write_checkpoints(tmp_path / "runs")
    options = ["--shards", str(synthetic_shards / "val"), "--num-workers", "0",
               "--batch-size", "50", "--throughput-batches", "1"]
    try:
        assert run_stage(main, [*map(str, checkpoints), *options,
                                "--output", str(tmp_path / "gpu")]) == 0
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "pipeline.evaluate", *map(str, checkpoints),
                             *options, "--output", str(tmp_path / "cpu")], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("vae-step3", "vqvae-step3"):
        on_gpu = json.loads((tmp_path / "gpu" / name / "metrics.json").read_text())
        on_cpu = json.loads((tmp_path / "cpu" / name / "metrics.json").read_text())
        for key in COMPARED:
            assert_same(on_gpu[key], on_cpu[key], key)
        if on_cpu["codebook_usage"] is not None:
            assert on_cpu["codebook_usage"] > 10  # the comparison covers many codes
            assert on_gpu["codebook_usage"] == pytest.approx(on_cpu["codebook_usage"],
                                                             abs=100 / 32)
            assert on_gpu["perplexity"] == pytest.approx(on_cpu["perplexity"], rel=1e-2)
