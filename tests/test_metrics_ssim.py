"""SSIM and MS-SSIM of `pipeline.metrics` against peer libraries, on natural-looking 64x64
images and typical degradations, in float32 and float64.

The convention is skimage's (valid region of an 11-tap Gaussian window); MS-SSIM keeps the
project's 3 scales and renormalised weights, per channel as pytorch_msssim. The values must
not depend on the installed torchmetrics, whose SSIM convention changed in 1.5.
"""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFilter
from skimage.metrics import structural_similarity

from pipeline import metrics

# The first three of Wang et al.'s five MS-SSIM weights, renormalised to sum to 1.
EXPECTED_BETAS = np.array([0.0448, 0.2856, 0.3001]) / (0.0448 + 0.2856 + 0.3001)
# Both sides compute in float64 from the same input values, so they agree far below the
# 1e-4 the project promises.
TOLERANCE = 1e-6


# ---------------------------------------------------------------- images

def scene_images(n: int) -> list[Image.Image]:
    """Drawn scenes of the embedded sample tree (JPEG, any size), centre crops at 64 px."""
    from pipeline.sample import render

    images = []
    for i in range(n):
        data, _ = render(seed=3, split="val", class_index=i % 10, index=i)
        with Image.open(io.BytesIO(data)) as im:
            im = im.convert("RGB")
            side = min(im.size)
            left, top = (im.width - side) // 2, (im.height - side) // 2
            images.append(im.crop((left, top, left + side, top + side))
                          .resize((64, 64), Image.Resampling.BICUBIC))
    return images


def texture_images(n: int) -> list[Image.Image]:
    """1/f textures with sharp-edged shapes: the statistics of photographs."""
    from pipeline.sample import TextureBank, bench_image

    rng = np.random.default_rng(5)
    bank = TextureBank.make(rng, count=2, side=96)
    return [Image.fromarray(bench_image(bank, rng, (64, 64))) for _ in range(n)]


