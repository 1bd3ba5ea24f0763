"""Finite scalar quantisation (Mentzer et al. 2023, "FSQ: VQ-VAE made simple").

Each of the d = len(levels) latent channels is squashed into a bounded range and rounded
to one of L_i integer levels; the implicit codebook is the grid of prod(L_i) points, so
there is nothing to learn, no codebook loss and no dead code. The encoder's last layer
produces the d channels directly.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from einops import rearrange
from torch import Tensor

from ..config import ModelConfig
from .bottleneck import BottleneckOutput, Quantizer
from .quantization import code_counts
from .registry import register_quantizer
from .usage import CodeUsage


def round_ste(x: Tensor) -> Tensor:
    """Round in the forward pass, identity in the backward pass."""
    return x + (x.round() - x).detach()


class FSQ(Quantizer):
    quantizer_name = "fsq"

    def __init__(self, levels: Sequence[int], usage_window: int = 100, eps: float = 1e-3):
        super().__init__()
        self.levels_list = list(levels)
        self.num_codes = math.prod(self.levels_list)
        self.in_channels = self.latent_channels = len(self.levels_list)
        self.bits_per_position = sum(math.log2(level) for level in self.levels_list)
        self.eps = eps
        levels_t = torch.tensor(self.levels_list, dtype=torch.float32)
        # Mixed-radix place values: index = sum(digit_i * prod(L_0..L_{i-1})).
        basis = torch.cumprod(torch.tensor([1] + self.levels_list[:-1]), 0)
        # Derived from the config, so kept out of the state dict.
        self.register_buffer("levels", levels_t, persistent=False)
        self.register_buffer("basis", basis, persistent=False)
        self.register_buffer("half_width", (levels_t // 2), persistent=False)
        self.usage = CodeUsage(self.num_codes, usage_window)

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> "FSQ":
        return cls(cfg.fsq_levels, usage_window=cfg.usage_window)

    def bound(self, z: Tensor) -> Tensor:
        """Squash z so that rounding gives exactly L_i integer values per channel.

        For odd L the range is (-(L-1)/2, (L-1)/2). For even L there is no symmetric
        integer grid, so the paper shifts by half a step: tanh is offset so that
        bound(0) = 0 still holds and the rounded values are -L/2 .. L/2 - 1.
        """
        half_l = (self.levels - 1) * (1 + self.eps) / 2
        offset = torch.where(self.levels % 2 == 0, 0.5, 0.0)
        shift = torch.atanh(offset / half_l)
        return torch.tanh(z + shift) * half_l - offset

    def quantize(self, z: Tensor) -> Tensor:
        """Channel-last z -> codes on the grid, normalised to [-1, 1]."""
        return round_ste(self.bound(z)) / self.half_width

    def codes_to_indices(self, codes: Tensor) -> Tensor:
        digits = (codes * self.half_width + self.half_width).round().long()
        return (digits * self.basis).sum(-1)

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        digits = (indices.unsqueeze(-1) // self.basis) % self.levels.long()
        return (digits - self.half_width) / self.half_width

    def latent_from_codes(self, codes: Tensor) -> Tensor:
        """B×h×w indices -> their grid points B×d×h×w in [-1, 1], as `forward` gives them."""
        return rearrange(self.indices_to_codes(codes), "b h w d -> b d h w")

    def forward(self, z: Tensor) -> BottleneckOutput:
        with torch.autocast(device_type=z.device.type, enabled=False):
            codes = self.quantize(rearrange(z.float(), "b d h w -> b h w d"))
            indices = self.codes_to_indices(codes.detach())
        counts = code_counts(indices, self.num_codes)
        stats = {"indices": indices, **self.usage(counts, record=self.training)}
        z_q = rearrange(codes, "b h w d -> b d h w").to(z.dtype)
        return BottleneckOutput(z_q, {}, stats)


@register_quantizer("fsq")
def build_fsq(cfg: ModelConfig) -> FSQ:
    return FSQ.from_config(cfg)
