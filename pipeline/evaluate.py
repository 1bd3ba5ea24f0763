"""`pipeline evaluate CKPT [CKPT ...] --shards SPEC --output DIR`: reconstruction metrics.

Each checkpoint (an export directory or a `step-<N>/` directory) is run over the val
shards once; under `accelerate launch` / `torchrun` every process reads its own part of the
shards (the loader splits them) and keeps float64 SUMS of its per-image metrics, which are
reduced in one collective at the end. The model is never wrapped in DDP: inference needs
no gradient sync, and a wrapped forward would add collectives per batch.

Writes `DIR/<run>-step<N>/` per checkpoint: `metrics.json` plus image strips of the first
16 val images in manifest order (see docs/interfaces.md "Evaluation output"), so the report
stage needs no model. `<run>` and `<N>` come from the checkpoint's config.json, which is
data: the run name is reduced to one safe path component and the step must be an integer
>= 0, so no crafted config can write (or replace a directory) outside DIR. The main process
holds `DIR/.lock` for the whole run: a second evaluate into the same DIR is refused.
"""
from __future__ import annotations

import argparse
import io
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from . import metrics
from .locking import Lock, acquire
from .shards import manifest_hash, manifest_path
from .utils import PipelineError, atomic_dir, atomic_write_json, dumps_json, provenance

NUM_FIXED_IMAGES = 16
ERROR_MAP_CMAP = "magma"
ERROR_MAP_MAX = 0.1           # mean |error| over RGB (pixels in [0, 1]) at full colour (~20 dB)
PRIOR_SEED = 0                # VAE prior samples: same noise for every checkpoint
DEFAULT_VAE_SIGMA = 0.05      # decoder std of the VAE likelihood, in [0, 1] pixel units
LOCK_NAME = ".lock"           # DIR/.lock, held by the main process while it evaluates into DIR
MAX_STEP = 2 ** 63 - 1        # a step is an int64 counter
# Run names become directory names: letters and digits (any script), `_`, `.`, `+`, `-`.
UNSAFE_NAME_CHARS = re.compile(r"[^\w.+-]+")
MAX_RUN_NAME_BYTES = 100      # with "-step<N>" and atomic_dir's ".tmp-..." well under NAME_MAX


# ---------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pipeline evaluate", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Reconstruction metrics of one or several checkpoints on the val shards. "
                    "Runs under `accelerate launch` / `torchrun` too: every val sample is "
                    "counted once across processes.")
    p.add_argument("checkpoints", nargs="+", metavar="CKPT",
                   help="export directory (RUN_DIR/model) or checkpoint directory "
                        "(RUN_DIR/checkpoints/step-<N>); several compare steps or runs")
    p.add_argument("--shards", required=True, metavar="SPEC",
                   help="val split directory holding manifest.json (the manifest gives the "
                        "sample count, the class names and the 16 fixed images)")
    p.add_argument("--output", required=True, metavar="DIR",
                   help="writes DIR/<run>-step<N>/metrics.json and image strips per checkpoint")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch and process")
    p.add_argument("--num-workers", type=int, default=2,
                   help="loader worker processes per evaluating process")
    p.add_argument("--max-samples", type=int, default=None, metavar="M",
                   help="evaluate only the first M val samples in manifest order (quick checks; "
                        "recorded in metrics.json)")
    p.add_argument("--worst-k", type=int, default=16,
                   help="how many lowest-PSNR images to list (their keys) in metrics.json")
    p.add_argument("--vae-sigma", type=float, default=DEFAULT_VAE_SIGMA,
                   help="std of the VAE's discretised Gaussian decoder in [0, 1] pixel units, "
                        "used for neg_elbo and bits_per_dim")
    p.add_argument("--throughput-batches", type=int, default=5,
                   help="timed encode and decode batches after one warm-up batch")
    p.add_argument("--lpips-backbone", metavar="FILE",
                   help="enables LPIPS: torchvision ImageNet state dict of the backbone "
                        "(alexnet-owt-7be5be79.pth, or vgg16-397923af.pth with --lpips-net vgg)")
    p.add_argument("--lpips-linear", metavar="FILE",
                   help="LPIPS linear-layer weights, the lpips package's weights/v0.1/<net>.pth "
                        "(default: the copy shipped inside torchmetrics)")
    p.add_argument("--lpips-net", choices=sorted(metrics.LPIPS_NETS), default="alex",
                   help="LPIPS backbone the two files belong to")
    p.add_argument("--inception-weights", metavar="FILE",
                   help="enables rFID: torch-fidelity's weights-inception-2015-12-05-6726825d.pth "
                        "(needs the torch-fidelity package)")
    p.add_argument("--on-error", choices=("warn", "raise"), default="warn",
                   help="an unreadable sample is counted as skipped (warn) or stops the run")
    p.add_argument("--tracker", choices=("none", "wandb"), default="none",
                   help="also log summary metrics and a table to W&B (WANDB_MODE=offline works)")
    p.add_argument("--project", default="ae-pipeline", help="W&B project")
    p.add_argument("--run-name", default=None, help="W&B run name (default: evaluate-<DIR name>)")
    return p