def jpeg(image: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    with Image.open(buf) as im:
        return im.convert("RGB")


def to_unit(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float64).transpose(2, 0, 1) / 255  # C x H x W


def noisy(x: np.ndarray, seed: int) -> np.ndarray:
    return np.clip(x + np.random.default_rng(seed).normal(0, 0.04, x.shape), 0, 1)


@pytest.fixture(scope="module")
def pairs() -> tuple[np.ndarray, np.ndarray]:
    """(degraded, original) pairs, float64 N x 3 x 64 x 64: noise, blur, JPEG, identity."""
    originals = scene_images(4) + texture_images(4)
    degraded, reference = [], []
    for i, image in enumerate(originals):
        x = to_unit(image)
        for version in (noisy(x, i), to_unit(image.filter(ImageFilter.GaussianBlur(1.2))),
                        to_unit(jpeg(image, 15)), to_unit(jpeg(image, 60)), x):
            degraded.append(version)
            reference.append(x)
    return np.stack(degraded), np.stack(reference)


# ---------------------------------------------------------------- references

def skimage_ssim(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    return np.array([structural_similarity(p, t, gaussian_weights=True, sigma=1.5,
                                           use_sample_covariance=False, data_range=1,
                                           channel_axis=0)
                     for p, t in zip(pred, target)])


def pytorch_msssim_reference(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """pytorch_msssim's ms_ssim, rebuilt from its per-scale `_ssim` (its public ms_ssim
    refuses images of 160 px or less) with the project's 3 scales and weights."""
    from pytorch_msssim.ssim import _ssim

    x, y = torch.from_numpy(pred), torch.from_numpy(target)
    # pytorch_msssim's own window (_fspecial_gauss_1d) is built in float32, whose rounding
    # alone moves MS-SSIM by about 1e-6: the same Gaussian, in float64.
    offsets = torch.arange(11, dtype=torch.float64) - 5
    gauss = torch.exp(-offsets ** 2 / (2 * 1.5 ** 2))
    window = (gauss / gauss.sum()).view(1, 1, -1).repeat(3, 1, 1, 1)
    factors = []
    for scale in range(3):
        ssim_per_channel, contrast_structure = _ssim(x, y, data_range=1.0, win=window,
                                                     size_average=False)
        if scale < 2:
            factors.append(torch.relu(contrast_structure))
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
    factors.append(torch.relu(ssim_per_channel))
    weights = torch.tensor(EXPECTED_BETAS).view(-1, 1, 1)
    return torch.prod(torch.stack(factors) ** weights, dim=0).mean(1).numpy()


# ---------------------------------------------------------------- tests

def test_weights_are_the_renormalised_standard_ones():
    assert metrics.MS_SSIM_BETAS == pytest.approx(tuple(EXPECTED_BETAS), abs=1e-15)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ssim_equals_skimage(pairs, dtype):
    pred, target = (torch.from_numpy(a).to(dtype) for a in pairs)
    ours = metrics.per_image_ssim(pred, target)
    assert ours.dtype == dtype and ours.shape == (len(pred),)
    # The reference sees exactly the values we were given (float32 ones upcast).
    expected = skimage_ssim(pred.double().numpy(), target.double().numpy())
    assert np.abs(ours.double().numpy() - expected).max() < TOLERANCE
    assert expected.min() < 0.6 and expected.max() == pytest.approx(1.0)  # a real spread


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ms_ssim_equals_pytorch_msssim_per_scale(pairs, dtype):
    pred, target = (torch.from_numpy(a).to(dtype) for a in pairs)
    ours = metrics.per_image_ms_ssim(pred, target)
    assert ours.dtype == dtype and ours.shape == (len(pred),)
    expected = pytorch_msssim_reference(pred.double().numpy(), target.double().numpy())
    assert np.abs(ours.double().numpy() - expected).max() < TOLERANCE
    assert expected.min() < 0.8 and expected.max() == pytest.approx(1.0)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(1, 8), min_size=1, max_size=6))
def test_values_do_not_depend_on_how_images_are_batched(pairs, sizes):
    pred, target = (torch.from_numpy(a) for a in pairs)
    n = min(sum(sizes), len(pred))
    whole_ssim = metrics.per_image_ssim(pred[:n], target[:n])
    whole_ms = metrics.per_image_ms_ssim(pred[:n], target[:n])
    start, parts_ssim, parts_ms = 0, [], []
    for size in sizes:
        if start >= n:
            break
        stop = min(start + size, n)
        parts_ssim.append(metrics.per_image_ssim(pred[start:stop], target[start:stop]))
        parts_ms.append(metrics.per_image_ms_ssim(pred[start:stop], target[start:stop]))
        start = stop
    assert torch.allclose(torch.cat(parts_ssim), whole_ssim, rtol=0, atol=1e-12)
    assert torch.allclose(torch.cat(parts_ms), whole_ms, rtol=0, atol=1e-12)


def test_torchmetrics_is_not_used(pairs, monkeypatch):
    """Whatever torchmetrics' SSIM does in the installed version, ours does not call it."""
    import torchmetrics.functional.image as tm

    def refuse(*args, **kwargs):
        raise AssertionError("torchmetrics SSIM called")

    for name in ("structural_similarity_index_measure",
                 "multiscale_structural_similarity_index_measure"):
        monkeypatch.setattr(tm, name, refuse)
        monkeypatch.setattr(metrics, name, refuse, raising=False)
    pred, target = (torch.from_numpy(a[:2]) for a in pairs)
    metrics.per_image_ssim(pred, target)
    metrics.per_image_ms_ssim(pred, target)


def test_too_small_or_mismatched_images_are_refused():
    small = torch.rand(1, 3, 40, 40)
    assert metrics.MS_SSIM_MIN_SIZE == 41  # 41 -> 21 -> 11 px: one window at the last scale
    with pytest.raises(ValueError, match="40x40 px are too small.*at least 41 px"):
        metrics.per_image_ms_ssim(small, small)
    assert metrics.per_image_ssim(small, small).shape == (1,)
    with pytest.raises(ValueError, match="too small.*at least 11 px"):
        metrics.per_image_ssim(small[..., :10, :10], small[..., :10, :10])
    with pytest.raises(ValueError, match="of one shape"):
        metrics.per_image_ssim(small, small[..., :20])
    odd = torch.rand(2, 3, 45, 43, dtype=torch.float64)  # odd sides are pooled with padding
    assert metrics.per_image_ms_ssim(odd, odd).tolist() == pytest.approx([1.0, 1.0])
