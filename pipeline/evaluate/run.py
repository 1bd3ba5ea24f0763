"""The metric pass of one checkpoint over the val shards, and its reduction to metrics.

Every process streams its own part of the shards (the loader splits them) and keeps float64
SUMS of its per-image metrics, reduced in one collective at the end: the result does not
depend on how the samples were split. The model is never wrapped in DDP: inference needs
no gradient sync, and a wrapped forward would add collectives per batch.

What the bottleneck contributes (KL, rate, code indices) is asked of the model, so a new
bottleneck needs no change here; a quantity the model does not report for an image is not
counted for it, and a metric no image reported is null.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from .. import metrics
from ..utils import PipelineError
from .checkpoints import Checkpoint
from .config import EvaluateConfig

IMAGE_METRICS = ("psnr", "mse", "l1", "ssim", "ms_ssim", "lpips")
# Per-image quantities only some models report; each is summed with its own image count.
MODEL_REPORTED = ("kl", "nll", "rate_bits")


class Evaluation:
    """One process's share of one checkpoint's pass: float64 sums and worst candidates."""

    def __init__(self, ckpt: Checkpoint, num_classes: int, cfg: EvaluateConfig,
                 device: torch.device, lpips: torch.nn.Module | None,
                 fid: torch.nn.Module | None):
        self.model, self.device, self.cfg = ckpt.model, device, cfg
        self.lpips, self.fid = lpips, fid
        sizes = {"count": 1, "skipped": 1, **{name: 1 for name in IMAGE_METRICS},
                 "class_psnr": num_classes, "class_count": num_classes,
                 # one block of num_codes counts per code stage (RVQ: S blocks)
                 "code_counts": (ckpt.model.num_codes or 0) * code_stages(ckpt.model)}
        for name in MODEL_REPORTED:
            sizes.update({name: 1, f"{name}_count": 1})
        self.sums = metrics.SumReducer(sizes, device)
        self.worst: list[tuple[float, str]] = []

    @torch.inference_mode()
    def add_batch(self, images: Tensor, labels: Tensor, keys: list[str]) -> None:
        from ..data import normalize

        x = normalize(images.to(self.device, non_blocking=True))
        out = self.model(x)
        target, recon = metrics.to_unit_range(x), metrics.to_unit_range(out.recon)
        psnr = metrics.per_image_psnr(recon, target)
        ones = torch.ones(len(keys), device=self.device)
        s = self.sums
        s.add("count", ones)
        s.add("psnr", psnr)
        s.add("mse", metrics.per_image_mse(recon, target))
        s.add("l1", metrics.per_image_l1(recon, target))
        s.add("ssim", metrics.per_image_ssim(recon, target))
        s.add("ms_ssim", metrics.per_image_ms_ssim(recon, target))
        s.add_at("class_psnr", labels, psnr)
        s.add_at("class_count", labels, ones)
        self._add_bottleneck(out.stats, target, recon)
        if self.lpips is not None:
            s.add("lpips", self.lpips(recon, target))
        if self.fid is not None:
            self.fid.update(target, real=True)
            self.fid.update(recon, real=False)
        candidates = self.worst + list(zip(psnr.tolist(), keys))
        self.worst = metrics.lowest_k(candidates, self.cfg.worst_k)

    def _add_bottleneck(self, stats: dict[str, Tensor], target: Tensor, recon: Tensor) -> None:
        kl = self.model.kl_per_image(stats)
        if kl is not None:  # a posterior: the ELBO's two terms
            self._add_reported("kl", kl)
            self._add_reported("nll", metrics.discretized_gaussian_nll(
                target, recon, self.cfg.vae_sigma))
        rate = self.model.rate_bits(stats)
        if rate is not None:
            self._add_reported("rate_bits", rate)
        indices = self.model.code_indices(stats)
        if indices is not None:
            flat = stage_offset_indices(indices, self.model).flatten()
            self.sums.add_at("code_counts", flat, torch.ones_like(flat, dtype=torch.float64))

    def _add_reported(self, name: str, per_image: Tensor) -> None:
        self.sums.add(name, per_image)
        self.sums.add(f"{name}_count", torch.ones_like(per_image))

    def finish(self, accelerator, num_skipped: int) -> tuple[dict[str, Tensor], list, float | None]:
        """Reduce across processes; every rank must call it (it holds the collectives)."""
        from accelerate.utils import gather_object

        self.sums.add("skipped", torch.tensor(float(num_skipped), device=self.device))
        totals = self.sums.reduce(lambda t: accelerator.reduce(t, reduction="sum"))
        worst = metrics.lowest_k(gather_object(self.worst), self.cfg.worst_k)
        # torchmetrics syncs FID's feature sums across processes inside compute().
        rfid = None
        if self.fid is not None:
            rfid = self.fid.compute().item()
            self.fid.reset()  # the next checkpoint starts from no features
        return totals, worst, rfid


def code_stages(model) -> int:
    """Code indices per latent position: 1, or S for a residual quantiser."""
    return model.bottleneck.code_stages


def stage_offset_indices(indices: Tensor, model) -> Tensor:
    """B×h×w indices, or B×S×h×w for S code stages shifted by stage·num_codes, so that
    one count vector holds every stage's counts in turn."""
    stages = code_stages(model)
    if stages == 1:
        return indices
    offsets = torch.arange(stages, device=indices.device) * model.num_codes
    return indices + offsets.view(1, stages, 1, 1)