# Inclusive ranges of the integer options (None: no upper bound).
INT_RANGES = {"batch_size": (1, 65536), "num_workers": (0, 256), "max_samples": (1, None),
              "worst_k": (1, 10000), "throughput_batches": (1, 10000)}
# W&B refuses these in project names.
WANDB_PROJECT_CHARS = re.compile(r"[^/\\#?%:]{1,128}")


def check_args(args: argparse.Namespace) -> None:
    for name, (low, high) in INT_RANGES.items():
        value = getattr(args, name)
        if value is None:  # only --max-samples may be absent
            continue
        if value < low or (high is not None and value > high):
            bounds = f"between {low} and {high}" if high is not None else f">= {low}"
            raise PipelineError(f"--{name.replace('_', '-')} must be {bounds}, got {value}")
    # `not 0 < x <= 1` is also true for NaN, which every comparison fails.
    if not 0 < args.vae_sigma <= 1:
        raise PipelineError(f"--vae-sigma must be in (0, 1] (a std in [0, 1] pixel units), "
                            f"got {args.vae_sigma}")
    if not WANDB_PROJECT_CHARS.fullmatch(args.project):
        raise PipelineError(f"--project {args.project!r}: 1 to 128 characters, none of "
                            f"/ \\ # ? % : (W&B refuses them)")
    if args.run_name is not None and not args.run_name.strip():
        raise PipelineError("--run-name must not be empty (leave it out for the default)")
    output = Path(args.output)
    if output.exists() and not output.is_dir():
        raise PipelineError(f"--output {output}: exists and is not a directory")


# ---------------------------------------------------------------- checkpoints

@dataclass
class Checkpoint:
    path: Path
    model: torch.nn.Module
    export: dict[str, Any]     # read_export_config(): model, config, step, run_dir, run_name...
    run: str                   # as recorded; checkpoint_identity() ensures a safe name exists
    step: int

    @property
    def name(self) -> str:
        """The output directory's name: always one safe path component."""
        return f"{safe_component(self.run)}-step{self.step}"


def safe_component(text: str) -> str:
    """`text` as one harmless path component, readable names unchanged (`vae-basic`).

    Runs of other characters than letters, digits and `_.+-` (path separators, spaces,
    control characters) become `_`; leading and trailing `._-` go, so the result is never
    `.` or `..`, never hidden like atomic_dir's temporaries, never read as an option; it is
    cut to MAX_RUN_NAME_BYTES of UTF-8. May be empty: the caller picks a fallback.
    """
    cleaned = UNSAFE_NAME_CHARS.sub("_", text).strip("._-")
    cut = cleaned.encode("utf-8")[:MAX_RUN_NAME_BYTES].decode("utf-8", "ignore")
    return cut.rstrip("._-")


