"""The `resnet` family: the encoder/decoder shape of modern latent autoencoders.

Per resolution level `num_res_blocks` residual blocks (GroupNorm, SiLU, 3×3 conv, twice),
a stride-2 conv between levels, then a middle of ResBlock, optional single-head
self-attention over the h·w positions, ResBlock. The decoder mirrors it with
nearest-neighbour upsampling + conv (no checkerboard artefacts of transposed convs).

Output: a plain conv, no tanh. The recon loss is taken against [-1, 1] targets, so the
output learns that range; tanh would flatten the gradient on the saturated (black/white)
pixels. Consumers clamp to [-1, 1] before metrics or images. (The seed `basic` family
keeps its tanh.)
"""
from __future__ import annotations

import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..config import ModelConfig
from .registry import register_arch


def group_norm(channels: int, num_groups: int) -> nn.GroupNorm:
    """GroupNorm with the largest group count <= num_groups that divides `channels`."""
    groups = max(g for g in range(1, min(num_groups, channels) + 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, num_groups: int):
        super().__init__()
        self.block = nn.Sequential(
            group_norm(c_in, num_groups), nn.SiLU(), nn.Conv2d(c_in, c_out, 3, padding=1),
            group_norm(c_out, num_groups), nn.SiLU(), nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.skip(x) + self.block(x)


class SelfAttention(nn.Module):
    """Single-head attention over all h·w positions (cheap at the lowest resolution)."""

    def __init__(self, channels: int, num_groups: int):
        super().__init__()
        self.norm = group_norm(channels, num_groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        height = x.shape[-2]
        q, k, v = rearrange(self.qkv(self.norm(x)), "b (n c) h w -> n b (h w) c", n=3)
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(rearrange(out, "b (h w) c -> b c h w", h=height))


def middle(channels: int, cfg: ModelConfig) -> list[nn.Module]:
    attention = SelfAttention(channels, cfg.num_groups) if cfg.attention else nn.Identity()
    return [ResBlock(channels, channels, cfg.num_groups), attention,
            ResBlock(channels, channels, cfg.num_groups)]


def head(c_in: int, c_out: int, num_groups: int) -> list[nn.Module]:
    return [group_norm(c_in, num_groups), nn.SiLU(), nn.Conv2d(c_in, c_out, 3, padding=1)]


def resnet_encoder(cfg: ModelConfig, out_channels: int) -> nn.Sequential:
    widths = [cfg.channels * m for m in cfg.channel_mult]
    layers: list[nn.Module] = [nn.Conv2d(cfg.in_channels, cfg.channels, 3, padding=1)]
    c_in = cfg.channels
    for level, width in enumerate(widths):
        for _ in range(cfg.num_res_blocks):
            layers.append(ResBlock(c_in, width, cfg.num_groups))
            c_in = width
        if level < len(widths) - 1:
            layers.append(nn.Conv2d(width, width, 3, stride=2, padding=1))
    return nn.Sequential(*layers, *middle(c_in, cfg), *head(c_in, out_channels, cfg.num_groups))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def resnet_decoder(cfg: ModelConfig, in_channels: int) -> nn.Sequential:
    widths = [cfg.channels * m for m in cfg.channel_mult]
    c_in = widths[-1]
    layers: list[nn.Module] = [nn.Conv2d(in_channels, c_in, 3, padding=1), *middle(c_in, cfg)]
    for level in reversed(range(len(widths))):
        for _ in range(cfg.num_res_blocks):
            layers.append(ResBlock(c_in, widths[level], cfg.num_groups))
            c_in = widths[level]
        if level > 0:
            layers.append(Upsample(c_in))
    return nn.Sequential(*layers, *head(c_in, cfg.in_channels, cfg.num_groups))


@register_arch("resnet")
def build_resnet(cfg: ModelConfig, encoder_out: int,
                 decoder_in: int) -> tuple[nn.Module, nn.Module]:
    return resnet_encoder(cfg, encoder_out), resnet_decoder(cfg, decoder_in)
