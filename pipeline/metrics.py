"""Image-quality and bottleneck metrics for `pipeline evaluate`.

PSNR comes from torchmetrics. SSIM and MS-SSIM are computed here, in a few lines of
batched torch, because torchmetrics changed their convention in 1.5 (it now averages the
whole reflect-padded SSIM map; 1.4 cropped its border as skimage and Wang et al.'s code do),
which at 64x64 moves SSIM by up to 0.027 and MS-SSIM by up to 0.09: the project's values
must not depend on the installed library version. They follow skimage's convention (see
`per_image_ssim`), the one published tokenizer tables use. This module also adds what the
libraries leave to the caller: the PSNR cap, code usage from code counts, the VAE's
discretised likelihood, loading LPIPS / Inception weights from local files only (LPIPS
through `pipeline.models.lpips`, the loader the training's perceptual term shares; nothing
here ever downloads, nothing here unpickles: tensors only, `weights_only=True`), and the
float64 sums `pipeline evaluate` reduces across processes. What a bottleneck carries (its
rate, its code alphabet) is the model's to say (`AutoEncoder.rate_bits`, `num_codes`).

All image arguments are float tensors B x 3 x H x W with values in [0, 1].
"""
from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.functional.image import peak_signal_noise_ratio

from .models import lpips as _lpips
from .utils import PipelineError

# One perfect image (MSE 0) would make the mean of per-image PSNR infinite.
PSNR_CAP_DB = 100.0

SSIM_KERNEL = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03  # Wang et al. 2004: C1 = (K1 * range)^2, C2 = (K2 * range)^2
# The standard MS-SSIM uses five scales and needs images over 160 px. At 64 px three scales
# (64, 32, 16 px) keep the 11-px Gaussian window inside the smallest scale; the first
# three standard weights (Wang et al. 2003) are renormalised to sum to 1.
_STANDARD_BETAS = (0.0448, 0.2856, 0.3001)
MS_SSIM_BETAS = tuple(b / sum(_STANDARD_BETAS) for b in _STANDARD_BETAS)
# Smallest side for which every scale still holds one whole window (halving rounds up).
MS_SSIM_MIN_SIZE = (SSIM_KERNEL - 1) * 2 ** (len(MS_SSIM_BETAS) - 1) + 1
# Written into metrics.json so that values computed under another convention (e.g. by an
# older version of this project, which used torchmetrics) are recognised as such.
SSIM_CONVENTION = "skimage-valid/v1"

# LPIPS backbones: torchvision constructor and the channel count of each compared layer.
LPIPS_NETS = _lpips.LPIPS_NETS


def to_unit_range(images: Tensor) -> Tensor:
    """Model space [-1, 1] -> [0, 1]; out-of-range decoder outputs are clipped, not wrapped."""
    return ((images.float() + 1) / 2).clamp(0, 1)


def per_image_mse(pred: Tensor, target: Tensor) -> Tensor:
    return (pred - target).pow(2).flatten(1).mean(1)


def per_image_l1(pred: Tensor, target: Tensor) -> Tensor:
    return (pred - target).abs().flatten(1).mean(1)


def per_image_psnr(pred: Tensor, target: Tensor) -> Tensor:
    """PSNR of each image in dB (data range 1), capped at PSNR_CAP_DB."""
    psnr = peak_signal_noise_ratio(pred, target, data_range=1.0, reduction="none",
                                   dim=(1, 2, 3))
    return psnr.clamp(max=PSNR_CAP_DB)


def psnr_from_mse(mse: float) -> float:
    """PSNR (dB, data range 1) of a mean squared error, with the same cap as per image."""
    if mse <= 0:
        return PSNR_CAP_DB
    return min(PSNR_CAP_DB, 10.0 * math.log10(1.0 / mse))


def per_image_ssim(pred: Tensor, target: Tensor) -> Tensor:
    """SSIM of each image (B,), as skimage's `structural_similarity(gaussian_weights=True,
    sigma=1.5, use_sample_covariance=False, data_range=1, channel_axis=...)` computes it.

    That is: 11-tap Gaussian window (sigma 1.5), population (co)variances, the SSIM map
    only where the whole window lies inside the image (skimage crops the 5-px border),
    its mean per channel, then the mean over channels.
    """
    _check_images(pred, target, SSIM_KERNEL)
    ssim, _ = _ssim_per_channel(pred.double(), target.double())
    return ssim.mean(1).to(pred.dtype)