def checkpoint_identity(path: Path, export: dict[str, Any]) -> tuple[str, int]:
    """(run, step) from an export's config.json, checked: these values name the output."""
    where = path / "config.json"
    step = export.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= MAX_STEP:
        raise PipelineError(f"{where}: 'step' must be an integer >= 0, got {step!r}; "
                            f"re-export the model")
    for key in ("run_name", "run_dir"):
        if export.get(key) is not None and not isinstance(export[key], str):
            raise PipelineError(f"{where}: {key!r} must be a string or null, got "
                                f"{export[key]!r}; re-export the model")
    run_dir = export.get("run_dir")
    candidates = (export.get("run_name"), Path(run_dir).name if run_dir else None,
                  path.resolve().name)
    run = next((c for c in candidates if c and safe_component(c)), "checkpoint")
    return run, step


def load_checkpoints(paths: list[str]) -> list[Checkpoint]:
    """Load every checkpoint on the CPU before evaluating any, so a bad one fails fast."""
    from .models import from_pretrained, read_export_config

    loaded = []
    for arg in paths:
        path = Path(arg)
        if not path.is_dir():
            raise PipelineError(f"checkpoint {arg}: no such directory (pass an export "
                                f"directory RUN_DIR/model or RUN_DIR/checkpoints/step-<N>)")
        try:
            export = read_export_config(path)
            run, step = checkpoint_identity(path, export)
            loaded.append(Checkpoint(path, from_pretrained(path).eval(), export, run, step))
        except PipelineError as e:
            raise PipelineError(f"checkpoint {arg}: {e}") from e
    names = [c.name for c in loaded]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise PipelineError(f"several checkpoints would write {', '.join(duplicates)}: give "
                            f"each run a distinct run name, or evaluate them into different "
                            f"--output directories")
    return loaded


def check_resolution(manifest: dict[str, Any], shards: str, ckpt: Checkpoint) -> None:
    expected, found = ckpt.model.config.image_size, manifest["image_size"]
    if found != expected:
        raise PipelineError(f"shards {manifest_path(shards)} hold {found}x{found} images but "
                            f"checkpoint {ckpt.path} was trained on {expected}x{expected}: "
                            f"evaluate on shards prepared at {expected} px")
    if found < metrics.MS_SSIM_MIN_SIZE:
        raise PipelineError(f"shards {manifest_path(shards)} hold {found}x{found} images: "
                            f"3-scale MS-SSIM needs at least {metrics.MS_SSIM_MIN_SIZE} px")


def checkpoint_dir(output: str | Path, name: str) -> Path:
    """DIR/<name>, refused when it would lead out of DIR (a link already there)."""
    root = Path(output).resolve()
    out_dir = Path(output) / name
    # `name` is one safe component, so only a symlink at DIR/<name> can escape; atomic_dir
    # would rename the link itself and leave its target alone, but nothing good follows.
    if out_dir.is_symlink() or out_dir.resolve().parent != root or out_dir.name != name:
        raise PipelineError(f"{out_dir} is a link or leads out of --output {output}: remove "
                            f"it or choose another --output")
    return out_dir


# ---------------------------------------------------------------- the metric pass

