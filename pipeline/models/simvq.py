"""SimVQ (Zhu et al. 2024, "Addressing representation collapse in vector quantized models
with one linear layer"): a frozen random codebook C re-parameterised by one learnt linear
map W; the codes in use are C Wᵀ.

A VQ codebook learnt by its loss updates only the codes that were picked, so the others
fall behind and die (usage falls as K grows). Here the loss moves W, which moves every
code at once: no code is left behind, without EMA statistics or dead-code restarts.

The maths is that of vector-quantize-pytorch's `SimVQ` (tested with the same weights and
inputs: codes, indices, loss and gradients equal): C ~ N(0, 1/D) of K×D, W a D×D linear
map without bias, nearest code by Euclidean distance (float32), and the loss
``|sg(x) - q|² + 0.25 |x - sg(q)|²``, here the `codebook` and `commitment` terms of
`compute_loss` (their weights --loss.codebook_weight 1 and --loss.commitment_weight 0.25
are the defaults). Where our default differs: the gradient passes the lookup by the
straight-through estimator as in the paper; `--model.rotation_trick true` uses the
rotation trick, which that library turns on by default.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..config import ModelConfig
from .bottleneck import BottleneckOutput, Quantizer
from .quantization import code_counts, commitment_terms, nearest_code, pass_gradient
from .registry import register_quantizer
from .usage import CodeUsage


class SimVQ(Quantizer):
    quantizer_name = "simvq"

    def __init__(self, codebook_size: int, code_dim: int, *, rotation_trick: bool = False,
                 usage_window: int = 100):
        super().__init__()
        self.codebook_size = self.num_codes = codebook_size
        self.in_channels = self.latent_channels = code_dim
        self.bits_per_position = math.log2(codebook_size)
        self.rotation_trick = rotation_trick
        # Persistent: the frozen codes are part of the model (random, not derivable).
        self.register_buffer("frozen_codebook",
                             torch.randn(codebook_size, code_dim) * code_dim ** -0.5)
        self.transform = nn.Linear(code_dim, code_dim, bias=False)
        self.usage = CodeUsage(codebook_size, usage_window)

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> "SimVQ":
        return cls(cfg.codebook_size, cfg.code_dim, rotation_trick=cfg.rotation_trick,
                   usage_window=cfg.usage_window)

    def codes(self) -> Tensor:
        """The effective codebook C Wᵀ (K×D, float32, differentiable in W)."""
        return F.linear(self.frozen_codebook.float(), self.transform.weight.float())

    def forward(self, z: Tensor) -> BottleneckOutput:
        batch, _, height, width = z.shape
        flat = rearrange(z, "b d h w -> (b h w) d")
        with torch.autocast(device_type=z.device.type, enabled=False):
            x = flat.float()
            codes = self.codes()
            indices = nearest_code(x.detach(), codes.detach())
            quantized = F.embedding(indices, codes)
            terms = commitment_terms(x, quantized)
            out = pass_gradient(x, quantized, self.rotation_trick)
        counts = code_counts(indices, self.codebook_size)
        stats = {"indices": indices.view(batch, height, width),
                 **self.usage(counts, record=self.training)}
        z_q = rearrange(out, "(b h w) d -> b d h w", b=batch, h=height, w=width)
        return BottleneckOutput(z_q.to(z.dtype), terms, stats)

    def latent_from_codes(self, codes: Tensor) -> Tensor:
        """B×h×w indices -> their effective codes B×D×h×w, as `forward` hands them on."""
        return rearrange(F.embedding(codes, self.codes()), "b h w d -> b d h w")

    def diffusers_codebook(self) -> Tensor:
        """The effective codebook C Wᵀ: a plain Euclidean lookup in it quantises as SimVQ
        does, so diffusers' VQModel can hold it as its embedding."""
        with torch.no_grad():
            return self.codes().detach().float().cpu().clone()


@register_quantizer("simvq")
def build_simvq(cfg: ModelConfig) -> SimVQ:
    return SimVQ.from_config(cfg)