def per_image_ms_ssim(pred: Tensor, target: Tensor) -> Tensor:
    """MS-SSIM of each image (B,) over 3 scales (64, 32, 16 px at 64 px) with
    MS_SSIM_BETAS, per channel as pytorch_msssim computes it.

    At each scale but the last, the mean contrast-structure term (relu'd) of each channel;
    at the last, its SSIM (relu'd); each raised to its scale's weight, multiplied over the
    scales, then averaged over channels. Scales are 2x2 average pools (odd sides padded,
    as pytorch_msssim does). Every scale uses the valid region only, as `per_image_ssim`.
    """
    _check_images(pred, target, MS_SSIM_MIN_SIZE)
    x, y = pred.double(), target.double()
    factors = []
    for scale, beta in enumerate(MS_SSIM_BETAS):
        ssim, contrast_structure = _ssim_per_channel(x, y)
        last = scale == len(MS_SSIM_BETAS) - 1
        factors.append((ssim if last else contrast_structure).relu() ** beta)
        if not last:
            x, y = _halve(x), _halve(y)
    return torch.stack(factors).prod(0).mean(1).to(pred.dtype)


def _check_images(pred: Tensor, target: Tensor, min_size: int) -> None:
    if pred.shape != target.shape or pred.dim() != 4:
        raise ValueError(f"expected two B x C x H x W batches of one shape, got "
                         f"{tuple(pred.shape)} and {tuple(target.shape)}")
    if min(pred.shape[-2:]) < min_size:
        raise ValueError(f"images of {pred.shape[-2]}x{pred.shape[-1]} px are too small: "
                         f"this metric needs at least {min_size} px a side")