class Evaluation:
    """One process's share of one checkpoint's pass: float64 sums and worst candidates."""

    def __init__(self, ckpt: Checkpoint, num_classes: int, args: argparse.Namespace,
                 device: torch.device, lpips: torch.nn.Module | None,
                 fid: torch.nn.Module | None):
        cfg = ckpt.model.config
        self.model, self.kind, self.device, self.args = ckpt.model, cfg.model, device, args
        self.quantized = cfg.model == "vqvae"
        num_codes = metrics.num_codes(cfg.quantizer, cfg.codebook_size, cfg.fsq_levels)
        self.lpips, self.fid = lpips, fid
        self.sums = metrics.SumReducer({
            "count": 1, "skipped": 1, "psnr": 1, "mse": 1, "l1": 1, "ssim": 1, "ms_ssim": 1,
            "lpips": 1, "kl": 1, "nll": 1, "class_psnr": num_classes,
            "class_count": num_classes, "code_counts": num_codes if self.quantized else 0},
            device)
        self.worst: list[tuple[float, str]] = []

    @torch.inference_mode()
    def add_batch(self, images: Tensor, labels: Tensor, keys: list[str]) -> None:
        from .data import normalize

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
        if self.kind == "vae":
            s.add("kl", out.stats["kl_per_image"])
            s.add("nll", metrics.discretized_gaussian_nll(target, recon, self.args.vae_sigma))
        if self.quantized:
            indices = out.stats["indices"].flatten()
            s.add_at("code_counts", indices, torch.ones_like(indices, dtype=torch.float64))
        if self.lpips is not None:
            s.add("lpips", self.lpips(recon, target))
        if self.fid is not None:
            self.fid.update(target, real=True)
            self.fid.update(recon, real=False)
        candidates = self.worst + list(zip(psnr.tolist(), keys))
        self.worst = metrics.lowest_k(candidates, self.args.worst_k)

    def finish(self, accelerator, num_skipped: int) -> tuple[dict[str, Tensor], list, float | None]:
        """Reduce across processes; every rank must call it (it holds the collectives)."""
        from accelerate.utils import gather_object

        self.sums.add("skipped", torch.tensor(float(num_skipped), device=self.device))
        totals = self.sums.reduce(lambda t: accelerator.reduce(t, reduction="sum"))
        worst = metrics.lowest_k(gather_object(self.worst), self.args.worst_k)
        # torchmetrics syncs FID's feature sums across processes inside compute().
        rfid = None
        if self.fid is not None:
            rfid = self.fid.compute().item()
            self.fid.reset()  # the next checkpoint starts from no features
        return totals, worst, rfid


def run_pass(ckpt: Checkpoint, manifest: dict[str, Any], args: argparse.Namespace,
             accelerator, lpips, fid) -> tuple[dict[str, Tensor], list, float | None]:
    """Stream this process's part of the val shards through the model once."""
    from .data import make_loader

    loader = make_loader(args.shards, args.batch_size, mode="eval", num_workers=args.num_workers,
                         rank=accelerator.process_index, world_size=accelerator.num_processes,
                         max_samples=args.max_samples, on_error=args.on_error)
    evaluation = Evaluation(ckpt, len(manifest["classes"]), args, accelerator.device, lpips, fid)
    expected = expected_samples(manifest, args.max_samples)
    batches = math.ceil(expected / (args.batch_size * accelerator.num_processes))
    with tqdm(loader, total=batches, desc=ckpt.name, unit="batch",
              disable=not accelerator.is_main_process) as progress:
        for images, labels, keys in progress:
            evaluation.add_batch(images, labels, keys)
    return evaluation.finish(accelerator, loader.num_skipped)


def expected_samples(manifest: dict[str, Any], max_samples: int | None) -> int:
    total = manifest["num_samples"]
    return total if max_samples is None else min(total, max_samples)


# ---------------------------------------------------------------- from sums to metrics

