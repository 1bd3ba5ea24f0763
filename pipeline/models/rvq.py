"""Residual quantisation (Zeghidour et al. 2021, SoundStream, Algorithm 1): S stages, each
quantising what the stages before it left, the decoder reading the sum of their codes.

Stage kinds (`--model.stage_quantizer`):
- `vq`: every stage a `VectorQuantizer` of its own (K codes of dimension D, the same EMA,
  dead-code restart and rotation-trick options as `--model.quantizer vq`).
- `fsq`: every stage finite scalar quantisation on `fsq_levels`, stage s rounding the
  residual at the scale L^-s (each stage refines the grid of the one before), after a soft
  clamp of the input to tanh(x / c)·c with c = 1 + 1/(L-1). These stages use the
  symmetric levels 2k/(L-1) - 1 with a hard clamp, not the plain FSQ's offset grid, as
  residual FSQ needs codes symmetric around zero.

The maths of both equals vector-quantize-pytorch's `ResidualVQ` and `ResidualFSQ` (tested
with the same weights and inputs: codes, indices, losses, gradients, EMA): each stage's
output carries the gradient to its own input (straight-through or rotation trick), the
next residual subtracts the stage's code without gradient, so the encoder's gradient is
the sum over the stages in use. Losses are summed over the stages: `commitment` (and, for
codebooks learnt by the loss, `codebook`).

Codes: `stats["indices"]` is B×S×h×w (B×h×w when S = 1), each stage's index in its own
alphabet of `num_codes` (K, or prod(L)); bits per position = S × the stage's bits.

Quantiser dropout (`--model.quantizer_dropout`, training only): a step keeps the first n
stages, n uniform in [quantizer_dropout_min_stages, S]; the others give no code (index -1,
as that library marks them), no loss and no statistics update. n is a hash of a step
counter kept in the state dict: the same on every rank without a collective (every rank
runs the same number of training forwards, as the codebook statistics already require),
reproduced on resume, and drawn with tensor ops only. All stages are computed and the
dropped ones masked out, so the forward has no data-dependent branch (no graph break).

Statistics: `usage`, `perplexity`, `usage_window`, `perplexity_window` are the means over
the stages (logged as `vq/usage` ... as for one quantiser); with S > 1 each stage's are
logged too, as `vq/<stat>_stage<i>` (i from 0).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from einops import rearrange
from torch import Tensor, nn

from ..config import ModelConfig
from .bottleneck import BottleneckOutput, Quantizer
from .quantization import code_counts
from .registry import register_quantizer
from .usage import USAGE_STATS, CodeUsage
from .vq import VectorQuantizer

# splitmix64's constants, as signed int64 (torch has no uint64 arithmetic).
_GOLDEN = 0x9E3779B97F4A7C15 - 2 ** 64
_MIX1 = 0xBF58476D1CE4E5B9 - 2 ** 64
_MIX2 = 0x94D049BB133111EB - 2 ** 64


def floor_ste(x: Tensor) -> Tensor:
    """Floor in the forward pass, identity in the backward pass."""
    return x + (x.floor() - x).detach()


class ScaledFSQStage(nn.Module):
    """One FSQ stage of a residual quantiser: symmetric levels on the residual / L^-s."""

    def __init__(self, levels: Sequence[int], stage: int, usage_window: int = 100):
        super().__init__()
        levels_t = torch.tensor(list(levels), dtype=torch.float32)
        self.num_codes = math.prod(levels)
        self.bits_per_position = sum(math.log2(level) for level in levels)
        # Derived from the config, so kept out of the state dict.
        self.register_buffer("levels", levels_t, persistent=False)
        self.register_buffer("step", 2.0 / (levels_t - 1), persistent=False)
        self.register_buffer("scale", levels_t ** -stage, persistent=False)
        basis = torch.cumprod(torch.tensor([1] + list(levels)[:-1]), 0)
        self.register_buffer("basis", basis, persistent=False)
        self.usage = CodeUsage(self.num_codes, usage_window)

    def quantize_vectors(self, x: Tensor, active: Tensor | None = None
                         ) -> tuple[Tensor, Tensor, dict[str, Tensor], Tensor]:
        """Rows x (N×d) -> (codes × scale with a straight-through gradient inside the clamp,
        indices (N,), no loss terms, code counts). `active` is unused: nothing is learnt."""
        z = (x / self.scale).clamp(-1.0, 1.0)
        level = floor_ste((self.levels - 1) * (z + 1) / 2 + 0.5)  # 0 .. L-1
        codes = self.step * level - 1.0
        indices = self.codes_to_indices(codes.detach())
        return codes * self.scale, indices, {}, code_counts(indices, self.num_codes)

    def codes_to_indices(self, codes: Tensor) -> Tensor:
        digits = ((codes + 1) / self.step).round().long()
        return (digits * self.basis).sum(-1)

    def latent_from_codes(self, indices: Tensor) -> Tensor:
        """B×h×w indices -> this stage's scaled codes B×d×h×w."""
        digits = (indices.unsqueeze(-1) // self.basis) % self.levels.long()
        codes = (self.step * digits - 1.0) * self.scale
        return rearrange(codes, "b h w d -> b d h w")


class ResidualQuantizer(Quantizer):
    quantizer_name = "rvq"

    def __init__(self, stages: Sequence[nn.Module], channels: int, *, dropout: bool = False,
                 dropout_min_stages: int = 1, soft_clamp: Tensor | None = None):
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.code_stages = len(self.stages)
        first = self.stages[0]
        self.num_codes = first.num_codes
        self.stage_bits = first.bits_per_position
        self.bits_per_position = self.code_stages * self.stage_bits
        self.in_channels = self.latent_channels = channels
        self.dropout = dropout and self.code_stages > 1
        self.dropout_min_stages = min(dropout_min_stages, self.code_stages)
        self.register_buffer("soft_clamp", soft_clamp, persistent=False)
        # Training forwards that drew a dropout (in the state dict: resume continues it).
        self.register_buffer("dropout_draws", torch.zeros((), dtype=torch.long))

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> "ResidualQuantizer":
        count = cfg.num_quantizers
        options = dict(dropout=cfg.quantizer_dropout,
                       dropout_min_stages=cfg.quantizer_dropout_min_stages)
        if cfg.stage_quantizer == "fsq":
            levels = torch.tensor(cfg.fsq_levels, dtype=torch.float32)
            stages = [ScaledFSQStage(cfg.fsq_levels, s, cfg.usage_window) for s in range(count)]
            return cls(stages, len(cfg.fsq_levels), soft_clamp=1 + 1 / (levels - 1), **options)
        stages = [VectorQuantizer.from_config(cfg) for _ in range(count)]
        return cls(stages, cfg.code_dim, **options)

    # ------------------------------------------------------------ forward

    def forward(self, z: Tensor) -> BottleneckOutput:
        batch, _, height, width = z.shape
        flat = rearrange(z, "b d h w -> (b h w) d")
        with torch.autocast(device_type=z.device.type, enabled=False):
            x = flat.float()
            if self.soft_clamp is not None:
                x = torch.tanh(x / self.soft_clamp) * self.soft_clamp
            total, indices, terms, usage = self._quantize_stages(x, self._stages_kept())
        z_q = rearrange(total, "(b h w) d -> b d h w", b=batch, h=height, w=width)
        codes = rearrange(indices, "(b h w) s -> b s h w", b=batch, h=height, w=width)
        stats = {"indices": codes if self.code_stages > 1 else codes[:, 0]}
        for name in USAGE_STATS:
            per_stage = torch.stack([stage_usage[name] for stage_usage in usage])
            stats[name] = per_stage.mean()
            stats[f"{name}_per_stage"] = per_stage
        return BottleneckOutput(z_q.to(z.dtype), terms, stats)

    def _quantize_stages(self, x: Tensor, kept: Tensor | None):
        """The stages in turn on the residual: (sum of codes, indices N×S, summed loss
        terms, each stage's usage statistics)."""
        residual, total = x, torch.zeros_like(x)
        indices, terms, usage = [], {}, []
        for s, stage in enumerate(self.stages):
            active = None if kept is None else kept > s
            out, stage_indices, stage_terms, counts = stage.quantize_vectors(residual, active)
            if active is not None:  # a dropped stage: no code, no loss, no counts
                out = out * active
                stage_indices = torch.where(active, stage_indices, -1)
                stage_terms = {name: value * active for name, value in stage_terms.items()}
                counts = counts * active
            residual = residual - out.detach()
            total = total + out
            for name, value in stage_terms.items():
                terms[name] = terms[name] + value if name in terms else value
            indices.append(stage_indices)
            usage.append(stage.usage(counts, record=self.training))
        return total, torch.stack(indices, 1), terms, usage

    def _stages_kept(self) -> Tensor | None:
        """How many stages this training forward keeps (a tensor), or None for all."""
        if not (self.training and self.dropout):
            return None
        self.dropout_draws += 1
        span = self.code_stages - self.dropout_min_stages + 1
        return self.dropout_min_stages + _hash(self.dropout_draws) % span

    # ------------------------------------------------------------ what the codes are

    def rate_bits(self, stats: dict[str, Tensor]) -> Tensor:
        """Bits of the codes each image kept: h·w·S·(stage bits) without dropout (float64,
        the figure of `AutoEncoder.bits_per_image`)."""
        kept = (stats["indices"] >= 0).flatten(1).sum(1)
        return kept.double() * self.stage_bits

    def logged_stats(self, stats: dict[str, Tensor]) -> dict[str, Tensor]:
        logged = super().logged_stats(stats)
        if self.code_stages > 1:
            for name in USAGE_STATS:
                for i, value in enumerate(stats[f"{name}_per_stage"].detach().float()):
                    logged[f"{self.LOGGED_PREFIX}{name}_stage{i}"] = value
        return logged

    def latent_from_codes(self, codes: Tensor) -> Tensor:
        """Indices as `encode_latents` gives them (B×S×h×w; B×h×w when S = 1) -> the sum of
        the stages' codes B×D×h×w; a stage index of -1 (dropped) adds nothing."""
        if self.code_stages == 1:
            codes = codes.unsqueeze(1)
        total = None
        for stage, stage_codes in zip(self.stages, codes.unbind(1)):
            present = (stage_codes >= 0).unsqueeze(1)
            vectors = stage.latent_from_codes(stage_codes.clamp_min(0)) * present
            total = vectors if total is None else total + vectors
        return total


def _hash(counter: Tensor) -> Tensor:
    """A non-negative pseudo-random int64 from an int64 tensor (splitmix64's finaliser,
    with logical shifts emulated by masks): deterministic on every device."""
    z = counter * _GOLDEN
    z = (z ^ ((z >> 30) & ((1 << 34) - 1))) * _MIX1
    z = (z ^ ((z >> 27) & ((1 << 37) - 1))) * _MIX2
    z = z ^ ((z >> 31) & ((1 << 33) - 1))
    return (z >> 1) & ((1 << 62) - 1)


@register_quantizer("rvq")
def build_residual_quantizer(cfg: ModelConfig) -> ResidualQuantizer:
    return ResidualQuantizer.from_config(cfg)