def stage_code_usage(counts: Tensor, stages: int) -> tuple[list[float], list[float]]:
    """(percent of codes used, perplexity) of each stage's block of the code counts."""
    figures = [metrics.code_usage(block) for block in counts.view(stages, -1)]
    return [usage for usage, _ in figures], [perplexity for _, perplexity in figures]


def run_pass(ckpt: Checkpoint, manifest: dict[str, Any], cfg: EvaluateConfig,
             accelerator, lpips, fid) -> tuple[dict[str, Tensor], list, float | None]:
    """Stream this process's part of the val shards through the model once."""
    from ..data import make_loader

    loader = make_loader(cfg.shards, cfg.batch_size, mode="eval", num_workers=cfg.num_workers,
                         rank=accelerator.process_index, world_size=accelerator.num_processes,
                         max_samples=cfg.max_samples, on_error=cfg.on_error)
    evaluation = Evaluation(ckpt, len(manifest["classes"]), cfg, accelerator.device, lpips, fid)
    expected = expected_samples(manifest, cfg.max_samples)
    batches = math.ceil(expected / (cfg.batch_size * accelerator.num_processes))
    with tqdm(loader, total=batches, desc=ckpt.name, unit="batch",
              disable=not accelerator.is_main_process) as progress:
        for images, labels, keys in progress:
            evaluation.add_batch(images, labels, keys)
    return evaluation.finish(accelerator, loader.num_skipped)


def expected_samples(manifest: dict[str, Any], max_samples: int | None) -> int:
    total = manifest["num_samples"]
    return total if max_samples is None else min(total, max_samples)


def load_optional_metrics(cfg: EvaluateConfig, device: torch.device):
    """LPIPS and rFID modules when their weight files were given, else None."""
    lpips = fid = None
    if cfg.lpips_backbone:
        lpips = metrics.load_lpips(cfg.lpips_backbone, cfg.lpips_linear, cfg.lpips_net)
        lpips = lpips.to(device)
    if cfg.inception_weights:
        fid = metrics.load_fid(cfg.inception_weights).to(device)
    return lpips, fid


# ---------------------------------------------------------------- from sums to metrics

def summarize(ckpt: Checkpoint, totals: dict[str, Tensor], worst: list[tuple[float, str]],
              rfid: float | None, classes: list[str], has_lpips: bool) -> dict[str, Any]:
    """Means over the evaluated images, and the bottleneck figures."""
    n = totals["count"].item()
    if n == 0:
        raise PipelineError(f"no val sample of the shards could be read while evaluating "
                            f"{ckpt.path}: see the loader's warnings above")
    mean = {name: totals[name].item() / n for name in IMAGE_METRICS}
    model, cfg = ckpt.model, ckpt.model.config
    latent_shape = [int(d) for d in model.latent_shape]
    kl, nll = reported_mean(totals, "kl"), reported_mean(totals, "nll")
    neg_elbo = kl + nll if kl is not None and nll is not None else None
    pixel_values = cfg.in_channels * cfg.image_size ** 2
    usage = perplexity = usage_per_stage = perplexity_per_stage = None
    if model.num_codes is not None:
        stages = code_stages(model)
        usage_per_stage, perplexity_per_stage = stage_code_usage(totals["code_counts"], stages)
        # The whole model's figures are the means over its stages (docs/interfaces.md).
        usage, perplexity = sum(usage_per_stage) / stages, sum(perplexity_per_stage) / stages
    return {
        "num_samples": int(n), "num_skipped": int(totals["skipped"].item()),
        "psnr": mean["psnr"], "psnr_of_mean_mse": metrics.psnr_from_mse(mean["mse"]),
        "ssim": mean["ssim"], "ms_ssim": mean["ms_ssim"], "mse": mean["mse"], "l1": mean["l1"],
        "lpips": mean["lpips"] if has_lpips else None, "rfid": rfid,
        "kl": kl, "neg_elbo": neg_elbo,
        "bits_per_dim": neg_elbo / (pixel_values * math.log(2)) if neg_elbo is not None else None,
        "bits_per_image": reported_mean(totals, "rate_bits"),
        "latent_shape": latent_shape, "latent_size": math.prod(latent_shape),
        "codebook_usage": usage, "perplexity": perplexity,
        "codebook_usage_per_stage": usage_per_stage, "perplexity_per_stage": perplexity_per_stage,
        "per_class_psnr": per_class_psnr(totals["class_psnr"], totals["class_count"], classes),
        "worst": [{"key": key, "psnr": psnr} for psnr, key in worst],
    }


def reported_mean(totals: dict[str, Tensor], name: str) -> float | None:
    """Mean of a MODEL_REPORTED quantity over the images it was reported for, else None."""
    count = totals[f"{name}_count"].item()
    return totals[name].item() / count if count > 0 else None


def per_class_psnr(sums: Tensor, counts: Tensor, classes: list[str]) -> dict[str, float]:
    """Mean PSNR of each class that has at least one evaluated image, keyed by wnid."""
    return {wnid: (sums[i] / counts[i]).item() for i, wnid in enumerate(classes) if counts[i] > 0}