def summarize(ckpt: Checkpoint, totals: dict[str, Tensor], worst: list[tuple[float, str]],
              rfid: float | None, classes: list[str], has_lpips: bool) -> dict[str, Any]:
    """Means over the evaluated images, and the bottleneck figures."""
    n = totals["count"].item()
    if n == 0:
        raise PipelineError(f"no val sample of the shards could be read while evaluating "
                            f"{ckpt.path}: see the loader's warnings above")
    mean = {name: totals[name].item() / n for name in ("psnr", "mse", "l1", "ssim", "ms_ssim",
                                                       "lpips", "kl", "nll")}
    cfg = ckpt.model.config
    latent_shape = [int(d) for d in ckpt.model.latent_shape]
    kl = mean["kl"] if cfg.model == "vae" else None
    neg_elbo = kl + mean["nll"] if kl is not None else None
    pixel_values = cfg.in_channels * cfg.image_size ** 2
    usage, perplexity = (metrics.code_usage(totals["code_counts"]) if cfg.model == "vqvae"
                         else (None, None))
    return {
        "num_samples": int(n), "num_skipped": int(totals["skipped"].item()),
        "psnr": mean["psnr"], "psnr_of_mean_mse": metrics.psnr_from_mse(mean["mse"]),
        "ssim": mean["ssim"], "ms_ssim": mean["ms_ssim"], "mse": mean["mse"], "l1": mean["l1"],
        "lpips": mean["lpips"] if has_lpips else None, "rfid": rfid,
        "kl": kl, "neg_elbo": neg_elbo,
        "bits_per_dim": neg_elbo / (pixel_values * math.log(2)) if neg_elbo is not None else None,
        "bits_per_image": metrics.bits_per_image(cfg.model, cfg.quantizer, latent_shape,
                                                 cfg.codebook_size, cfg.fsq_levels, kl),
        "latent_shape": latent_shape, "latent_size": math.prod(latent_shape),
        "codebook_usage": usage, "perplexity": perplexity,
        "per_class_psnr": per_class_psnr(totals["class_psnr"], totals["class_count"], classes),
        "worst": [{"key": key, "psnr": psnr} for psnr, key in worst],
    }


def per_class_psnr(sums: Tensor, counts: Tensor, classes: list[str]) -> dict[str, float]:
    """Mean PSNR of each class that has at least one evaluated image, keyed by wnid."""
    return {wnid: (sums[i] / counts[i]).item() for i, wnid in enumerate(classes) if counts[i] > 0}


def scale_sizes(cfg) -> list[int]:
    """Image side at each MS-SSIM scale (halving rounds up, as the pooling does)."""
    sides = [cfg.image_size]
    while len(sides) < len(metrics.MS_SSIM_BETAS):
        sides.append(math.ceil(sides[-1] / 2))
    return sides


def settings(args: argparse.Namespace, ckpt: Checkpoint) -> dict[str, str]:
    """How each metric was computed, written into metrics.json for the reader."""
    cfg = ckpt.model.config
    betas = ", ".join(f"{b:.4f}" for b in metrics.MS_SSIM_BETAS)
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
                   f"as ssim), 3 scales ({', '.join(f'{s} px' for s in scale_sizes(cfg))}) "
                   f"by 2x2 average pooling, betas ({betas}) = the first three standard "
                   f"weights renormalised; per channel as pytorch_msssim: relu'd "
                   f"contrast-structure at the first two scales, relu'd SSIM at the last, "
                   f"each to its beta, multiplied; then the mean over RGB and over images",
        "vae": f"kl: KL(q(z|x) || N(0, I)) in nats per image, mean over images; decoder "
               f"likelihood: discretised Gaussian, sigma {args.vae_sigma} in [0, 1] units, "
               f"256 bins per value, evaluated at the decoded posterior mean (the model "
               f"decodes the mean in eval mode); neg_elbo = kl + nll in nats per image; "
               f"bits_per_dim = neg_elbo / (3*H*W*ln 2); bits_per_image = kl / ln 2",
        "bits_per_image": "VQ: h*w*log2 K; FSQ: h*w*sum(log2 L_i); VAE: KL in bits; AE: null "
                          "(see latent_size)",
        "codebook": "codebook_usage = % of codes used at least once over the evaluated "
                    "images; perplexity = exp(entropy) of the code frequencies",
        "lpips": f"LPIPS v0.1 ({args.lpips_net}) from local files, mean over images"
                 if args.lpips_backbone else "not computed: pass --lpips-backbone",
        "rfid": "FID (torchmetrics, 2048-d Inception pool features) of reconstructions vs "
                "originals over the evaluated images" if args.inception_weights
                else "not computed: pass --inception-weights",
        "error_maps": f"mean |recon - original| over RGB, colormap {ERROR_MAP_CMAP}, "
                      f"0 (black) to {ERROR_MAP_MAX} (bright, clipped above)",
        "throughput": f"main process, batch {args.batch_size}, {args.throughput_batches} timed "
                      f"batches after one warm-up; images_per_s = images / (encode + decode "
                      f"time)",
        "prior_samples": f"VAE: model.sample(16) with a generator seeded {PRIOR_SEED}",
    }


