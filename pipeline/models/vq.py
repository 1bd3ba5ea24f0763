"""Vector quantiser (van den Oord et al. 2017) with EMA codebook and dead-code restarts.

Design choices, each for a failure seen in practice:
- Distances, EMA statistics and the commitment loss are computed in float32 with autocast
  off: in bf16, codes closer than ~1% of their norm are indistinguishable.
- The codebook starts from random encoder outputs of the first training batch (uniform
  random codes far from the data would mostly never be picked).
- Codes whose EMA cluster size falls below `dead_code_threshold` are restarted, at the
  start of the next training forward, from random encoder outputs of that batch; a
  restarted code is an exact copy of one batch vector, so it is used at once.
- Under torch.distributed every rank must keep the same codebook: counts and sums are
  all-reduced before the EMA update, and restart candidates are drawn on rank 0 and
  broadcast. Collectives run only in training mode, so every rank must run the same
  number of training-mode forwards (as DDP training does anyway).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..config import ModelConfig
from .bottleneck import BottleneckOutput, Quantizer
from .registry import register_quantizer
from .usage import CodeUsage

# Rows of the distance matrix computed at once: keeps it near 256 MiB for big codebooks.
DISTANCE_CHUNK_ELEMENTS = 2 ** 26


class VectorQuantizer(Quantizer):
    quantizer_name = "vq"

    def __init__(self, codebook_size: int, code_dim: int, *, ema: bool = True,
                 decay: float = 0.99, l2_normalize: bool = False,
                 dead_code_threshold: float = 1.0, usage_window: int = 100,
                 eps: float = 1e-5):
        super().__init__()
        self.codebook_size = self.num_codes = codebook_size
        self.in_channels = self.latent_channels = code_dim
        self.bits_per_position = math.log2(codebook_size)
        self.ema = ema
        self.decay = decay
        self.l2_normalize = l2_normalize
        self.dead_code_threshold = dead_code_threshold
        self.eps = eps  # Laplace smoothing of the cluster sizes: no division by zero

        codes = self._normalize(torch.randn(codebook_size, code_dim))
        if ema:
            self.register_buffer("codebook", codes)
            self.register_buffer("embed_sum", codes.clone())
        else:
            self.codebook = nn.Parameter(codes)
        # EMA of how many vectors each code received; starts at one (the code itself) so
        # that codebook == embed_sum / cluster_size holds from the start. Kept in loss mode
        # too, where it only decides which codes are dead.
        self.register_buffer("cluster_size", torch.ones(codebook_size))
        self.register_buffer("initialized", torch.tensor(False))
        self.usage = CodeUsage(codebook_size, usage_window)

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> "VectorQuantizer":
        return cls(cfg.codebook_size, cfg.code_dim, ema=cfg.codebook_ema, decay=cfg.codebook_decay,
                   l2_normalize=cfg.l2_normalize_codes,
                   dead_code_threshold=cfg.dead_code_threshold, usage_window=cfg.usage_window)

    # ------------------------------------------------------------ forward

    def forward(self, z: Tensor) -> BottleneckOutput:
        batch, _, height, width = z.shape
        flat = rearrange(z, "b d h w -> (b h w) d")
        with torch.autocast(device_type=z.device.type, enabled=False):
            quantized, indices, terms, counts = self._quantize(flat.float())
        z_q = rearrange(quantized, "(b h w) d -> b d h w", b=batch, h=height, w=width)
        stats = {"indices": indices.view(batch, height, width),
                 **self.usage(counts, record=self.training)}
        return BottleneckOutput(z_q.to(z.dtype), terms, stats)

    def _quantize(self, x: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor], Tensor]:
        x = self._normalize(x)
        if self.training:
            self._restart_dead_codes(x.detach())
        codes = self.codes()
        indices = self.nearest(x.detach(), codes.detach())
        quantized = F.embedding(indices, codes)
        terms = {"commitment": F.mse_loss(x, quantized.detach())}
        if not self.ema:
            terms["codebook"] = F.mse_loss(quantized, x.detach())
        counts = torch.bincount(indices, minlength=self.codebook_size).float()
        if self.training:
            self._update_statistics(x.detach(), indices, counts.clone())
        # Straight-through: the decoder sees the code, the encoder gets the decoder's gradient.
        return x + (quantized - x).detach(), indices, terms, counts

    def codes(self) -> Tensor:
        """The codebook as used for lookup (float32, unit rows when l2-normalised)."""
        return self._normalize(self.codebook.float())

    def nearest(self, x: Tensor, codes: Tensor) -> Tensor:
        """Index of the closest code (squared Euclidean) for every row of x, in float32."""
        rows = max(1, DISTANCE_CHUNK_ELEMENTS // self.codebook_size)
        codes = codes.float()
        code_norms = codes.pow(2).sum(1)
        chunks = []
        for chunk in x.float().split(rows):
            distances = chunk.pow(2).sum(1, keepdim=True) - 2 * chunk @ codes.t() + code_norms
            chunks.append(distances.argmin(1))
        return torch.cat(chunks)

    def _normalize(self, x: Tensor) -> Tensor:
        return F.normalize(x, dim=-1) if self.l2_normalize else x

    # ------------------------------------------------------------ codebook learning

    @torch.no_grad()
    def _update_statistics(self, x: Tensor, indices: Tensor, counts: Tensor) -> None:
        """EMA of cluster sizes (both modes) and, in EMA mode, of the codes themselves."""
        _all_reduce_sum(counts)
        # lerp_(new, 1 - decay) == old * decay + new * (1 - decay)
        self.cluster_size.lerp_(counts, 1 - self.decay)
        if not self.ema:
            return
        sums = x.new_zeros(self.codebook_size, x.shape[1]).index_add_(0, indices, x)
        _all_reduce_sum(sums)
        self.embed_sum.lerp_(sums, 1 - self.decay)
        total = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (total + self.codebook_size * self.eps) * total
        self.codebook.copy_(self._normalize(self.embed_sum / smoothed.unsqueeze(1)))

    @torch.no_grad()
    def _restart_dead_codes(self, x: Tensor) -> None:
        """Replace dead codes (all codes before the first batch) by random rows of x."""
        dead = (self.cluster_size < self.dead_code_threshold) | ~self.initialized
        num_dead = int(dead.sum())  # identical on every rank: cluster sizes are synchronised
        if num_dead == 0:
            return
        if num_dead <= len(x):
            picks = torch.randperm(len(x), device=x.device)[:num_dead]
        else:  # more dead codes than vectors in the batch: some get the same vector
            picks = torch.randint(len(x), (num_dead,), device=x.device)
        replacements = x[picks].contiguous()
        _broadcast_from_rank0(replacements)
        # A restarted code counts as `reset` vectors: alive until it goes unused for a while.
        reset = max(self.dead_code_threshold, 1.0)
        self.codebook[dead] = replacements.to(self.codebook.dtype)
        self.cluster_size[dead] = reset
        if self.ema:
            self.embed_sum[dead] = replacements * reset
        self.initialized.fill_(True)


@register_quantizer("vq")
def build_vector_quantizer(cfg: ModelConfig) -> VectorQuantizer:
    return VectorQuantizer.from_config(cfg)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce_sum(tensor: Tensor) -> None:
    if _distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)


def _broadcast_from_rank0(tensor: Tensor) -> None:
    if _distributed():
        dist.broadcast(tensor, src=0)
