"""What `pipeline evaluate` writes per checkpoint: `DIR/<name>/metrics.json` and beside it
the strips of the 16 fixed images (the first val samples in manifest order, the same for
every checkpoint), error maps, VAE prior samples, code counts and the resolved options
(`evaluate.yaml`). Everything the report needs, so it needs no model; file names come
from `pipeline.layout`.
"""
from __future__ import annotations

import io
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .. import metrics
from ..layout import METRICS_NAME, STRIP_FILES
from ..shards import manifest_hash
from ..utils import PipelineError, atomic_dir, dumps_json, provenance
from .checkpoints import Checkpoint
from .config import EvaluateConfig
from .run import expected_samples

NUM_FIXED_IMAGES = 16
ERROR_MAP_CMAP = "magma"
ERROR_MAP_MAX = 0.1           # mean |error| over RGB (pixels in [0, 1]) at full colour (~20 dB)
PRIOR_SEED = 0                # VAE prior samples: same noise for every checkpoint


# ---------------------------------------------------------------- fixed images

def load_fixed_images(shards: str) -> tuple[Tensor, list[str]]:
    """The first 16 val samples in manifest order: the same images for every checkpoint."""
    from ..data import make_loader

    loader = make_loader(shards, NUM_FIXED_IMAGES, mode="eval", num_workers=0, rank=0,
                         world_size=1, max_samples=NUM_FIXED_IMAGES)
    images, keys = [], []
    for batch, _, batch_keys in loader:
        images.append(batch)
        keys += batch_keys
    if not keys:
        raise PipelineError(f"no readable val image in {shards} for the fixed image strips")
    return torch.cat(images), keys


def png_strip(images: Tensor) -> bytes:
    """B x 3 x H x W uint8 -> one PNG row of B images, no padding (B*W x H)."""
    row = images.permute(2, 0, 3, 1).reshape(images.shape[2], -1, 3)  # H, B*W, 3
    buf = io.BytesIO()
    Image.fromarray(row.cpu().numpy()).save(buf, format="PNG")
    return buf.getvalue()


def to_uint8(images01: Tensor) -> Tensor:
    return (images01 * 255).round().to(torch.uint8)


def error_maps(recon01: Tensor, target01: Tensor) -> Tensor:
    """Mean absolute error over RGB through a fixed-scale colormap, as uint8 RGB images."""
    from matplotlib import colormaps

    error = ((recon01 - target01).abs().mean(1) / ERROR_MAP_MAX).clamp(0, 1)  # B, H, W
    rgb = colormaps[ERROR_MAP_CMAP](error.cpu().numpy())[..., :3]  # B, H, W, 3 floats
    return torch.from_numpy((rgb * 255).round().astype(np.uint8)).permute(0, 3, 1, 2)


@torch.inference_mode()
def fixed_image_files(model: torch.nn.Module, images: Tensor, device: torch.device,
                      code_counts: Tensor | None) -> dict[str, tuple[str, bytes]]:
    """The files beside metrics.json: {role: (file name, content)}."""
    from ..data import normalize

    x = normalize(images.to(device))
    target, recon = metrics.to_unit_range(x), metrics.to_unit_range(model(x).recon)
    files = {"originals": png_strip(images), "reconstructions": png_strip(to_uint8(recon)),
             "error_maps": png_strip(error_maps(recon, target))}
    if model.has_prior:
        generator = torch.Generator(device).manual_seed(PRIOR_SEED)
        samples = model.sample(NUM_FIXED_IMAGES, generator=generator)
        files["prior_samples"] = png_strip(to_uint8(metrics.to_unit_range(samples)))
    if code_counts is not None:
        counts = [int(c) for c in code_counts.tolist()]
        files["code_usage"] = (dumps_json({"counts": counts}, indent=None) + "\n").encode()
    return {role: (STRIP_FILES[role], data) for role, data in files.items()}


# ---------------------------------------------------------------- metrics.json

def metrics_record(ckpt: Checkpoint, result: dict[str, Any], manifest: dict[str, Any],
                   fixed_keys: list[str], files: dict[str, tuple[str, bytes]],
                   cfg: EvaluateConfig, accelerator) -> dict[str, Any]:
    """metrics.json: identity and provenance first, then the metrics, then how."""
    model = ckpt.model
    return {
        "name": ckpt.name, "run": ckpt.run, "run_dir": ckpt.export.get("run_dir"),
        "checkpoint": str(ckpt.path.resolve()), "step": ckpt.step,
        "weights": ckpt.export.get("weights"), "model": model.kind, "arch": model.config.arch,
        "quantizer": model.quantizer_name,
        "config": ckpt.export["config"],
        "shards": str(cfg.shards), "manifest_hash": manifest_hash(cfg.shards),
        "expected_samples": expected_samples(manifest, cfg.max_samples),
        "max_samples": cfg.max_samples, "world_size": accelerator.num_processes,
        **result,
        "fixed_keys": fixed_keys,
        "files": {role: files[role][0] if role in files else None for role in STRIP_FILES},
        "settings": settings(cfg, ckpt),
        "provenance": provenance(),
    }