# ---------------------------------------------------------------- fixed images

def load_fixed_images(shards: str) -> tuple[Tensor, list[str]]:
    """The first 16 val samples in manifest order: the same images for every checkpoint."""
    from .data import make_loader

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
    from .data import normalize

    x = normalize(images.to(device))
    target, recon = metrics.to_unit_range(x), metrics.to_unit_range(model(x).recon)
    files = {"originals": ("originals.png", png_strip(images)),
             "reconstructions": ("reconstructions.png", png_strip(to_uint8(recon))),
             "error_maps": ("error_maps.png", png_strip(error_maps(recon, target)))}
    if model.config.model == "vae":
        generator = torch.Generator(device).manual_seed(PRIOR_SEED)
        samples = model.sample(NUM_FIXED_IMAGES, generator=generator)
        files["prior_samples"] = ("prior_samples.png",
                                  png_strip(to_uint8(metrics.to_unit_range(samples))))
    if code_counts is not None:
        counts = [int(c) for c in code_counts.tolist()]
        files["code_usage"] = ("code_usage.json",
                               (dumps_json({"counts": counts}, indent=None) + "\n").encode())
    return files


# ---------------------------------------------------------------- throughput

@torch.inference_mode()
def measure_throughput(model: torch.nn.Module, images: Tensor, device: torch.device,
                       batch_size: int, batches: int) -> dict[str, float]:
    """Images/s of encode, decode and the round trip, timed separately after a warm-up."""
    from .data import normalize

    repeats = math.ceil(batch_size / len(images))
    x = normalize(images.repeat(repeats, 1, 1, 1)[:batch_size].to(device))
    model.decode(model.encode(x))  # warm-up: allocator, cuDNN autotuning, lazy inits
    encode_s = _timed(lambda: model.encode(x), device, batches)
    z = model.encode(x)
    decode_s = _timed(lambda: model.decode(z), device, batches)
    n = batch_size * batches
    return {"images_per_s": n / (encode_s + decode_s), "encode_images_per_s": n / encode_s,
            "decode_images_per_s": n / decode_s}


def _timed(fn, device: torch.device, repeats: int) -> float:
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    _synchronize(device)  # CUDA kernels run asynchronously: wait before reading the clock
    return time.perf_counter() - start


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- one checkpoint

def evaluate_checkpoint(ckpt: Checkpoint, manifest: dict[str, Any], fixed: tuple[Tensor, list],
                        args: argparse.Namespace, accelerator, lpips, fid) -> dict[str, Any] | None:
    """Metrics of one checkpoint; the main process writes its directory and returns them."""
    ckpt.model.to(accelerator.device)
    totals, worst, rfid = run_pass(ckpt, manifest, args, accelerator, lpips, fid)

    def summarize_and_write() -> dict[str, Any]:
        result = summarize(ckpt, totals, worst, rfid, manifest["classes"], lpips is not None)
        fixed_images, fixed_keys = fixed
        code_counts = totals["code_counts"] if ckpt.model.config.model == "vqvae" else None
        files = fixed_image_files(ckpt.model, fixed_images, accelerator.device, code_counts)
        result.update(measure_throughput(ckpt.model, fixed_images, accelerator.device,
                                         args.batch_size, args.throughput_batches))
        result = metrics_record(ckpt, result, manifest, fixed_keys, files, args, accelerator)
        write_checkpoint_dir(checkpoint_dir(args.output, ckpt.name), result, files)
        warn_if_incomplete(result)
        return result

    result = on_main_process(accelerator, summarize_and_write, f"writing {ckpt.name}")
    ckpt.model.to("cpu")  # free accelerator memory for the next checkpoint
    return result


