"""Memory layouts in training: DDP's gradient buckets and the parameters' layouts agree
(`match_grad_layouts`), and channels-last trains what contiguous trains.

DDP lays its buckets out like the parameters and warns "Grad strides do not match bucket
view strides" when a gradient arrives laid out otherwise. The seed VQ-VAE's decoder
starts with a 1x1 conv fed the quantiser's output, a view of its (b h w) x d rows, so
channels-last strided; at the per-device batch of 16 the CPU kernels then return that
conv's weight gradient channels-last while the weight is contiguous (strides differ in
the size-1 dims only, which autograd's layout contract lets through).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import yaml
from modelgen import case_id, model_cases, tiny_model_config
from torch import nn

from pipeline.config import Config, build_config
from pipeline.models import build_model, compute_loss
from pipeline.train.setup import match_grad_layouts, probe_batch

REPO = Path(__file__).resolve().parents[1]
WARNING = "Grad strides do not match"
NO_AUTOCAST = SimpleNamespace(autocast=contextlib.nullcontext)  # the Accelerator's one use


class PermutedWeight(nn.Module):
    """A parameter used through a permuted view: its gradient comes back permuted, with
    strides that differ from the parameter's in its size-1 dims (as a 1x1 conv's can)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 3, 1, 1))

    def forward(self, x):
        return x * self.weight.permute(0, 2, 3, 1)  # (4, 1, 1, 3)


def grad_strides_after_a_step(model: nn.Module, x: torch.Tensor, loss_of) -> dict:
    """{name: (param strides, grad strides)} after one forward + backward."""
    model.zero_grad(set_to_none=True)
    loss_of(model(x), x).backward()
    return {name: (p.stride(), p.grad.stride()) for name, p in model.named_parameters()
            if p.grad is not None}


def test_a_permuted_gradient_relays_its_parameter():
    torch.manual_seed(0)
    model = PermutedWeight()
    x = torch.randn(4, 5, 6, 3)

    def loss_of(out, _x):
        return out.square().sum()

    before = grad_strides_after_a_step(model, x, loss_of)["weight"]
    assert before[0] != before[1]  # the mismatch DDP warns about
    values = model.weight.detach().clone()
    assert match_grad_layouts(model, x, NO_AUTOCAST, loss_of) == ["weight"]
    strides, grad_strides = grad_strides_after_a_step(model, x, loss_of)["weight"]
    assert strides == grad_strides
    assert torch.equal(model.weight, values)


def seed_config(preset: str, channels_last: bool) -> Config:
    model = {"model.model": "vqvae"} if preset == "debug" else {}
    return build_config(preset, argparse.Namespace(**model, **{
        "train.batch_size": 16, "train.channels_last": channels_last}))


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels-last"])
@pytest.mark.parametrize("preset", ["vqvae", "debug"])
def test_every_gradient_arrives_in_its_parameters_layout(preset, channels_last):
    """After match_grad_layouts every gradient has its parameter's strides (DDP's
    buckets then take them as they come); the weights, buffers and RNG are untouched."""
    torch.set_num_threads(1)
    cfg = seed_config(preset, channels_last)
    torch.manual_seed(0)
    model = build_model(cfg.model).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    rng = torch.get_rng_state()
    x = probe_batch(cfg, torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), rng)  # the run's RNG stays as seeded
    assert torch.equal(x, probe_batch(cfg, torch.device("cpu")))
    assert x.shape == (16, 3, 64, 64) and -1 <= x.min() < x.max() <= 1
    assert x.is_contiguous(memory_format=torch.channels_last if channels_last
                           else torch.contiguous_format)

    def loss_of(out, x):
        return compute_loss(out, x, cfg.loss, 1)[0]

    weights = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    moved = match_grad_layouts(model, x, NO_AUTOCAST, loss_of)
    assert torch.equal(torch.get_rng_state(), rng)
    after = model.state_dict()
    assert [k for k in weights if not torch.equal(weights[k], after[k])] == []
    assert all(p.grad is None for p in model.parameters())  # the probe was a copy
    assert set(moved) <= {name for name, _ in model.named_parameters()}

    strides = grad_strides_after_a_step(model, x, loss_of)
    assert {name: s for name, s in strides.items() if s[0] != s[1]} == {}


def test_two_ranks_train_without_the_grad_strides_warning(synthetic_shards, tmp_path):
    """A 2-process torchrun (gloo) run of the debug VQ-VAE at the batch of 16 per rank.
    With match_grad_layouts disabled, every rank of this run printed DDP's warning."""
    run = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", str(31500 + os.getpid() % 1000), "-m", "pipeline.train",
               "--config", "debug", "--model", "vqvae", "--train-shards",
               str(synthetic_shards / "train"), "--val-shards", str(synthetic_shards / "val"),
               "--output", str(run), "--max-steps", "2", "--batch-size", "16",
               "--tracker", "none", "--val-every", "1000", "--ckpt-every", "1000"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    record = yaml.safe_load((run / "config.yaml").read_text())
    assert record["run"]["world_size"] == 2
    assert WARNING not in result.stderr + result.stdout


def training_step(model: nn.Module, x: torch.Tensor, memory_format) -> tuple:
    """(loss, gradients) of one step in `memory_format`, the RNG seeded alike."""
    model = copy.deepcopy(model).to(memory_format=memory_format)
    x = x.contiguous(memory_format=memory_format)
    torch.manual_seed(1)
    loss = compute_loss(model(x), x, Config().loss, 1)[0]
    loss.backward()
    return loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters()
                                     if p.grad is not None])


@pytest.mark.parametrize("case", model_cases(), ids=case_id)
def test_channels_last_trains_what_contiguous_trains(case):
    """Same weights, batch and seed: the same loss and gradients up to float rounding.
    (The VAE drew its noise in memory order, so channels-last sampled other noise.)"""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model(tiny_model_config(*case)).train()
    x = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    loss, grads = training_step(model, x, torch.contiguous_format)
    loss_cl, grads_cl = training_step(model, x, torch.channels_last)
    assert loss_cl.item() == pytest.approx(loss.item(), rel=1e-5)
    assert F.cosine_similarity(grads, grads_cl, dim=0).item() > 0.9999