def scale_sizes(cfg) -> list[int]:
    """Image side at each MS-SSIM scale (halving rounds up, as the pooling does)."""
    sides = [cfg.image_size]
    while len(sides) < len(metrics.MS_SSIM_BETAS):
        sides.append(math.ceil(sides[-1] / 2))
    return sides


def settings(cfg: EvaluateConfig, ckpt: Checkpoint) -> dict[str, str]:
    """How each metric was computed, written into metrics.json for the reader."""
    betas = ", ".join(f"{b:.4f}" for b in metrics.MS_SSIM_BETAS)
    scales = ", ".join(f"{s} px" for s in scale_sizes(ckpt.model.config))
    return {
        "pixels": "images mapped to [0, 1]: originals x/255, reconstructions (recon+1)/2 "
                  "clipped to [0, 1], not quantised to 8 bits",
        "psnr": f"mean over images of 10*log10(1/MSE_image), each capped at "
                f"{metrics.PSNR_CAP_DB:g} dB; psnr_of_mean_mse = 10*log10(1/mean MSE)",
        "mse_l1": "mean over images of the per-image mean over pixels and channels",
        "ssim_convention": metrics.SSIM_CONVENTION,
        "ssim": f"pipeline.metrics' own SSIM (independent of the torchmetrics version), equal "
                f"per image to skimage's structural_similarity(gaussian_weights=True, "
                f"sigma={metrics.SSIM_SIGMA}, use_sample_covariance=False, data_range=1, "
                f"channel_axis=...): {metrics.SSIM_KERNEL}-tap Gaussian window, population "
                f"(co)variances, K1 {metrics.SSIM_K1}, K2 {metrics.SSIM_K2}, valid region only "
                f"(the {metrics.SSIM_KERNEL // 2}-px border of the SSIM map left out), mean "
                f"over the map, then over RGB, then over images",
        "ms_ssim": f"pipeline.metrics' own MS-SSIM (same window and valid-region convention "
                   f"as ssim), 3 scales ({scales}) "
                   f"by 2x2 average pooling, betas ({betas}) = the first three standard "
                   f"weights renormalised; per channel as pytorch_msssim: relu'd "
                   f"contrast-structure at the first two scales, relu'd SSIM at the last, "
                   f"each to its beta, multiplied; then the mean over RGB and over images",
        "vae": f"kl: KL(q(z|x) || N(0, I)) in nats per image, mean over images; decoder "
               f"likelihood: discretised Gaussian, sigma {cfg.vae_sigma} in [0, 1] units, "
               f"256 bins per value, evaluated at the decoded posterior mean (the model "
               f"decodes the mean in eval mode); neg_elbo = kl + nll in nats per image; "
               f"bits_per_dim = neg_elbo / (3*H*W*ln 2); bits_per_image = kl / ln 2",
        "bits_per_image": "VQ, SimVQ: h*w*log2 K; FSQ: h*w*sum(log2 L_i); RVQ: h*w*S*(a "
                          "stage's bits); VAE: KL in bits; AE: null (see latent_size)",
        "codebook": "codebook_usage = % of codes used at least once over the evaluated "
                    "images; perplexity = exp(entropy) of the code frequencies; both per "
                    "code stage (*_per_stage), the model's figure their mean (RVQ: S stages)",
        "lpips": f"LPIPS v0.1 ({cfg.lpips_net}) from local files, mean over images"
                 if cfg.lpips_backbone else "not computed: pass --lpips-backbone",
        "rfid": "FID (torchmetrics, 2048-d Inception pool features) of reconstructions vs "
                "originals over the evaluated images" if cfg.inception_weights
                else "not computed: pass --inception-weights",
        "error_maps": f"mean |recon - original| over RGB, colormap {ERROR_MAP_CMAP}, "
                      f"0 (black) to {ERROR_MAP_MAX} (bright, clipped above)",
        "throughput": f"main process, batch {cfg.batch_size}, {cfg.throughput_batches} timed "
                      f"batches after one warm-up; images_per_s = images / (encode + decode "
                      f"time)",
        "prior_samples": f"VAE: model.sample(16) with a generator seeded {PRIOR_SEED}",
    }


# ---------------------------------------------------------------- writing

def write_checkpoint_dir(out_dir: Path, record: dict[str, Any],
                         files: dict[str, tuple[str, bytes]]) -> None:
    """All files of one checkpoint appear together or not at all (atomic directory swap)."""
    # Looked up on the package at call time: `pipeline.evaluate.atomic_write_json` stays
    # the one place to replace the writer (the full-disk tests do).
    from . import atomic_write_json

    with atomic_dir(out_dir) as tmp:
        for name, data in files.values():
            (tmp / name).write_bytes(data)
        atomic_write_json(tmp / METRICS_NAME, record)


def warn_if_incomplete(record: dict[str, Any]) -> None:
    accounted = record["num_samples"] + record["num_skipped"]
    if accounted != record["expected_samples"]:
        print(f"warning: {record['name']}: {record['num_samples']} evaluated + "
              f"{record['num_skipped']} skipped = {accounted}, but the manifest gives "
              f"{record['expected_samples']}: samples were lost or read twice", file=sys.stderr)
    elif record["num_skipped"]:
        print(f"warning: {record['name']}: {record['num_skipped']} unreadable val samples were "
              f"skipped", file=sys.stderr)