def on_main_process(accelerator, fn, what: str):
    """fn() on the main process only; every process learns whether it failed.

    Without this, a failure of the main process alone (a full disk, a held lock) would
    leave the others waiting for it at the next collective until the launcher kills them.
    Every process must call it, in the same order.
    """
    result, error = None, None
    if accelerator.is_main_process:
        try:
            result = fn()
        except Exception as e:  # re-raised below, after the others were told
            error = e
    flag = torch.tensor([0.0 if error is None else 1.0], device=accelerator.device)
    failed = accelerator.reduce(flag, reduction="sum").item() > 0
    if error is not None:
        raise error
    if failed:
        raise PipelineError(f"the main process failed while {what} (its error is above)")
    return result


def metrics_record(ckpt: Checkpoint, result: dict[str, Any], manifest: dict[str, Any],
                   fixed_keys: list[str], files: dict[str, tuple[str, bytes]],
                   args: argparse.Namespace, accelerator) -> dict[str, Any]:
    """metrics.json: identity and provenance first, then the metrics, then how."""
    cfg = ckpt.model.config
    names = ("originals", "reconstructions", "error_maps", "prior_samples", "code_usage")
    return {
        "name": ckpt.name, "run": ckpt.run, "run_dir": ckpt.export.get("run_dir"),
        "checkpoint": str(ckpt.path.resolve()), "step": ckpt.step,
        "weights": ckpt.export.get("weights"), "model": cfg.model, "arch": cfg.arch,
        "quantizer": cfg.quantizer if cfg.model == "vqvae" else None,
        "config": ckpt.export["config"],
        "shards": str(args.shards), "manifest_hash": manifest_hash(args.shards),
        "expected_samples": expected_samples(manifest, args.max_samples),
        "max_samples": args.max_samples, "world_size": accelerator.num_processes,
        **result,
        "fixed_keys": fixed_keys,
        "files": {name: files[name][0] if name in files else None for name in names},
        "settings": settings(args, ckpt),
        "provenance": provenance(),
    }


def write_checkpoint_dir(out_dir: Path, record: dict[str, Any],
                         files: dict[str, tuple[str, bytes]]) -> None:
    """All files of one checkpoint appear together or not at all (atomic directory swap)."""
    with atomic_dir(out_dir) as tmp:
        for name, data in files.values():
            (tmp / name).write_bytes(data)
        atomic_write_json(tmp / "metrics.json", record)


def warn_if_incomplete(record: dict[str, Any]) -> None:
    accounted = record["num_samples"] + record["num_skipped"]
    if accounted != record["expected_samples"]:
        print(f"warning: {record['name']}: {record['num_samples']} evaluated + "
              f"{record['num_skipped']} skipped = {accounted}, but the manifest gives "
              f"{record['expected_samples']}: samples were lost or read twice", file=sys.stderr)
    elif record["num_skipped"]:
        print(f"warning: {record['name']}: {record['num_skipped']} unreadable val samples were "
              f"skipped", file=sys.stderr)


# ---------------------------------------------------------------- optional metrics, tracker

def load_optional_metrics(args: argparse.Namespace, device: torch.device):
    """LPIPS and rFID modules when their weight files were given, else None."""
    lpips = fid = None
    if args.lpips_backbone:
        lpips = metrics.load_lpips(args.lpips_backbone, args.lpips_linear, args.lpips_net)
        lpips = lpips.to(device)
    elif args.lpips_linear:
        raise PipelineError("--lpips-linear needs --lpips-backbone (the backbone's weights)")
    if args.inception_weights:
        fid = metrics.load_fid(args.inception_weights).to(device)
    return lpips, fid


