"""The `resnet` family: the encoder/decoder of latent diffusion's autoencoders.

The layout is the one of latent diffusion (Rombach et al. 2022) as diffusers'
`AutoencoderKL` / `VQModel` hold it, so a trained model exports to diffusers
(`pipeline export --format diffusers`, table of names in `models/diffusers.py`):

- encoder: 3×3 `conv_in` to the first width; per resolution level `num_res_blocks`
  residual blocks (GroupNorm, SiLU, 3×3 conv, twice; a 1×1 conv on the skip when the width
  changes) and, on all but the last level, a stride-2 3×3 conv with padding 0 after an
  asymmetric zero pad (0, 1, 0, 1); a middle of ResBlock, optional single-head
  self-attention over the h·w positions, ResBlock; GroupNorm, SiLU, 3×3 `conv_out`.
- decoder: `conv_in` to the last width, the same middle, per level from the lowest
  resolution up `num_res_blocks + 1` residual blocks then nearest-neighbour ×2 upsampling
  + 3×3 conv (no checkerboard artefacts of transposed convs); GroupNorm, SiLU, `conv_out`.
- GroupNorm eps 1e-6; its group count is `num_groups`, clipped to divide the width
  (diffusers has one `norm_num_groups`: the export refuses a model whose norms differ).

Encoder and decoder are `nn.Sequential`s with named children (`conv_in`, `levels`, `mid`,
`norm_out`, `act`, `conv_out`), applied in that order; `levels` are in the order the data
passes through them (the decoder's first level is its lowest resolution).

Output: a plain conv, no tanh. The recon loss is taken against [-1, 1] targets, so the
output learns that range; tanh would flatten the gradient on the saturated (black/white)
pixels. Consumers clamp to [-1, 1] before metrics or images. (The seed `basic` family
keeps its tanh.)
"""
from __future__ import annotations

from collections import OrderedDict

import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..config import ModelConfig
from .registry import register_arch

# Latent diffusion's (and diffusers') GroupNorm epsilon, so exported models compute the same.
NORM_EPS = 1e-6


def group_norm(channels: int, num_groups: int) -> nn.GroupNorm:
    """GroupNorm with the largest group count <= num_groups that divides `channels`."""
    groups = max(g for g in range(1, min(num_groups, channels) + 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels, eps=NORM_EPS)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, num_groups: int):
        super().__init__()
        self.norm1 = group_norm(c_in, num_groups)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = group_norm(c_out, num_groups)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.skip is None else self.skip(x)) + h


class SelfAttention(nn.Module):
    """Single-head attention over all h·w positions (cheap at the lowest resolution)."""

    def __init__(self, channels: int, num_groups: int):
        super().__init__()
        self.norm = group_norm(channels, num_groups)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.proj = nn.Linear(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        height = x.shape[-2]
        h = rearrange(self.norm(x), "b c h w -> b (h w) c")
        out = F.scaled_dot_product_attention(self.to_q(h), self.to_k(h), self.to_v(h))
        return x + rearrange(self.proj(out), "b (h w) c -> b c h w", h=height)


class Middle(nn.Module):
    """ResBlock, optional self-attention, ResBlock at the lowest resolution."""

    def __init__(self, channels: int, cfg: ModelConfig):
        super().__init__()
        self.block1 = ResBlock(channels, channels, cfg.num_groups)
        self.attention = SelfAttention(channels, cfg.num_groups) if cfg.attention else None
        self.block2 = ResBlock(channels, channels, cfg.num_groups)

    def forward(self, x: Tensor) -> Tensor:
        x = self.block1(x)
        if self.attention is not None:
            x = self.attention(x)
        return self.block2(x)


class Downsample(nn.Module):
    """Stride-2 3×3 conv after a (0, 1, 0, 1) zero pad: the output pixel (i, j) sees input
    rows and columns 2i..2i+2, as in latent diffusion (a symmetric padding of 1 would shift
    the latent grid by one input pixel against it)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """The residual blocks of one resolution, then the resampling to the next (if any)."""

    def __init__(self, c_in: int, c_out: int, num_blocks: int, num_groups: int,
                 resample: nn.Module | None):
        super().__init__()
        self.blocks = nn.ModuleList(ResBlock(c_in if i == 0 else c_out, c_out, num_groups)
                                    for i in range(num_blocks))
        self.resample = resample

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return x if self.resample is None else self.resample(x)


def widths_of(cfg: ModelConfig) -> list[int]:
    return [cfg.channels * m for m in cfg.channel_mult]


def head(c_in: int, c_out: int, num_groups: int) -> list[tuple[str, nn.Module]]:
    return [("norm_out", group_norm(c_in, num_groups)), ("act", nn.SiLU()),
            ("conv_out", nn.Conv2d(c_in, c_out, 3, padding=1))]


def resnet_encoder(cfg: ModelConfig, out_channels: int) -> nn.Sequential:
    widths = widths_of(cfg)
    levels = []
    for i, width in enumerate(widths):
        last = i == len(widths) - 1
        levels.append(Level(widths[max(i - 1, 0)], width, cfg.num_res_blocks, cfg.num_groups,
                            None if last else Downsample(width)))
    return nn.Sequential(OrderedDict([
        ("conv_in", nn.Conv2d(cfg.in_channels, widths[0], 3, padding=1)),
        ("levels", nn.Sequential(*levels)), ("mid", Middle(widths[-1], cfg)),
        *head(widths[-1], out_channels, cfg.num_groups)]))


def resnet_decoder(cfg: ModelConfig, in_channels: int) -> nn.Sequential:
    widths = widths_of(cfg)[::-1]  # lowest resolution first, the order data flows
    levels = []
    for i, width in enumerate(widths):
        last = i == len(widths) - 1
        # One block more than the encoder's, as in latent diffusion's decoder.
        levels.append(Level(widths[max(i - 1, 0)], width, cfg.num_res_blocks + 1,
                            cfg.num_groups, None if last else Upsample(width)))
    return nn.Sequential(OrderedDict([
        ("conv_in", nn.Conv2d(in_channels, widths[0], 3, padding=1)),
        ("mid", Middle(widths[0], cfg)), ("levels", nn.Sequential(*levels)),
        *head(widths[-1], cfg.in_channels, cfg.num_groups)]))


@register_arch("resnet")
def build_resnet(cfg: ModelConfig, encoder_out: int,
                 decoder_in: int) -> tuple[nn.Module, nn.Module]:
    return resnet_encoder(cfg, encoder_out), resnet_decoder(cfg, decoder_in)
