"""Validation during training: the fixed val subset (read once), its metrics, image grids.

The metrics are the training loss terms plus MSE and PSNR as `pipeline evaluate` defines
them (and, with the perceptual term on, `val/perceptual`: the training's LPIPS), summed
over ranks; `val/mean_image_recon` is the bar a model must beat. None of it
moves the training random stream (`rng_neutral`), so a resumed run and an uninterrupted
one draw the same numbers.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import numpy as np
import torch
from accelerate import Accelerator
from torch import Tensor, nn

from ..checkpoint import collectively
from ..config import Config
from ..data import make_loader, normalize
from ..metrics import per_image_l1, per_image_mse, per_image_psnr, to_unit_range
from ..models import compute_loss
from ..utils import PipelineError

if TYPE_CHECKING:
    from .setup import Run

NUM_GRID_IMAGES = 8      # fixed val images shown as originals vs reconstructions
GRID_CAPTIONS = {"reconstructions": "top: fixed val originals; bottom: reconstructions",
                 "prior_samples": "decoded samples from the prior (fixed noise)"}


@dataclass
class ValSet:
    """The fixed validation subset, read once and kept as uint8 (this rank's share)."""
    images: Tensor
    mean_image_recon: float  # error of predicting the subset's mean image (global)


def recon_error(pred: Tensor, target: Tensor, kind: str) -> Tensor:
    """Per-image reconstruction error, same definition as the training loss (mean over pixels)."""
    return per_image_l1(pred, target) if kind == "l1" else per_image_mse(pred, target)


def load_val_set(cfg: Config, accelerator: Accelerator) -> ValSet:
    """Read this rank's share of the fixed val subset once (in-process: it is read a single
    time, so a worker process would cost more than it saves)."""
    loader = make_loader(cfg.data.val_shards, cfg.train.batch_size, mode="eval", num_workers=0,
                         rank=accelerator.process_index, world_size=accelerator.num_processes,
                         max_samples=cfg.data.val_samples)

    def read_images() -> Tensor:
        m = cfg.model
        batches = [images for images, _labels, _keys in loader]
        images = (torch.cat(batches) if batches else
                  torch.zeros(0, m.in_channels, m.image_size, m.image_size, dtype=torch.uint8))
        check_batch_shape(images, cfg, "--val-shards")
        return images

    # One rank that cannot read its share (or finds the wrong size) stops all of them.
    images = collectively(accelerator, read_images, "reading the validation subset")
    return ValSet(images, mean_image_error(images, cfg, accelerator))


def check_batch_shape(images: Tensor, cfg: Config, option: str) -> None:
    """Images of another size (or channel count) than the model's would train and validate
    without a word and give an export that claims the wrong size: refuse them."""
    m = cfg.model
    expected = (m.in_channels, m.image_size, m.image_size)
    found = tuple(images.shape[1:])
    if found != expected:
        spec = getattr(cfg.data, "train_shards" if option == "--train-shards" else "val_shards")
        raise PipelineError(f"{option} {spec}: the images are {found[0]}x{found[1]}x"
                            f"{found[2]} (channels x height x width), but the model is built "
                            f"for {expected[0]}x{expected[1]}x{expected[2]} "
                            f"(--model.in_channels, --model.image_size); pass "
                            f"--model.image_size {found[1]}, or prepare shards of "
                            f"{m.image_size}px")


def mean_image_error(images: Tensor, cfg: Config, accelerator: Accelerator) -> float:
    """The error of always predicting the subset's mean image: the bar a model must beat."""
    x = normalize(images.to(accelerator.device))
    count = accelerator.reduce(torch.tensor(float(len(x)), device=x.device), "sum").item()
    if count == 0:
        raise PipelineError(f"--val-shards {cfg.data.val_shards}: no validation image could be "
                            f"read; check the shards with `pipeline bench load --shards ...`")
    mean_image = accelerator.reduce(x.sum(0), "sum") / count
    errors = recon_error(mean_image.expand_as(x), x, cfg.loss.recon)
    return accelerator.reduce(errors.sum(), "sum").item() / count


@torch.no_grad()
def validate(model: nn.Module, val: ValSet, cfg: Config, accelerator: Accelerator,
             step: int, perceptual: nn.Module | None = None) -> dict[str, float]:
    """Loss terms, MSE and PSNR (and the LPIPS of `perceptual`, the training's term) on
    the fixed val subset; sums reduced across ranks."""
    sums = torch.zeros(6, device=accelerator.device)  # loss, recon, mse, psnr, lpips, count
    for batch in val.images.split(cfg.train.batch_size):
        x = normalize(batch.to(accelerator.device))
        with accelerator.autocast():
            out = model(x)
            loss, parts = compute_loss(out, x, cfg.loss, step)
        # MSE and PSNR as `pipeline evaluate` defines them: on [0, 1], PSNR capped per image.
        recon01, x01 = to_unit_range(out.recon), to_unit_range(x)
        n = len(x)
        lpips = (perceptual(out.recon, x).sum() if perceptual is not None
                 else torch.zeros((), device=x.device))
        sums += torch.stack([loss.float() * n, parts["recon"].float() * n,
                             per_image_mse(recon01, x01).sum(),
                             per_image_psnr(recon01, x01).sum(), lpips.float(),
                             torch.tensor(float(n), device=x.device)])
    loss_sum, recon_sum, mse_sum, psnr_sum, lpips_sum, count = accelerator.reduce(
        sums, "sum").tolist()
    metrics = {"val/loss": loss_sum / count, "val/recon": recon_sum / count,
               "val/mse": mse_sum / count, "val/psnr": psnr_sum / count,
               "val/mean_image_recon": val.mean_image_recon}
    if perceptual is not None:
        metrics["val/perceptual"] = lpips_sum / count
    return metrics


def to_grid(rows: list[Tensor]) -> np.ndarray:
    """Rows of images in [-1, 1] -> one HxWx3 uint8 grid, one row per tensor."""
    from torchvision.utils import make_grid

    images = torch.cat([r.float().clamp(-1, 1) for r in rows]).cpu() * 0.5 + 0.5
    grid = make_grid(images, nrow=len(rows[0]), padding=2, pad_value=1.0)
    return (grid.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()


@torch.no_grad()
def image_grids(model: nn.Module, val: ValSet, cfg: Config,
                device: torch.device) -> dict[str, np.ndarray]:
    """Fixed val originals over their reconstructions; prior samples from fixed noise when
    the model has a prior (the VAE)."""
    x = normalize(val.images[:NUM_GRID_IMAGES].to(device))
    grids = {"reconstructions": to_grid([x, model(x).recon])}
    if model.has_prior:
        noise = torch.Generator(device).manual_seed(cfg.train.seed)  # same draws every time
        grids["prior_samples"] = to_grid([model.sample(NUM_GRID_IMAGES, generator=noise)])
    return grids


@contextlib.contextmanager
def rng_neutral(device: torch.device) -> Iterator[None]:
    """Validation and image grids must not move the training random stream: with them
    inside, a resumed run and an uninterrupted one draw the same numbers."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        yield


def evaluate_now(run: "Run", val: ValSet, step: int, with_images: bool) -> dict[str, float]:
    """Validation metrics (all ranks) and, when asked, image grids (main process)."""
    model, device = run.export_model, run.accelerator.device
    model.eval()
    with rng_neutral(device):
        perceptual = run.objective.perceptual if run.objective is not None else None
        metrics = validate(model, val, run.cfg, run.accelerator, step, perceptual)
        if with_images and run.accelerator.is_main_process:
            run.logger.log_images(image_grids(model, val, run.cfg, device), step, GRID_CAPTIONS)
    run.model.train()
    return metrics