TABLE_COLUMNS = ("name", "step", "num_samples", "psnr", "ssim", "ms_ssim", "l1", "lpips", "rfid",
                 "bits_per_image", "codebook_usage", "images_per_s")


def log_to_wandb(records: list[dict[str, Any]], args: argparse.Namespace) -> None:
    """One W&B run per evaluate call: summary metrics per checkpoint and a comparison table."""
    import wandb

    name = args.run_name or f"evaluate-{Path(args.output).name}"
    run = wandb.init(project=args.project, name=name, job_type="evaluate", dir=str(args.output),
                     config={"shards": args.shards, "checkpoints": args.checkpoints})
    table = wandb.Table(columns=list(TABLE_COLUMNS))
    for r in records:
        table.add_data(*[r.get(c) for c in TABLE_COLUMNS])
        for c in TABLE_COLUMNS[2:]:
            if r.get(c) is not None:
                run.summary[f"{r['name']}/{c}"] = r[c]
    run.log({"evaluation": table})
    run.finish()


def print_table(records: list[dict[str, Any]]) -> None:
    print(f"{'checkpoint':<28} {'N':>6} {'PSNR':>7} {'SSIM':>6} {'MS-SSIM':>7} "
          f"{'bits/img':>9} {'img/s':>8}")
    for r in records:
        bits = f"{r['bits_per_image']:.0f}" if r["bits_per_image"] is not None else "-"
        print(f"{r['name']:<28} {r['num_samples']:>6} {r['psnr']:>7.2f} {r['ssim']:>6.3f} "
              f"{r['ms_ssim']:>7.3f} {bits:>9} {r['images_per_s']:>8.0f}")


# ---------------------------------------------------------------- entry point

def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
    from accelerate import Accelerator

    from .shards import read_manifest

    manifest = read_manifest(args.shards)
    checkpoints = load_checkpoints(args.checkpoints)
    for ckpt in checkpoints:
        check_resolution(manifest, args.shards, ckpt)
    # Without cpu=True, Accelerate ignores torchrun's WORLD_SIZE on a machine without CUDA
    # and every process would evaluate every sample alone (DistributedType.NO).
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    lock = on_main_process(accelerator, lambda: lock_output(args, checkpoints),
                           f"locking --output {args.output}")
    try:
        lpips, fid = load_optional_metrics(args, accelerator.device)
        fixed = on_main_process(accelerator, lambda: load_fixed_images(args.shards),
                                "reading the fixed images")
        records = [evaluate_checkpoint(ckpt, manifest, fixed, args, accelerator, lpips, fid)
                   for ckpt in checkpoints]
        on_main_process(accelerator, lambda: summarize_run(records, args), "logging the results")
        accelerator.wait_for_everyone()
        accelerator.end_training()
    finally:
        if lock is not None:
            lock.release()
    return 0


def summarize_run(records: list[dict[str, Any]], args: argparse.Namespace) -> None:
    print_table(records)
    if args.tracker == "wandb":
        log_to_wandb(records, args)


def lock_output(args: argparse.Namespace, checkpoints: list[Checkpoint]) -> Lock:
    """Take DIR/.lock (the first thing written into DIR) and check every checkpoint's
    directory stays inside DIR, before any pass runs."""
    lock = acquire(Path(args.output) / LOCK_NAME, f"--output {args.output}")
    try:
        for ckpt in checkpoints:
            checkpoint_dir(args.output, ckpt.name)
    except BaseException:
        lock.release()
        raise
    return lock


if __name__ == "__main__":
    from pipeline.cli import run_stage

    sys.exit(run_stage(main, sys.argv[1:]))