def _ssim_per_channel(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """(mean SSIM map, mean contrast-structure map), each B x C, over the valid region.

    Always in float64: the variances are differences of local moments (E[x^2] - E[x]^2),
    which lose digits to cancellation in float32 (SSIM off by about 1e-5); at these sizes
    the convolutions cost little either way.
    """
    channels = x.shape[1]
    moments = _local_means(torch.cat([x, y, x * x, y * y, x * y], dim=1))
    mean_x, mean_y, mean_xx, mean_yy, mean_xy = moments.split(channels, dim=1)
    var_x, var_y = mean_xx - mean_x ** 2, mean_yy - mean_y ** 2
    cov = mean_xy - mean_x * mean_y
    c1, c2 = SSIM_K1 ** 2, SSIM_K2 ** 2  # data range 1
    contrast_structure = (2 * cov + c2) / (var_x + var_y + c2)
    luminance = (2 * mean_x * mean_y + c1) / (mean_x ** 2 + mean_y ** 2 + c1)
    return ((luminance * contrast_structure).flatten(2).mean(2),
            contrast_structure.flatten(2).mean(2))


def _local_means(images: Tensor) -> Tensor:
    """Gaussian-weighted mean of each channel around every pixel whose whole window lies
    inside the image: a separable valid convolution, no padding."""
    offsets = torch.arange(SSIM_KERNEL, dtype=images.dtype, device=images.device)
    weights = torch.exp(-(offsets - SSIM_KERNEL // 2) ** 2 / (2 * SSIM_SIGMA ** 2))
    channels = images.shape[1]
    rows = (weights / weights.sum()).view(1, 1, SSIM_KERNEL, 1).repeat(channels, 1, 1, 1)
    blurred = F.conv2d(images, rows, groups=channels)
    return F.conv2d(blurred, rows.transpose(2, 3), groups=channels)


def _halve(images: Tensor) -> Tensor:
    return F.avg_pool2d(images, kernel_size=2, padding=[s % 2 for s in images.shape[-2:]])


# ---------------------------------------------------------------- bottleneck

def bits_per_image(model: str, quantizer: str, latent_shape: Sequence[int],
                   codebook_size: int, fsq_levels: Sequence[int],
                   kl_nats: float | None = None) -> float | None:
    """Information the bottleneck carries per image, from config values (for callers
    without a model; `pipeline evaluate` asks the model: `AutoEncoder.rate_bits`).

    VQ: one index of log2 K bits per latent position; FSQ: one level per channel, so
    sum(log2 L_i) bits per position; VAE: its KL in bits (the rate of the ELBO);
    AE: None, since a continuous latent has no finite rate (report its size instead).
    """
    positions = int(latent_shape[-2]) * int(latent_shape[-1])
    if model == "vqvae" and quantizer == "vq":
        return positions * math.log2(codebook_size)
    if model == "vqvae" and quantizer == "fsq":
        return positions * sum(math.log2(level) for level in fsq_levels)
    if model == "vae" and kl_nats is not None:
        return kl_nats / math.log(2)
    return None


def num_codes(quantizer: str, codebook_size: int, fsq_levels: Sequence[int]) -> int:
    """Size of the code alphabet: K for VQ, the product of the levels for FSQ (from config
    values; with a model at hand, `AutoEncoder.num_codes` says it)."""
    return codebook_size if quantizer == "vq" else math.prod(fsq_levels)


def code_usage(counts: Tensor) -> tuple[float, float]:
    """(percent of codes used at least once, perplexity = exp(entropy of code frequencies)),
    with the same definitions the trainer logs (pipeline.models.usage)."""
    from .models.usage import perplexity, usage_fraction

    return 100.0 * usage_fraction(counts).item(), perplexity(counts).item()


def discretized_gaussian_nll(target: Tensor, mean: Tensor, sigma: float,
                             levels: int = 256) -> Tensor:
    """-log p(x | z) in nats per image for 8-bit pixels under N(mean, sigma^2) per value.

    Each pixel value k/255 owns the bin of width 1/255 around it; the outer bins extend to
    +-inf so the probabilities sum to 1 (the PixelCNN++ convention, with a Gaussian).
    Computed in float64; a bin probability is floored at 1e-12 (27.6 nats).
    """
    x, mu = target.double(), mean.double()
    half_bin = 0.5 / (levels - 1)
    upper = torch.special.ndtr((x + half_bin - mu) / sigma)
    lower = torch.special.ndtr((x - half_bin - mu) / sigma)
    upper = torch.where(x >= 1 - half_bin, torch.ones_like(upper), upper)
    lower = torch.where(x <= half_bin, torch.zeros_like(lower), lower)
    nll = -(upper - lower).clamp(min=1e-12).log()
    return nll.flatten(1).sum(1)


# ---------------------------------------------------------------- LPIPS

def load_lpips(backbone_path: str | Path, linear_path: str | Path | None,
               net: str = "alex") -> torch.nn.Module:
    """LPIPS v0.1 built from local files only: a module mapping two [0, 1] batches to
    per-image distances (B,). The loader is `pipeline.models.lpips`, shared with the
    training's perceptual term (the same files, the same network); messages name
    `pipeline evaluate`'s options."""
    return _lpips.load_lpips(backbone_path, linear_path, net, _lpips.EVALUATE_OPTIONS)


_read_state_dict = _lpips.read_state_dict  # load_fid reads its file the same way


# ---------------------------------------------------------------- rFID

def load_fid(inception_path: str | Path) -> torch.nn.Module:
    """torchmetrics' FrechetInceptionDistance (2048-d pool features) on local weights.

    The file is torch-fidelity's `weights-inception-2015-12-05-6726825d.pth` (the TF
    Inception graph converted to PyTorch, the one FID is defined with). Inputs: [0, 1].
    It is read here with `weights_only=True`: torch-fidelity itself would read it with
    `torch.load(weights_only=False)`, which runs any code a crafted file holds.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

    path = Path(inception_path)
    if not _TORCH_FIDELITY_AVAILABLE:
        raise PipelineError("--inception-weights needs the torch-fidelity package "
                            "(`pip install torch-fidelity`, pure Python); rFID was not computed")
    state = _read_state_dict(path, "--inception-weights")
    try:
        return FrechetInceptionDistance(feature=2048, normalize=True,
                                        feature_extractor_weights_path=_reserialized(state))
    except Exception as e:  # key and shape mismatch errors come in many types
        raise PipelineError(f"--inception-weights {path}: not torch-fidelity's Inception-v3 "
                            f"weights ({str(e).splitlines()[0]})") from e


def _reserialized(state: dict[str, Tensor]) -> io.BytesIO:
    """The tensors read safely, serialised again in memory for torch-fidelity's loader:
    the only pickle its torch.load(weights_only=False) parses is this one, written here
    from tensors, never the user's file."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


# ---------------------------------------------------------------- accumulation

class SumReducer:
    """Named float64 sums, reduced across processes in ONE collective at the end.

    The layout (names and lengths) is fixed up front, so every rank holds the same
    vector even if it saw no batch. The sums live on the compute device, so adding a
    batch never waits for the GPU. `reduce` concatenates them, reduces once and splits
    them back: ranks never exchange per-batch values, and the result does not depend on
    how the samples were split between them.
    """

    def __init__(self, sizes: dict[str, int], device: torch.device | str = "cpu") -> None:
        self.sums = {name: torch.zeros(size, dtype=torch.float64, device=device)
                     for name, size in sizes.items()}

    def add(self, name: str, values: Tensor) -> None:
        """Add the sum of `values` (e.g. one metric for each image of a batch)."""
        self.sums[name] += values.detach().double().sum()

    def add_at(self, name: str, index: Tensor, values: Tensor) -> None:
        """Add `values[i]` to bin `index[i]` (per-class sums, code counts)."""
        target = self.sums[name]
        target.index_add_(0, index.detach().to(target.device).long(),
                          values.detach().to(target.device, torch.float64))

    def reduce(self, all_reduce_sum: Callable[[Tensor], Tensor]) -> dict[str, Tensor]:
        names = list(self.sums)
        flat = all_reduce_sum(torch.cat([self.sums[n] for n in names])).cpu()
        return dict(zip(names, flat.split([self.sums[n].numel() for n in names])))


def lowest_k(candidates: list[tuple[float, str]], k: int) -> list[tuple[float, str]]:
    """The k lowest (score, key) pairs; ties broken by key so every rank split agrees."""
    return sorted(candidates)[:k]
